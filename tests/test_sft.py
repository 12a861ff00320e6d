"""SFT: config mapping, the assistant-only loss mask, a short run, and resume after an interruption."""
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from rlhf_helpers.config import stage_config
from rlhf_helpers.sft import (
    SFTStageConfig, build_trainer, build_trl_config, demonstration_lengths, length_notice,
    load_demonstrations, train_sft,
)
from rlhf_helpers.tracking import atomic_write_json, changed_settings, last_checkpoint, resume_free, run_settings

pytestmark = pytest.mark.slow
TINY = dict(n_train=4, n_eval=2, batch_size=2, max_length=160, logging_steps=1, eval_steps=100, save_steps=100)


def test_config_mapping_on_cpu(tmp_path):
    cfg = stage_config(SFTStageConfig, "cpu", max_steps=7, learning_rate=1e-3, seed=3)
    args = build_trl_config(cfg, tmp_path)
    assert (args.max_steps, args.learning_rate, args.seed) == (7, 1e-3, 3)
    assert args.per_device_train_batch_size == cfg.batch_size and args.save_steps == cfg.save_steps
    assert args.completion_only_loss is True and args.packing is False
    assert args.bf16 is False and args.use_cpu is True  # TRL's own default is bf16=True
    assert args.gradient_checkpointing is False and args.report_to in ("none", [], ["none"])
    assert stage_config(SFTStageConfig, "gpu").dtype == "bfloat16"
    with pytest.raises(ValueError, match="eval_fraction"):
        SFTStageConfig(eval_fraction=0)
    with pytest.raises(ValueError, match="generation_batch_size must be >= 1, got 0"):
        SFTStageConfig(generation_batch_size=0)


def test_comparison_batch_size_keeps_the_trained_model(tmp_path):
    """The comparison's batch size only changes how notebook 02 samples after training: a run with another one
    resumes the trained model; a training field does not."""
    atomic_write_json(tmp_path / "config.json", run_settings(SFTStageConfig()))
    batched = SFTStageConfig(generation_batch_size=72)
    assert changed_settings(tmp_path, run_settings(batched), resume_free(batched)) == []
    other = SFTStageConfig(learning_rate=1e-3)
    assert changed_settings(tmp_path, run_settings(other), resume_free(other)) == ["learning_rate"]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    cfg = stage_config(SFTStageConfig, "smoke", max_steps=4, learning_rate=1e-3, **TINY)
    trainer, _ = build_trainer(cfg, tmp_path_factory.mktemp("sft"))
    trainer.sft_cfg = cfg
    return trainer


def test_prompt_tokens_carry_no_loss(trainer):
    tok = trainer.processing_class
    ex = trainer.train_dataset[0]
    ids, labels = torch.tensor(ex["input_ids"]), torch.tensor(ex["labels"])
    n_prompt = int((labels == -100).sum())
    assert n_prompt > 10 and torch.all(labels[:n_prompt] == -100)  # the prompt is a masked prefix
    assert torch.equal(labels[n_prompt:], ids[n_prompt:])
    completion = tok.decode(ids[n_prompt:])
    first_demo = load_demonstrations(trainer.sft_cfg)[0][0]
    assert completion.startswith(first_demo.response[:40])  # exactly the demonstration is learned
    assert "<|im_start|>user" in tok.decode(ids[:n_prompt]) and "<|im_end|>" in completion  # learns to stop
    # the model's loss equals cross-entropy over the completion tokens alone
    model = trainer.model
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0]  # (T, V)
        trainer_loss = model(input_ids=ids[None], labels=labels[None]).loss
    manual = F.cross_entropy(logits[n_prompt - 1:-1], ids[n_prompt:])  # position t predicts token t+1
    assert torch.allclose(trainer_loss, manual, atol=1e-5)
    with_prompt = F.cross_entropy(logits[:-1], ids[1:])
    assert not torch.allclose(with_prompt, manual, atol=1e-3)


def test_demonstration_lengths_are_what_trl_tokenises_before_it_cuts_at_max_length(trainer):
    lengths = demonstration_lengths(trainer.processing_class, load_demonstrations(trainer.sft_cfg)[0])
    cap = trainer.sft_cfg.max_length
    assert any(n > cap for n in lengths) and any(n < cap for n in lengths)  # both cases are exercised
    assert [len(row["input_ids"]) for row in trainer.train_dataset] == [min(n, cap) for n in lengths]
    said = length_notice(lengths, cap)
    assert f"{sum(n > cap for n in lengths)} of {len(lengths)} training demonstrations" in said
    assert f"max_length={cap}" in said and f"the longest {max(lengths)}" in said
    assert length_notice(lengths, max(lengths)) == ""


def test_short_run_lowers_loss_and_changes_only_the_adapter(trainer):
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_before = trainer.evaluate(trainer.train_dataset)["eval_loss"]
    trainer.train()
    loss_after = trainer.evaluate(trainer.train_dataset)["eval_loss"]
    assert loss_after < loss_before - 0.05
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)


class Interrupt(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise KeyboardInterrupt("simulated interruption after step 2")


def test_resume_continues_from_the_last_checkpoint(tmp_path):
    cfg = stage_config(SFTStageConfig, "smoke", max_steps=3, **{**TINY, "save_steps": 1})
    with pytest.raises(KeyboardInterrupt):
        train_sft(cfg, tmp_path, callbacks=[Interrupt()])
    assert last_checkpoint(tmp_path / "sft" / "checkpoints").endswith("checkpoint-2")
    recorded = json.loads((tmp_path / "sft" / "checkpoints" / "checkpoint-2" / "elapsed.json").read_text())["seconds"]
    partial = tmp_path / "sft" / "checkpoints" / "checkpoint-3"  # a save interrupted before its trainer state
    partial.mkdir()
    (partial / "adapter_config.json").write_text("{}")
    summary = train_sft(cfg, tmp_path)
    assert summary["resumed_from"].endswith("checkpoint-2") and summary["steps"] == 3
    # the cost is the whole run's: the interrupted session's seconds up to its checkpoint, plus this one's
    assert summary["resumed_time_s"] == recorded > 0 and summary["wall_time_s"] > recorded
    rows = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if "train/loss" in r]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 3
    assert (tmp_path / "sft" / "model" / "config.json").exists()
    assert (tmp_path / "sft" / "adapter" / "adapter_config.json").exists()


def test_each_evaluation_is_logged_once_when_the_stage_ends_on_one_and_is_run_again(tmp_path):
    """The trainer evaluates at the last step (eval_steps divides max_steps), then the stage's own closing
    evaluate() measures the same weights again; a finished stage run again restores them and evaluates a third
    time. metrics.jsonl must hold that evaluation once, or its curves draw doubled points."""
    cfg = stage_config(SFTStageConfig, "smoke", max_steps=2, **{**TINY, "eval_steps": 2, "save_steps": 2})
    first = train_sft(cfg, tmp_path)
    again = train_sft(cfg, tmp_path)
    assert again["resumed_from"].endswith("checkpoint-2") and again["steps"] == 2
    assert again["eval_loss_after"] == pytest.approx(first["eval_loss_after"], abs=1e-6)  # restored, not retrained
    assert again["eval_loss_before"] == first["eval_loss_before"] is not None  # the first session's, kept
    assert again["tokens_per_second"] is None  # nothing trained in this session
    # a setting only notebook 02's comparison reads keeps the trained model; a training one does not
    assert train_sft(stage_config(SFTStageConfig, "smoke", max_steps=2, **{**TINY, "eval_steps": 2, "save_steps": 2,
                                                                       "n_compare": 3, "temperature": 0.3}),
                     tmp_path)["resumed_from"]
    rows = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/loss" in r] == [0, 2]  # before training, and after
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]


def test_full_fine_tuning_warns_at_a_lora_rate_and_its_command_line_has_no_comparison_flags(capsys):
    with pytest.warns(UserWarning, match="learning_rate=0.0002 or lower"):
        SFTStageConfig(use_lora=False, learning_rate=2e-3)
    with pytest.warns(UserWarning, match="lora_layers=8 has no effect"):
        SFTStageConfig(use_lora=False, learning_rate=2e-4, lora_layers=8)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SFTStageConfig(use_lora=False, learning_rate=2e-4)
        SFTStageConfig(use_lora=True, learning_rate=2e-3)
    from rlhf_helpers.sft import main

    with pytest.raises(SystemExit) as exit_:
        main(["--run-dir", "x", "--n-compare", "3"])
    assert exit_.value.code == 2 and "--n-compare" in capsys.readouterr().err


def test_merging_into_a_freshly_loaded_base_matches_merging_in_place(trainer, tmp_path):
    """The path a 4-bit run takes (load the base again unquantized, merge the saved adapter into it) gives the
    model that merging in place gives; on a CPU both are unquantized, so they must agree."""
    from rlhf_helpers.models import load_model
    from rlhf_helpers.sft import _save_merged

    model, tok = trainer.model, trainer.processing_class
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.01 * torch.randn_like(p))  # a non-zero adapter
    model.save_pretrained(tmp_path / "adapter")
    _save_merged(model, tok, tmp_path / "in_place")
    _save_merged(model, tok, tmp_path / "reloaded", trainer.sft_cfg.model_name, tmp_path / "adapter", "float32")
    ids = tok("Name three rivers.", return_tensors="pt")["input_ids"]
    logits = [load_model(str(tmp_path / f))[0](ids).logits for f in ("in_place", "reloaded")]
    base = load_model(trainer.sft_cfg.model_name)[0](ids).logits
    assert torch.allclose(logits[0], logits[1], atol=1e-4)
    assert not torch.allclose(logits[0], base, atol=1e-3)  # the adapter was merged, not dropped


def test_a_rerun_trains_again_when_the_demonstrations_have_changed(tmp_path, capsys):
    """A finished stage run again is restored from its checkpoint, unless the data it learnt from has changed
    since: config.json records the demonstrations' fingerprint, and an edited data file must not be ignored."""
    from rlhf_helpers.paths import data_path

    data = tmp_path / "sft.jsonl"
    data.write_text(data_path("sft.jsonl").read_text())
    cfg = stage_config(SFTStageConfig, "smoke", max_steps=1, data_file=str(data), **{**TINY, "save_steps": 1})
    train_sft(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    data.write_text("".join(json.dumps({**r, "response": r["response"] + " Hope this helps."}) + "\n" for r in rows))
    capsys.readouterr()
    again = train_sft(cfg, tmp_path / "run")
    assert again["resumed_from"] is None and again["steps"] == 1
    assert "other settings (data_sha256)" in capsys.readouterr().out


def test_demonstrations_whose_prompt_fills_max_length_are_counted_as_dropped(tmp_path, capsys):
    from rlhf_helpers.paths import data_path

    rows = [json.loads(line) for line in data_path("sft.jsonl").read_text().splitlines()]
    long = "Please read this carefully. " * 60  # about 300 tokens: past TINY's max_length of 160 on its own
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({**r, "prompt": long + r["prompt"]} if i % 2 == 0 else r) + "\n"
                            for i, r in enumerate(rows)))
    cfg = stage_config(SFTStageConfig, "smoke", max_steps=1, data_file=str(data), **TINY)
    train, evals = load_demonstrations(cfg)
    n_long = [sum(d.prompt.startswith(long) for d in split) for split in (train, evals)]
    assert n_long[0] >= 1
    summary = train_sft(cfg, tmp_path / "run")
    assert (summary["train_examples_dropped"], summary["eval_examples_dropped"]) == tuple(n_long)
    assert summary["train_examples"] == len(train) - n_long[0]
    assert f"TRL dropped {n_long[0]} of {len(train)} training and {n_long[1]} of {len(evals)} held-out" \
        in capsys.readouterr().out


def test_demonstrations_are_found_where_documented_and_too_few_are_refused_before_a_model_loads(tmp_path, monkeypatch,
                                                                                                 capsys):
    from rlhf_helpers.paths import data_path

    monkeypatch.chdir(tmp_path)
    row = {"prompt": "What is the capital of France?", "response": "Paris."}
    (tmp_path / "sft.jsonl").write_text(json.dumps(row) + "\n")  # a stray file of the same name here
    cfg = stage_config(SFTStageConfig, "smoke")
    train, evals = load_demonstrations(cfg)  # the bare default name is data/'s, not the working folder's
    assert len(train) == cfg.n_train and f"from {data_path('sft.jsonl')}" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="mine/sft.jsonl' is not a file; looked for .*mine/sft.jsonl"):
        load_demonstrations(stage_config(SFTStageConfig, "smoke", data_file="mine/sft.jsonl"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "sft.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=r"mine/sft.jsonl: 1 demonstration\(s\) split by prompt into"):
        load_demonstrations(stage_config(SFTStageConfig, "smoke", data_file="mine/sft.jsonl"))


def test_sft_and_the_reward_model_take_every_spelling_of_half_precision(tmp_path, monkeypatch):
    import trl

    from rlhf_helpers import reward_model, sft

    monkeypatch.setattr(trl, "SFTConfig", lambda **kw: kw)  # the arguments, not a config: no GPU here
    monkeypatch.setattr(trl, "RewardConfig", lambda **kw: kw)
    for dtype, bf16, fp16 in (("bf16", True, False), ("bfloat16", True, False), ("fp16", False, True),
                              ("float16", False, True), ("float32", False, False)):
        for build, stage in ((sft.build_trl_config, sft.SFTStageConfig), (reward_model.build_trl_config,
                                                                          reward_model.RMStageConfig)):
            kw = build(stage(dtype=dtype, device="cuda"), tmp_path)
            assert (kw["bf16"], kw["fp16"], kw["use_cpu"]) == (bf16, fp16, False), (stage.__name__, dtype)
            kw = build(stage(dtype=dtype, device="cpu"), tmp_path)
            assert (kw["bf16"], kw["fp16"], kw["use_cpu"]) == (False, False, True)
