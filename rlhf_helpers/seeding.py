"""Seeding: one call that makes Python, NumPy and torch repeatable."""
from __future__ import annotations

import os
import random

import numpy as np


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python's `random`, NumPy's global RNG and torch (CPU and every CUDA device).

    `deterministic=True` also asks torch for deterministic kernels, which is slower and
    raises on operations that have none; leave it off unless you are chasing a difference.
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    os.environ["PYTHONHASHSEED"] = str(seed)  # affects subprocesses only; documented, harmless
    import torch

    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)


def make_generator(seed: int, device: str = "cpu"):
    """A torch.Generator seeded with `seed`, for sampling that must not touch the global RNG."""
    import torch

    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen
