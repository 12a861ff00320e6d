"""Rejection-sampling fine-tuning from a run's SFT model: what the plainest use of a judge's ranking buys.

    .venv/bin/python scripts/rejection_sampling_sft.py --run-dir runs/cpu --pick gold [--ended-only] \
        [--per-domain 16] [--k 4] [--steps 30] [--learning-rate 3e-4] [--out runs/cpu/rejection_sampling] [--name N] \
        [--sample-temperature 0.7] [--in-sample] [--objective sft|dpo] [--beta 0.1] [--min-gap 0.05] \
        [--sft-weight 0] [--seed 0]

A check on what RL could learn at the cpu budget, without RL (docs/rl_on_a_cpu_budget.md, sections 11 and 12):
1. samples k replies (temperature 0.7 or --sample-temperature, up to 96 tokens, seed 1) to the first
   `per_domain` training prompts of each domain from the run's SFT model, scored by the gold judge and the
   run's reward model. They are saved in OUT/samples.jsonl with their settings beside them (samples.json),
   and reused by later calls with the same OUT and settings (other settings stop with a message naming the
   file);
2. picks one reply per prompt: the best by gold (`gold`), by the reward model (`rm`) or one at random
   (`random`); with --ended-only, among the replies that ended within the limit, skipping (and counting) the
   prompts where none did;
3. trains a LoRA adapter on the picked replies on top of the SFT model (the SFT stage's trainer, batch 4,
   LoRA on the top 16 blocks; 5% of the picks, split by prompt, give an eval loss instead), into
   OUT/NAME/adapter, NAME being --name or [dpo-]<pick>[-ended][-<steps>steps][-lr<rate>][-beta<b>][-sft<w>]
   [-seed<s>] (each suffix only when not the default). --seed seeds the training (data order, the adapter's
   initialisation), not the candidates. A rerun with the same NAME starts that folder afresh.
   With --objective dpo it makes a pair per prompt instead, the judge's best reply against its worst (two at
   random with --pick random), skipping and counting prompts whose two differ by less than --min-gap in the
   judge's score, and trains DPO on them (the DPO stage's trainer, batch 4, LoRA on the top 16 blocks, the
   adapter disabled as the reference) into OUT/NAME/dpo/adapter; --sft-weight w adds w times the chosen
   reply's negative log-likelihood to the DPO loss (RPO);
4. evaluates it as `python -m rlhf_helpers.evaluate --n-prompts 72 --samples-per-prompt 3` evaluates the
   run's policies (72 held-out prompts x 3 replies, up to 96 tokens, seed 0) and prints its gold, KL to SFT,
   the share of replies that ended, and its gain over SFT with a bootstrap 95% interval over prompts. SFT's
   own 72 x 3 evaluation comes from the run's evaluation cache (eval/policies/, kept apart from the
   notebooks' 32 x 1 by its settings), sampled once (about 500 s on 2 cores) when it is not there yet;
5. with --in-sample, also samples 2 replies from the tuned policy to each training prompt (seed 2, at the
   candidates' temperature) and prints its gain in gold there over SFT's candidates, paired over prompts.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np

PICKS = ("gold", "rm", "random")
SAMPLE = {"temperature": 0.7, "max_new_tokens": 96, "seed": 1, "batch_size": 32}


def training_prompts(per_domain: int, path: Path | None = None) -> list[dict]:
    """The first `per_domain` prompts of each domain in data/prompts.jsonl's train split, domain by domain."""
    from rlhf_helpers.data import load_prompts
    from rlhf_helpers.paths import data_path

    by_domain: dict[str, list[dict]] = {}
    for r in load_prompts(path or data_path("prompts.jsonl")):
        if r.metadata.get("split") == "train":
            by_domain.setdefault(r.metadata.get("domain", ""), []).append({**r.metadata, "prompt": r.prompt})
    return [p for d in sorted(by_domain) for p in by_domain[d][:per_domain]]


def prompt_groups(rows: list[dict], k: int) -> list[list[dict]]:
    """The k replies to each prompt of prompt-major `rows`, prompt by prompt; a ValueError names the rows that
    break the pattern."""
    if k < 1 or len(rows) % k:
        raise ValueError(f"{len(rows)} rows do not come k={k} per prompt")
    groups = [rows[start:start + k] for start in range(0, len(rows), k)]
    for start, group in zip(range(0, len(rows), k), groups):
        if len({r["prompt"] for r in group}) != 1:
            raise ValueError(f"rows {start + 1}-{start + k} hold more than one prompt: rows must be prompt-major, "
                             f"k={k} per prompt")
    return groups


def pick_replies(rows: list[dict], k: int, pick: str, ended_only: bool = False, seed: int = 0
                 ) -> tuple[list[dict], dict]:
    """One reply per prompt from prompt-major `rows` (k per prompt, each with prompt, response, gold, proxy
    and has_eos): the best by gold (`pick="gold"`), by the reward model (`"rm"`) or at random (`"random"`).
    With `ended_only`, only replies that ended are candidates and a prompt with none is skipped.

    Returns (demonstrations as prompt/response dicts, report): the report counts prompts kept and skipped and
    gives the mean over kept prompts of the picked reply's gold minus its candidates' mean gold."""
    if pick not in PICKS:
        raise ValueError(f"pick must be one of {', '.join(PICKS)}, got {pick!r}")
    rng = random.Random(seed)
    demos, lifts, skipped = [], [], 0
    for group in prompt_groups(rows, k):
        if ended_only:
            group = [r for r in group if r["has_eos"]]
            if not group:
                skipped += 1
                continue
        chosen = (max(group, key=lambda r: r["gold"]) if pick == "gold" else
                  max(group, key=lambda r: r["proxy"]) if pick == "rm" else rng.choice(group))
        lifts.append(chosen["gold"] - float(np.mean([r["gold"] for r in group])))
        demos.append({"prompt": chosen["prompt"], "response": chosen["response"]})
    return demos, {"kept": len(demos), "skipped": skipped,
                   "picked_minus_mean_gold": float(np.mean(lifts)) if lifts else None}


def pick_pairs(rows: list[dict], k: int, pick: str, min_gap: float = 0.05, seed: int = 0
               ) -> tuple[list[dict], dict]:
    """One preference pair per prompt from prompt-major `rows` (as `pick_replies` takes them), for DPO: the
    best reply by the judge against its worst (`pick="gold"` or `"rm"`, the replies in a stable sort by the
    judge's score, the last taken as chosen and the first as rejected), or two distinct replies at random in a
    random order (`"random"`). A prompt whose two replies differ by less than `min_gap` in the judge's score
    (gold's or the reward model's; random pairs are never skipped) is skipped and counted.

    Returns (pairs as prompt/chosen/rejected dicts, report): prompts kept and skipped, the mean gold of chosen
    minus rejected, and how many chosen and rejected replies ended."""
    if pick not in PICKS:
        raise ValueError(f"pick must be one of {', '.join(PICKS)}, got {pick!r}")
    if k < 2:
        raise ValueError(f"a pair needs k >= 2 replies per prompt, got k={k}")
    rng = random.Random(seed)
    pairs, gaps, ended, skipped = [], [], [0, 0], 0
    for group in prompt_groups(rows, k):
        if pick == "random":
            chosen, rejected = rng.sample(group, 2)
        else:
            score = "gold" if pick == "gold" else "proxy"
            ranked = sorted(group, key=lambda r: r[score])
            chosen, rejected = ranked[-1], ranked[0]
            if chosen[score] - rejected[score] < min_gap:
                skipped += 1
                continue
        pairs.append({"prompt": chosen["prompt"], "chosen": chosen["response"], "rejected": rejected["response"]})
        gaps.append(chosen["gold"] - rejected["gold"])
        ended[0] += bool(chosen["has_eos"])
        ended[1] += bool(rejected["has_eos"])
    return pairs, {"kept": len(pairs), "skipped": skipped,
                   "chosen_minus_rejected_gold": float(np.mean(gaps)) if gaps else None,
                   "chosen_ended": ended[0], "rejected_ended": ended[1]}


def sample(run_dir: str, prompts: list[dict], k: int, temperature: float = SAMPLE["temperature"]) -> list[dict]:
    from rlhf_helpers.evaluate import evaluate_policy
    from rlhf_helpers.gold import GoldJudge
    from rlhf_helpers.policies import load_policy
    from rlhf_helpers.reward_model import load_run_reward_model

    rm = load_run_reward_model(run_dir)
    if rm is None:
        raise SystemExit(f"{run_dir}/rm has no reward model: run notebook 03 first (the rm pick and the proxy "
                         f"column need it)")
    model, tok = load_policy(run_dir, "sft")
    rows, _ = evaluate_policy(model, tok, [{**p, "sample": j} for p in prompts for j in range(k)], GoldJudge(), rm,
                              reference=None, progress=f"sft: {len(prompts)} training prompts × {k}",
                              **{**SAMPLE, "temperature": temperature})
    return rows


def in_sample(run_dir: str, adapter: Path, rows: list[dict], temperature: float, k: int = 2) -> dict:
    """The tuned policy on the training prompts it was tuned on: k fresh replies to each (seed 2, at the
    temperature the candidates were sampled at), against SFT's candidates there, paired over prompts. Tells a
    pick that does not carry over to new prompts from one that does not even hold on its own."""
    from rlhf_helpers.evaluate import evaluate_policy, paired_win_rate
    from rlhf_helpers.gold import GoldJudge
    from rlhf_helpers.policies import load_policy

    model, tok = load_policy(run_dir, "sft-tuned", adapter=adapter)
    prompts = list(dict.fromkeys(r["prompt"] for r in rows))
    tuned, metrics = evaluate_policy(model, tok, [{"prompt": p, "sample": j} for p in prompts for j in range(k)],
                                     GoldJudge(), None, **{**SAMPLE, "temperature": temperature, "seed": 2},
                                     reference="adapter", progress=f"tuned: {len(prompts)} training prompts × {k}")
    return {"tuned": metrics, "vs_sft": paired_win_rate(tuned, rows)}


def train(run_dir: str, demos_path: Path, out: Path, steps: int, learning_rate: float, seed: int = 0) -> Path:
    from rlhf_helpers.paths import stage_dir
    from rlhf_helpers.sft import SFTStageConfig, build_trainer

    # max_length 512: no picked reply is cut (at 96 new tokens the longest, with a summary's passage, is ~250)
    cfg = SFTStageConfig(model_name=str(stage_dir(run_dir, "sft") / "model"), data_file=str(demos_path),
                         max_steps=steps, batch_size=4, learning_rate=learning_rate, lora_layers=16, max_length=512,
                         eval_fraction=0.05, eval_steps=10**6, save_steps=10**6, logging_steps=4, seed=seed)
    trainer, _ = build_trainer(cfg, out)
    print(f"training on {len(trainer.train_dataset)} picked replies ({len(trainer.eval_dataset)} held out for an "
          f"eval loss)")
    trainer.train()
    trainer.model.save_pretrained(out / "adapter")
    trainer.processing_class.save_pretrained(out / "adapter")
    return out / "adapter"


def train_dpo_pairs(run_dir: str, pairs_path: Path, out: Path, steps: int, learning_rate: float, beta: float,
                    sft_weight: float = 0.0, seed: int = 0) -> Path:
    """DPO (the DPO stage's trainer: batch 4, LoRA on the top 16 blocks, the adapter disabled as the
    reference) on the pairs in `pairs_path`, from the run's SFT model, into OUT/dpo/adapter; with
    `sft_weight` > 0, plus that times the chosen reply's negative log-likelihood (RPO)."""
    from rlhf_helpers.data import PreferencePair
    from rlhf_helpers.dpo import DPOStageConfig, train_dpo
    from rlhf_helpers.paths import stage_dir

    pairs = [PreferencePair(**json.loads(line)) for line in pairs_path.read_text().splitlines() if line.strip()]
    policy = str(stage_dir(run_dir, "sft") / "model")
    cfg = DPOStageConfig(model_name=policy, beta=beta, sft_weight=sft_weight, learning_rate=learning_rate,
                         max_steps=steps, batch_size=4, lora_layers=16, max_length=512, save_steps=10**6,
                         logging_steps=4, resume=False, seed=seed)
    print(f"DPO on {len(pairs)} pairs, beta {beta:g}" + (f", plus {sft_weight:g} x the chosen reply's NLL (RPO)"
                                                         if sft_weight else ""))
    summary = train_dpo(cfg, out, policy, pairs)
    margin, accuracy = summary["margin_halves"], summary["accuracy_halves"]
    if margin and accuracy:  # None with fewer than two logged rows
        print(f"DPO margin {margin['first_half']:+.2f} over the first half of the steps, {margin['second_half']:+.2f} "
              f"over the second; accuracy {accuracy['first_half']:.2f}, {accuracy['second_half']:.2f}")
    return Path(summary["adapter_dir"])


def evaluate(run_dir: str, adapter: Path) -> dict:
    from rlhf_helpers.evaluate import EvalConfig, evaluate_policy, evaluate_stage, heldout_prompts, paired_win_rate
    from rlhf_helpers.gold import GoldJudge
    from rlhf_helpers.policies import load_policy
    from rlhf_helpers.reward_model import load_run_reward_model
    from rlhf_helpers.tracking import atomic_write_text

    cfg = EvalConfig(n_prompts=72, samples_per_prompt=3, max_new_tokens=96, batch_size=32)
    sft_rows, sft_metrics = evaluate_stage(run_dir, "sft", cfg)
    model, tok = load_policy(run_dir, "sft-tuned", adapter=adapter)
    prompts = [{**p, "sample": j} for p in heldout_prompts(cfg.n_prompts) for j in range(cfg.samples_per_prompt)]
    rows, metrics = evaluate_policy(model, tok, prompts, GoldJudge(), load_run_reward_model(run_dir),
                                    max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed,
                                    batch_size=cfg.batch_size, reference="adapter",
                                    progress=f"tuned: {cfg.n_prompts} held-out prompts × {cfg.samples_per_prompt}")
    atomic_write_text(adapter.parent / "eval.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return {"sft": sft_metrics, "tuned": metrics, "vs_sft": paired_win_rate(rows, sft_rows)}


def main(argv=None) -> int:
    from rlhf_helpers.tracking import atomic_write_text

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True, help="a run folder with sft/model and rm/ (notebooks 02 and 03)")
    ap.add_argument("--pick", choices=PICKS, default="gold", help="how the reply to train on is picked")
    ap.add_argument("--ended-only", action="store_true", help="pick only among replies that ended")
    ap.add_argument("--per-domain", type=int, default=16, help="training prompts per domain (8 domains)")
    ap.add_argument("--k", type=int, default=4, help="replies sampled per prompt")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps of 4 replies")
    ap.add_argument("--learning-rate", type=float, default=3e-4,
                    help="for both objectives (the DPO stage's own default is lower; section 12 used 5e-4)")
    ap.add_argument("--out", type=Path, default=None, help="working folder (default: RUN_DIR/rejection_sampling)")
    ap.add_argument("--name", default=None, help="subfolder of OUT for this pick's demonstrations and adapter")
    ap.add_argument("--sample-temperature", type=float, default=SAMPLE["temperature"],
                    help="temperature of the candidate replies (evaluation stays at 0.7); at 1.0 they are the "
                         "model's own distribution, so training on a random one leaves it as it was, on average")
    ap.add_argument("--objective", choices=("sft", "dpo"), default="sft",
                    help="sft: fine-tune on the picked reply; dpo: DPO on a pair per prompt, the judge's best reply "
                         "against its worst (random: two replies at random)")
    ap.add_argument("--beta", type=float, default=0.1, help="DPO's beta (with --objective dpo)")
    ap.add_argument("--min-gap", type=float, default=0.05,
                    help="with --objective dpo, skip a prompt whose best and worst reply differ by less than this "
                         "in the judge's score (gold's 0..1, or the reward model's own units with --pick rm)")
    ap.add_argument("--sft-weight", type=float, default=0.0,
                    help="with --objective dpo, add this times the chosen reply's negative log-likelihood to the "
                         "loss (RPO; section 12 used 1)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the training (data order, adapter initialisation)")
    ap.add_argument("--in-sample", action="store_true",
                    help="also sample the tuned policy on its training prompts and compare with SFT's candidates")
    args = ap.parse_args(argv)
    dpo = args.objective == "dpo"
    if dpo and args.ended_only:
        raise SystemExit("--ended-only picks one reply to fine-tune on; it does not apply to --objective dpo")
    if args.sft_weight < 0:
        raise SystemExit(f"--sft-weight must be >= 0 (0: plain DPO; 1 is RPO's), got {args.sft_weight:g}")
    if args.sft_weight and not dpo:
        raise SystemExit("--sft-weight adds to the DPO loss; it needs --objective dpo (the sft objective is all NLL)")
    from rlhf_helpers.paths import resolve_run_dir, stage_dir

    out = args.out or stage_dir(args.run_dir, "rejection_sampling")
    t0 = time.perf_counter()
    sft_weights = max((f.stat().st_mtime for f in (stage_dir(args.run_dir, "sft") / "model").glob("*.safetensors")),
                      default=None)
    settings = {"run_dir": str(resolve_run_dir(args.run_dir)), "sft_weights_mtime": sft_weights, "k": args.k,
                "per_domain": args.per_domain, **SAMPLE, "temperature": args.sample_temperature}
    samples_path, settings_path = out / "samples.jsonl", out / "samples.json"
    if samples_path.exists():
        saved = json.loads(settings_path.read_text()) if settings_path.exists() else None
        if saved != settings:
            raise SystemExit(f"{samples_path} was sampled with other settings ({settings_path}: {saved}; now: "
                             f"{settings}); delete both files to sample again, or pass another --out")
        rows = [json.loads(line) for line in samples_path.read_text().splitlines() if line.strip()]
        print(f"reusing {len(rows)} sampled replies from {samples_path}")
    else:
        rows = sample(args.run_dir, training_prompts(args.per_domain), args.k, args.sample_temperature)
        atomic_write_text(samples_path, "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_text(settings_path, json.dumps(settings, indent=1))
        print(f"sampled {len(rows)} replies in {time.perf_counter() - t0:.0f} s")
    name = args.name or (("dpo-" if dpo else "") + args.pick + ("-ended" if args.ended_only else "")
                         + (f"-{args.steps}steps" if args.steps != 30 else "")
                         + (f"-lr{args.learning_rate:g}" if args.learning_rate != 3e-4 else "")
                         + (f"-beta{args.beta:g}" if dpo and args.beta != 0.1 else "")
                         + (f"-sft{args.sft_weight:g}" if args.sft_weight else "")
                         + (f"-seed{args.seed}" if args.seed else ""))
    if dpo:
        demos, picked = pick_pairs(rows, args.k, args.pick, args.min_gap)
        print(f"{name}: {picked['kept']} prompts kept, {picked['skipped']} skipped (best and worst within "
              f"{args.min_gap:g} of each other)" if args.pick != "random" else f"{name}: {picked['kept']} random pairs")
        if not demos:
            raise SystemExit("no prompt has a pair to train on: lower --min-gap")
        lift = picked["chosen_minus_rejected_gold"]
        print(f"the chosen reply's gold is {lift:+.3f} over the rejected one's; {picked['chosen_ended']} chosen and "
              f"{picked['rejected_ended']} rejected replies ended")
    else:
        demos, picked = pick_replies(rows, args.k, args.pick, args.ended_only)
        print(f"{name}: {picked['kept']} prompts kept, {picked['skipped']} skipped (no reply ended)")
        if not demos:
            raise SystemExit("no prompt has a reply to train on: sample longer replies, or drop --ended-only")
        lift = picked["picked_minus_mean_gold"]
        print(f"the picked reply's gold is {lift:+.3f} over its candidates' mean")
    shutil.rmtree(out / name, ignore_errors=True)  # a rerun starts afresh: no stale metrics or checkpoints
    demos_path = out / name / ("pairs.jsonl" if dpo else "demonstrations.jsonl")
    atomic_write_text(demos_path, "".join(json.dumps(d) + "\n" for d in demos))
    adapter = (train_dpo_pairs(args.run_dir, demos_path, out / name, args.steps, args.learning_rate, args.beta,
                               args.sft_weight, args.seed) if dpo
               else train(args.run_dir, demos_path, out / name, args.steps, args.learning_rate, args.seed))
    result = evaluate(args.run_dir, adapter)
    m, w = result["tuned"], result["vs_sft"]
    print(f"| {name} | {picked['kept']} | {lift:+.3f} | {m['gold_mean']:.3f} | "
          f"{w['gain']:+.3f} [{w['gain_ci_low']:+.3f}, {w['gain_ci_high']:+.3f}] | {m['kl_mean']:.2f} | "
          f"{m['eos_frac']:.2f} |  (SFT: gold {result['sft']['gold_mean']:.3f}, ended {result['sft']['eos_frac']:.2f})")
    if args.in_sample:
        own = in_sample(args.run_dir, adapter, rows, args.sample_temperature)
        w = own["vs_sft"]
        print(f"on its {w['n']} training prompts, at temperature {args.sample_temperature:g}: gold "
              f"{own['tuned']['gold_mean']:.3f}, {w['gain']:+.3f} [{w['gain_ci_low']:+.3f}, {w['gain_ci_high']:+.3f}] "
              f"over SFT's candidates there")
    print(f"\n{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
