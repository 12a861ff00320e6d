"""The run report: `run_dir/eval/report.html`, one self-contained page (opens with no network).

It is built from files only, so it can be rebuilt without a model: the results that notebook 06 writes to
`run_dir/eval/summary.json` (see `EVAL_SUMMARY_FIELDS`) and every stage's `metrics.jsonl`. plotly.js is
inlined once in the page head; every figure after that refers to it, and nothing is fetched from a server.
"""
from __future__ import annotations

import html
import json
import os
import re
from pathlib import Path
from typing import Any

from .paths import resolve_run_dir
from .tracking import atomic_write_text, read_json

EVAL_SUMMARY_FIELDS = {
    "profile": "the profile the run used (smoke, cpu, gpu)",
    "seed": "the run's seed",
    "reference": "the policy the win rates are measured against (sft, or base when SFT is missing)",
    "policies": "rows of evaluate.results_table: one per evaluated policy",
    "missing": "policy stages the run lacks, with why",
    "frontier": "points of evaluate.frontier_points (final policies and checkpoints)",
    "parting": "per online RL stage, evaluate.parting_point of gold against proxy (or null)",
}
"""Fields of `run_dir/eval/summary.json` (written by notebook 06), each with what it holds. Summaries also
hold `parting_notes` (per online stage, `evaluate.parting_note`), and each policy row gain, gain_ci_low,
gain_ci_high, proxy_gain (with proxy_gain_ci_low and proxy_gain_ci_high), wins, ties, losses and rows_file
(where its scored replies are; `check_results` looks for eval/policies/<policy>.jsonl in a summary without
it); the report does without them, for summaries written before they were."""

POLICY_ROW_FIELDS = ("policy", "gold", "proxy", "kl", "win_rate", "ci_low", "ci_high", "distinct_1", "distinct_2",
                     "length", "n")
"""Fields of each row of `policies` (see `evaluate.results_table`)."""

_REMOTE = r"[\"']?\s*(?:https?:)?//[^\s\"'<>)]*"  # an http(s) or protocol-relative address, through its host and path
NETWORK_REFERENCE = re.compile(
    r"<(?:script|link|img|iframe|embed|source|video|audio|input)\b[^>]*?\b(?:src|href|srcset|poster)\s*=\s*" + _REMOTE
    + r"|<object\b[^>]*?\bdata\s*=\s*" + _REMOTE
    # CSS in a <style> block (escaped page text holds no "<style"): @import "…", @import url(…), url(…)
    + r"|<style\b[^>]*>[^<]*?(?:@import\s+(?:url\(\s*)?|url\(\s*)" + _REMOTE,
    re.IGNORECASE)


def read_eval_summary(run_dir: str | os.PathLike) -> dict[str, Any]:
    """`run_dir/eval/summary.json`, checked: FileNotFoundError when absent, ValueError naming the field that
    is missing or malformed."""
    path = resolve_run_dir(run_dir) / "eval" / "summary.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run notebook 06 (06_evaluation) on this run folder first")
    try:
        summary = read_json(path)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); re-run notebook 06 to rewrite it") from e
    if not isinstance(summary, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(summary).__name__}; re-run notebook 06")
    missing = [k for k in EVAL_SUMMARY_FIELDS if k not in summary]
    if missing:
        raise ValueError(f"{path}: missing field(s) {missing}; re-run notebook 06 to rewrite it")
    if not isinstance(summary["policies"], list) or not summary["policies"]:
        raise ValueError(f"{path}: field 'policies' must be a non-empty list of result rows; re-run notebook 06")
    for i, row in enumerate(summary["policies"]):
        lacking = [k for k in POLICY_ROW_FIELDS if k not in row] if isinstance(row, dict) else list(POLICY_ROW_FIELDS)
        if lacking:
            raise ValueError(f"{path}: policies[{i}] lacks {lacking}; re-run notebook 06")
        if not isinstance(row["gold"], (int, float)):
            raise ValueError(f"{path}: policies[{i}] ({row['policy']}) has gold={row['gold']!r}, not a number")
    return summary


def network_references(page: str) -> list[str]:
    """What in `page` would fetch something from a server: a tag (script, link, img, iframe, embed, source,
    video, audio, input, object) whose src/href/srcset/poster/data is an http(s) or protocol-relative address,
    or a CSS @import or url() of one in a <style> block; an offline page has none. Each is given from its tag
    through the address (a <style> block's from its last 80 characters)."""
    found = []
    for m in NETWORK_REFERENCE.finditer(page):
        text = m.group(0)
        found.append(text if len(text) <= 200 or not text.lower().startswith("<style") else "<style>…" + text[-80:])
    return found


def report_figures(run_dir: str | os.PathLike, summary: dict[str, Any]) -> dict[str, Any]:
    """The report's figures, by caption: win rates, the frontier, gold vs proxy, every stage's curves."""
    from . import plotting
    from .evaluate import curve_keys, gold_proxy_over_training, stage_metrics

    ref = summary["reference"]
    curves = stage_metrics(run_dir)
    over = gold_proxy_over_training(run_dir)
    for stage, series in over.items():  # the parting points notebook 06 found (and may have tuned) win
        series["parting"] = summary["parting"].get(stage, series["parting"])
    return {
        f"Win rate against {ref}: how often the gold judge prefers each policy's reply to {ref}'s on the same "
        f"prompt (ties count half), with a bootstrap 95% interval over prompts.":
            plotting.win_rate_bars(summary["policies"], ref),
        "The reward–KL frontier: mean gold reward against the Monte-Carlo KL to the SFT reference, for every "
        "policy (large markers, all prompts) and every saved checkpoint (small markers, joined in step order from "
        "the reference to the final policy, every point of a line on the checkpoint prompts only). Up and to the "
        "left is better: more reward for less divergence.":
            plotting.gold_kl_frontier(summary["frontier"], ref),
        "Over-optimisation: gold and proxy reward of the samples each online RL step trained on (dots: single "
        "steps; lines: moving means; each on its own axis). Where the proxy keeps rising and gold does not, the "
        "policy has found what the reward model over-rates; a dashed line marks that parting point when there is "
        "one (see evaluate.parting_point).":
            plotting.gold_vs_proxy(over),
        "Every stage's training curves, from its metrics.jsonl.":
            plotting.stage_curves(curves, {s: curve_keys(s, rows) for s, rows in curves.items()}),
    }


def _run_facts() -> str:
    """A line on the software that built the report (the run's own record, run.json, is written after it)."""
    from .run import versions

    v = versions()
    return (f"<p>Built with torch {html.escape(v['torch'])}, transformers {html.escape(v['transformers'])}, "
            f"trl {html.escape(v['trl'])}, peft {html.escape(v['peft'])} on Python {html.escape(v['python'])}, "
            f"commit {html.escape(v.get('git_commit', 'unknown')[:12])}.</p>")


def _stage_summaries(root: Path) -> str:
    parts = []
    for path in sorted(root.glob("*/summary.json")):
        text = path.read_text(encoding="utf-8")
        parts.append(f"<details><summary>{html.escape(path.parent.name)}/summary.json</summary>"
                     f"<pre>{html.escape(text)}</pre></details>")
    return "".join(parts)


def _markdown_paragraphs(text: str) -> str:
    """The little markdown `comparison.discussion` writes (paragraphs, **bold**) as escaped HTML."""
    paragraphs = [html.escape(part.strip()) for part in text.split("\n\n") if part.strip()]
    return "".join("<p>" + re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", part) + "</p>" for part in paragraphs)


def render_report(run_dir: str | os.PathLike, summary: dict[str, Any], figures: dict[str, Any]) -> str:
    """The page as a string: plotly.js inlined once in the head, the results table, every figure."""
    from plotly.offline import get_plotlyjs

    from .comparison import discussion
    from .evaluate import format_results

    root = resolve_run_dir(run_dir)
    ref = summary["reference"]
    table = format_results(summary["policies"], ref).to_html(index=False, escape=True, border=0, classes="results")
    reading = _markdown_paragraphs(discussion([r for r in summary["policies"] if r["policy"] != "base" or ref == "base"],
                                              ref))  # base is left out unless it is the reference (no SFT model)
    missing = "".join(f"<li><b>{html.escape(s)}</b>: {html.escape(why)}</li>" for s, why in summary["missing"].items())
    parting = []
    notes = summary.get("parting_notes") or {}
    for stage, p in (summary.get("parting") or {}).items():
        note = notes.get(stage) or (  # a summary written before notes were kept
            f"gold stopped rising at step {p['step']} (gold {p['gold_at']:.3f} → {p['gold_end']:.3f}) while "
            f"the proxy rose {p['proxy_at']:.2f} → {p['proxy_end']:.2f}" if p else "no parting point")
        parting.append(f"<li>{html.escape(stage)}: {html.escape(note)}</li>")
    figs = "".join(
        f"<figure>{fig.to_html(full_html=False, include_plotlyjs=False, config={'displaylogo': False})}"
        f"<figcaption>{html.escape(caption)}</figcaption></figure>" for caption, fig in figures.items())
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>RLHF evaluation: {html.escape(root.name)}</title>"
        "<style>body{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em}"
        "table.results{border-collapse:collapse}table.results td,table.results th{padding:.25em .8em;"
        "border-bottom:1px solid #ddd;text-align:right}figure{margin:2em 0}figcaption{color:#444;max-width:60em}"
        "pre{background:#f6f6f6;padding:1em;overflow:auto}</style>"
        f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
        f"<h1>RLHF evaluation: {html.escape(root.name)}</h1>"
        f"<p>Profile <b>{html.escape(str(summary['profile']))}</b>, seed {html.escape(str(summary['seed']))}. "
        f"Each policy answered the same held-out prompts with the same sampling seed; the gold judge and the "
        f"reward model (proxy) scored the replies. KL is the Monte-Carlo sequence KL to the SFT reference.</p>"
        + _run_facts()
        + f"<h2>Results</h2>{table}{reading}"
        + (f"<h3>Not in this run</h3><ul>{missing}</ul>" if missing else "")
        + (f"<h3>Did the reward model start lying?</h3><ul>{''.join(parting)}</ul>" if parting else "")
        + f"<h2>Figures</h2>{figs}<h2>Stage summaries</h2>{_stage_summaries(root)}</body></html>"
    )


def build_report(run_dir: str | os.PathLike, figures: dict[str, Any] | None = None) -> Path:
    """Write `run_dir/eval/report.html` (atomically) from `eval/summary.json` and the stages' metrics;
    returns its path. `figures` ({caption: figure}) replaces the default `report_figures`."""
    summary = read_eval_summary(run_dir)
    figures = report_figures(run_dir, summary) if figures is None else figures
    page = render_report(run_dir, summary, figures)
    found = network_references(page)
    if found:  # a figure or template that reaches for a server would break the offline promise
        raise RuntimeError(f"the report would fetch from the network: {found[:3]}")
    return atomic_write_text(resolve_run_dir(run_dir) / "eval" / "report.html", page)
