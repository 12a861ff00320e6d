"""Reward components, combination, configs, adapters, the gold judge, the annotator and the tuner."""
import json
import math
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from rlhf_helpers import rewards as R
from rlhf_helpers.gold import GoldJudge, SimulatedAnnotator, bayes_ceiling, gold_ties, pair_ceiling, prompt_kind
from rlhf_helpers.reward_tuner import RewardTuner, load_candidates, score_table, spearman, top_share_table
from rlhf_helpers.rewards import Trajectory

GOOD = ("Start with one beginner-friendly language such as Python, because its syntax is simple.\n"
        "1. Pick a free course and follow it in order.\n2. Write a small program every day, such as a calculator.\n"
        "3. Read error messages carefully; they tell you what went wrong.\n"
        "4. Ask questions in a community when you are stuck.\nSteady practice matters more than speed.")
PROMPT = "How do I start learning to code?"
STUFFED = ("First, because please thank you. Second, because please thank you, therefore glad. Finally, "
           "for example, this means I hope this helps. 1. Yes 2. Yes. Thank you, please, because, therefore.")


def t(response, prompt=PROMPT):
    return Trajectory(prompt, response)


# --- components on hand-written strings ---------------------------------------------------------
def test_length_window():
    fn = R.LengthWindow(min_words=5, max_words=10, slack=5)
    assert fn(t("one two three four five six")).reward == 1.0
    assert fn(t("one two three")).reward == pytest.approx(1 - 2 / 5)
    assert fn(t(" ".join(["w"] * 20))).reward == 0.0


def test_structure_explanation_politeness():
    assert R.Structure()(t("1. Do this.\n2. Then that.")).reward == 1.0
    assert R.Structure()(t("Just do it.")).reward == 0.0
    assert R.ExplanationMarkers()(t("It floats because it is light.")).reward == 1.0
    assert R.ExplanationMarkers()(t("It floats.")).reward == 0.0
    assert R.Politeness()(t("Glad to help.")).reward == 1.0
    assert R.Politeness()(t("Do it.")).reward == 0.0


def test_repetition_relevance_safety_format():
    assert R.RepetitionPenalty()(t("a fresh sentence with new words in it")).reward == 1.0
    looped = R.RepetitionPenalty()(t("go to bed early " * 10)).reward
    assert looped < 0.3
    assert R.Relevance()(t("Python courses help you learn to code.")).reward > R.Relevance()(t("Bananas are yellow.")).reward
    harmful = "How do I make a bomb at home?"
    assert R.RefusalAppropriateness()(t("I can't help with that.", harmful)).reward == 1.0
    assert R.RefusalAppropriateness()(t("Mix these things.", harmful)).reward == 0.0
    assert R.RefusalAppropriateness()(t("I can't help with that.")).reward == 0.0  # over-refusal
    assert R.FormatCheck()(t("A complete sentence.")).reward == 1.0
    assert R.FormatCheck()(t("cut off mid <|im_end|> sen")).reward == 0.5
    for marker in ("<|eot_id|>", "<end_of_turn>", "[/INST]", "<|start_header_id|>"):  # other families' turn tokens
        assert R.FormatCheck()(t(f"A sentence.{marker} More.")).metadata["format_checks"]["no_chat_markers"] is False
    assert R.FormatCheck()(t("Use <s> for struck text, [link] for links.")).reward == 1.0


def test_weighted_sum_arithmetic_and_metadata():
    mix = 0.7 * R.Politeness() + 0.3 * R.ExplanationMarkers()
    out = mix(t("Glad to help, because it matters."))
    assert out.reward == pytest.approx(1.0)
    assert out.metadata["components"] == {"politeness": 1.0, "explanation": 1.0}
    assert mix(t("Glad to help.")).reward == pytest.approx(0.7)
    assert mix.with_weights({"politeness": 0.1})(t("Glad to help.")).reward == pytest.approx(0.1)
    with pytest.raises(KeyError, match="components"):
        mix.with_weights({"nope": 1.0})


def test_clip_and_normalize():
    mix = 2.0 * R.Politeness()
    assert R.Clipped(mix, 0.0, 1.0)(t("Thank you")).reward == 1.0
    trajs = [t(x) for x in ["thanks", "no", "no", "glad"]]
    norm = R.Normalized.fit(mix, trajs)
    vals = np.array([norm(x).reward for x in trajs])
    assert abs(vals.mean()) < 1e-9 and abs(vals.std() - 1) < 1e-9


def test_config_round_trip(tmp_path):
    reward = R.Clipped(R.default_mix({"politeness": 0.0}) + 0.5 * GoldJudge(), -1.0, 2.0)
    path = R.save_reward_config(reward, tmp_path / "reward_config.json")
    again = R.load_reward_config(path)
    assert again.to_config() == reward.to_config()
    for resp in [GOOD, STUFFED, "Thanks!"]:
        assert again(t(resp)).reward == pytest.approx(reward(t(resp)).reward)
    (tmp_path / "bad.json").write_text('{"type": "weighted_sum", "terms": [{"weight": 1, "type": "nonsense"}]}')
    with pytest.raises(ValueError, match="bad.json.*unknown reward type 'nonsense'"):
        R.load_reward_config(tmp_path / "bad.json")


def test_a_weighted_sum_with_a_clipped_term_round_trips():
    reward = 0.5 * R.Clipped(R.Politeness(), 0.0, 1.0) + 0.5 * R.Structure()
    assert R.build_reward(reward.to_config()).to_config() == reward.to_config()


LENGTH = {"type": "length"}
SUM = "weighted_sum"


@pytest.mark.parametrize("config, expected", [
    ({"type": SUM, "terms": [LENGTH]}, r"'terms\[0\]\.weight': missing; give a finite number"),
    ({"type": SUM, "terms": [{"weight": "heavy", **LENGTH}]},
     r"'terms\[0\]\.weight': expected a finite number, got 'heavy'; write a JSON number"),
    ({"type": SUM, "terms": [{"weight": 1, **LENGTH}, {"weight": 1, **LENGTH, "params": {"min_wrds": 3}}]},
     r"'terms\[1\]\.params\.min_wrds': 'length' has no parameter 'min_wrds'; "
     r"valid parameters: min_words, max_words, slack"),
    ({"type": "clipped", "lo": 0, "inner": LENGTH}, r"'lo': 'clipped' has no parameter 'lo'; valid parameters: low"),
    ({"type": "normalized", "scale": float("inf"), "inner": LENGTH}, r"'scale': expected a finite number, got inf"),
    ({"type": SUM, "terms": [{"weight": 1, **LENGTH, "params": {"min_words": 9, "max_words": 3}}]},
     r"'terms\[0\]\.params': need 0 <= min_words <= max_words"),
])
def test_reward_config_errors_name_the_file_the_field_and_the_fix(tmp_path, config, expected):
    path = tmp_path / "reward_config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"reward_config\.json: not a valid reward config: field " + expected):
        R.load_reward_config(path)


def test_a_nan_weight_is_rejected_not_turned_into_nan_rewards(tmp_path):
    path = tmp_path / "reward_config.json"
    path.write_text('{"type": "weighted_sum", "terms": [{"weight": NaN, "type": "length"}]}')  # json reads NaN
    nan_weight = r"reward_config\.json: .*'terms\[0\]\.weight': expected a finite number, got nan"
    with pytest.raises(ValueError, match=nan_weight):
        R.load_reward_config(path)
    path.write_text('{"type": "weighted_sum",\n "terms": [}')
    with pytest.raises(ValueError, match=r"reward_config\.json:2: not valid JSON"):  # syntax errors keep their line
        R.load_reward_config(path)


def test_adapters_return_what_the_reward_returns():
    gold = GoldJudge()
    fn = R.as_trl_reward_func(gold)
    assert fn.__name__ == "gold"
    expected = gold.score([PROMPT, PROMPT], [GOOD, STUFFED])
    assert fn(prompts=[PROMPT, PROMPT], completions=[GOOD, STUFFED]) == expected
    conv = fn(prompts=[[{"role": "user", "content": PROMPT}]] * 2,
              completions=[[{"role": "assistant", "content": GOOD}], [{"role": "assistant", "content": STUFFED}]])
    assert conv == expected
    ppo = R.as_ppo_reward(gold)([PROMPT, PROMPT], [GOOD, STUFFED])
    assert isinstance(ppo, torch.Tensor) and ppo.shape == (2,) and ppo.tolist() == pytest.approx(expected)


# --- the gold judge -----------------------------------------------------------------------------
GAMING = {
    "stuffed": STUFFED,
    "prompt_copy": (PROMPT + " ") * 4,
    "repetition": "You should practice coding every day. " * 6,
    "padding": ("Learning to code is a journey and coding is a skill that many people want to learn and "
                "it is important to learn coding because coding is everywhere ") * 4,
    "one_word": "Practice.",
}


@pytest.mark.parametrize("kind", sorted(GAMING))
def test_gold_judge_is_not_won_by_gaming(kind):
    gold = GoldJudge()
    assert gold(t(GAMING[kind])).reward < 0.5 * gold(t(GOOD)).reward


def test_naive_reward_is_gamed_where_gold_is_not():
    naive, gold = R.QualityReward(), GoldJudge()
    assert naive(t(STUFFED)).reward >= naive(t(GOOD)).reward - 0.1
    assert gold(t(STUFFED)).reward < 0.1 < 0.6 < gold(t(GOOD)).reward


def test_gold_safety():
    gold, harmful = GoldJudge(), "How do I make a bomb at home?"
    refusal = "I can't help with that because it could hurt people. I'd be happy to suggest safe chemistry experiments instead."
    assert gold(t(refusal, harmful)).reward > 0.8
    assert gold(t("Sure. Mix the ingredients in a container and heat them slowly.", harmful)).reward == 0.0
    assert gold(t("I can't help with that.", "What is the capital of France?")).reward < 0.1
    assert prompt_kind(harmful) == "harmful" and prompt_kind("What is the capital of France?") == "fact"


def test_gold_prefers_complete_answers():
    gold = GoldJudge()
    assert gold(t(GOOD)).reward > gold(t(GOOD[:150])).reward


# --- the simulated annotator and the Bayes ceiling -----------------------------------------------
class WordCount(R.RewardFunction):
    name = "word_count_test"

    def compute_reward(self, traj):
        return R.RewardOutput(len(traj.response.split()) / 10)


def test_annotator_frequencies_follow_bradley_terry():
    ann = SimulatedAnnotator(judge=WordCount(), temperature=0.5, seed=0)
    diffs = [0, 1, 2, 4]  # words: gold differences 0, 0.1, 0.2, 0.4
    n = 3000
    for d in diffs:
        a, b = " ".join(["a"] * (5 + d)), " ".join(["b"] * 5)
        pairs = ann.label(["p"] * n, [a] * n, [b] * n)
        freq = np.mean([p.chosen == a for p in pairs])
        expected = 1 / (1 + math.exp(-(d / 10) / 0.5))
        assert abs(freq - expected) < 4 * math.sqrt(expected * (1 - expected) / n), (d, freq, expected)


def test_annotator_is_seeded_and_records_provenance():
    args = (["p"] * 50, ["a b c"] * 50, ["a b c d"] * 50)
    one = SimulatedAnnotator(judge=WordCount(), temperature=0.3, seed=4).label(*args)
    two = SimulatedAnnotator(judge=WordCount(), temperature=0.3, seed=4).label(*args)
    assert [p.chosen for p in one] == [p.chosen for p in two]
    assert {"gold_chosen", "gold_rejected", "p_chosen", "annotator_temperature", "annotator_seed"} <= set(one[0].metadata)
    with pytest.raises(ValueError, match="temperature"):
        SimulatedAnnotator(temperature=0)


def test_bayes_ceiling_by_hand_and_by_simulation():
    assert bayes_ceiling([1.0, 0.0], [0.0, 0.0], temperature=1.0) == pytest.approx((1 / (1 + math.exp(-1)) + 0.5) / 2)
    assert bayes_ceiling([1.0], [0.0], temperature=1e-4) == pytest.approx(1.0)
    ann = SimulatedAnnotator(judge=WordCount(), temperature=0.2, seed=1)
    a = [" ".join(["w"] * k) for k in np.random.default_rng(0).integers(1, 8, 4000)]
    b = [" ".join(["w"] * k) for k in np.random.default_rng(1).integers(1, 8, 4000)]
    pairs = ann.label(["p"] * 4000, a, b)
    higher_gold_chosen = np.mean([(p.metadata["gold_chosen"] > p.metadata["gold_rejected"]) +
                                  0.5 * (p.metadata["gold_chosen"] == p.metadata["gold_rejected"]) for p in pairs])
    assert abs(higher_gold_chosen - pair_ceiling(pairs)) < 0.02
    ties = sum(len(x) == len(y) for x, y in zip(a, b))  # WordCount: equal length, equal gold
    assert gold_ties(pairs) == ties and 0 < ties < 4000


# --- the tuner ----------------------------------------------------------------------------------
CANDIDATES = [
    {"prompt_id": "p1", "prompt": PROMPT, "response": GOOD, "kind": "good"},
    {"prompt_id": "p1", "prompt": PROMPT, "response": STUFFED, "kind": "stuffed"},
    {"prompt_id": "p1", "prompt": PROMPT, "response": "Practice a lot.", "kind": "poor"},
    {"prompt_id": "p2", "prompt": "What is the capital of France?", "response": "Paris is the capital of France.", "kind": "good"},
]


def test_slider_rerank_updates_table_histogram_and_saves(tmp_path):
    tuner = RewardTuner(CANDIDATES, R.default_mix({"politeness": 0.0, "explanation": 0.0}), tmp_path / "cfg.json")
    tuner.set_prompt("p1")
    assert tuner.table_rows[0]["kind"] == "good"
    html_before, fig_before = tuner.table.value, tuner.figure.to_json()
    tuner.sliders["politeness"].value = 1.0  # as a person moving the slider
    tuner.sliders["explanation"].value = 1.0
    tuner.sliders["structure"].value = 1.0
    assert tuner.table_rows[0]["kind"] == "stuffed"  # the naive markers now win
    assert tuner.table.value != html_before and tuner.figure.to_json() != fig_before
    assert tuner.agreement < spearman([1, 2, 3], [1, 2, 3])
    tuner.button.click()
    saved = json.loads((tmp_path / "cfg.json").read_text())
    assert {t_["type"]: t_["weight"] for t_ in saved["terms"]}["politeness"] == 1.0
    assert "Saved" in tuner.status.value


def test_weight_search_finds_the_component_gold_is_made_of_and_agrees_with_the_sliders(tmp_path):
    # a gold that is one component: the best weights are that component alone, with a Spearman of 1
    tuner = RewardTuner(load_candidates(), R.default_mix(), tmp_path / "cfg.json", gold=R.REGISTRY["relevance"](),
                        show_widgets=False)
    found = tuner.search(grid=(0.0, 0.5, 1.0), top=3)
    best = found.iloc[0]
    assert best["Spearman with gold"] == pytest.approx(1.0)
    assert [n for n in tuner.names if best[n] > 0] == ["relevance"]
    assert found["Spearman with gold"].is_monotonic_decreasing and found.iloc[1]["Spearman with gold"] < 1.0
    for _, row in found.iterrows():  # each row is what the sliders show at those weights
        for name in tuner.names:
            tuner.set_weight(name, row[name])
        assert tuner.agreement == pytest.approx(row["Spearman with gold"])
        assert tuner.gaming_top_share == pytest.approx(row["gaming share of top quarter"])
    with pytest.raises(ValueError, match="no non-zero weight"):
        tuner.search(grid=(0.0,))


class _Fixed(R.RewardFunction):
    """A component that looks its score up by response, to place float noise exactly (not registered)."""

    def __init__(self, name, scores):
        self.name, self.scores = name, scores

    def compute_reward(self, trajectory):
        return R.RewardOutput(self.scores[trajectory.response], {})


def test_float_noise_does_not_split_ties_between_tuner_search_and_table(tmp_path):
    # x's components sum to 0.1 + 0.2 = 0.30000000000000004, y's to 0.3: equal rewards, which a sum taken in
    # another order can give as equal floats. Every path must rank them as the tie they are.
    comps = {"a": {"y": 0.3, "x": 0.1, "z": 0.0, "w": 0.0}, "b": {"y": 0.0, "x": 0.2, "z": 0.1, "w": 0.0}}
    gold = _Fixed("gold", {"y": 1.0, "x": 0.9, "z": 0.0, "w": 0.5})
    cands = [{"prompt_id": "p", "prompt": "q", "response": r, "kind": k}
             for r, k in [("y", "good"), ("x", "stuffed"), ("z", "poor"), ("w", "okay")]]
    mix = R.WeightedSum([(1.0, _Fixed(n, sc)) for n, sc in comps.items()])
    tuner = RewardTuner(cands, mix, tmp_path / "cfg.json", gold=gold, show_widgets=False)
    assert tuner.rewards()[1] != tuner.rewards()[0]  # the noise is there
    table = pd.DataFrame({"kind": [c["kind"] for c in cands], "tuned mix": [0.3, 0.3, 0.1, 0.0],
                          "gold": gold.score(["q"] * 4, ["y", "x", "z", "w"])})
    row = top_share_table(table, ["tuned mix"]).loc["tuned mix"]
    assert row["Spearman with gold"] == pytest.approx(spearman([3.5, 3.5, 2, 1], [4, 3, 1, 2]))  # a tie, averaged
    assert tuner.agreement == row["Spearman with gold"]
    assert tuner.gaming_top_share == row["gaming share of top quarter"] == 0.0  # the tie keeps y, listed first
    assert tuner.ranking[:2] == [0, 1]
    found = tuner.search(grid=(0.0, 1.0), top=3)
    both = found[(found["a"] == 1.0) & (found["b"] == 1.0)].iloc[0]
    assert both["Spearman with gold"] == pytest.approx(tuner.agreement)
    assert both["gaming share of top quarter"] == tuner.gaming_top_share


def test_tuner_and_top_share_table_agree_exactly_on_the_shipped_candidates(tmp_path):
    # notebook 01's weights: numpy's sums and WeightedSum's differ in the last bit for 53 of the 91 candidates
    weights = {"length": 0.2, "structure": 0.1, "explanation": 0.05, "politeness": 0.0, "repetition": 0.25,
               "relevance": 0.2, "safety": 0.2, "format": 0.1}
    cands = load_candidates()
    tuner = RewardTuner(cands, R.default_mix(weights), tmp_path / "cfg.json", show_widgets=False)
    row = top_share_table(score_table(cands, {"tuned mix": tuner.reward, "gold": GoldJudge()}), ["tuned mix"])
    assert tuner.agreement == row.loc["tuned mix", "Spearman with gold"]
    assert tuner.gaming_top_share == row.loc["tuned mix", "gaming share of top quarter"]


def test_rewards_cli_scores_lines(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text(json.dumps({"prompt": PROMPT, "response": GOOD}) + "\n" + json.dumps({"prompt": PROMPT, "response": STUFFED}) + "\n")
    out = subprocess.run([sys.executable, "-m", "rlhf_helpers.rewards", "score", str(f)], capture_output=True, text=True, check=True)
    lines = [json.loads(x) for x in out.stdout.splitlines()]
    assert [x["line"] for x in lines] == [1, 2] and lines[0]["reward"] > lines[1]["reward"]
    assert "substance" in lines[0]["components"]
    f.write_text(json.dumps({"prompt": PROMPT}) + "\n")
    bad = subprocess.run([sys.executable, "-m", "rlhf_helpers.rewards", "score", str(f)], capture_output=True, text=True)
    assert bad.returncode == 1 and f"error: {f}:1: field 'response': needs a string 'response'" in bad.stderr
    assert "Traceback" not in bad.stderr
    f.write_text("\n\n")  # nothing to score: said, not an empty success
    assert R.main(["score", str(f)]) == 1


def test_rewards_cli_scores_with_a_saved_reward_config_and_names_a_bad_one(tmp_path, capsys):
    f = tmp_path / "in.jsonl"
    f.write_text("".join(json.dumps({"prompt": PROMPT, "response": r}) + "\n" for r in (GOOD, STUFFED)))
    cfg = R.save_reward_config(R.Politeness(), tmp_path / "reward_config.json")
    assert R.main(["score", str(f), "--config", str(cfg)]) == 0
    got = [json.loads(x)["reward"] for x in capsys.readouterr().out.splitlines()]
    polite = [R.Politeness()(t(r)).reward for r in (GOOD, STUFFED)]
    assert got == pytest.approx(polite, abs=1e-6)
    assert got[1] > got[0]  # not the gold judge's scores, which put GOOD first
    cfg.write_text(json.dumps({"type": "nonsense"}))
    assert R.main(["score", str(f), "--config", str(cfg)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"error: {cfg}: not a valid reward config: field 'type': unknown reward "
                                        f"type 'nonsense'")
    cfg.write_text('{"type": "politeness",')
    assert R.main(["score", str(f), "--config", str(cfg)]) == 1
    assert capsys.readouterr().err.startswith(f"error: {cfg}:1: not valid JSON")


def test_load_candidates_names_the_file_line_and_field_of_a_bad_candidate(tmp_path):
    from rlhf_helpers.data import DataError

    good = {"prompt_id": "c01", "domain": "explain", "prompt": "P", "response": "R", "kind": "good"}
    path = tmp_path / "candidates.jsonl"
    for bad, field in (({**good, "kind": ""}, "kind"), ({k: v for k, v in good.items() if k != "prompt_id"}, "prompt_id"),
                       ({**good, "response": 3}, "response"), ({**good, "prompt": "  "}, "prompt")):
        path.write_text("".join(json.dumps(row) + "\n" for row in (good, bad, good)))
        with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: field '{field}': missing or empty"):
            load_candidates(path)
    path.write_text(json.dumps(good) + "\n")
    assert load_candidates(path) == [good]


def test_gold_fixes_found_on_the_candidates():
    gold = GoldJudge()
    from rlhf_helpers.text_stats import ends_cleanly

    assert ends_cleanly("Hi Ana,\nThe meeting moved to Friday.\nBest,\nSam")  # a sign-off is complete
    assert not ends_cleanly("Here is the code:\n```python\nx = 1.")  # an unclosed code block is cut off
    harmful = "How can I break into my neighbour's email account?"
    bare = "I can't help with breaking into someone else's account."
    with_alt = bare + " If you are locked out of your own account, the provider's recovery page can help instead."
    assert gold(t(with_alt, harmful)).reward > gold(t(bare, harmful)).reward + 0.2  # 'help with' is not an alternative
    assert gold(t("Adults have 206 bones in their body.", "How many bones does an adult human have?")).metadata["gates"]["gibberish"] == 1.0
