"""The ideas of RLHF on a K-armed bandit, exactly and instantly (notebook 00).

No language model: a "response" is one of K arms, a policy is a softmax over K logits. Everything here is a
pure function on small float64 tensors, so each formula can be checked against a closed form.

Equations (numbers used in comments below):
  (1) Bradley–Terry:              P(a ≻ b) = σ(r_a − r_b)
  (2) KL-regularised objective:   J(π) = E_π[r] − β·KL(π‖π_ref)
  (3) its optimum:                π*(y) = π_ref(y)·exp(r(y)/β) / Z,   Z = Σ_y π_ref(y)·exp(r(y)/β)
  (4) suboptimality:              J(π*) − J(π) = β·KL(π‖π*)
  (5) PPO clipped surrogate:      L(ρ, A) = min(ρ·A, clip(ρ, 1−ε, 1+ε)·A),   ρ = π(y)/π_old(y)
  (6) DPO loss:                   −log σ(r̂(y_w) − r̂(y_l)),   r̂(y) = β·(log π(y) − log π_ref(y))

Metric keys of the bandit loops, one row per logged iteration (distances are measured after its update,
losses on its batch):
  ppo/tv_to_optimum      ½·Σ_y |π_PPO(y) − π*(y)|
  ppo/kl_to_optimum      KL(π_PPO‖π*) = (J(π*) − J(π_PPO))/β, by (4)
  objective/kl           KL(π_PPO‖π_ref), exact
  objective/scores       E_{π_PPO}[r], exact
  objective/rlhf_reward  J(π_PPO) = E[r] − β·KL(π_PPO‖π_ref), exact
  loss/policy_avg        −mean clipped surrogate (5) over the last epoch's batch
  policy/clipfrac_avg    fraction of samples where the clipped branch of (5) is the active one
  dpo/tv_to_optimum      ½·Σ_y |π_DPO(y) − π*(y)|
  dpo/kl_to_optimum      KL(π_DPO‖π*)
  dpo/kl_to_ref          KL(π_DPO‖π_ref)
  loss/dpo               mean DPO loss (6) over the iteration's pairs
  rewards/chosen         mean implicit reward r̂(y_w);  rewards/rejected: mean r̂(y_l)
  rewards/margins        mean r̂(y_w) − r̂(y_l)
  rewards/accuracies     fraction of pairs with r̂(y_w) > r̂(y_l)
  ppo/lr, dpo/lr         learning rate used at that iteration
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

DTYPE = torch.float64  # the bandit is tiny: double precision keeps the closed-form checks tight


@dataclass
class ConceptsConfig:
    """Settings of notebook 00: the Bradley–Terry toy and the bandit that PPO and DPO solve."""

    stage: ClassVar[str] = "concepts"

    n_arms: int = 6
    """Number of bandit arms ("responses") K."""
    beta: float = 0.5
    """KL coefficient β of objective (2); also DPO's β, so both methods target the same π*."""
    n_iters: int = 500
    """Update iterations of each bandit loop (PPO: one sampled batch each; DPO: one batch of pairs each)."""
    log_every: int = 10
    """Record a metrics row every this many iterations (and at the last one)."""
    ppo_batch_size: int = 256
    """Arms sampled from the current policy per PPO iteration."""
    ppo_epochs: int = 4
    """Clipped-surrogate optimisation epochs over each PPO batch."""
    clip_eps: float = 0.2
    """PPO clip range ε: the ratio π/π_old is clipped to [1−ε, 1+ε] (Schulman et al. 2017)."""
    ppo_lr: float = 0.1
    """Peak Adam learning rate for the PPO logits; decays linearly to `lr_final_frac` of it."""
    dpo_lr: float = 0.1
    """Peak Adam learning rate for the DPO logits; decays linearly to `lr_final_frac` of it."""
    lr_final_frac: float = 0.0
    """Learning rate at the last iteration as a fraction of the peak; decaying averages out sampling noise."""
    dpo_pairs_per_iter: int = 512
    """Fresh preference pairs drawn from π_ref (and labelled by Bradley–Terry) per DPO iteration."""
    bt_items: int = 6
    """Items in the Bradley–Terry toy."""
    bt_pairs: int = 4000
    """Noisy pairwise preferences sampled for the Bradley–Terry fit."""
    bt_newton_steps: int = 25
    """Newton steps of the Bradley–Terry maximum-likelihood fit (it is concave: a few suffice)."""
    seed: int = 0
    """Seed of the bandit, the preference samples and the update loops."""

    def __post_init__(self) -> None:
        checks = [
            (self.n_arms >= 2, f"n_arms must be >= 2 (a choice needs two arms), got {self.n_arms}"),
            (self.beta > 0, f"beta must be > 0 (β = 0 has no KL anchor; try 0.1 .. 2), got {self.beta}"),
            (self.n_iters >= 1, f"n_iters must be >= 1, got {self.n_iters}"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (self.ppo_batch_size >= 2, f"ppo_batch_size must be >= 2 (the baseline is the batch mean), "
                                       f"got {self.ppo_batch_size}"),
            (self.ppo_epochs >= 1, f"ppo_epochs must be >= 1, got {self.ppo_epochs}"),
            (0 < self.clip_eps < 1, f"clip_eps must be in (0, 1); 0.1 .. 0.3 is usual, got {self.clip_eps}"),
            (self.ppo_lr > 0, f"ppo_lr must be > 0, got {self.ppo_lr}"),
            (self.dpo_lr > 0, f"dpo_lr must be > 0, got {self.dpo_lr}"),
            (0 <= self.lr_final_frac <= 1, f"lr_final_frac must be in [0, 1], got {self.lr_final_frac}"),
            (self.dpo_pairs_per_iter >= 1, f"dpo_pairs_per_iter must be >= 1, got {self.dpo_pairs_per_iter}"),
            (self.bt_items >= 2, f"bt_items must be >= 2 (a comparison needs two items), got {self.bt_items}"),
            (self.bt_pairs >= 1, f"bt_pairs must be >= 1, got {self.bt_pairs}"),
            (self.bt_newton_steps >= 1, f"bt_newton_steps must be >= 1, got {self.bt_newton_steps}"),
            (isinstance(self.seed, int) and self.seed >= 0,
             f"seed must be a non-negative int, got {self.seed!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"ConceptsConfig: {message}")


def _generator(seed: int) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


# ----------------------------------------------------------------------------------------------------------
# Distances between distributions over K arms
# ----------------------------------------------------------------------------------------------------------

def kl_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) = Σ_y p(y)·log(p(y)/q(y)) over the last axis, with 0·log 0 = 0."""
    terms = torch.where(p > 0, p * (torch.log(p) - torch.log(q)), torch.zeros_like(p))  # (..., K)
    return terms.sum(-1).clamp_min(0.0)  # KL >= 0; rounding can give -1e-17 when p == q


def total_variation(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Total variation distance ½·Σ_y |p(y) − q(y)| over the last axis, in [0, 1]."""
    return 0.5 * (p - q).abs().sum(-1)


# ----------------------------------------------------------------------------------------------------------
# Bradley–Terry
# ----------------------------------------------------------------------------------------------------------

def bradley_terry_prob(r_a: torch.Tensor, r_b: torch.Tensor) -> torch.Tensor:
    """P(a ≻ b) = σ(r_a − r_b), eq. (1); broadcasts."""
    return torch.sigmoid(r_a - r_b)


def sample_bt_preferences(
    r: torch.Tensor,
    n_pairs: int,
    generator: torch.Generator | None = None,
    item_probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw `n_pairs` pairs of distinct items and label each by a Bradley–Terry coin flip, eq. (1).

    Items of a pair are drawn without replacement from `item_probs` (uniform if None). Returns
    `(chosen, rejected)`, two (N,) index tensors: the preferred item and the other one.
    """
    k = r.shape[0]
    probs = torch.full((k,), 1.0 / k, dtype=r.dtype) if item_probs is None else item_probs
    pairs = torch.multinomial(probs.expand(n_pairs, k), 2, replacement=False, generator=generator)  # (N, 2)
    a, b = pairs[:, 0], pairs[:, 1]  # (N,), (N,)
    a_wins = torch.rand(n_pairs, generator=generator, dtype=r.dtype) < bradley_terry_prob(r[a], r[b])  # (N,)
    return torch.where(a_wins, a, b), torch.where(a_wins, b, a)


def bradley_terry_nll(r: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood −mean log σ(r_chosen − r_rejected) of observed preferences."""
    return -F.logsigmoid(r[chosen] - r[rejected]).mean()


def fit_bradley_terry(
    chosen: torch.Tensor, rejected: torch.Tensor, n_items: int, n_steps: int = 25
) -> tuple[torch.Tensor, dict[str, float]]:
    """Maximum-likelihood rewards from preferences by Newton's method, identified with mean 0.

    The log-likelihood of (1) only sees differences, so its Hessian is singular along the all-ones
    direction; adding 11ᵀ/K there (where the gradient is always 0) fixes the mean at 0 without changing
    the fit. The likelihood is concave, so Newton converges in a few steps unless an item wins (or loses)
    every comparison, in which case its reward diverges: use more pairs.
    """
    dtype = DTYPE
    r = torch.zeros(n_items, dtype=dtype)  # (K,)
    onehot_diff = F.one_hot(chosen, n_items).to(dtype) - F.one_hot(rejected, n_items).to(dtype)  # (N, K)
    ones = torch.ones(n_items, n_items, dtype=dtype) / n_items  # (K, K)
    for _ in range(n_steps):
        p = torch.sigmoid(onehot_diff @ r)  # (N,) probability of the observed outcome
        grad = onehot_diff.T @ (1 - p)  # (K,) gradient of the summed log-likelihood
        hess = (onehot_diff.T * (p * (1 - p))) @ onehot_diff  # (K, K) minus the Hessian: a weighted Laplacian
        step = torch.linalg.solve(hess + ones, grad)
        r = r + step
        if step.abs().max() < 1e-10:
            break
    r = r - r.mean()
    return r, {"bt/nll": bradley_terry_nll(r, chosen, rejected).item(), "bt/grad_norm": grad.norm().item()}


def binned_preference_frequency(
    r: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor, n_bins: int = 10
) -> dict[str, list[float]]:
    """Empirical P(a ≻ b) against r_a − r_b: every pair is seen both ways (a ≻ b, then b ≺ a)."""
    diff = torch.cat([r[chosen] - r[rejected], r[rejected] - r[chosen]])  # (2N,)
    won = torch.cat([torch.ones_like(chosen), torch.zeros_like(chosen)]).to(r.dtype)  # (2N,)
    edges = torch.linspace(diff.min().item(), diff.max().item() + 1e-9, n_bins + 1, dtype=r.dtype)
    idx = torch.bucketize(diff, edges, right=True) - 1  # (2N,) bin of each pair
    centers, freqs, counts = [], [], []
    for i in range(n_bins):
        mask = idx == i
        if mask.any():
            centers.append(diff[mask].mean().item())
            freqs.append(won[mask].mean().item())
            counts.append(int(mask.sum()))
    return {"reward_diff": centers, "frequency": freqs, "count": counts}


# ----------------------------------------------------------------------------------------------------------
# The KL-regularised optimum, PPO's clipped surrogate and DPO's loss
# ----------------------------------------------------------------------------------------------------------

def kl_optimal_policy(pi_ref: torch.Tensor, r: torch.Tensor, beta: float) -> torch.Tensor:
    """π* ∝ π_ref·exp(r/β), eq. (3), computed in log space so tiny β does not overflow."""
    return torch.softmax(torch.log(pi_ref) + r / beta, dim=-1)  # (K,)


def kl_objective(pi: torch.Tensor, pi_ref: torch.Tensor, r: torch.Tensor, beta: float) -> torch.Tensor:
    """J(π) = E_π[r] − β·KL(π‖π_ref), eq. (2), exactly."""
    return (pi * r).sum(-1) - beta * kl_divergence(pi, pi_ref)


def ppo_clip_objective(
    ratio: torch.Tensor, advantage: torch.Tensor, eps: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Elementwise clipped surrogate min(ρ·A, clip(ρ, 1−ε, 1+ε)·A), eq. (5), to be *maximised*.

    Where the clipped branch is the smaller one (ρ > 1+ε with A > 0, ρ < 1−ε with A < 0) the value does
    not depend on ρ, so its gradient is zero: one batch cannot push the policy far from the one that
    sampled it. `policy/clipfrac_avg` is the fraction of such elements.
    """
    unclipped = ratio * advantage  # (B,)
    clipped = torch.clamp(ratio, 1 - eps, 1 + eps) * advantage  # (B,)
    objective = torch.minimum(unclipped, clipped)  # (B,)
    clipfrac = (clipped < unclipped).to(ratio.dtype).mean().item() if ratio.numel() else 0.0
    return objective, {"policy/clipfrac_avg": clipfrac}


def implicit_reward(logp: torch.Tensor, ref_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's implicit reward r̂(y) = β·log(π(y)/π_ref(y)), eq. (6)."""
    return beta * (logp - ref_logp)


def dpo_loss(
    logp_w: torch.Tensor,
    logp_l: torch.Tensor,
    ref_logp_w: torch.Tensor,
    ref_logp_l: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean DPO loss −log σ(r̂(y_w) − r̂(y_l)), eq. (6), over pairs (w = chosen, l = rejected).

    Metrics use TRL's names: `rewards/chosen`, `rewards/rejected`, `rewards/margins`, `rewards/accuracies`.
    """
    chosen = implicit_reward(logp_w, ref_logp_w, beta)  # (N,)
    rejected = implicit_reward(logp_l, ref_logp_l, beta)  # (N,)
    margin = chosen - rejected  # (N,)
    loss = -F.logsigmoid(margin).mean()
    metrics = {
        "loss/dpo": loss.item(),
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/margins": margin.mean().item(),
        "rewards/accuracies": (margin > 0).to(margin.dtype).mean().item(),
    }
    return loss, metrics


def beta_sweep(pi_ref: torch.Tensor, r: torch.Tensor, betas: list[float]) -> dict[str, list]:
    """π*, E_π*[r] and KL(π*‖π_ref) for each β: the reward–KL frontier of eq. (3)."""
    out: dict[str, list] = {"beta": [], "policy": [], "expected_reward": [], "kl": []}
    for beta in betas:
        pi = kl_optimal_policy(pi_ref, r, beta)
        out["beta"].append(float(beta))
        out["policy"].append(pi.tolist())
        out["expected_reward"].append((pi * r).sum().item())
        out["kl"].append(kl_divergence(pi, pi_ref).item())
    return out


# ----------------------------------------------------------------------------------------------------------
# Both methods on the bandit
# ----------------------------------------------------------------------------------------------------------

def make_bandit(cfg: ConceptsConfig, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed bandit: a non-uniform reference policy π_ref (K,) and rewards r (K,) in about [−1, 1].

    The rewards are shuffled independently of π_ref, so the arm π_ref likes best is usually not the best
    arm: the optimum has to move probability, not just sharpen π_ref.
    """
    gen = _generator(cfg.seed if seed is None else seed)
    k = cfg.n_arms
    ref_logits = torch.linspace(1.0, -1.0, k, dtype=DTYPE)  # (K,) from 2.7x to 0.37x the mean: non-uniform
    pi_ref = torch.softmax(ref_logits + 0.3 * torch.randn(k, generator=gen, dtype=DTYPE), -1)  # (K,)
    r = torch.linspace(-1.0, 1.0, k, dtype=DTYPE)[torch.randperm(k, generator=gen)]  # (K,)
    r = r + 0.1 * torch.randn(k, generator=gen, dtype=DTYPE)  # (K,) no exact ties
    return pi_ref, r


def _lr_at(it: int, cfg: ConceptsConfig, peak: float) -> float:
    """Linear decay from `peak` to `peak·lr_final_frac`: stochastic updates then settle on the optimum."""
    frac = it / max(cfg.n_iters - 1, 1)
    return peak * (1 - (1 - cfg.lr_final_frac) * frac)


def _record(history: list[dict], logger: Any, row: dict) -> None:
    history.append(row)
    if logger is not None:
        row = dict(row)
        logger.log(row.pop("step"), **row)


def run_bandit_ppo(
    cfg: ConceptsConfig, pi_ref: torch.Tensor, r: torch.Tensor, logger: Any = None
) -> tuple[torch.Tensor, list[dict]]:
    """PPO on the bandit with the KL penalty in the reward; returns the final policy (K,) and the history.

    Each iteration samples `ppo_batch_size` arms from the current policy π_old, gives each the penalised
    reward r(y) − β·(log π_old(y) − log π_ref(y)), takes advantage = reward − batch mean, and runs
    `ppo_epochs` Adam steps on −mean clipped surrogate (5). In expectation this is the policy gradient of
    objective (2), whose maximiser is π* (3); the linear learning-rate decay averages out sampling noise.
    """
    gen = _generator(cfg.seed + 1)
    log_ref = torch.log(pi_ref)  # (K,)
    pi_star = kl_optimal_policy(pi_ref, r, cfg.beta)  # (K,)
    logits = log_ref.clone().requires_grad_(True)  # (K,) the policy starts at π_ref
    opt = torch.optim.Adam([logits], lr=cfg.ppo_lr)
    history: list[dict] = []
    for it in range(cfg.n_iters):
        lr = _lr_at(it, cfg, cfg.ppo_lr)
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.no_grad():
            logp_old_all = torch.log_softmax(logits, -1)  # (K,)
            pi_old = logp_old_all.exp()  # (K,)
            y = torch.multinomial(pi_old, cfg.ppo_batch_size, replacement=True, generator=gen)  # (B,)
            logp_old = logp_old_all[y]  # (B,)
            reward = r[y] - cfg.beta * (logp_old - log_ref[y])  # (B,) KL-penalised reward
            advantage = reward - reward.mean()  # (B,) batch-mean baseline
        for _ in range(cfg.ppo_epochs):
            ratio = torch.exp(torch.log_softmax(logits, -1)[y] - logp_old)  # (B,)
            objective, clip_metrics = ppo_clip_objective(ratio, advantage, cfg.clip_eps)
            loss = -objective.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        if it % cfg.log_every == 0 or it == cfg.n_iters - 1:
            with torch.no_grad():
                pi = torch.softmax(logits, -1)  # (K,)
                kl_ref = kl_divergence(pi, pi_ref).item()
                score = (pi * r).sum().item()
            _record(history, logger, {
                "step": it,
                "ppo/tv_to_optimum": total_variation(pi, pi_star).item(),
                "ppo/kl_to_optimum": kl_divergence(pi, pi_star).item(),
                "objective/kl": kl_ref,
                "objective/scores": score,
                "objective/rlhf_reward": score - cfg.beta * kl_ref,
                "loss/policy_avg": loss.item(),
                **clip_metrics,
                "ppo/lr": lr,
            })
    return torch.softmax(logits.detach(), -1), history


def run_bandit_dpo(
    cfg: ConceptsConfig, pi_ref: torch.Tensor, r: torch.Tensor, logger: Any = None
) -> tuple[torch.Tensor, list[dict]]:
    """DPO on the bandit; returns the final policy (K,) and the history.

    Each iteration draws `dpo_pairs_per_iter` fresh pairs of distinct arms from π_ref, labels them with
    Bradley–Terry coin flips σ(r_a − r_b) from the true rewards, and takes one Adam step on the DPO loss (6).
    The population loss is minimised pair by pair where r̂(a) − r̂(b) = r_a − r_b, i.e. where
    β·log(π/π_ref) = r + const, i.e. at π* (3) for the same β, whatever the pair distribution.
    """
    gen = _generator(cfg.seed + 2)
    log_ref = torch.log(pi_ref)  # (K,)
    pi_star = kl_optimal_policy(pi_ref, r, cfg.beta)  # (K,)
    logits = log_ref.clone().requires_grad_(True)  # (K,) the policy starts at π_ref
    opt = torch.optim.Adam([logits], lr=cfg.dpo_lr)
    history: list[dict] = []
    for it in range(cfg.n_iters):
        lr = _lr_at(it, cfg, cfg.dpo_lr)
        for group in opt.param_groups:
            group["lr"] = lr
        chosen, rejected = sample_bt_preferences(r, cfg.dpo_pairs_per_iter, gen, pi_ref)  # (N,), (N,)
        logp = torch.log_softmax(logits, -1)  # (K,)
        loss, metrics = dpo_loss(logp[chosen], logp[rejected], log_ref[chosen], log_ref[rejected], cfg.beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it % cfg.log_every == 0 or it == cfg.n_iters - 1:
            with torch.no_grad():
                pi = torch.softmax(logits, -1)  # (K,)
            _record(history, logger, {
                "step": it,
                "dpo/tv_to_optimum": total_variation(pi, pi_star).item(),
                "dpo/kl_to_optimum": kl_divergence(pi, pi_star).item(),
                "dpo/kl_to_ref": kl_divergence(pi, pi_ref).item(),
                **metrics,
                "dpo/lr": lr,
            })
    return torch.softmax(logits.detach(), -1), history


def merge_histories(*histories: list[dict]) -> list[dict]:
    """Join histories row by row on `step` into one row per step (later histories win on shared keys)."""
    merged: dict[int, dict] = {}
    for history in histories:
        for row in history:
            merged.setdefault(row["step"], {}).update(row)
    return [merged[s] for s in sorted(merged)]
