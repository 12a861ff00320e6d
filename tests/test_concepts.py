"""Tests of notebook 00's helpers, against hand computations, slow loops and closed forms."""
from __future__ import annotations

import math
import random
import re

import pytest
import torch

from rlhf_helpers.concepts import (
    ConceptsConfig,
    beta_sweep,
    binned_preference_frequency,
    bradley_terry_nll,
    bradley_terry_prob,
    dpo_loss,
    fit_bradley_terry,
    implicit_reward,
    kl_divergence,
    kl_objective,
    kl_optimal_policy,
    make_bandit,
    merge_histories,
    ppo_clip_objective,
    run_bandit_dpo,
    run_bandit_ppo,
    sample_bt_preferences,
    total_variation,
)
from rlhf_helpers.config import stage_config

D = torch.float64


def gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def slow_objective(pi: list[float], pi_ref: list[float], r: list[float], beta: float) -> float:
    """J(π) = Σ π r − β Σ π log(π/π_ref), one arm at a time."""
    total = 0.0
    for p, q, reward in zip(pi, pi_ref, r):
        total += p * reward
        if p > 0:
            total -= beta * p * math.log(p / q)
    return total


# ----------------------------------------------------------------------------------------------------------
# Distances
# ----------------------------------------------------------------------------------------------------------

def test_kl_and_tv_match_loops():
    p = [0.5, 0.25, 0.25, 0.0]
    q = [0.1, 0.2, 0.3, 0.4]
    kl = sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)
    tv = 0.5 * sum(abs(a - b) for a, b in zip(p, q))
    p_t, q_t = torch.tensor(p, dtype=D), torch.tensor(q, dtype=D)
    assert kl_divergence(p_t, q_t).item() == pytest.approx(kl, abs=1e-12)
    assert total_variation(p_t, q_t).item() == pytest.approx(tv)
    same = torch.tensor(q, dtype=D)
    assert kl_divergence(same, same).item() == 0.0
    assert total_variation(same, same).item() == 0.0


# ----------------------------------------------------------------------------------------------------------
# The KL-regularised optimum
# ----------------------------------------------------------------------------------------------------------

def test_kl_optimal_policy_by_hand_on_three_arms():
    pi_ref, r, beta = [0.5, 0.3, 0.2], [1.0, 0.0, 2.0], 0.5
    weights = [0.5 * math.exp(2.0), 0.3 * math.exp(0.0), 0.2 * math.exp(4.0)]  # π_ref·exp(r/β)
    expected = [w / sum(weights) for w in weights]
    got = kl_optimal_policy(torch.tensor(pi_ref, dtype=D), torch.tensor(r, dtype=D), beta)
    assert got.tolist() == pytest.approx(expected, abs=1e-12)


def test_kl_optimal_policy_limits():
    pi_ref = torch.tensor([0.6, 0.3, 0.1], dtype=D)
    r = torch.tensor([0.0, 0.5, 0.4], dtype=D)
    assert kl_optimal_policy(pi_ref, r, 1e-4).tolist() == pytest.approx([0.0, 1.0, 0.0], abs=1e-9)
    assert kl_optimal_policy(pi_ref, r, 1e4).tolist() == pytest.approx(pi_ref.tolist(), abs=1e-4)


def test_kl_optimum_beats_perturbed_policies():
    pi_ref = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04], dtype=D)
    r = torch.tensor([-0.5, 0.3, 1.0, -1.0, 0.8, 0.1], dtype=D)
    beta = 0.7
    pi_star = kl_optimal_policy(pi_ref, r, beta)
    best = slow_objective(pi_star.tolist(), pi_ref.tolist(), r.tolist(), beta)
    g = gen(0)
    for scale in (1e-3, 0.1, 1.0, 3.0):
        for _ in range(50):
            pi = torch.softmax(torch.log(pi_star) + scale * torch.randn(6, generator=g, dtype=D), -1)
            j = slow_objective(pi.tolist(), pi_ref.tolist(), r.tolist(), beta)
            assert j < best
            # the suboptimality is exactly β·KL(π‖π*)
            assert best - j == pytest.approx(beta * kl_divergence(pi, pi_star).item(), rel=1e-6, abs=1e-12)
            assert kl_objective(pi, pi_ref, r, beta).item() == pytest.approx(j, abs=1e-12)


def test_beta_sweep_trades_reward_for_kl():
    pi_ref, r = torch.tensor([0.5, 0.3, 0.2], dtype=D), torch.tensor([0.0, 1.0, 0.5], dtype=D)
    sweep = beta_sweep(pi_ref, r, [0.05, 0.5, 5.0])
    assert sweep["expected_reward"] == sorted(sweep["expected_reward"], reverse=True)
    assert sweep["kl"] == sorted(sweep["kl"], reverse=True)
    assert sweep["expected_reward"][0] == pytest.approx(1.0, abs=1e-3)  # near the argmax at small β


# ----------------------------------------------------------------------------------------------------------
# PPO's clipped surrogate
# ----------------------------------------------------------------------------------------------------------

def test_ppo_clip_objective_matches_slow_loop():
    g = gen(1)
    ratio = torch.exp(0.5 * torch.randn(200, generator=g, dtype=D))
    advantage = torch.randn(200, generator=g, dtype=D)
    eps = 0.2
    got, metrics = ppo_clip_objective(ratio, advantage, eps)
    n_clipped = 0
    for i in range(200):
        rho, a = ratio[i].item(), advantage[i].item()
        unclipped, clipped = rho * a, min(max(rho, 1 - eps), 1 + eps) * a
        assert got[i].item() == pytest.approx(min(unclipped, clipped), abs=1e-12)
        n_clipped += clipped < unclipped
    assert metrics["policy/clipfrac_avg"] == pytest.approx(n_clipped / 200)


def test_ppo_clip_gradient_vanishes_in_clipped_regions():
    eps = 0.2
    ratio = torch.tensor([0.5, 0.9, 1.1, 1.5, 0.5, 0.9, 1.1, 1.5], dtype=D, requires_grad=True)
    advantage = torch.tensor([2.0, 2.0, 2.0, 2.0, -2.0, -2.0, -2.0, -2.0], dtype=D)
    objective, metrics = ppo_clip_objective(ratio, advantage, eps)
    (grad,) = torch.autograd.grad(objective.sum(), ratio)
    # A > 0: flat above 1 + ε; A < 0: flat below 1 − ε; elsewhere dL/dρ = A
    assert grad.tolist() == [2.0, 2.0, 2.0, 0.0, 0.0, -2.0, -2.0, -2.0]
    assert metrics["policy/clipfrac_avg"] == pytest.approx(2 / 8)


# ----------------------------------------------------------------------------------------------------------
# DPO
# ----------------------------------------------------------------------------------------------------------

def test_dpo_loss_by_hand_on_two_pairs():
    beta = 0.1
    logp_w, logp_l = [-1.0, -3.0], [-2.0, -1.0]
    ref_w, ref_l = [-1.5, -2.0], [-1.5, -2.5]
    expected_losses, chosen, rejected = [], [], []
    for i in range(2):
        rw, rl = beta * (logp_w[i] - ref_w[i]), beta * (logp_l[i] - ref_l[i])
        chosen.append(rw)
        rejected.append(rl)
        expected_losses.append(-math.log(1 / (1 + math.exp(-(rw - rl)))))
    loss, metrics = dpo_loss(*(torch.tensor(x, dtype=D) for x in (logp_w, logp_l, ref_w, ref_l)), beta=beta)
    assert loss.item() == pytest.approx(sum(expected_losses) / 2, abs=1e-12)
    assert metrics["loss/dpo"] == pytest.approx(loss.item())
    assert metrics["rewards/chosen"] == pytest.approx(sum(chosen) / 2)
    assert metrics["rewards/rejected"] == pytest.approx(sum(rejected) / 2)
    assert metrics["rewards/margins"] == pytest.approx((sum(chosen) - sum(rejected)) / 2)
    assert metrics["rewards/accuracies"] == 0.5  # pair 0 is ranked right (0.1 > −0.05), pair 1 wrong
    assert implicit_reward(torch.tensor(-1.0), torch.tensor(-1.5), 0.1).item() == pytest.approx(0.05)


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    logp_w = torch.tensor([-1.0, -3.0], dtype=D, requires_grad=True)
    logp_l = torch.tensor([-2.0, -1.0], dtype=D, requires_grad=True)
    ref = torch.tensor([-1.5, -2.0], dtype=D)
    loss, _ = dpo_loss(logp_w, logp_l, ref, ref, beta=0.5)
    loss.backward()
    assert (logp_w.grad < 0).all()  # gradient descent raises log π(y_w)
    assert (logp_l.grad > 0).all()  # and lowers log π(y_l)


# ----------------------------------------------------------------------------------------------------------
# Bradley–Terry
# ----------------------------------------------------------------------------------------------------------

def test_bt_samples_follow_the_sigmoid():
    r = torch.tensor([1.0, 0.0], dtype=D)
    chosen, rejected = sample_bt_preferences(r, 20_000, gen(0))
    assert ((chosen == 0) == (rejected == 1)).all()  # two distinct items per pair
    assert (chosen == 0).double().mean().item() == pytest.approx(1 / (1 + math.exp(-1.0)), abs=0.01)
    assert bradley_terry_prob(r[0], r[1]).item() == pytest.approx(1 / (1 + math.exp(-1.0)))


def test_bt_nll_matches_loop():
    r = torch.tensor([0.3, -0.2, 1.0], dtype=D)
    chosen, rejected = torch.tensor([0, 2, 1]), torch.tensor([1, 0, 2])
    slow = -sum(math.log(1 / (1 + math.exp(-(r[c] - r[l]).item()))) for c, l in zip(chosen, rejected)) / 3
    assert bradley_terry_nll(r, chosen, rejected).item() == pytest.approx(slow, abs=1e-12)


def test_fit_bradley_terry_recovers_rewards():
    r_true = torch.tensor([-1.5, -0.5, 0.0, 0.3, 0.7, 1.0], dtype=D)
    r_true = r_true - r_true.mean()
    chosen, rejected = sample_bt_preferences(r_true, 30_000, gen(3))
    r_fit, metrics = fit_bradley_terry(chosen, rejected, 6)
    assert r_fit.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert (r_fit - r_true).abs().max().item() < 0.1
    # it is the maximum of the likelihood: zero gradient (by autograd, not Newton's own formula) ...
    r = r_fit.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(bradley_terry_nll(r, chosen, rejected), r)
    assert grad.abs().max().item() < 1e-9
    # ... and a lower NLL than the truth, or the truth plus noise
    nll_fit = bradley_terry_nll(r_fit, chosen, rejected).item()
    assert metrics["bt/nll"] == pytest.approx(nll_fit)
    assert nll_fit <= bradley_terry_nll(r_true, chosen, rejected).item()
    g = gen(4)
    for _ in range(20):
        noisy = r_true + 0.2 * torch.randn(6, generator=g, dtype=D)
        assert nll_fit < bradley_terry_nll(noisy, chosen, rejected).item()


def test_binned_frequencies_count_every_pair_twice():
    r = torch.linspace(-1, 1, 4, dtype=D)
    chosen, rejected = sample_bt_preferences(r, 500, gen(0))
    binned = binned_preference_frequency(r, chosen, rejected, n_bins=6)
    assert sum(binned["count"]) == 1000
    assert all(0 <= f <= 1 for f in binned["frequency"])


# ----------------------------------------------------------------------------------------------------------
# The bandit loops
# ----------------------------------------------------------------------------------------------------------

def test_make_bandit_is_seeded_and_not_uniform():
    cfg = ConceptsConfig()
    pi_ref, r = make_bandit(cfg, seed=0)
    assert pi_ref.shape == r.shape == (cfg.n_arms,)
    assert pi_ref.sum().item() == pytest.approx(1.0)
    assert pi_ref.max().item() > 2 * pi_ref.min().item()
    again = make_bandit(cfg, seed=0)
    assert torch.equal(pi_ref, again[0]) and torch.equal(r, again[1])
    assert not torch.equal(r, make_bandit(cfg, seed=1)[1])


@pytest.mark.parametrize("seed", [0, 1])
def test_bandit_ppo_and_dpo_reach_the_optimum_with_smoke_profile(seed):
    cfg = stage_config(ConceptsConfig, "smoke", seed=seed)
    pi_ref, r = make_bandit(cfg)
    pi_star = kl_optimal_policy(pi_ref, r, cfg.beta)
    start = total_variation(pi_ref, pi_star).item()
    for run in (run_bandit_ppo, run_bandit_dpo):
        pi, history = run(cfg, pi_ref, r)
        tv = total_variation(pi, pi_star).item()
        assert tv < 0.1, f"{run.__name__}: TV to π* {tv:.3f}, started at {start:.3f}"
        assert tv < start / 3
        assert history[-1]["step"] == cfg.n_iters - 1
        method = "ppo" if run is run_bandit_ppo else "dpo"
        assert history[-1][f"{method}/tv_to_optimum"] == pytest.approx(tv)


def test_bandit_runs_are_deterministic_and_log_rows():
    class ListLogger:
        def __init__(self):
            self.rows = []

        def log(self, step, **metrics):
            self.rows.append({"step": step, **metrics})

    cfg = stage_config(ConceptsConfig, "smoke", seed=2, n_iters=30)
    pi_ref, r = make_bandit(cfg)
    for run in (run_bandit_ppo, run_bandit_dpo):
        logger = ListLogger()
        random.seed(123)
        torch.manual_seed(123)  # the loops use their own generators, not the global RNG
        pi_a, hist_a = run(cfg, pi_ref, r, logger=logger)
        torch.manual_seed(456)
        pi_b, hist_b = run(cfg, pi_ref, r)
        assert torch.equal(pi_a, pi_b)
        assert hist_a == hist_b == logger.rows
        assert [row["step"] for row in hist_a] == [0, 10, 20, 29]
        pi_c, _ = run(stage_config(ConceptsConfig, "smoke", seed=3, n_iters=30), pi_ref, r)
        assert not torch.equal(pi_a, pi_c)


def test_merge_histories_joins_on_step():
    ppo = [{"step": 0, "a": 1}, {"step": 10, "a": 2}]
    merged = merge_histories(ppo, [{"step": 0, "b": 3}, {"step": 5, "b": 4}])
    assert merged == [{"step": 0, "a": 1, "b": 3}, {"step": 5, "b": 4}, {"step": 10, "a": 2}]


# ----------------------------------------------------------------------------------------------------------
# The config
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, words", [
    ("beta", 0.0, "beta must be > 0"),
    ("beta", -1.0, "beta must be > 0"),
    ("n_arms", 1, "n_arms must be >= 2"),
    ("clip_eps", 1.5, "clip_eps must be in (0, 1)"),
    ("n_iters", 0, "n_iters must be >= 1"),
    ("ppo_batch_size", 1, "ppo_batch_size must be >= 2"),
    ("lr_final_frac", 2.0, "lr_final_frac must be in [0, 1]"),
    ("bt_items", 1, "bt_items must be >= 2"),
    ("seed", -1, "seed must be a non-negative int"),
])
def test_config_validation_says_what_to_change(field, value, words):
    with pytest.raises(ValueError, match=re.escape(f"ConceptsConfig: {words}")):
        ConceptsConfig(**{field: value})


def test_profiles_build_concepts_configs():
    assert stage_config(ConceptsConfig, "smoke").n_iters < stage_config(ConceptsConfig, "cpu").n_iters
    assert stage_config(ConceptsConfig, "gpu", seed=3).seed == 3
    with pytest.raises(ValueError, match="valid fields"):
        stage_config(ConceptsConfig, "cpu", n_arm=3)


# ----------------------------------------------------------------------------------------------------------
# Figures (they build, and the slider has one frame per β)
# ----------------------------------------------------------------------------------------------------------

def test_figures_build():
    import plotly.graph_objects as go

    from rlhf_helpers import plotting

    pi_ref, r = make_bandit(ConceptsConfig(), seed=0)
    sweep = beta_sweep(pi_ref, r, [0.1, 0.5, 2.0])
    slider = plotting.kl_optimum_slider(pi_ref, r, sweep, beta_start=0.5)
    assert len(slider.frames) == 3 and slider.layout.sliders[0].active == 1
    chosen, rejected = sample_bt_preferences(r, 100, gen(0))
    rho = torch.linspace(0, 2, 11, dtype=D)
    rows = [{"step": 0, "ppo/tv_to_optimum": 0.5, "dpo/tv_to_optimum": 0.4},
            {"step": 1, "ppo/tv_to_optimum": 0.0}]
    figures = [
        slider,
        plotting.pipeline_diagram(),
        plotting.bradley_terry_figure(binned_preference_frequency(r, chosen, rejected), r, r),
        plotting.reward_kl_frontier(sweep, beta_mark=0.5, points={"π_PPO": (0.1, 0.2)}),
        plotting.ppo_clip_figure(rho, rho, -rho, 0.2),
        plotting.dpo_loss_figure(rho, rho, rho),
        plotting.bandit_convergence(rows, {"ppo/tv_to_optimum": "PPO", "dpo/tv_to_optimum": "DPO"}),
        plotting.policy_bars({"π_ref": pi_ref, "π*": pi_ref}),
    ]
    assert all(isinstance(f, go.Figure) for f in figures)
