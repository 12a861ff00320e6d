"""Rebuild data/preference_snapshot.jsonl: SFT samples on the train prompts, labelled by the annotator.

    .venv/bin/python scripts/make_preference_snapshot.py --policy runs/cpu/sft/model --policy-label sft \
        --out data/preference_snapshot.jsonl [--temperatures 0.7 1.3] [--seeds 0 1]

`--policy` is the SFT model notebook 02 saved (run `make run` or notebook 02 with the cpu profile first);
any model name or folder works. The snapshot lets the smoke and cpu profiles of notebook 03 skip most of
the sampling; every line records the policy, temperature, seed and gold rewards it came from.
"""
from __future__ import annotations

import argparse
import sys
import time

from rlhf_helpers.data import train_prompts
from rlhf_helpers.gold import SimulatedAnnotator, pair_ceiling
from rlhf_helpers.models import load_model
from rlhf_helpers.paths import data_path
from rlhf_helpers.preferences import label_samples, sample_at_temperatures, write_pairs
from rlhf_helpers.seeding import seed_everything


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", required=True, help="SFT model folder (or any model name)")
    ap.add_argument("--policy-label", default=None,
                    help="how the provenance names the policy (default: --policy); notebook 03 reads \"notebook 02, "
                         "<profile> profile, seed <n>\" in it to check the run's SFT model against the snapshot's")
    ap.add_argument("--out", default=str(data_path("preference_snapshot.jsonl")))
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 1.3],
                    help="one sample per prompt at each temperature; consecutive samples are paired")
    ap.add_argument("--max-new-tokens", type=int, default=96,
                    help="reply length (the cpu profile evaluates and samples its live pairs at 96 tokens too)")
    ap.add_argument("--annotator-temperature", type=float, default=0.1)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                    help="one round of sampling per seed: each round gives one pair per prompt")
    ap.add_argument("--limit", type=int, default=None, help="only the first N train prompts")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args(argv)
    prompts = train_prompts(args.limit)
    model, tok = load_model(args.policy)
    t0 = time.perf_counter()
    pairs, skipped = [], {}
    for seed in args.seeds:
        seed_everything(seed)
        samples = []
        for start in range(0, len(prompts), args.batch_size):  # chunks, so progress shows
            chunk = prompts[start:start + args.batch_size]
            samples += sample_at_temperatures(model, tok, chunk, args.temperatures, max_new_tokens=args.max_new_tokens,
                                              seed=seed + start, batch_size=args.batch_size)
            print(f"seed {seed}: sampled {start + len(chunk)}/{len(prompts)} prompts in {time.perf_counter() - t0:.0f} s",
                  flush=True)
        annotator = SimulatedAnnotator(temperature=args.annotator_temperature, seed=seed)
        provenance = {"policy": args.policy_label or args.policy, "sample_temperatures": args.temperatures,
                      "sample_seed": seed, "max_new_tokens": args.max_new_tokens, "source": "snapshot"}
        round_pairs, round_skipped = label_samples(prompts, samples, annotator, provenance,
                                                   temperatures=args.temperatures)
        pairs += round_pairs
        for reason, count in dict(round_skipped).items():
            skipped[reason] = skipped.get(reason, 0) + count
    write_pairs(args.out, pairs)
    print(f"wrote {len(pairs)} pairs to {args.out} (skipped {skipped}); Bayes ceiling {pair_ceiling(pairs):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
