"""Where each stage's policy lives in a run folder, and how to load it back.

The contract (every policy stage keeps to it, so evaluation can find them all):
- `base`: the model named by the profile (no run artifact).
- `sft`:  `run_dir/sft/model/`, the SFT adapter merged into plain weights. It is the *reference* of every
  later stage.
- `ppo`, `dpo`, `grpo`, `rloo`: `run_dir/<stage>/adapter/`, a LoRA adapter whose `adapter_config.json`
  names its base (the SFT model folder, or the base model when SFT was missing). Loaded as a peft model, so
  the reference is the same model with its adapter disabled.
- Checkpoints: `run_dir/ppo/checkpoints/step-N/adapter/` (our PPO) and `run_dir/<stage>/checkpoints/checkpoint-N/`
  (TRL trainers), each an adapter folder; used for the reward–KL frontier of notebook 06.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .config import DEFAULT_MODEL
from .paths import run_sft_model, stage_dir

POLICY_STAGES = ("sft", "ppo", "dpo", "grpo", "rloo")
"""Stages that produce a policy, in pipeline order (`base` is always available too)."""


def adapter_dir(run_dir: str | os.PathLike, stage: str) -> Path | None:
    """`run_dir/<stage>/adapter` when it holds a saved adapter, else None."""
    folder = stage_dir(run_dir, stage) / "adapter"
    return folder if (folder / "adapter_config.json").exists() else None


def adapter_base(adapter: str | os.PathLike) -> str:
    """The base model an adapter folder was trained on (its adapter_config.json's base_model_name_or_path)."""
    path = Path(adapter) / "adapter_config.json"
    try:
        base = json.loads(path.read_text())["base_model_name_or_path"]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read base_model_name_or_path ({e}); re-save the adapter with "
                         f"model.save_pretrained()") from e
    return base


def available_policies(run_dir: str | os.PathLike) -> list[str]:
    """'base', then every stage of POLICY_STAGES whose policy `run_dir` holds."""
    found = ["base"]
    if (stage_dir(run_dir, "sft") / "model" / "config.json").exists():
        found.append("sft")
    found += [s for s in POLICY_STAGES[1:] if adapter_dir(run_dir, s) is not None]
    return found


def load_policy(run_dir: str | os.PathLike, stage: str, *, base_model: str = DEFAULT_MODEL, dtype: str = "float32",
                device: str = "cpu", adapter: str | os.PathLike | None = None, load_in_4bit: bool = False):
    """(model, tokenizer) of `stage`'s policy in `run_dir` (see the module docstring), in eval mode.

    `adapter` overrides the adapter folder (a checkpoint); `load_in_4bit` loads the base in 4-bit, as a
    QLoRA run trained on it. A stage with no artifact raises FileNotFoundError naming the notebook that
    writes it."""
    from peft import PeftModel

    from .models import load_model

    if stage == "base":
        return load_model(base_model, dtype=dtype, device=device, load_in_4bit=load_in_4bit)
    if stage == "sft":
        folder = stage_dir(run_dir, "sft") / "model"
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"no SFT model in {folder}: run notebook 02 first")
        return load_model(str(folder), dtype=dtype, device=device, load_in_4bit=load_in_4bit)
    folder = Path(adapter) if adapter is not None else adapter_dir(run_dir, stage)
    if folder is None or not (folder / "adapter_config.json").exists():
        writer = {"ppo": "04", "dpo": "05", "grpo": "05", "rloo": "05"}.get(stage)
        fix = f"run notebook {writer} first" if writer else f"the stages are base and {', '.join(POLICY_STAGES)}"
        raise FileNotFoundError(f"no {stage} adapter in {stage_dir(run_dir, stage) / 'adapter'}: {fix}")
    base = run_sft_model(run_dir, adapter_base(folder))  # this run's SFT model, should the run have moved
    model, tok = load_model(base, dtype=dtype, device=device, load_in_4bit=load_in_4bit)
    model = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    model.eval()
    return model, tok


def policy_checkpoints(run_dir: str | os.PathLike, stage: str, say: bool = True) -> list[tuple[int, Path]]:
    """(step, adapter folder) of every saved checkpoint of `stage`, oldest first (final adapter excluded).

    A checkpoint past the stage's `max_steps` (its config.json) is left out, and said so unless `say` is
    False (for a second listing of the same stage): an older version of this suite took a step past the end
    when a finished stage was run again."""
    root = stage_dir(run_dir, stage) / "checkpoints"
    found = []
    if root.is_dir():
        for path in root.iterdir():
            name = path.name
            for prefix, sub in (("step-", "adapter"), ("checkpoint-", "")):
                digits = name[len(prefix):]
                folder = path / sub if sub else path
                if name.startswith(prefix) and digits.isdigit() and (folder / "adapter_config.json").exists():
                    found.append((int(digits), folder))
    config = stage_dir(run_dir, stage) / "config.json"
    try:
        max_steps = int(json.loads(config.read_text()).get("max_steps") or 0) if config.exists() else 0
        if max_steps < 0:
            raise ValueError(f"max_steps={max_steps} is negative")
    except (OSError, ValueError, TypeError, AttributeError) as e:  # json.JSONDecodeError is a ValueError
        max_steps = 0
        if found and say:  # nothing to judge the checkpoints by: all are listed, any past the end included
            print(f"{config}: cannot read the stage's max_steps ({type(e).__name__}: {e}); listing every checkpoint "
                  f"in {root}, including any past the stage's end (rewrite the file by running the stage again)")
    past = [step for step, _ in found if max_steps and step > max_steps]
    if past and say:
        print(f"{root}: left out checkpoint(s) at step {', '.join(map(str, sorted(past)))}, past the stage's "
              f"max_steps={max_steps} in {config} (delete them to silence this)")
    return sorted((step, folder) for step, folder in found if step not in past)
