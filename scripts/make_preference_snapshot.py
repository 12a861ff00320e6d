"""Rebuild data/preference_snapshot.jsonl: SFT samples on the train prompts, labelled by the annotator.

    .venv/bin/python scripts/make_preference_snapshot.py --policy runs/cpu/sft/model \
        --out data/preference_snapshot.jsonl [--temperatures 0.7 1.3] [--seed 0]

`--policy` is the SFT model notebook 02 saved (run `make run` or notebook 02 with the cpu profile first);
any model name or folder works. The snapshot lets the smoke and cpu profiles of notebook 03 skip most of
the sampling; every line records the policy, temperature, seed and gold rewards it came from.
"""
from __future__ import annotations

import argparse
import sys
import time

from rlhf_helpers.data import load_prompts
from rlhf_helpers.gold import SimulatedAnnotator, pair_ceiling
from rlhf_helpers.models import load_model
from rlhf_helpers.paths import data_path
from rlhf_helpers.preferences import label_samples, sample_at_temperatures, write_pairs
from rlhf_helpers.seeding import seed_everything


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", required=True, help="SFT model folder (or any model name)")
    ap.add_argument("--policy-label", default=None, help="how the provenance names the policy (default: --policy)")
    ap.add_argument("--out", default=str(data_path("preference_snapshot.jsonl")))
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 1.3],
                    help="one sample per prompt at each temperature; consecutive samples are paired")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--annotator-temperature", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="only the first N train prompts")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args(argv)
    seed_everything(args.seed)
    prompts = [r.prompt for r in load_prompts(data_path("prompts.jsonl")) if r.metadata.get("split") == "train"]
    prompts = prompts[: args.limit]
    model, tok = load_model(args.policy)
    t0 = time.perf_counter()
    samples = []
    for start in range(0, len(prompts), args.batch_size):  # chunks, so progress shows
        chunk = prompts[start:start + args.batch_size]
        samples += sample_at_temperatures(model, tok, chunk, args.temperatures, max_new_tokens=args.max_new_tokens,
                                          seed=args.seed + start, batch_size=args.batch_size)
        print(f"sampled {start + len(chunk)}/{len(prompts)} prompts in {time.perf_counter() - t0:.0f} s", flush=True)
    annotator = SimulatedAnnotator(temperature=args.annotator_temperature, seed=args.seed)
    provenance = {"policy": args.policy_label or args.policy, "sample_temperatures": args.temperatures,
                  "sample_seed": args.seed, "max_new_tokens": args.max_new_tokens, "source": "snapshot"}
    pairs, skipped = label_samples(prompts, samples, annotator, provenance)
    write_pairs(args.out, pairs)
    print(f"wrote {len(pairs)} pairs to {args.out} (skipped {dict(skipped)}); Bayes ceiling {pair_ceiling(pairs):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
