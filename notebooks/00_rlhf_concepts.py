# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 00 · RLHF concepts, exactly, on a bandit
#
# Before any language model, this notebook shows the ideas that the rest of the suite uses, on problems
# small enough to solve in closed form. A "response" is one of $K$ arms, a policy is a softmax over $K$
# logits, and everything runs in a few seconds on a CPU.
#
# **What you will learn**
# 1. How the RLHF pipeline fits together: SFT → reward model → RL (PPO), and DPO as the shortcut.
# 2. The Bradley–Terry model: how noisy pairwise preferences determine a reward (up to a constant).
# 3. The KL-regularised objective and its closed-form optimum $\pi^*(y) \propto \pi_\text{ref}(y)\,e^{r(y)/\beta}$,
#    and what $\beta$ does.
# 4. Why PPO clips the probability ratio, and what the DPO loss is.
# 5. That PPO (with the KL penalty in the reward) and DPO (with Bradley–Terry preference labels) converge to
#    the *same* policy $\pi^*$, and how fast.

# %% tags=["parameters"]
run_dir: str = "runs/dev"  # where this run's artifacts go; this notebook writes run_dir/concepts/
profile: str = "cpu"  # smoke | cpu | gpu: budget for the update loops
seed: int = 0  # global RNG seed (bandit, preference samples, update loops)
beta: float = 0.5  # KL coefficient β of the bandit objective, shared by PPO's penalty and DPO's loss

# %% [markdown]
# ## Setup
# The stage config `ConceptsConfig` holds every setting (its fields are documented in
# `rlhf_helpers/concepts.py`); the profile only changes how many update iterations the loops run.
#
# Shell commands in these notebooks (`.venv/bin/python -m rlhf_helpers...`) are meant for a terminal opened at
# the repository root. A `!` cell runs in `notebooks/`, where the same command needs `../.venv/bin/python`;
# a relative run folder (`runs/NAME`) still means the one under the repository root.

# %%
import time

import torch
import torch.nn.functional as F

from rlhf_helpers import plotting
from rlhf_helpers.concepts import (
    ConceptsConfig, beta_sweep, binned_preference_frequency, dpo_loss, fit_bradley_terry, kl_divergence,
    kl_objective, kl_optimal_policy, make_bandit, merge_histories, ppo_clip_objective, run_bandit_dpo,
    run_bandit_ppo, sample_bt_preferences, total_variation,
)
from rlhf_helpers.config import stage_config
from rlhf_helpers.paths import stage_dir
from rlhf_helpers.seeding import make_generator, seed_everything
from rlhf_helpers.tracking import MetricsLogger, read_json

t0 = time.perf_counter()
cfg = stage_config(ConceptsConfig, profile, seed=seed, beta=beta)
seed_everything(seed)
logger = MetricsLogger(stage_dir(run_dir, "concepts"), resume=False)  # relative run_dir: from the project root
logger.save_config(cfg)
cfg

# %% [markdown]
# ## 1. The pipeline
# RLHF turns a pretrained language model into one that people prefer, in three steps:
#
# 1. **SFT**: fine-tune on demonstrations, so that the model answers in the right format at all. This is the
#    *reference policy* $\pi_\text{ref}$ of the later steps.
# 2. **Reward model**: sample pairs of answers from the SFT model, let people (here: a simulated annotator)
#    say which of the two is better, and fit a reward $r(x, y)$ that explains those choices (section 2).
# 3. **RL**: maximise the reward while staying close to $\pi_\text{ref}$,
#    $\max_\pi \; \mathbb{E}_{y\sim\pi}[r(y)] - \beta\,\mathrm{KL}(\pi\,\|\,\pi_\text{ref})$ (section 3),
#    classically with PPO (section 4).
#
# **DPO** (section 5) notices that the optimum of step 3 has a closed form, and rewrites the reward in terms
# of the policy. That turns steps 2 and 3 into one classification loss on the preference pairs: no explicit
# reward model, no sampling during training, no RL loop.

# %%
plotting.pipeline_diagram().show()

# %% [markdown]
# ## 2. Bradley–Terry: preferences are noisy comparisons of rewards
# The Bradley–Terry model says that item $a$ is preferred to item $b$ with probability
#
# $$P(a \succ b) = \sigma(r_a - r_b) = \frac{1}{1 + e^{-(r_a - r_b)}}.$$
#
# Only differences of rewards appear, so rewards are identified up to an additive constant: we fix their mean
# to 0. Given preferences $(w_i \succ l_i)_{i=1}^N$, the maximum-likelihood rewards minimise the negative
# log-likelihood $-\frac1N\sum_i \log\sigma(r_{w_i} - r_{l_i})$, which is convex, so a few Newton steps find it.
# A reward model for text is exactly this loss with $r$ computed by a network.
#
# Below: $K$ items with known rewards, `cfg.bt_pairs` sampled comparisons, and the fit.

# %%
r_true = torch.linspace(-2.0, 2.0, cfg.bt_items, dtype=torch.float64)  # (K,) mean 0, like the fit
chosen, rejected = sample_bt_preferences(r_true, cfg.bt_pairs, make_generator(cfg.seed))  # (N,), (N,)
r_fit, bt_metrics = fit_bradley_terry(chosen, rejected, cfg.bt_items, cfg.bt_newton_steps)
bt_error = (r_fit - r_true).abs().max().item()
print(f"{cfg.bt_pairs} comparisons; true r = {r_true.numpy().round(2)}; fitted r = {r_fit.numpy().round(2)}")
print(f"max |fitted − true| = {bt_error:.3f}; NLL at the fit {bt_metrics['bt/nll']:.4f}")
binned = binned_preference_frequency(r_true, chosen, rejected)
plotting.bradley_terry_figure(binned, r_true, r_fit).show()

# %% [markdown]
# The empirical frequencies follow the sigmoid, and the fitted rewards lie near the diagonal. The error
# shrinks like $1/\sqrt{N}$; items far apart are compared less informatively (a pair with $r_a - r_b = 4$ is
# almost always won by $a$, which says little about how large the gap is).

# %% [markdown]
# ## 3. The KL-regularised optimum
# RL fine-tuning maximises the reward minus a penalty for drifting from the reference policy:
#
# $$J(\pi) = \mathbb{E}_{y\sim\pi}[r(y)] - \beta\,\mathrm{KL}(\pi\,\|\,\pi_\text{ref}),
# \qquad \mathrm{KL}(\pi\,\|\,\pi_\text{ref}) = \sum_y \pi(y)\log\frac{\pi(y)}{\pi_\text{ref}(y)}.$$
#
# Setting the derivative of $J$ plus a Lagrange multiplier for $\sum_y \pi(y) = 1$ to zero gives
# $r(y) - \beta\log\frac{\pi(y)}{\pi_\text{ref}(y)} = \text{const}$, that is
#
# $$\pi^*(y) = \frac{\pi_\text{ref}(y)\,e^{r(y)/\beta}}{Z}, \qquad Z = \sum_y \pi_\text{ref}(y)\,e^{r(y)/\beta},$$
#
# and, for any policy, $J(\pi^*) - J(\pi) = \beta\,\mathrm{KL}(\pi\,\|\,\pi^*)$: the KL to the optimum *is* the
# suboptimality (divided by $\beta$). As $\beta \to 0$ the penalty vanishes and $\pi^*$ puts all mass on
# $\arg\max_y r(y)$; as $\beta \to \infty$ the penalty dominates and $\pi^* \to \pi_\text{ref}$. In between,
# $\pi^*$ reweights $\pi_\text{ref}$: it never gives mass to a response that $\pi_\text{ref}$ never produces.
#
# Our bandit has a non-uniform $\pi_\text{ref}$ whose favourite arm is usually not the best one.
# Move the slider to change $\beta$.

# %%
pi_ref, r = make_bandit(cfg)  # (K,), (K,)
pi_star = kl_optimal_policy(pi_ref, r, cfg.beta)  # (K,)
print(f"π_ref = {pi_ref.numpy().round(3)}\nr     = {r.numpy().round(3)}\nπ*    = {pi_star.numpy().round(3)}"
      f"  (β = {cfg.beta})")
print(f"β = 1e-3: π* = {kl_optimal_policy(pi_ref, r, 1e-3).numpy().round(3)}  (argmax r is arm {r.argmax()})")
print(f"β = 1e+3: π* = {kl_optimal_policy(pi_ref, r, 1e3).numpy().round(3)}  (≈ π_ref)")
sweep = beta_sweep(pi_ref, r, sorted({*torch.logspace(-1.3, 0.7, 31).tolist(), cfg.beta}))  # β from 0.05 to 5
plotting.kl_optimum_slider(pi_ref, r, sweep, beta_start=cfg.beta).show()

# %% [markdown]
# Each $\beta$ gives one point $(\mathrm{KL}(\pi^*\|\pi_\text{ref}),\ \mathbb{E}_{\pi^*}[r])$. Together they form
# the *reward–KL frontier*: no policy gets more reward for the same KL. Notebook 06 plots the same axes for
# the trained language models (gold reward against KL from the SFT model), where the frontier itself is
# unknown: its points are policies that training reached, which lie on or below it.

# %%
plotting.reward_kl_frontier(sweep, beta_mark=cfg.beta).show()

# %% [markdown]
# ## 4. PPO's clipped surrogate
# Policy-gradient methods increase $\log\pi(y)$ in proportion to the advantage $A$ of the sampled $y$: its
# reward minus a baseline, such as the mean reward of the batch, so that better-than-usual samples are pushed
# up and worse-than-usual ones down.
# PPO reuses each batch for several gradient steps, which is only safe while the policy stays close to the
# policy $\pi_\text{old}$ that sampled the batch. It therefore maximises the clipped surrogate
#
# $$L(\rho) = \min\big(\rho A,\ \mathrm{clip}(\rho, 1-\epsilon, 1+\epsilon)\,A\big),
# \qquad \rho = \frac{\pi(y)}{\pi_\text{old}(y)}.$$
#
# For a good action ($A > 0$) the objective stops growing once $\rho > 1+\epsilon$; for a bad one ($A < 0$)
# once $\rho < 1-\epsilon$. There the objective is flat, so its gradient is zero and that sample stops
# pushing. On the other side the unclipped term is the minimum, so a mistake is always corrected.

# %%
rho = torch.linspace(0.0, 2.0, 401, dtype=torch.float64)  # (R,)
obj_pos, _ = ppo_clip_objective(rho, torch.ones_like(rho), cfg.clip_eps)  # (R,) A = +1
obj_neg, _ = ppo_clip_objective(rho, -torch.ones_like(rho), cfg.clip_eps)  # (R,) A = −1
plotting.ppo_clip_figure(rho, obj_pos, obj_neg, cfg.clip_eps).show()

# %% [markdown]
# The gradient with respect to $\rho$, by autograd, at a few ratios (zero in the flat regions):

# %%
probe = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64, requires_grad=True)  # (3,)
for a in (1.0, -1.0):
    objective, _ = ppo_clip_objective(probe, torch.full_like(probe, a), cfg.clip_eps)  # (3,)
    (grad,) = torch.autograd.grad(objective.sum(), probe)
    print(f"A = {a:+.0f}: dL/dρ at ρ = {probe.tolist()} is {grad.tolist()}")

# %% [markdown]
# ## 5. The DPO loss
# Solve the optimum of section 3 for the reward: $r(y) = \beta\log\frac{\pi^*(y)}{\pi_\text{ref}(y)} + \beta\log Z$.
# DPO therefore treats any policy $\pi$ as defining an *implicit reward*
# $\hat r(y) = \beta\log\frac{\pi(y)}{\pi_\text{ref}(y)}$ and plugs it into the Bradley–Terry likelihood;
# $\log Z$ cancels in the difference:
#
# $$\mathcal{L}_\text{DPO} = -\log\sigma\Big(\beta\Big[\log\frac{\pi(y_w)}{\pi_\text{ref}(y_w)}
# - \log\frac{\pi(y_l)}{\pi_\text{ref}(y_l)}\Big]\Big) = -\log\sigma\big(\hat r(y_w) - \hat r(y_l)\big).$$
#
# It is a logistic loss on the implicit reward margin. Its gradient weight $\sigma(-\text{margin})$ is large
# when the policy ranks the pair wrongly and fades once it ranks it right with a margin.

# %%
margin = torch.linspace(-6.0, 6.0, 241, dtype=torch.float64)  # (M,)
plotting.dpo_loss_figure(margin, -F.logsigmoid(margin), torch.sigmoid(-margin)).show()
# two pairs, as log-probabilities of (chosen, rejected) under π and π_ref:
loss, metrics = dpo_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.5]),
                         torch.tensor([-1.5, -1.8]), torch.tensor([-1.5, -1.8]), beta=cfg.beta)
print(f"DPO loss {loss.item():.4f}; " + ", ".join(f"{k} = {v:.3f}" for k, v in metrics.items()))

# %% [markdown]
# ## 6. PPO and DPO on the bandit reach the same $\pi^*$
# Both methods start from $\pi = \pi_\text{ref}$ (logits $= \log\pi_\text{ref}$) and update the $K$ logits.
#
# **PPO.** Each iteration samples `cfg.ppo_batch_size` arms from the current policy, gives each the
# KL-penalised reward $r(y) - \beta\,(\log\pi_\text{old}(y) - \log\pi_\text{ref}(y))$, subtracts the batch mean
# as a baseline, and takes `cfg.ppo_epochs` Adam steps on the clipped surrogate. In expectation this is the
# gradient of $J(\pi)$, so its fixed point is $\pi^*$. A pleasant fact makes the sampled version converge
# exactly: at $\pi^*$ the penalised reward equals $\beta\log Z$ for *every* arm, so all advantages are zero
# and the sampling noise vanishes at the optimum. (With a language model $\log Z$ depends on the prompt, and
# token by token on the prefix, so the baseline has to be learned, by a value function in PPO, and its errors
# do not vanish at $\pi^*$; practical PPO also whitens the advantages, which rescales whatever is left to unit
# variance.)
#
# **How close.** Two distances to $\pi^*$ are tracked: the total variation
# $\mathrm{TV}(\pi, \pi^*) = \tfrac12\sum_y |\pi(y) - \pi^*(y)|$, the largest difference in probability the two
# policies give any set of arms, and $\mathrm{KL}(\pi\,\|\,\pi^*)$, which section 3 showed is the
# suboptimality divided by $\beta$.
#
# **DPO.** Each iteration draws `cfg.dpo_pairs_per_iter` fresh pairs of distinct arms from $\pi_\text{ref}$,
# labels each with a Bradley–Terry coin flip $P(a \succ b) = \sigma(r_a - r_b)$ from the true rewards, and takes
# an Adam step on the DPO loss with the same $\beta$. Why that gives the same $\pi^*$: for a pair $(a, b)$ the
# expected loss is a cross-entropy between the label probability $\sigma(r_a - r_b)$ and the model's
# $\sigma(\hat r(a) - \hat r(b))$, minimised when $\hat r(a) - \hat r(b) = r_a - r_b$. If that holds for all
# pairs, $\beta\log\frac{\pi(y)}{\pi_\text{ref}(y)} = r(y) + c$, i.e. $\pi = \pi_\text{ref}\,e^{r/\beta}/Z = \pi^*$,
# whatever the distribution of the pairs (as long as every arm can be compared). This needs the labels'
# Bradley–Terry temperature to be 1: labels drawn from $\sigma((r_a - r_b)/T)$ would lead to the optimum for
# $\beta T$ instead. The label coin flips stay noisy at the optimum, so DPO keeps jittering around $\pi^*$;
# both loops decay the learning rate linearly to `cfg.lr_final_frac` of its peak to average that out.

# %%
pi_ppo, ppo_history = run_bandit_ppo(cfg, pi_ref, r)  # (K,), rows every cfg.log_every iterations
pi_dpo, dpo_history = run_bandit_dpo(cfg, pi_ref, r)  # (K,)
logger.log_many(merge_histories(ppo_history, dpo_history))
for name, pi in [("PPO", pi_ppo), ("DPO", pi_dpo)]:
    print(f"{name}: TV to π* = {total_variation(pi, pi_star):.4f}, KL(π‖π*) = {kl_divergence(pi, pi_star):.2e}, "
          f"J(π) = {kl_objective(pi, pi_ref, r, cfg.beta):.4f}")
print(f"optimum: J(π*) = {kl_objective(pi_star, pi_ref, r, cfg.beta):.4f}")

# %%
plotting.bandit_convergence(logger.rows, {
    "ppo/tv_to_optimum": "PPO: TV(π, π*)", "dpo/tv_to_optimum": "DPO: TV(π, π*)",
    "ppo/kl_to_optimum": "PPO: KL(π‖π*)", "dpo/kl_to_optimum": "DPO: KL(π‖π*)",
}).show()
plotting.policy_bars({"π_ref": pi_ref, "π*": pi_star, "π_PPO": pi_ppo, "π_DPO": pi_dpo}).show()

# %% [markdown]
# PPO's total variation to $\pi^*$ is 0.065 at iteration 10 and below 0.005 at iteration 30 (seed 0, cpu
# profile; the rows of `metrics.jsonl`). In the very first iteration most samples end up in the clipped
# regions (the first row of `policy/clipfrac_avg`): the clip is what limits that first large step. By the
# tenth iteration the policy is close enough that none do. DPO moves more slowly and never quite settles: from
# about iteration 70 its TV jitters between about 0.004 and 0.02 (0.011 at the last iteration here), because
# every iteration draws fresh pairs with noisy labels and each pushes the policy a little; the decaying learning
# rate makes the pushes smaller, not the policy any nearer. On the frontier, both final policies land on the
# point of $\pi^*$ for this $\beta$:

# %%
final_points = {name: (kl_divergence(pi, pi_ref).item(), (pi * r).sum().item())
                for name, pi in [("π_PPO", pi_ppo), ("π_DPO", pi_dpo)]}
plotting.reward_kl_frontier(sweep, beta_mark=cfg.beta, points=final_points).show()

# %% [markdown]
# ## 7. Outputs
# `run_dir/concepts/` now holds `config.json`, `metrics.jsonl` (one row per logged iteration with both
# methods' metrics; the keys are documented at the top of `rlhf_helpers/concepts.py`) and `summary.json`.

# %%
summary = {
    "profile": profile, "seed": seed, "beta": cfg.beta, "n_iters": cfg.n_iters,
    "bt_fit_max_abs_error": bt_error,
    "ppo_tv_to_optimum": total_variation(pi_ppo, pi_star), "ppo_kl_to_optimum": kl_divergence(pi_ppo, pi_star),
    "dpo_tv_to_optimum": total_variation(pi_dpo, pi_star), "dpo_kl_to_optimum": kl_divergence(pi_dpo, pi_star),
    "pi_ref": pi_ref, "pi_star": pi_star, "pi_ppo": pi_ppo, "pi_dpo": pi_dpo,  # (K,) each
    "wall_time_s": time.perf_counter() - t0,
}
path = logger.summary(summary)
{k: v for k, v in read_json(path).items() if not k.startswith("pi_")}

# %% [markdown]
# ## Summary
# - Preferences sampled from Bradley–Terry pin down rewards up to a constant; maximum likelihood recovers them.
# - The KL-regularised objective has the closed-form optimum $\pi^* \propto \pi_\text{ref}\,e^{r/\beta}$;
#   $\beta$ moves it along the reward–KL frontier from $\pi_\text{ref}$ to the argmax.
# - PPO's clip makes the surrogate flat (zero gradient) once the ratio leaves $[1-\epsilon, 1+\epsilon]$ in the
#   direction the advantage favours.
# - DPO's loss is Bradley–Terry on the implicit reward $\beta\log(\pi/\pi_\text{ref})$; with the same $\beta$ and
#   Bradley–Terry labels it targets the same $\pi^*$ as PPO with a KL penalty, and on the bandit both get there.
#
# **Try next** (the iteration counts below were measured with seed 0, the cpu profile and `log_every=1` passed to
# `stage_config`, which logs every iteration where the profile logs every tenth): rerun with a small $\beta$
# (`.venv/bin/python -m rlhf_helpers.run --only 00 --param beta=0.1 --run-dir runs/beta01`, a run folder of its own so
# that `make run`'s `runs/cpu` keeps its results; or papermill's `-p beta 0.1`): $\pi^*$ is sharper, and DPO's
# implicit reward needs log-ratios five times as large, so it takes longer (DPO's TV to $\pi^*$ first falls below 0.01 at
# iteration 206 instead of 167); in the setup cell, pass `ppo_epochs=1` to `stage_config`: the ratio never leaves 1,
# nothing is clipped, and PPO (now plain policy gradient, one Adam step per batch instead of four) needs three to four
# times as many iterations (TV to $\pi^*$ first falls below 0.01 at iteration 52 instead of 18, below 0.001 at 144
# instead of 33): reusing each batch is what saves samples; `ppo_batch_size=8` still converges, more slowly (the advantages
# vanish at $\pi^*$; TV first below 0.01 at iteration 58); `dpo_pairs_per_iter=8` keeps DPO further from $\pi^*$ along the
# way (TV 0.087 instead of 0.022 at iteration 100).
#
# **Next notebook:** `01_reward_design.ipynb` builds the reward functions that play the role of $r$ for text.
