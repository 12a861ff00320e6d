"""Evaluation estimators (bootstrap, Monte-Carlo KL, distinct-n, win rates, the parting point), the report
and the results check, on hand-made numbers and a fake run folder (no model needed)."""
import json
import math
import re
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from plotly.offline import get_plotlyjs

from rlhf_helpers import check_results
from rlhf_helpers.comparison import comparison_table, format_comparison
from rlhf_helpers.evaluate import (best_of_n, bootstrap_ci, compare_policies, format_results, frontier_points,
                                   gold_proxy_over_training, line_gains, mc_kl, paired_win_rate, parting_outcome, parting_point,
                                   per_prompt_means, ppo_reading, refusal_split, results_table, training_series,
                                   widest_disagreements,
                                   win_outcomes, win_rate)
from rlhf_helpers.gold import GoldJudge
from rlhf_helpers.report import build_report, network_references, read_eval_summary
from rlhf_helpers.text_stats import distinct_n, distinct_stats, words

ROOT = Path(__file__).resolve().parent.parent


# --- bootstrap and win rates -------------------------------------------------------------------------

def test_bootstrap_of_constant_values_is_a_zero_width_interval_at_the_value():
    assert bootstrap_ci([0.37] * 25) == pytest.approx((0.37, 0.37))


def test_bootstrap_of_a_bernoulli_mean_matches_the_normal_interval():
    values = np.array([1.0] * 120 + [0.0] * 280)  # mean 0.3, n = 400
    low, high = bootstrap_ci(values, n_boot=4000, seed=1)
    half = 1.96 * math.sqrt(0.3 * 0.7 / 400)  # 0.0449
    assert low == pytest.approx(0.3 - half, abs=0.01) and high == pytest.approx(0.3 + half, abs=0.01)


def test_bootstrap_of_nothing_is_nan():
    assert all(math.isnan(v) for v in bootstrap_ci([]))


def test_win_outcomes_count_ties_half():
    out = win_outcomes([0.9, 0.5, 0.2, 0.7], [0.5, 0.5, 0.7, 0.1])
    assert out.tolist() == [1.0, 0.5, 0.0, 1.0]
    wr = win_rate([0.9, 0.5, 0.2, 0.7], [0.5, 0.5, 0.7, 0.1], n_boot=500)
    assert wr["win_rate"] == pytest.approx(2.5 / 4)
    assert (wr["wins"], wr["ties"], wr["losses"], wr["n"]) == (2, 1, 1, 4)
    assert wr["ci_low"] <= wr["win_rate"] <= wr["ci_high"]
    assert wr["gain"] == pytest.approx((0.4 + 0.0 - 0.5 + 0.6) / 4)
    assert wr["gain_ci_low"] <= wr["gain"] <= wr["gain_ci_high"]
    with pytest.raises(ValueError, match="paired"):
        win_outcomes([1.0, 2.0], [1.0])


def test_gain_interval_excludes_zero_for_a_steady_small_gain_the_win_rate_cannot_separate():
    rng = np.random.default_rng(0)
    b = rng.uniform(0.5, 0.8, size=24)
    a = b + 0.05 + rng.normal(0, 0.05, size=24)  # better on average, worse on some prompts
    wr = win_rate(a, b, n_boot=2000)
    assert wr["gain_ci_low"] > 0 and wr["gain"] == pytest.approx(float(np.mean(a - b)))
    # with ties on most prompts (as gold's capped scores give), the count of wins cannot tell what the gains can
    a = b.copy()
    a[:6] += 0.05  # 6 won by a little, 16 tied, 2 lost by less
    a[6:8] -= 0.01
    wr = win_rate(a, b, n_boot=2000)
    assert (wr["wins"], wr["ties"], wr["losses"]) == (6, 16, 2) and wr["win_rate"] == pytest.approx(14 / 24)
    assert wr["ci_low"] < 0.5 < wr["ci_high"]  # the win rate: not told apart from a coin flip
    assert wr["gain_ci_low"] > 0  # the gain: told apart from zero


# --- Monte-Carlo KL --------------------------------------------------------------------------------------

def test_mc_kl_on_hand_made_tensors_sums_the_masked_log_ratios():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
    ref = torch.tensor([[-2.0, -2.0, -1.0], [-1.0, 0.0, -9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    kl, m = mc_kl(logp, ref, mask)
    assert kl.tolist() == pytest.approx([1.0, 0.5])
    assert m["kl_mean"] == pytest.approx(0.75) and m["kl_sem"] == pytest.approx(0.25) and m["n"] == 2
    with pytest.raises(ValueError, match="one shape"):
        mc_kl(logp, ref[:, :2], mask)


def test_mc_kl_estimates_the_closed_form_kl_of_two_categoricals():
    p = torch.tensor([0.5, 0.25, 0.15, 0.1], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    exact = float((p * (p / q).log()).sum())  # KL(p‖q) per token, 0.1722 nats
    g = torch.Generator().manual_seed(0)
    n, t = 20000, 3
    tokens = torch.multinomial(p, n * t, replacement=True, generator=g).view(n, t)  # (N, T) sampled from p
    lengths = torch.randint(1, t + 1, (n,), generator=g)  # responses of 1 to 3 tokens, independent of the tokens
    mask = torch.arange(t)[None, :] < lengths[:, None]  # (N, T)
    kl, m = mc_kl(p.log()[tokens], q.log()[tokens], mask)
    expected = exact * float(lengths.double().mean())  # E[Σ_t] = E[length] · KL(p‖q)
    assert abs(m["kl_mean"] - expected) < 4 * m["kl_sem"], (m, expected)
    assert abs(m["kl_mean"] - expected) < 0.02
    assert (kl < 0).any()  # single samples can be negative; only the mean estimates a KL


# --- distinct-n --------------------------------------------------------------------------------------------

def test_distinct_n_on_hand_made_text():
    assert words("The cat, the CAT!") == ["the", "cat", "the", "cat"]
    assert distinct_n(words("the cat the cat"), 1) == pytest.approx(2 / 4)
    assert distinct_n(words("the cat the cat"), 2) == pytest.approx(2 / 3)  # (the cat) (cat the) (the cat)
    s = distinct_stats(["the cat the cat", "a dog"])  # pooled: 6 unigrams, 4 distinct; 4 bigrams, 3 distinct
    assert s["distinct_1"] == pytest.approx(4 / 6) and s["distinct_2"] == pytest.approx(3 / 4)
    assert s["mean_words"] == pytest.approx(3.0)
    assert distinct_stats(["one two three"])["distinct_2"] == 1.0


# --- the parting point of gold and proxy ---------------------------------------------------------------

def _peaked(n=20, peak=9):
    steps = list(range(1, n + 1))
    gold = [0.3 + 0.02 * i if i <= peak else 0.3 + 0.02 * peak - 0.015 * (i - peak) for i in range(n)]
    proxy = [0.1 * i for i in range(n)]
    return steps, gold, proxy


def test_parting_point_is_where_gold_peaks_while_the_proxy_keeps_rising():
    steps, gold, proxy = _peaked()
    p = parting_point(steps, gold, proxy, window=1)
    assert p["index"] == 9 and p["step"] == 10
    assert p["gold_at"] == pytest.approx(0.48) and p["proxy_end"] > p["proxy_at"]
    assert parting_point(steps, gold, proxy, window=3, gold_tol=0.0)["index"] == 9  # the smoothed peak
    # with the default tolerance, the step before the peak already counts: smoothed gold there (0.460) is
    # within 0.01 of everything after it (at most 0.468)
    assert parting_point(steps, gold, proxy, window=3)["index"] == 8


def test_parting_point_on_a_plateau_is_its_start_within_the_tolerance():
    steps = list(range(10))
    gold = [0.1, 0.2, 0.3, 0.4, 0.5, 0.505, 0.5, 0.508, 0.503, 0.506]
    proxy = list(np.linspace(0, 2, 10))
    assert parting_point(steps, gold, proxy, window=1, gold_tol=0.01)["index"] == 4
    assert parting_point(steps, gold, proxy, window=1, gold_tol=0.0)["index"] == 7  # the strict maximum


def test_step_noise_ignores_trend_and_kinks_and_finds_the_noise():
    from rlhf_helpers.evaluate import step_noise

    assert step_noise(np.linspace(0, 3, 40)) == pytest.approx(0.0, abs=1e-12)  # a straight line has none
    assert step_noise(_peaked()[1]) == pytest.approx(0.0, abs=1e-12)  # nor one kink
    noise = np.random.default_rng(0).normal(0, 0.1, 4000)
    assert step_noise(noise + np.linspace(0, 5, 4000)) == pytest.approx(0.1, rel=0.05)


def test_noisy_gold_rising_with_the_proxy_seldom_parts_while_a_real_peak_still_does():
    """Before the noise guard, gold rising with the proxy under the cpu run's sort of noise "parted" in about
    half of 40-step runs (the last steps' gain is lost in noise); a peak followed by a fall is still found."""
    rng = np.random.default_rng(1)
    t, steps = np.arange(40), list(range(1, 41))
    parted = {"rising": 0, "peaked": 0}
    for _ in range(200):
        proxy = 0.03 * t + rng.normal(0, 0.25, 40)
        rising = 0.6 + 0.004 * t + rng.normal(0, 0.075, 40)
        peaked = 0.6 + 0.004 * np.minimum(t, 20) - 0.004 * np.maximum(t - 20, 0) + rng.normal(0, 0.075, 40)
        parted["rising"] += parting_point(steps, rising, proxy) is not None
        parted["peaked"] += parting_point(steps, peaked, proxy) is not None
    assert parted["rising"] <= 0.2 * 200 and parted["peaked"] >= 0.6 * 200, parted


def test_no_parting_point_while_gold_keeps_rising_or_the_proxy_does_not():
    steps = list(range(10))
    assert parting_point(steps, np.linspace(0.2, 0.6, 10), np.linspace(0, 2, 10), window=1) is None
    falling = [0.5 - 0.02 * i for i in range(10)]
    assert parting_point(steps, falling, [0.3] * 10, window=1) is None  # proxy flat: nothing over-optimised
    # a proxy that dips and comes back has not risen, though gold peaked meanwhile (the cpu run's PPO: smoothed
    # proxy -0.43 at the start, -0.73 in the dip, -0.60 at the end, parted "at step 13" before this rule)
    dip = [0.0, -0.3, -0.6, -0.6, -0.3, -0.1, 0.0, -0.05, 0.02, 0.0]
    peaked = [0.5, 0.55, 0.6, 0.62, 0.6, 0.58, 0.57, 0.56, 0.56, 0.55]
    assert parting_point(steps, peaked, dip, window=1) is None
    assert parting_point(steps, peaked, [d + 0.05 * i for i, d in enumerate(dip)], window=1)["step"] == 3
    with pytest.raises(ValueError, match="one length"):
        parting_point(steps, falling, [0.3] * 9)
    with pytest.raises(ValueError, match="finite"):
        parting_point(steps, [float("nan")] * 10, [0.3] * 10)


def test_training_series_keeps_complete_rows_and_counts_the_rest():
    rows = [{"step": 1, "a": 1.0, "b": 2.0}, {"step": 2, "a": 1.5}, {"step": 3, "a": None, "b": 1.0},
            {"step": 4, "a": 2.0, "b": 3.0}]
    s = training_series(rows, ["a", "b"])
    assert s["step"] == [1, 4] and s["a"] == [1.0, 2.0] and s["b"] == [2.0, 3.0] and s["skipped"] == 2


# --- results table and frontier ----------------------------------------------------------------------------

def _rows(golds, prompts=None):
    prompts = prompts or [f"prompt {i}" for i in range(len(golds))]
    return [{"prompt": p, "domain": "facts", "id": f"f-{i}", "response": f"answer {i} to {p}", "gold": g,
             "proxy": g - 0.5, "kl": 1.0, "n_tokens": 10, "has_eos": True} for i, (p, g) in enumerate(zip(prompts, golds))]


def _metrics(rows, kl):
    return {"gold_mean": float(np.mean([r["gold"] for r in rows])), "proxy_mean": float(np.mean([r["proxy"] for r in rows])),
            "kl_mean": kl, "length_mean": 10.0, "distinct_1": 0.8, "distinct_2": 0.9, "n": len(rows)}


def test_results_table_has_win_rates_against_the_reference_and_refuses_unpaired_prompts():
    sft, ppo = _rows([0.5, 0.5, 0.5, 0.5]), _rows([0.7, 0.5, 0.2, 0.9])
    table = results_table({"sft": (sft, _metrics(sft, 0.0)), "ppo": (ppo, _metrics(ppo, 3.0))}, n_boot=200)
    by = {r["policy"]: r for r in table}
    assert by["sft"]["win_rate"] is None and by["sft"]["kl"] == 0.0
    assert by["ppo"]["win_rate"] == pytest.approx(2.5 / 4) and by["ppo"]["kl"] == 3.0 and by["ppo"]["n"] == 4
    assert by["ppo"]["gain"] == pytest.approx(0.075) and by["ppo"]["gain_ci_low"] <= 0.075 <= by["ppo"]["gain_ci_high"]
    assert by["sft"]["gain"] is None and by["sft"]["proxy_gain"] is None
    # the reward model's paired gain, beside gold's: _rows scores proxy = gold - 0.5, so the two gains agree
    assert by["ppo"]["proxy_gain"] == pytest.approx(0.075)
    assert by["ppo"]["proxy_gain_ci_low"] == pytest.approx(by["ppo"]["gain_ci_low"])
    unscored = [{**r, "proxy": None} for r in ppo]  # evaluated without a reward model: no proxy gain, no error
    row = results_table({"sft": (sft, _metrics(sft, 0.0)), "ppo": (unscored, _metrics(ppo, 3.0))}, n_boot=200)[1]
    assert row["proxy_gain"] is None and row["gain"] == pytest.approx(0.075)
    shown = format_results(table).set_index("policy")
    assert shown.loc["ppo", "proxy gain vs sft [95% CI]"].startswith("+0.075 [")
    assert format_results([table[0], row]).set_index("policy").loc["ppo", "proxy gain vs sft [95% CI]"] == "–"
    compared = format_comparison(comparison_table(table, {}))  # notebook 05's table shows both gains too
    assert compared.loc["ppo", "gold gain vs sft [95% CI]"] == shown.loc["ppo", "gold gain vs sft [95% CI]"]
    assert compared.loc["ppo", "proxy gain vs sft [95% CI]"].startswith("+0.075 [")
    assert compared.loc["sft", "proxy gain vs sft [95% CI]"] == "(reference)"
    other = _rows([0.7, 0.5, 0.2, 0.9], prompts=["x", "y", "z", "w"])
    with pytest.raises(ValueError, match="dpo and sft were evaluated on different prompts"):
        results_table({"sft": (sft, _metrics(sft, 0.0)), "dpo": (other, _metrics(other, 1.0))})
    with pytest.raises(ValueError, match="reference policy 'sft'"):
        results_table({"ppo": (ppo, _metrics(ppo, 3.0))})


def test_results_table_counts_refusals_apart_on_harmful_and_benign_requests():
    prompts = ["How do I make a bomb at home?", "How do I bake bread?", "Name a colour."]
    sft = _rows([0.8, 0.7, 0.6], prompts)
    ppo = [{**r, "response": text} for r, text in
           zip(_rows([0.1, 0.2, 0.6], prompts), ["Sure, first get some.", "I can't help with that.", "I won't."])]
    sft[0]["response"] = "I'm sorry, but I can't help with that."
    by = {r["policy"]: r for r in results_table({"sft": (sft, _metrics(sft, 0.0)), "ppo": (ppo, _metrics(ppo, 1.0))},
                                                 n_boot=200)}
    assert {k: by["sft"][k] for k in ("refused_harmful", "harmful_replies", "refused_benign", "benign_replies")} \
        == {"refused_harmful": 1, "harmful_replies": 1, "refused_benign": 0, "benign_replies": 2}
    assert (by["ppo"]["refused_harmful"], by["ppo"]["refused_benign"]) == (0, 2)
    shown = format_results(list(by.values())).set_index("policy")["refused: harmful / benign"]
    assert shown.to_dict() == {"sft": "1/1 · 0/2", "ppo": "0/1 · 2/2"}
    compared = format_comparison(comparison_table(list(by.values()), {}))["refused: harmful / benign"]
    assert compared.to_dict() == shown.to_dict()  # notebook 05's table shows them too
    old = {k: v for k, v in by["ppo"].items() if k not in ("refused_harmful", "harmful_replies")}
    assert format_results([old]).loc[0, "refused: harmful / benign"] == "–"  # a summary written before the counts


def test_best_of_n_matches_picking_from_every_subset_by_hand():
    rng = np.random.default_rng(3)
    k, prompts = 4, 6
    gold = rng.random((prompts, k)).round(1)  # rounded: ties in gold, broken towards the earlier reply
    proxy = gold + rng.normal(0, 0.3, (prompts, k))
    rows = best_of_n(gold.ravel(), proxy.ravel(), k, n_boot=200)
    for row in rows:
        n = row["n"]
        subsets = list(itertools.combinations(range(k), n))
        by_proxy = np.mean([[gold[p, max(c, key=lambda i: (proxy[p, i], -i))] for c in subsets]
                            for p in range(prompts)])
        by_gold = np.mean([[max(gold[p, list(c)]) for c in subsets] for p in range(prompts)])
        assert row["by_proxy"] == pytest.approx(by_proxy) and row["by_gold"] == pytest.approx(by_gold)
        assert row["random"] == pytest.approx(gold.mean()) and row["prompts"] == prompts
        assert row["kl_bound"] == pytest.approx(math.log(n) - (n - 1) / n)
        assert row["gain_ci_low"] <= row["gain"] <= row["gain_ci_high"]
    assert rows[0]["by_proxy"] == pytest.approx(rows[0]["random"]) and rows[0]["gain"] == pytest.approx(0)
    perfect, reversed_ = best_of_n(gold.ravel(), gold.ravel(), k), best_of_n(gold.ravel(), -gold.ravel(), k)
    assert perfect[-1]["by_proxy"] == pytest.approx(gold.max(axis=1).mean())  # the proxy is the gold
    assert reversed_[-1]["by_proxy"] == pytest.approx(gold.min(axis=1).mean())  # the proxy is backwards
    assert reversed_[-1]["gain_ci_high"] < 0
    with pytest.raises(ValueError, match="multiple of k=4"):
        best_of_n(gold.ravel()[:-1], proxy.ravel()[:-1], k)


def test_within_prompt_agreement_compares_replies_to_the_same_prompt_only():
    from rlhf_helpers.evaluate import within_prompt_agreement

    gold = [0.1, 0.9, 0.5, 0.5, 0.2, 0.8]  # prompt 1: a gold gap; prompt 2: a gold tie; prompt 3: a gap
    proxy = [5.0, 6.0, 1.0, 9.0, 3.0, 3.0]  # agrees on prompt 1, ties on prompt 3; prompt 2 is not counted
    assert within_prompt_agreement(gold, proxy, 2) == {"agreement": 0.75, "pairs": 2}
    # a proxy that only knows which prompt it is (the gold's between-prompt spread) orders no pair within one
    assert within_prompt_agreement([0.1, 0.2, 0.8, 0.9], [0.0, 0.0, 1.0, 1.0], 2)["agreement"] == 0.5


def test_several_samples_per_prompt_are_averaged_so_the_prompt_stays_the_unit_of_the_win_rate():
    # prompt-major, 2 replies per prompt: per prompt PPO averages 0.6, 0.5, 0.2 against SFT's 0.5 everywhere
    prompts = ["a", "a", "b", "b", "c", "c"]
    sft, ppo = _rows([0.5] * 6, prompts), _rows([0.9, 0.3, 0.5, 0.5, 0.1, 0.3], prompts)
    assert per_prompt_means(ppo)[0] == ["a", "b", "c"]
    assert per_prompt_means(ppo)[1] == pytest.approx([0.6, 0.5, 0.2])
    by = {r["policy"]: r for r in results_table({"sft": (sft, _metrics(sft, 0.0)), "ppo": (ppo, _metrics(ppo, 1.0))},
                                                n_boot=200)}
    assert by["ppo"]["win_rate"] == pytest.approx(1.5 / 3)  # a win, a tie, a loss: not 6 separate outcomes
    assert by["ppo"]["n"] == 6 and by["ppo"]["prompts"] == 3
    assert by["ppo"]["gain"] == pytest.approx((0.1 + 0.0 - 0.3) / 3)
    _, wins = compare_policies(ppo, sft, "ppo", "sft")
    assert wins["n"] == 3 and wins["win_rate"] == pytest.approx(0.5)
    assert (by["ppo"]["wins"], by["ppo"]["ties"], by["ppo"]["losses"]) == (1, 1, 1)
    shown = format_results(list(by.values())).set_index("policy")
    assert shown.loc["ppo", "won / tied / lost"] == "1 / 1 / 1" and shown.loc["sft", "won / tied / lost"] == "–"
    assert shown.loc["ppo", "gold gain vs sft [95% CI]"].startswith("-0.067 [")
    with pytest.raises(ValueError, match="same prompts in the same order"):
        paired_win_rate(ppo, _rows([0.5] * 6, ["a", "a", "c", "c", "b", "b"]))
    # the intervals resample prompts, not replies: replies that scatter widely around per-prompt means that all
    # beat SFT's by exactly 0.1 leave no doubt about the gain, nor about the wins
    prompts = [f"p{i}" for i in range(12) for _ in range(2)]
    sft = _rows([0.3 + 0.04 * (i // 2) for i in range(24)], prompts)
    ppo = _rows([r["gold"] + 0.1 + (0.3 if i % 2 else -0.3) for i, r in enumerate(sft)], prompts)
    by = {r["policy"]: r for r in results_table({"sft": (sft, _metrics(sft, 0.0)), "ppo": (ppo, _metrics(ppo, 1.0))},
                                                n_boot=500)}
    assert (by["ppo"]["gain_ci_low"], by["ppo"]["gain_ci_high"]) == (pytest.approx(0.1), pytest.approx(0.1))
    assert (by["ppo"]["ci_low"], by["ppo"]["ci_high"]) == (1.0, 1.0)


def test_widest_disagreements_show_the_prompts_where_gold_spreads_most_with_whole_replies():
    sft, ppo = _rows([0.5, 0.5, 0.5, 0.5]), _rows([0.5, 0.9, 0.1, 0.55])
    ppo[1]["response"] = "x" * 500  # shown whole, not cut
    ppo[2]["has_eos"] = False  # ran out of tokens: said so
    table = widest_disagreements({"sft": (sft, {}), "ppo": (ppo, {})}, k=2).reset_index()
    assert list(table["prompt"]) == ["prompt 1", "prompt 1", "prompt 2", "prompt 2"]
    assert list(table["gold spread"]) == ["0.400"] * 4 and list(table["policy"]) == ["sft", "ppo"] * 2
    assert table.loc[1, "reply"] == "x" * 500 and table.loc[1, "gold"] == "0.900"
    assert table.loc[3, "reply"].endswith("[cut: the token limit]") and "[cut" not in table.loc[2, "reply"]


def test_line_gains_read_each_line_against_its_own_start():
    points = [{"policy": "sft", "kind": "final", "step": None, "gold": 0.75, "kl": 0.0, "n": 32},
              {"policy": "ppo", "kind": "final", "step": None, "gold": 0.71, "kl": 0.7, "n": 32},
              {"policy": "sft", "kind": "line", "step": None, "gold": 0.71, "kl": 0.0, "n": 16},
              {"policy": "ppo", "kind": "checkpoint", "step": 16, "gold": 0.79, "kl": 0.5, "n": 16},
              {"policy": "ppo", "kind": "checkpoint", "step": 8, "gold": 0.78, "kl": 0.3, "n": 16}]
    table = line_gains(points)
    assert table.loc["ppo"].tolist() == [pytest.approx(0.08), pytest.approx(-0.04)]  # the last checkpoint ends it
    assert list(table.columns) == ["gain on the line's 16 replies", "gain on all 32 replies"]
    points.append({"policy": "ppo", "kind": "line", "step": None, "gold": 0.70, "kl": 0.6, "n": 16})  # a final
    assert line_gains(points).loc["ppo"].tolist()[0] == pytest.approx(-0.01)  # no checkpoint held


def test_frontier_points_put_the_reference_at_zero_sort_checkpoints_and_take_line_ends_as_measured():
    sft, base, ppo = _rows([0.5, 0.5, 0.9, 0.9]), _rows([0.4] * 4), _rows([0.6, 0.8, 0.2, 0.2])
    evaluations = {"sft": (sft, {**_metrics(sft, None)}), "base": (base, _metrics(base, None)),
                   "ppo": (ppo, _metrics(ppo, 1.5))}
    ends = {"sft": {"gold_mean": 0.52, "kl_mean": 0.0, "n": 2}, "ppo": {"gold_mean": 0.61, "kl_mean": 0.9, "n": 2}}
    pts = frontier_points(evaluations, {"ppo": [(20, {"gold_mean": 0.58, "kl_mean": 1.5, "n": 2}),
                                                (10, {"gold_mean": 0.55, "kl_mean": 0.7, "n": 2})]}, line_ends=ends)
    by = {(p["policy"], p["kind"]): p for p in pts}
    assert (by[("sft", "final")]["kl"], by[("sft", "final")]["gold"]) == (0.0, pytest.approx(0.7))
    assert by[("base", "no_kl")]["kl"] is None and ("base", "final") not in by
    assert [p["step"] for p in pts if p["kind"] == "checkpoint"] == [10, 20]
    # the line's ends are the separate evaluations on the checkpoints' prompts, not rows of the full ones
    assert (by[("sft", "line")]["gold"], by[("sft", "line")]["kl"], by[("sft", "line")]["n"]) == (0.52, 0.0, 2)
    assert (by[("ppo", "line")]["gold"], by[("ppo", "line")]["kl"]) == (0.61, 0.9)
    assert ("base", "line") not in by
    assert not [p for p in frontier_points(evaluations, {}) if p["kind"] == "line"]


def test_line_ends_are_sampled_as_checkpoints_are_and_skip_a_final_that_a_checkpoint_holds(tmp_path, monkeypatch):
    from rlhf_helpers import evaluate, policies
    from rlhf_helpers.config import stage_config

    for stage, final in (("ppo", b"final"), ("dpo", b"last")):  # ppo's final is new; dpo's is its last checkpoint
        for folder, weights in (("adapter", final), ("checkpoints/checkpoint-5", b"early"),
                                ("checkpoints/checkpoint-10", b"last")):
            (tmp_path / stage / folder).mkdir(parents=True)
            (tmp_path / stage / folder / "adapter_config.json").write_text("{}")
            (tmp_path / stage / folder / "adapter_model.safetensors").write_bytes(weights)
    sampled = []

    def fake_evaluate_policy(policy, tok, prompts, judge, reward_model, **kw):  # what reaches the sampler
        sampled.append(([(p["prompt"], p["sample"]) for p in prompts], kw))
        return [], {"gold_mean": 0.5, "kl_mean": 0.0, "n": len(prompts)}

    monkeypatch.setattr(policies, "load_policy", lambda *a, **kw: (object(), None))
    monkeypatch.setattr(evaluate, "evaluate_policy", fake_evaluate_policy)
    cfg = stage_config(evaluate.EvalConfig, "cpu", samples_per_prompt=3)
    evaluate.evaluate_checkpoints(tmp_path, "ppo", cfg, reward_model=None)
    ends = evaluate.evaluate_line_ends(tmp_path, ["ppo", "dpo"], cfg, reward_model=None)
    assert list(ends) == ["sft", "ppo"]  # dpo's final adapter is its checkpoint-10: no separate point
    assert len(sampled) == 4  # checkpoints 5 and 10, then sft and ppo's final
    first_prompts, first_kw = sampled[0]
    assert len(first_prompts) == cfg.n_checkpoint_prompts and {j for _, j in first_prompts} == {0}

    def same(kw):  # all but the progress bar's name, which names the policy
        return {k: v for k, v in kw.items() if k != "progress"}

    for prompts, kw in sampled[1:]:  # the same prompts, one reply each, the same seed, batches and lengths
        assert prompts == first_prompts and same(kw) == same(first_kw)


def test_checkpoints_past_a_stages_max_steps_are_left_out_and_said(tmp_path, capsys):
    from rlhf_helpers.policies import policy_checkpoints

    for step in (5, 10, 11):
        (tmp_path / "dpo" / "checkpoints" / f"checkpoint-{step}").mkdir(parents=True)
        (tmp_path / "dpo" / "checkpoints" / f"checkpoint-{step}" / "adapter_config.json").write_text("{}")
    assert [s for s, _ in policy_checkpoints(tmp_path, "dpo")] == [5, 10, 11]  # no config: nothing to judge by
    (tmp_path / "dpo" / "config.json").write_text(json.dumps({"max_steps": 10}))
    assert [s for s, _ in policy_checkpoints(tmp_path, "dpo")] == [5, 10]
    assert "left out checkpoint(s) at step 11, past the stage's max_steps=10" in capsys.readouterr().out
    assert [s for s, _ in policy_checkpoints(tmp_path, "dpo", say=False)] == [5, 10]
    assert capsys.readouterr().out == ""  # a second listing leaves it unsaid


def test_parting_notes_tell_a_proxy_that_never_rose_from_gold_keeping_pace(tmp_path):
    steps = list(range(1, 11))
    cases = {"ppo": ([0.5 + 0.01 * i for i in range(10)], [0.1 * i for i in range(10)]),   # both rise
             "grpo": ([0.5] * 10, [0.2 - 0.05 * i for i in range(10)])}                     # proxy falls
    for stage, (gold, proxy) in cases.items():
        _write_jsonl(tmp_path / stage / "metrics.jsonl", [{"step": s, "objective/gold": g, "objective/scores": p}
                                                          for s, g, p in zip(steps, gold, proxy)])
    over = gold_proxy_over_training(tmp_path)
    assert over["ppo"]["note"].startswith("no parting: gold did not fall behind the rising proxy")
    assert over["grpo"]["note"].startswith("the proxy fell by more than its noise (proxy 0.15 → -0.20")
    assert parting_outcome(over["grpo"]) == "proxy did not rise"
    flat = tmp_path / "flat"
    _write_jsonl(flat / "ppo" / "metrics.jsonl", [{"step": s, "objective/gold": 0.5, "objective/scores": p}
                                                  for s, p in zip(steps, [0.1, -0.2, 0.3, 0.0, -0.1] * 2)])
    assert gold_proxy_over_training(flat)["ppo"]["note"].startswith("the proxy did not rise beyond its noise")
    steps, gold, proxy = _peaked()
    _write_jsonl(tmp_path / "rloo" / "metrics.jsonl", [{"step": s, "objective/gold": g, "objective/scores": p}
                                                       for s, g, p in zip(steps, gold, proxy)])
    assert gold_proxy_over_training(tmp_path, window=1)["rloo"]["note"].startswith("gold stopped rising at step 10")
    assert list(gold_proxy_over_training(tmp_path, stages=["ppo"])) == ["ppo"]  # notebook 04 reads its own stage


def _ppo_rows(n, clip, score=lambda i: -1.0, kl=lambda i: 0.1 * i, ev=0.05):
    return [{"step": i, "objective/scores": score(i), "objective/raw_scores": score(i) + 0.5, "objective/gold": 0.7,
             "objective/kl": kl(i), "policy/clipfrac_avg": clip, "policy/approxkl_avg": 1e-4,
             "response/eos_frac": 0.25, "val/explained_variance": ev} for i in range(1, n + 1)]


def test_ppo_reading_says_what_the_run_did():
    from types import SimpleNamespace

    cfg = SimpleNamespace(batch_size=8, response_length=64, missing_eos_penalty=1.0, ppo_epochs=2)
    sft, ppo = {"gold_mean": 0.75}, {"gold_mean": 0.71, "kl_mean": 0.68}
    eval_rows = [{"kl": k} for k in (0.2, 0.6, 1.0, 0.9)]
    wins = {"gain": -0.044, "gain_ci_low": -0.12, "gain_ci_high": 0.029, "n": 32, "wins": 6, "ties": 10,
            "losses": 16, "win_rate": 0.34, "ci_low": 0.22, "ci_high": 0.48}
    text = ppo_reading(_ppo_rows(16, 0.001), cfg, sft, ppo, eval_rows, wins, max_new_tokens=96, note="the proxy did not rise")
    assert "16 steps of 8 replies of up to 64 tokens" in text and "75% of the training replies never did" in text
    # training KL: the mean of the last 4 steps (1.3, 1.4, 1.5, 1.6), not the last step alone
    assert "averaged over the last 4 steps: 1.45 nats (the last step alone: 1.60" in text
    assert f"0.68 ± {np.std([0.2, 0.6, 1.0, 0.9], ddof=1) / 2:.2f} nats per reply" in text
    assert "replies of up to 96 tokens" in text
    assert "sampled before that step's update (step 1's is 0)" in text  # why training's KL lags the held-out one
    assert "the training figure lies outside two standard errors of it" in text  # 1.45 against 0.68 ± 0.18
    assert "rarely reach the clip range: the clip bound on 0.1% of tokens" in text
    assert "each of the 2 passes over a batch" in text
    assert "explained 0.05 of the variance" in text and "Near 0" in text
    assert "cannot tell PPO from SFT by gold on these prompts (the interval holds 0)" in text
    assert "won 6, tied 10 and lost 16" in text and "it can leave out 0.5 while the gain's interval holds 0" in text
    assert "score -1.00 → -1.00 (+0.00 ± 0.00)" in text
    assert text.splitlines()[-1] == "- **Reward hacking?** The proxy did not rise."
    assert "siblings'" not in text  # the baseline sentence belongs to group_baseline runs only
    grouped = SimpleNamespace(**vars(cfg), group_baseline=True, samples_per_prompt=4)
    text = ppo_reading(_ppo_rows(16, 0.001), grouped, sft, ppo, eval_rows, wins, max_new_tokens=96)
    assert "its score less the mean of its 3 siblings'" in text and "which prompts came up" in text
    rising = _ppo_rows(16, 0.08, score=lambda i: 0.1 * i)
    text = ppo_reading(rising, cfg, sft, ppo, eval_rows, {**wins, "gain": 0.05, "gain_ci_low": 0.01}, max_new_tokens=96)
    assert "score 0.45 → 1.25 (+0.80" in text and "standard errors of no change" not in text.split(";")[0]
    assert "Clipping was at work" in text and "PPO raised gold over SFT" in text and "Reward hacking" not in text
    assert "leave out 0.5" not in text  # said only when the win rate's interval and the gain's disagree
    text = ppo_reading(rising, cfg, sft, ppo, eval_rows, {**wins, "gain_ci_high": -0.01}, max_new_tokens=96)
    assert "PPO lowered gold below SFT on these prompts, beyond the interval" in text
    few = ppo_reading(rising, cfg, sft, ppo, eval_rows, {**wins, "n": 4, "gain_ci_low": 0.01}, max_new_tokens=96)
    assert "4 prompts are too few for a bootstrap interval to tell PPO from SFT" in few and "raised" not in few
    worse = ppo_reading(_ppo_rows(8, 0.001, ev=-0.4), cfg, sft, ppo, eval_rows, wins, max_new_tokens=96)
    assert "explained -0.40 of the variance" in worse and "predicts worse than the mean would" in worse



def test_refusal_split_counts_refusals_and_gold_by_kind_of_request_on_hand_made_rows():
    harmful, benign = "How do I make a bomb at home?", "How do I bake bread?"
    no, sure = "I can't help with that.", "Mix flour, water and yeast, then bake."
    ppo = [{"prompt": harmful, "response": sure, "gold": 0.1}, {"prompt": harmful, "response": no, "gold": 0.8},
           {"prompt": benign, "response": no, "gold": 0.0}, {"prompt": benign, "response": sure, "gold": 0.9}]
    sft = [{"prompt": harmful, "response": no, "gold": 0.8}, {"prompt": benign, "response": sure, "gold": 0.7}]
    split = refusal_split(ppo, sft)  # two replies a prompt against one: each policy counts its own replies
    assert split["harmful"] == {"prompts": 1, "replies_a": 2, "replies_b": 1, "refused_a": 1, "refused_b": 1,
                                "gain": pytest.approx(0.45 - 0.8)}
    assert split["benign"] == {"prompts": 1, "replies_a": 2, "replies_b": 1, "refused_a": 1, "refused_b": 0,
                               "gain": pytest.approx(0.45 - 0.7)}
    with pytest.raises(ValueError, match="same prompts"):
        refusal_split(ppo, sft[:1])


def test_ppo_reading_with_sft_rows_says_where_refusals_went():
    from types import SimpleNamespace

    cfg = SimpleNamespace(batch_size=8, response_length=64, missing_eos_penalty=1.0, ppo_epochs=2)
    wins = {"gain": -0.044, "gain_ci_low": -0.12, "gain_ci_high": 0.029, "n": 2, "wins": 0, "ties": 1,
            "losses": 1, "win_rate": 0.25, "ci_low": 0.0, "ci_high": 0.5}
    harmful, benign = "How do I make a bomb at home?", "How do I bake bread?"
    sft = [{"prompt": harmful, "response": "I can't help with that.", "gold": 0.8, "kl": 0.0},
           {"prompt": benign, "response": "Mix and bake.", "gold": 0.7, "kl": 0.0}]
    ppo = [{"prompt": harmful, "response": "First, get some.", "gold": 0.1, "kl": 0.5},
           {"prompt": benign, "response": "Mix and bake.", "gold": 0.7, "kl": 0.1}]
    args = (_ppo_rows(8, 0.001), cfg, {"gold_mean": 0.75}, {"gold_mean": 0.4, "kl_mean": 0.3}, ppo, wins)
    text = ppo_reading(*args, max_new_tokens=96, sft_rows=sft)
    assert ("SFT refused 1 of 1 replies to the 1 harmful held-out requests and PPO 0 of 1 (gold -0.700 on those "
            "prompts); to the 1 benign requests, SFT refused 0 of 1 replies and PPO 0 of 1 (gold +0.000)") in text
    assert "PPO refused fewer of the harmful requests than SFT" in text and "drift" in text
    assert "Refusals" not in ppo_reading(*args, max_new_tokens=96)  # said only when SFT's rows are given
    kept = ppo_reading(*args[:4], sft, wins, max_new_tokens=96, sft_rows=sft)  # PPO answering as SFT did
    assert "SFT refused 1 of 1 replies to the 1 harmful held-out requests and PPO 1 of 1 (gold +0.000" in kept
    assert "drift" not in kept
    twice = ppo_reading(*args[:4], [ppo[0], sft[0], ppo[1]], wins, max_new_tokens=96, sft_rows=sft)
    assert "PPO 1 of 2" in twice and "drift" in twice  # a share of 1/2 against SFT's 1/1 is fewer, not level
    only_benign = ppo_reading(*args[:4], ppo[1:], wins, max_new_tokens=96, sft_rows=sft[1:])
    assert "No held-out prompt here is a harmful request; to the 1 benign requests, SFT refused 0 of 1" in only_benign
    # PPO started from the base model (no SFT model): the text names it, not SFT
    from_base = ppo_reading(args[0], cfg, {"gold_mean": 0.75, "policy": "base"}, *args[3:], max_new_tokens=96,
                            sft_rows=sft)
    assert "The base model refused 1 of 1 replies to the 1 harmful held-out requests" in from_base
    assert "Gold 0.750 (the base model) → 0.400 (PPO)" in from_base and "SFT" not in from_base.split("`docs")[0]
    # PPO optimised the gold judge itself (no reward model): the text names it as what was optimised
    assert "is the reward model's score minus" in text and "the reward model alone" in text
    on_gold = ppo_reading(*args, max_new_tokens=96, sft_rows=sft, reward_name="gold_judge")
    assert "is the gold judge's score minus" in on_gold and "the gold judge alone" in on_gold
    assert "reward model" not in on_gold.split("**KL.**")[0]

# --- a fake run folder: report and results check ----------------------------------------------------------

POLICY_GOLD = {"base": 0.40, "sft": 0.50, "ppo": 0.60, "dpo": 0.55, "grpo": 0.52, "rloo": 0.45}


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_fake_run(root: Path, profile="cpu", policies=tuple(POLICY_GOLD), rm_accuracy=0.68, rl_shift=0.0,
                  n=8, gold=None) -> Path:
    """A run folder with every file notebook 06 and check_results read, with chosen numbers (`gold` replaces
    some of POLICY_GOLD's)."""
    golds = {**POLICY_GOLD, **(gold or {})}
    _write_jsonl(root / "sft" / "metrics.jsonl", [{"step": s, "train/loss": 2.5 - 0.1 * s, "eval/loss": 2.4 - 0.05 * s}
                                                   for s in range(1, 6)])
    (root / "sft" / "summary.json").write_text(json.dumps({"eval_loss_before": 2.5, "eval_loss_after": 2.2}))
    _write_jsonl(root / "rm" / "metrics.jsonl", [{"step": s, "train/loss": 0.7 - 0.02 * s, "train/accuracy": 0.5 + 0.02 * s}
                                                  for s in range(1, 6)])
    (root / "rm" / "summary.json").write_text(json.dumps({"eval_accuracy": rm_accuracy, "bayes_ceiling": 0.76}))
    steps, gold, proxy = _peaked()
    _write_jsonl(root / "ppo" / "metrics.jsonl", [{"step": s, "objective/gold": g, "objective/scores": p,
                                                   "objective/kl": 0.1 * s, "loss/policy_avg": 0.01}
                                                  for s, g, p in zip(steps, gold, proxy)])
    (root / "ppo" / "summary.json").write_text(json.dumps({"steps": 20}))
    evaluations = {}
    for name in policies:
        g = golds[name] + (rl_shift if name in check_results.RL_POLICIES else 0.0)
        rows = _rows([g + 0.01 * (i % 3) for i in range(n)])
        rows_file = f"eval/policies/{name}.0123abcd.jsonl"  # as evaluate_stage names its cache
        _write_jsonl(root / rows_file, rows)
        evaluations[name] = (rows, {**_metrics(rows, None if name == "base" else 0.0 if name == "sft" else 2.0),
                                    "rows_file": rows_file})
    reference = "sft" if "sft" in policies else "base"
    over = gold_proxy_over_training(root, window=1)  # parting at the peak, step 10
    summary = {"profile": profile, "seed": 0, "reference": reference,
               "policies": results_table(evaluations, reference, n_boot=200),
               "missing": {s: "not in this fake run" for s in POLICY_GOLD if s not in policies and s != "base"},
               "frontier": frontier_points(evaluations, {"ppo": [(10, {"gold_mean": 0.56, "kl_mean": 1.0, "n": 2})]},
                                           reference, {reference: {"gold_mean": 0.5, "kl_mean": 0.0, "n": 2}}),
               "parting": {s: v["parting"] for s, v in over.items()},
               "parting_notes": {s: v["note"] for s, v in over.items()}}
    (root / "eval" / "summary.json").write_text(json.dumps(summary))
    return root


def test_report_builds_from_a_fake_run_and_needs_no_network(tmp_path):
    run = make_fake_run(tmp_path / "run", n=12)  # 10 prompts or more: the discussion reads the intervals
    path = build_report(run)
    assert path == run / "eval" / "report.html"
    page = path.read_text()
    assert not re.findall(r"<(?:script|link)\b[^>]*\b(?:src|href)\s*=\s*[\"']?(?:https?:)?//", page, re.I)
    assert page.count("Plotly.newPlot") == 4  # win rates, frontier, gold vs proxy, curves
    assert "Nothing to compare" not in page
    assert page.count(get_plotlyjs()[:2000]) == 1  # plotly.js inlined once, not per figure
    for name in POLICY_GOLD:
        assert f"<td>{name}</td>" in page
    assert "stopped rising at step 10" in page  # the parting point of the fake PPO curve (its peak)
    assert "<p><b>Gold reward.</b> On 12 held-out prompts, <b>ppo</b> scored highest" in page  # the table in words
    assert not list((run / "eval").glob(".report.html*"))  # no temporary file left behind
    no_sft = make_fake_run(tmp_path / "no_sft", n=12, policies=("base", "ppo", "dpo"))  # base is the reference
    reading = build_report(no_sft).read_text()
    assert "Nothing to compare" not in reading and "Better than base beyond the gold gain" in reading


def test_read_eval_summary_names_the_file_and_the_missing_field(tmp_path):
    run = make_fake_run(tmp_path / "run")
    path = run / "eval" / "summary.json"
    data = json.loads(path.read_text())
    del data["frontier"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"summary\.json: missing field\(s\) \['frontier'\]"):
        read_eval_summary(run)
    path.unlink()
    with pytest.raises(FileNotFoundError, match="run notebook 06"):
        read_eval_summary(run)


def test_check_results_passes_a_run_that_keeps_the_promises(tmp_path, capsys):
    run = make_fake_run(tmp_path / "good")
    build_report(run)
    assert check_results.main([str(run)]) == 0
    out = capsys.readouterr().out
    for name in check_results.EXPECTATIONS:
        assert re.search(rf"PASS\s+{name}\b", out), out
    assert "Report: " in out and "win rate vs sft" in out


def test_check_results_reads_the_rows_each_summary_row_names(tmp_path, capsys):
    run = make_fake_run(tmp_path / "run")
    _write_jsonl(run / "eval" / "policies" / "sft.jsonl", _rows([0.5] * 3))  # another evaluation's rows: not these
    checks = check_results.artifact_checks(run, check_results.load_facts(run))
    assert checks["policy_evaluations_saved"][0], checks["policy_evaluations_saved"]
    (run / "eval" / "policies" / "ppo.0123abcd.jsonl").unlink()
    ok, why = check_results.artifact_checks(run, check_results.load_facts(run))["policy_evaluations_saved"]
    assert not ok and "ppo.0123abcd.jsonl" in why


def test_check_results_finds_the_rows_of_a_summary_written_before_rows_file(tmp_path):
    run = make_fake_run(tmp_path / "run")
    path = run / "eval" / "summary.json"
    summary = json.loads(path.read_text())
    for row in summary["policies"]:
        del row["rows_file"]
        (run / "eval" / "policies" / f"{row['policy']}.0123abcd.jsonl").rename(
            run / "eval" / "policies" / f"{row['policy']}.jsonl")
    path.write_text(json.dumps(summary))
    ok, why = check_results.artifact_checks(run, check_results.load_facts(run))["policy_evaluations_saved"]
    assert ok, why


def test_check_results_fails_a_run_that_misses_them(tmp_path, capsys):
    run = make_fake_run(tmp_path / "bad", rm_accuracy=0.55, rl_shift=-0.3, policies=("base", "sft", "ppo", "dpo"))
    build_report(run)
    assert check_results.main([str(run)]) == 1
    out = capsys.readouterr().out
    for name in ("reward_model_learns", "rl_not_worse_than_sft", "every_policy_evaluated"):
        assert re.search(rf"FAIL\s+{name}\b", out), out
    assert re.search(r"PASS\s+sft_beats_base\b", out)
    assert check_results.main([str(run), "--profile", "smoke"]) == 0  # smoke: artifacts only
    (run / "eval" / "report.html").unlink()
    assert check_results.main([str(run), "--profile", "smoke"]) == 1
    assert re.search(r"FAIL\s+report_offline\b", capsys.readouterr().out)


def test_check_results_does_not_call_a_tie_with_sft_a_win(tmp_path, capsys):
    run = make_fake_run(tmp_path / "level", rl_shift=-0.1)  # ppo ties SFT on every prompt, the rest lose
    build_report(run)
    assert check_results.main([str(run)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"PASS\s+rl_not_worse_than_sft\b.*ppo 0\.50 \[0\.50, 0\.50\]", out), out
    assert "none beats SFT beyond its interval" in out
    good = make_fake_run(tmp_path / "good")
    build_report(good)
    check_results.main([str(good)])
    assert "beats SFT beyond its interval: ppo, dpo, grpo" in capsys.readouterr().out


def test_check_results_exit_2_for_a_missing_run_or_summary(tmp_path, capsys):
    assert check_results.main([str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert check_results.main([str(tmp_path / "empty")]) == 2
    assert "run notebook 06" in capsys.readouterr().err


def test_readme_names_every_promise_of_a_cpu_run():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("What a cpu run promises", 1)
    assert len(section) == 2, "README.md needs a 'What a cpu run promises' section"
    for name in check_results.EXPECTATIONS:
        assert f"`{name}`" in section[1], f"README's promises do not name {name}"


def test_checkpoints_are_evaluated_on_the_checkpoint_prompts_under_their_own_names(tmp_path, monkeypatch):
    from rlhf_helpers import evaluate
    from rlhf_helpers.config import stage_config

    for folder in ("checkpoints/step-20/adapter", "checkpoints/step-5/adapter", "checkpoints/step-9"):
        (tmp_path / "ppo" / folder).mkdir(parents=True)
    for folder in ("checkpoints/step-20/adapter", "checkpoints/step-5/adapter"):  # step-9 holds no adapter
        (tmp_path / "ppo" / folder / "adapter_config.json").write_text("{}")
    calls = []

    def fake_evaluate_stage(run_dir, stage, cfg, **kw):
        calls.append((stage, kw["name"], kw["n_prompts"], Path(kw["adapter"]).parent.name))
        return [], {"gold_mean": 0.5, "kl_mean": 1.0, "n": kw["n_prompts"]}

    monkeypatch.setattr(evaluate, "evaluate_stage", fake_evaluate_stage)
    cfg = stage_config(evaluate.EvalConfig, "cpu")
    out = evaluate.evaluate_checkpoints(tmp_path, "ppo", cfg, reward_model=None)
    n = cfg.n_checkpoint_prompts
    assert calls == [("ppo", "ppo-step5", n, "step-5"), ("ppo", "ppo-step20", n, "step-20")]
    assert [step for step, _ in out] == [5, 20]


def test_an_online_stage_without_gold_is_a_clear_error(tmp_path):
    _write_jsonl(tmp_path / "grpo" / "metrics.jsonl", [{"step": 1, "objective/scores": 0.1, "objective/kl": 0.0}])
    with pytest.raises(ValueError, match=r"grpo/metrics\.jsonl: no row holds objective/gold"):
        gold_proxy_over_training(tmp_path)


def test_ppo_proxy_is_the_reward_model_score_before_the_eos_penalty(tmp_path):
    rows = [{"step": s, "objective/scores": raw - 1.0, "objective/raw_scores": raw, "objective/gold": 0.5,
             "objective/kl": 0.1 * s} for s, raw in ((1, 0.2), (2, 0.4), (3, 0.6))]
    _write_jsonl(tmp_path / "ppo" / "metrics.jsonl", rows)
    _write_jsonl(tmp_path / "grpo" / "metrics.jsonl", [{k: v for k, v in rows[0].items() if k != "objective/raw_scores"}])
    over = gold_proxy_over_training(tmp_path, window=1)
    assert over["ppo"]["objective/scores"] == [0.2, 0.4, 0.6]  # raw, not raw - 1
    assert over["grpo"]["objective/scores"] == [pytest.approx(-0.8)]  # no raw scores logged: scores as they are


def test_frontier_axis_shows_the_trained_policies_and_points_to_a_distant_base():
    from rlhf_helpers.plotting import gold_kl_frontier

    def final(policy, kl, gold):
        return {"policy": policy, "kind": "final", "kl": kl, "gold": gold, "n": 32, "step": None}

    far = gold_kl_frontier([final("base", 37.8, 0.65), final("sft", 0.0, 0.716), final("ppo", 0.5, 0.75)])
    assert tuple(far.layout.xaxis.range) == pytest.approx((-0.025, 0.625))
    assert any("base, off the chart: KL 37.8, gold 0.650" in a.text for a in far.layout.annotations)
    edge = [t for t in far.data if t.marker.symbol == "triangle-right"]
    assert len(edge) == 1 and edge[0].x == (0.625,) and edge[0].y == (0.65,)  # on the right edge, at base's gold
    near = gold_kl_frontier([final("base", 1.0, 0.65), final("sft", 0.0, 0.716), final("ppo", 0.5, 0.75)])
    assert near.layout.xaxis.range is None and not near.layout.annotations


def test_evaluate_cli_prints_each_stage_against_sft_with_its_gain(tmp_path, monkeypatch, capsys):
    from rlhf_helpers import evaluate

    golds = {"sft": [0.5, 0.6, 0.7], "ppo": [0.6, 0.6, 0.9]}
    calls = []

    def fake_evaluate_stage(run_dir, stage, cfg, **kw):
        calls.append((str(run_dir), stage, cfg.n_prompts))
        rows = [{"prompt": f"p{i}", "response": "Sure.", "gold": g} for i, g in enumerate(golds[stage])]
        return rows, {"gold_mean": float(np.mean(golds[stage])), "kl_mean": 0.0 if stage == "sft" else 1.5}

    monkeypatch.setattr(evaluate, "evaluate_stage", fake_evaluate_stage)
    assert evaluate.main(["--run-dir", str(tmp_path), "--profile", "cpu", "--n-prompts", "3", "ppo", "sft"]) == 0
    assert calls == [(str(tmp_path), "sft", 3), (str(tmp_path), "ppo", 3)]  # sft once, first, as the reference
    out = capsys.readouterr().out
    assert "(reference)" in out and "1.50" in out
    assert "ppo: gold gain over sft +0.100 [" in out
    assert "the reward model's" not in out  # rows without reward-model scores: no proxy gain to print
    assert "0/0 · 0/3" in out  # no harmful request among the prompts, no benign reply refused
    calls.clear()
    with pytest.raises(SystemExit) as stop:  # a typo is refused before SFT is evaluated, not after
        evaluate.main(["--run-dir", str(tmp_path), "--profile", "cpu", "ppo", "bogus"])
    assert stop.value.code == 2 and calls == [] and "invalid choice: 'bogus'" in capsys.readouterr().err
    monkeypatch.undo()
    assert evaluate.main(["--run-dir", str(tmp_path / "empty"), "--profile", "cpu", "ppo"]) == 2  # no traceback
    assert capsys.readouterr().err.startswith("error: no SFT model in")


def test_check_results_tells_a_file_from_a_missing_folder(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    assert check_results.main([str(tmp_path / "afile")]) == 2
    assert "afile is a file, not a run folder" in capsys.readouterr().err
    assert check_results.main([str(tmp_path / "nothing")]) == 2
    assert "nothing does not exist" in capsys.readouterr().err


def test_refusal_rate_counts_first_sentence_refusals_prompt_major_with_an_interval_over_prompts(monkeypatch):
    from rlhf_helpers import evaluate, models

    replies = ["I can't help with that. Please talk to someone.", "Sure: first, gather the parts.",  # prompt 0
               "I won't write that.", "I'm sorry, but no."]  # prompt 1: both refuse
    seen = {}

    def fake_generate(model, tok, prompts, **kw):
        seen.update(prompts=prompts, **kw)
        return replies

    monkeypatch.setattr(models, "load_model", lambda *a, **kw: (object(), object()))
    monkeypatch.setattr(models, "generate", fake_generate)
    r = evaluate.refusal_rate("some/model", ["a", "b"], samples_per_prompt=2, seed=3)
    assert seen["prompts"] == ["a", "b"] and seen["num_return_sequences"] == 2 and seen["seed"] == 3
    assert (r["refused"], r["n"], r["rate"]) == (3, 4, 0.75)
    # per-prompt rates 0.5 and 1.0: the bootstrap over prompts gives [0.5, 1.0], Wilson's for 1.5 of 2 prompts
    # [0.20, 0.97]; the interval is the wider of the two at each end
    assert r["ci_low"] == pytest.approx(evaluate.wilson_interval(1.5, 2)[0]) and r["ci_high"] == 1.0
    assert r["examples"][0].startswith("I can't")
    replies[:] = ["Sure: first, gather the parts."] * 4  # none refuses: the bootstrap would say [0, 0]
    r = evaluate.refusal_rate("some/model", ["a", "b"], samples_per_prompt=2, seed=3)
    assert (r["refused"], r["rate"], r["ci_low"]) == (0, 0.0, 0.0)
    assert r["ci_high"] == pytest.approx(1.96 ** 2 / (2 + 1.96 ** 2), abs=1e-3)  # Wilson's, 0 of 2 prompts
    with pytest.raises(ValueError, match="samples_per_prompt"):
        evaluate.refusal_rate("some/model", [], samples_per_prompt=2)


def test_wilson_interval_against_hand_values():
    from rlhf_helpers.evaluate import wilson_interval

    low, high = wilson_interval(0, 36)
    assert low == 0.0 and high == pytest.approx(0.0964, abs=1e-4)  # z = 1.96: z²/(n + z²)
    low, high = wilson_interval(8, 36)
    assert (low, high) == pytest.approx((0.1172, 0.3808), abs=1e-4)  # the textbook formula, by hand
    assert wilson_interval(36, 36)[1] == 1.0 and np.isnan(wilson_interval(0, 0)[0])


def test_best_of_n_script_prints_the_table_from_saved_rows_and_names_a_bad_line(tmp_path, capsys, load_script):
    script = load_script("scripts/best_of_n.py")
    rows = [{"prompt": p, "gold": g, "proxy": q} for p, g, q in
            [("a", 0.2, 0.0), ("a", 0.8, 1.0), ("b", 0.9, 0.0), ("b", 0.1, 1.0), ("c", 0.5, 2.0), ("c", 0.7, 3.0)]]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert script.main(["--run-dir", str(tmp_path), "--rows", str(path), "--k", "2"]) == 0
    out = capsys.readouterr().out
    assert "3 prompts x 2 replies" in out and "orders 0.667 as gold does" in out  # right on a and c, wrong on b
    # best of 2: by the reward model (0.8 + 0.1 + 0.7) / 3, by gold (0.8 + 0.9 + 0.7) / 3, random 0.533
    assert re.search(r"\| 2 \| 0\.19 \| 0\.533 \| 0\.533 \| \+0\.000 .*\| 0\.800 \|", out), out
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]) + json.dumps({"prompt": "b", "gold": 0.1}) + "\n")
    with pytest.raises(SystemExit, match=r"rows\.jsonl, line 4: field 'proxy'"):
        script.main(["--run-dir", str(tmp_path), "--rows", str(path), "--k", "2"])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[1:5]))  # a|b, b|c: not k per prompt
    with pytest.raises(SystemExit, match=r"line 1: rows must come k=2 per prompt"):
        script.main(["--run-dir", str(tmp_path), "--rows", str(path), "--k", "2"])


def test_evaluation_loads_policies_in_4bit_when_the_profile_trained_in_4bit(tmp_path, monkeypatch):
    """An adapter trained on a 4-bit base is scored on that base (the profile's load_in_4bit reaches load_policy),
    and a 4-bit evaluation is cached apart from an unquantized one."""
    import dataclasses

    from rlhf_helpers import evaluate, policies
    from rlhf_helpers.config import PROFILES, stage_config

    seen = []

    class Stop(Exception):
        pass

    def fake_load_policy(run_dir, stage, **kw):
        seen.append(kw.get("load_in_4bit"))
        raise Stop

    monkeypatch.setattr(policies, "load_policy", fake_load_policy)
    quantized = stage_config(evaluate.EvalConfig, dataclasses.replace(PROFILES["gpu"], load_in_4bit=True))
    plain = stage_config(evaluate.EvalConfig, "gpu")
    for cfg in (quantized, plain):
        with pytest.raises(Stop):
            evaluate.evaluate_stage(tmp_path, "ppo", cfg, reward_model=None)
    assert seen == [True, False]
    key = evaluate._eval_key
    assert key(quantized, 4, 1, None, None) != key(plain, 4, 1, None, None)
    stem = evaluate.eval_cache_stem
    assert stem("ppo", key(quantized, 4, 1, None, None)) != stem("ppo", key(plain, 4, 1, None, None))
    assert "load_in_4bit" not in key(plain, 4, 1, None, None)  # an unquantized key, and file name, are as before


def test_evaluation_cache_keys_tell_dtypes_and_devices_apart_and_keep_float32_cpu_keys_as_they_were():
    from rlhf_helpers import evaluate

    key, stem = evaluate._eval_key, evaluate.eval_cache_stem
    cpu = evaluate.EvalConfig(n_prompts=4)
    assert set(key(cpu, 4, 1, None, None)) == {"model_name", "max_new_tokens", "temperature", "seed", "batch_size",
                                               "n_prompts", "samples_per_prompt", "adapter", "proxy"}
    assert key(evaluate.EvalConfig(n_prompts=4, dtype="fp32"), 4, 1, None, None) == key(cpu, 4, 1, None, None)
    stems = {stem("ppo", key(evaluate.EvalConfig(n_prompts=4, **change), 4, 1, None, None))
             for change in ({}, {"dtype": "bfloat16"}, {"device": "cuda"}, {"device": "cuda:1"},
                            {"dtype": "bf16", "device": "cuda"})}
    assert len(stems) == 4  # cuda and cuda:1 sample alike; bf16 and bfloat16 are one dtype


def test_a_given_reward_model_is_stamped_by_its_settings_not_only_its_type(tmp_path):
    from rlhf_helpers import evaluate
    from rlhf_helpers import rewards as R

    stamp = evaluate._proxy_stamp
    assert stamp(tmp_path, R.LengthWindow(40, 150)) == stamp(tmp_path, R.LengthWindow(40, 150))
    assert stamp(tmp_path, R.LengthWindow(40, 150)) != stamp(tmp_path, R.LengthWindow(10, 150))  # re-evaluated
    assert stamp(tmp_path, R.LengthWindow()).startswith("given LengthWindow ")
    assert stamp(tmp_path, None) is None and stamp(tmp_path, "auto") is None  # no run reward model here


def test_evaluation_cache_files_are_named_by_the_sampling_settings_but_not_the_reward_model():
    from rlhf_helpers import evaluate
    from rlhf_helpers.config import stage_config

    stem, key = evaluate.eval_cache_stem, evaluate._eval_key
    cli = stage_config(evaluate.EvalConfig, "cpu", n_prompts=72, samples_per_prompt=3)
    base = key(cli, 72, 3, None, "run rm 1.0")
    assert stem("sft", base) == stem("sft", {**base, "proxy": "run rm 2.0"})  # a new reward model: the same file
    for change in ({"n_prompts": 32}, {"samples_per_prompt": 1}, {"seed": 1}, {"temperature": 1.0}):
        assert stem("sft", {**base, **change}) != stem("sft", base), change
    assert stem("ppo", base) != stem("sft", base) and stem("sft", base).startswith("sft.")
    # the rejection-sampling script's 72 x 3 evaluation is the command line's, and shares its cache
    script_cfg = evaluate.EvalConfig(n_prompts=72, samples_per_prompt=3, max_new_tokens=96, batch_size=32)
    assert stem("sft", key(script_cfg, 72, 3, None, None)) == stem("sft", key(cli, 72, 3, None, None))


def test_evaluate_stage_reads_a_cache_written_before_files_were_named_by_settings(tmp_path, monkeypatch):
    from rlhf_helpers import evaluate, policies

    def fail(*a, **k):
        raise AssertionError("the cached evaluation should have been reused")

    monkeypatch.setattr(policies, "load_policy", fail)
    cfg = evaluate.EvalConfig(n_prompts=2)
    rows = _rows([0.4, 0.6])
    old = tmp_path / "eval" / "policies"
    _write_jsonl(old / "sft.jsonl", rows)
    settings = {**evaluate._eval_key(cfg, 2, 1, None, None),
                **evaluate._inputs_stamp(evaluate.heldout_prompts(2), GoldJudge())}
    (old / "sft.json").write_text(json.dumps({"settings": settings, "metrics": _metrics(rows, 0.0),
                                              "weights_mtime": 0.0}))
    got, metrics = evaluate.evaluate_stage(tmp_path, "sft", cfg, reward_model=None)
    assert got == rows and metrics["rows_file"] == "eval/policies/sft.jsonl"
    with pytest.raises(AssertionError, match="reused"):  # other settings are not served from it
        evaluate.evaluate_stage(tmp_path, "sft", evaluate.EvalConfig(n_prompts=2, seed=1), reward_model=None)


def test_a_cached_evaluation_is_made_again_for_another_judge_other_prompts_or_other_weights(tmp_path, monkeypatch):
    import os

    from rlhf_helpers import evaluate, policies
    from rlhf_helpers import rewards as R

    def fail(*a, **k):
        raise AssertionError("the cached evaluation should have been reused")

    monkeypatch.setattr(policies, "load_policy", fail)
    weights = tmp_path / "sft" / "model" / "model.safetensors"
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"weights")
    cfg, rows, held = evaluate.EvalConfig(n_prompts=2), _rows([0.4, 0.6]), evaluate.heldout_prompts(2)
    key = {**evaluate._eval_key(cfg, 2, 1, None, None), **evaluate._inputs_stamp(held, GoldJudge())}
    stem = tmp_path / "eval" / "policies" / evaluate.eval_cache_stem("sft", key)
    _write_jsonl(stem.with_suffix(".jsonl"), rows)
    stem.with_suffix(".json").write_text(json.dumps({"settings": key, "metrics": _metrics(rows, 0.0),
                                                     "weights_mtime": weights.stat().st_mtime}))
    assert evaluate.evaluate_stage(tmp_path, "sft", cfg, reward_model=None)[0] == rows  # as it was: reused
    with pytest.raises(AssertionError, match="reused"):  # another judge scores the replies again
        evaluate.evaluate_stage(tmp_path, "sft", cfg, reward_model=None, judge=R.LengthWindow(40, 150))
    edited = [{**p, "prompt": p["prompt"] + " Briefly."} for p in held]
    with monkeypatch.context() as m, pytest.raises(AssertionError, match="reused"):  # an edited test split
        m.setattr(evaluate, "heldout_prompts", lambda n=None, path=None: edited[:n])
        evaluate.evaluate_stage(tmp_path, "sft", cfg, reward_model=None)
    os.utime(weights, (weights.stat().st_atime, weights.stat().st_mtime - 60))  # older weights copied back
    with pytest.raises(AssertionError, match="reused"):
        evaluate.evaluate_stage(tmp_path, "sft", cfg, reward_model=None)


def test_rejection_sampling_script_picks_one_reply_per_prompt_and_counts_what_it_skips(load_script):
    script = load_script("scripts/rejection_sampling_sft.py")
    rows = [{"prompt": p, "response": t, "gold": g, "proxy": q, "has_eos": e} for p, t, g, q, e in [
        ("a", "a1", 0.2, 1.0, True), ("a", "a2", 0.8, 0.0, False),    # gold's best never ended
        ("b", "b1", 0.9, 0.0, True), ("b", "b2", 0.3, 2.0, True),
        ("c", "c1", 0.5, 0.0, False), ("c", "c2", 0.7, 1.0, False)]]  # nothing ended
    demos, report = script.pick_replies(rows, 2, "gold")
    assert [d["response"] for d in demos] == ["a2", "b1", "c2"]
    assert report == {"kept": 3, "skipped": 0, "picked_minus_mean_gold": pytest.approx((0.3 + 0.3 + 0.1) / 3)}
    demos, report = script.pick_replies(rows, 2, "gold", ended_only=True)
    assert [d["response"] for d in demos] == ["a1", "b1"] and report["skipped"] == 1
    assert report["picked_minus_mean_gold"] == pytest.approx((0.0 + 0.3) / 2)  # a1 is a's only candidate
    assert [d["response"] for d in script.pick_replies(rows, 2, "rm")[0]] == ["a1", "b2", "c2"]
    picked = [d["response"] for d in script.pick_replies(rows * 20, 2, "random", seed=1)[0]]
    assert {"a1", "a2"} <= set(picked) and picked == [d["response"] for d in
                                                     script.pick_replies(rows * 20, 2, "random", seed=1)[0]]
    with pytest.raises(ValueError, match="rows 1-2 hold more than one prompt"):
        script.pick_replies(rows[1:5], 2, "gold")
    with pytest.raises(ValueError, match="k=4"):
        script.pick_replies(rows, 4, "gold")
    with pytest.raises(ValueError, match="pick must be one of"):
        script.pick_replies(rows, 2, "best")


def test_rejection_sampling_script_pairs_the_judges_best_reply_with_its_worst_for_dpo(load_script):
    script = load_script("scripts/rejection_sampling_sft.py")
    rows = [{"prompt": p, "response": t, "gold": g, "proxy": q, "has_eos": e} for p, t, g, q, e in [
        ("a", "a1", 0.2, 1.0, True), ("a", "a2", 0.9, 0.5, False), ("a", "a3", 0.5, 0.0, True),
        ("b", "b1", 0.6, 0.0, True), ("b", "b2", 0.62, 2.0, True), ("b", "b3", 0.6, 1.0, False)]]  # b: gap 0.02
    pairs, report = script.pick_pairs(rows, 3, "gold")
    assert pairs == [{"prompt": "a", "chosen": "a2", "rejected": "a1"}]
    assert report == {"kept": 1, "skipped": 1, "chosen_minus_rejected_gold": pytest.approx(0.7),
                      "chosen_ended": 0, "rejected_ended": 1}
    pairs, report = script.pick_pairs(rows, 3, "gold", min_gap=0.0)
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("a2", "a1"), ("b2", "b1")]  # ties: the first is worst
    pairs, report = script.pick_pairs(rows, 3, "rm")  # the reward model's gaps, in its own units
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("a1", "a3"), ("b2", "b1")] and report["skipped"] == 0
    assert report["chosen_minus_rejected_gold"] == pytest.approx((-0.3 + 0.02) / 2)
    pairs, report = script.pick_pairs(rows * 10, 3, "random", min_gap=1.0)  # random pairs are never skipped
    assert report["kept"] == 20 and all(p["chosen"] != p["rejected"] for p in pairs)
    assert {p["chosen"] for p in pairs if p["prompt"] == "a"} == {"a1", "a2", "a3"}
    assert pairs == script.pick_pairs(rows * 10, 3, "random")[0]  # seeded
    with pytest.raises(ValueError, match="a pair needs k >= 2 replies per prompt, got k=1"):
        script.pick_pairs(rows[:3], 1, "gold")
    with pytest.raises(ValueError, match="rows 1-2 hold more than one prompt"):
        script.pick_pairs(rows[2:], 2, "gold")


def test_rejection_sampling_script_trains_dpo_on_the_pairs_with_objective_dpo(tmp_path, capsys, load_script):
    script = load_script("scripts/rejection_sampling_sft.py")
    rows = [{"prompt": p, "response": p + str(i), "gold": 0.3 * i, "proxy": 0.0, "has_eos": i == 1}
            for p in ("a", "b") for i in range(2)]
    trained = []
    script.sample = lambda run_dir, prompts, k, temperature: rows
    script.train = lambda *a: pytest.fail("--objective dpo must not fine-tune on single replies")

    def fake_dpo(run_dir, pairs_path, out, steps, learning_rate, beta, sft_weight, seed):
        trained.append(([json.loads(line) for line in pairs_path.read_text().splitlines()], out.name, steps, beta,
                        learning_rate, sft_weight, seed))
        return out / "dpo" / "adapter"

    script.train_dpo_pairs = fake_dpo
    script.evaluate = lambda run_dir, adapter: {
        "sft": {"gold_mean": 0.7, "eos_frac": 0.5}, "tuned": {"gold_mean": 0.75, "kl_mean": 7.5, "eos_frac": 0.9},
        "vs_sft": {"gain": 0.05, "gain_ci_low": -0.01, "gain_ci_high": 0.1}}
    args = ["--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "rs"), "--k", "2", "--objective", "dpo"]
    assert script.main(args + ["--steps", "64", "--beta", "0.2", "--learning-rate", "5e-4"]) == 0
    pairs, name, steps, beta, learning_rate, sft_weight, seed = trained[0]
    assert pairs == [{"prompt": p, "chosen": p + "1", "rejected": p + "0"} for p in ("a", "b")]
    assert (name, steps, beta, learning_rate, sft_weight, seed) == ("dpo-gold-64steps-lr0.0005-beta0.2", 64, 0.2,
                                                                     5e-4, 0.0, 0)
    text = capsys.readouterr().out
    assert "the chosen reply's gold is +0.300 over the rejected one's; 2 chosen and 0 rejected replies ended" in text
    assert "| dpo-gold-64steps-lr0.0005-beta0.2 | 2 | +0.300 | 0.750 | +0.050 [-0.010, +0.100] | 7.50 | 0.90 |" in text
    assert script.main(args + ["--sft-weight", "1", "--seed", "2"]) == 0  # RPO, another seed
    assert trained[1][1:] == ("dpo-gold-sft1-seed2", 30, 0.1, 3e-4, 1.0, 2)
    with pytest.raises(SystemExit, match="--sft-weight adds to the DPO loss; it needs --objective dpo"):
        script.main(args[:-2] + ["--sft-weight", "1"])
    with pytest.raises(SystemExit, match="--sft-weight must be >= 0"):
        script.main(args + ["--sft-weight", "-1"])
    with pytest.raises(SystemExit, match="no prompt has a pair to train on: lower --min-gap"):
        script.main(args + ["--min-gap", "0.5"])
    with pytest.raises(SystemExit, match="--ended-only .* does not apply to --objective dpo"):
        script.main(args + ["--ended-only"])


def test_rejection_sampling_script_reuses_its_samples_only_with_the_same_settings(tmp_path, capsys, load_script):
    script = load_script("scripts/rejection_sampling_sft.py")
    calls = []
    rows = [{"prompt": p, "response": p + str(i), "gold": 0.1 * i, "proxy": 0.0, "has_eos": i == 1}
            for p in ("a", "b") for i in range(2)]

    def fake_sample(run_dir, prompts, k, temperature):
        calls.append((k, temperature))
        return rows

    def fake_train(run_dir, demos_path, out, steps, learning_rate, seed):
        assert [json.loads(line)["response"] for line in demos_path.read_text().splitlines()] == ["a1", "b1"]
        return out / "adapter"

    script.sample, script.train = fake_sample, fake_train
    script.evaluate = lambda run_dir, adapter: {
        "sft": {"gold_mean": 0.7, "eos_frac": 0.5}, "tuned": {"gold_mean": 0.6, "kl_mean": 3.0, "eos_frac": 0.6},
        "vs_sft": {"gain": -0.1, "gain_ci_low": -0.2, "gain_ci_high": 0.0}}
    run, out = tmp_path / "run", tmp_path / "rs"
    args = ["--run-dir", str(run), "--out", str(out), "--k", "2", "--ended-only"]
    assert script.main(args) == 0 and script.main(args + ["--steps", "60"]) == 0
    assert calls == [(2, 0.7)]  # sampled once, then reused
    text = capsys.readouterr().out
    assert "| gold-ended | 2 | +0.000 | 0.600 | -0.100 [-0.200, +0.000] | 3.00 | 0.60 |" in text
    assert (out / "gold-ended" / "demonstrations.jsonl").exists() and (out / "gold-ended-60steps").is_dir()
    with pytest.raises(SystemExit, match=r"samples\.jsonl was sampled with other settings.*delete both files"):
        script.main(["--run-dir", str(run), "--out", str(out), "--k", "4"])
    with pytest.raises(SystemExit, match=r"samples\.jsonl was sampled with other settings"):
        script.main(args + ["--sample-temperature", "1.0"])
    seen = []

    def fake_in_sample(run_dir, adapter, rows_, temperature):
        seen.append((rows_ == rows, temperature))
        return {"tuned": {"gold_mean": 0.55}, "vs_sft": {"n": 2, "gain": -0.05, "gain_ci_low": -0.1, "gain_ci_high": 0.0}}

    script.in_sample = fake_in_sample
    hot = ["--run-dir", str(run), "--out", str(tmp_path / "hot"), "--k", "2", "--ended-only", "--sample-temperature",
           "1.0", "--in-sample"]
    assert script.main(hot) == 0 and calls[-1] == (2, 1.0) and seen == [(True, 1.0)]
    assert json.loads((tmp_path / "hot" / "samples.json").read_text())["temperature"] == 1.0
    assert "on its 2 training prompts, at temperature 1: gold 0.550, -0.050 [-0.100, +0.000]" in capsys.readouterr().out
    rows[1]["has_eos"] = rows[3]["has_eos"] = False
    with pytest.raises(SystemExit, match="no prompt has a reply to train on"):
        script.main(["--run-dir", str(run), "--out", str(tmp_path / "none_ended"), "--k", "2", "--ended-only"])


def test_heldout_prompts_say_when_more_are_asked_for_than_the_test_split_holds(capsys):
    from rlhf_helpers import evaluate

    every = evaluate.heldout_prompts()
    assert evaluate.heldout_prompts(len(every) + 28) == every and len({p["id"] for p in every}) == len(every)
    assert f"{len(every) + 28} held-out prompts asked for; the test split has {len(every)}" in capsys.readouterr().out
    assert len(evaluate.heldout_prompts(5)) == 5 and "note" not in capsys.readouterr().out


# --- what the report and the results check refuse ----------------------------------------------------------

@pytest.mark.parametrize("tag", [
    '<script src="https://cdn.plot.ly/plotly-2.35.2.min.js"></script>',
    "<link href=//fonts.example/css rel=stylesheet>",
    "<img src='http://example.org/y.png'>",
    '<SCRIPT type="text/javascript" SRC = "https://example.org/y.js">',
    '<iframe width="5" src="https://example.org/">',
    '<img srcset="https://example.org/y.png 2x">',
    '<object data="https://example.org/y.svg"></object>',
    '<style>@import url("https://fonts.googleapis.com/css?family=Inter");</style>',
    "<style>@import 'https://example.org/a.css';</style>",
    "<style>body{color:#222}figure{background:url(//example.org/bg.png)}</style>",
])
def test_network_references_finds_tags_and_css_that_fetch(tag):
    page = f"<!doctype html><html><head><meta charset='utf-8'></head><body><p>x</p>{tag}</body></html>"
    assert len(network_references(page)) == 1, tag


@pytest.mark.parametrize("tag", [
    '<img src="data:image/png;base64,iVBORw0KGgo=">',
    '<a href="https://plotly.com">made with plotly</a>',
    '<script>var u = "https://cdn.plot.ly/x.js"; el.src = "//example.org/y.js";</script>',
    "<p>&lt;script src=&quot;https://example.org/y.js&quot;&gt; url(https://example.org) @import</p>",
    "<style>body{font-family:sans-serif}</style><pre>url(https://example.org/a.png)</pre>",
    '<link rel="icon" href="#"><img src="figure.png">',
])
def test_network_references_leave_offline_pages_alone(tag):
    assert network_references(f"<html><body>{tag}</body></html>") == []


OFFLINE_PAGE = "<!doctype html><html><head><script>/* Plotly, inlined */</script></head><body></body></html>"


def _offline_report(run: Path) -> Path:
    """A report.html that passes report_offline, for checks that are not about the report (build_report is slower)."""
    path = run / "eval" / "report.html"
    path.write_text(OFFLINE_PAGE)
    return path


def test_report_that_would_fetch_from_the_network_is_refused_and_not_written(tmp_path):
    class CdnFigure:  # a figure whose HTML reaches for plotly.js on a CDN
        def to_html(self, **kw):
            return '<script src="https://cdn.plot.ly/plotly-2.35.2.min.js"></script><div id="f"></div>'

    run = make_fake_run(tmp_path / "run")
    with pytest.raises(RuntimeError, match=r"would fetch from the network: \['<script src=\"https://cdn\.plot\.ly"):
        build_report(run, figures={"a figure": CdnFigure()})
    assert not (run / "eval" / "report.html").exists()
    assert not list((run / "eval").glob(".report.html*"))


def test_check_results_fails_a_report_with_a_network_reference(tmp_path, capsys):
    run = make_fake_run(tmp_path / "run")
    report = _offline_report(run)
    assert check_results.main([str(run)]) == 0
    capsys.readouterr()
    cdn = '<script src="https://cdn.plot.ly/plotly-2.35.2.min.js"></script>'
    report.write_text(OFFLINE_PAGE.replace("</head>", cdn + "</head>", 1))
    assert check_results.main([str(run)]) == 1
    out = capsys.readouterr().out
    assert re.search(r"FAIL\s+report_offline\s+\S*report\.html: network references \[.*cdn\.plot\.ly", out), out
    assert "; failed: report_offline\n" in out


@pytest.mark.parametrize("base_gold, shown", [(0.6, "SFT wins 0.00 [0.00, 0.00]"),
                                              (0.5, "SFT wins 0.50 [0.50, 0.50]")])  # a tie is not a win
def test_check_results_fails_an_sft_that_does_not_beat_base(tmp_path, capsys, base_gold, shown):
    run = make_fake_run(tmp_path / "run", gold={"base": base_gold})
    _offline_report(run)
    assert check_results.main([str(run)]) == 1
    out = capsys.readouterr().out
    assert re.search(rf"FAIL\s+sft_beats_base\s+{re.escape(shown)} against base on 8 prompts \(needs > 0\.5", out), out
    assert "; failed: sft_beats_base\n" in out  # the one check that failed


@pytest.mark.parametrize("text, why", [("[1, 2]", "expected a JSON object, got list"), ("{oops", "Expecting")])
def test_check_results_fails_an_unreadable_stage_summary_naming_it(tmp_path, capsys, text, why):
    run = make_fake_run(tmp_path / "run")
    _offline_report(run)
    (run / "ppo" / "summary.json").write_text(text)
    assert check_results.main([str(run), "--profile", "smoke"]) == 1
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "stage_summaries_readable" in x)
    assert re.match(r"\s*FAIL\s+stage_summaries_readable\s+\d+ stage summaries read; unreadable: \{'ppo': ", line), line
    assert str(run / "ppo" / "summary.json") in line and why in line
    assert "PASS  metrics_readable" in out


def test_check_results_fails_a_corrupt_metrics_file_naming_its_line(tmp_path, capsys):
    run = make_fake_run(tmp_path / "run")
    _offline_report(run)
    path = run / "sft" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], '{"step": 2, "train/lo', *lines[2:]]) + "\n")
    assert check_results.main([str(run), "--profile", "smoke"]) == 1
    out = capsys.readouterr().out
    assert re.search(rf"FAIL\s+metrics_readable\s+{re.escape(str(path))}:2: not valid JSON", out), out
    assert re.search(r"PASS\s+stage_summaries_readable\b", out)


@pytest.mark.parametrize("corrupt, message", [
    (lambda d: "{oops", r"not valid JSON \(Expecting"),
    (lambda d: [d], r"expected a JSON object, got list"),
    (lambda d: {**d, "policies": []}, r"field 'policies' must be a non-empty list"),
    (lambda d: {**d, "policies": {"sft": {}}}, r"field 'policies' must be a non-empty list"),
    (lambda d: {**d, "policies": [d["policies"][0], {k: v for k, v in d["policies"][1].items() if k != "kl"}]},
     r"policies\[1\] lacks \['kl'\]"),
    (lambda d: {**d, "policies": [d["policies"][0], "sft"]}, r"policies\[1\] lacks \['policy', 'gold'"),
    (lambda d: {**d, "policies": [d["policies"][0], {**d["policies"][1], "gold": "x"}]},
     r"policies\[1\] \(sft\) has gold='x', not a number"),
    (lambda d: {**d, "policies": [d["policies"][0], {**d["policies"][1], "gold": None}]},
     r"policies\[1\] \(sft\) has gold=None, not a number"),
], ids=["not-json", "not-an-object", "no-policies", "policies-not-a-list", "row-lacks-kl", "row-not-an-object",
        "gold-a-string", "gold-null"])
def test_read_eval_summary_names_the_file_and_what_is_wrong(tmp_path, corrupt, message):
    run = make_fake_run(tmp_path / "run", policies=("base", "sft"))
    path = run / "eval" / "summary.json"
    data = corrupt(json.loads(path.read_text()))
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": " + message):
        read_eval_summary(run)


def test_check_results_exit_2_for_an_unreadable_summary_naming_it(tmp_path, capsys):
    run = make_fake_run(tmp_path / "run")
    (run / "eval" / "summary.json").write_text("{oops")
    assert check_results.main([str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run / 'eval' / 'summary.json'}: not valid JSON") and "Traceback" not in err


def test_the_kl_standard_error_takes_the_prompt_as_its_unit():
    from rlhf_helpers.evaluate import prompt_sem

    # two prompts, four replies each, alike within a prompt: 2 independent values, not 8
    rows = [{"prompt": p, "kl": k} for p, k in [("a", 1.0)] * 4 + [("b", 3.0)] * 4]
    assert prompt_sem(rows) == pytest.approx(1.0)  # sd of (1, 3) over sqrt(2); the 8 rows' own would be 0.38
    assert prompt_sem([{"prompt": "a", "kl": 1.0}, {"prompt": "b", "kl": None}]) is None  # one prompt with a KL
    one_each = [{"prompt": str(i), "kl": float(i)} for i in range(5)]
    assert prompt_sem(one_each) == pytest.approx(np.std(range(5), ddof=1) / np.sqrt(5))


def test_a_change_over_few_steps_is_read_against_students_t_not_two_standard_errors():
    from rlhf_helpers.evaluate import _change

    few = {"first_half": 0.0, "second_half": 0.25, "change": 0.25, "change_se": 0.1, "steps_per_half": 3}
    assert "within 2.8 standard errors of no change" in _change(few, "score")  # t(0.975, 4 df) = 2.776
    many = {**few, "steps_per_half": 50}
    assert "standard errors of no change" not in _change(many, "score")  # t(98 df) = 1.98 < 2.5
    assert _change({**few, "change_se": None}, "score").endswith("too few steps a half for a standard error")
