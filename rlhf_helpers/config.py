"""Profiles and stage configs.

A *profile* is data: one frozen dataclass instance per hardware budget (`smoke`, `cpu`, `gpu`). It holds
the settings every stage shares (model, dtype, 4-bit) and, per stage, only the fields that differ from
that stage's config defaults. A *stage config* is a dataclass with documented, safe defaults; build one
for a profile with `stage_config(ConceptsConfig, "cpu", seed=3)`: defaults, then the profile's overrides
for that stage, then yours. Unknown field names fail with the list of valid ones.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, TypeVar

DEFAULT_MODEL = "smollm2-135m-instruct"


class SetupError(ValueError):
    """A setting or an input the user can fix (a model that cannot be found, a device this machine lacks):
    command lines print its message and exit 2, without a traceback."""


def command(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a stage's `main(argv)`: a mistake the user can fix (SetupError, DataError: a bad line of an input
    file, FileNotFoundError: an earlier stage's output missing) prints `error: ...` and exits 2; anything
    else is a bug and keeps its traceback."""
    import functools
    import sys

    from .data_formats import DataError

    @functools.wraps(main)
    def wrapped(argv: Sequence[str] | None = None) -> int:
        try:
            return main(argv)
        except (SetupError, DataError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return wrapped


DTYPE_NAMES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


def check_common_fields(cfg: Any) -> None:
    """The checks every stage config shares, on whichever of these fields `cfg` has: `dtype`, `device`,
    `learning_rate`, `lora_layers`, `n_train`, `n_eval` and `lr_scheduler`. Raises ValueError naming the
    field, the value given and what to give instead, so that a mistake fails when the config is built, not
    minutes later inside a trainer (or never: `lora_layers=-2` trained every layer)."""
    import re

    has = {f.name for f in dataclasses.fields(cfg)}

    def check(field_name: str, ok: bool, rule: str) -> None:
        if not ok:
            raise ValueError(f"{field_name} {rule}, got {getattr(cfg, field_name)!r} ({type(cfg).__name__})")

    if "dtype" in has:
        check("dtype", cfg.dtype in DTYPE_NAMES, f"must be one of {', '.join(DTYPE_NAMES)}")
    if "device" in has:
        check("device", bool(re.fullmatch(r"cpu|auto|(cuda|mps|xpu|npu)(:\d+)?", str(cfg.device))),
              "must be cpu, auto, or a torch accelerator such as cuda, cuda:N, mps or xpu")
    if "learning_rate" in has:
        check("learning_rate", cfg.learning_rate > 0, "must be > 0")
    for count in ("lora_layers", "n_train", "n_eval"):
        if count in has:
            value = getattr(cfg, count)
            check(count, value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1),
                  "must be None (all) or a whole number >= 1")
    if "lr_scheduler" in has:
        from transformers.trainer_utils import SchedulerType

        names = [s.value for s in SchedulerType]
        check("lr_scheduler", cfg.lr_scheduler in names, f"must be one of {', '.join(names)}")


@dataclass(frozen=True)
class Profile:
    """A hardware budget. Stages read shared settings here and their own overrides from `stages`."""

    name: str
    """Profile name: `smoke`, `cpu` or `gpu`."""
    description: str
    """One line saying what the profile is for."""
    model_name: str = DEFAULT_MODEL
    """Default model: a built-in name (see `rlhf_helpers.models.known_models()`), a hub id or a path."""
    dtype: str = "float32"
    """Torch dtype for weights: `float32` on CPU; `bfloat16` on recent GPUs."""
    load_in_4bit: bool = False
    """QLoRA-style 4-bit base weights via bitsandbytes; needs CUDA."""
    device: str = "cpu"
    """`cpu`, `cuda` or `auto` (CUDA when present)."""
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-stage overrides: stage name -> {field: value} for that stage's config dataclass."""

    def overrides_for(self, stage: str) -> dict[str, Any]:
        return dict(self.stages.get(stage, {}))


PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke",
        description="CI: a handful of steps and tiny batches; each notebook within about 90 s on 2 CPU cores.",
        stages={
            "concepts": {"n_iters": 200},
            "sft": {"max_steps": 2, "batch_size": 2, "n_train": 8, "n_eval": 4, "eval_steps": 2, "save_steps": 2,
                    "logging_steps": 1, "n_compare": 2, "max_new_tokens": 24, "max_length": 256,
                    "n_refusal_samples": 1},
            "rm": {"max_steps": 2, "batch_size": 2, "n_live_prompts": 4, "max_new_tokens": 32, "n_fresh": 4,
                   "n_train": 8, "n_eval": 4, "eval_steps": 1000, "save_steps": 1000, "logging_steps": 1,
                   "lora_layers": 2, "max_length": 256},
            "ppo": {"max_steps": 2, "batch_size": 4, "samples_per_prompt": 2, "group_baseline": True,
                    "response_length": 24, "ppo_epochs": 2, "lora_layers": 4, "save_steps": 1, "sample_every": 1,
                    "n_samples": 2},
            "eval": {"n_prompts": 4, "n_checkpoint_prompts": 2, "max_new_tokens": 24},
            "dpo": {"max_steps": 2, "batch_size": 2, "n_train": 8, "n_eval": 4, "lora_layers": 2, "max_length": 256,
                    "warmup": 0.0, "logging_steps": 1, "save_steps": 1000},
            "grpo": {"max_steps": 1, "batch_size": 4, "num_generations": 2, "max_completion_length": 16,
                     "lora_layers": 2, "n_prompts": 8, "save_steps": 1000, "sample_every": 1, "n_samples": 2},
            "rloo": {"max_steps": 1, "batch_size": 4, "num_generations": 2, "max_completion_length": 16,
                     "lora_layers": 2, "n_prompts": 8, "save_steps": 1000, "sample_every": 1, "n_samples": 2},
        },
    ),
    "cpu": Profile(
        name="cpu",
        description="Default: the whole suite learns visibly on a 2-core laptop CPU with SmolLM2-135M.",
        stages={
            "concepts": {"n_iters": 500},
            "sft": {"max_steps": 48, "batch_size": 4, "learning_rate": 2e-3, "lora_layers": 16, "n_eval": 16,
                    "eval_steps": 12, "save_steps": 12, "n_compare": 24, "max_new_tokens": 128, "max_length": 256},
            "rm": {"max_steps": 48, "batch_size": 4, "lora_layers": 8, "n_live_prompts": 4, "n_fresh": 24,
                   "max_new_tokens": 96, "eval_steps": 1000, "save_steps": 12, "logging_steps": 2},
            "ppo": {"max_steps": 8, "batch_size": 16, "samples_per_prompt": 4, "group_baseline": True,
                    "num_mini_batches": 2, "response_length": 96, "lam": 1.0, "missing_eos_penalty": 0.5,
                    "ppo_epochs": 2, "lora_layers": 8, "learning_rate": 3e-4, "save_steps": 2,
                    "keep_checkpoints": 4, "sample_every": 2},
            "eval": {"n_prompts": 32, "n_checkpoint_prompts": 16, "max_new_tokens": 96, "batch_size": 32},
            "dpo": {"max_steps": 10, "batch_size": 4, "learning_rate": 1e-3, "lora_layers": 8, "n_eval": 24,
                    "max_length": 256, "logging_steps": 1, "save_steps": 5, "warmup": 0.0},
            "grpo": {"max_steps": 6, "batch_size": 8, "num_generations": 4, "max_completion_length": 64,
                     "learning_rate": 1e-3, "lora_layers": 8, "save_steps": 3, "sample_every": 3},
            "rloo": {"max_steps": 6, "batch_size": 8, "num_generations": 4, "max_completion_length": 64,
                     "learning_rate": 1e-3, "lora_layers": 8, "save_steps": 3, "sample_every": 3},
        },
    ),
    "gpu": Profile(
        name="gpu",
        description="One GPU: bf16, optional 4-bit QLoRA, bigger batches, more steps, a larger model.",
        model_name="Qwen/Qwen2.5-0.5B-Instruct",
        dtype="bfloat16",
        load_in_4bit=False,
        device="cuda",
        stages={
            "concepts": {"n_iters": 2000},
            "sft": {"max_steps": 200, "batch_size": 16, "n_compare": 72, "max_new_tokens": 256, "eval_steps": 25,
                    "save_steps": 50, "logging_steps": 5, "generation_batch_size": 72},
            "rm": {"max_steps": 300, "batch_size": 16, "lora_layers": None, "n_live_prompts": 248, "use_snapshot": False,
                   "n_fresh": 72, "fresh_samples_per_prompt": 4, "eval_steps": 50, "save_steps": 100,
                   "logging_steps": 5, "generation_batch_size": 144},
            "ppo": {"max_steps": 30, "batch_size": 64, "samples_per_prompt": 4, "group_baseline": True,
                    "num_mini_batches": 4, "ppo_epochs": 2, "response_length": 128, "lam": 1.0,
                    "missing_eos_penalty": 0.5, "init_kl_coef": 0.1, "adaptive_kl": True, "target_kl": 3.0,
                    "horizon": 640, "save_steps": 5, "keep_checkpoints": 6, "sample_every": 5},
            "eval": {"n_prompts": 72, "n_checkpoint_prompts": 72, "max_new_tokens": 256, "batch_size": 144,
                     "samples_per_prompt": 4},
            "dpo": {"max_steps": 300, "batch_size": 16, "learning_rate": 5e-5, "max_length": 512, "eval_steps": 50,
                    "logging_steps": 5, "save_steps": 50},
            "grpo": {"max_steps": 100, "batch_size": 32, "num_generations": 4, "max_completion_length": 128,
                     "save_steps": 20, "sample_every": 10},
            "rloo": {"max_steps": 100, "batch_size": 32, "num_generations": 4, "max_completion_length": 128,
                     "save_steps": 20, "sample_every": 10},
        },
    ),
}


def get_profile(name: str | Profile) -> Profile:
    """The profile called `name`; a clear error listing the names that exist otherwise."""
    if isinstance(name, Profile):
        return name
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(
            f"unknown profile {name!r}; choose one of: {', '.join(PROFILES)}"
        ) from None


C = TypeVar("C")


class _All:
    """An override that sets an `int | None` field to None, whose meaning is always "all" (every layer, every
    pair, every prompt). A plain None cannot say so: overrides left at None keep the profile's value."""

    def __repr__(self) -> str:
        return "ALL"


ALL = _All()
SHARED_FIELDS = ("model_name", "dtype", "device", "load_in_4bit")


def stage_config(cls: type[C], profile: str | Profile, stage: str | None = None, **overrides: Any) -> C:
    """Build stage config `cls`: its defaults, the profile's shared settings (model_name, dtype, device,
    load_in_4bit) where `cls` has such fields, the profile's overrides for `stage`, then `overrides`
    (None values are ignored, so notebook parameters left at None keep the profile's choice; `ALL` sets an
    `int | None` field to None, which means all).

    `stage` defaults to `cls.stage`. Keys that are not fields of `cls` raise with the valid names.
    """
    prof = get_profile(profile)
    stage = stage or getattr(cls, "stage")
    names = {f.name for f in dataclasses.fields(cls)}
    shared = {k: getattr(prof, k) for k in SHARED_FIELDS if k in names}  # model, dtype, device, 4-bit
    given = {k: None if v is ALL else v for k, v in overrides.items() if v is not None}
    values = {**shared, **prof.overrides_for(stage), **given}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(
            f"{cls.__name__} has no field(s) {unknown} (from profile {prof.name!r} or your overrides); "
            f"valid fields: {sorted(names)}"
        )
    return cls(**values)


def describe_fields(cls: type) -> dict[str, str]:
    """Map each field of dataclass `cls` to its docstring (read from the source), for docs and tables."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = str(nxt.value.value).strip()
    return docs


def add_config_arguments(parser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One `--field-name` option per scalar field of dataclass `cls` (default None: keep the profile's), with
    the field's docstring as help; booleans take true/false, and an `int | None` field takes `all` for None."""
    docs = describe_fields(cls)
    kinds = {"int": int, "float": float, "str": str, "int | None": _parse_int_or_all, "bool": _parse_bool}
    for f in dataclasses.fields(cls):
        kind = kinds.get(f.type if isinstance(f.type, str) else getattr(f.type, "__name__", ""))
        if f.name in skip or kind is None:
            continue
        text = docs.get(f.name, "") + (" Give `all` for None." if kind is _parse_int_or_all else "")
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=None,
                            help=text.replace("%", "%%"))


def add_stage_arguments(parser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """A stage's command line: `--run-dir`, `--profile` (one of PROFILES) and `add_config_arguments` (less
    `skip`: fields the command does nothing with, such as a notebook's evaluation-only settings)."""
    if parser.usage is None:  # argparse's own would list every field: 30 lines above a one-line mistake
        parser.usage = "%(prog)s [...] --run-dir R [--profile P] [--FIELD VALUE ...] (every FIELD: --help)"
    parser.add_argument("--run-dir", required=True, help="the run folder, e.g. runs/cpu")
    parser.add_argument("--profile", default="cpu", choices=sorted(PROFILES), help="budget profile (default: cpu)")
    add_config_arguments(parser, cls, skip=skip)


def stage_config_from_args(parser, cls: type[C], args: dict[str, Any]) -> tuple[str, C]:
    """(run_dir, `stage_config` of `cls`) from the options `add_stage_arguments` parsed, popped from `args`.
    A setting the config refuses, or a CUDA device where torch sees no GPU, is a usage error (exit status 2,
    with the message), not a traceback."""
    run_dir, profile = args.pop("run_dir"), args.pop("profile")
    try:
        cfg = stage_config(cls, profile, **args)
    except ValueError as e:
        parser.error(str(e))
    device = str(getattr(cfg, "device", "cpu"))
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error(f"device {device!r} (profile {profile!r}) needs a CUDA GPU, and torch sees none here: "
                         f"pass --device cpu, or a profile made for this machine (--profile cpu)")
    return run_dir, cfg


def _parse_int_or_all(text: str) -> int | _All:
    import argparse

    if text.strip().lower() in ("all", "none"):
        return ALL
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'all', got {text!r}") from None


def _parse_bool(text: str) -> bool:
    import argparse

    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
