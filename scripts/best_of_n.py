"""What picking by the reward model buys in gold, before any RL: best-of-n on a policy's held-out replies.

    .venv/bin/python scripts/best_of_n.py --run-dir runs/cpu [--policy sft] [--n-prompts 72] [--k 8] \
        [--temperature 0.7] [--max-new-tokens 96] [--rows-out rows.jsonl]
    .venv/bin/python scripts/best_of_n.py --run-dir runs/cpu --rows rows.jsonl   # re-read saved rows

Samples k replies per held-out prompt from the policy (a stage of run_dir: sft by default), scores them
with the gold judge and with run_dir's reward model (notebook 03), and prints how often the reward model
orders two replies to one prompt as gold does, and a table of best-of-n for n = 1..k: the gold of the reply
picked by the reward model, by gold itself (the ceiling) and at random, at the KL bound log n − (n−1)/n.
A policy that optimised the reward model perfectly at that KL would reach about the reward model's row;
if it buys no gold, RL against that reward model will not either (notebook 03, section 5).
Rows given with `--rows` must be prompt-major, k per prompt, with `gold` and `proxy` (as `--rows-out` writes).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rlhf_helpers.evaluate import best_of_n, best_of_n_markdown, heldout_prompts, within_prompt_agreement
from rlhf_helpers.tracking import atomic_write_text


def sample_rows(run_dir: str, policy: str, n_prompts: int, k: int, temperature: float, max_new_tokens: int,
                seed: int, batch_size: int) -> list[dict]:
    from rlhf_helpers.evaluate import evaluate_policy
    from rlhf_helpers.gold import GoldJudge
    from rlhf_helpers.policies import load_policy
    from rlhf_helpers.reward_model import load_run_reward_model

    rm = load_run_reward_model(run_dir)
    if rm is None:
        raise SystemExit(f"{run_dir}/rm has no reward model: run notebook 03 (or `python -m rlhf_helpers.run "
                         f"--run-dir {run_dir} --only 03`) first")
    model, tok = load_policy(run_dir, policy)
    prompts = [p for p in heldout_prompts(n_prompts) for _ in range(k)]  # prompt-major
    rows, _ = evaluate_policy(model, tok, prompts, GoldJudge(), rm, max_new_tokens=max_new_tokens,
                              temperature=temperature, seed=seed, batch_size=batch_size, reference=None,
                              progress=f"{policy}: {n_prompts} held-out prompts × {k}")
    return rows


def read_rows(path: Path, k: int) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for i, r in enumerate(rows, 1):
        for field in ("prompt", "gold", "proxy"):
            if not isinstance(r.get(field), (str if field == "prompt" else (int, float))):
                raise SystemExit(f"{path}, line {i}: field '{field}' is missing or of the wrong type; rows need "
                                 f"prompt, gold and proxy (write them with --rows-out)")
    for start in range(0, len(rows), k):
        if len({r["prompt"] for r in rows[start:start + k]}) != 1:
            raise SystemExit(f"{path}, line {start + 1}: rows must come k={k} per prompt, prompt-major (lines "
                             f"{start + 1}-{start + k} hold more than one prompt); pass the k they were sampled with")
    return rows


def report(rows: list[dict], k: int) -> str:
    gold, proxy = [r["gold"] for r in rows], [r["proxy"] for r in rows]
    return best_of_n_markdown(within_prompt_agreement(gold, proxy, k), best_of_n(gold, proxy, k))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True, help="a run folder with rm/ (notebook 03) and the policy's stage")
    ap.add_argument("--policy", default="sft", help="the stage whose replies are picked from (default: sft)")
    ap.add_argument("--n-prompts", type=int, default=72, help="held-out prompts (72 in all)")
    ap.add_argument("--k", type=int, default=8, help="replies per prompt: best-of-n for n = 1..k")
    ap.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (PPO's is 0.7)")
    ap.add_argument("--max-new-tokens", type=int, default=96, help="reply length (the cpu evaluation's is 96)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=36)
    ap.add_argument("--rows", type=Path, default=None, help="score saved rows instead of sampling")
    ap.add_argument("--rows-out", type=Path, default=None, help="save the sampled rows (JSON Lines)")
    args = ap.parse_args(argv)
    if args.k < 2:
        ap.error("--k must be at least 2: best-of-n compares replies to one prompt")
    t0 = time.perf_counter()
    if args.rows is not None:
        rows = read_rows(args.rows, args.k)
    else:
        rows = sample_rows(args.run_dir, args.policy, args.n_prompts, args.k, args.temperature, args.max_new_tokens,
                           args.seed, args.batch_size)
        if args.rows_out is not None:
            atomic_write_text(args.rows_out, "".join(json.dumps(r) + "\n" for r in rows))
    print(report(rows, args.k))
    print(f"\n{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
