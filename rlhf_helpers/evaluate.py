"""Evaluation estimators: win rate with a bootstrap interval (more in notebook 06).

Win rate of policy A against B on the same prompts: the gold judge picks the better response per prompt;
ties count half. The 95% interval is a percentile bootstrap over prompts.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def win_outcomes(gold_a: Sequence[float], gold_b: Sequence[float], tie_tol: float = 1e-9) -> np.ndarray:
    """Per prompt: 1 when A's gold reward is higher, 0 when lower, 0.5 for a tie."""
    a, b = np.asarray(gold_a, float), np.asarray(gold_b, float)
    if a.shape != b.shape:
        raise ValueError(f"win rate needs paired scores; got {a.shape} and {b.shape}")
    return np.where(np.abs(a - b) <= tie_tol, 0.5, (a > b).astype(float))


def bootstrap_ci(values: Sequence[float], n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values`."""
    v = np.asarray(values, float)
    if v.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)  # (n_boot,)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def win_rate(gold_a: Sequence[float], gold_b: Sequence[float], n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """{'win_rate', 'ci_low', 'ci_high', 'wins', 'ties', 'losses', 'n'} of A against B."""
    outcomes = win_outcomes(gold_a, gold_b)
    low, high = bootstrap_ci(outcomes, n_boot=n_boot, seed=seed)
    return {"win_rate": float(outcomes.mean()), "ci_low": low, "ci_high": high,
            "wins": int((outcomes == 1).sum()), "ties": int((outcomes == 0.5).sum()),
            "losses": int((outcomes == 0).sum()), "n": int(outcomes.size)}


def heldout_prompts(n: int | None = None, path=None) -> list[dict]:
    """Up to `n` prompts of the fixed test split, taken round-robin over domains (deterministic)."""
    from .data import load_prompts
    from .paths import data_path

    records = [r for r in load_prompts(path or data_path("prompts.jsonl")) if r.metadata.get("split") == "test"]
    by_domain: dict[str, list] = {}
    for r in records:
        by_domain.setdefault(r.metadata.get("domain", "?"), []).append(r)
    ordered, queues = [], [list(v) for _, v in sorted(by_domain.items())]
    while any(queues):
        for q in queues:
            if q:
                ordered.append(q.pop(0))
    chosen = ordered if n is None else ordered[:n]
    return [{"prompt": r.prompt, "domain": r.metadata.get("domain"), "id": r.metadata.get("id")} for r in chosen]


def generate_and_score(model_name_or_path: str, prompts: list[dict], judge, *, max_new_tokens: int = 160,
                       temperature: float = 0.7, seed: int = 0, dtype: str = "float32", device: str = "cpu",
                       batch_size: int = 16) -> list[dict]:
    """Load a policy, sample one reply per prompt (seeded) and score it with `judge`; returns rows."""
    from .models import generate, load_model
    from .rewards import Trajectory

    model, tok = load_model(model_name_or_path, dtype=dtype, device=device)
    texts = [p["prompt"] for p in prompts]
    replies = generate(model, tok, texts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                       batch_size=batch_size)
    del model
    return [{**p, "response": r, "gold": judge(Trajectory(p["prompt"], r)).reward} for p, r in zip(prompts, replies)]


def compare_policies(rows_a: list[dict], rows_b: list[dict], name_a: str = "a", name_b: str = "b"):
    """Side-by-side table of two policies' replies on the same prompts, and A's win rate against B."""
    import pandas as pd

    table = pd.DataFrame({
        "domain": [r["domain"] for r in rows_a], "prompt": [r["prompt"] for r in rows_a],
        f"{name_a}": [r["response"] for r in rows_a], f"{name_a} gold": [r["gold"] for r in rows_a],
        f"{name_b}": [r["response"] for r in rows_b], f"{name_b} gold": [r["gold"] for r in rows_b],
    })
    return table, win_rate([r["gold"] for r in rows_a], [r["gold"] for r in rows_b])
