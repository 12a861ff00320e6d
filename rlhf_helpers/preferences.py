"""Preference data: sample responses from a policy, pair them, label pairs with the simulated annotator.

Each prompt gets sampled responses (seeded), either `k` at one temperature or one at each of several
temperatures (`sample_at_temperatures`, the default of notebook 03: 0.7 and 1.3, because two samples at
one temperature are often near-ties by gold, and near-ties teach a reward model nothing). They are paired
disjointly, (0, 1), (2, 3), ..., so that pairs are independent; pairs of identical responses are skipped
and counted. The annotator labels each pair by Bradley–Terry on the gold reward. Every pair carries its
provenance: policy, temperature, seed, both gold rewards and the annotator's temperature, so its Bayes
ceiling can be computed and the file can be traced back to how it was made.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from .data import DataError, LoadReport, PreferencePair, load_preferences, read_jsonl, write_jsonl
from .data_formats import json_type
from .gold import SimulatedAnnotator
from .models import generate


def sample_responses(model, tokenizer, prompts: Sequence[str], k: int, *, temperature: float = 1.0,
                     max_new_tokens: int = 128, seed: int = 0, batch_size: int = 8) -> list[list[str]]:
    """`k` sampled replies per prompt, as a list per prompt (prompt order kept)."""
    if k < 2:
        raise ValueError(f"pairs need at least 2 samples per prompt, got k={k}")
    flat = generate(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens, temperature=temperature,
                    seed=seed, batch_size=batch_size, num_return_sequences=k)
    return [flat[i * k:(i + 1) * k] for i in range(len(prompts))]


def sample_at_temperatures(model, tokenizer, prompts: Sequence[str], temperatures: Sequence[float], *,
                           max_new_tokens: int = 128, seed: int = 0, batch_size: int = 8) -> list[list[str]]:
    """One reply per prompt at each temperature: comparisons between a careful and a looser sample differ
    more than two samples at one temperature, so the labels carry more signal (gold is never consulted)."""
    if len(temperatures) < 2:
        raise ValueError(f"pairs need at least 2 temperatures, got {list(temperatures)}")
    per_temp = [generate(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens, temperature=t,
                         seed=seed + 1000 * i, batch_size=batch_size) for i, t in enumerate(temperatures)]
    return [list(replies) for replies in zip(*per_temp)]


def label_samples(prompts: Sequence[str], samples: Sequence[Sequence[str]], annotator: SimulatedAnnotator,
                  provenance: dict[str, Any]) -> tuple[list[PreferencePair], Counter]:
    """Disjoint pairs of each prompt's samples, labelled; returns the pairs and the skip counts."""
    skipped: Counter = Counter()
    p_list, a_list, b_list = [], [], []
    for prompt, replies in zip(prompts, samples):
        for i in range(0, len(replies) - 1, 2):
            a, b = replies[i], replies[i + 1]
            if a.strip() == b.strip():
                skipped["identical_responses"] += 1
                continue
            if not a.strip() or not b.strip():
                skipped["empty_response"] += 1
                continue
            p_list.append(prompt)
            a_list.append(a)
            b_list.append(b)
    pairs = annotator.label(p_list, a_list, b_list)
    for pair in pairs:
        pair.metadata.update(provenance)
    if skipped:
        print(f"skipped {sum(skipped.values())} pair(s): {dict(skipped)}")
    return pairs, skipped


def pair_rows(pairs: Sequence[PreferencePair]) -> list[dict[str, Any]]:
    """Pairs as JSON lines in the `preferences` format, with provenance fields beside them."""
    return [{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, **p.metadata} for p in pairs]


def write_pairs(path: str | Path, pairs: Sequence[PreferencePair]) -> Path:
    return write_jsonl(path, pair_rows(pairs))


GOLD_FIELDS = ("gold_chosen", "gold_rejected", "annotator_temperature")
"""What the Bayes ceiling (`gold.pair_ceiling`, `gold.gold_ties`) reads of every pair."""

NO_GOLD_HINT = ("Pairs made by write_pairs (notebook 03, scripts/make_preference_snapshot.py) carry them; remake "
                "simulated pairs that way. Human-labelled pairs have no gold rewards, so no Bayes ceiling: keep them "
                "out of run_dir/preferences/pairs.jsonl (notebook 05 and `python -m rlhf_helpers.dpo` read it with "
                "read_pairs; notebook 03 overwrites it), load them with rlhf_helpers.data.load_preferences and pass "
                "them to reward_model.train_reward_model or dpo.train_dpo, which need no gold")


def _gold_error(row: dict[str, Any]) -> DataError | None:
    """The first of `GOLD_FIELDS` the Bayes ceiling cannot use: missing, not a finite number, a temperature <= 0."""
    for key in GOLD_FIELDS:
        if key not in row:
            return DataError("missing (the Bayes ceiling needs both gold rewards and the annotator's temperature)",
                             NO_GOLD_HINT, field=key)
        value = row[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            shown = value if json_type(value) == "number" else json_type(value)
            return DataError(f"expected a finite number, got {shown}",
                             "Write it as a JSON number, as write_pairs does (e.g. 0.42)", field=key)
        if key == "annotator_temperature" and value <= 0:
            return DataError(f"must be > 0, got {value}",
                             "Write the temperature of the SimulatedAnnotator that labelled the pair (e.g. 0.1)",
                             field=key)
    return None


def read_pairs(path: str | Path) -> list[PreferencePair]:
    """Pairs written by `write_pairs` (validated like any preferences file; provenance in metadata). Every line
    must also carry `GOLD_FIELDS` as finite numbers; else a `DataError` names the first bad line and field."""
    pairs = load_preferences(path)
    bad = []
    quiet = LoadReport(str(path), "preferences")  # load_preferences has logged the file's warnings already
    for line_no, row in read_jsonl(path, report=quiet):
        err = _gold_error(row)
        if err is not None:
            err.path, err.line = str(path), line_no
            bad.append(err)
    if bad:
        if len(bad) > 1:
            bad[0].message += f"; {len(bad)} of {len(pairs)} lines have a missing or bad gold field"
        raise bad[0]
    return pairs


def snapshot_info(path: str | Path) -> dict[str, Any]:
    """The provenance of a snapshot's pairs (policy, temperatures, seeds...): each field's value when every
    line shares it, else the sorted list of its distinct values (a snapshot of two rounds has two seeds)."""
    per_pair = ("prompt", "chosen", "rejected", "gold_chosen", "gold_rejected", "p_chosen")
    values: dict[str, list] = {}
    for _, row in read_jsonl(path):  # a malformed line raises a DataError naming the file and line
        for k, v in row.items():
            if k not in per_pair and v not in values.setdefault(k, []):
                values[k].append(v)
    return {k: v[0] if len(v) == 1 else sorted(v, key=json.dumps) for k, v in values.items()}
