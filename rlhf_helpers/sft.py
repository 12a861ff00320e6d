"""Supervised fine-tuning with LoRA (notebook 02), on TRL's SFTTrainer.

Data: `data/sft.jsonl` demonstrations, as TRL's conversational *prompt–completion* examples
(`prompt=[user message]`, `completion=[assistant message]`), so the loss falls on the assistant's tokens
only (TRL builds `labels` with −100 on every prompt token; `tests/test_sft.py` proves it).

Outputs in `run_dir/sft/`: `metrics.jsonl`, `summary.json`, `config.json`, `checkpoints/` (resumable),
`adapter/` (the LoRA adapter and tokenizer) and `model/` (base + adapter merged: the SFT policy that later
stages load as their base, so that *their* reference, the adapter switched off, is the SFT model).

Command line (also under `accelerate launch`):
`python -m rlhf_helpers.sft --run-dir runs/x --profile cpu [--max-steps N]`.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

from .callbacks import (ClockCallback, MetricsCallback, is_main_process, quiet_datasets, train_or_restore,
                        without_notebook_progress)
from .config import DEFAULT_MODEL, add_stage_arguments, check_common_fields, command, stage_config_from_args
from .data import SFTRecord, load_sft, train_test_split
from .models import (checkpointing_flag, count_parameters, default_lora_config, load_model, num_layers,
                     precision_flags, resolve_model_path)
from .paths import data_path, project_root, stage_dir
from .seeding import seed_everything
from .tracking import MetricsLogger, PeakMemory, StageClock, atomic_write_dir, remove_dir, resume_point


FULL_FINE_TUNING_MAX_LR = 5e-4
"""Above this, `SFTStageConfig` warns that full fine-tuning runs at a LoRA learning rate."""


@dataclass
class SFTStageConfig:
    """Settings of the SFT stage. Profiles override a few (see `rlhf_helpers.config.PROFILES`)."""

    stage: ClassVar[str] = "sft"
    EVAL_ONLY: ClassVar[tuple[str, ...]] = ("n_compare", "max_new_tokens", "n_refusal_samples", "temperature",
                                          "generation_batch_size")
    """Fields only notebook 02's comparison reads, after training: changing them keeps the trained model."""

    model_name: str = DEFAULT_MODEL
    """Base model: a built-in name, a hub id or a local folder."""
    data_file: str = "sft.jsonl"
    """Demonstrations (format `sft`): a bare file name is looked for in data/ first, then in the working folder
    and the project root; a path with a folder in it, in the working folder, then the project root."""
    use_lora: bool = True
    """LoRA adapter (True) or full fine-tuning (False)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    lora_layers: int | None = None
    """Adapt only the top N transformer blocks (None: all); fewer is cheaper, since backward stops there."""
    learning_rate: float = 2e-4
    """Peak learning rate (LoRA tolerates ~10x the full fine-tuning rate)."""
    max_steps: int = 60
    """Optimizer steps."""
    batch_size: int = 8
    """Sequences per optimizer step (per device, before accumulation)."""
    grad_accum: int = 1
    """Gradient accumulation steps."""
    warmup: float = 0.05
    """Warm-up as a fraction of max_steps."""
    lr_scheduler: str = "cosine"
    """Learning-rate schedule (transformers name)."""
    max_length: int = 512
    """Tokens per example after the chat template; longer ones are truncated."""
    n_train: int | None = None
    """Use at most this many training demonstrations (None: all)."""
    eval_fraction: float = 0.1
    """Share of demonstrations held out for the eval loss (split by prompt, deterministic)."""
    n_eval: int | None = None
    """Use at most this many eval demonstrations (None: all)."""
    eval_steps: int = 20
    """Evaluate the held-out loss every this many steps."""
    save_steps: int = 20
    """Checkpoint every this many steps (resume continues from the last one)."""
    logging_steps: int = 2
    """Log the training loss every this many steps."""
    n_compare: int = 32
    """Held-out prompts (from data/prompts.jsonl's test split) for base-vs-SFT generations."""
    max_new_tokens: int = 160
    """Generation length for the comparison."""
    n_refusal_samples: int = 4
    """Samples per held-out harmful prompt when counting refusals (`evaluate.refusal_rate`)."""
    temperature: float = 0.7
    """Sampling temperature for the comparison (seeded)."""
    generation_batch_size: int = 16
    """Replies sampled per `generate` call in the comparison; a batch's size changes what a seeded `generate`
    samples. On an H100 a small model's sampling is bound by kernel launches, not arithmetic (SmolLM2-135M:
    about 60 ms a decoding step for 32 rows, docs/rl_on_a_cpu_budget.md section 18), so the gpu profile
    samples its 72 prompts in one batch."""
    dtype: str = "float32"
    """Weights dtype (the profile sets bfloat16 on GPU)."""
    load_in_4bit: bool = False
    """QLoRA 4-bit base weights (CUDA only)."""
    device: str = "cpu"
    """cpu, cuda or auto."""
    seed: int = 0
    """Seed for data order, dropout and sampling."""
    resume: bool = True
    """Continue from the last checkpoint in run_dir/sft/checkpoints when one exists."""

    def __post_init__(self):
        if self.max_steps < 1 or self.batch_size < 1:
            raise ValueError(f"max_steps and batch_size must be >= 1, got {self.max_steps} and {self.batch_size}")
        if self.generation_batch_size < 1:
            raise ValueError(f"generation_batch_size must be >= 1, got {self.generation_batch_size}")
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup is a fraction of max_steps, in [0, 1), got {self.warmup} (transformers reads 1 "
                             f"or more as a number of steps)")
        if self.load_in_4bit and not self.use_lora:
            raise ValueError("4-bit weights cannot be fine-tuned directly: keep use_lora=True for QLoRA")
        if not self.use_lora and self.learning_rate > FULL_FINE_TUNING_MAX_LR:
            warnings.warn(f"full fine-tuning (use_lora=False) at learning_rate={self.learning_rate:g}, a LoRA rate: "
                          f"every weight moves at it, about 10 times what full fine-tuning tolerates. Set "
                          f"learning_rate={self.learning_rate / 10:g} or lower", stacklevel=3)
        if not self.use_lora and self.lora_layers is not None:
            warnings.warn(f"lora_layers={self.lora_layers} has no effect with use_lora=False: every layer is trained",
                          stacklevel=3)
        check_common_fields(self)


def demonstrations_file(data_file: str | Path) -> Path:
    """Where `data_file` is (see `SFTStageConfig.data_file`); a clear error naming every place looked in."""
    given = Path(data_file).expanduser()
    if given.is_absolute():
        places = [given]
    else:
        places = [Path.cwd() / given, project_root() / given]
        if given.parent == Path("."):
            places.insert(0, data_path(str(given)))
    for place in places:
        if place.is_file():
            return place
    raise FileNotFoundError(f"SFT data_file {str(data_file)!r} is not a file; looked for "
                            f"{', '.join(str(p) for p in dict.fromkeys(places))}. Give an absolute path, or one "
                            f"relative to the project root")


def load_demonstrations(cfg: SFTStageConfig) -> tuple[list[SFTRecord], list[SFTRecord]]:
    """Train and eval demonstrations, split by prompt (deterministic, seed-independent). Too few for both
    sides of the split is an error, before any model is loaded."""
    path = demonstrations_file(cfg.data_file)
    records = load_sft(path)
    train, evals = train_test_split(records, test_fraction=cfg.eval_fraction, seed=0)
    used = train[: cfg.n_train], evals[: cfg.n_eval]
    print(f"SFT: {len(records)} demonstrations from {path}: {len(train)} to train on, {len(evals)} held out "
          f"(using {len(used[0])} and {len(used[1])})")
    if not train or not evals:
        raise ValueError(f"{path}: {len(records)} demonstration(s) split by prompt into {len(train)} to train on "
                         f"and {len(evals)} held out (eval_fraction={cfg.eval_fraction}); both need at least one. "
                         f"Add demonstrations with other prompts, or change eval_fraction")
    return used


def to_dataset(records: Sequence[SFTRecord]):
    """TRL conversational prompt–completion examples: the loss falls on the completion only."""
    from datasets import Dataset

    return Dataset.from_list([
        {"prompt": r.prompt_messages, "completion": [{"role": "assistant", "content": r.response}]} for r in records
    ])


def build_trl_config(cfg: SFTStageConfig, output_dir: str | Path):
    """TRL's SFTConfig from ours (bf16 only off-CPU; TRL's own default is bf16=True)."""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir), max_steps=cfg.max_steps, learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, warmup_steps=cfg.warmup, lr_scheduler_type=cfg.lr_scheduler,
        max_length=cfg.max_length, completion_only_loss=True, packing=False,
        eval_strategy="steps", eval_steps=cfg.eval_steps, save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=2, logging_steps=cfg.logging_steps, logging_first_step=True, report_to="none",
        **precision_flags(cfg.dtype, cfg.device),
        **checkpointing_flag(cfg.load_in_4bit), seed=cfg.seed, data_seed=cfg.seed,
        dataloader_num_workers=0, disable_tqdm=False,
    )


def demonstration_lengths(tok, records: Sequence[SFTRecord]) -> list[int]:
    """Tokens of each demonstration after the chat template, as TRL's SFTTrainer tokenises it before it
    truncates to max_length."""
    return [len(tok.apply_chat_template(r.messages, tokenize=True, return_dict=True)["input_ids"]) for r in records]


def length_notice(lengths: Sequence[int], max_length: int) -> str:
    """One line on the training demonstrations longer than max_length; "" when all fit."""
    cut = sum(n > max_length for n in lengths)
    return (f"SFT: {cut} of {len(lengths)} training demonstrations are longer than max_length={max_length} tokens "
            f"after the chat template (the longest {max(lengths)}); TRL keeps their first {max_length}, so the end of "
            f"the reply and its end-of-turn token are not learned. Raise max_length to keep them whole."
            if cut else "")


@quiet_datasets()
def build_trainer(cfg: SFTStageConfig, run_dir: str | Path, callbacks: Sequence[Any] = (),
                  logger: MetricsLogger | None = None, on_row=None,
                  data: tuple[Sequence[SFTRecord], Sequence[SFTRecord]] | None = None):
    """Model with LoRA, data and TRL's SFTTrainer, ready to `train()` (no datasets progress bars while it
    tokenises, and no notebook progress table: the notebook's live curves show progress). `data`: the
    (train, eval) demonstrations when the caller has loaded them already; None loads them."""
    from trl import SFTTrainer

    seed_everything(cfg.seed)
    out = stage_dir(run_dir, "sft")
    lora = default_lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, top_layers=cfg.lora_layers,
                               n_layers=num_layers(cfg.model_name), model=cfg.model_name) if cfg.use_lora else None
    model, tok = load_model(cfg.model_name, lora=lora, dtype=cfg.dtype, load_in_4bit=cfg.load_in_4bit,
                            device=cfg.device, padding_side="right")
    train, evals = data if data is not None else load_demonstrations(cfg)
    logger = logger or MetricsLogger(out)
    trainer = SFTTrainer(model=model, args=build_trl_config(cfg, out / "checkpoints"), train_dataset=to_dataset(train),
                         eval_dataset=to_dataset(evals), processing_class=tok,
                         callbacks=[MetricsCallback(logger, on_row), *callbacks])
    return without_notebook_progress(trainer), logger


def train_sft(cfg: SFTStageConfig, run_dir: str | Path, callbacks: Sequence[Any] = (), on_row=None) -> dict[str, Any]:
    """Train, evaluate, save `adapter/` and the merged `model/`, and write `summary.json`.

    `on_row(row)` is called with every metrics row (a live plot's `update`); `callbacks` are extra
    transformers `TrainerCallback`s (see `rlhf_helpers.callbacks.StepCallback`)."""
    memory = PeakMemory(cfg.device).start()
    clock = StageClock(memory=memory)
    out = stage_dir(run_dir, "sft")
    train, evals = load_demonstrations(cfg)
    ckpt, logger, settings = resume_point(out, cfg, data=(train, evals))  # rows after the checkpoint are redone
    clock.resumed(ckpt)
    logger.save_config(settings)
    trainer, _ = build_trainer(cfg, run_dir, [*callbacks, ClockCallback(clock)], logger, on_row, data=(train, evals))
    lengths = demonstration_lengths(trainer.processing_class, train)
    said = length_notice(lengths, cfg.max_length)
    if said:
        print(said)
    # TRL drops a demonstration whose prompt alone fills max_length (no reply token left to learn): counted here
    dropped = {"train": len(train) - len(trainer.train_dataset), "eval": len(evals) - len(trainer.eval_dataset)}
    if any(dropped.values()):
        print(f"SFT: TRL dropped {dropped['train']} of {len(train)} training and {dropped['eval']} of {len(evals)} "
              f"held-out demonstrations whose prompt alone fills max_length={cfg.max_length} tokens, leaving no "
              f"reply token to learn. Raise max_length, or shorten those prompts, to keep them.")
    if ckpt is None:
        eval_before = trainer.evaluate()["eval_loss"]
    else:  # measured by the session that started the run, at step 0
        eval_before = next((r["eval/loss"] for r in logger.rows if r["step"] == 0 and "eval/loss" in r), None)
    tokens_before = max((r.get("train/num_tokens", 0) for r in logger.rows), default=0)  # earlier sessions'
    result = train_or_restore(trainer, ckpt)
    eval_after = trainer.evaluate()["eval_loss"]
    model, tok = trainer.model, trainer.processing_class
    unquantized_base = cfg.model_name if cfg.load_in_4bit else None
    main_process = is_main_process()  # under accelerate launch, one process writes
    if main_process:
        if cfg.use_lora:
            atomic_write_dir(out / "adapter", lambda d: (model.save_pretrained(d), tok.save_pretrained(d)))
        else:  # full fine-tuning has no adapter: model/ is the policy (an older run's adapter must not stay)
            remove_dir(out / "adapter")
        atomic_write_dir(out / "model",
                         lambda d: _save_merged(model, tok, d, unquantized_base, out / "adapter", cfg.dtype))
    rows = [r for r in logger.rows if "train/loss" in r]
    tokens = max((r.get("train/num_tokens", 0) for r in logger.rows), default=0)
    runtime = result.metrics.get("train_runtime")  # this session's (None when it trained nothing)
    summary = {
        "model_name": cfg.model_name, "base_path": resolve_model_path(cfg.model_name, verbose=False),
        "steps": trainer.state.global_step, "train_examples": len(trainer.train_dataset),
        "eval_examples": len(trainer.eval_dataset), "train_examples_cut": sum(n > cfg.max_length for n in lengths),
        "train_examples_dropped": dropped["train"], "eval_examples_dropped": dropped["eval"],
        "train_loss_first": rows[0]["train/loss"] if rows else None,
        "train_loss_last": rows[-1]["train/loss"] if rows else None, "eval_loss_before": eval_before,
        "eval_loss_after": eval_after, "train_tokens": tokens,
        "tokens_per_second": (tokens - tokens_before) / runtime if runtime else None,  # this session's
        "train_runtime_s": runtime, **clock.facts(),
        "parameters": count_parameters(model), "resumed_from": ckpt, "use_lora": cfg.use_lora,
        "adapter_dir": str(out / "adapter") if cfg.use_lora else None, "model_dir": str(out / "model"),
    }
    if main_process:
        logger.summary(summary)
    return summary


def _save_merged(model, tok, folder: Path, unquantized_base: str | None = None, adapter_dir: Path | None = None,
                 dtype: str = "float32") -> None:
    """Base + adapter merged into plain weights (a copy, so the trainer's model keeps its adapter).

    A 4-bit (QLoRA) model is not merged in place: peft would dequantize each layer, add the LoRA delta and
    quantize it again, saving a twice-rounded NF4 model that every later stage would take as its base and KL
    reference. With `unquantized_base`, the base is loaded again unquantized (in `dtype`, on the CPU) and the
    saved adapter in `adapter_dir` is merged into it instead."""
    import copy

    if unquantized_base is not None:
        from peft import PeftModel

        base, _ = load_model(unquantized_base, dtype=dtype, device="cpu")
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    elif hasattr(model, "merge_and_unload"):
        merged = copy.deepcopy(model).merge_and_unload()
    else:
        merged = model
    merged.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)


def loss_mask_html(trainer, index: int = 0, max_tokens: int = 400) -> str:
    """One training example as the model sees it: grey tokens carry no loss (the prompt), green ones do."""
    import html

    example = trainer.train_dataset[index]
    tok = trainer.processing_class
    spans = []
    for token_id, label in list(zip(example["input_ids"], example["labels"]))[:max_tokens]:
        text = html.escape(tok.decode([token_id])).replace("\n", "↵<br>")
        style = "background:#d9f2d9" if label != -100 else "color:#999"
        spans.append(f"<span style='{style}'>{text}</span>")
    return "<div style='font-family:monospace;white-space:pre-wrap;line-height:1.5'>" + "".join(spans) + "</div>"


def sft_policy_path(run_dir: str | Path, fallback: str = DEFAULT_MODEL) -> tuple[str, bool]:
    """The SFT model folder of `run_dir` if notebook 02 saved one, else `fallback`; and whether it fell back."""
    folder = stage_dir(run_dir, "sft") / "model"
    if (folder / "config.json").exists():
        return str(folder), False
    print(f"No SFT model in {folder}: falling back to the base model {fallback!r} (run notebook 02 first to use SFT).")
    return fallback, True


@command
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_helpers.sft", description="Supervised fine-tuning stage")
    add_stage_arguments(parser, SFTStageConfig, skip=SFTStageConfig.EVAL_ONLY)
    run_dir, cfg = stage_config_from_args(parser, SFTStageConfig, vars(parser.parse_args(argv)))
    summary = train_sft(cfg, run_dir)
    if is_main_process():
        print({k: summary[k] for k in ("steps", "eval_loss_before", "eval_loss_after", "wall_time_s")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
