"""Notebook 05's comparison: held-out results (evaluate.results_table) joined with what each method cost
(its summary.json), and a discussion written from those numbers, never from numbers typed in by hand.

Cost columns, read from run_dir/<stage>/summary.json:
  samples_seen   replies the method trained on: PPO, GRPO, RLOO the replies they sampled and scored; DPO two per
                 pair (chosen and rejected), none of them sampled
  wall_time_s    wall-clock seconds of the training stage (model loading, data, saving, and any evaluation the
                 stage runs itself included; notebook 05's held-out evaluation not),
                 summed over the sessions of a run that was interrupted and resumed (`tracking.StageClock`)
  peak_memory_mb peak memory during the stage: CUDA's peak allocation, or on CPU the process's peak resident
                 set (see `dpo.PeakMemory`; PPO's comes from notebook 04's own process)
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

from .paths import stage_dir

COST_KEYS = ("steps", "samples_seen", "wall_time_s", "peak_memory_mb", "peak_memory_kind")


def stage_costs(run_dir: str | os.PathLike, stage: str) -> dict[str, Any]:
    """The cost figures of `stage` from its summary.json (missing keys are None; no file: all None)."""
    path = stage_dir(run_dir, stage) / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    return {k: summary.get(k) for k in COST_KEYS}


def comparison_table(results: Sequence[dict], costs: dict[str, dict]) -> list[dict]:
    """Rows of `evaluate.results_table` with each method's cost columns added (None for the reference)."""
    return [{**r, **{k: costs.get(r["policy"], {}).get(k) for k in COST_KEYS}} for r in results]


def format_comparison(table: Sequence[dict], reference: str = "sft"):
    """The comparison as a pandas DataFrame for people: one row per method, rounded."""
    import pandas as pd

    def num(v, digits=3):
        return "–" if v is None else f"{v:.{digits}f}"

    return pd.DataFrame([{
        "method": r["policy"], "gold": num(r["gold"]), "proxy (RM)": num(r["proxy"]),
        "KL to reference (nats)": num(r["kl"], 2),
        f"win rate vs {reference} [95% CI]": ("(reference)" if r["win_rate"] is None else
                                              f"{r['win_rate']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"),
        "samples seen": "–" if r.get("samples_seen") is None else int(r["samples_seen"]),
        "wall time (s)": num(r.get("wall_time_s"), 0), "peak memory (MB)": num(r.get("peak_memory_mb"), 0),
        "n prompts": r.get("prompts", r["n"]),
    } for r in table]).set_index("method")


def discussion(table: Sequence[dict], reference: str = "sft") -> str:
    """A few paragraphs (markdown) saying, from the table's numbers, which method won what and at what cost."""
    ref = next((r for r in table if r["policy"] == reference), None)
    rows = [r for r in table if r["policy"] != reference and r.get("gold") is not None]
    if ref is None or not rows:
        return "Nothing to compare: the table needs the reference and at least one trained method."
    n = ref.get("prompts", ref["n"])
    best = max(rows, key=lambda r: r["gold"])
    tied = _level_with(best, rows, ref)
    if best["gold"] > ref["gold"] and tied:
        names = ", ".join(f"{r['policy']} ({r['gold']:.3f}, winning {r['win_rate']:.2f} "
                          f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}])" for r in [best, *tied])
        text = [f"**Gold reward.** On {n} held-out prompts the highest mean gold, against {reference}'s "
                f"{ref['gold']:.3f}, is shared, less than {GOLD_TIE} apart: {names}."]
        under = [r["policy"] for r in [best, *tied] if r["win_rate"] < 0.5]
        if under:
            text.append(f"Yet {', '.join(under)} {'wins' if len(under) == 1 else 'win'} fewer than half of "
                        f"{'its' if len(under) == 1 else 'their'} comparisons: a few large gains outweigh more, "
                        f"smaller losses.")
    elif best["gold"] > ref["gold"]:
        text = [f"**Gold reward.** On {n} held-out prompts, **{best['policy']}** scored highest by the gold judge "
                f"({best['gold']:.3f} against {reference}'s {ref['gold']:.3f}), winning {best['win_rate']:.2f} of "
                f"comparisons [{best['ci_low']:.2f}, {best['ci_high']:.2f}]."]
        if best["win_rate"] < 0.5:
            text.append("Its mean is higher, yet it wins fewer than half of its comparisons: a few large gains "
                        "outweigh more, smaller losses.")
    else:
        text = [f"**Gold reward.** On {n} held-out prompts no method raised the mean gold reward above {reference}'s "
                f"{ref['gold']:.3f} (the best, {best['policy']}, reached {best['gold']:.3f})."]
    above = [r["policy"] for r in rows if r["ci_low"] > 0.5]
    below = [r["policy"] for r in rows if r["ci_high"] < 0.5]
    level = [r["policy"] for r in rows if r["ci_low"] <= 0.5 <= r["ci_high"]]
    if above:
        text.append(f"Better than {reference} beyond the bootstrap interval: {', '.join(above)}.")
    if below:
        text.append(f"Worse than {reference} beyond the bootstrap interval: {', '.join(below)}.")
    if level:
        text.append(f"Not distinguishable from {reference} at this budget (the interval holds 0.5): {', '.join(level)}.")
    split = [r["policy"] for r in rows if r["policy"] in above + below and r.get("gain_ci_low") is not None
             and r["gain_ci_low"] <= 0 <= r["gain_ci_high"]]
    if split:
        text.append(f"For {', '.join(split)} the two measures disagree: the gold gain's interval holds 0, so by the "
                    f"size of its wins and losses it is not told apart from {reference}; only their count is.")
    rivals = [r["policy"] for r in rows if r is not best and r["ci_high"] >= best["ci_low"]]
    if rivals:
        text.append(f"The intervals of {best['policy']} and {', '.join(rivals)} overlap, so their order is not settled "
                    f"by {n} prompts; more held-out prompts, or several replies per prompt, would settle it.")
    if ref.get("proxy") is not None:
        rise = proxy_rise_threshold(ref["n"])
        scored = [r for r in rows if r.get("proxy") is not None]

        def moved(rs):
            return "; ".join(f"{r['policy']} (proxy {r['proxy'] - ref['proxy']:+.2f}, "
                             f"gold {r['gold'] - ref['gold']:+.3f})" for r in rs)

        risen = [r for r in scored if r["proxy"] - ref["proxy"] > rise]
        fooled = [r for r in risen if r["gold"] <= ref["gold"]]
        fallen = [r for r in scored if r["proxy"] - ref["proxy"] < -rise]
        noise = (f"beyond resampling noise ({rise:.2f} on {ref['n']} replies, in units of the standard "
                 f"deviation of {reference}'s proxy scores)")
        honest = [r for r in risen if r not in fooled]
        said = " ".join(part for part in (
            f"Raised the reward model's score {noise} but not the gold reward, the first sign of "
            f"over-optimisation: {moved(fooled)}." if fooled else "",
            f"Raised the reward model's score {noise} without losing gold reward: {moved(honest)}." if honest else "",
            f"No method raised the reward model's score {noise}, so there is nothing yet to be gamed: at this "
            "budget the online methods have not climbed the reward they were trained against." if not risen else "",
        ) if part)
        if fallen:
            said += f" Lowered it {noise}: {moved(fallen)}."
        text.append("\n\n**Proxy against gold.** " + said)
    with_kl = [r for r in rows if r.get("kl") is not None]
    if with_kl:
        far, near = max(with_kl, key=lambda r: r["kl"]), min(with_kl, key=lambda r: r["kl"])
        if far["kl"] < 0.01:
            text.append(f"\n\n**Distance from the reference.** No method moved measurably from the reference (the "
                        f"largest KL, {far['policy']}'s, is {far['kl']:.3f} nats per reply).")
        else:
            def kl(r):
                return f"{r['kl']:.2f}" + (f" ± {r['kl_sem']:.2f}" if r.get("kl_sem") is not None else "")

            text.append(f"\n\n**Distance from the reference.** {far['policy']} moved furthest (KL {kl(far)} nats "
                        f"per reply), {near['policy']} least ({kl(near)}). One reply's KL term is noisy (it can be "
                        f"negative); the ± is the standard error of the mean over replies.")
        gainers = [r for r in with_kl if r["gold"] > ref["gold"] and r["ci_low"] > 0.5 and r["kl"] > 0.01]
        if gainers:
            eff = max(gainers, key=lambda r: (r["gold"] - ref["gold"]) / r["kl"])
            text.append(f"Gold gained per nat of KL was highest for {eff['policy']} "
                        f"({(eff['gold'] - ref['gold']) / eff['kl']:.3f}).")
    costed = [r for r in rows if r.get("wall_time_s") is not None]
    if costed:
        fast = min(costed, key=lambda r: r["wall_time_s"])
        parts = [f"{r['policy']} {r['wall_time_s']:.0f} s / {r.get('samples_seen') or 0} samples" +
                 (f" / {r['peak_memory_mb']:.0f} MB" if r.get("peak_memory_mb") is not None else "") for r in costed]
        text.append(f"\n\n**Cost.** Training time, samples seen and peak memory: {'; '.join(parts)}. "
                    f"The cheapest in time was {fast['policy']}.")
        if fast["policy"] == "dpo" and best["policy"] != "dpo" and best["ci_low"] > 0.5:
            text.append(f"DPO took {fast['wall_time_s'] / best['wall_time_s']:.0%} of {best['policy']}'s time for "
                        f"{fast['gold'] - ref['gold']:+.3f} gold against {best['gold'] - ref['gold']:+.3f}.")
    text.append(f"\n\n**When each wins, by these numbers.** {_verdict(rows, ref, best)}")
    return " ".join(text).replace(" \n\n", "\n\n")


GOLD_TIE = 0.005
"""Mean gold rewards closer than this are called the same in the discussion (3 decimals would show a tie
as a win)."""


def proxy_rise_threshold(n_replies: int) -> float:
    """The smallest rise of the normalised proxy that the discussion calls a rise: twice the standard error
    of a difference of two means over n replies each, 2·sqrt(2/n), since the proxy has standard deviation 1
    on SFT's replies (0.5 for 32 replies). Smaller differences are what resampling the same policy gives."""
    return 2.0 * math.sqrt(2.0 / max(n_replies, 1))


def _level_with(best: dict, rows: Sequence[dict], ref: dict) -> list[dict]:
    """The other methods whose gold is within GOLD_TIE of the best's and above the reference's."""
    return [r for r in rows if r is not best and best["gold"] - r["gold"] < GOLD_TIE and r["gold"] > ref["gold"]]


def _verdict(rows: Sequence[dict], ref: dict, best: dict) -> str:
    by_name = {r["policy"]: r for r in rows}
    dpo, online = by_name.get("dpo"), [r for r in rows if r["policy"] in ("ppo", "grpo", "rloo")]
    says = []
    if best["gold"] <= ref["gold"]:
        return ("None, yet: no method improved on the reference at this budget, so the numbers cannot rank them. "
                "Train longer or on a bigger profile (the gpu profile takes more steps and more held-out prompts).")
    if best["ci_low"] <= 0.5:  # the order by gold may be noise: recommend nothing from it
        costed = [r for r in rows if r.get("wall_time_s") is not None]
        cost = ""
        if len(costed) > 1:
            fast, slow = min(costed, key=lambda r: r["wall_time_s"]), max(costed, key=lambda r: r["wall_time_s"])
            cost = (f" What the numbers do settle is cost (above): {slow['policy']} took "
                    f"{slow['wall_time_s'] / max(fast['wall_time_s'], 1e-9):.1f} times {fast['policy']}'s training time.")
        level = [r["policy"] for r in _level_with(best, rows, ref)]
        with_level = f", level with {', '.join(level)}" if level else ""
        return (f"None, by gold: the best, {best['policy']} ({best['gold'] - ref['gold']:+.3f} over {ref['policy']}"
                f"{with_level}), "
                f"wins {best['win_rate']:.2f} [{best['ci_low']:.2f}, {best['ci_high']:.2f}], an interval that still "
                f"holds 0.5, so at this budget the order of the methods by gold may be sampling noise.{cost} Until "
                "gold separates them, choose by what you have: DPO needs only preference pairs and samples nothing "
                "while it trains; GRPO, RLOO and PPO need a reward that can score fresh replies and the time to "
                "generate them. To rank them on gold, train longer or evaluate on more held-out prompts (the gpu "
                "profile does both).")
    if dpo is not None and online:
        top = max(online, key=lambda r: r["gold"])
        if abs(top["gold"] - dpo["gold"]) < GOLD_TIE:
            says.append(f"DPO and {top['policy']} reached the same gold ({dpo['gold']:.3f} and {top['gold']:.3f}, "
                        f"less than {GOLD_TIE} apart), and DPO got there without sampling a single reply during "
                        "training: with a fixed set of preference pairs, the method to start with.")
        elif dpo["gold"] > top["gold"]:
            says.append("With a fixed set of preference pairs, DPO matched or beat the online methods here, without "
                        "sampling a single reply during training: the method to start with when pairs are what you have.")
        else:
            says.append(f"Sampling fresh replies and scoring them paid off: {top['policy']} beat DPO on gold "
                        f"({top['gold']:.3f} against {dpo['gold']:.3f}), which is the case for the online methods when "
                        f"a reward you trust can score new samples and you can pay for generation.")
    if len(online) > 1:
        cheap = min((r for r in online if r.get("wall_time_s") is not None), key=lambda r: r["wall_time_s"], default=None)
        top = max(online, key=lambda r: r["gold"])
        if cheap is not None and cheap is not top:
            says.append(f"Among the online methods {top['policy']} reached the most gold and {cheap['policy']} was the "
                        f"cheapest to run; choose by which of the two you are short of.")
        elif cheap is not None:
            says.append(f"Among the online methods {top['policy']} was both the best by gold and the cheapest to run.")
    return " ".join(says)


CURVE_KEYS = {"proxy reward": ("objective/raw_scores", "objective/scores"), "gold reward": ("objective/gold",),
              "KL to reference (nats)": ("objective/kl",)}
"""Shared-axis curve -> the metrics keys it reads, first present wins. Every online stage's `objective/scores`
carries the missing-EOS penalty; `objective/raw_scores`, the reward model's score alone, is what the proxy curve
shows (runs logged before raw scores existed fall back to `objective/scores`)."""


def online_curves(run_dir: str | os.PathLike, stages: Sequence[str] = ("ppo", "grpo", "rloo")
                  ) -> tuple[dict[str, list[dict]], dict[str, float]]:
    """({stage: rows with the CURVE_KEYS names}, {stage: samples per step}) for the stages that logged rows."""
    from .tracking import read_metrics

    curves, per_step = {}, {}
    for stage in stages:
        rows = []
        for r in read_metrics(stage_dir(run_dir, stage) / "metrics.jsonl"):
            values = {name: next((r[k] for k in keys if r.get(k) is not None), None) for name, keys in CURVE_KEYS.items()}
            if values["proxy reward"] is not None:
                rows.append({"step": r["step"], **values})
        costs = stage_costs(run_dir, stage)
        if rows and costs["samples_seen"] and costs["steps"]:
            curves[stage], per_step[stage] = rows, costs["samples_seen"] / costs["steps"]
    return curves, per_step


def implicit_vs_reward(policy, tok, pairs, beta: float, reward) -> tuple[dict[str, Any], dict[str, Any]]:
    """DPO's implicit reward margins on `pairs` (policy: the DPO peft model) beside `reward`'s score margins.

    Returns ({'dpo_margin', 'rm_margin'}: arrays, one entry per pair, chosen − rejected) and statistics: each
    one's agreement with the labels (share of positive margins), DPO's mean margin, and Spearman's ρ between
    the two margins and between the two per-reply rewards."""
    import numpy as np

    from .dpo import pair_implicit_margins
    from .reward_tuner import spearman

    dpo_c, dpo_r = pair_implicit_margins(policy, tok, pairs, beta)
    prompts = [p.prompt for p in pairs]
    rm_c = np.array(reward.score(prompts, [p.chosen for p in pairs]))
    rm_r = np.array(reward.score(prompts, [p.rejected for p in pairs]))
    margins = {"dpo_margin": dpo_c - dpo_r, "rm_margin": rm_c - rm_r}
    stats = {"dpo_pair_accuracy": float(np.mean(margins["dpo_margin"] > 0)),
             "rm_pair_accuracy": float(np.mean(margins["rm_margin"] > 0)),
             "dpo_mean_margin": float(np.mean(margins["dpo_margin"])),
             "spearman_margins": spearman(list(margins["rm_margin"]), list(margins["dpo_margin"])),
             "spearman_rewards": spearman(list(rm_c) + list(rm_r), list(dpo_c) + list(dpo_r)), "n_pairs": len(pairs)}
    return margins, stats
