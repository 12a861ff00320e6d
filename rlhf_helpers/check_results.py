"""Check a finished run against what the README promises: `python -m rlhf_helpers.check_results RUN_DIR`.

Prints the results table (from `run_dir/eval/summary.json`, written by notebook 06) and a few figures of
the stage summaries, then one PASS/FAIL line per named expectation. Every profile gets the *artifact*
checks (files exist and are well-formed); a `cpu` run also gets the *promises* in `EXPECTATIONS`, the ones
README.md lists under "What a cpu run promises" by the same names.

Exit status: 0 when every check passes, 1 when one fails, 2 when the run folder or its evaluation summary
is missing or unreadable (with a message saying what to run).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

RL_POLICIES = ("ppo", "dpo", "grpo", "rloo")


@dataclass(frozen=True)
class Expectation:
    """One named promise: `check(facts, threshold) -> (passed, detail)`; `doc` says what and why."""

    doc: str
    threshold: Any
    check: Callable[[dict, Any], tuple[bool, str]]


def _row(facts: dict, policy: str) -> dict | None:
    return next((r for r in facts["eval"]["policies"] if r["policy"] == policy), None)


def _sft_beats_base(facts: dict, threshold: float) -> tuple[bool, str]:
    base = _row(facts, "base")
    if facts["eval"]["reference"] != "sft" or base is None or base["win_rate"] is None:
        return False, "needs base and SFT evaluated, with SFT as the reference"
    # win rate of SFT against base = 1 − base's against SFT (ties count half both ways)
    win, low, high = 1 - base["win_rate"], 1 - base["ci_high"], 1 - base["ci_low"]
    prompts = base.get("prompts", base["n"])  # summaries written before `prompts` existed have only n
    undecided = "; the interval holds 0.5, so SFT is not shown better beyond noise" if low <= 0.5 <= high else ""
    return win > threshold, (f"SFT wins {win:.2f} [{low:.2f}, {high:.2f}] against base on {prompts} prompts "
                             f"(needs > {threshold}, a point estimate{undecided})")


def _rm_accuracy(facts: dict, threshold: float) -> tuple[bool, str]:
    rm = facts["stages"].get("rm")
    if not rm or not isinstance(rm.get("eval_accuracy"), (int, float)):
        return False, "rm/summary.json has no eval_accuracy (notebook 03 did not finish)"
    ceiling = rm.get("bayes_ceiling")
    extra = f" (Bayes ceiling {ceiling:.3f})" if isinstance(ceiling, (int, float)) else ""
    ci = rm.get("eval_accuracy_ci")
    interval = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if isinstance(ci, (list, tuple)) and len(ci) == 2 else ""
    return rm["eval_accuracy"] >= threshold, (f"held-out accuracy {rm['eval_accuracy']:.3f}{interval}{extra} "
                                              f"(needs >= {threshold}, a point estimate)")


def _rl_not_worse(facts: dict, threshold: float) -> tuple[bool, str]:
    rows = [r for r in facts["eval"]["policies"] if r["policy"] in RL_POLICIES and r["win_rate"] is not None]
    if not rows or facts["eval"]["reference"] != "sft":
        return False, "no RL policy was evaluated against SFT"
    best = max(rows, key=lambda r: r["ci_high"])
    listing = ", ".join(f"{r['policy']} {r['win_rate']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]" for r in rows)
    beyond = [r["policy"] for r in rows if r["ci_low"] > threshold]
    verdict = (f"beats SFT beyond its interval: {', '.join(beyond)}" if beyond else
               "none beats SFT beyond its interval")
    return best["ci_high"] >= threshold, f"win rates against SFT: {listing}; {verdict} " \
                                         f"(needs one interval reaching {threshold})"


def _policies_complete(facts: dict, expected: Sequence[str]) -> tuple[bool, str]:
    have = [r["policy"] for r in facts["eval"]["policies"]]
    lacking = [p for p in expected if p not in have]
    why = "; ".join(f"{p}: {facts['eval']['missing'].get(p, 'not evaluated')}" for p in lacking)
    return not lacking, f"evaluated {have}" + (f"; missing {why}" if lacking else "")


EXPECTATIONS: dict[str, Expectation] = {
    "sft_beats_base": Expectation(
        "SFT's replies beat the base model's by the gold judge on the held-out prompts: win rate above the "
        "threshold (ties half). SFT on the shipped demonstrations teaches length, format and finishing.",
        0.5, _sft_beats_base),
    "reward_model_learns": Expectation(
        "The reward model's accuracy on held-out preference pairs reaches the threshold (chance is 0.5; the "
        "Bayes ceiling of the noisy annotator on the cpu run's held-out pairs is about 0.73).",
        0.6, _rm_accuracy),
    "rl_not_worse_than_sft": Expectation(
        "At least one of PPO, DPO, GRPO and RLOO is not worse than SFT beyond doubt by the gold judge: the upper "
        "end of its win-rate interval against SFT reaches the threshold. This catches an RL stage that broke the "
        "policy. It does not claim that RL beat SFT: a cpu run is too short for that "
        "(docs/rl_on_a_cpu_budget.md), and the detail line says whether any policy beat SFT beyond its interval.",
        0.5, _rl_not_worse),
    "every_policy_evaluated": Expectation(
        "Every policy the cpu profile trains was found and evaluated (none skipped for a missing artifact).",
        ("base", "sft", "ppo", "dpo", "grpo", "rloo"), _policies_complete),
}
"""What a `cpu` run promises (README.md, "What a cpu run promises"): name -> Expectation."""

PROMISED_PROFILES = ("cpu",)
"""Profiles whose runs are held to EXPECTATIONS; other profiles get the artifact checks only."""


def artifact_checks(run_dir: Path, facts: dict) -> dict[str, tuple[bool, str]]:
    """Checks that every artifact exists and is well-formed (all profiles)."""
    from .report import network_references
    from .tracking import read_metrics

    out: dict[str, tuple[bool, str]] = {}
    bad = {name: err for name, err in facts["stage_errors"].items()}
    out["stage_summaries_readable"] = (not bad, f"{len(facts['stages'])} stage summaries read" +
                                       (f"; unreadable: {bad}" if bad else ""))
    problems = []
    for row in facts["eval"]["policies"]:
        path = run_dir / (row.get("rows_file") or f"eval/policies/{row['policy']}.jsonl")
        try:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except (OSError, json.JSONDecodeError) as e:
            problems.append(f"{path}: {e}")
            continue
        if len(rows) != row["n"] or not all(isinstance(r.get("gold"), (int, float)) for r in rows):
            problems.append(f"{path}: {len(rows)} rows (summary says {row['n']}), each needs a numeric 'gold'")
    out["policy_evaluations_saved"] = (not problems, "; ".join(problems) or
                                       f"{len(facts['eval']['policies'])} policies, each with its scored replies")
    problems = []
    for path in sorted(run_dir.glob("*/metrics.jsonl")):
        try:
            read_metrics(path)
        except ValueError as e:
            problems.append(str(e))
    out["metrics_readable"] = (not problems, "; ".join(problems) or "every metrics.jsonl parses")
    report = run_dir / "eval" / "report.html"
    if not report.exists():
        out["report_offline"] = (False, f"{report} does not exist (notebook 06 builds it)")
    else:
        page = report.read_text(encoding="utf-8")
        refs = network_references(page)
        ok = not refs and "Plotly" in page
        out["report_offline"] = (ok, f"{report}: " + ("plotly.js inlined, no network references" if ok else
                                                      f"network references {refs[:3]}" if refs else "no plotly.js inlined"))
    return out


def load_facts(run_dir: Path) -> dict:
    """eval/summary.json (checked) and every stage's summary.json (unreadable ones listed, not skipped)."""
    from .report import read_eval_summary

    facts: dict[str, Any] = {"eval": read_eval_summary(run_dir), "stages": {}, "stage_errors": {}}
    for path in sorted(run_dir.glob("*/summary.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError(f"expected a JSON object, got {type(data).__name__}")
            facts["stages"][path.parent.name] = data
        except (OSError, ValueError) as e:
            facts["stage_errors"][path.parent.name] = f"{path}: {e}"
    return facts


STAGE_FACTS = {
    "sft": ("eval_loss_before", "eval_loss_after", "win_rate_vs_base"),
    "rm": ("eval_accuracy", "bayes_ceiling", "spearman_with_gold"),
    "ppo": ("steps", "gold_first", "gold_last"),
}


def _fmt(value: Any) -> str:
    if isinstance(value, dict) and "win_rate" in value:
        return f"{value['win_rate']:.2f} [{value.get('ci_low', float('nan')):.2f}, {value.get('ci_high', float('nan')):.2f}]"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def main(argv: Sequence[str] | None = None) -> int:
    from .config import PROFILES

    parser = argparse.ArgumentParser(prog="python -m rlhf_helpers.check_results", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="the run folder (e.g. runs/cpu)")
    parser.add_argument("--profile", default=None, choices=sorted(PROFILES),
                        help="hold the run to this profile's promises "
                        "(default: the profile recorded in eval/summary.json)")
    args = parser.parse_args(argv)
    from .evaluate import format_results
    from .paths import project_root

    run_dir = Path(args.run_dir).expanduser()
    run_dir = run_dir if run_dir.is_absolute() else project_root() / run_dir
    if not run_dir.is_dir():
        what = "is a file, not a run folder" if run_dir.exists() else "does not exist"
        print(f"error: run folder {run_dir} {what}; run `make run` (or name another folder)", file=sys.stderr)
        return 2
    try:
        facts = load_facts(run_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ev = facts["eval"]
    profile = args.profile or ev["profile"]
    print(f"Results of {run_dir} (profile {ev['profile']}, seed {ev['seed']}; win rates against {ev['reference']}):")
    print(format_results(ev["policies"], ev["reference"]).to_string(index=False))
    for stage, keys in STAGE_FACTS.items():
        found = {k: facts["stages"].get(stage, {}).get(k) for k in keys if k in facts["stages"].get(stage, {})}
        if found:
            print(f"  {stage}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in found.items()))
    for stage, reason in ev["missing"].items():
        print(f"  not in this run: {stage} ({reason})")

    results = artifact_checks(run_dir, facts)
    if profile in PROMISED_PROFILES:
        for name, exp in EXPECTATIONS.items():
            results[name] = exp.check(facts, exp.threshold)
    print(f"\nChecks (profile {profile}" + ("" if profile in PROMISED_PROFILES else
                                          ": artifacts only; the README's promises are for a cpu run") + "):")
    width = max(map(len, results))
    for name, (ok, detail) in results.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name:<{width}}  {detail}")
    failed = [n for n, (ok, _) in results.items() if not ok]
    print(f"\n{len(results) - len(failed)} of {len(results)} checks passed" + (f"; failed: {', '.join(failed)}" if failed else ""))
    report = run_dir / "eval" / "report.html"
    if report.exists():
        print(f"Report: {report}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
