"""Every file we ship validates, has the promised size, and keeps the held-out split held out."""
import json
from collections import Counter
from pathlib import Path

import pytest

from rlhf_helpers.data import load
from rlhf_helpers.gold import GoldJudge
from rlhf_helpers.rewards import Trajectory, is_harmful_prompt, is_refusal

DATA = Path(__file__).resolve().parent.parent / "data"
SHIPPED = {"prompts.jsonl": "prompts", "sft.jsonl": "sft", "reward_candidates.jsonl": "sft",
           "preference_snapshot.jsonl": "preferences"}


def rows(name):
    return [json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.parametrize("name,fmt", sorted(SHIPPED.items()))
def test_shipped_file_validates(name, fmt):
    records, report = load(DATA / name, fmt, errors="collect")
    assert report.ok and not report.warnings and not report.skipped, report.summary()
    assert len(records) == report.lines


def test_prompt_counts_domains_and_split():
    prompts = rows("prompts.jsonl")
    assert len(prompts) >= 300 and len({p["id"] for p in prompts}) == len(prompts)
    domains = Counter(p["domain"] for p in prompts)
    assert len(domains) >= 8 and min(domains.values()) >= 30
    test = [p for p in prompts if p["split"] == "test"]
    assert len(test) >= 64 and {p["domain"] for p in test} == set(domains)
    assert len({" ".join(p["prompt"].lower().split()) for p in prompts}) == len(prompts)  # no duplicates


def test_sft_uses_train_prompts_only():
    prompts = {p["id"]: p for p in rows("prompts.jsonl")}
    sft = rows("sft.jsonl")
    assert len(sft) >= 200
    for demo in sft:
        source = prompts[demo["prompt_id"]]
        assert source["split"] == "train" and source["prompt"] == demo["prompt"], demo["id"]
    test_texts = {p["prompt"] for p in prompts.values() if p["split"] == "test"}
    assert not test_texts & {d["prompt"] for d in sft}


def test_preference_snapshot_is_train_only_with_provenance_and_the_judges_gold():
    train = {p["prompt"] for p in rows("prompts.jsonl") if p["split"] == "train"}
    pairs = rows("preference_snapshot.jsonl")
    gold = GoldJudge()
    rounds = Counter(p["sample_seed"] for p in pairs)
    assert len(pairs) >= 400 and set(rounds.values()) == {len(train)}  # one pair per train prompt per round
    for p in pairs:
        assert p["prompt"] in train
        assert p["policy"] and p["sample_temperatures"] == [0.7, 1.3] and p["source"] == "snapshot"
        assert gold(Trajectory(p["prompt"], p["chosen"])).reward == pytest.approx(p["gold_chosen"])
        assert gold(Trajectory(p["prompt"], p["rejected"])).reward == pytest.approx(p["gold_rejected"])


def test_preference_snapshot_sets_refusals_against_compliance_on_both_kinds_of_prompt():
    # an SFT model that never refuses gives pairs with no safety signal (the first snapshot had 1 such pair)
    contrast = [p for p in rows("preference_snapshot.jsonl") if is_refusal(p["chosen"]) != is_refusal(p["rejected"])]
    harmful = [is_refusal(p["chosen"]) for p in contrast if is_harmful_prompt(p["prompt"])]
    benign = [is_refusal(p["chosen"]) for p in contrast if not is_harmful_prompt(p["prompt"])]
    assert len(harmful) >= 10 and sum(harmful) >= 0.8 * len(harmful)  # the annotator mostly picks the refusal
    assert len(benign) >= 10 and sum(benign) <= 0.2 * len(benign)  # and mostly rejects a needless one


def test_harmful_rule_matches_the_refusal_domain_exactly():
    for p in rows("prompts.jsonl"):
        assert is_harmful_prompt(p["prompt"]) == (p["domain"] == "refusal"), p["prompt"]


def test_demonstrations_score_well_by_gold():
    gold = GoldJudge()
    scores = [gold(Trajectory(d["prompt"], d["response"])).reward for d in rows("sft.jsonl")]
    assert sum(scores) / len(scores) > 0.8
    assert sum(s < 0.5 for s in scores) <= 3  # a haiku or two may be short by the judge's rules


def test_good_candidates_lead_their_prompt():
    gold = GoldJudge()
    best: dict = {}
    for c in rows("reward_candidates.jsonl"):
        best.setdefault(c["prompt_id"], {})[c["kind"]] = gold(Trajectory(c["prompt"], c["response"])).reward
    for pid, kinds in best.items():
        assert kinds["good"] >= max(kinds.values()) - 0.05, (pid, kinds)
        for kind in ("stuffed", "prompt_copy", "repetitive", "padded", "unsafe", "over_refusal"):
            if kind in kinds:
                assert kinds[kind] < kinds["good"] - 0.3, (pid, kind, kinds)
