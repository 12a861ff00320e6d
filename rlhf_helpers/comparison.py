"""Notebook 05's comparison: held-out results (evaluate.results_table) joined with what each method cost
(its summary.json), and a discussion written from those numbers, never from numbers typed in by hand.

Cost columns, read from run_dir/<stage>/summary.json:
  samples_seen   replies the method trained on: PPO, GRPO, RLOO the replies they sampled and scored; DPO two per
                 pair (chosen and rejected), none of them sampled
  wall_time_s    wall-clock seconds of the training stage (model loading, data and saving included, and any
                 evaluation during training; DPO's closing held-out evaluation and notebook 05's not),
                 summed over the sessions of a run that was interrupted and resumed (`tracking.StageClock`)
  peak_memory_mb peak memory during the stage: CUDA's peak allocation, or on CPU the process's peak resident
                 set (see `dpo.PeakMemory`; PPO's comes from notebook 04's own process)
  memory_at_start_mb  the same measure when the stage began: on CPU whatever the process already held
Derived in `comparison_table`, because the methods are given different budgets and run in one process:
  seconds_per_sample  wall_time_s / samples_seen (a DPO sample is one reply of a pair, scored not sampled)
  memory_added_mb     peak_memory_mb − memory_at_start_mb: what the stage added to what the process held

`settings_table` lists what each method was given (learning rate, passes, prompts, replies per prompt, token
cap, missing-EOS penalty, β, samples) from each stage's config.json and summary.json, so that the budgets are
seen, not assumed.
"""
from __future__ import annotations

import itertools
import json
import math
import os
from typing import Any, Sequence

from .evaluate import MIN_PROMPTS_TO_TELL, format_gain, format_refusals
from .paths import resolve_run_dir, stage_dir

COST_KEYS = ("steps", "samples_seen", "wall_time_s", "peak_memory_mb", "memory_at_start_mb", "peak_memory_kind")
DERIVED_KEYS = ("seconds_per_sample", "memory_added_mb")


def _read(run_dir: str | os.PathLike, stage: str, name: str) -> dict[str, Any]:
    """run_dir/<stage>/<name> as JSON, {} when it is missing (without creating the stage's folder)."""
    path = resolve_run_dir(run_dir) / stage / name
    return json.loads(path.read_text()) if path.exists() else {}


def stage_costs(run_dir: str | os.PathLike, stage: str) -> dict[str, Any]:
    """The cost figures of `stage` from its summary.json (missing keys are None; no file: all None)."""
    summary = _read(run_dir, stage, "summary.json")
    return {k: summary.get(k) for k in COST_KEYS}


def derived_costs(costs: dict[str, Any]) -> dict[str, Any]:
    """seconds_per_sample and memory_added_mb from a stage's costs (None where a figure is missing)."""
    wall, samples = costs.get("wall_time_s"), costs.get("samples_seen")
    peak, start = costs.get("peak_memory_mb"), costs.get("memory_at_start_mb")
    return {"seconds_per_sample": wall / samples if wall is not None and samples else None,
            "memory_added_mb": peak - start if peak is not None and start is not None else None}


def comparison_table(results: Sequence[dict], costs: dict[str, dict]) -> list[dict]:
    """Rows of `evaluate.results_table` with each method's cost columns added, and the DERIVED_KEYS (None for
    the reference)."""
    rows = []
    for r in results:
        cost = {k: costs.get(r["policy"], {}).get(k) for k in COST_KEYS}
        rows.append({**r, **cost, **derived_costs(cost)})
    return rows


def settings_table(run_dir: str | os.PathLike, stages: Sequence[str] = ("dpo", "grpo", "rloo", "ppo")) -> list[dict]:
    """What each method was given, read from run_dir/<stage>/config.json and summary.json: one row per stage
    that has both. Columns: learning rate and schedule, passes over each batch, optimizer steps, prompts drawn
    (with repeats), replies per prompt, the token cap in training, the penalty on a reply cut off at that cap
    (None for DPO, which samples nothing), β and where it acts, training samples."""
    rows = []
    for stage in stages:
        cfg, summary = _read(run_dir, stage, "config.json"), _read(run_dir, stage, "summary.json")
        if not cfg or not summary:
            continue
        steps, samples = summary.get("steps"), summary.get("samples_seen")
        if stage == "dpo":
            per_prompt, passes, cap = 2, 1, f"{cfg.get('max_length')} (prompt + reply)"
            prompts, beta = summary.get("pairs_seen"), f"{cfg.get('beta')}: the implicit reward's scale"
        elif stage == "ppo":
            per_prompt, cap = cfg.get("samples_per_prompt") or 1, f"{cfg.get('response_length')} (reply)"
            passes = cfg.get("ppo_epochs")
            if (cfg.get("num_mini_batches") or 1) > 1:
                passes = f"{passes} ({cfg['num_mini_batches']} minibatches each)"
            prompts = samples // per_prompt if samples is not None else None
            beta = (f"{cfg.get('init_kl_coef')}{' (adaptive)' if cfg.get('adaptive_kl') else ''}: "
                    "per-token log-ratio in the reward")
        else:
            per_prompt, passes, cap = cfg.get("num_generations"), cfg.get("num_iterations"), \
                f"{cfg.get('max_completion_length')} (reply)"
            prompts = summary.get("prompts_seen")
            where = "k3 per token in the loss" if stage == "grpo" else "summed log-ratio in the reward"
            beta = f"{cfg.get('beta')}: {where}" if cfg.get("beta") else "0: no KL term, no reference"
        warmup = cfg.get("warmup")
        schedule = cfg.get("lr_scheduler", "constant") + (f", warm-up {warmup:g} of the steps" if warmup else "")
        rows.append({"method": stage, "learning rate": cfg.get("learning_rate"), "schedule": schedule,
                     "passes over each batch": passes, "steps": steps, "prompts drawn": prompts,
                     "replies per prompt": per_prompt, "token cap in training": cap,
                     "missing-EOS penalty": None if stage == "dpo" else cfg.get("missing_eos_penalty"), "β": beta,
                     "training samples": samples})
    return rows


def format_comparison(table: Sequence[dict], reference: str = "sft"):
    """The comparison as a pandas DataFrame for people: one row per method, rounded."""
    import pandas as pd

    def num(v, digits=3):
        return "–" if v is None else f"{v:.{digits}f}"

    return pd.DataFrame([{
        "method": r["policy"], "gold": num(r["gold"]),
        f"gold gain vs {reference} [95% CI]": format_gain(r, "gain", reference),
        "proxy (RM)": num(r["proxy"]), f"proxy gain vs {reference} [95% CI]": format_gain(r, "proxy_gain", reference),
        "KL to reference (nats)": num(r["kl"], 2),
        f"win rate vs {reference} [95% CI]": ("(reference)" if r["win_rate"] is None else
                                              f"{r['win_rate']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"),
        "won / tied / lost": "–" if r.get("wins") is None else f"{r['wins']} / {r['ties']} / {r['losses']}",
        "refused: harmful / benign": format_refusals(r),
        "training samples": "–" if r.get("samples_seen") is None else int(r["samples_seen"]),
        "wall time (s)": num(r.get("wall_time_s"), 0), "s per sample": num(r.get("seconds_per_sample"), 1),
        "memory added (MB)": num(r.get("memory_added_mb"), 0), "n prompts": r.get("prompts", r["n"]),
    } for r in table]).set_index("method")


def discussion(table: Sequence[dict], reference: str = "sft") -> str:
    """A few paragraphs (markdown) saying, from the table's numbers, which method won what and at what cost."""
    ref = next((r for r in table if r["policy"] == reference), None)
    rows = [r for r in table if r["policy"] != reference and r.get("gold") is not None]
    if ref is None or not rows:
        return "Nothing to compare: the table needs the reference and at least one trained method."
    n = ref.get("prompts", ref["n"])
    best = max(rows, key=lambda r: r["gold"])
    few = n < MIN_PROMPTS_TO_TELL
    if few:
        means = ", ".join(f"{r['policy']} {r['gold']:.3f}" for r in rows)
        text = [f"**Gold reward.** Mean gold on {n} held-out prompts: {reference} {ref['gold']:.3f}, {means}. On "
                f"fewer than {MIN_PROMPTS_TO_TELL} prompts a few of them decide any interval, so none is read here "
                f"as a verdict: this run checks that the stages work, not which method is better (the cpu and gpu "
                f"profiles evaluate on more prompts)."]
    else:
        text = _gold_and_proxy(rows, ref, best, reference, n)
    with_kl = [r for r in rows if r.get("kl") is not None]
    if with_kl:
        far, near = max(with_kl, key=lambda r: r["kl"]), min(with_kl, key=lambda r: r["kl"])
        if far["kl"] < 0.01:
            text.append(f"\n\n**Distance from the reference.** No method moved measurably from the reference (the "
                        f"largest KL, {far['policy']}'s, is {far['kl']:.3f} nats per reply).")
        else:
            def kl(r):
                return f"{r['kl']:.2f}" + (f" ± {r['kl_sem']:.2f}" if r.get("kl_sem") is not None else "")

            if near["kl"] == far["kl"]:  # one policy, or all alike: no furthest and least to name
                moved = (f"{', '.join(r['policy'] for r in with_kl)} moved KL {kl(far)} nats per reply from the "
                         f"reference.")
            else:
                moved = f"{far['policy']} moved furthest (KL {kl(far)} nats per reply), {near['policy']} least ({kl(near)})."
            text.append(f"\n\n**Distance from the reference.** {moved} One reply's KL term is noisy (it can be "
                        f"negative); the ± is the standard error of the mean, prompts the unit.")
        gainers = [] if few else [r for r in with_kl if gold_verdict(r) == "better" and r["kl"] > 0.01]
        if gainers:
            eff = max(gainers, key=lambda r: (r["gold"] - ref["gold"]) / r["kl"])
            text.append(f"Gold gained per nat of KL was highest for {eff['policy']} "
                        f"({(eff['gold'] - ref['gold']) / eff['kl']:.3f}).")
    costed = [r for r in rows if r.get("wall_time_s") is not None]
    if costed:
        text.append(f"\n\n**Cost, at these budgets.** {'; '.join(_cost(r) for r in costed)}. The methods were "
                    "given different budgets (the settings table), so a total time says as much about the budget "
                    "as about the method; the time per training sample compares the work each method does per sample "
                    "at these budgets, though samples differ in kind (an online sample is generated and scored, a "
                    "DPO pair only scored).")
        per = [r for r in costed if r.get("seconds_per_sample") is not None]
        fast = min(per, key=lambda r: r["seconds_per_sample"]) if per else None
        if fast is not None:
            text.append(f"The cheapest per training sample was {fast['policy']}.")
        if any(r.get("memory_added_mb") is not None for r in costed) and \
                any(str(r.get("peak_memory_kind") or "").startswith("rss") for r in costed):
            text.append("On CPU, memory is a process's resident set, so each figure is what the stage added to what "
                        "its process already held, loading the models included. DPO, GRPO and RLOO share notebook "
                        "05's process; PPO's figure comes from notebook 04's.")
        if not few and fast is not None and fast["policy"] == "dpo" and best["policy"] != "dpo" \
                and gold_verdict(best) == "better" and best.get("seconds_per_sample"):
            text.append(f"Per training sample DPO took {fast['seconds_per_sample'] / best['seconds_per_sample']:.0%} "
                        f"of {best['policy']}'s time, for {fast['gold'] - ref['gold']:+.3f} gold against "
                        f"{best['gold'] - ref['gold']:+.3f}.")
    if not few:
        text.append(f"\n\n**When each wins, by these numbers.** {_verdict(rows, ref, best)}")
    return " ".join(text).replace(" \n\n", "\n\n")


def _gold_and_proxy(rows: Sequence[dict], ref: dict, best: dict, reference: str, n: int) -> list[str]:
    """The discussion's gold paragraph (who scored highest, verdicts by the gold gain's interval, where the two
    measures disagree, overlapping rivals) and its proxy-against-gold paragraph."""
    tied = _level_with(best, rows, ref)
    if best["gold"] > ref["gold"] and tied:
        names = ", ".join(f"{r['policy']} ({r['gold']:.3f}, winning {r['win_rate']:.2f} "
                          f"[{r['ci_low']:.2f}, {r['ci_high']:.2f}]{_record(r, '; ')})" for r in [best, *tied])
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
                f"comparisons [{best['ci_low']:.2f}, {best['ci_high']:.2f}]{_record(best, ': ')}."]
        if best["win_rate"] < 0.5:
            text.append("Its mean is higher, yet it wins fewer than half of its comparisons: a few large gains "
                        "outweigh more, smaller losses.")
    else:
        text = [f"**Gold reward.** On {n} held-out prompts no method raised the mean gold reward above {reference}'s "
                f"{ref['gold']:.3f} (the best, {best['policy']}, reached {best['gold']:.3f})."]
    verdicts = {r["policy"]: gold_verdict(r) for r in rows}
    above = [name for name, v in verdicts.items() if v == "better"]
    below = [name for name, v in verdicts.items() if v == "worse"]
    level = [name for name, v in verdicts.items() if v == "level"]
    gains = all(r.get("gain_ci_low") is not None for r in rows)
    by = "the gold gain's interval" if gains else "the bootstrap interval"
    if above:
        text.append(f"Better than {reference} beyond {by}: {', '.join(above)}.")
    if below:
        text.append(f"Worse than {reference} beyond {by}: {', '.join(below)}.")
    if level:
        holds = "the gain's interval holds 0" if gains else "the interval holds 0.5"
        text.append(f"Not distinguishable from {reference} at this budget ({holds}): {', '.join(level)}.")
    split = [(r["policy"], verdicts[r["policy"]], win_verdict(r)) for r in rows
             if r.get("gain_ci_low") is not None and win_verdict(r) != verdicts[r["policy"]]]
    for name, by_gain, by_count in split:
        text.append(f"For {name} the two measures disagree: by the size of its gains it is {_AS[by_gain]} "
                    f"{reference}, by the count of its wins (the win rate's interval) {_AS[by_count]} {reference}.")
    rivals = [r["policy"] for r in rows if r is not best and _upper(r) >= _lower(best)]
    if rivals:
        text.append(f"The intervals of {best['policy']} and {', '.join(rivals)} overlap, so their order is not settled "
                    f"by {n} prompts; more held-out prompts, or several replies per prompt, would settle it.")
    if ref.get("proxy") is not None:
        rise = proxy_rise_threshold(ref["n"])
        scored = [r for r in rows if r.get("proxy") is not None]

        def moved(rs):
            return "; ".join(f"{r['policy']} (proxy {r['proxy'] - ref['proxy']:+.2f}, "
                             f"gold {r['gold'] - ref['gold']:+.3f})" for r in rs)

        paired = all(r.get("proxy_gain_ci_low") is not None for r in scored)
        if paired:  # the same prompts, so the paired interval of the proxy gain says it
            risen = [r for r in scored if r["proxy_gain_ci_low"] > 0]
            fallen = [r for r in scored if r["proxy_gain_ci_high"] < 0]
            noise = "beyond its paired interval (the same prompts, bootstrapped)"
        else:
            risen = [r for r in scored if r["proxy"] - ref["proxy"] > rise]
            fallen = [r for r in scored if r["proxy"] - ref["proxy"] < -rise]
            noise = (f"beyond resampling noise ({rise:.2f} on {ref['n']} replies, in units of the standard "
                     f"deviation of {reference}'s proxy scores)")
        fooled = [r for r in risen if gold_verdict(r) != "better"]
        honest = [r for r in risen if r not in fooled]
        said = " ".join(part for part in (
            f"Raised the reward model's score {noise} but not the gold reward beyond its interval, the first "
            f"sign of over-optimisation: {moved(fooled)}." if fooled else "",
            f"Raised the reward model's score {noise} and the gold reward beyond its interval: {moved(honest)}."
            if honest else "",
            f"No method raised the reward model's score {noise}, so there is nothing yet to be gamed: at this "
            "budget the online methods have not climbed the reward they were trained against." if not risen else "",
        ) if part)
        if fallen:
            said += f" Lowered it {noise}: {moved(fallen)}."
        text.append("\n\n**Proxy against gold.** " + said)
    return text


def _record(r: dict, lead: str) -> str:
    """"8 won, 14 tied, 10 lost" after `lead`, where the row holds the counts (else "")."""
    if r.get("wins") is None:
        return ""
    return f"{lead}{r['wins']} won, {r['ties']} tied, {r['losses']} lost"


def _cost(r: dict) -> str:
    parts = [f"{r['wall_time_s']:.0f} s for {r.get('samples_seen') or 0} training samples"]
    if r.get("seconds_per_sample") is not None:
        parts.append(f"{r['seconds_per_sample']:.1f} s each")
    if r.get("memory_added_mb") is not None:
        parts.append(f"{r['memory_added_mb']:.0f} MB above its starting memory")
    return f"{r['policy']} " + ", ".join(parts)


def _lower(r: dict) -> float:
    """The lower end of a row's gold gain interval (its win rate's, less 0.5, when it has none)."""
    return r["gain_ci_low"] if r.get("gain_ci_low") is not None else r["ci_low"] - 0.5


def _upper(r: dict) -> float:
    return r["gain_ci_high"] if r.get("gain_ci_high") is not None else r["ci_high"] - 0.5


def _gain_text(r: dict) -> str:
    if r.get("gain_ci_low") is None:
        return ""
    return f"with a gain interval of [{r['gain_ci_low']:+.3f}, {r['gain_ci_high']:+.3f}], "


def win_verdict(r: dict) -> str:
    """'better', 'worse' or 'level' against the reference by the win rate's interval (against 0.5)."""
    return "better" if r["ci_low"] > 0.5 else "worse" if r["ci_high"] < 0.5 else "level"


def gold_verdict(r: dict) -> str:
    """'better', 'worse' or 'level' against the reference by the gold gain's paired interval (against 0): it
    weighs each win by its size, so it separates two policies sooner than the count of wins. Rows without a
    gain interval fall back to `win_verdict`."""
    if r.get("gain_ci_low") is None:
        return win_verdict(r)
    return "better" if r["gain_ci_low"] > 0 else "worse" if r["gain_ci_high"] < 0 else "level"


_AS = {"better": "better than", "worse": "worse than", "level": "not told apart from"}

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
    if gold_verdict(best) != "better":  # the order by gold may be noise: recommend nothing from it
        costed = [r for r in rows if r.get("seconds_per_sample")]
        cost = ""
        if len(costed) > 1:
            fast, slow = (f(costed, key=lambda r: r["seconds_per_sample"]) for f in (min, max))
            cost = (f" What the numbers do settle is the time per training sample at these budgets (above; samples "
                    f"differ in kind): "
                    f"{slow['policy']} took {slow['seconds_per_sample']:.1f} s, "
                    f"{slow['seconds_per_sample'] / fast['seconds_per_sample']:.1f} times {fast['policy']}'s "
                    f"{fast['seconds_per_sample']:.1f} s.")
        level = [r["policy"] for r in _level_with(best, rows, ref)]
        with_level = f", level with {', '.join(level)}" if level else ""
        return (f"None, by gold: the best, {best['policy']} ({best['gold'] - ref['gold']:+.3f} over {ref['policy']}"
                f"{with_level}), "
                f"{_gain_text(best)}wins {best['win_rate']:.2f} [{best['ci_low']:.2f}, {best['ci_high']:.2f}]: "
                f"not told apart from {ref['policy']}, so at this budget the order of the methods by gold may be "
                f"sampling noise.{cost} Until "
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
        cheap = min((r for r in online if r.get("seconds_per_sample")), key=lambda r: r["seconds_per_sample"],
                    default=None)
        top = max(online, key=lambda r: r["gold"])
        if cheap is not None and cheap is not top:
            says.append(f"Among the online methods {top['policy']} reached the most gold and {cheap['policy']} was the "
                        f"cheapest per training sample; choose by which of the two you are short of.")
        elif cheap is not None:
            says.append(f"Among the online methods {top['policy']} was both the best by gold and the cheapest per "
                        "training sample.")
    return " ".join(says)


CURVE_KEYS = {"proxy reward": ("objective/raw_scores", "objective/scores"), "gold reward": ("objective/gold",),
              "KL to reference (nats)": ("objective/kl",), "share of replies that ended": ("response/eos_frac",)}
"""Shared-axis curve -> the metrics keys it reads, first present wins. Every online stage's `objective/scores`
carries the missing-EOS penalty; `objective/raw_scores`, the reward model's score alone, is what the proxy curve
shows (runs logged before raw scores existed fall back to `objective/scores`). The share of replies that ended
before the token cap is what the penalty acts on."""


def lowest_kl(curves: dict[str, list[dict]]) -> dict[str, float]:
    """Each method's lowest training KL per reply in `online_curves` rows (methods that logged none are left
    out): below 0 where the estimate is the sampled log-ratio of one batch, which can be negative."""
    key = "KL to reference (nats)"
    return {m: min(r[key] for r in rows if r[key] is not None)
            for m, rows in curves.items() if any(r[key] is not None for r in rows)}


def online_curves(run_dir: str | os.PathLike, stages: Sequence[str] = ("ppo", "grpo", "rloo")
                  ) -> tuple[dict[str, list[dict]], dict[str, float]]:
    """({stage: rows with the CURVE_KEYS names}, {stage: samples per step}) for the stages that logged rows. A
    stage with rows but no summary to say how many samples a step took (one interrupted before it finished) is
    left out, and said so."""
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
        elif rows:
            print(f"{stage}: {len(rows)} logged steps left out of the shared curves: its summary.json does not say "
                  f"how many samples a step took (did the stage finish?)")
    return curves, per_step


def implicit_vs_reward(policy, tok, pairs, beta: float, reward) -> tuple[dict[str, Any], dict[str, Any]]:
    """DPO's implicit reward margins on `pairs` (policy: the DPO peft model) beside `reward`'s score margins.

    Returns ({'dpo_margin', 'rm_margin'}: arrays, one entry per pair, chosen − rejected) and statistics: each
    one's agreement with the labels (share of positive margins), DPO's mean margin, Spearman's ρ between the
    two margins, and `within_prompt_agreement` with `within_prompt_comparisons` (`implicit_order_agreement`).
    The two rewards of replies to different prompts are not compared: DPO's level for a prompt, β·log Z(x), is
    not identified."""
    import numpy as np

    from .dpo import pair_implicit_margins
    from .reward_tuner import spearman

    dpo_c, dpo_r = pair_implicit_margins(policy, tok, pairs, beta)
    prompts = [p.conversation for p in pairs]
    rm_c = np.array(reward.score(prompts, [p.chosen for p in pairs]))
    rm_r = np.array(reward.score(prompts, [p.rejected for p in pairs]))
    margins = {"dpo_margin": dpo_c - dpo_r, "rm_margin": rm_c - rm_r}
    replies = [(p.prompt, p.chosen, a, b) for p, a, b in zip(pairs, rm_c, dpo_c)] + \
              [(p.prompt, p.rejected, a, b) for p, a, b in zip(pairs, rm_r, dpo_r)]
    agreement, compared = implicit_order_agreement(replies)
    stats = {"dpo_pair_accuracy": float(np.mean(margins["dpo_margin"] > 0)),
             "rm_pair_accuracy": float(np.mean(margins["rm_margin"] > 0)),
             "dpo_mean_margin": float(np.mean(margins["dpo_margin"])),
             "spearman_margins": spearman(list(margins["rm_margin"]), list(margins["dpo_margin"])),
             "within_prompt_agreement": agreement, "within_prompt_comparisons": compared, "n_pairs": len(pairs)}
    return margins, stats


def implicit_order_agreement(replies: Sequence[tuple[str, str, float, float]]) -> tuple[float | None, int]:
    """(share, count): over every two distinct replies to the same prompt, the share that two rewards order the
    same way, and how many such two-reply comparisons there were (a tie under either reward is left out).
    `replies`: (prompt, reply, reward a, reward b), any number of replies per prompt, so DPO's pairs can be
    compared with the reward model's scores; `evaluate.within_prompt_agreement` is the same idea for k replies
    per prompt against gold, ties counting half. Only orders within a prompt are compared, because DPO's
    implicit reward is identified only up to a constant per prompt."""
    by_prompt: dict[str, dict[str, tuple[float, float]]] = {}
    for prompt, reply, a, b in replies:
        by_prompt.setdefault(prompt, {})[reply] = (float(a), float(b))
    agree = compared = 0
    for scored in by_prompt.values():
        for (a1, b1), (a2, b2) in itertools.combinations(scored.values(), 2):
            if a1 != a2 and b1 != b2:
                compared += 1
                agree += (a1 > a2) == (b1 > b2)
    return (agree / compared if compared else None), compared


def rm_held_out_accuracy(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """Notebook 03's accuracy of the reward model on all its held-out pairs, with its interval, from
    run_dir/rm/summary.json: {'accuracy', 'ci_low', 'ci_high', 'pairs'}; None when notebook 03 has not run."""
    summary = _read(run_dir, "rm", "summary.json")
    if summary.get("eval_accuracy") is None:
        return None
    low, high = summary.get("eval_accuracy_ci") or (None, None)
    # the pairs the accuracy was measured on; a run from before that count was saved has TRL's (the same unless
    # some held-out pairs were past max_length)
    pairs = summary.get("eval_accuracy_pairs", summary.get("eval_pairs"))
    return {"accuracy": summary["eval_accuracy"], "ci_low": low, "ci_high": high, "pairs": pairs}


def held_out_note(implicit: dict[str, Any], rm_full: dict[str, Any] | None) -> str:
    """Markdown: the pair accuracies of `implicit_vs_reward` with their uncertainty on this many pairs, beside
    notebook 03's accuracy of the reward model on all its held-out pairs (`rm_held_out_accuracy`)."""
    n = implicit["n_pairs"]
    text = (f"On these {n} held-out pairs the reward model orders {implicit['rm_pair_accuracy']:.2f} as the annotator "
            f"did and DPO {implicit['dpo_pair_accuracy']:.2f}; on {n} pairs an accuracy near 0.5 is uncertain by "
            f"about ±{1.96 * math.sqrt(0.25 / max(n, 1)):.2f} (95%).")
    if rm_full is not None:
        interval = (f" [{rm_full['ci_low']:.2f}, {rm_full['ci_high']:.2f}]" if rm_full.get("ci_low") is not None else "")
        text += (f" Notebook 03 measured the reward model on all {rm_full['pairs']} of its held-out pairs: "
                 f"**{rm_full['accuracy']:.2f}{interval}**, the figure to quote for it.")
    return text


def truncation_note(summary: dict[str, Any], eval_tokens: int) -> str:
    """One line: the share of an online stage's replies that ended within its training token cap, at the first
    and the last step, beside the token limit of the held-out evaluation."""
    first, last = summary.get("eos_frac_first"), summary.get("eos_frac_last")
    cap, steps = summary.get("max_completion_length"), summary.get("steps")
    if first is None or last is None:
        return f"{summary.get('stage')}: no response/eos_frac was logged."
    when = f"{first:.0%} at step 1, {last:.0%} at step {steps}" if (steps or 0) > 1 else f"{last:.0%} at its one step"
    return (f"{summary.get('stage')}: replies that ended within the {cap}-token training cap: {when}; the others "
            f"lost the missing-EOS penalty. The held-out evaluation lets replies run to {eval_tokens} tokens.")
