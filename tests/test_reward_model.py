"""Preference pairs and the reward model: labels, gradient flow, normalisation, a short training run."""
import json
import logging

import numpy as np
import pytest
import torch

from rlhf_helpers.config import SetupError, stage_config
from rlhf_helpers.data import DataError, PreferencePair
from rlhf_helpers.gold import SimulatedAnnotator
from rlhf_helpers.gold import pair_ceiling
from rlhf_helpers.preferences import (SNAPSHOT_POLICY, label_samples, live_train_prompts, load_snapshot, read_pairs,
                                      snapshot_info, snapshot_policy_differences, write_pairs)
from rlhf_helpers.reward_model import (RewardModel, RMStageConfig, accuracy_against_ceiling, build_trl_config,
                                       calibration_bins, load_backbone, lora_for_rm, scoring_text, train_reward_model)
from rlhf_helpers.rewards import RewardFunction, RewardOutput
from rlhf_helpers.tracking import atomic_write_json, changed_settings, fingerprint, resume_free, run_settings


TOPICS = ("rain", "bread", "cats", "maps", "tea", "snow", "bikes", "clocks")


def easy_pairs(topics):
    """One pair a prompt, whose chosen reply is plain sense and the rejected one noise, with the gold fields set."""
    return [PreferencePair(f"Tell me about {t}.", f"{t.capitalize()} are worth learning about.", "zq xv kk",
                           metadata={"gold_chosen": 1.0, "gold_rejected": 0.0, "annotator_temperature": 0.1})
            for t in topics]


class WordCount(RewardFunction):
    name = "word_count_rm_test"

    def compute_reward(self, t):
        return RewardOutput(len(t.response.split()) / 10)


def test_pairs_are_disjoint_labelled_and_carry_provenance(tmp_path):
    ann = SimulatedAnnotator(judge=WordCount(), temperature=1e-3, seed=0)  # a near-perfect annotator
    samples = [["one", "one two three", "a b", "a b"], ["x y z w", "x"]]
    pairs, skipped = label_samples(["p1", "p2"], samples, ann, {"policy": "sft", "sample_seed": 7})
    assert skipped["identical_responses"] == 1  # ("a b", "a b") cannot be compared
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("p1", "one two three", "one"), ("p2", "x y z w", "x")]
    assert pairs[0].metadata["policy"] == "sft" and pairs[0].metadata["gold_chosen"] == pytest.approx(0.3)
    write_pairs(tmp_path / "pairs.jsonl", pairs)
    again = read_pairs(tmp_path / "pairs.jsonl")
    assert [(p.chosen, p.metadata["sample_seed"]) for p in again] == [("one two three", 7), ("x y z w", 7)]
    (tmp_path / "bare.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(ValueError, match="gold_chosen"):
        read_pairs(tmp_path / "bare.jsonl")


GOLD_ROW = {"prompt": "p", "chosen": "a", "rejected": "b", "gold_chosen": 0.5, "gold_rejected": 0.1,
            "annotator_temperature": 0.1}


def test_written_pairs_keep_a_prompts_system_message_and_earlier_turns(tmp_path):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a bird."}]
    gold = {k: v for k, v in GOLD_ROW.items() if k.startswith(("gold", "annotator"))}
    pairs = [PreferencePair("Name a bird.", "A robin.", "No.", dict(gold), prompt_messages=chat),
             PreferencePair("Name a fish.", "A trout.", "No.", dict(gold))]
    again = read_pairs(write_pairs(tmp_path / "pairs.jsonl", pairs))
    assert [(p.prompt, p.chosen, p.rejected, p.prompt_messages, p.metadata) for p in again] == [
        (p.prompt, p.chosen, p.rejected, p.prompt_messages, p.metadata) for p in pairs]


def test_read_pairs_names_the_file_line_of_pairs_without_gold_and_what_to_do_with_human_labels(tmp_path):
    bare = {"prompt": "q", "chosen": "c", "rejected": "d"}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(GOLD_ROW) + "\n\n\n" + json.dumps(bare) + "\n" + json.dumps(bare) + "\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl:4: field 'gold_chosen': missing .*; 2 of 3 lines") as err:
        read_pairs(path)
    assert "Human-labelled pairs have no gold" in str(err.value) and "load_preferences" in str(err.value)


@pytest.mark.parametrize("change, expected", [
    ({"gold_rejected": None}, "field 'gold_rejected': missing"),
    ({"annotator_temperature": None}, "field 'annotator_temperature': missing"),
    ({"gold_chosen": "high"}, "field 'gold_chosen': expected a finite number, got string"),
    ({"gold_rejected": True}, "field 'gold_rejected': expected a finite number, got boolean"),
    ({"annotator_temperature": 0}, "field 'annotator_temperature': must be > 0"),
])
def test_read_pairs_checks_every_gold_field_the_ceiling_reads(tmp_path, change, expected):
    row = {k: v for k, v in {**GOLD_ROW, **change}.items() if v is not None}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(GOLD_ROW) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=rf"pairs\.jsonl:2: {expected}"):
        read_pairs(path)


@pytest.fixture(scope="module")
def rm_parts():
    cfg = RMStageConfig(lora_layers=2)
    model, tok = load_backbone(cfg.model_name, device="auto")  # "auto" resolves (cpu here), never .to("auto")
    from peft import get_peft_model

    return cfg, get_peft_model(model, lora_for_rm(cfg, model)), tok


@pytest.mark.slow
def test_head_and_top_layers_learn_the_rest_stays_frozen(rm_parts):
    cfg, model, tok = rm_parts
    n = model.config.num_hidden_layers
    batch = tok(["Hello there, friend.", "zz qq"], return_tensors="pt", padding=True)
    scores = model(**batch).logits[:, 0]  # (2,)
    loss = -torch.nn.functional.logsigmoid(scores[0] - scores[1])
    loss.backward()
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert any("score" in name and p.grad is not None and p.grad.abs().sum() > 0 for name, p in trainable.items())
    for name, p in trainable.items():
        assert "score" in name or "lora_" in name, name
        if "lora_" in name:
            assert any(f"layers.{i}." in name for i in (n - 2, n - 1)), name  # only the top blocks adapt
    frozen = [p for name, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)
    model.zero_grad()


@pytest.mark.slow
def test_normalisation_gives_mean_zero_std_one(rm_parts):
    _, model, tok = rm_parts
    rm = RewardModel(model, tok)
    prompts = ["Say something."] * 6
    responses = ["Hi.", "Hello there.", "Good morning to you.", "Yes.", "Certainly, here it is.", "No thanks."]
    rm.fit_normalization(prompts, responses)
    scores = np.array(rm.score(prompts, responses))
    assert abs(scores.mean()) < 1e-5 and abs(scores.std() - 1) < 1e-4


@pytest.mark.slow
def test_batched_scores_come_back_in_the_order_given_and_match_one_at_a_time(rm_parts):
    _, model, tok = rm_parts
    rm = RewardModel(model, tok, batch_size=3)  # batches mix lengths: they are sorted before batching
    prompts = ["Say something.", "Name a colour.", "Explain rain in one long sentence, please.", "Hi", "Count."]
    responses = ["A much longer reply than the others, with several clauses, to force padding.", "Blue.",
                 "Water vapour cools, condenses into droplets, and they fall.", "Hello!", "One, two, three."]
    batched = rm.raw_scores(prompts, responses)
    single = np.array([rm.raw_scores([p], [r])[0] for p, r in zip(prompts, responses)])
    assert np.allclose(batched, single, atol=1e-4)
    assert rm.raw_scores([], []).shape == (0,)


def test_calibration_bins_by_hand():
    bins = calibration_bins(np.array([0.9, 0.9, 0.6]), bins=2)
    # seen from both sides: predictions 0.9, 0.9, 0.6 (chosen, outcome 1) and 0.1, 0.1, 0.4 (outcome 0)
    assert bins["count"] == [3, 3]
    assert bins["predicted"] == pytest.approx([0.2, 0.8]) and bins["observed"] == pytest.approx([0.0, 1.0])
    # a weak model, always 0.55 and always right: by default no bin mixes a pair with its mirror image
    bins = calibration_bins(np.full(4, 0.55))
    assert bins["predicted"] == pytest.approx([0.45, 0.55]) and bins["observed"] == pytest.approx([0.0, 1.0])


def test_accuracy_is_read_against_chance_and_the_ceiling():
    chosen, rejected = [1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]  # 3 of 4 right
    report = accuracy_against_ceiling(chosen, rejected, ["a", "a", "b", "c"], ceiling=0.9)
    assert report["accuracy"] == 0.75 and report["n_prompts"] == 3
    assert report["gap_closed"] == pytest.approx(0.25 / 0.4)  # not 0.75 / 0.9
    assert report["ci_low"] < 0.75 < report["ci_high"] and report["ci_high"] == 1.0
    assert report["gap_closed_low"] == pytest.approx((report["ci_low"] - 0.5) / 0.4)
    # prompts are resampled whole: one prompt's pairs all right or all wrong move together
    clustered = accuracy_against_ceiling([1.0] * 4 + [0.0] * 4, [0.0] * 4 + [1.0] * 4, ["a"] * 4 + ["b"] * 4, 0.9)
    assert clustered["ci_low"] == 0.0 and clustered["ci_high"] == 1.0
    with pytest.raises(ValueError, match="one prompt per pair"):
        accuracy_against_ceiling([1.0], [0.0], ["a", "b"], 0.9)


@pytest.mark.slow
def test_a_finished_reward_model_run_again_is_restored_not_retrained(tmp_path, capsys):
    pairs = easy_pairs(TOPICS)
    cfg = stage_config(RMStageConfig, "smoke", max_steps=2, batch_size=4, lora_layers=2, learning_rate=1e-3,
                       max_length=64, eval_steps=100, save_steps=1, logging_steps=1, resume=True)
    prompts, chosen = [p.prompt for p in pairs[:3]], [p.chosen for p in pairs[:3]]
    rm, facts = train_reward_model(cfg, tmp_path, cfg.model_name, pairs[:6], pairs[6:])
    scores = rm.raw_scores(prompts, chosen)
    again, facts_again = train_reward_model(cfg, tmp_path, cfg.model_name, pairs[:6], pairs[6:])
    assert (facts["steps"], facts_again["steps"]) == (2, 2) and "trained nothing more" in capsys.readouterr().out
    # the LoRA adapter and the fully trained score head both come back from the checkpoint
    assert np.allclose(again.raw_scores(prompts, chosen), scores, atol=1e-5)
    assert facts_again["resumed_time_s"] > 0


@pytest.mark.slow
def test_a_few_steps_on_an_easy_preference_beat_chance(tmp_path):
    topics = ["rain", "bread", "cats", "maps", "tea", "snow", "bikes", "clocks", "rivers", "music", "paint", "boats",
              "trees", "stars", "glass", "salt", "wool", "bees", "coins", "lamps", "ships", "roads", "kites", "bells"]
    pairs = [PreferencePair(f"Tell me about {t}.", f"{t.capitalize()} are interesting, and people enjoy learning about them.",
                            "zq xv kk zq xv kk", metadata={"gold_chosen": 1.0, "gold_rejected": 0.0,
                                                           "annotator_temperature": 0.1}) for t in topics]
    train, held_out = pairs[:16], pairs[16:]
    cfg = stage_config(RMStageConfig, "smoke", max_steps=8, batch_size=4, lora_layers=2, learning_rate=1e-3,
                       max_length=96, eval_steps=100, save_steps=100, logging_steps=1)
    rm, facts = train_reward_model(cfg, tmp_path, cfg.model_name, train, held_out)
    assert facts["steps"] == 8 and facts["dropped_too_long"] == {"train": 0, "eval": 0}
    chosen = rm.raw_scores([p.prompt for p in held_out], [p.chosen for p in held_out])
    rejected = rm.raw_scores([p.prompt for p in held_out], [p.rejected for p in held_out])
    assert np.mean(chosen > rejected) >= 0.875  # chance is 0.5
    saved = rm.save(tmp_path / "rm_model")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()  # as in a fresh process (training may have lowered it)
    seen: list[str] = []
    collect = logging.Handler()
    collect.emit = lambda record: seen.append(record.getMessage())
    hf_logging.get_logger("transformers.modeling_utils").addHandler(collect)
    try:
        again = RewardModel.load(saved, cfg.model_name)
    finally:
        hf_logging.get_logger("transformers.modeling_utils").removeHandler(collect)
    assert not [m for m in seen if "LOAD REPORT" in m]  # the head comes from the adapter: no false "MISSING"
    assert np.allclose(again.raw_scores([held_out[0].prompt], [held_out[0].chosen]), chosen[:1], atol=1e-4)
    # what a PPO or GRPO run records of it: the folder's fingerprint, so a retrained model is noticed on resume
    config = again.to_config()
    assert config["weights_sha256"] == fingerprint(saved)
    import shutil

    shutil.copytree(saved, tmp_path / "elsewhere")  # a run folder copied: the same reward, checkpoints kept
    assert RewardModel.load(tmp_path / "elsewhere", cfg.model_name).to_config() == config
    rm.scale *= 2
    rm.save(saved)  # the same weights, normalised otherwise
    renormalised = RewardModel.load(saved, cfg.model_name).to_config()
    assert renormalised["weights_sha256"] == config["weights_sha256"] and renormalised != config
    with torch.no_grad():
        next(p for n, p in rm.model.named_parameters() if "lora_B" in n).add_(0.01)
    rm.save(saved)  # retrained
    assert RewardModel.load(saved, cfg.model_name).to_config()["weights_sha256"] != config["weights_sha256"]


def test_snapshot_info_lists_the_values_that_differ_between_rounds(tmp_path):
    annotator = SimulatedAnnotator(temperature=0.1, seed=0)
    pairs = []
    for seed in (0, 1):
        round_pairs, _ = label_samples(["Explain rain."], [["Rain falls from clouds.", "It rains."]], annotator,
                                       {"policy": "sft", "sample_seed": seed, "source": "snapshot"})
        pairs += round_pairs
    write_pairs(tmp_path / "snap.jsonl", pairs)
    info = snapshot_info(tmp_path / "snap.jsonl")
    assert info["policy"] == "sft" and info["sample_seed"] == [0, 1] and info["annotator_temperature"] == 0.1
    assert "chosen" not in info and "gold_chosen" not in info


def test_snapshot_info_names_the_file_and_line_of_a_malformed_line(tmp_path):
    path = tmp_path / "snap.jsonl"
    path.write_text(json.dumps(GOLD_ROW) + "\n{oops\n")
    with pytest.raises(DataError, match=r"snap\.jsonl:2: not valid JSON"):
        snapshot_info(path)


def test_label_samples_records_the_temperature_of_each_side(tmp_path):
    ann = SimulatedAnnotator(judge=WordCount(), temperature=1e-3, seed=0)  # a near-perfect annotator: longer wins
    samples = [["one", "one two three"], ["x y z w", "x"], ["same", "same"]]  # replies at 0.7, then at 1.3
    pairs, skipped = label_samples(["p1", "p2", "p3"], samples, ann, {"policy": "sft"}, temperatures=(0.7, 1.3))
    assert skipped["identical_responses"] == 1
    assert [(p.chosen, p.metadata["temperature_chosen"], p.metadata["temperature_rejected"]) for p in pairs] == [
        ("one two three", 1.3, 0.7), ("x y z w", 0.7, 1.3)]  # the 1.3 reply won on p1, the 0.7 reply on p2
    write_pairs(tmp_path / "pairs.jsonl", pairs)
    assert read_pairs(tmp_path / "pairs.jsonl")[1].metadata["temperature_chosen"] == 0.7
    with pytest.raises(ValueError, match="one per reply, but prompt 'p1' has 2 replies"):
        label_samples(["p1"], samples[:1], ann, {}, temperatures=(0.7, 1.0, 1.3))
    with pytest.raises(ValueError, match="2 prompts and 1 lists"):
        label_samples(["p1", "p2"], samples[:1], ann, {})


@pytest.mark.parametrize("change, message", [
    ({"n_live_prompts": 0}, "n_live_prompts must be a whole number >= 1, got 0"),
    ({"max_steps": -1}, "max_steps must be a whole number >= 1, got -1"),
    ({"n_fresh": 0}, "n_fresh must be a whole number >= 1"),
    ({"n_train": 0}, "n_train must be None"),
    ({"train_seed": -1}, "train_seed must be None"),
    ({"use_snapshot": False, "n_live_prompts": 1}, "set n_live_prompts >= 2"),
    ({"learning_rate": 0.0}, "learning_rate must be > 0"),
])
def test_reward_model_config_refuses_what_would_train_on_something_else(change, message):
    with pytest.raises(ValueError, match=message):
        RMStageConfig(**change)


def test_live_prompts_are_the_last_train_prompts_and_zero_is_not_all_of_them():
    from rlhf_helpers.data import train_prompts

    every = train_prompts()
    assert live_train_prompts(3) == every[-3:] and live_train_prompts(len(every)) == every
    for n in (0, -1, len(every) + 1):
        with pytest.raises(ValueError, match=f"from 1 to {len(every)}"):
            live_train_prompts(n)


def test_train_seed_changes_the_training_alone_and_evaluation_settings_keep_the_trained_model(tmp_path):
    cfg = RMStageConfig(seed=3)
    assert cfg.training_seed == 3 and build_trl_config(cfg, tmp_path).seed == 3
    other = RMStageConfig(seed=3, train_seed=7)
    trl_cfg = build_trl_config(other, tmp_path)
    assert other.training_seed == 7 and (trl_cfg.seed, trl_cfg.data_seed) == (7, 7)
    # a resume ignores the fields only the notebook's fresh samples read, and no other
    names = set(RMStageConfig.__dataclass_fields__)
    assert set(RMStageConfig.EVAL_ONLY) <= names and set(RMStageConfig.EVAL_ONLY) <= set(resume_free(cfg))
    atomic_write_json(tmp_path / "config.json", run_settings(cfg))
    fresh = RMStageConfig(seed=3, n_fresh=72, fresh_temperature=0.7, fresh_samples_per_prompt=4)
    assert changed_settings(tmp_path, run_settings(fresh), resume_free(fresh)) == []
    for changed in ({"train_seed": 7}, {"n_live_prompts": 16}, {"generation_batch_size": 8}):
        new = RMStageConfig(seed=3, **changed)
        assert changed_settings(tmp_path, run_settings(new), resume_free(new)) == list(changed)


def test_pair_ceiling_says_what_to_do_with_pairs_labelled_at_two_temperatures():
    pairs = [PreferencePair("p", "a", "b", metadata={"gold_chosen": 0.5, "gold_rejected": 0.1,
                                                     "annotator_temperature": t}) for t in (0.1, 0.02)]
    with pytest.raises(ValueError, match=r"several annotator temperatures \[0.02, 0.1\].*use_snapshot=False"):
        pair_ceiling(pairs)
    with pytest.raises(ValueError, match="no pairs"):
        pair_ceiling([])


def _sft_run(tmp_path, **changes):
    """A run folder whose sft/config.json is what notebook 02 writes for the cpu profile (with `changes`)."""
    from rlhf_helpers.sft import SFTStageConfig

    cfg = stage_config(SFTStageConfig, "cpu", **{"seed": 0, **changes})
    atomic_write_json(tmp_path / "sft" / "config.json", run_settings(cfg, data=["a demonstration"]))
    return tmp_path


LABEL = "sft: notebook 02, cpu profile, seed 0 (48 steps of 4, lr 2e-3, LoRA on the top 16 blocks)"


def test_the_snapshot_policy_is_checked_against_the_runs_sft_settings(tmp_path):
    assert snapshot_policy_differences(LABEL, _sft_run(tmp_path / "same"), fell_back=False) == []
    # what only notebook 02's comparison or the checkpoints read leaves the SFT model as it is
    assert snapshot_policy_differences(LABEL, _sft_run(tmp_path / "eval", n_compare=3, save_steps=6, n_eval=4),
                                       False) == []
    notes = snapshot_policy_differences(LABEL, _sft_run(tmp_path / "other", seed=1, learning_rate=1e-3), False)
    assert notes == ["learning_rate 0.001 here, 0.002 in the snapshot's", "seed 1 here, 0 in the snapshot's"]
    assert "base model" in snapshot_policy_differences(LABEL, tmp_path / "same", fell_back=True)[0]
    assert "cannot be checked" in snapshot_policy_differences("sft", tmp_path / "same", False)[0]
    assert "cannot be checked" in snapshot_policy_differences(["a", "b"], tmp_path / "same", False)[0]
    assert "is missing" in snapshot_policy_differences(LABEL, tmp_path / "no_sft", False)[0]
    # the shipped snapshot names its SFT run so that the check can read it
    from rlhf_helpers.paths import data_path

    found = SNAPSHOT_POLICY.search(snapshot_info(data_path("preference_snapshot.jsonl"))["policy"])
    assert found is not None and (found["profile"], found["seed"]) == ("cpu", "0")


def _snapshot(path, temperature=0.1, policy=LABEL):
    annotator = SimulatedAnnotator(temperature=temperature, seed=0)
    pairs, _ = label_samples(["Explain rain.", "Name a colour."], [["Rain falls from clouds.", "It rains."],
                                                                   ["Blue.", "Blue is a colour of the sky."]],
                             annotator, {"policy": policy, "sample_seed": 0, "source": "snapshot"})
    write_pairs(path, pairs)
    return path


def test_load_snapshot_refuses_another_annotator_temperature_and_warns_when_off_policy(tmp_path, capsys):
    run_dir = _sft_run(tmp_path / "run")
    snap = _snapshot(tmp_path / "snap.jsonl")
    pairs, off = load_snapshot(snap, RMStageConfig(), run_dir, fell_back=False)
    assert len(pairs) == 2 and off == [] and "warning" not in capsys.readouterr().out
    assert load_snapshot(snap, RMStageConfig(use_snapshot=False), run_dir, False) == ([], [])
    with pytest.raises(ValueError, match=r"snap\.jsonl was labelled at annotator_temperature 0.1, and this run labels "
                                         r"at 0.02.*Set use_snapshot=False"):
        load_snapshot(snap, RMStageConfig(annotator_temperature=0.02), run_dir, False)
    pairs, off = load_snapshot(snap, RMStageConfig(), _sft_run(tmp_path / "seed1", seed=1), False)
    assert len(pairs) == 2 and off == ["seed 1 here, 0 in the snapshot's"]
    assert f"warning: the snapshot was sampled from {LABEL!r}, not from this run's policy (seed 1 here" in (
        capsys.readouterr().out)
    assert load_snapshot(tmp_path / "gone.jsonl", RMStageConfig(n_live_prompts=4), run_dir, False) == ([], [])
    assert "no snapshot at" in capsys.readouterr().out


MESSAGES = [
    ("How can I sleep better at night?", "- Keep a routine.\n- Avoid screens."),
    ("Name a colour.", "Blue."),
    ("  Spaces around the prompt  ", "  and around the reply \n\n"),
    ("Quote <|im_end|> back to me", "<|im_end|>"),
    ("Empty reply?", ""),
]


def test_scoring_text_is_what_was_scored_before_with_chatml_and_what_trl_trains_on():
    from rlhf_helpers.config import DEFAULT_MODEL
    from rlhf_helpers.models import chat_prompt, load_tokenizer

    tok = load_tokenizer(DEFAULT_MODEL, padding_side="right")
    for prompt, reply in MESSAGES:
        text = scoring_text(tok, prompt, reply)
        assert text == chat_prompt(tok, prompt) + reply + "<|im_end|>\n"  # byte for byte: cached scores stand
        # TRL's RewardTrainer tokenizes the conversation with the chat template; raw_scores tokenizes the text
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
        trained_on = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert tok(text, add_special_tokens=False)["input_ids"] == trained_on
        assert tok.convert_ids_to_tokens(trained_on[-2:]) == ["<|im_end|>", "Ċ"]  # the head reads the newline


def test_the_reward_model_trains_from_a_command_line_on_notebook_03s_pairs(tmp_path, capsys):
    from rlhf_helpers.reward_model import load_run_reward_model, main

    run = tmp_path / "run"
    common = ["--run-dir", str(run), "--profile", "smoke", "--max-steps", "2", "--batch-size", "4",
              "--lora-layers", "2", "--max-length", "64", "--n-fresh", "2", "--max-new-tokens", "8"]
    assert main(common) == 2  # notebook 03 has not run: said, with what to do
    assert "preferences/pairs.jsonl: no such file. To fix: run notebook 03 first" in capsys.readouterr().err
    pairs = easy_pairs(TOPICS)
    path = write_pairs(run / "preferences" / "pairs.jsonl", pairs)
    assert main(common) == 0
    summary = json.loads((run / "rm" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["n_pairs"] == 8 and summary["fell_back_to_base"]
    assert summary["train_pairs"] + summary["eval_pairs"] == 8 and summary["bayes_ceiling"] > 0.9
    assert summary["eval_accuracy_pairs"] == summary["eval_pairs"]  # none past max_length here
    assert 0 <= summary["eval_accuracy"] <= 1 and summary["normalization"]["scale"] > 0
    rm = load_run_reward_model(run)  # what notebooks 04-06 load
    assert (rm.shift, rm.scale) == (summary["normalization"]["shift"], summary["normalization"]["scale"])
    capsys.readouterr()
    assert main(common + ["--pairs", str(run)]) == 2  # --pairs given: the fix is another file, not notebook 03
    assert f"{run}: is a folder, not a file. To fix: give --pairs a JSONL file" in capsys.readouterr().err
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3] + [lines[3].replace('"gold_chosen": 1.0', '"gold_chosen": null')] + lines[4:]))
    capsys.readouterr()
    assert main(common + ["--pairs", str(path)]) == 2  # a bad line: named, with its field and the fix
    assert "pairs.jsonl:4: field 'gold_chosen': expected a finite number" in capsys.readouterr().err
    (run / "rm" / "summary.json").write_text("{}")  # damaged: a later stage says which file, not KeyError
    with pytest.raises(SetupError, match="rm/summary.json: no readable 'backbone' field"):
        load_run_reward_model(run)


def test_a_saved_reward_model_loads_on_its_runs_own_sft_model_and_only_on_the_weights_it_was_trained_on(
        tmp_path, monkeypatch):
    from rlhf_helpers import reward_model as R
    from rlhf_helpers.tracking import fingerprint

    run = tmp_path / "moved" / "run"
    sft = run / "sft" / "model"
    sft.mkdir(parents=True)
    (sft / "config.json").write_text("{}")
    (sft / "model.safetensors").write_bytes(b"sft weights")
    (run / "rm" / "model").mkdir(parents=True)
    (run / "rm" / "model" / "normalization.json").write_text('{"shift": 0.0, "scale": 1.0}')
    # recorded where the run was trained, before it was copied here
    (run / "rm" / "summary.json").write_text(json.dumps({"backbone": str(tmp_path / "old" / "run" / "sft" / "model")}))
    (run / "rm" / "config.json").write_text(json.dumps({"backbone_sha256": fingerprint(sft)}))
    monkeypatch.setattr(R.RewardModel, "load", classmethod(lambda cls, folder, backbone, *a: backbone))
    assert R.load_run_reward_model(run) == str(sft)  # this run's SFT model, not the old place's
    (sft / "model.safetensors").write_bytes(b"sft weights, trained again")
    with pytest.raises(SetupError, match="trained on other weights than those now in .*Train the reward model again"):
        R.load_run_reward_model(run)


@pytest.mark.slow
def test_the_reward_model_command_line_under_two_processes_trains_on_both_and_saves_once(tmp_path, two_processes):
    """What `accelerate launch` does on several processes, on the CPU: torchrun starts two (gloo); each step takes
    batch_size pairs on each, and only the main process evaluates, saves and writes the summary."""
    pairs = easy_pairs(TOPICS + ("salt", "wool"))
    write_pairs(tmp_path / "preferences" / "pairs.jsonl", pairs)
    res = two_processes("-m", "rlhf_helpers.reward_model", "--run-dir", str(tmp_path), "--profile", "smoke",
                        "--max-steps", "2", "--batch-size", "2", "--n-train", "8", "--max-length", "64",
                        "--n-fresh", "2", "--max-new-tokens", "8")
    assert res.stdout.count("held-out accuracy") == 1  # one process reported
    rows = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]  # each step logged once
    # 2 steps × 2 pairs × 2 processes = the 8 training pairs once: one epoch (one process alone: half of one)
    assert [r["train/epoch"] for r in rows if "train/loss" in r] == pytest.approx([0.5, 1.0])
    assert json.loads((tmp_path / "rm" / "summary.json").read_text())["steps"] == 2
    assert (tmp_path / "rm" / "model" / "normalization.json").exists()


def test_the_reward_model_trains_and_scores_a_pair_on_its_whole_conversation():
    # a system message or earlier turns in a pair's prompt: DPO trained on them and the reward model did not
    from rlhf_helpers.dpo import to_dataset as dpo_rows
    from rlhf_helpers.reward_model import pair_margins, to_dataset

    chat = [{"role": "system", "content": "Answer in a few words."}, {"role": "user", "content": "Name a bird."}]
    pair = PreferencePair("Name a bird.", "A robin.", "I would rather not.", prompt_messages=chat)
    plain = PreferencePair("Name a fish.", "A trout.", "No.")
    rows = to_dataset([pair, plain])
    assert rows[0]["prompt"] == chat == dpo_rows([pair])[0]["prompt"]
    assert rows[1]["prompt"] == [{"role": "user", "content": "Name a fish."}]
    seen = []

    class Spy:
        def raw_scores(self, prompts, responses):
            seen.append(list(prompts))
            return np.zeros(len(prompts))

    pair_margins(Spy(), [pair, plain])
    assert seen == [[chat, plain.conversation]] * 2
