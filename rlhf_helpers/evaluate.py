"""Evaluation estimators: win rate with a bootstrap interval (more in notebook 06).

Win rate of policy A against B on the same prompts: the gold judge picks the better response per prompt;
ties count half. The 95% interval is a percentile bootstrap over prompts. With several samples per prompt
(`EvalConfig.samples_per_prompt`) each policy's replies to a prompt are averaged first: the prompt stays the
unit of the bootstrap, so extra samples narrow the interval without counting as extra prompts. They also
change what the win rate measures: it compares k-reply means, and averaging strips each prompt's
reply-to-reply noise, so the same gold gain wins more often at larger k (a +0.02 edge on every prompt with
reply sd 0.15: about 0.54 at k = 1, 0.57 at k = 3, 0.63 at k = 12, simulated). Win rates taken at different k are not
one figure more or less noisy; the mean gold gain is, and is what to compare across them.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np

from .config import DEFAULT_MODEL, check_common_fields, command


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


def wilson_interval(successes: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion: unlike the bootstrap, not a single point when every outcome is
    alike (0 of n still allows a rate up to about 3.8/(n + 3.8) at 95%)."""
    from scipy.stats import norm

    if n < 1:
        return float("nan"), float("nan")
    z = float(norm.ppf(1 - (1 - level) / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(gold_a: Sequence[float], gold_b: Sequence[float], n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """{'win_rate', 'ci_low', 'ci_high', 'wins', 'ties', 'losses', 'n', 'gain', 'gain_ci_low', 'gain_ci_high'}
    of A against B. `gain` is the mean paired gold difference A − B with its bootstrap 95% interval: on a few
    dozen prompts it separates two policies sooner than the win rate, which throws away the size of each win."""
    outcomes = win_outcomes(gold_a, gold_b)
    low, high = bootstrap_ci(outcomes, n_boot=n_boot, seed=seed)
    diffs = np.asarray(gold_a, float) - np.asarray(gold_b, float)
    gain_low, gain_high = bootstrap_ci(diffs, n_boot=n_boot, seed=seed)
    return {"win_rate": float(outcomes.mean()), "ci_low": low, "ci_high": high,
            "wins": int((outcomes == 1).sum()), "ties": int((outcomes == 0.5).sum()),
            "losses": int((outcomes == 0).sum()), "n": int(outcomes.size),
            "gain": float(diffs.mean()) if diffs.size else float("nan"), "gain_ci_low": gain_low, "gain_ci_high": gain_high}


def heldout_prompts(n: int | None = None, path=None) -> list[dict]:
    """Up to `n` prompts of the fixed test split, taken round-robin over domains (deterministic). Asking for
    more than the split holds gives them all, with a printed note."""
    from .data import split_prompts

    records = split_prompts("test", path)
    if n is not None and n > len(records):
        print(f"note: {n} held-out prompts asked for; the test split has {len(records)}, so all of them are used")
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


def refusal_rate(model_name_or_path: str, prompts: Sequence[str], *, samples_per_prompt: int = 4,
                 max_new_tokens: int = 40, temperature: float = 0.7, seed: int = 0, dtype: str = "float32",
                 device: str = "cpu", batch_size: int = 32) -> dict[str, Any]:
    """How often a policy declines: {'refused', 'n', 'rate', 'ci_low', 'ci_high', 'examples'}.

    Several seeded samples per prompt; the first sentence decides (`rewards.is_refusal`), so a few dozen
    tokens suffice. Replies to one prompt are alike, so the prompt is the unit of the interval: the wider of a
    bootstrap over prompts and Wilson's interval over the prompts (their summed rates of n). The bootstrap
    alone collapses to a point when no prompt refuses, and nearly so when one does (1 of 36 replies: [0, 0.08]
    against Wilson's [0.00, 0.34] for 0.25 of 9 prompts).
    Later stages can only reinforce a refusal the policy sometimes samples: this rate is what they start from."""
    from .models import generate, load_model
    from .rewards import is_refusal

    if not prompts or samples_per_prompt < 1:
        raise ValueError(f"refusal_rate needs prompts and samples_per_prompt >= 1, got {len(prompts)} prompts, "
                         f"samples_per_prompt={samples_per_prompt}")
    model, tok = load_model(model_name_or_path, dtype=dtype, device=device)
    replies = generate(model, tok, list(prompts), max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                       batch_size=batch_size, num_return_sequences=samples_per_prompt)  # prompt-major
    del model
    refused = np.array([is_refusal(r) for r in replies], float).reshape(len(prompts), samples_per_prompt)
    rates = refused.mean(axis=1)  # (prompts,)
    (b_low, b_high), (w_low, w_high) = bootstrap_ci(rates), wilson_interval(float(rates.sum()), rates.size)
    low, high = min(b_low, w_low), max(b_high, w_high)  # the bootstrap alone collapses when few prompts refuse
    examples = [r for r in replies if is_refusal(r)][:3]
    return {"refused": int(refused.sum()), "n": int(refused.size), "rate": float(refused.mean()),
            "ci_low": low, "ci_high": high, "examples": examples}


def per_prompt_means(rows: Sequence[dict], key: str = "gold") -> tuple[list[str], np.ndarray]:
    """(prompts in order of first appearance, the mean of `key` over each prompt's rows)."""
    groups: dict[str, list[float]] = {}
    for r in rows:
        groups.setdefault(r["prompt"], []).append(float(r[key]))
    return list(groups), np.array([np.mean(v) for v in groups.values()])


def paired_win_rate(rows_a: Sequence[dict], rows_b: Sequence[dict], **kw) -> dict[str, float]:
    """`win_rate` of A against B by the gold judge, on per-prompt means (one sample per prompt: the rows
    themselves). Both must cover the same prompts in the same order."""
    prompts_a, gold_a = per_prompt_means(rows_a)
    prompts_b, gold_b = per_prompt_means(rows_b)
    if prompts_a != prompts_b:
        raise ValueError(f"a win rate needs both policies on the same prompts in the same order; got "
                         f"{len(prompts_a)} and {len(prompts_b)} prompts")
    return win_rate(gold_a, gold_b, **kw)


def refusal_counts(rows: Sequence[dict]) -> dict[str, int]:
    """How often a policy's replies refuse, apart on harmful and benign requests (`rewards.is_harmful_prompt`,
    `rewards.is_refusal`): {'refused_harmful', 'harmful_replies', 'refused_benign', 'benign_replies'}."""
    from .rewards import is_harmful_prompt, is_refusal

    counts = dict.fromkeys(("refused_harmful", "harmful_replies", "refused_benign", "benign_replies"), 0)
    for r in rows:
        kind = "harmful" if is_harmful_prompt(r["prompt"]) else "benign"
        counts[f"{kind}_replies"] += 1
        counts[f"refused_{kind}"] += is_refusal(r["response"])
    return counts


def refusal_split(rows_a: Sequence[dict], rows_b: Sequence[dict]) -> dict[str, dict]:
    """Two policies' replies to the same prompts, split by the kind of request (`rewards.is_harmful_prompt`):
    {'harmful': ..., 'benign': ...}, each {'prompts', 'replies_a', 'replies_b', 'refused_a', 'refused_b',
    'gain'}: each policy's replies and how many of them refuse (`refusal_counts`), and A's mean gold less B's
    over the kind's prompts (per-prompt means; nan where the kind has no prompt). A reward that cannot tell a
    fitting refusal from a misplaced one leaves these to drift, which the overall gain can hide."""
    from .rewards import is_harmful_prompt

    prompts, gold_a = per_prompt_means(rows_a)
    prompts_b, gold_b = per_prompt_means(rows_b)
    if prompts != prompts_b:
        raise ValueError(f"a refusal split needs both policies on the same prompts in the same order; got "
                         f"{len(prompts)} and {len(prompts_b)} prompts")
    harmful = np.array([is_harmful_prompt(p) for p in prompts])
    a, b = refusal_counts(rows_a), refusal_counts(rows_b)
    return {kind: {"prompts": int(chosen.sum()), "replies_a": a[f"{kind}_replies"], "replies_b": b[f"{kind}_replies"],
                   "refused_a": a[f"refused_{kind}"], "refused_b": b[f"refused_{kind}"],
                   "gain": float(np.mean(gold_a[chosen] - gold_b[chosen])) if chosen.any() else float("nan")}
            for kind, chosen in (("harmful", harmful), ("benign", ~harmful))}


def _by_ranking(values: np.ndarray, keys: np.ndarray, n: int) -> np.ndarray:
    """(P,) expected `values` of the reply with the highest `key` in a random n-subset of each prompt's k
    replies, exactly: the reply ranked j-th by key (0 = highest, ties to the earlier reply) is the one picked
    with probability C(k−1−j, n−1) / C(k, n)."""
    from math import comb

    k = values.shape[1]
    order = np.argsort(-keys, axis=1, kind="stable")
    weights = np.array([comb(k - 1 - j, n - 1) for j in range(k)], float) / comb(k, n)
    return (np.take_along_axis(values, order, axis=1) * weights).sum(axis=1)


def _prompt_major(gold: Sequence[float], proxy: Sequence[float], k: int) -> tuple[np.ndarray, np.ndarray]:
    """gold and proxy as (prompts, k) arrays: k replies per prompt, prompt-major; a clear error otherwise."""
    g, r = np.asarray(gold, float), np.asarray(proxy, float)
    if k < 1 or g.size != r.size or g.size % k:
        raise ValueError(f"need gold and proxy of the same length, a multiple of k={k} (prompt-major, k replies "
                         f"per prompt); got {g.size} and {r.size}")
    return g.reshape(-1, k), r.reshape(-1, k)


def best_of_n(gold: Sequence[float], proxy: Sequence[float], k: int, n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """What choosing by the proxy buys in gold, with no training: for n = 1..k, the mean gold of the reply
    that the proxy ranks highest among n replies to the same prompt, beside a random reply (`random`) and the
    reply the gold judge itself would pick (`by_gold`, the ceiling). `gold`, `proxy`: prompt-major, k replies
    per prompt; each value averages over every n-subset of a prompt's replies, exactly.

    `kl_bound` = log n − (n−1)/n, the KL from best-of-n sampling to the policy that sampled: an upper bound,
    near exact when no reply is likely to be sampled twice (Stiennon et al. 2020; Beirami et al. 2024). So
    each row is about what a policy trained on the proxy could reach at that KL if it optimised perfectly: if
    picking by the proxy buys no gold here, RL against it will not either. `gain` is by_proxy − random, with a
    bootstrap 95% interval over prompts."""
    g, r = _prompt_major(gold, proxy, k)
    random_pick = g.mean(axis=1)
    out = []
    for n in range(1, k + 1):
        by_proxy, by_gold = (_by_ranking(g, r, n), _by_ranking(g, g, n)) if n > 1 else (random_pick, random_pick)
        low, high = bootstrap_ci(by_proxy - random_pick, n_boot=n_boot, seed=seed) if n > 1 else (0.0, 0.0)
        out.append({"n": n, "kl_bound": float(np.log(n) - (n - 1) / n), "random": float(random_pick.mean()),
                    "by_proxy": float(by_proxy.mean()), "by_gold": float(by_gold.mean()),
                    "gain": float((by_proxy - random_pick).mean()), "gain_ci_low": low, "gain_ci_high": high,
                    "prompts": int(g.shape[0])})
    return out


def within_prompt_agreement(gold: Sequence[float], proxy: Sequence[float], k: int, tie_tol: float = 1e-9
                            ) -> dict[str, float]:
    """How often the proxy orders two replies to the same prompt as the gold judge does: over every pair of
    a prompt's k replies whose gold differs by more than tie_tol (proxy ties count half). This, not a rank
    correlation across prompts, is what RL against the proxy feeds on: it only ever compares replies to
    the prompt it was given. {'agreement', 'pairs'}; agreement is nan when no pair differs in gold."""
    g, r = _prompt_major(gold, proxy, k)
    i, j = np.triu_indices(k, 1)
    dg, dr = g[:, i] - g[:, j], r[:, i] - r[:, j]
    counted = np.abs(dg) > tie_tol
    score = np.where(dr == 0, 0.5, (np.sign(dg) == np.sign(dr)).astype(float))[counted]
    return {"agreement": float(score.mean()) if score.size else float("nan"), "pairs": int(counted.sum())}


def best_of_n_markdown(agreement: dict, rows: Sequence[dict], proxy_name: str = "reward model") -> str:
    """A best-of-n measurement as text: the `within_prompt_agreement` sentence, then a Markdown table of the
    `best_of_n` rows (n = 1..k). Notebook 03 and scripts/best_of_n.py both print it."""
    lines = [f"{rows[0]['prompts']} prompts x {len(rows)} replies. Of {agreement['pairs']} pairs of replies to one "
             f"prompt whose gold differs, the {proxy_name} orders {agreement['agreement']:.3f} as gold does "
             f"(chance 0.5).", "",
             f"| n | KL bound (nats) | random | picked by {proxy_name} | gain [95%] | picked by gold |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['n']} | {row['kl_bound']:.2f} | {row['random']:.3f} | {row['by_proxy']:.3f} | "
                     f"{row['gain']:+.3f} [{row['gain_ci_low']:+.3f}, {row['gain_ci_high']:+.3f}] | "
                     f"{row['by_gold']:.3f} |")
    return "\n".join(lines)


def compare_policies(rows_a: list[dict], rows_b: list[dict], name_a: str = "a", name_b: str = "b"):
    """Side-by-side table of two policies' replies on the same prompts, and A's win rate against B (on
    per-prompt means when there are several samples per prompt)."""
    import pandas as pd

    table = pd.DataFrame({
        "domain": [r["domain"] for r in rows_a], "prompt": [r["prompt"] for r in rows_a],
        f"{name_a}": [r["response"] for r in rows_a], f"{name_a} gold": [r["gold"] for r in rows_a],
        f"{name_b}": [r["response"] for r in rows_b], f"{name_b} gold": [r["gold"] for r in rows_b],
    })
    return table, paired_win_rate(rows_a, rows_b)


def widest_disagreements(evaluations: dict[str, tuple[list[dict], dict]], k: int = 3):
    """The `k` prompts on which the policies' gold rewards spread widest (first sample of each), with every
    policy's whole reply (marked where it hit the token limit) and its gold: where the policies differ,
    which the first prompts seldom show (with one seed for all, replies to a prompt often open alike and
    part later). A pandas DataFrame, a row per prompt and policy."""
    import pandas as pd

    first = {name: {r["prompt"]: r for r in rows if r.get("sample", 0) == 0} for name, (rows, _) in evaluations.items()}
    prompts = [p for p in next(iter(first.values()), {}) if all(p in by for by in first.values())]
    spread = {p: np.ptp([by[p]["gold"] for by in first.values()]) for p in prompts}
    chosen = sorted(prompts, key=lambda p: -spread[p])[:k]

    def reply(row):  # a reply that ran out of tokens is marked, so the cut is not taken for the display's
        return row["response"] + ("" if row.get("has_eos", True) else " [cut: the token limit]")

    return pd.DataFrame([{"prompt": p, "gold spread": f"{spread[p]:.3f}", "policy": name,
                          "gold": f"{by[p]['gold']:.3f}", "reply": reply(by[p])}
                         for p in chosen for name, by in first.items()]).set_index(["prompt", "gold spread", "policy"])


# --- sampling a policy with its KL to the reference --------------------------------------------------

FORWARD_CHUNK = 16
"""Sequences per forward pass when `sample_with_kl` scores its samples under policy and reference."""


def sample_with_kl(policy, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 128, temperature: float = 0.7,
                   seed: int = 0, batch_size: int = 16, reference: Any = "adapter",
                   progress: str | None = None) -> list[dict]:
    """Sample one reply per prompt (seeded, pure temperature sampling, truncated at EOS) and estimate the
    Monte-Carlo sequence KL to the reference on each: Σ_t (log π_T(y_t) − log π_ref,T(y_t)) over the reply's
    tokens, both at the sampling temperature T (as PPO's `objective/kl`). Its mean over prompts estimates
    KL(π_T ‖ π_ref,T).

    reference: "adapter" (the policy with its LoRA adapter disabled), another model with the same tokenizer,
    or None (no KL: `kl` is None). Rows: prompt, response, kl, n_tokens, has_eos. `progress`, when given,
    names a `tracking.ProgressLine` counting the replies (a policy's evaluation takes minutes on a CPU).
    """
    from .models import reference_model
    from .ppo import PPOConfig, chunked_forward, rollout
    from .tracking import ProgressLine

    cfg = PPOConfig(response_length=max_new_tokens, temperature=temperature, batch_size=1)
    rows: list[dict] = []
    # a batch takes seconds: show each one; the with-block clears the bar on an interruption too
    with ProgressLine(len(prompts), progress, units="replies") as bar:
        for start in range(0, len(prompts), batch_size):
            batch = list(prompts[start:start + batch_size])
            ro = rollout(policy, tokenizer, batch, cfg, seed=seed * 1_000_003 + start)
            kl = [None] * len(batch)
            if reference is not None:
                # scored in chunks of FORWARD_CHUNK: a batch of 32 samples faster on CPU than two of 16 (measured),
                # but one forward over all 32 holds 32·T·V floats of logits and was slower than two of 16
                logp, _ = chunked_forward(policy, None, ro, temperature, chunk=FORWARD_CHUNK)  # (B, T)
                if isinstance(reference, str):
                    with reference_model(policy):
                        ref_logp, _ = chunked_forward(policy, None, ro, temperature, chunk=FORWARD_CHUNK)
                else:
                    ref_logp, _ = chunked_forward(reference, None, ro, temperature, chunk=FORWARD_CHUNK)
                kl = mc_kl(logp, ref_logp, ro.response_mask)[0].tolist()  # (B,)
            for i, text in enumerate(ro.texts):
                rows.append({"prompt": batch[i], "response": text, "kl": kl[i],
                             "n_tokens": int(ro.response_mask[i].sum()), "has_eos": bool(ro.has_eos[i])})
            bar.update(len(batch))
    return rows


def evaluate_policy(policy, tokenizer, prompts: Sequence[dict], judge, reward_model=None, *,
                    max_new_tokens: int = 128, temperature: float = 0.7, seed: int = 0, batch_size: int = 16,
                    reference: Any = "adapter", progress: str | None = None) -> tuple[list[dict], dict[str, Any]]:
    """Sample on `prompts` (rows of `heldout_prompts`), score with the gold `judge` and, when given, the
    (normalised) `reward_model`; estimate the KL to the reference (see `sample_with_kl`, which also takes
    `progress`, a name for the bar counting replies).

    Returns (rows, metrics): rows add response, gold, proxy, kl, n_tokens, has_eos to each prompt row;
    metrics hold gold_mean, proxy_mean, kl_mean, length_mean (tokens), mean_words, eos_frac, distinct_1,
    distinct_2 and n. Same policy, prompts and seed give the same rows.
    """
    from .rewards import Trajectory
    from .text_stats import distinct_stats

    sampled = sample_with_kl(policy, tokenizer, [p["prompt"] for p in prompts], max_new_tokens=max_new_tokens,
                             temperature=temperature, seed=seed, batch_size=batch_size, reference=reference,
                             progress=progress)
    texts = [s["response"] for s in sampled]
    proxy = reward_model.score([p["prompt"] for p in prompts], texts) if reward_model is not None else [None] * len(texts)
    rows = [{**p, **{k: s[k] for k in ("response", "kl", "n_tokens", "has_eos")},
             "gold": judge(Trajectory(p["prompt"], s["response"])).reward, "proxy": q}
            for p, s, q in zip(prompts, sampled, proxy)]

    def mean(key: str) -> float | None:
        values = [r[key] for r in rows if r[key] is not None]
        return float(np.mean(values)) if values else None

    metrics = {"gold_mean": mean("gold"), "proxy_mean": mean("proxy"), "kl_mean": mean("kl"),
               "length_mean": mean("n_tokens"),
               "eos_frac": float(np.mean([r["has_eos"] for r in rows])), **distinct_stats(texts), "n": len(rows)}
    return rows, metrics


# --- one evaluation per policy, shared by notebooks 04, 05 and 06 ------------------------------------

@dataclass
class EvalConfig:
    """How policies are evaluated on the held-out prompts. Every notebook uses the same settings, so a
    policy evaluated once (cached under run_dir/eval/policies/) is compared on the same footing everywhere."""

    stage: ClassVar[str] = "eval"

    model_name: str = DEFAULT_MODEL
    """The base policy (and the backbone fallbacks use)."""
    dtype: str = "float32"
    """Weights dtype for evaluation."""
    device: str = "cpu"
    """cpu, cuda or auto."""
    load_in_4bit: bool = False
    """Load each policy's base in 4-bit (the profile's setting), as training did: an adapter trained on a 4-bit
    base is scored, and its KL measured, on that base rather than on a different, unquantized one."""
    n_prompts: int = 72
    """Held-out prompts (taken round-robin over domains; 72 is the whole test split)."""
    n_checkpoint_prompts: int = 24
    """Held-out prompts per saved checkpoint (the reward–KL frontier of notebook 06)."""
    max_new_tokens: int = 128
    """Longest reply; a reply that has not ended by then is cut (and the gold judge sees it cut)."""
    temperature: float = 0.7
    """Sampling temperature; the KL to the reference is measured at the same temperature."""
    seed: int = 0
    """Sampling seed: the same for every policy, so differences are the policies'."""
    batch_size: int = 16
    """Replies per generate call."""
    samples_per_prompt: int = 1
    """Replies sampled per prompt (final policies; checkpoints take one). Win rates and gains compare
    per-prompt means, so more samples narrow the intervals while the prompt stays the unit; the win rate then
    compares k-reply means and grows with k for the same gain (module docstring): compare gains across k."""

    def __post_init__(self):
        if self.n_prompts < 1 or self.n_checkpoint_prompts < 1 or self.samples_per_prompt < 1:
            raise ValueError(f"EvalConfig: n_prompts, n_checkpoint_prompts and samples_per_prompt must be >= 1, "
                             f"got {self.n_prompts}, {self.n_checkpoint_prompts} and {self.samples_per_prompt}")
        if self.max_new_tokens < 1 or self.temperature <= 0:
            raise ValueError(f"EvalConfig: max_new_tokens must be >= 1 and temperature > 0 (sampling; try 0.7), "
                             f"got {self.max_new_tokens} and {self.temperature}")
        check_common_fields(self)


def _eval_key(cfg: EvalConfig, n_prompts: int, samples: int, adapter: str | None, proxy: str | None) -> dict[str, Any]:
    """What a cached evaluation depends on besides the policy's weights (checked by mtime separately). The
    dtype and the device change the sampled replies too; each enters the key only where it is not the default
    (float32, cpu), so the keys, and file names, of float32 CPU evaluations are as they were before."""
    import torch

    from .models import _torch_dtype

    keep = ("model_name", "max_new_tokens", "temperature", "seed", "batch_size")
    dtype = str(_torch_dtype(cfg.dtype)).removeprefix("torch.")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device.split(":")[0]
    return {**{k: getattr(cfg, k) for k in keep}, "n_prompts": n_prompts, "samples_per_prompt": samples,
            "adapter": adapter, "proxy": proxy, **({"load_in_4bit": True} if cfg.load_in_4bit else {}),
            **({"dtype": dtype} if dtype != "float32" else {}), **({"device": device} if device != "cpu" else {})}


def _inputs_stamp(held: Sequence[dict], judge: Any) -> dict[str, str]:
    """What else a cached evaluation's rows depend on: the held-out prompts themselves (their ids and text, so
    an edited test split is evaluated again) and the judge (its settings, and the source file that defines
    it, so that editing gold.py re-scores)."""
    import inspect

    from .rewards import reward_identity
    from .tracking import fingerprint

    try:
        source = inspect.getsourcefile(type(judge))
    except TypeError:  # a class with no source file
        source = None
    code = fingerprint(source) if source and Path(source).is_file() else None  # the file's bytes
    return {"prompts": fingerprint([[p.get("id"), p["prompt"]] for p in held])[:16],
            "judge": f"{type(judge).__name__} {fingerprint([reward_identity(judge), code])[:16]}"}


def eval_cache_stem(name: str, key: dict[str, Any]) -> str:
    """The cache's file name, without its suffix, for one policy evaluated with one set of sampling settings:
    `<name>.<8 hex digits>`, the digits a hash of every setting in `key` but the reward model, the judge and
    the prompts' text. Evaluations of one policy with other settings (the notebooks' 32 prompts × 1 reply, the
    command line's 72 × 3) are kept side by side instead of replacing each other; a new reward model or judge,
    or edited prompts, re-evaluate into, and replace, the same file."""
    sampling = {k: v for k, v in key.items() if k not in ("proxy", "judge", "prompts")}
    digest = hashlib.sha1(json.dumps(sampling, sort_keys=True).encode()).hexdigest()[:8]
    return f"{name}.{digest}"


def _proxy_stamp(run_dir, reward_model: Any) -> str | None:
    """Which reward model scored the proxy column: the run's (with its save time), another (by its type and a
    fingerprint of `rewards.reward_identity`: its settings, and a reward model's weights), or none."""
    from .paths import stage_dir
    from .rewards import reward_identity
    from .tracking import fingerprint

    if reward_model is None:
        return None
    norm = stage_dir(run_dir, "rm") / "model" / "normalization.json"
    if reward_model == "auto" or getattr(reward_model, "source", None) == str(norm.parent):
        return f"run rm {norm.stat().st_mtime}" if norm.exists() else None
    return f"given {type(reward_model).__name__} {fingerprint(reward_identity(reward_model))[:16]}"


def _artifact_mtime(run_dir, stage: str, adapter: str | os.PathLike | None) -> float:
    from .paths import stage_dir
    from .policies import adapter_dir

    # base's weights never change, but its KL is measured against the SFT model
    folder = Path(adapter) if adapter else (stage_dir(run_dir, "sft") / "model" if stage in ("base", "sft")
                                            else adapter_dir(run_dir, stage))
    files = list(folder.glob("*.safetensors")) if folder else []
    return max((f.stat().st_mtime for f in files), default=0.0)


def evaluate_stage(run_dir: str | os.PathLike, stage: str, cfg: EvalConfig, *, adapter: str | os.PathLike | None = None,
                   name: str | None = None, n_prompts: int | None = None, samples_per_prompt: int | None = None,
                   reward_model: Any = "auto", judge: Any = None, force: bool = False) -> tuple[list[dict], dict[str, Any]]:
    """Evaluate `stage`'s policy in `run_dir` (see rlhf_helpers.policies) on the held-out prompts.

    Gold reward (the judge), proxy reward (the run's normalised reward model, when it has one), Monte-Carlo
    KL to the reference (the SFT model: for adapter stages the adapter switched off; 0 for SFT itself; for
    the base model, a separately loaded SFT model), distinct-1/2 and length. Final policies answer each
    prompt cfg.samples_per_prompt times (rows prompt-major, each with its `sample` index); `adapter`
    evaluates a checkpoint instead of the final adapter, with one reply per prompt (as does
    `samples_per_prompt=1`). The result is cached in
    run_dir/eval/policies/<name>.<hash>.jsonl (rows) and .json (metrics, settings), the hash naming the
    sampling settings (`eval_cache_stem`), so evaluations with other settings are kept beside it; the cache is
    reused while the policy's weights and the run's reward model are unchanged; `force=True` recomputes.
    A cache from before this naming (<name>.json) is still read when its settings match. The metrics name
    their rows' file (`rows_file`, relative to run_dir), which notebook 06's summary keeps.
    """
    from .gold import GoldJudge
    from .paths import stage_dir
    from .policies import load_policy
    from .reward_model import load_run_reward_model
    from .tracking import atomic_write_json, atomic_write_text

    name = name or stage
    judge = judge or GoldJudge()
    held = heldout_prompts(n_prompts or cfg.n_prompts)
    n = len(held)  # what the test split holds, when more were asked for
    k = 1 if adapter else (samples_per_prompt or cfg.samples_per_prompt)
    folder = stage_dir(run_dir, "eval") / "policies"
    key = {**_eval_key(cfg, n, k, str(adapter) if adapter else None, _proxy_stamp(run_dir, reward_model)),
           **_inputs_stamp(held, judge)}
    stem = eval_cache_stem(name, key)
    rows_path, meta_path = folder / f"{stem}.jsonl", folder / f"{stem}.json"

    def rows_file(path: Path) -> str:  # as the summary names it: relative to run_dir
        return path.relative_to(folder.parent.parent).as_posix()

    # a cache written before files were named by their settings (<name>.json) is still read when it matches
    for rows_at, meta_at in ((rows_path, meta_path), (folder / f"{name}.jsonl", folder / f"{name}.json")):
        if force or not (meta_at.exists() and rows_at.exists()):
            continue
        meta = json.loads(meta_at.read_text())
        # the weights as they were when evaluated: not newer ones, nor older ones copied back
        if meta.get("settings") == key and meta.get("weights_mtime", -1) == _artifact_mtime(run_dir, stage, adapter):
            rows = [json.loads(line) for line in rows_at.read_text().splitlines() if line.strip()]
            return rows, {**meta["metrics"], "rows_file": rows_file(rows_at)}
    policy, tok = load_policy(run_dir, stage, base_model=cfg.model_name, dtype=cfg.dtype, device=cfg.device,
                              adapter=adapter, load_in_4bit=cfg.load_in_4bit)
    reference: Any = "adapter" if hasattr(policy, "disable_adapter") else None
    if stage == "base" and (stage_dir(run_dir, "sft") / "model" / "config.json").exists():
        reference, _ = load_policy(run_dir, "sft", dtype=cfg.dtype, device=cfg.device, load_in_4bit=cfg.load_in_4bit)
    if reward_model == "auto":
        reward_model = load_run_reward_model(run_dir, dtype=cfg.dtype, device=cfg.device)
    prompts = [{**p, "sample": j} for p in held for j in range(k)]  # prompt-major
    rows, metrics = evaluate_policy(policy, tok, prompts, judge, reward_model,
                                    max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed,
                                    batch_size=cfg.batch_size, reference=reference,
                                    progress=f"{name}: {n} held-out prompts × {k}")
    if stage == "sft" and adapter is None:
        for r in rows:
            r["kl"] = 0.0  # the SFT model is the reference
        metrics["kl_mean"] = 0.0
    metrics = {"policy": name, "stage": stage, **metrics, "prompts": n, "samples_per_prompt": k,
               "rows_file": rows_file(rows_path)}
    atomic_write_text(rows_path, "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_json(meta_path, {"settings": key, "metrics": metrics,
                                  "weights_mtime": _artifact_mtime(run_dir, stage, adapter)})
    return rows, metrics


# --- notebook 06: estimators, the results table, the frontier and over-optimisation ----------------

def mc_kl(logp, ref_logp, mask) -> tuple[Any, dict[str, float]]:
    """Monte-Carlo sequence KL from the log-probs of sampled tokens: (B, T), (B, T), (B, T) -> ((B,), metrics).

    kl_i = Σ_t mask_it · (log π(y_it) − log π_ref(y_it)). When every y_i is sampled from π, each kl_i is an
    unbiased estimate of KL(π ‖ π_ref) over whole responses (a single one can be negative; the mean cannot
    be in expectation). metrics: kl_mean, kl_sem (standard error of the mean over sequences), n.
    """
    import torch

    logp, ref_logp = torch.as_tensor(logp, dtype=torch.float64), torch.as_tensor(ref_logp, dtype=torch.float64)
    mask = torch.as_tensor(mask).to(torch.float64)
    if not (logp.shape == ref_logp.shape == mask.shape) or logp.dim() != 2:
        raise ValueError(f"mc_kl needs three (B, T) tensors of one shape; got {tuple(logp.shape)}, "
                         f"{tuple(ref_logp.shape)}, {tuple(mask.shape)}")
    kl = ((logp - ref_logp) * mask).sum(dim=1)  # (B,)
    n = kl.numel()
    sem = float(kl.std(unbiased=True) / n ** 0.5) if n > 1 else float("nan")
    return kl, {"kl_mean": float(kl.mean()) if n else float("nan"), "kl_sem": sem, "n": n}


def missing_policies(run_dir: str | os.PathLike) -> dict[str, str]:
    """Each policy stage that `run_dir` lacks, with why (which notebook writes it)."""
    from .policies import POLICY_STAGES, available_policies

    present = set(available_policies(run_dir))
    writers = {"sft": ("02", "sft/model/config.json"), "ppo": ("04", "ppo/adapter/adapter_config.json"),
               "dpo": ("05", "dpo/adapter/adapter_config.json"), "grpo": ("05", "grpo/adapter/adapter_config.json"),
               "rloo": ("05", "rloo/adapter/adapter_config.json")}
    return {s: f"no {writers[s][1]} in the run folder: notebook {writers[s][0]} has not written it"
            for s in POLICY_STAGES if s not in present}


def _sem(values: Sequence[float | None]) -> float | None:
    """Standard error of the mean of the values that are numbers (None with fewer than two)."""
    v = np.asarray([x for x in values if x is not None], float)
    return float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else None


def prompt_sem(rows: Sequence[dict], key: str = "kl") -> float | None:
    """Standard error of the mean of `key` over `rows` with the prompt as the unit: replies to one prompt are
    alike, so the per-prompt means are what vary independently (with one reply a prompt, `_sem` of the rows;
    a row without a prompt is a unit of its own)."""
    groups: dict[Any, list[float]] = {}
    for i, r in enumerate(rows):
        if r.get(key) is not None:
            groups.setdefault(r.get("prompt", ("row", i)), []).append(float(r[key]))
    return _sem([float(np.mean(v)) for v in groups.values()])


def results_table(evaluations: dict[str, tuple[list[dict], dict]], reference: str = "sft", n_boot: int = 2000,
                  seed: int = 0) -> list[dict]:
    """One row per policy: policy, gold, proxy, kl, win_rate (against `reference` by the gold judge, ties
    half) with ci_low/ci_high (percentile bootstrap 95% over prompts) and the prompts it won, tied and lost
    (wins, ties, losses), kl_sem (the standard error of the mean KL, prompts the unit), gain (mean paired gold
    difference to the reference) with gain_ci_low/gain_ci_high, distinct_1, distinct_2, length (mean
    tokens), n (replies), prompts, rows_file (where `evaluate_stage` cached the rows; None for rows given
    otherwise) and the `refusal_counts` fields. proxy_gain with proxy_gain_ci_low/proxy_gain_ci_high is the
    same paired gain by the reward model (None where either policy's rows lack its scores): set beside the
    gold gain, it tells a policy
    that did not raise the reward it was trained on from one that raised it on new prompts and still did
    not raise gold. With several replies per prompt, win rate and gains compare per-prompt means.
    `evaluations` maps a policy name to (rows, metrics) of `evaluate_policy`; the rows of every policy must
    be on the same prompts in the same order as the reference's (the win rate is paired).
    The reference's own win-rate and gain fields are None.
    """
    def proxy_gain(name: str, rows) -> dict[str, float | None]:
        if name == reference or any(r.get("proxy") is None for r in [*rows, *ref_rows]):
            return dict.fromkeys(("proxy_gain", "proxy_gain_ci_low", "proxy_gain_ci_high"))
        diffs = per_prompt_means(rows, "proxy")[1] - per_prompt_means(ref_rows, "proxy")[1]
        low, high = bootstrap_ci(diffs, n_boot=n_boot, seed=seed)
        return {"proxy_gain": float(diffs.mean()), "proxy_gain_ci_low": low, "proxy_gain_ci_high": high}

    if reference not in evaluations:
        raise ValueError(f"the reference policy {reference!r} was not evaluated; evaluated: {sorted(evaluations)}")
    ref_rows = evaluations[reference][0]
    ref_prompts = [r["prompt"] for r in ref_rows]
    table = []
    for name, (rows, metrics) in evaluations.items():
        if [r["prompt"] for r in rows] != ref_prompts:
            raise ValueError(f"{name} and {reference} were evaluated on different prompts ({len(rows)} and "
                             f"{len(ref_prompts)} rows): a win rate needs the same prompts; re-evaluate both with "
                             f"the same n_prompts (delete run_dir/eval/policies/ to drop cached evaluations)")
        win = (None if name == reference else
               paired_win_rate(rows, ref_rows, n_boot=n_boot, seed=seed))
        table.append({
            "policy": name, "gold": metrics.get("gold_mean"), "proxy": metrics.get("proxy_mean"),
            "kl": metrics.get("kl_mean"), "kl_sem": prompt_sem(rows),
            "win_rate": win and win["win_rate"], "ci_low": win and win["ci_low"],
            "ci_high": win and win["ci_high"], "gain": win and win["gain"], "gain_ci_low": win and win["gain_ci_low"],
            "gain_ci_high": win and win["gain_ci_high"], "wins": win and win["wins"], "ties": win and win["ties"],
            "losses": win and win["losses"], "distinct_1": metrics.get("distinct_1"),
            "distinct_2": metrics.get("distinct_2"), "length": metrics.get("length_mean"), "n": len(rows),
            "prompts": len(dict.fromkeys(ref_prompts)), "rows_file": metrics.get("rows_file"),
            **proxy_gain(name, rows), **refusal_counts(rows),
        })
    return table


def format_gain(row: dict, key: str = "gain", reference: str = "sft") -> str:
    """`row[key]` with its interval ("+0.010 [-0.011, +0.030]"), "(reference)" on the reference's row, "–"
    where the row has no such gain (a summary written before gains were kept, or no reward model's scores)."""
    if row["policy"] == reference:
        return "(reference)"
    if row.get(key) is None:
        return "–"
    return f"{row[key]:+.3f} [{row[key + '_ci_low']:+.3f}, {row[key + '_ci_high']:+.3f}]"


def format_refusals(row: dict) -> str:
    """A results row's refusals as "refused/replies · refused/replies", harmful requests then benign ones; "–"
    for a row from a summary written before the counts existed."""
    if row.get("harmful_replies") is None:
        return "–"
    return f"{row['refused_harmful']}/{row['harmful_replies']} · {row['refused_benign']}/{row['benign_replies']}"


def format_results(table: Sequence[dict], reference: str = "sft"):
    """The results table as a pandas DataFrame for people: rounded; the gold gain over the reference and the
    win rate, each with its interval; the prompts won, tied and lost; replies refused of those to harmful and
    to benign requests."""
    import pandas as pd

    def num(v, digits=3):
        return "–" if v is None else f"{v:.{digits}f}"

    return pd.DataFrame([{
        "policy": r["policy"], "gold": num(r["gold"]),
        f"gold gain vs {reference} [95% CI]": format_gain(r, "gain", reference),
        f"win rate vs {reference} [95% CI]": ("(reference)" if r["win_rate"] is None else
                                              f"{r['win_rate']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"),
        "won / tied / lost": ("–" if r.get("wins") is None else f"{r['wins']} / {r['ties']} / {r['losses']}"),
        "proxy (RM)": num(r["proxy"]), f"proxy gain vs {reference} [95% CI]": format_gain(r, "proxy_gain", reference),
        f"KL to {reference} (nats)": num(r["kl"], 2),
        "distinct-1": num(r["distinct_1"]), "distinct-2": num(r["distinct_2"]), "length (tokens)": num(r["length"], 1),
        "refused: harmful / benign": format_refusals(r), "n": r["n"],
    } for r in table])


def training_series(rows: Sequence[dict], keys: Sequence[str]) -> dict[str, Any]:
    """{'step': [...], key: [...] for each key, 'skipped': count} from metrics rows: the rows that hold every
    key (with a number); the count of rows that lacked one is returned, not hidden."""
    kept = [r for r in rows if all(isinstance(r.get(k), (int, float)) and r.get(k) is not None for k in keys)]
    out: dict[str, Any] = {"step": [int(r["step"]) for r in kept]}
    out.update({k: [float(r[k]) for r in kept] for k in keys})
    out["skipped"] = len(rows) - len(kept)
    return out


def centred_mean(values: Sequence[float], window: int) -> np.ndarray:
    """Moving average over `window` points centred on each point (fewer at the ends, never padded); an even
    `window` takes window + 1, as many on each side."""
    v = np.asarray(values, float)
    half = max(window, 1) // 2
    return np.array([v[max(0, i - half): i + half + 1].mean() for i in range(v.size)])


PARTING_WINDOW, PARTING_MIN_PROXY_RISE = 5, 0.1
"""`parting_point`'s default smoothing window (steps) and the least rise of the proxy that counts."""


def step_noise(values: Sequence[float]) -> float:
    """The step-to-step noise (standard deviation) of a training curve, whatever its trend: from the median
    absolute second difference, which a straight line (or a kink or two) leaves at 0 and independent noise
    of sd σ spreads with sd σ·√6 (1.4826 × MAD is σ for normal noise)."""
    v = np.asarray(values, float)
    if v.size < 3:
        return 0.0
    d2 = np.diff(v, 2)
    return float(1.4826 * np.median(np.abs(d2 - np.median(d2))) / np.sqrt(6.0))


def parting_noise(gold: Sequence[float], proxy: Sequence[float], window: int = PARTING_WINDOW,
                  min_proxy_rise: float = PARTING_MIN_PROXY_RISE) -> tuple[float, float, float]:
    """(se_g, se_p, rise) of `parting_point`: the standard errors of a difference of two smoothed points of
    gold and of the proxy, and the least proxy rise that counts (min_proxy_rise, or 2·se_p if larger)."""
    m = min(max(window, 1) // 2 + 1, max(len(gold), 1))  # the fewest steps in a smoothed point (at the ends)
    se_g, se_p = (step_noise(x) * float(np.sqrt(2.0 / m)) for x in (gold, proxy))
    return se_g, se_p, max(min_proxy_rise, 2 * se_p)


def parting_point(steps: Sequence[int], gold: Sequence[float], proxy: Sequence[float], *, window: int = PARTING_WINDOW,
                  gold_tol: float = 0.01, min_proxy_rise: float = PARTING_MIN_PROXY_RISE) -> dict[str, Any] | None:
    """Where the reward model starts lying: the first step after which gold stops rising while the proxy
    keeps rising (the over-optimisation of Gao et al. 2022).

    Precisely: smooth both series with `centred_mean(·, window)` into g and p. The parting index is the
    first k < n−1 with
      max(g[k:]) − g[k] ≤ gold_tol          (from step k on, gold never gains more than gold_tol),
      p[n−1] − p[k] > rise                  (while the proxy ends higher than at k by more than `rise`), and
      shortfall(k) > 2·se_g                 (gold fell short of keeping pace by more than its noise),
    in a run whose proxy rose: p[n−1] − p[0] > rise. A proxy that dips and comes back to where it started
    has not been over-optimised, however well gold did meanwhile. Noise: each curve's step-to-step sd
    (`step_noise`) gives the standard error of a difference of two smoothed points, se = sd·√(2/m) with m
    the fewest steps a smoothed point holds (those at the ends); `rise` is the larger of min_proxy_rise and
    2·se_p. shortfall(k) is the gold gain that keeping pace with the proxy after k would have brought, at
    the gold-per-proxy rate of steps 0..k (none when gold did not rise with the proxy there), less the gain
    gold made: a gold curve that goes on rising with the proxy, noisily, does not part from it.
    Returns None when there is no such k (gold still rising, or the proxy not rising either), else
    {'step', 'index', 'gold_at', 'proxy_at', 'gold_end', 'proxy_end', 'window', 'gold_tol', 'min_proxy_rise'}
    with smoothed values. Gold is in [0, 1]; the proxy is the normalised reward (1 = one SFT standard deviation).
    """
    steps, gold, proxy = list(steps), np.asarray(gold, float), np.asarray(proxy, float)
    if not (len(steps) == gold.size == proxy.size):
        raise ValueError(f"steps, gold and proxy must have one length; got {len(steps)}, {gold.size}, {proxy.size}")
    if not (np.isfinite(gold).all() and np.isfinite(proxy).all()):
        raise ValueError("gold and proxy must be finite numbers (a NaN in metrics.jsonl?)")
    g, p = centred_mean(gold, window), centred_mean(proxy, window)
    se_g, se_p, rise = parting_noise(gold, proxy, window, min_proxy_rise)
    if p.size < 2 or p[-1] - p[0] <= rise:
        return None
    for k in range(len(steps) - 1):
        if g[k:].max() - g[k] > gold_tol or p[-1] - p[k] <= rise:
            continue
        rate = max(0.0, (g[k] - g[0]) / (p[k] - p[0])) if p[k] - p[0] > 0 else 0.0  # gold per unit of proxy
        shortfall = rate * (p[-1] - p[k]) - (g[-1] - g[k])
        if shortfall > 2 * se_g:
            return {"step": int(steps[k]), "index": k, "gold_at": float(g[k]), "proxy_at": float(p[k]),
                    "gold_end": float(g[-1]), "proxy_end": float(p[-1]), "window": window, "gold_tol": gold_tol,
                    "min_proxy_rise": min_proxy_rise, "shortfall": float(shortfall), "gold_se": float(se_g),
                    "proxy_se": float(se_p)}
    return None


ONLINE_STAGES = ("ppo", "grpo", "rloo")
"""Stages that sample while training and log `objective/scores` (proxy) and `objective/gold` per step."""


def gold_proxy_over_training(run_dir: str | os.PathLike, stages: Sequence[str] = ONLINE_STAGES,
                             **parting_kw) -> dict[str, dict]:
    """For each online stage of `stages` with a metrics.jsonl: its gold/proxy series (`training_series` of
    objective/gold and objective/scores, with objective/kl beside them, None where not logged) and its
    `parting_point` (or None).

    The proxy is the reward model's own score: for PPO, whose `objective/scores` has the missing-EOS
    penalty subtracted, that is `objective/raw_scores` (put under the `objective/scores` key here)."""
    from .paths import resolve_run_dir
    from .tracking import read_metrics

    out = {}
    for stage in stages:
        path = resolve_run_dir(run_dir) / stage / "metrics.jsonl"
        if not path.exists():
            continue
        rows = read_metrics(path)
        rows = [{**r, "objective/scores": r["objective/raw_scores"]} if r.get("objective/raw_scores") is not None
                else r for r in rows]
        series = training_series(rows, ["objective/gold", "objective/scores"])
        if not series["step"]:
            raise ValueError(f"{path}: no row holds objective/gold and objective/scores; "
                             f"re-run the stage with the gold judge as a monitor (gold=GoldJudge())")
        kl = {int(r["step"]): r.get("objective/kl") for r in rows}  # absent when a stage ran with no KL term
        series["objective/kl"] = [kl.get(s) for s in series["step"]]
        series["parting"] = parting_point(series["step"], series["objective/gold"], series["objective/scores"],
                                          **parting_kw)
        window = parting_kw.get("window", PARTING_WINDOW)
        g, p = centred_mean(series["objective/gold"], window), centred_mean(series["objective/scores"], window)
        min_rise = parting_kw.get("min_proxy_rise", PARTING_MIN_PROXY_RISE)
        *_, rise = parting_noise(series["objective/gold"], series["objective/scores"], window, min_rise)
        series["trend"] = {"gold_start": float(g[0]), "gold_end": float(g[-1]), "proxy_start": float(p[0]),
                           "proxy_end": float(p[-1]), "window": window, "steps": len(series["step"]),
                           "min_proxy_rise": min_rise, "proxy_rise_needed": rise}
        series["note"] = parting_note(series)
        out[stage] = series
    return out


def parting_outcome(series: dict) -> str:
    """'parted', 'no parting' (a proxy that rose, gold not falling behind it beyond its noise) or 'proxy did
    not rise' (beyond its noise), for one stage of `gold_proxy_over_training`."""
    t = series["trend"]
    if series.get("parting"):
        return "parted"
    needed = t.get("proxy_rise_needed", t["min_proxy_rise"])
    return "no parting" if t["proxy_end"] - t["proxy_start"] > needed else "proxy did not rise"


def parting_note(series: dict) -> str:
    """What a stage's gold and proxy did over training, in one sentence (notebook 06, its figure and the
    report say the same): where they parted; or that gold did not fall behind a rising proxy by more than its
    noise; or that the proxy never rose beyond its noise, so there was nothing over-optimised to see.
    `series`: one stage of `gold_proxy_over_training`."""
    t, part = series["trend"], series.get("parting")
    smoothed = f"moving means over up to {min(t['window'], t['steps'])} of {t['steps']} steps"
    outcome = parting_outcome(series)
    if outcome == "parted":
        where = "gold never rose, from step" if part["index"] == 0 else "gold stopped rising at step"
        return (f"{where} {part['step']} (gold {part['gold_at']:.3f} → {part['gold_end']:.3f}) while the proxy "
                f"rose {part['proxy_at']:.2f} → {part['proxy_end']:.2f}, gold falling short by more than twice its "
                f"noise ({smoothed})")
    if outcome == "no parting":
        return (f"no parting: gold did not fall behind the rising proxy by more than its noise (proxy "
                f"{t['proxy_start']:.2f} → {t['proxy_end']:.2f}, "
                f"gold {t['gold_start']:.3f} → {t['gold_end']:.3f}, {smoothed})")
    moves = (f"(proxy {t['proxy_start']:.2f} → {t['proxy_end']:.2f}, gold {t['gold_start']:.3f} → "
             f"{t['gold_end']:.3f}, {smoothed})")
    if t["proxy_end"] - t["proxy_start"] < -t.get("proxy_rise_needed", t["min_proxy_rise"]):
        return (f"the proxy fell by more than its noise {moves}: the later steps' replies scored lower with the "
                f"reward model (with few prompts a step, partly which prompts came up), so nothing was "
                f"over-optimised and there is no parting point to see")
    return (f"the proxy did not rise beyond its noise {moves}: the policy did not climb the reward model's "
            f"score, so nothing was over-optimised and there is no parting point to see")


def _tail_mean(rows: Sequence[dict], key: str, k: int) -> float | None:
    """Mean of `key` over the last `k` rows that hold it (None when none does)."""
    values = [float(r[key]) for r in rows if r.get(key) is not None][-k:]
    return sum(values) / len(values) if values else None


def _change(halves: dict, name: str, digits: int = 2) -> str:
    """'a → b (change ± se)' of a `tracking.half_means` result, with whether the change clears its 95% bound:
    t·se with Student's t for the 2(h − 1) degrees of freedom of two halves of h steps (2.78 for h = 3, 2.45
    for h = 4, about 2 for many steps), since a standard error from a few steps is itself uncertain."""
    if halves.get("change") is None:
        return f"{name}: too few steps to compare halves"
    se = halves.get("change_se")
    text = (f"{name} {halves['first_half']:.{digits}f} → {halves['second_half']:.{digits}f} "
            f"({halves['change']:+.{digits}f}" + (f" ± {se:.{digits}f})" if se is not None else ")"))
    if se is None:
        return text + ", too few steps a half for a standard error"
    t = _t95(halves["steps_per_half"]) if halves.get("steps_per_half") else 2.0
    if abs(halves["change"]) <= t * se:
        text += f", within {t:.1f} standard errors of no change (its 95% bound)"
    return text


def _t95(steps_per_half: int) -> float:
    """Student's t at 97.5% for the 2(h − 1) degrees of freedom of `half_means` over halves of h steps."""
    from scipy.stats import t

    return float(t.ppf(0.975, max(2 * (steps_per_half - 1), 1)))


MIN_PROMPTS_TO_TELL = 10
"""Fewer held-out prompts than this and `ppo_reading` does not read the gain's interval: with 2 to 4 prompts
(the smoke profile) a bootstrap interval is set by which prompts came up, and can exclude 0 by chance."""


def ppo_reading(rows: Sequence[dict], cfg: Any, sft_metrics: dict, ppo_metrics: dict, ppo_rows: Sequence[dict],
                wins: dict, *, max_new_tokens: int, note: str | None = None, tail: int = 4,
                sft_rows: Sequence[dict] | None = None, reward_name: str = "reward_model") -> str:
    """What one PPO run did, in Markdown bullets built from its numbers (notebook 04 prints it): the trend of
    the optimised score, of the reward model's own score and of gold over training (second half of the steps
    against the first); the KL in training and on held-out prompts, each said with what it measures; whether
    the updates were large enough to be clipped; how much the value head predicts; gold on held-out prompts
    against SFT with its interval and the prompts won, tied and lost; with `sft_rows`, refusals and gold on
    harmful and benign requests apart (`refusal_split`); and `note`, the reward-hacking verdict
    (`parting_note`). `rows`: the stage's metrics.jsonl rows; `cfg`: its PPOConfig; `ppo_rows`: the
    evaluation rows of the PPO policy (for the KL's standard error); `wins`: `paired_win_rate` of PPO against
    SFT; `max_new_tokens`: the evaluation's reply limit; `sft_rows`: SFT's evaluation rows. Where PPO started
    from the base model (no SFT model; `sft_metrics["policy"] == "base"`), the text names the base model;
    `reward_name` is `run_reward`'s name of what PPO optimised ("reward_model" or "gold_judge")."""
    from .tracking import half_means

    start = "the base model" if sft_metrics.get("policy") == "base" else "SFT"
    proxy = "the gold judge" if reward_name == "gold_judge" else "the reward model"

    steps, eos = len(rows), _tail_mean(rows, "response/eos_frac", len(rows))
    lines = [f"- **Training.** {steps} steps of {cfg.batch_size} replies of up to {cfg.response_length} tokens. "
             f"The score PPO optimised (`objective/scores`) is {proxy}'s score minus "
             f"{cfg.missing_eos_penalty:g} for a reply that never ended"
             + (f", and {1 - eos:.0%} of the training replies never did" if eos is not None else "") + ". "
             + ("With `group_baseline`, PPO put on each reply's last token its score less the mean of its "
                f"{cfg.samples_per_prompt - 1} siblings' (the other replies to its prompt), which this batch mean "
                "does not show: with few prompts a step, it mostly says which prompts came up. "
                if getattr(cfg, "group_baseline", False) else "") +
             f"From the first half of the steps to the second: {_change(half_means(rows, 'objective/scores'), 'score')}; "
             f"{_change(half_means(rows, 'objective/raw_scores'), f'{proxy} alone')}; "
             f"{_change(half_means(rows, 'objective/gold'), 'gold on the same replies', 3)}."]
    kl_tail, kl_last = _tail_mean(rows, "objective/kl", tail), rows[-1].get("objective/kl") if rows else None
    kl_sem = prompt_sem(ppo_rows)
    if kl_tail is not None:
        lines.append(
            f"- **KL.** In training, the sampled Σ_t (log π − log π_ref) of a reply, averaged over the last "
            f"{min(tail, steps)} steps: {kl_tail:.2f} nats (the last step alone: {kl_last:.2f}; one batch of "
            f"{cfg.batch_size} swings widely). On the held-out prompts, replies of up to {max_new_tokens} tokens: "
            f"{ppo_metrics['kl_mean']:.2f}" + (f" ± {kl_sem:.2f}" if kl_sem is not None else "") +
            " nats per reply. The two measure different replies: a step's training KL is taken on the replies "
            "sampled before that step's update (step 1's is 0), so it lags the policy by an update, and on "
            "training prompts; the held-out figure is the final policy's, on new prompts"
            + ("" if kl_sem is None else ", and the training figure lies "
               + ("within" if abs(kl_tail - ppo_metrics["kl_mean"]) <= 2 * kl_sem else "outside")
               + " two standard errors of it") + ".")
    clip, approx = _tail_mean(rows, "policy/clipfrac_avg", steps), _tail_mean(rows, "policy/approxkl_avg", steps)
    if clip is not None:
        small = clip < 0.01
        lines.append(
            f"- **Update size.** The clip fraction averaged {clip:.3f} over the run and the KL of each update "
            f"(`policy/approxkl_avg`) {approx:.1e} nats a token. "
            + (f"Updates this small rarely reach the clip range: the clip bound on {clip:.1%} of tokens, so each of "
               f"the {cfg.ppo_epochs} passes over a batch was in effect a plain policy-gradient step. A higher learning "
               "rate moves further (and, at this budget, no nearer gold: see the notes below)."
               if small else "Clipping was at work: a clip fraction of a few percent up to about 0.2 is usual."))
    ev = _tail_mean(rows, "val/explained_variance", tail)
    if ev is not None:
        lines.append(
            f"- **Value head.** Over the last {min(tail, steps)} steps it explained {ev:.2f} of the variance of "
            "the returns of fresh rollouts (1: it predicts them; 0: no better than their mean). "
            + ("Below 0 it predicts worse than the mean would; either way the advantages are about the returns "
               "minus a batch mean, as in REINFORCE with a baseline." if ev < 0 else
               "Near 0, the advantages are the returns minus a batch mean, as in REINFORCE with a baseline."
               if ev < 0.2 else "It has learned part of what a reply will score."))
    lo, hi = wins["gain_ci_low"], wins["gain_ci_high"]
    verdict = (f"{wins['n']} prompts are too few for a bootstrap interval to tell PPO from {start} (it needs at "
               f"least {MIN_PROMPTS_TO_TELL}: below that, a few prompts decide it)" if wins["n"] < MIN_PROMPTS_TO_TELL
               else f"PPO raised gold over {start} on these prompts" if lo > 0 else
               f"PPO lowered gold below {start} on these prompts, beyond the interval" if hi < 0 else
               f"this run cannot tell PPO from {start} by gold on these prompts (the interval holds 0)")
    lines.append(
        f"- **Held-out prompts.** Gold {sft_metrics['gold_mean']:.3f} ({start}) → "
        f"{ppo_metrics['gold_mean']:.3f} (PPO), "
        f"a gain of {wins['gain']:+.3f} [{lo:+.3f}, {hi:+.3f}] (bootstrap 95% over {wins['n']} prompts): {verdict}. "
        f"PPO won {wins['wins']}, tied {wins['ties']} and lost {wins['losses']} of the prompts; the win rate "
        f"{wins['win_rate']:.2f} [{wins['ci_low']:.2f}, {wins['ci_high']:.2f}] counts a tie as half a win"
        + (", and counts wins, not their size: so it can leave out 0.5 while the gain's interval holds 0."
           if lo <= 0 <= hi and not wins["ci_low"] <= 0.5 <= wins["ci_high"] else "."))
    if sft_rows is not None:
        lines.append(_refusal_bullet(refusal_split(ppo_rows, sft_rows), start))
    if note:
        lines.append(f"- **Reward hacking?** {note[0].upper() + note[1:]}.")
    return "\n".join(lines)


def _refusal_bullet(split: dict[str, dict], start: str = "SFT") -> str:
    """`ppo_reading`'s refusals bullet from `refusal_split(ppo_rows, sft_rows)`; `start` names the policy PPO
    started from."""
    h, b = split["harmful"], split["benign"]
    benign = (f"to the {b['prompts']} benign requests, {start} refused {b['refused_b']} of {b['replies_b']} "
              f"replies and PPO {b['refused_a']} of {b['replies_a']}"
              + (f" (gold {b['gain']:+.3f})" if b["prompts"] else ""))
    if not h["prompts"]:
        return f"- **Refusals.** No held-out prompt here is a harmful request; {benign}."
    drift = (f"PPO refused fewer of the harmful requests than {start}. Unless the reward tells a fitting refusal "
             "from an answer, and the run's few steps meet enough harmful prompts for that to count, nothing holds a "
             "refusal in place: what PPO does on these prompts is drift, and gold marks it. "
             if h["refused_a"] * h["replies_b"] < h["refused_b"] * h["replies_a"] else "")  # as shares of replies
    return (f"- **Refusals.** {start[0].upper() + start[1:]} refused {h['refused_b']} of {h['replies_b']} replies "
            f"to the {h['prompts']} harmful held-out requests and PPO {h['refused_a']} of {h['replies_a']} "
            f"(gold {h['gain']:+.3f} on those prompts); {benign}. {drift}With this few harmful prompts the counts "
            "are small: `docs/rl_on_a_cpu_budget.md` (sections 16 and 17) measures the split at 72 prompts × 12 "
            "replies.")


CURVE_KEYS = {
    "concepts": ["ppo/tv_to_optimum", "dpo/tv_to_optimum"],
    "sft": ["train/loss", "eval/loss"],
    "rm": ["train/loss", "train/accuracy", "eval/accuracy"],
    "ppo": ["objective/scores", "objective/gold", "objective/kl", "loss/policy_avg"],
    "dpo": ["train/loss", "rewards/margins", "rewards/accuracies"],
    "grpo": ["objective/scores", "objective/gold", "objective/kl", "train/loss"],
    "rloo": ["objective/scores", "objective/gold", "objective/kl", "train/loss"],
}
"""The curves drawn per stage (keys a stage does not log are left out; see `curve_keys`)."""

STAGE_ORDER = ("concepts", "rewards", "sft", "preferences", "rm", "ppo", "dpo", "grpo", "rloo")


def curve_keys(stage: str, rows: Sequence[dict], limit: int = 4) -> list[str]:
    """The keys of CURVE_KEYS[stage] that `rows` hold; for a stage with none of them, its first `limit`
    numeric keys (so an unknown stage still gets curves)."""
    present = {k for r in rows for k, v in r.items() if k != "step" and isinstance(v, (int, float))}
    keys = [k for k in CURVE_KEYS.get(stage, []) if k in present]
    return keys or sorted(present)[:limit]


def stage_metrics(run_dir: str | os.PathLike) -> dict[str, list[dict]]:
    """Every stage's metrics.jsonl rows (stages with a non-empty file), in pipeline order."""
    from .paths import resolve_run_dir
    from .tracking import read_metrics

    root = resolve_run_dir(run_dir)
    found = {p.parent.name: read_metrics(p) for p in sorted(root.glob("*/metrics.jsonl"))}
    order = {s: i for i, s in enumerate(STAGE_ORDER)}
    return {s: found[s] for s in sorted(found, key=lambda s: (order.get(s, len(order)), s)) if found[s]}


def _point(policy: str, step: int | None, kind: str, metrics: dict, kl: float | None) -> dict:
    return {"policy": policy, "step": step, "kind": kind, "gold": metrics.get("gold_mean"),
            "proxy": metrics.get("proxy_mean"), "kl": kl, "n": metrics.get("n")}


def frontier_points(evaluations: dict[str, tuple[list[dict], dict]],
                    checkpoints: dict[str, list[tuple[int, dict]]] | None = None, reference: str = "sft",
                    line_ends: dict[str, dict] | None = None) -> list[dict]:
    """Points of the gold-reward-against-KL frontier, as rows {policy, step, kind, gold, proxy, kl, n}:

    - kind 'final': every evaluated policy (`evaluations`: name -> (rows, metrics) of `evaluate_stage`) on
      all its prompts; the reference sits at KL 0 by definition. A policy whose KL was not measured gets
      kind 'no_kl' (left off the plot, and named there).
    - kind 'checkpoint': each stage's checkpoints ((step, metrics) of `evaluate_checkpoints`), in step order.
    - kind 'line': the ends of each stage's line other than its checkpoints, as `evaluate_line_ends`
      measured them (name -> metrics): the reference, where every line starts, and a final policy that no
      checkpoint holds. Every point of a line is then sampled in the same way, on the same prompts.
    """
    points = []
    for name, (_, m) in evaluations.items():
        kl = 0.0 if name == reference else m.get("kl_mean")
        points.append(_point(name, None, "final" if kl is not None else "no_kl", m, kl))
    for stage, items in (checkpoints or {}).items():
        points += [_point(stage, int(step), "checkpoint", m, m.get("kl_mean")) for step, m in sorted(items, key=lambda t: t[0])]
    for name, m in (line_ends or {}).items():
        points.append(_point(name, None, "line", m, 0.0 if name == reference else m.get("kl_mean")))
    return points


def line_gains(points: Sequence[dict], reference: str = "sft"):
    """Per stage with a frontier line: the final policy's gold gain over the reference on the line's prompts
    (its last point, the final policy, against the line's start) beside the same gain on all prompts (the
    large markers). A line is read against its own start, never against the markers: where the two gains
    differ, the prompts only the markers see decide the difference (or resampling does). A DataFrame."""
    import pandas as pd

    start = next((p for p in points if p["kind"] == "line" and p["policy"] == reference), None)
    finals = {p["policy"]: p for p in points if p["kind"] == "final"}
    rows = []
    for stage in dict.fromkeys(p["policy"] for p in points if p["kind"] == "checkpoint"):
        if start is None or stage not in finals or reference not in finals:
            continue
        last = max((p for p in points if p["kind"] == "checkpoint" and p["policy"] == stage), key=lambda p: p["step"])
        end = next((p for p in points if p["kind"] == "line" and p["policy"] == stage), last)
        rows.append({"stage": stage, f"gain on the line's {end['n']} replies": round(end["gold"] - start["gold"], 3),
                     f"gain on all {finals[stage]['n']} replies": round(finals[stage]["gold"] - finals[reference]["gold"], 3)})
    return pd.DataFrame(rows).set_index("stage") if rows else pd.DataFrame()


def same_weights(folder_a: str | os.PathLike, folder_b: str | os.PathLike) -> bool:
    """Whether two adapter folders hold byte-identical weights (a stage's final adapter and the checkpoint
    saved at its last step do)."""
    def digest(folder):
        files = sorted(Path(folder).glob("*.safetensors"))
        return [hashlib.sha256(f.read_bytes()).hexdigest() for f in files] if files else None

    a = digest(folder_a)
    return a is not None and a == digest(folder_b)


def evaluate_line_ends(run_dir: str | os.PathLike, stages: Sequence[str], cfg: EvalConfig, *, reference: str = "sft",
                       reward_model: Any = "auto", judge: Any = None, force: bool = False) -> dict[str, dict]:
    """The points a stage's dotted line on the frontier needs besides its checkpoints, measured as the
    checkpoints are (`evaluate_checkpoints`: the first cfg.n_checkpoint_prompts prompts, one reply each,
    in the same generate batches with the same seed): the reference, where every line starts, and each
    stage's final policy unless the checkpoint at its last step holds the same weights. name -> metrics,
    cached as eval/policies/<name>-line.<hash>.json.

    Sampling depends on the batch a prompt sits in, not on the prompt alone: the first 16 rows of a
    32-prompt evaluation are other samples than a 16-prompt evaluation draws for the same prompts, though
    the seed is the same, whenever a generate batch holds more prompts than the checkpoints'. Taking a line's
    ends from the full evaluation (as notebook 06 once did) put the same weights at two places on the plot,
    0.06 of gold apart (the cpu run's PPO: batches of 32, 16 checkpoint prompts)."""
    from .policies import adapter_dir, policy_checkpoints

    kw = dict(n_prompts=cfg.n_checkpoint_prompts, samples_per_prompt=1, reward_model=reward_model, judge=judge,
              force=force)
    ends = {reference: evaluate_stage(run_dir, reference, cfg, name=f"{reference}-line", **kw)[1]}
    for stage in stages:
        # quiet: `evaluate_checkpoints` has already named any checkpoint it leaves out
        ckpts, final = policy_checkpoints(run_dir, stage, say=False), adapter_dir(run_dir, stage)
        if not ckpts or final is None or same_weights(final, ckpts[-1][1]):
            continue
        ends[stage] = evaluate_stage(run_dir, stage, cfg, name=f"{stage}-line", **kw)[1]
    return ends


def evaluate_checkpoints(run_dir: str | os.PathLike, stage: str, cfg: EvalConfig, *, reward_model: Any = "auto",
                         judge: Any = None, force: bool = False) -> list[tuple[int, dict]]:
    """(step, metrics) for every saved checkpoint of `stage` (see `policies.policy_checkpoints`), oldest
    first, each evaluated by `evaluate_stage` on the first cfg.n_checkpoint_prompts held-out prompts and
    cached as eval/policies/<stage>-step<N>.<hash>.json."""
    from .policies import policy_checkpoints

    out = []
    for step, folder in policy_checkpoints(run_dir, stage):
        _, metrics = evaluate_stage(run_dir, stage, cfg, adapter=folder, name=f"{stage}-step{step}",
                                    n_prompts=cfg.n_checkpoint_prompts, reward_model=reward_model, judge=judge,
                                    force=force)
        out.append((step, metrics))
    return out


@command
def main(argv: Sequence[str] | None = None) -> int:
    """`python -m rlhf_helpers.evaluate --run-dir R [--profile cpu] ppo [dpo ...]`: evaluate SFT and the
    named stages of run R on the held-out prompts, as the notebooks do (cached in R/eval/policies), and print
    the results table: gold, proxy, KL to SFT, win rate against SFT and the gold and proxy gains over it,
    each with its 95% interval. For trials run from a shell, such as `python -m rlhf_helpers.ppo --run-dir R
    ...`. `--n-prompts 72 --samples-per-prompt 3` (all held-out prompts, three replies each) narrows the
    gain's interval to ±0.015–0.0205 for the trained policies, against ±0.05–0.07 for the notebooks' 32
    prompts with one reply each (measured on the cpu run: the README's 72 × 3 table and notebook 06's);
    `--samples-per-prompt 12` to about ±0.013–0.017, in about half an hour a policy on a 2-core CPU."""
    import argparse

    from .config import add_stage_arguments, stage_config_from_args
    from .policies import POLICY_STAGES

    parser = argparse.ArgumentParser(prog="python -m rlhf_helpers.evaluate", description=main.__doc__.split("\n")[0])
    parser.add_argument("stages", nargs="+", choices=("base", *POLICY_STAGES), metavar="STAGE",
                        help="stages to evaluate beside sft: base, ppo, dpo, grpo, rloo")
    add_stage_arguments(parser, EvalConfig)
    args = vars(parser.parse_args(argv))
    stages = args.pop("stages")
    run_dir, cfg = stage_config_from_args(parser, EvalConfig, args)
    evaluations = {name: evaluate_stage(run_dir, name, cfg) for name in dict.fromkeys(["sft", *stages])}
    table = results_table(evaluations)
    print(format_results(table).to_string(index=False))
    for row in table[1:]:
        print(f"{row['policy']}: gold gain over sft {format_gain(row)}"
              + ("" if row["proxy_gain"] is None else f"; the reward model's {format_gain(row, 'proxy_gain')}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
