"""PPO throughput: where a step's time goes, and how fast PPO generates beside a bare `model.generate`.

    python benchmarks/ppo_throughput.py --profile cpu [--run-dir runs/cpu] [--steps 3] [--reward gold]
        [--dtype bfloat16 --batch-size 32 ...]

Any PPOConfig field can be overridden as in `python -m rlhf_helpers.ppo` (the profile's value otherwise), to
time a setting before training with it. Builds the PPO policy as notebook 04 does (the SFT model of --run-dir
when present, else the profile's base model), runs --steps PPO steps into a scratch folder, and prints a
table: per step, the time of the rollout, the scoring, the forward passes (policy, values, reference) and the
updates; then, on the same batch in the same process, the generated tokens per second inside PPO's rollout
beside a bare `policy.generate` call with the same prompts, seed, sampling settings and policy (run just
before the step, so it samples the same replies: column `same` compares them token by token); and the peak
memory. The bare call runs twice on each batch and the faster time counts: the first call at a batch's shapes
pays one-off costs that the rollout after it would not (on an H100, with the bare call timed once, PPO's
rollout ran at 1.46 to 1.90 times its speed). Training pays them: each rollout there is the first call at its
batch's shapes, so notebook 04's rollouts on that H100 took longer than this table's (docs section 19).

Run it alone: on a 2-core machine another busy process slows generation several-fold.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rlhf_helpers import ppo  # noqa: E402
from rlhf_helpers.config import add_config_arguments, stage_config  # noqa: E402
from rlhf_helpers.data import train_prompts  # noqa: E402
from rlhf_helpers.gold import GoldJudge  # noqa: E402
from rlhf_helpers.models import chat_prompt  # noqa: E402
from rlhf_helpers.online_rl import run_reward  # noqa: E402
from rlhf_helpers.sft import sft_policy_path  # noqa: E402
from rlhf_helpers.tracking import PeakMemory  # noqa: E402


# set by the benchmark itself (no checkpoints, no samples, --steps steps, a scratch folder), or by its own --seed
BENCHMARK_FIXES = ("seed", "save_steps", "sample_every", "max_steps", "resume", "keep_checkpoints")


def bare_generate_tokens_per_s(policy, tok, prompts, cfg, seed: int) -> tuple[float, int, float, torch.Tensor]:
    """(seconds, response tokens up to the first EOS, tokens/s, response ids) of one plain generate call on
    `prompts`, seeded as PPO's rollout seeds its own (the global RNG is left as it was). The response ids are
    padded after the first EOS as a rollout pads them, to compare with its replies token by token."""
    device = next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    tok.padding_side = "left"
    enc = tok([chat_prompt(tok, p) for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
    enc = enc.to(device)
    t0 = time.perf_counter()
    with torch.no_grad(), ppo._seeded(seed, device):
        out = policy.generate(**enc, generation_config=ppo.generation_config(cfg, tok))
    seconds = time.perf_counter() - t0
    if was_training:
        policy.train()
    response = out[:, enc["input_ids"].shape[1]:]
    mask, _ = ppo.response_mask_from_eos(response, tok.eos_token_id)
    n = int(mask.sum())
    return seconds, n, n / seconds, torch.where(mask, response, tok.pad_token_id)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--run-dir", default=None, help="a run folder with sft/ (and rm/); default runs/<profile>")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--reward", choices=("rm", "gold"), default="rm")
    parser.add_argument("--seed", type=int, default=0)
    add_config_arguments(parser, ppo.PPOConfig, skip=BENCHMARK_FIXES)
    args = vars(parser.parse_args(argv))
    profile, steps, which, seed = args.pop("profile"), args.pop("steps"), args.pop("reward"), args.pop("seed")
    run_dir = args.pop("run_dir") or f"runs/{profile}"
    cfg = stage_config(ppo.PPOConfig, profile, **args, seed=seed, save_steps=0, sample_every=0)
    policy_path, _ = sft_policy_path(run_dir, cfg.model_name)
    reward = run_reward(run_dir, cfg.dtype, cfg.device)[0] if which == "rm" else GoldJudge()
    prompts = train_prompts()
    memory = PeakMemory(cfg.device).start()
    policy, tok = ppo.build_policy(cfg, policy_path)
    print(f"profile {profile}: policy {policy_path}, reward {type(reward).__name__}, batch {cfg.batch_size} "
          f"({cfg.batch_size // cfg.samples_per_prompt} prompts x {cfg.samples_per_prompt}) x "
          f"{cfg.response_length} tokens, {cfg.ppo_epochs} epochs x {cfg.num_mini_batches} mini-batches, "
          f"{cfg.dtype}, threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as scratch:
        trainer = ppo.PPOTrainer(policy, tok, ppo.as_tensor_reward(reward), cfg, scratch, prompts)
        header = f"{'step':>4} {'rollout s':>10} {'score s':>8} {'forward s':>10} {'update s':>9} {'step s':>7} " \
                 f"{'tokens':>7} {'PPO tok/s':>10} {'bare tok/s':>11} {'ratio':>6} {'same':>5}"
        print(header)
        print("-" * len(header))
        ratios = []
        # warm-up on a whole batch, a few tokens long: the first call at a batch's size pays one-off costs (on an
        # H100 a 2-prompt warm-up left step 1's bare call at 142 tokens/s, against 355 at step 2)
        bare_generate_tokens_per_s(policy, tok, trainer.prompts_for(1), dataclasses.replace(cfg, response_length=8), 0)
        for _ in range(steps):
            # a bare generate call on the batch the next rollout samples, with its seed and the same policy (before
            # the step updates it): the same replies, so the two times differ only by what PPO's rollout adds
            step = trainer.step_count + 1
            # twice, the faster counting: the first call at this batch's shapes pays one-off costs
            timed = [bare_generate_tokens_per_s(policy, tok, trainer.prompts_for(step), cfg, trainer._seed(step))
                     for _ in range(2)]
            _, bare_tokens, bare, bare_ids = max(timed, key=lambda t: t[2])
            m = trainer.step()
            inside = m["tokens/generated"] / m["time/rollout_s"]
            ratios.append(inside / bare)
            sampled = trainer.last_rollout.response_ids
            same = "yes" if sampled.shape == bare_ids.shape and torch.equal(sampled, bare_ids) else "no"
            print(f"{trainer.step_count:>4} {m['time/rollout_s']:>10.2f} {m['time/score_s']:>8.2f} "
                  f"{m['time/forward_s']:>10.2f} {m['time/update_s']:>9.2f} {m['time/step_s']:>7.2f} "
                  f"{int(m['tokens/generated']):>7} {inside:>10.1f} {bare:>11.1f} {inside / bare:>6.2f} {same:>5}")
    print("-" * len(header))
    print(f"mean PPO/bare generation throughput ratio: {sum(ratios) / len(ratios):.2f} (aim >= 0.9); "
          f"peak memory {memory.peak_mb():.0f} MB ({memory.facts()['peak_memory_kind']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
