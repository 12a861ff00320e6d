"""Every notebook in notebooks/ runs under papermill with profile="smoke" and writes its summary.json.

Notebooks run in order into one shared run folder, as `make run` does, so later notebooks see earlier
artifacts. A notebook with no entry in CHECKS must still write at least one `<stage>/summary.json`.
"""
import dataclasses
import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest

from rlhf_helpers.run import discover_notebooks, execute_notebook

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = discover_notebooks(ROOT / "notebooks")
STANDARD = {"run_dir", "profile", "seed"}


EXACT = dict(rel=1e-9, abs=1e-12)
"""pytest.approx tolerance for a figure recomputed, in float64, from the files it was computed from."""
F32 = dict(rel=1e-5, abs=1e-5)
"""... and for one computed from float32 tensors (PPO's and TRL's metrics)."""


def _read(run_dir: Path, stage: str, name: str = "summary.json"):
    return json.loads((run_dir / stage / name).read_text())


def _nonempty(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0, f"{path} is missing or empty"


@functools.lru_cache(maxsize=None)
def _fingerprint(folder: str) -> str:
    from rlhf_helpers.tracking import fingerprint

    return fingerprint(folder)


def _starts_from_run_sft(run_dir: Path, stage: str, key: str = "policy_sha256") -> None:
    """`stage`'s config.json fingerprints the model it started from: it must be this run's SFT model (catches a
    stage that fell back to the base model, or loaded another run's SFT model)."""
    assert _read(run_dir, stage, "config.json")[key] == _fingerprint(str(run_dir / "sft" / "model")), stage


def _run_reward_model_sha(run_dir: Path) -> str:
    """The fingerprint an RL stage records of its reward (`rewards.reward_identity`) when that reward is the
    reward model notebook 03 saved in run_dir, with the normalisation saved beside it."""
    from rlhf_helpers.reward_model import RewardModel
    from rlhf_helpers.rewards import reward_identity
    from rlhf_helpers.tracking import fingerprint

    norm = json.loads((run_dir / "rm" / "model" / "normalization.json").read_text())
    rm = RewardModel(None, None, norm["shift"], norm["scale"])  # its identity needs no weights loaded
    rm.weights_sha256 = _fingerprint(str(run_dir / "rm" / "model"))
    return fingerprint(reward_identity(rm))


def _check_adapter(run_dir: Path, stage: str) -> None:
    """A LoRA adapter saved whole, on this run's SFT model (not the base model)."""
    from rlhf_helpers.policies import adapter_base

    _nonempty(run_dir / stage / "adapter" / "adapter_model.safetensors")
    assert adapter_base(run_dir / stage / "adapter") == str(run_dir / "sft" / "model"), stage


def _split(run_dir: Path, cfg: dict):
    """The train and held-out pairs that a stage with config `cfg` (its config.json) takes from notebook 03's
    pairs.jsonl."""
    from rlhf_helpers.preferences import read_pairs
    from rlhf_helpers.reward_model import split_pairs

    pairs = read_pairs(run_dir / "preferences" / "pairs.jsonl")
    return split_pairs(pairs, cfg["eval_fraction"], cfg["seed"], cfg["n_train"], cfg["n_eval"])


def _check_win_record(w: dict, n: int) -> None:
    """A `win_rate` dict: its prompts add up to n, the rate is (wins + ties/2)/n (catches a rate that counts ties
    as losses, or was computed on other prompts), and each interval holds its point estimate."""
    assert w["wins"] + w["ties"] + w["losses"] == w["n"] == n, w
    assert w["win_rate"] == pytest.approx((w["wins"] + w["ties"] / 2) / n, **EXACT), w
    assert w["ci_low"] <= w["win_rate"] <= w["ci_high"] and w["gain_ci_low"] <= w["gain"] <= w["gain_ci_high"], w


def _eval_rows(run_dir: Path, metrics: dict) -> list[dict]:
    return [json.loads(line) for line in (run_dir / metrics["rows_file"]).read_text().splitlines() if line.strip()]


def _mean(rows: list[dict], key: str) -> float:
    return float(np.mean([r[key] for r in rows]))


def _check_eval_metrics(run_dir: Path, m: dict, n: int) -> list[dict]:
    """`evaluate_stage` metrics against the replies they were computed from (eval/policies/*.jsonl): n replies,
    and the mean gold, proxy and KL of those rows (catches a summary whose figures are not its rows')."""
    rows = _eval_rows(run_dir, m)
    assert len(rows) == m["n"] == m["prompts"] * m["samples_per_prompt"] == n, m
    assert m["gold_mean"] == pytest.approx(_mean(rows, "gold"), **EXACT)
    assert m["proxy_mean"] == pytest.approx(_mean(rows, "proxy"), **EXACT)
    assert m["kl_mean"] == pytest.approx(_mean(rows, "kl"), **EXACT)
    return rows


def _check_results_row(run_dir: Path, row: dict, ref_rows: list[dict], n: int, seed: int) -> None:
    """A row of `evaluate.results_table` against its cached replies and the reference's: count, means, refusal
    counts, and the win rate and gain recomputed from the two sets of replies (same bootstrap seed)."""
    from rlhf_helpers.evaluate import paired_win_rate

    rows = _eval_rows(run_dir, row)
    assert len(rows) == row["n"] == n and row["prompts"] == len({r["prompt"] for r in rows}), row["policy"]
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in ref_rows]  # paired: the same prompts, in order
    for key, metric in (("gold", "gold"), ("proxy", "proxy"), ("kl", "kl"), ("length", "n_tokens")):
        assert row[key] == pytest.approx(_mean(rows, metric), **EXACT), (row["policy"], key)
    assert row["harmful_replies"] + row["benign_replies"] == n
    assert row["refused_harmful"] <= row["harmful_replies"] and row["refused_benign"] <= row["benign_replies"]
    if row["win_rate"] is not None:
        win = paired_win_rate(rows, ref_rows, seed=seed)
        figures = {k: row[k] for k in win if k != "n"}
        assert figures == pytest.approx({k: v for k, v in win.items() if k != "n"}, **EXACT), row["policy"]
        _check_win_record({**win, **figures}, row["prompts"])


def _check_online_stage(run_dir: Path, stage: str) -> tuple[dict, dict, list[dict]]:
    """What PPO, GRPO and RLOO share: every step logged, the summary's figures from those rows, the score a step
    optimised against the reward model's, a first step at KL 0, this run's SFT model, prompts and reward model,
    and training samples whose gold is the gold judge's of the sample. Returns (summary, config, rows)."""
    from rlhf_helpers.data import train_prompts
    from rlhf_helpers.gold import GoldJudge
    from rlhf_helpers.rewards import Trajectory
    from rlhf_helpers.tracking import RISE_KEYS, fingerprint, read_metrics, rise_halves

    s, cfg = _read(run_dir, stage), _read(run_dir, stage, "config.json")
    rows = [r for r in read_metrics(run_dir / stage / "metrics.jsonl") if "objective/scores" in r]
    # the stage ran every step it was configured for (catches a run cut short, or one resumed from elsewhere)
    assert s["steps"] == cfg["max_steps"] == rows[-1]["step"], stage
    # first and last figures are the first and last rows (catches a summary taken from other rows or another run)
    for name, key in (("scores", "objective/scores"), ("gold", "objective/gold"), ("kl", "objective/kl")):
        assert (name == "kl" or s[f"{name}_first"] == rows[0][key]) and s[f"{name}_last"] == rows[-1][key], name
    assert {k: s[k] for k in RISE_KEYS} == rise_halves(rows)
    # a fresh LoRA adapter is zero, so the first rollout samples from π = π_ref: its KL is 0 (catches a policy
    # that does not start from its reference, or a KL measured against another model)
    assert abs(rows[0]["objective/kl"]) <= 1e-6, rows[0]
    for r in rows:
        # the optimised score is the reward model's less the missing-EOS penalty on the replies that did not end
        # (catches a penalty not applied, applied to every reply, or raw scores logged from another batch)
        missing = 1 - r["response/eos_frac"]
        assert r["objective/scores"] == pytest.approx(r["objective/raw_scores"] - cfg["missing_eos_penalty"] * missing,
                                                      **F32), r
        assert r["objective/rlhf_reward"] == pytest.approx(
            r["objective/scores"] - r["objective/kl_coef"] * r["objective/kl"], **F32), r
    # it trained from this run's SFT model, on the training prompts, against this run's reward model
    assert s["policy_path"] == str(run_dir / "sft" / "model")
    _starts_from_run_sft(run_dir, stage)
    assert cfg["reward_sha256"] == _run_reward_model_sha(run_dir), f"{stage} optimised another reward"
    assert cfg["data_sha256"] == fingerprint(train_prompts()[: cfg.get("n_prompts")])
    _check_adapter(run_dir, stage)
    # the training samples it wrote: from its own steps, step 1 included, each with the gold judge's reward
    samples = [json.loads(line) for line in (run_dir / stage / "samples.jsonl").read_text().splitlines()]
    assert len([r for r in samples if r["step"] == 1]) == cfg["n_samples"], stage
    assert {r["step"] for r in samples} <= set(range(1, s["steps"] + 1)), stage
    gold = GoldJudge()
    for r in samples:  # catches a reply logged beside another reply's gold (PPO's is float32)
        assert r["gold"] == pytest.approx(gold(Trajectory(r["prompt"], r["response"])).reward, **F32), r
    return s, cfg, rows


def check_concepts(run_dir: Path) -> None:
    import torch

    from rlhf_helpers.concepts import (ConceptsConfig, fit_bradley_terry, kl_divergence, kl_optimal_policy,
                                       make_bandit, sample_bt_preferences, total_variation)
    from rlhf_helpers.config import stage_config
    from rlhf_helpers.seeding import make_generator
    from rlhf_helpers.tracking import read_metrics

    s = _read(run_dir, "concepts")
    assert s["profile"] == "smoke"
    assert s["ppo_tv_to_optimum"] < 0.1, s
    assert s["dpo_tv_to_optimum"] < 0.1, s
    assert s["bt_fit_max_abs_error"] < 0.5, s
    cfg = ConceptsConfig(**_read(run_dir, "concepts", "config.json"))
    assert cfg == stage_config(ConceptsConfig, "smoke", seed=0)  # the profile's settings were the ones used
    assert s["n_iters"] == cfg.n_iters and s["beta"] == cfg.beta
    # π_ref and π* are those of the saved config's bandit, π* in closed form (catches another bandit, or π*
    # computed with another β)
    pi = {k: torch.tensor(s[k], dtype=torch.float64) for k in ("pi_ref", "pi_star", "pi_ppo", "pi_dpo")}
    pi_ref, r = make_bandit(cfg)
    assert torch.allclose(pi["pi_ref"], pi_ref, rtol=0, atol=1e-12)
    assert torch.allclose(pi["pi_star"], kl_optimal_policy(pi_ref, r, cfg.beta), rtol=0, atol=1e-12)
    assert all(abs(p.sum().item() - 1) < 1e-12 for p in pi.values())  # distributions
    # each distance is the one between the policies the summary holds (catches distances of other policies)
    for m in ("ppo", "dpo"):
        assert s[f"{m}_tv_to_optimum"] == pytest.approx(total_variation(pi[f"pi_{m}"], pi["pi_star"]).item(), **EXACT)
        assert s[f"{m}_kl_to_optimum"] == pytest.approx(kl_divergence(pi[f"pi_{m}"], pi["pi_star"]).item(), **EXACT)
    # the Bradley–Terry error is that of the notebook's fit, redone from the config (catches a reported error of
    # something other than the fit, or a fit to other preferences)
    r_true = torch.linspace(-2.0, 2.0, cfg.bt_items, dtype=torch.float64)
    chosen, rejected = sample_bt_preferences(r_true, cfg.bt_pairs, make_generator(cfg.seed))
    r_fit, _ = fit_bradley_terry(chosen, rejected, cfg.bt_items, cfg.bt_newton_steps)
    assert s["bt_fit_max_abs_error"] == pytest.approx((r_fit - r_true).abs().max().item(), **EXACT)
    rows = read_metrics(run_dir / "concepts" / "metrics.jsonl")
    # one row every log_every iterations and one at the last (catches loops cut short)
    assert [row["step"] for row in rows] == sorted({*range(0, cfg.n_iters, cfg.log_every), cfg.n_iters - 1})
    # the summary's distances are the last row's: the final policies (catches a summary of an earlier iterate)
    for m in ("ppo", "dpo"):
        assert rows[-1][f"{m}/tv_to_optimum"] == pytest.approx(s[f"{m}_tv_to_optimum"], **EXACT)
    for row in rows:  # J(π) = E[r] − β·KL(π‖π_ref), exactly, on every row
        assert row["objective/rlhf_reward"] == pytest.approx(row["objective/scores"] - cfg.beta * row["objective/kl"],
                                                             **EXACT)
    # DPO's first batch is scored at π = π_ref (logits start at log π_ref): margin 0, loss log 2
    assert rows[0]["rewards/margins"] == 0.0 and rows[0]["loss/dpo"] == pytest.approx(math.log(2), **EXACT)
    # both learning rates decay linearly from the peak to lr_final_frac of it
    assert rows[0]["ppo/lr"] == cfg.ppo_lr and rows[0]["dpo/lr"] == cfg.dpo_lr
    assert rows[-1]["ppo/lr"] == pytest.approx(cfg.ppo_lr * cfg.lr_final_frac, **EXACT)


def check_rewards(run_dir: Path) -> None:
    from rlhf_helpers.gold import GoldJudge, bayes_ceiling
    from rlhf_helpers.reward_tuner import (GAMING_KINDS, candidate_pairs, load_candidates, rankable, score_table,
                                           spearman, top_quarter_share)
    from rlhf_helpers.rewards import QualityReward, load_reward_config
    from rlhf_helpers.run import notebook_parameters

    s = json.loads((run_dir / "rewards" / "summary.json").read_text())
    path = run_dir / "rewards" / "reward_config.json"
    reward = load_reward_config(path)  # round-trips into a reward
    assert set(reward.weights) == set(s["weights"])
    assert s["gold_mean_good"] > s["gold_mean_gaming"] + 0.3, s  # the gold judge is not gamed
    assert s["naive_gaming_top_share"] > s["gold_gaming_top_share"], s  # the naive reward is
    assert 0.5 < s["bayes_ceiling"] <= 1.0
    assert s["searched_spearman_with_gold"] > s["tuned_spearman_with_gold"], s  # the search beats the defaults
    # the config saved is the one the summary names, with the weights of the notebook's parameters cell (the test
    # passes none): catches a tuner built with other weights, or a config saved from other weights
    assert Path(s["reward_config"]) == path
    params = notebook_parameters(ROOT / "notebooks" / "01_reward_design.ipynb")
    assert reward.weights == s["weights"] == {k[2:]: float(p["default"]) for k, p in params.items() if k[:2] == "w_"}
    # the search's weights are a point of its grid, not all zero
    assert set(s["searched_weights"].values()) <= {0.0, 0.25, 0.5, 1.0} and any(s["searched_weights"].values())
    # every figure recomputed from the shipped candidates and the saved config (catches figures of another
    # mix, another candidate set, or the search's vectorised Spearman parting from the tuner's)
    candidates, gold = load_candidates(), GoldJudge()
    scorers = {"naive": QualityReward(), "tuned": reward, "searched": reward.with_weights(s["searched_weights"]),
               "gold": gold}
    table = score_table(candidates, scorers)
    gaming = table["kind"].isin(GAMING_KINDS)
    prompts, a, b = candidate_pairs(candidates)
    assert s["n_candidates"] == len(candidates) and s["n_pairs"] == len(prompts)
    for name in ("tuned", "searched"):
        assert s[f"{name}_spearman_with_gold"] == pytest.approx(spearman(rankable(table[name]), table["gold"]), **EXACT)
    assert s["gold_mean_good"] == pytest.approx(table.loc[table["kind"] == "good", "gold"].mean(), **EXACT)
    assert s["gold_mean_gaming"] == pytest.approx(table.loc[gaming, "gold"].mean(), **EXACT)
    assert s["naive_mean_gaming"] == pytest.approx(table.loc[gaming, "naive"].mean(), **EXACT)
    for name in ("naive", "gold"):
        share = top_quarter_share(table[name].to_numpy(), gaming.to_numpy())
        assert s[f"{name}_gaming_top_share"] == pytest.approx(float(share), **EXACT)
    # the ceiling is the annotator temperature's entry of the sweep, and the gold judge's on the candidate pairs;
    # a noisier annotator never has a higher ceiling (each pair's max(p, 1 − p) falls as T rises)
    by_t = s["bayes_ceiling_by_temperature"]
    assert s["bayes_ceiling"] == by_t[str(s["annotator_temperature"])]
    assert s["bayes_ceiling"] == pytest.approx(
        bayes_ceiling(gold.score(prompts, a), gold.score(prompts, b), s["annotator_temperature"]), **EXACT)
    ceilings = [by_t[t] for t in sorted(by_t, key=float)]
    assert all(x >= y for x, y in zip(ceilings, ceilings[1:])), by_t


def check_sft(run_dir: Path) -> None:
    from rlhf_helpers.evaluate import heldout_prompts
    from rlhf_helpers.policies import adapter_base
    from rlhf_helpers.tracking import read_metrics

    s = json.loads((run_dir / "sft" / "summary.json").read_text())
    assert s["steps"] >= 1 and s["eval_loss_after"] > 0
    assert (run_dir / "sft" / "adapter" / "adapter_config.json").exists()
    assert (run_dir / "sft" / "model" / "config.json").exists()
    assert 0.0 <= s["win_rate_vs_base"]["win_rate"] <= 1.0 and s["n_compare"] >= 1
    cfg = _read(run_dir, "sft", "config.json")
    rows = read_metrics(run_dir / "sft" / "metrics.jsonl")
    train, evals = [r for r in rows if "train/loss" in r], [r for r in rows if "eval/loss" in r]
    # every configured step ran and was logged (catches training cut short)
    assert s["steps"] == cfg["max_steps"] == max(r["step"] for r in rows)
    assert [r["step"] for r in train] == sorted({1, *range(cfg["logging_steps"], s["steps"] + 1, cfg["logging_steps"])})
    # the summary's losses are the logged ones: held-out loss before training (step 0) and at the end
    assert s["train_loss_first"] == train[0]["train/loss"] and s["train_loss_last"] == train[-1]["train/loss"]
    assert evals[0]["step"] == 0 and s["eval_loss_before"] == evals[0]["eval/loss"]
    assert evals[-1]["step"] == s["steps"] and s["eval_loss_after"] == evals[-1]["eval/loss"]
    assert s["train_tokens"] == max(r.get("train/num_tokens", 0) for r in rows) > 0
    assert s["train_examples"] == cfg["n_train"] and s["eval_examples"] == cfg["n_eval"]  # the profile's data
    # the policy the later stages load, saved whole: the merged model, and the adapter on the named base model
    assert s["model_dir"] == str(run_dir / "sft" / "model") and s["adapter_dir"] == str(run_dir / "sft" / "adapter")
    _nonempty(run_dir / "sft" / "model" / "model.safetensors")
    _nonempty(run_dir / "sft" / "adapter" / "adapter_model.safetensors")
    assert adapter_base(run_dir / "sft" / "adapter") == s["base_path"] and s["use_lora"] is True
    assert 0 < s["parameters"]["trainable"] < s["parameters"]["total"]  # LoRA trains a part of the weights
    # base against SFT on n_compare prompts: the counts add up, and with one reply per prompt the mean paired gain
    # is the difference of the two means (catches a win rate and gains computed on different replies)
    wr = s["win_rate_vs_base"]
    assert s["n_compare"] == cfg["n_compare"]
    _check_win_record(wr, s["n_compare"])
    assert wr["gain"] == pytest.approx(s["gold_sft_mean"] - s["gold_base_mean"], **EXACT)
    # refusals: n_refusal_samples replies to each held-out harmful prompt, and rates that are counts over them
    harmful = [p for p in heldout_prompts() if p["domain"] == "refusal"]
    assert s["refusals_n"] == cfg["n_refusal_samples"] * len(harmful) > 0
    for key in ("refusal_rate_base", "refusal_rate_sft"):
        refused = s[key] * s["refusals_n"]
        assert 0 <= s[key] <= 1 and refused == pytest.approx(round(refused), abs=1e-9), (key, s[key])


def check_rm(run_dir: Path) -> None:
    from rlhf_helpers.gold import GoldJudge, pair_ceiling
    from rlhf_helpers.preferences import live_train_prompts, read_pairs
    from rlhf_helpers.rewards import Trajectory
    from rlhf_helpers.tracking import fingerprint, read_metrics

    s = json.loads((run_dir / "rm" / "summary.json").read_text())
    cfg = _read(run_dir, "rm", "config.json")
    assert s["steps"] >= 1 and 0.0 <= s["eval_accuracy"] <= 1.0 and 0.5 <= s["bayes_ceiling"] <= 1.0
    assert s["normalization"]["scale"] > 0 and s["normalization"]["n"] == cfg["n_fresh"] * s["fresh_samples_per_prompt"]
    assert [r["n"] for r in s["best_of_n"]] == list(range(1, s["fresh_samples_per_prompt"] + 1))
    assert (run_dir / "rm" / "model" / "normalization.json").exists()
    pairs = read_pairs(run_dir / "preferences" / "pairs.jsonl")  # validates, and carries provenance
    assert len(pairs) == s["n_pairs"] and all("policy" in p.metadata for p in pairs)
    # the reward model's backbone and the live samples are this run's SFT model (catches the base-model fallback)
    assert s["policy"] == s["backbone"] == str(run_dir / "sft" / "model") and s["fell_back_to_base"] is False
    _starts_from_run_sft(run_dir, "rm", "backbone_sha256")
    assert s["steps"] == cfg["max_steps"] == max(r["step"] for r in read_metrics(run_dir / "rm" / "metrics.jsonl"))
    _nonempty(run_dir / "rm" / "model" / "adapter_model.safetensors")
    # pairs: the live ones first, one per live prompt (less those skipped), replacing the snapshot's on those prompts
    live = [p for p in pairs if p.metadata["source"] == "live"]
    live_prompts = set(live_train_prompts(cfg["n_live_prompts"]))
    assert s["n_pairs"] == s["n_live_pairs"] + s["n_snapshot_pairs"] and len(live) == s["n_live_pairs"]
    assert pairs[: len(live)] == live and {p.prompt for p in live} <= live_prompts
    assert not any(p.prompt in live_prompts for p in pairs[len(live):])
    assert len(live) + sum(s["skipped_live"].values()) == len(live_prompts) * (len(cfg["sample_temperatures"]) // 2)
    # each live label: both gold rewards are the gold judge's, and P(chosen) = σ((g_c − g_r)/T) (catches labels of
    # other replies, swapped sides, or another temperature)
    gold = GoldJudge()
    for p in live:
        m = p.metadata
        assert m["policy"] == "sft" and m["annotator_temperature"] == s["annotator_temperature"]
        assert m["gold_chosen"] == pytest.approx(gold(Trajectory(p.prompt, p.chosen)).reward, **EXACT)
        assert m["gold_rejected"] == pytest.approx(gold(Trajectory(p.prompt, p.rejected)).reward, **EXACT)
        margin = (m["gold_chosen"] - m["gold_rejected"]) / m["annotator_temperature"]
        assert m["p_chosen"] == pytest.approx(1 / (1 + math.exp(-margin)), **EXACT)
    # the split: the reward model trained on exactly the training side of pairs.jsonl, split by prompt, and the
    # ceiling is that of the held-out side (catches training on held-out pairs, or a ceiling of other pairs)
    train, held = _split(run_dir, cfg)
    assert cfg["data_sha256"] == fingerprint(list(train))
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    assert s["train_pairs"] + s["dropped_too_long"]["train"] == len(train)
    assert s["eval_pairs"] + s["dropped_too_long"]["eval"] == len(held)
    assert s["bayes_ceiling"] == pytest.approx(pair_ceiling(held), **EXACT)
    assert s["eval_prompts"] == len({p.prompt for p in held})
    # accuracy is a count over the held-out pairs, inside its interval; gap_closed is (acc − 0.5)/(ceiling − 0.5)
    hits, (low, high) = s["eval_accuracy"] * len(held), s["eval_accuracy_ci"]
    assert hits == pytest.approx(round(hits), abs=1e-9) and low <= s["eval_accuracy"] <= high
    span = s["bayes_ceiling"] - 0.5
    assert s["gap_closed"] == pytest.approx((s["eval_accuracy"] - 0.5) / span, **EXACT)
    assert s["gap_closed_ci"] == pytest.approx([(low - 0.5) / span, (high - 0.5) / span], **EXACT)
    # the normalisation the RL stages apply is the one reported
    norm = json.loads((run_dir / "rm" / "model" / "normalization.json").read_text())
    assert norm == {"shift": s["normalization"]["shift"], "scale": s["normalization"]["scale"]}
    # best-of-n: exact identities of the estimator (catches a table of other replies or a broken ranking)
    for row in s["best_of_n"]:
        n = row["n"]
        assert row["prompts"] == cfg["n_fresh"] and row["kl_bound"] == pytest.approx(math.log(n) - (n - 1) / n, **EXACT)
        assert row["gain"] == pytest.approx(row["by_proxy"] - row["random"], **EXACT)
        assert row["by_gold"] >= max(row["by_proxy"], row["random"]) - 1e-12  # picking by gold is the ceiling
        assert row["gain_ci_low"] <= row["gain"] <= row["gain_ci_high"]
    first = s["best_of_n"][0]  # best of 1 is a random reply, whoever picks it
    assert first["by_proxy"] == first["random"] == first["by_gold"] and first["gain"] == 0
    k = s["fresh_samples_per_prompt"]
    agreement = s["within_prompt_agreement"]
    assert agreement["pairs"] <= cfg["n_fresh"] * k * (k - 1) // 2 and 0 <= agreement["agreement"] <= 1


def check_eval(run_dir: Path) -> None:
    from rlhf_helpers import check_results
    from rlhf_helpers.config import stage_config
    from rlhf_helpers.evaluate import EvalConfig
    from rlhf_helpers.policies import available_policies, policy_checkpoints
    from rlhf_helpers.report import network_references, read_eval_summary

    s = read_eval_summary(run_dir)  # every field present and well-formed
    assert s["profile"] == "smoke" and s["reference"] == "sft"
    assert [r["policy"] for r in s["policies"]] == available_policies(run_dir)  # every policy present, in order
    cfg = stage_config(EvalConfig, "smoke", seed=s["seed"])
    n = cfg.n_prompts
    assert all(0.0 <= r["gold"] <= 1.0 and r["n"] == n for r in s["policies"])
    page = (run_dir / "eval" / "report.html").read_text()
    assert "Plotly" in page and not network_references(page)
    assert check_results.main([str(run_dir)]) == 0  # the artifact checks of a smoke run
    assert s["config"] == dataclasses.asdict(cfg)  # every policy evaluated with the profile's one setting
    # every row from its cached replies, and its win rate and gain recomputed against SFT's replies (catches a
    # table whose figures are not its replies', or a win rate against another reference)
    rows = {r["policy"]: r for r in s["policies"]}
    ref_rows = _eval_rows(run_dir, rows["sft"])
    for row in s["policies"]:
        _check_results_row(run_dir, row, ref_rows, n * cfg.samples_per_prompt, s["seed"])
    assert rows["sft"]["kl"] == 0.0 and rows["sft"]["win_rate"] is None  # the reference, against itself
    # the same cached evaluations as notebooks 04 and 05 (same settings and weights): the same replies and figures
    # (catches notebook 06 evaluating other weights, or with other settings, than the earlier notebooks)
    for name, row in {r["policy"]: r for r in _read(run_dir, "comparison")["table"]}.items():
        assert (row["rows_file"], row["gold"], row["kl"]) == (rows[name]["rows_file"], rows[name]["gold"],
                                                              rows[name]["kl"]), name
    ppo = _read(run_dir, "ppo")
    for name, key in (("sft", "eval_sft"), ("ppo", "eval_ppo")):
        assert ppo[key]["rows_file"] == rows[name]["rows_file"] and ppo[key]["gold_mean"] == rows[name]["gold"]
    # the frontier: each policy's final point is its row (SFT at KL 0), each stage's checkpoints are all the
    # checkpoints it saved, scored on n_checkpoint_prompts, and the reference's line starts at KL 0
    finals = {p["policy"]: p for p in s["frontier"] if p["kind"] == "final"}
    assert set(finals) == set(rows)
    for name, p in finals.items():
        assert (p["gold"], p["kl"], p["n"]) == (rows[name]["gold"], rows[name]["kl"], rows[name]["n"]), name
    for stage in ("ppo", "dpo", "grpo", "rloo"):
        points = [p for p in s["frontier"] if p["kind"] == "checkpoint" and p["policy"] == stage]
        assert [p["step"] for p in points] == [step for step, _ in policy_checkpoints(run_dir, stage, say=False)]
        assert points and all(p["n"] == cfg.n_checkpoint_prompts for p in points), stage
    line = [p for p in s["frontier"] if p["kind"] == "line" and p["policy"] == "sft"]
    assert len(line) == 1 and line[0]["kl"] == 0.0 and line[0]["n"] == cfg.n_checkpoint_prompts
    assert set(s["parting"]) == set(s["parting_notes"]) == {"ppo", "grpo", "rloo"}  # every online stage read


def check_comparison(run_dir: Path) -> None:
    from rlhf_helpers.config import stage_config
    from rlhf_helpers.evaluate import EvalConfig
    from rlhf_helpers.tracking import fingerprint, half_means, read_metrics

    s = json.loads((run_dir / "comparison" / "summary.json").read_text())
    rows = {r["policy"]: r for r in s["table"]}
    assert s["profile"] == "smoke" and s["reference"] in rows and {"dpo", "grpo", "rloo", "ppo"} <= set(rows)
    for stage in ("dpo", "grpo", "rloo", "ppo"):
        r, st = rows[stage], json.loads((run_dir / stage / "summary.json").read_text())
        assert (run_dir / stage / "adapter" / "adapter_config.json").exists()
        assert st["steps"] >= 1 and r["samples_seen"] == st["samples_seen"] >= 1 and r["wall_time_s"] > 0
        assert r["peak_memory_mb"] > 0 and r["kl"] is not None and 0.0 <= r["gold"] <= 1.0
        assert r["ci_low"] <= r["win_rate"] <= r["ci_high"] and r["n"] == rows[s["reference"]]["n"]
        # the cost columns are the stage's own summary's, and the derived ones follow from them
        assert (r["steps"], r["wall_time_s"], r["peak_memory_mb"]) == (st["steps"], st["wall_time_s"],
                                                                       st["peak_memory_mb"]), stage
        assert r["seconds_per_sample"] == pytest.approx(st["wall_time_s"] / st["samples_seen"], **EXACT)
        assert r["memory_added_mb"] == pytest.approx(st["peak_memory_mb"] - st["memory_at_start_mb"], **EXACT)
    for stage in ("grpo", "rloo"):  # the aliases notebook 06 plots for every online stage
        logged = [r for r in read_metrics(run_dir / stage / "metrics.jsonl") if "objective/scores" in r]
        assert logged and all(r.get("objective/gold") is not None and r.get("objective/kl") is not None for r in logged)
    assert s["implicit_reward"]["n_pairs"] >= 1 and 0.0 <= s["implicit_reward"]["dpo_pair_accuracy"] <= 1.0
    # every method built on this run's earlier notebooks: its SFT model, its pairs, its reward model, its PPO run
    assert s["reference"] == "sft" and s["fell_back_to_base"] is False and s["ppo_source"] == "notebook 04"
    assert s["policy_path"] == str(run_dir / "sft" / "model") and s["reward"] == "reward_model"
    assert s["pairs_source"] == str(run_dir / "preferences" / "pairs.jsonl")
    # the table from the cached replies, the win rates recomputed against SFT's replies
    eval_cfg = stage_config(EvalConfig, "smoke", seed=s["seed"])
    assert s["eval_settings"] == dataclasses.asdict(eval_cfg)
    n = eval_cfg.n_prompts * eval_cfg.samples_per_prompt
    ref_rows = _eval_rows(run_dir, rows["sft"])
    for row in s["table"]:
        _check_results_row(run_dir, row, ref_rows, n, s["seed"])
    # the settings table is read from each stage's own files
    for row in s["settings"]:
        st = _read(run_dir, row["method"])
        assert (row["steps"], row["training samples"]) == (st["steps"], st["samples_seen"]), row["method"]
    # GRPO and RLOO: what every online stage shares, and their sample counts and KL alias
    for stage in ("grpo", "rloo"):
        st, cfg, logged = _check_online_stage(run_dir, stage)
        batches = -(-st["steps"] // cfg["num_iterations"])
        assert st["samples_seen"] == batches * cfg["batch_size"] and st["n_prompts"] == cfg["n_prompts"]
        assert st["prompts_seen"] == batches * cfg["batch_size"] // cfg["num_generations"]
        for r in logged:  # the sequence KL is TRL's per-token KL times the mean reply length
            assert r["objective/kl"] == pytest.approx(r["objective/kl_per_token"] * r["completions/mean_length"], **F32)
        _nonempty(run_dir / stage / "checkpoints" / f"checkpoint-{st['steps']}" / "adapter_model.safetensors")
    # DPO
    st, cfg = _read(run_dir, "dpo"), _read(run_dir, "dpo", "config.json")
    logged = read_metrics(run_dir / "dpo" / "metrics.jsonl")
    train = [r for r in logged if "rewards/margins" in r]
    evals = [r for r in logged if "eval/loss" in r]
    assert st["steps"] == cfg["max_steps"] == train[-1]["step"]  # every step ran
    assert st["pairs_seen"] == st["steps"] * cfg["batch_size"] * cfg["grad_accum"]
    assert st["samples_seen"] == 2 * st["pairs_seen"]
    # step 1 is scored before any update, with a fresh (zero) adapter: policy = reference, so every implicit reward
    # is 0 and the loss is log 2 (catches a policy that does not start at its reference)
    assert train[0]["step"] == 1 and train[0]["rewards/chosen"] == train[0]["rewards/rejected"] == 0.0
    assert st["margin_first"] == train[0]["rewards/margins"] == 0.0
    assert st["train_loss_first"] == train[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert (st["train_loss_last"], st["margin_last"], st["accuracy_last"]) == (
        train[-1]["train/loss"], train[-1]["rewards/margins"], train[-1]["rewards/accuracies"])
    assert st["margin_halves"] == half_means(train, "rewards/margins")
    assert (st["eval_margin"], st["eval_accuracy"], st["eval_loss"]) == (
        evals[-1]["eval/rewards/margins"], evals[-1]["eval/rewards/accuracies"], evals[-1]["eval/loss"])
    # trained from this run's SFT model on the training side of notebook 03's split, and held out the other side,
    # on which notebook 05 sets its implicit reward against the reward model
    assert st["policy_path"] == str(run_dir / "sft" / "model")
    _starts_from_run_sft(run_dir, "dpo")
    _check_adapter(run_dir, "dpo")
    train_pairs, held = _split(run_dir, cfg)
    assert cfg["data_sha256"] == fingerprint(list(train_pairs))
    assert st["train_pairs"] == len(train_pairs) - st["lengths"]["train"]["dropped_prompt_too_long"]
    assert st["eval_pairs"] == st["lengths"]["eval"]["pairs"] == len(held) == s["implicit_reward"]["n_pairs"]
    for key in ("dpo_pair_accuracy", "rm_pair_accuracy"):  # shares of the held-out pairs
        hits = s["implicit_reward"][key] * len(held)
        assert hits == pytest.approx(round(hits), abs=1e-9), key


def check_ppo(run_dir: Path) -> None:
    from rlhf_helpers.config import stage_config
    from rlhf_helpers.evaluate import EvalConfig, paired_win_rate, same_weights
    from rlhf_helpers.ppo import list_checkpoints
    from rlhf_helpers.tracking import read_metrics

    s = json.loads((run_dir / "ppo" / "summary.json").read_text())
    assert s["steps"] >= 1 and s["reward"] == "rm"  # notebook 03 ran first, so PPO used its reward model
    rows = read_metrics(run_dir / "ppo" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, s["steps"] + 1))
    for key in ("objective/scores", "objective/gold", "objective/kl", "policy/clipfrac_avg", "loss/value_avg",
                "val/explained_variance"):
        assert all(key in r for r in rows), key
    samples = read_metrics(run_dir / "ppo" / "samples.jsonl")
    assert samples and all(0.0 <= r["gold"] <= 1.0 for r in samples)  # the gold judge beside each written reply
    assert (run_dir / "ppo" / "adapter" / "adapter_config.json").exists()
    assert s["eval_ppo"]["n"] == s["eval_sft"]["n"] >= 1 and s["eval_sft"]["kl_mean"] == 0.0
    assert 0.0 <= s["win_rate_vs_sft"]["win_rate"] <= 1.0
    # what every online stage shares: steps, first/last figures, score = raw − penalty, KL 0 at step 1, this run's
    # SFT model, prompts and reward model (the fingerprint in config.json), samples scored by the gold judge
    s, cfg, rows = _check_online_stage(run_dir, "ppo")
    assert s["fell_back_to_base"] is False
    assert s["samples_seen"] == s["steps"] * cfg["batch_size"]
    assert s["tokens_generated"] == sum(r["tokens/generated"] for r in rows)
    assert s["kl_coef_last"] == rows[-1]["objective/kl_coef"]
    for r in rows:  # the KL penalty is −β·KL; the generated tokens are the batch's mean length times its size
        assert r["objective/non_score_reward"] == pytest.approx(-r["objective/kl_coef"] * r["objective/kl"], **F32)
        assert r["tokens/generated"] == pytest.approx(r["response/length_mean"] * cfg["batch_size"], **F32)
    # the value head starts at zero, so on the first rollout it explains none of the returns' variance
    assert rows[0]["val/explained_variance"] == pytest.approx(0.0, abs=1e-6)
    # checkpoints at every save_steps and at the end, the newest kept; the final adapter is the last one's weights
    saved = [k for k in range(1, s["steps"] + 1) if k % cfg["save_steps"] == 0 or k == s["steps"]]
    ckpts = list_checkpoints(run_dir / "ppo")
    assert [step for step, _ in ckpts] == saved[-cfg["keep_checkpoints"]:]
    assert same_weights(run_dir / "ppo" / "adapter", ckpts[-1][1] / "adapter")
    # each written sample: its score is its raw score less the penalty if it did not end; with group_baseline its
    # baseline is the mean score of its siblings (the other replies to its prompt); the first step's KL is 0
    k = cfg["samples_per_prompt"]
    for step in sorted({r["step"] for r in samples}):
        at = [r for r in samples if r["step"] == step]
        for r in at:
            assert r["score"] == pytest.approx(r["raw_score"] - cfg["missing_eos_penalty"] * (not r["has_eos"]), **F32)
            assert step > 1 or abs(r["kl"]) <= 1e-6, r
        for i in (range(0, len(at) - k + 1, k) if cfg["group_baseline"] and k > 1 else ()):
            group = at[i:i + k]
            assert len({r["prompt"] for r in group}) == 1  # a prompt's k replies sit side by side
            for j, r in enumerate(group):
                others = [g["score"] for m, g in enumerate(group) if m != j]
                assert r["baseline"] == pytest.approx(sum(others) / len(others), **F32), r
    # held-out evaluation: both policies on the profile's prompts, figures from their cached replies, SFT at KL 0,
    # and the win rate and gain recomputed from the two sets of replies
    eval_cfg = stage_config(EvalConfig, "smoke", seed=s["seed"])
    n = eval_cfg.n_prompts * eval_cfg.samples_per_prompt
    sft_rows = _check_eval_metrics(run_dir, s["eval_sft"], n)
    ppo_rows = _check_eval_metrics(run_dir, s["eval_ppo"], n)
    assert all(r["kl"] == 0.0 for r in sft_rows) and (s["eval_sft"]["stage"], s["eval_ppo"]["stage"]) == ("sft", "ppo")
    assert [r["prompt"] for r in ppo_rows] == [r["prompt"] for r in sft_rows]
    wins = s["win_rate_vs_sft"]
    assert wins == pytest.approx(paired_win_rate(ppo_rows, sft_rows), **EXACT)
    _check_win_record(wins, eval_cfg.n_prompts)
    assert s["gold_gain"] == pytest.approx(s["eval_ppo"]["gold_mean"] - s["eval_sft"]["gold_mean"], **EXACT)
    assert wins["gain"] == pytest.approx(s["gold_gain"], **EXACT)  # one reply per prompt: mean of differences


CHECKS = {"00_rlhf_concepts": check_concepts, "01_reward_design": check_rewards, "02_sft": check_sft,
          "03_reward_model": check_rm, "04_ppo": check_ppo, "05_dpo_vs_ppo": check_comparison,
          "06_evaluation": check_eval}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("smoke_run")


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_smoke_profile(notebook, run_dir):
    before = set(run_dir.glob("*/summary.json"))
    # a cell time limit: once, with both cores busy with other work, the kernel finished a cell but its reply
    # never reached papermill, which would have waited for ever (a whole smoke notebook takes ~90 s)
    executed = execute_notebook(notebook, run_dir / "notebooks",
                                {"run_dir": str(run_dir), "profile": "smoke", "seed": 0}, timeout_s=600)
    written = set(run_dir.glob("*/summary.json")) - before
    # plotly.js (about 5 MB) is written once, for the saved notebook's and HTML copy's figures, not per figure
    outputs = [o for cell in nbformat.read(executed, as_version=4).cells for o in cell.get("outputs", [])]
    copies = sum(len(o.get("data", {}).get("text/html", "")) > 1_000_000 for o in outputs)
    assert copies <= 1, f"{notebook.name} carries plotly.js {copies} times"
    # library notices a reader can do nothing about stay out of the notebooks (see rlhf_helpers/__init__.py)
    stderr = "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
    for notice in ("`gradient_checkpointing` is deprecated", "`is_gradient_checkpointing` is deprecated",
                   "gemm_4bit_forward", "were not sharded"):
        assert notice not in stderr, f"{notebook.name} prints {notice!r}"
    # the kernel's IPC sockets live in a private temporary folder, not in the repository
    assert not list(ROOT.glob("kernel-ipc*")), "kernel sockets were left in the repository"
    if notebook.stem in CHECKS:
        CHECKS[notebook.stem](run_dir)
    else:
        assert written, f"{notebook.name} wrote no run_dir/<stage>/summary.json"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stripped_and_has_one_parameters_cell(notebook):
    nb = nbformat.read(str(notebook), as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{notebook.name}: exactly one cell must be tagged 'parameters'"
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{notebook.name} has outputs"
    names = {line.split(":")[0].strip() for line in tagged[0].source.splitlines() if ":" in line and not line.startswith("#")}
    assert STANDARD <= names, f"{notebook.name}: the parameters cell lacks {STANDARD - names}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_matches_its_jupytext_source(notebook):
    import jupytext

    source = notebook.with_suffix(".py")
    assert source.exists(), f"{notebook.name} has no py:percent pair {source.name}"
    from_py = jupytext.read(str(source))
    committed = nbformat.read(str(notebook), as_version=4)
    strip = lambda cells: [(c.cell_type, c.source.strip(), sorted(c.metadata.get("tags", []))) for c in cells]
    assert strip(from_py.cells) == strip(committed.cells), (
        f"{notebook.name} is out of sync with {source.name}; run `make notebooks`")


def test_help_notebook_lists_every_parameter_with_type_and_comment():
    nb = ROOT / "notebooks" / "00_rlhf_concepts.ipynb"
    out = subprocess.run([sys.executable, "-m", "papermill", "--help-notebook", str(nb)],
                         capture_output=True, text=True, check=True).stdout
    cell = next(c for c in nbformat.read(str(nb), as_version=4).cells if "parameters" in c.metadata.get("tags", []))
    declared = [line for line in cell.source.splitlines() if ":" in line and "=" in line]
    assert declared
    for line in declared:
        name = line.split(":")[0].strip()
        kind = line.split(":")[1].split("=")[0].strip()
        comment = line.split("#", 1)[1].strip()
        assert f"{name}: {kind}" in out and comment in out, f"{name} missing from --help-notebook:\n{out}"
