"""Trainer callbacks shared by every TRL-based stage: TRL's logs into `metrics.jsonl`, live curves, the stage
clock in every checkpoint; and `train_or_restore`, which resumes a run without stepping past its end.

Key names follow one vocabulary: TRL/transformers log `loss`, `eval_loss`, `learning_rate`,
`rewards/margins`...; we write them as `train/loss`, `eval/loss`, `train/learning_rate`, and keep keys that
already have a namespace (`rewards/margins`, `objective/kl`) as they are.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable

from transformers import TrainerCallback

from .tracking import MetricsLogger, StageClock

SKIP = {"epoch", "total_flos", "train_runtime", "train_samples_per_second", "train_steps_per_second", "step"}


def namespaced(logs: dict[str, Any]) -> dict[str, Any]:
    """`loss` -> `train/loss`, `eval_loss` -> `eval/loss`, `eval_rewards/margins` -> `eval/rewards/margins`;
    other keys with a `/` are kept."""
    out: dict[str, Any] = {}
    for key, value in logs.items():
        if key in SKIP or not isinstance(value, (int, float)):
            continue
        if key.startswith("eval_"):  # before the `/` test: TRL's DPO logs eval_rewards/margins
            out[f"eval/{key[5:]}"] = value
        elif "/" in key:
            out[key] = value
        elif key == "train_loss":
            out["train/loss_mean"] = value  # the mean over the whole run, logged once at the end
        else:
            out[f"train/{key}"] = value
    if "epoch" in logs:
        out["train/epoch"] = logs["epoch"]
    return out


class MetricsCallback(TrainerCallback):
    """Append every trainer log to `metrics.jsonl` (step = optimizer steps) and call `on_row(row)` hooks; an
    evaluation at a step that already has one (the same weights measured again) is not logged twice. The
    rows the logger already holds (a resumed run's, up to its checkpoint) go to `on_row` at once, so that
    live curves start at step 1, not where this session does."""

    def __init__(self, logger: MetricsLogger, on_row: Callable[[dict], None] | None = None):
        self.logger = logger
        self.on_row = on_row
        for row in logger.rows if on_row is not None else ():
            on_row(row)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        values = namespaced(logs)
        if "eval/loss" in values and self._evaluated(state.global_step):
            # the same weights evaluated again at this step: the stage's closing evaluate() after the
            # trainer's own at the last step, or a finished stage run again. Logged once, not twice.
            return
        row = self.logger.log(state.global_step, **values)
        if self.on_row:
            self.on_row(row)

    def _evaluated(self, step: int) -> bool:
        return any(r["step"] == step and "eval/loss" in r for r in self.logger.rows)


class StepCallback(TrainerCallback):
    """Call `fn(step, logs)` after every log: the Flux tutorial's `add_step_callback`, for TRL trainers."""

    def __init__(self, fn: Callable[[int, dict], None]):
        self.fn = fn

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            self.fn(state.global_step, namespaced(logs))


class ClockCallback(TrainerCallback):
    """Stamp a `StageClock`'s running total into every checkpoint a transformers/TRL trainer saves."""

    def __init__(self, clock: StageClock):
        self.clock = clock

    def on_save(self, args, state, control, **kwargs):
        from pathlib import Path

        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            self.clock.stamp(folder)


def is_main_process() -> bool:
    """Whether this process writes a stage's artifacts: the only process, or the main one under `accelerate
    launch` (or torchrun). The others train their share of each step and write nothing: their metrics logger
    saw no rows (`MetricsCallback` logs on the main process alone), so a summary of theirs would be empty."""
    from accelerate import PartialState

    return PartialState().is_main_process


def train_or_restore(trainer, checkpoint: str | None):
    """`trainer.train(resume_from_checkpoint=checkpoint)`, except when the checkpoint already holds the
    whole run (its step is `max_steps`, as when a finished notebook is run again): then its weights and
    state are loaded and no step is taken. transformers would take one step past `max_steps` there (a
    rerun of a 10-step DPO stage trained an 11th), and every rerun would add another."""
    import json
    from pathlib import Path

    from transformers.trainer_callback import TrainerState
    from transformers.trainer_utils import TrainOutput

    max_steps = trainer.args.max_steps
    state_file = Path(checkpoint) / "trainer_state.json" if checkpoint else None
    if state_file is None or not state_file.exists() or max_steps <= 0 or \
            json.loads(state_file.read_text())["global_step"] < max_steps:
        return trainer.train(resume_from_checkpoint=checkpoint)
    trainer._load_from_checkpoint(checkpoint)
    trainer.state = TrainerState.load_from_json(str(state_file))
    # the saved state is rank 0's: each process says for itself which rank it is, as train() would
    trainer.state.is_local_process_zero = trainer.is_local_process_zero()
    trainer.state.is_world_process_zero = trainer.is_world_process_zero()
    print(f"{checkpoint} already holds all {trainer.state.global_step} steps: loaded it, trained nothing more.")
    return TrainOutput(trainer.state.global_step, float("nan"), {"train_runtime": None})


@contextmanager
def quiet_datasets():
    """The `datasets` progress bars off for a stage (usable as a decorator): under papermill a saved notebook
    keeps a bar's first frame, "0%", in plain text, which reads as a hang. Restored afterwards."""
    import datasets

    was_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_on:
            datasets.enable_progress_bars()


def without_notebook_progress(trainer):
    """Drop transformers' notebook progress table from `trainer`: it reads "Epoch 0/1" on a run of a fraction
    of an epoch and prints the loss to 6 decimals ("-0.000000" for GRPO and RLOO, whose loss is no progress
    signal). The live curves show progress instead; a terminal run keeps its tqdm bar."""
    from transformers.utils.notebook import NotebookProgressCallback

    trainer.remove_callback(NotebookProgressCallback)
    return trainer
