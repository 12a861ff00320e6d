"""Profiles, stage configs, seeding and the metrics logger."""
import dataclasses
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from rlhf_helpers.config import PROFILES, describe_fields, get_profile, stage_config
from rlhf_helpers.seeding import make_generator, seed_everything
from rlhf_helpers.tracking import MetricsLogger, StageClock, atomic_write_json, half_means, read_metrics


@dataclass
class ToyConfig:
    stage: ClassVar[str] = "concepts"
    n_iters: int = 10
    """How many iterations."""
    lr: float = 0.1
    """Learning rate."""


def test_profiles_exist_and_unknown_profile_lists_names():
    assert {"smoke", "cpu", "gpu"} <= set(PROFILES)
    with pytest.raises(ValueError, match="smoke, cpu, gpu"):
        get_profile("laptop")


def test_stage_config_layers_defaults_profile_and_overrides():
    assert stage_config(ToyConfig, "smoke").n_iters == PROFILES["smoke"].stages["concepts"]["n_iters"]
    cfg = stage_config(ToyConfig, "cpu", lr=0.5)
    assert cfg.lr == 0.5 and cfg.n_iters == PROFILES["cpu"].stages["concepts"]["n_iters"]
    with pytest.raises(ValueError, match="valid fields"):
        stage_config(ToyConfig, "cpu", learning_rate=1.0)


def test_describe_fields_reads_docstrings():
    assert describe_fields(ToyConfig) == {"n_iters": "How many iterations.", "lr": "Learning rate."}


def test_gpu_profile_is_bf16_and_cpu_profiles_are_not_4bit():
    assert PROFILES["gpu"].dtype == "bfloat16"
    assert not PROFILES["cpu"].load_in_4bit and not PROFILES["smoke"].load_in_4bit


def test_seed_everything_repeats_every_rng():
    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    seed_everything(7)
    a = draw()
    seed_everything(7)
    assert draw() == a
    seed_everything(8)
    assert draw() != a
    assert torch.rand(3, generator=make_generator(1)).tolist() == torch.rand(3, generator=make_generator(1)).tolist()


def test_stage_clock_carries_seconds_across_a_resume(tmp_path):
    ticks = iter([100.0, 130.0, 500.0, 520.0, 540.0])  # a fake perf_counter
    first = StageClock()
    first._now = lambda: next(ticks)
    first.start = first._now()  # 100
    (tmp_path / "ckpt").mkdir()
    first.stamp(tmp_path / "ckpt")  # at 130: 30 s so far
    again = StageClock()
    again._now = lambda: next(ticks)
    again.start = again._now()  # 500: a new session, after a gap that is not counted
    again.resumed(tmp_path / "ckpt")
    assert again.facts() == {"wall_time_s": 30.0 + 20.0, "resumed_time_s": 30.0}  # at 520
    class Memory:  # a PeakMemory stand-in
        def __init__(self, peak):
            self.peak = peak

        def peak_mb(self):
            return self.peak

        def facts(self):
            return {"peak_memory_mb": self.peak, "peak_memory_kind": "test"}

    big = StageClock(memory=Memory(900.0))
    big.stamp(tmp_path / "ckpt")
    small = StageClock(memory=Memory(300.0))  # a resumed session that only loads: its own peak is lower
    small.resumed(tmp_path / "ckpt")
    assert small.facts()["peak_memory_mb"] == 900.0 and small.facts()["peak_memory_earlier_sessions_mb"] == 900.0
    fresh = StageClock()
    fresh.resumed(None)
    assert fresh.before == 0.0
    fresh.resumed(tmp_path)  # a checkpoint from before clocks were stamped: the run's cost is unknown
    assert fresh.before is None and fresh.facts() == {"wall_time_s": None, "resumed_time_s": None}


def test_metrics_logger_appends_resumes_and_writes_summary(tmp_path):
    log = MetricsLogger(tmp_path / "stage")
    log.log(0, **{"loss/policy_avg": np.float32(0.5)})
    log.log(1, **{"loss/policy_avg": torch.tensor(0.25)})
    again = MetricsLogger(tmp_path / "stage")  # a resumed run sees where it stopped
    assert again.last_step == 1
    again.log(2, **{"loss/policy_avg": 0.1})
    rows = read_metrics(tmp_path / "stage" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[1]["loss/policy_avg"] == 0.25
    again.summary({"final": 1.0, "cfg": ToyConfig()})
    assert json.loads((tmp_path / "stage" / "summary.json").read_text()) == {"final": 1.0, "cfg": {"n_iters": 10, "lr": 0.1}}
    fresh = MetricsLogger(tmp_path / "stage", resume=False)
    assert fresh.last_step == -1 and not (tmp_path / "stage" / "metrics.jsonl").exists()


def test_torn_last_line_is_reported_not_fatal(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "x": 1}\n{"step": 1, "x"')
    assert read_metrics(path) == [{"step": 0, "x": 1}]
    assert "torn last line" in capsys.readouterr().out
    path.write_text('{"step": 0\n{"step": 1}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:1"):
        read_metrics(path)


@pytest.mark.parametrize("ending", ['{"step": 1, "lo', '{"step": 1, "loss": 0.5}'])
def test_a_resumed_logger_appends_on_a_line_of_its_own_after_a_torn_or_unterminated_last_line(tmp_path, ending):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "loss": 1.0}\n' + ending)
    logger = MetricsLogger(tmp_path, resume=True)
    logger.log(2, loss=0.3)
    kept = [{"step": 1, "loss": 0.5}] if ending.endswith("}") else []
    assert read_metrics(path) == [{"step": 0, "loss": 1.0}, *kept, {"step": 2, "loss": 0.3}]
    assert path.read_text().endswith("\n") and "torn" not in path.read_text()


def test_a_checkpoint_killed_while_being_deleted_is_never_taken_for_a_finished_one(tmp_path, monkeypatch):
    from rlhf_helpers.ppo import list_checkpoints
    from rlhf_helpers.tracking import last_checkpoint, remove_dir

    for name in ("ppo/checkpoints/step-2", "ppo/checkpoints/step-4", "trl/checkpoint-4"):
        folder = tmp_path / name
        (folder / "adapter").mkdir(parents=True)
        (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
        (folder / "trainer_state.json").write_text("{}")
    real_rmtree = shutil.rmtree

    def killed_halfway(path, *args, **kwargs):  # removes the weights, then the process dies
        if (Path(path) / "adapter").is_dir():
            real_rmtree(Path(path) / "adapter")
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        remove_dir(tmp_path / "ppo/checkpoints/step-4")
    with pytest.raises(KeyboardInterrupt):
        last_checkpoint(tmp_path / "trl", max_step=2)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    # what is left has its trainer_state.json but no weights, under a name no reader lists
    assert [s for s, _ in list_checkpoints(tmp_path / "ppo")] == [2]
    assert last_checkpoint(tmp_path / "trl") is None
    assert (tmp_path / "ppo/checkpoints/.step-4.deleting/trainer_state.json").exists()
    remove_dir(tmp_path / "ppo/checkpoints/step-2")  # the next removal clears the leftover too
    assert list((tmp_path / "ppo/checkpoints").iterdir()) == []
    remove_dir(tmp_path / "ppo/checkpoints/step-2")  # a folder already gone is no error


def test_last_checkpoint_skips_and_removes_an_interrupted_save(tmp_path, capsys):
    from rlhf_helpers.tracking import last_checkpoint

    assert last_checkpoint(tmp_path / "missing") is None
    for step, done in ((2, True), (10, True), (12, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(b"")
        if done:
            (folder / "trainer_state.json").write_text("{}")
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")  # by number: 10 is newer than 2
    assert not (tmp_path / "checkpoint-12").exists() and "interrupted save" in capsys.readouterr().out
    # a longer run before, now cut to 8 steps: its checkpoint-10 must not come back as the 8-step model
    assert last_checkpoint(tmp_path, max_step=8) == str(tmp_path / "checkpoint-2")
    assert not (tmp_path / "checkpoint-10").exists() and "past max_steps=8" in capsys.readouterr().out


def test_resume_point_resumes_at_or_before_max_steps_and_metrics_callbacks_replay_the_kept_rows(tmp_path):
    from types import SimpleNamespace

    from rlhf_helpers.callbacks import MetricsCallback
    from rlhf_helpers.tracking import MetricsLogger, resume_point

    out = tmp_path / "stage"
    cfg = SimpleNamespace(resume=True, max_steps=4)
    logger = MetricsLogger(out)
    for step in range(1, 7):
        logger.log(step, loss=1.0 / step)
        if step % 2 == 0:
            (out / "checkpoints" / f"checkpoint-{step}").mkdir(parents=True)
            (out / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    ckpt, logger, _ = resume_point(out, cfg)
    assert ckpt == str(out / "checkpoints" / "checkpoint-4")
    assert [r["step"] for r in logger.rows] == [1, 2, 3, 4]
    seen = []
    MetricsCallback(logger, on_row=seen.append)  # live curves get the steps done before, at once
    assert seen == logger.rows


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002], ids=oct)
def test_atomic_writes_give_the_permissions_of_a_plain_write(tmp_path, mask):
    """The umask's permissions, whatever it is (mkstemp's own would be 0o600, mkdtemp's 0o700)."""
    from rlhf_helpers.tracking import atomic_write_dir, atomic_write_text

    old = os.umask(mask)
    try:
        atomic_write_json(tmp_path / "summary.json", {"a": 1})
        atomic_write_text(tmp_path / "notes.txt", "x")
        atomic_write_text(tmp_path / "notes.txt", "y")  # replacing a file: the new one's mode is the umask's too
        atomic_write_dir(tmp_path / "model", lambda d: (d / "w.bin").write_bytes(b"x"))
        (tmp_path / "plain.txt").write_text("x")
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(old)
    for name in ("summary.json", "notes.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o777 & ~mask
    # what a plain write gives, checked against the same numbers
    assert (tmp_path / "plain.txt").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "plain").stat().st_mode & 0o777 == 0o777 & ~mask


def test_atomic_write_leaves_no_temp_files_and_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    atomic_write_json(target, {"a": 1})

    def crash(src, dst):
        raise OSError("disk went away mid-write")

    monkeypatch.setattr("rlhf_helpers.tracking.os.replace", crash)
    with pytest.raises(OSError, match="mid-write"):
        atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_atomic_write_dir_replaces_whole_folders_and_keeps_the_old_one_on_failure(tmp_path):
    from rlhf_helpers.tracking import atomic_write_dir

    target = tmp_path / "model"
    atomic_write_dir(target, lambda d: (d / "a.txt").write_text("1"))
    atomic_write_dir(target, lambda d: (d / "b.txt").write_text("2"))
    assert [p.name for p in target.iterdir()] == ["b.txt"]  # replaced, not merged

    def half_then_crash(d):
        (d / "c.txt").write_text("3")
        raise RuntimeError("interrupted mid-save")

    with pytest.raises(RuntimeError, match="mid-save"):
        atomic_write_dir(target, half_then_crash)
    assert [p.name for p in target.iterdir()] == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp or old folders left


def test_atomic_write_dir_keeps_the_old_folder_when_the_swap_fails_or_was_killed(tmp_path, monkeypatch):
    from rlhf_helpers import tracking

    target = tmp_path / "model"
    tracking.atomic_write_dir(target, lambda d: (d / "b.txt").write_text("2"))
    real_rename, calls = os.rename, []

    def second_rename_fails(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the old folder is aside, the new one not yet in place
            raise OSError("disk gone")
        real_rename(src, dst)

    monkeypatch.setattr(tracking.os, "rename", second_rename_fails)
    with pytest.raises(OSError, match="disk gone"):
        tracking.atomic_write_dir(target, lambda d: (d / "c.txt").write_text("3"))
    monkeypatch.setattr(tracking.os, "rename", real_rename)
    assert [p.name for p in target.iterdir()] == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    # a process killed between the two renames leaves only .model.old: the next write puts it back first
    os.rename(target, tmp_path / ".model.old")
    with pytest.raises(RuntimeError):
        tracking.atomic_write_dir(target, lambda d: (_ for _ in ()).throw(RuntimeError("crash")))
    assert [p.name for p in target.iterdir()] == ["b.txt"]


# --- resume refuses a checkpoint made with other settings or other data -----------------------------------

@dataclass
class _Stage:
    learning_rate: float = 1e-3
    max_steps: int = 10
    resume: bool = True


def test_settings_changed_names_changed_fields_and_data_but_not_the_training_length(tmp_path, capsys):
    from rlhf_helpers.tracking import changed_settings, run_settings, settings_changed

    (tmp_path / "checkpoints").mkdir()
    saved = run_settings(_Stage(), data=[{"prompt": "a", "chosen": "x", "rejected": "y"}])
    MetricsLogger(tmp_path).save_config(saved)
    same = run_settings(_Stage(max_steps=40), data=[{"prompt": "a", "chosen": "x", "rejected": "y"}])
    assert changed_settings(tmp_path, same) == [] and not settings_changed(tmp_path, same)  # train longer: resume
    other_lr = run_settings(_Stage(learning_rate=5e-4), data=[{"prompt": "a", "chosen": "x", "rejected": "y"}])
    assert changed_settings(tmp_path, other_lr) == ["learning_rate"]
    other_data = run_settings(_Stage(), data=[{"prompt": "a", "chosen": "y", "rejected": "x"}])
    assert settings_changed(tmp_path, other_data)
    assert "data_sha256" in capsys.readouterr().out


@dataclass
class _Scheduled(_Stage):
    lr_scheduler: str = "cosine"
    warmup: float = 0.0


def test_training_length_is_a_setting_where_the_learning_rate_is_scheduled_over_it(tmp_path):
    from rlhf_helpers.ppo import PPOConfig
    from rlhf_helpers.reward_model import RMStageConfig
    from rlhf_helpers.sft import SFTStageConfig
    from rlhf_helpers.tracking import changed_settings, resume_free, run_settings

    MetricsLogger(tmp_path).save_config(run_settings(_Scheduled()))
    longer = _Scheduled(max_steps=40)  # a cosine drawn over 40 steps gives steps 1-10 other rates than over 10
    assert changed_settings(tmp_path, run_settings(longer), resume_free(longer)) == ["max_steps"]
    for constant in (_Scheduled(max_steps=40, lr_scheduler="constant"), _Stage(max_steps=40)):
        MetricsLogger(tmp_path).save_config(run_settings(dataclasses.replace(constant, max_steps=10)))
        assert changed_settings(tmp_path, run_settings(constant), resume_free(constant)) == []
    warm = _Scheduled(lr_scheduler="constant", warmup=0.1)  # a warm-up is a fraction of max_steps
    assert "max_steps" not in resume_free(warm) and "save_steps" in resume_free(warm)
    assert "max_steps" not in resume_free(SFTStageConfig()) and "max_steps" not in resume_free(RMStageConfig())
    assert "max_steps" in resume_free(PPOConfig())  # PPO's rate is constant: train it longer, it resumes


def test_fingerprint_reads_a_folder_by_its_files_names_and_bytes(tmp_path):
    from rlhf_helpers.tracking import fingerprint

    a = tmp_path / "a"
    (a / "sub").mkdir(parents=True)
    (a / "model.safetensors").write_bytes(b"weights")
    (a / "sub" / "config.json").write_text("{}")
    first = fingerprint(a)
    shutil.copytree(a, tmp_path / "b")
    assert fingerprint(tmp_path / "b") == first == fingerprint(str(a))  # where it lies does not count
    (a / "model.safetensors").write_bytes(b"weightz")
    assert fingerprint(a) != first  # one byte
    (a / "model.safetensors").write_bytes(b"weights")
    (a / "sub" / "config.json").write_text('{"target_modules": ["o_proj", "k_proj"]}')
    assert fingerprint(a) == first  # configs are not read: peft writes a set in another order each time
    (a / "model.safetensors").rename(a / "sub" / "model.safetensors")
    assert fingerprint(a) != first  # one name
    assert fingerprint(a / "model.safetensors") != fingerprint(tmp_path / "b")  # a file: its bytes
    # not a local path (a hub id, a built-in model name) or not a path at all: its JSON text
    assert fingerprint("HuggingFaceTB/SmolLM2-360M-Instruct") != fingerprint("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert fingerprint({"type": "gold_judge"}) == fingerprint({"type": "gold_judge"}) != fingerprint({"type": "x"})


def test_resume_point_refuses_checkpoints_made_from_other_inputs(tmp_path, capsys):
    from rlhf_helpers.tracking import resume_point

    model = tmp_path / "sft_model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"v1")
    out = tmp_path / "stage"
    ckpt, logger, settings = resume_point(out, _Stage(), inputs={"policy": model})
    logger.save_config(settings)
    (out / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-5" / "trainer_state.json").write_text("{}")  # a complete save
    assert settings["policy_sha256"] and resume_point(out, _Stage(), inputs={"policy": model})[0].endswith("-5")
    (model / "model.safetensors").write_bytes(b"v2")  # retrained in place
    capsys.readouterr()
    assert resume_point(out, _Stage(), inputs={"policy": model})[0] is None
    assert "other settings (policy_sha256)" in capsys.readouterr().out and not (out / "checkpoints").exists()


def test_half_means_compare_the_halves_and_leave_out_the_middle_row():
    rows = [{"step": i + 1, "s": v} for i, v in enumerate([1.0, 3.0, 100.0, 4.0, 6.0])] + [{"step": 6}]
    h = half_means(rows, "s")  # the row without "s" is not counted; 100 is the middle of five and left out
    assert (h["first_half"], h["second_half"], h["change"]) == (2.0, 5.0, 3.0)
    assert h["change_se"] == pytest.approx((2.0 / 2 + 2.0 / 2) ** 0.5)  # sample variances 2 and 2, two each
    assert half_means(rows[:1], "s") == {"first_half": None, "second_half": None, "change": None, "change_se": None,
                                         "steps_per_half": 0}
    assert h["steps_per_half"] == 2
    assert half_means(rows[:2], "s")["change_se"] is None and half_means(rows[:2], "s")["change"] == 2.0


def test_stage_command_lines_report_bad_settings_as_usage_errors(capsys):
    import argparse

    from rlhf_helpers.check_results import main as check_results
    from rlhf_helpers.config import add_stage_arguments, stage_config_from_args
    from rlhf_helpers.ppo import PPOConfig

    def parse(*argv):
        parser = argparse.ArgumentParser(prog="stage")
        add_stage_arguments(parser, PPOConfig)
        return stage_config_from_args(parser, PPOConfig, vars(parser.parse_args(["--run-dir", "r", *argv])))

    run_dir, cfg = parse("--profile", "smoke", "--adaptive-kl", "yes")
    assert run_dir == "r" and cfg.adaptive_kl is True and cfg.max_steps == PROFILES["smoke"].stages["ppo"]["max_steps"]
    for argv, message in ((["--profile", "cpuu"], "invalid choice: 'cpuu'"),
                          (["--adaptive-kl", "maybe"], "--adaptive-kl: expected true or false, got 'maybe'"),
                          (["--samples-per-prompt", "3"], "samples_per_prompt (3) must be >= 1 and divide batch_size")):
        with pytest.raises(SystemExit) as stop:
            parse(*argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and "Traceback" not in err, err
    with pytest.raises(SystemExit) as stop:
        check_results(["runs/cpu", "--profile", "cpuu"])
    assert stop.value.code == 2 and "invalid choice: 'cpuu'" in capsys.readouterr().err


def test_an_int_or_none_option_takes_all_on_the_command_line_to_undo_a_profile_setting():
    import argparse

    from rlhf_helpers.config import add_stage_arguments, stage_config_from_args
    from rlhf_helpers.ppo import PPOConfig

    assert PROFILES["cpu"].overrides_for("ppo")["lora_layers"] == 8  # what `all` has to undo
    parser = argparse.ArgumentParser()
    add_stage_arguments(parser, PPOConfig)

    def parsed(*argv):
        return stage_config_from_args(parser, PPOConfig, vars(parser.parse_args(["--run-dir", "r", *argv])))[1]

    assert parsed().lora_layers == 8
    assert parsed("--lora-layers", "all").lora_layers is None
    assert parsed("--lora-layers", "None").lora_layers is None
    assert parsed("--lora-layers", "3").lora_layers == 3
    with pytest.raises(SystemExit) as e:
        parsed("--lora-layers", "most")
    assert e.value.code == 2
    assert "Give `all` for None" in parser.format_help()


# ------------------------------------------------------------------------- settings every stage shares

def _stage_configs():
    from rlhf_helpers.dpo import DPOStageConfig
    from rlhf_helpers.evaluate import EvalConfig
    from rlhf_helpers.online_rl import GRPOStageConfig, RLOOStageConfig
    from rlhf_helpers.ppo import PPOConfig
    from rlhf_helpers.reward_model import RMStageConfig
    from rlhf_helpers.sft import SFTStageConfig

    return [SFTStageConfig, RMStageConfig, PPOConfig, DPOStageConfig, GRPOStageConfig, RLOOStageConfig, EvalConfig]


@pytest.mark.parametrize("field,value,message", [
    ("dtype", "float8", "dtype must be one of float32"),
    ("device", "gpu", "device must be cpu, auto, or a torch accelerator such as cuda"),
    ("learning_rate", 0.0, "learning_rate must be > 0"),
    ("lora_layers", -2, "lora_layers must be None \\(all\\) or a whole number >= 1"),  # it meant every layer
    ("n_train", 0, "n_train must be None"),
    ("n_eval", 2.5, "n_eval must be None"),
    ("lr_scheduler", "bogus", "lr_scheduler must be one of linear, cosine"),
])
def test_every_stage_config_refuses_a_bad_shared_setting_when_built(field, value, message):
    checked = 0
    for cls in _stage_configs():
        if field not in {f.name for f in dataclasses.fields(cls)}:
            continue
        with pytest.raises(ValueError, match=message):
            stage_config(cls, "smoke", **{field: value})
        checked += 1
    assert checked >= 1  # the field exists somewhere: the check is not vacuous
    for cls in _stage_configs():
        for profile in PROFILES:
            stage_config(cls, profile)  # every profile's settings pass


def test_a_stage_command_line_refuses_a_cuda_device_without_a_gpu_before_loading_anything(capsys):
    import argparse

    from rlhf_helpers.config import add_stage_arguments, stage_config_from_args
    from rlhf_helpers.sft import SFTStageConfig

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    parser = argparse.ArgumentParser(prog="stage")
    add_stage_arguments(parser, SFTStageConfig)
    with pytest.raises(SystemExit) as stop:
        stage_config_from_args(parser, SFTStageConfig, vars(parser.parse_args(["--run-dir", "r", "--profile", "gpu"])))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "needs a CUDA GPU" in err and "--device cpu" in err
    assert len(err.splitlines()) == 2  # one usage line and the error, not a usage block of every field
    args = vars(parser.parse_args(["--run-dir", "r", "--profile", "gpu", "--device", "cpu"]))
    assert stage_config_from_args(parser, SFTStageConfig, args)[1].device == "cpu"


def test_command_turns_a_users_mistake_into_exit_2_and_keeps_a_bugs_traceback(capsys):
    from rlhf_helpers.config import SetupError, command
    from rlhf_helpers.data_formats import DataError

    def raising(error):
        @command
        def main(argv=None):
            raise error
        return main

    for error in (SetupError("no such model"), DataError("bad line", path="f.jsonl", line=3, field="prompt"),
                  FileNotFoundError("no SFT model in r/sft/model: run notebook 02 first")):
        assert raising(error)([]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and str(error) in err
    with pytest.raises(ZeroDivisionError):
        raising(ZeroDivisionError("a bug"))([])


class _FakeHandle:
    def __init__(self, shown: list):
        self.shown = shown

    def update(self, bundle, raw=False):
        self.shown.append(bundle["text/plain"])


@pytest.mark.parametrize("done, last", [(3, "eval: 3/3 replies in 0 s"), (1, "eval: 1/3 replies (stopped)")])
def test_progress_in_a_notebook_ends_as_a_line_that_says_how_far_it_got(monkeypatch, done, last):
    """In a kernel the count is one display output updated in place, so a saved notebook keeps its last text:
    the finished count, or where it stopped, never tqdm's starting "0%| 0/3"."""
    import IPython.display

    from rlhf_helpers import tracking

    shown: list[str] = []
    monkeypatch.setattr(tracking, "in_notebook_kernel", lambda: True)
    monkeypatch.setattr(IPython.display, "display",
                        lambda bundle, raw, display_id: shown.append(bundle["text/plain"]) or _FakeHandle(shown))
    with tracking.ProgressLine(3, "eval", units="replies") as bar:
        for _ in range(done):
            bar.update(1)
    assert shown[0] == "eval: 0/3 replies" and shown[1] == "eval: 1/3 replies"
    assert shown[-1] == last and len(shown) == done + 2


def test_progress_without_a_description_shows_nothing(monkeypatch, capsys):
    from rlhf_helpers import tracking

    monkeypatch.setattr(tracking, "in_notebook_kernel", lambda: True)
    with tracking.ProgressLine(2, None) as bar:
        bar.update(2)
    assert bar.done == 2 and capsys.readouterr() == ("", "")
