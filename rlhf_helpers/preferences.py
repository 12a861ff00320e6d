"""Preference data: sample responses from a policy, pair them, label pairs with the simulated annotator.

Each prompt gets sampled responses (seeded), either `k` at one temperature or one at each of several
temperatures (`sample_at_temperatures`, the default of notebook 03: 0.7 and 1.3, because two samples at
one temperature are often near-ties by gold, and near-ties teach a reward model nothing). They are paired
disjointly, (0, 1), (2, 3), ..., so that pairs are independent; pairs of identical responses are skipped
and counted. The annotator labels each pair by Bradley–Terry on the gold reward. Every pair carries its
provenance: policy, temperatures (with `label_samples(temperatures=...)`, the one each side was sampled at),
seed, both gold rewards and the annotator's temperature, so its Bayes ceiling can be computed and the file
can be traced back to how it was made.

Notebook 03 samples a few prompts live (`live_train_prompts`) and takes the rest from the shipped snapshot
(`load_snapshot`), which it checks against the run: the annotator temperature must match, and a snapshot
sampled from another SFT model than the run's is said aloud (`snapshot_policy_differences`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .data import (DataError, LoadReport, PreferencePair, load_preferences, read_jsonl, to_trl_preference_dataset,
                   train_prompts, write_jsonl)
from .data_formats import json_type
from .gold import SimulatedAnnotator
from .models import generate
from .paths import resolve_run_dir
from .tracking import read_json

if TYPE_CHECKING:
    from .reward_model import RMStageConfig


def live_train_prompts(n: int) -> list[str]:
    """The last `n` train prompts: those notebook 03 samples live (their pairs replace the snapshot's)."""
    prompts = train_prompts()
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(prompts):
        raise ValueError(f"n_live_prompts must be a whole number from 1 to {len(prompts)} (the train prompts of "
                         f"data/prompts.jsonl), got {n!r}")
    return prompts[-n:]


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
                  provenance: dict[str, Any], temperatures: Sequence[float] | None = None,
                  ) -> tuple[list[PreferencePair], Counter]:
    """Disjoint pairs of each prompt's samples, labelled; returns the pairs and the skip counts.

    `temperatures`, one per reply of a prompt (`sample_at_temperatures`' order), adds `temperature_chosen` and
    `temperature_rejected` to every pair: which side was the careful sample is lost once the annotator has
    ordered the two."""
    if len(prompts) != len(samples):
        raise ValueError(f"one list of replies per prompt: got {len(prompts)} prompts and {len(samples)} lists")
    skipped: Counter = Counter()
    p_list, a_list, b_list, t_list = [], [], [], []
    for prompt, replies in zip(prompts, samples):
        if temperatures is not None and len(replies) != len(temperatures):
            raise ValueError(f"temperatures gives {len(temperatures)} temperatures, one per reply, but prompt "
                             f"{prompt[:60]!r} has {len(replies)} replies")
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
            t_list.append(None if temperatures is None else (temperatures[i], temperatures[i + 1]))
    pairs = annotator.label(p_list, a_list, b_list)
    for pair, a, temps in zip(pairs, a_list, t_list):
        pair.metadata.update(provenance)
        if temps is not None:  # a != b (identical replies were skipped), so chosen == a tells the sides apart
            t_chosen, t_rejected = temps if pair.chosen == a else temps[::-1]
            pair.metadata.update(temperature_chosen=float(t_chosen), temperature_rejected=float(t_rejected))
    if skipped:
        print(f"skipped {sum(skipped.values())} pair(s): {dict(skipped)}")
    return pairs, skipped


def pair_rows(pairs: Sequence[PreferencePair]) -> list[dict[str, Any]]:
    """Pairs as JSON lines in the `preferences` format, with provenance fields beside them. A pair whose prompt
    is a conversation (a system message, earlier turns) is written in the conversational form, which keeps it."""
    return [{**to_trl_preference_dataset([p], conversational=bool(p.prompt_messages))[0], **p.metadata} for p in pairs]


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


SNAPSHOT_POLICY = re.compile(r"notebook 02, (?P<profile>\w+) profile, seed (?P<seed>\d+)")
"""How a snapshot's `policy` names the SFT run its replies were sampled from, e.g. "sft: notebook 02, cpu
profile, seed 0 (48 steps of 4, ...)" (`scripts/make_preference_snapshot.py --policy-label`)."""

NOT_THE_RECIPE = ("resume", "save_steps", "logging_steps", "eval_steps", "n_eval", "device")
"""SFT config fields that leave the trained model as it is: checkpoint, logging and evaluation intervals, how
many held-out demonstrations the evaluation loss reads, the device."""


def snapshot_policy_differences(policy: Any, run_dir: str | Path, fell_back: bool) -> list[str]:
    """How this run's policy differs from the one a snapshot was sampled from; [] when the same recipe made both.

    `policy` is the snapshot's label (`snapshot_info(path)["policy"]`), naming its SFT run as `SNAPSHOT_POLICY`
    reads it; that run's settings are the profile's SFT config at that seed, as the profile is now. They are
    compared, field by field, with run_dir/sft/config.json, leaving out `NOT_THE_RECIPE`,
    `SFTStageConfig.EVAL_ONLY` and fields the run's config does not record (added to SFTStageConfig after it
    was made). `fell_back`: run_dir has no SFT model, so this run samples from the base model."""
    from .config import PROFILES, stage_config
    from .sft import SFTStageConfig

    if fell_back:
        return [f"this run has no SFT model and samples from the base model; the snapshot's policy is {policy!r}"]
    found = SNAPSHOT_POLICY.search(policy) if isinstance(policy, str) else None
    if found is None:
        return [f"the snapshot's policy {policy!r} names no single notebook-02 run (\"notebook 02, <profile> profile, "
                f"seed <n>\"), so it cannot be checked against this run's SFT model"]
    saved_path = resolve_run_dir(run_dir) / "sft" / "config.json"
    if not saved_path.exists():
        return [f"{saved_path} is missing, so this run's SFT model cannot be checked against the snapshot's "
                f"({found.group(0)})"]
    if found["profile"] not in PROFILES:
        return [f"the snapshot's policy names a profile, {found['profile']!r}, that is not one of {sorted(PROFILES)}, "
                f"so it cannot be checked against this run's SFT model"]
    recipe = stage_config(SFTStageConfig, found["profile"], seed=int(found["seed"]))
    expected = json.loads(json.dumps(dataclasses.asdict(recipe)))  # tuples as the saved JSON has them, lists
    saved = read_json(saved_path)
    ignore = set(NOT_THE_RECIPE) | set(SFTStageConfig.EVAL_ONLY)
    return [f"{k} {saved[k]!r} here, {v!r} in the snapshot's" for k, v in expected.items()
            if k not in ignore and k in saved and saved[k] != v]


def load_snapshot(path: str | Path, cfg: "RMStageConfig", run_dir: str | Path,
                  fell_back: bool) -> tuple[list[PreferencePair], list[str]]:
    """Notebook 03's snapshot pairs, checked against this run; returns them and `snapshot_policy_differences`.

    ([], []) when `cfg.use_snapshot` is off, or when the file is missing (said aloud: the reward model then
    trains on the live pairs alone). A snapshot labelled at another annotator temperature than
    `cfg.annotator_temperature` is refused: the held-out pairs would mix labels drawn at two temperatures,
    whose Bayes ceilings differ. A snapshot sampled from another policy than this run's is used, with a
    printed warning: its pairs are off-policy for this run."""
    if not cfg.use_snapshot:
        return [], []
    path = Path(path)
    if not path.exists():
        print(f"no snapshot at {path}: the reward model trains on the pairs of the {cfg.n_live_prompts} live prompts "
              f"only. Restore the file from git, or set use_snapshot=False to ask for that.")
        return [], []
    pairs = read_pairs(path)  # validated first: a bad line is named before anything else is said
    info = snapshot_info(path)
    if info["annotator_temperature"] != cfg.annotator_temperature:
        raise ValueError(f"{path} was labelled at annotator_temperature {info['annotator_temperature']}, and this run "
                         f"labels at {cfg.annotator_temperature}: the held-out pairs would mix the two, and the Bayes "
                         f"ceiling is per temperature. Set use_snapshot=False (with n_live_prompts of 2 or more, e.g. "
                         f"64) to sample and label every pair at {cfg.annotator_temperature}, or annotator_temperature="
                         f"{info['annotator_temperature']} to use the snapshot")
    print(f"snapshot: {len(pairs)} pairs, made with {info}")
    differences = snapshot_policy_differences(info.get("policy"), run_dir, fell_back)
    if differences:
        print(f"warning: the snapshot was sampled from {info.get('policy')!r}, not from this run's policy "
              f"({'; '.join(differences)}). Its pairs are off-policy here: the reward model learns to judge that "
              f"model's replies, not this one's. To sample every pair from this run's policy, set use_snapshot=False "
              f"and n_live_prompts={len(train_prompts())} (minutes of sampling on a CPU).")
    return pairs, differences
