"""Direct Preference Optimisation (notebook 05), on TRL's DPOTrainer.

DPO (Rafailov et al. 2023) skips the reward model and the RL loop: on each preference pair it raises the
policy's log-likelihood ratio to the reference on the chosen response relative to the rejected one,

    loss = −log σ(β·[log π(y_w|x) − log π_ref(y_w|x)] − β·[log π(y_l|x) − log π_ref(y_l|x)]),

where r̂(x, y) = β·(log π(y|x) − log π_ref(y|x)) is its *implicit reward* (`implicit_rewards`). The policy
is the SFT model with a fresh LoRA adapter; the reference is the same model with the adapter disabled (we
pass TRL a plain model and a `peft_config`, so it makes the adapter itself and, with `ref_model=None`,
computes reference log-probs by switching the adapter off: no second copy, no "ref" adapter).

Data: `PreferencePair`s as TRL's conversational preference examples (`prompt` the pair's conversation,
`chosen` and `rejected` one assistant message each), so the chat template applies; the completion TRL scores is
the reply plus the template's end-of-turn tokens (`<|im_end|>\\n`). TRL truncates a pair longer than
`max_length` (keeping the start) and drops one whose prompt alone fills it; we count both and report them.

Metrics (TRL's names): `rewards/chosen`, `rewards/rejected` (mean r̂), `rewards/margins` (mean
r̂(y_w) − r̂(y_l)), `rewards/accuracies` (share with r̂(y_w) > r̂(y_l)), `logps/chosen`, `logps/rejected`,
`train/loss`; `eval/…` the same on held-out pairs.

Outputs in `run_dir/dpo/`: `metrics.jsonl`, `summary.json`, `config.json`, `checkpoints/checkpoint-N/`
(adapters, resumable) and `adapter/` (the final LoRA adapter, whose base is `policy_path`).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from .callbacks import (ClockCallback, MetricsCallback, is_main_process, quiet_datasets, train_or_restore,
                        without_notebook_progress)
from .config import DEFAULT_MODEL, check_common_fields, command
from .data import PreferencePair
from .models import checkpointing_flag, count_parameters, default_lora_config, load_model, precision_flags
from .paths import stage_dir
from .seeding import seed_everything
from .tracking import MetricsLogger, PeakMemory, StageClock, atomic_write_dir, half_means, resume_point


@dataclass
class DPOStageConfig:
    """Settings of the DPO stage. Profiles override a few (see `rlhf_helpers.config.PROFILES`)."""

    stage: ClassVar[str] = "dpo"

    model_name: str = DEFAULT_MODEL
    """Policy base when run_dir has no SFT model (the notebook uses run_dir/sft/model when present)."""
    dtype: str = "float32"
    """Weights dtype (the profile sets bfloat16 on GPU)."""
    load_in_4bit: bool = False
    """QLoRA 4-bit base weights (CUDA only)."""
    device: str = "cpu"
    """cpu, cuda or auto."""
    beta: float = 0.1
    """β: the implicit reward's scale, and how strongly the policy is held to the reference (the paper's 0.1)."""
    loss_type: str = "sigmoid"
    """TRL's DPO loss: 'sigmoid' is the paper's; 'ipo', 'hinge', 'robust'… are variants."""
    sft_weight: float = 0.0
    """Weight of the chosen replies' negative log-likelihood added to the DPO loss (TRL's 'sft' loss term: the
    mean over all chosen tokens of a batch, where RPO, Pang et al. 2024, averages each reply's mean, so long
    replies weigh a little more here). It holds the chosen replies' likelihood up, where plain DPO may lower
    both replies' and drift; 0 leaves plain DPO. train/loss then starts at log 2 + sft_weight × that NLL."""
    learning_rate: float = 5e-5
    """Peak learning rate (LoRA; full fine-tuning uses ~5e-7)."""
    max_steps: int = 100
    """Optimizer steps."""
    batch_size: int = 8
    """Pairs per optimizer step (per device, before accumulation)."""
    grad_accum: int = 1
    """Gradient accumulation steps."""
    warmup: float = 0.1
    """Warm-up as a fraction of max_steps. transformers' linear warm-up gives the first step a learning rate
    of 0, so with any warm-up step 1 does not move the weights (1 of 10 steps on a 10-step run)."""
    lr_scheduler: str = "cosine"
    """Learning-rate schedule (transformers name)."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_layers: int | None = None
    """Adapt only the top N transformer blocks (None: all); fewer is cheaper, since backward stops there."""
    max_length: int = 384
    """Tokens per prompt + reply after the chat template; longer pairs are truncated (counted)."""
    eval_fraction: float = 0.2
    """Share of pairs held out, split by prompt as notebook 03 splits them (same seed: the same held-out pairs)."""
    n_train: int | None = None
    """Use at most this many training pairs (None: all)."""
    n_eval: int | None = None
    """Use at most this many held-out pairs (None: all)."""
    eval_steps: int = 0
    """Evaluate on the held-out pairs every this many steps (0: only once, at the end)."""
    logging_steps: int = 2
    """Log every this many steps."""
    save_steps: int = 20
    """Checkpoint every this many steps (resume continues from the last one)."""
    seed: int = 0
    """Seed for data order and the adapter's initialisation."""
    resume: bool = True
    """Continue from the last checkpoint in run_dir/dpo/checkpoints when one exists."""

    def __post_init__(self):
        checks = [
            (self.beta > 0, f"beta must be > 0 (0.01 .. 0.5 is usual), got {self.beta}"),
            (self.sft_weight >= 0, f"sft_weight must be >= 0 (0: plain DPO; 1 is RPO's), got {self.sft_weight}"),
            (self.max_steps >= 1 and self.batch_size >= 1 and self.grad_accum >= 1,
             f"max_steps, batch_size and grad_accum must be >= 1, got {self.max_steps}, {self.batch_size}, "
             f"{self.grad_accum}"),
            (0 < self.eval_fraction < 1, f"eval_fraction must be in (0, 1), got {self.eval_fraction}"),
            (0 <= self.warmup < 1, f"warmup is a fraction of max_steps, in [0, 1), got {self.warmup} (transformers "
                                   f"reads 1 or more as a number of steps)"),
            (self.max_length >= 32, f"max_length must be >= 32 tokens (the chat template alone takes ~30), "
                                    f"got {self.max_length}"),
            (self.logging_steps >= 1 and self.save_steps >= 1 and self.eval_steps >= 0,
             "logging_steps and save_steps must be >= 1, eval_steps >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"DPOStageConfig: {message}")
        check_common_fields(self)

    @property
    def pairs_per_step(self) -> int:
        return self.batch_size * self.grad_accum


# --- shared by the TRL preference/RL stages (DPO here, GRPO and RLOO in online_rl) ------------------------

def save_adapter(model, tok, folder: Path) -> Path:
    """The LoRA adapter (its adapter_config.json names the base folder) and the tokenizer, moved in whole."""
    return atomic_write_dir(folder, lambda d: (model.save_pretrained(d), tok.save_pretrained(d)))


# --- data -------------------------------------------------------------------------------------------------

def to_dataset(pairs: Sequence[PreferencePair]):
    """TRL conversational preference examples; a pair's own message history is kept when it has one."""
    from datasets import Dataset

    from .data import to_trl_preference_dataset

    if not pairs:
        raise ValueError("DPO needs at least one preference pair; run notebook 03 (run_dir/preferences/pairs.jsonl) "
                         "or use data/preference_snapshot.jsonl")
    return Dataset.from_list(to_trl_preference_dataset(pairs, conversational=True))


def _ids(tok, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"])


def completion_ids(tok, prompt_messages: list[dict], response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) exactly as TRL's DPO tokenises a conversational example: the completion
    starts where the templated prompt and prompt + reply first differ."""
    prompt = _ids(tok, prompt_messages, add_generation_prompt=True)
    full = _ids(tok, prompt_messages + [{"role": "assistant", "content": response}])
    n = 0
    while n < min(len(prompt), len(full)) and prompt[n] == full[n]:
        n += 1
    return prompt[:n], full[n:]


def length_report(tok, pairs: Sequence[PreferencePair], max_length: int) -> dict[str, int]:
    """How many pairs TRL will drop (prompt alone fills max_length) or truncate (prompt + reply longer)."""
    report = {"pairs": len(pairs), "dropped_prompt_too_long": 0, "truncated": 0}
    for p in pairs:
        prompt, chosen = completion_ids(tok, p.conversation, p.chosen)
        _, rejected = completion_ids(tok, p.conversation, p.rejected)
        if len(prompt) >= max_length:
            report["dropped_prompt_too_long"] += 1
        elif len(prompt) + max(len(chosen), len(rejected)) > max_length:
            report["truncated"] += 1
    return report


def length_notice(split: str, report: dict[str, int], max_length: int) -> str:
    """One line on the pairs of `report` (from `length_report`) that do not fit max_length; "" when all fit."""
    dropped, cut = report["dropped_prompt_too_long"], report["truncated"]
    parts = ([f"{cut} of {report['pairs']} are longer than max_length={max_length} tokens (prompt + reply) and "
              f"TRL keeps their first {max_length}"] if cut else []) + \
            ([f"{dropped} of {report['pairs']} are dropped, their prompt alone filling it"] if dropped else [])
    return f"DPO {split} pairs: {'; '.join(parts)} (raise max_length to keep them whole)." if parts else ""


# --- config and training ----------------------------------------------------------------------------------

def loss_terms(cfg: DPOStageConfig) -> dict[str, list]:
    """TRL's `loss_type` (a list of terms, summed) and, with an SFT term, its `loss_weights`."""
    if not cfg.sft_weight:
        return {"loss_type": [cfg.loss_type]}
    return {"loss_type": [cfg.loss_type, "sft"], "loss_weights": [1.0, cfg.sft_weight]}


def trl_kwargs(cfg: DPOStageConfig, output_dir: str | Path, with_eval: bool = False) -> dict[str, Any]:
    """Our fields as TRL DPOConfig arguments (tested field by field)."""
    return dict(
        output_dir=str(output_dir), max_steps=cfg.max_steps, learning_rate=cfg.learning_rate, beta=cfg.beta,
        **loss_terms(cfg), per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, warmup_steps=cfg.warmup, lr_scheduler_type=cfg.lr_scheduler,
        max_grad_norm=cfg.max_grad_norm, max_length=cfg.max_length, truncation_mode="keep_start",
        eval_strategy="steps" if with_eval and cfg.eval_steps else "no", eval_steps=cfg.eval_steps or None,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=2, logging_steps=cfg.logging_steps,
        logging_first_step=True, report_to="none", **precision_flags(cfg.dtype, cfg.device),
        **checkpointing_flag(cfg.load_in_4bit), disable_dropout=True, precompute_ref_log_probs=False,
        trust_remote_code=False, seed=cfg.seed, data_seed=cfg.seed, dataloader_num_workers=0,
    )


def build_trl_config(cfg: DPOStageConfig, output_dir: str | Path, with_eval: bool = False):
    """TRL's DPOConfig from ours (bf16 only off-CPU, gradient checkpointing only for 4-bit)."""
    from trl import DPOConfig

    return DPOConfig(**trl_kwargs(cfg, output_dir, with_eval))


def build_trainer(cfg: DPOStageConfig, run_dir: str | Path, policy_path: str, train_pairs: Sequence[PreferencePair],
                  eval_pairs: Sequence[PreferencePair] | None = None, logger: MetricsLogger | None = None,
                  on_row=None, callbacks: Sequence[Any] = ()):
    """The policy (plain weights of `policy_path`; TRL adds the LoRA adapter from our peft config), data and
    TRL's DPOTrainer with ref_model=None, ready to `train()`."""
    from trl import DPOTrainer

    seed_everything(cfg.seed)
    out = stage_dir(run_dir, "dpo")
    model, tok = load_model(policy_path, dtype=cfg.dtype, load_in_4bit=cfg.load_in_4bit, device=cfg.device,
                            padding_side="right")
    lora = default_lora_config(cfg.lora_r, cfg.lora_alpha, dropout=0.0, top_layers=cfg.lora_layers,
                               n_layers=model.config.num_hidden_layers if cfg.lora_layers else None, model=model)
    logger = logger or MetricsLogger(out)
    trainer = DPOTrainer(model=model, ref_model=None, args=build_trl_config(cfg, out / "checkpoints", bool(eval_pairs)),
                         train_dataset=to_dataset(train_pairs), eval_dataset=to_dataset(eval_pairs) if eval_pairs else None,
                         processing_class=tok, peft_config=lora, callbacks=[MetricsCallback(logger, on_row), *callbacks])
    return without_notebook_progress(trainer), logger


@quiet_datasets()
def train_dpo(cfg: DPOStageConfig, run_dir: str | Path, policy_path: str, train_pairs: Sequence[PreferencePair],
              eval_pairs: Sequence[PreferencePair] | None = None, on_row=None, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train, evaluate on `eval_pairs` (every `eval_steps` steps, and once at the end), save `adapter/`, write
    `summary.json`; returns the summary.

    `policy_path` is the SFT model folder (or the base model's name when there is none); `on_row(row)` gets
    every metrics row (a live plot's `update`); `callbacks` are extra transformers TrainerCallbacks."""
    memory = PeakMemory(cfg.device).start()
    clock = StageClock(memory=memory)
    out = stage_dir(run_dir, "dpo")
    ckpt, logger, settings = resume_point(out, cfg, data=train_pairs, inputs={"policy": policy_path})
    clock.resumed(ckpt)
    logger.save_config(settings)
    trainer, _ = build_trainer(cfg, run_dir, policy_path, train_pairs, eval_pairs, logger, on_row,
                               [*callbacks, ClockCallback(clock)])
    tok = trainer.processing_class
    lengths = {"train": length_report(tok, train_pairs, cfg.max_length)}
    if eval_pairs:
        lengths["eval"] = length_report(tok, eval_pairs, cfg.max_length)
    for split, rep in lengths.items():
        said = length_notice(split, rep, cfg.max_length)
        if said:
            print(said)
    if len(trainer.train_dataset) != len(train_pairs) - lengths["train"]["dropped_prompt_too_long"]:
        raise RuntimeError(f"TRL kept {len(trainer.train_dataset)} of {len(train_pairs)} training pairs, but "
                           f"{lengths['train']} predicted otherwise: TRL's preprocessing changed; update length_report")
    result = train_or_restore(trainer, ckpt)
    model = trainer.model
    main_process = is_main_process()
    adapter = save_adapter(model, tok, out / "adapter") if main_process else out / "adapter"
    cost = clock.facts()  # what producing the model took: the closing evaluation below is not part of it
    evaluated = time.perf_counter()
    evals = {k.replace("eval_", "eval/"): v for k, v in trainer.evaluate().items()} if eval_pairs else {}
    rows = [r for r in logger.rows if "rewards/margins" in r]
    first, last = (rows[0], rows[-1]) if rows else ({}, {})
    steps = trainer.state.global_step
    seen = steps * cfg.pairs_per_step * trainer.accelerator.num_processes  # every process takes its own pairs
    summary = {
        "policy_path": policy_path, "beta": cfg.beta, "loss_type": cfg.loss_type, "sft_weight": cfg.sft_weight,
        "steps": steps,
        "train_pairs": len(trainer.train_dataset), "eval_pairs": len(trainer.eval_dataset) if eval_pairs else 0,
        "lengths": lengths,
        "pairs_seen": seen, "samples_seen": 2 * seen,
        "train_loss_first": first.get("train/loss"), "train_loss_last": last.get("train/loss"),
        "margin_first": first.get("rewards/margins"), "margin_last": last.get("rewards/margins"),
        "accuracy_last": last.get("rewards/accuracies"), "learning_rate_first": first.get("train/learning_rate"),
        "margin_halves": half_means(rows, "rewards/margins"), "accuracy_halves": half_means(rows, "rewards/accuracies"),
        "eval_margin": evals.get("eval/rewards/margins"), "eval_accuracy": evals.get("eval/rewards/accuracies"),
        "eval_loss": evals.get("eval/loss"), "eval_time_s": time.perf_counter() - evaluated,
        "train_runtime_s": result.metrics.get("train_runtime"), **cost, "parameters": count_parameters(model),
        "resumed_from": ckpt, "adapter_dir": str(adapter),
    }
    if main_process:
        logger.summary(summary)
    return summary


# --- the implicit reward ----------------------------------------------------------------------------------

@torch.no_grad()
def sequence_logprobs(model, tok, prompts: Sequence[str | list[dict]], responses: Sequence[str],
                      batch_size: int = 8) -> np.ndarray:
    """Σ_t log π(y_t | x, y_<t) over each reply's completion tokens as DPO scores them (the reply and the
    template's end-of-turn tokens), at temperature 1: shape (N,)."""
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out: list[float] = []
    for s in range(0, len(prompts), batch_size):
        seqs = []
        for p, r in zip(prompts[s:s + batch_size], responses[s:s + batch_size]):
            msgs = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
            prompt_ids, comp = completion_ids(tok, msgs, r)
            seqs.append((prompt_ids + comp, len(prompt_ids)))
        width = max(len(ids) for ids, _ in seqs)
        ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in seqs], device=device)  # (B, T) right-padded
        attn = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in seqs], device=device)
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
        logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1): token t+1
        mask = torch.zeros_like(logp)
        for b, (full, start) in enumerate(seqs):
            mask[b, start - 1:len(full) - 1] = 1.0  # positions predicting the completion tokens
        out.extend((logp * mask).sum(-1).tolist())
    return np.asarray(out)


def implicit_rewards(model, tok, prompts: Sequence[str | list[dict]], responses: Sequence[str], beta: float,
                     batch_size: int = 8) -> np.ndarray:
    """DPO's implicit reward r̂(x, y) = β·(log π(y|x) − log π_ref(y|x)), π_ref being `model` with its LoRA
    adapter disabled: shape (N,). Differences between replies to one prompt are what DPO learns; the level
    for a prompt (β·log Z(x)) is not identified."""
    from .models import reference_model

    was_training = model.training
    model.eval()
    policy = sequence_logprobs(model, tok, prompts, responses, batch_size)
    with reference_model(model):
        ref = sequence_logprobs(model, tok, prompts, responses, batch_size)
    if was_training:
        model.train()
    return beta * (policy - ref)


def pair_implicit_margins(model, tok, pairs: Sequence[PreferencePair], beta: float) -> tuple[np.ndarray, np.ndarray]:
    """Implicit rewards of the chosen and of the rejected reply of each pair."""
    prompts = [p.conversation for p in pairs]
    return (implicit_rewards(model, tok, prompts, [p.chosen for p in pairs], beta),
            implicit_rewards(model, tok, prompts, [p.rejected for p in pairs], beta))


def load_training_pairs(run_dir: str | os.PathLike) -> tuple[list[PreferencePair], str]:
    """The pairs notebook 03 wrote (run_dir/preferences/pairs.jsonl), else the shipped snapshot; and which."""
    from .paths import data_path
    from .preferences import read_pairs

    live = stage_dir(run_dir, "preferences") / "pairs.jsonl"
    if live.exists():
        return read_pairs(live), str(live)
    snapshot = data_path("preference_snapshot.jsonl")
    print(f"No pairs in {live}: using the shipped snapshot {snapshot} (run notebook 03 to make live pairs).")
    return read_pairs(snapshot), str(snapshot)


@command
def main(argv: Sequence[str] | None = None) -> int:
    """`python -m rlhf_helpers.dpo --run-dir runs/x --profile cpu [--beta 0.2 ...]` (also under `accelerate
    launch`): DPO on the run's pairs (notebook 03's, else the shipped snapshot), held-out pairs split as
    notebook 03 splits them, from the run's SFT model (else the base model)."""
    import argparse

    from .config import add_stage_arguments, stage_config_from_args
    from .reward_model import split_pairs
    from .sft import sft_policy_path

    parser = argparse.ArgumentParser(prog="python -m rlhf_helpers.dpo", description="DPO stage (TRL's DPOTrainer)")
    add_stage_arguments(parser, DPOStageConfig)
    run_dir, cfg = stage_config_from_args(parser, DPOStageConfig, vars(parser.parse_args(argv)))
    policy_path, _ = sft_policy_path(run_dir, cfg.model_name)
    pairs, _ = load_training_pairs(run_dir)
    train, held = split_pairs(pairs, cfg.eval_fraction, cfg.seed, cfg.n_train, cfg.n_eval)
    summary = train_dpo(cfg, run_dir, policy_path, train, held)
    if is_main_process():
        print({k: summary[k] for k in ("steps", "pairs_seen", "margin_last", "eval_margin", "eval_accuracy",
                                       "wall_time_s")})
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
