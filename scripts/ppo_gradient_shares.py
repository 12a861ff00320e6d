"""How hard the value loss pulls on the policy's LoRA adapter, beside the policy loss, in notebook 04's PPO.

    .venv/bin/python scripts/ppo_gradient_shares.py --run-dir runs/cpu [--profile cpu] [--reward rm|gold] \
        [--from-checkpoint] [--rollouts 3]

The value head shares the policy's backbone, so the value loss (× vf_coef) also trains the adapter. This
samples `--rollouts` fresh rollouts of the profile's batch size and prints, for each, the norm of the
gradient that the clipped policy loss and the weighted value loss each put on the adapter, the cosine
between the two, and the norm of the whole loss's gradient over the adapter and the value head (what
`max_grad_norm` clips). With `--from-checkpoint` the adapter and value head are those of run_dir's newest PPO
checkpoint (as at the end of notebook 04's training); without it, the fresh adapter and the zero-initialised
head of step 1. The last column is how much of the returns' variance the value head predicts on that rollout
(`val/explained_variance`). Nothing is trained or written under run_dir (the trainer's folder is a temporary one).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch


def gradient_norms(policy, trainer, exp, cfg) -> dict[str, float]:
    """On one rollout: the adapter-gradient norms of the policy loss and of vf_coef · value loss, their
    cosine, and the norm of the whole update's gradient over every trained parameter (adapter and value
    head), the one `max_grad_norm` clips."""
    from rlhf_helpers.ppo import forward_logprobs_values, ppo_losses

    ro = exp.rollout
    adapter = [p for p in policy.parameters() if p.requires_grad]
    logprobs, values, _ = forward_logprobs_values(policy, trainer.value_head, ro.query_response_ids,
                                                  ro.attention_mask, ro.response_start, cfg.temperature)
    args = (logprobs, exp.logprobs, exp.advantages, values, exp.values, exp.returns, ro.response_mask,
            cfg.cliprange, cfg.cliprange_value)
    policy_loss, _ = ppo_losses(*args, 0.0)  # vf_coef = 0: the policy loss alone
    total, _ = ppo_losses(*args, cfg.vf_coef)

    def flat(loss, params):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().float()
                          for g, p in zip(grads, params)])

    gp, gv = flat(policy_loss, adapter), flat(total - policy_loss, adapter)
    cos = float(gp @ gv / (gp.norm() * gv.norm())) if gv.norm() > 0 and gp.norm() > 0 else float("nan")
    return {"policy": float(gp.norm()), "value": float(gv.norm()), "cosine": cos,
            "total": float(flat(total, trainer.params).norm())}


def main(argv=None) -> int:
    from rlhf_helpers.config import stage_config
    from rlhf_helpers.data import train_prompts
    from rlhf_helpers.gold import GoldJudge
    from rlhf_helpers.online_rl import run_reward
    from rlhf_helpers.ppo import (PPOConfig, PPOTrainer, as_tensor_reward, build_policy, explained_variance,
                                  list_checkpoints, make_experience)
    from rlhf_helpers.sft import sft_policy_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--reward", choices=("rm", "gold"), default="rm")
    parser.add_argument("--from-checkpoint", action="store_true")
    parser.add_argument("--rollouts", type=int, default=3)
    args = parser.parse_args(argv)

    cfg = stage_config(PPOConfig, args.profile)
    policy_path, _ = sft_policy_path(args.run_dir, cfg.model_name)
    reward = run_reward(args.run_dir, cfg.dtype, cfg.device)[0] if args.reward == "rm" else GoldJudge()
    policy, tok = build_policy(cfg, policy_path)
    with tempfile.TemporaryDirectory() as scratch:
        trainer = PPOTrainer(policy, tok, as_tensor_reward(reward), cfg, scratch, train_prompts())
        if args.from_checkpoint:
            checkpoints = list_checkpoints(Path(args.run_dir) / "ppo")
            if not checkpoints:
                raise SystemExit(f"{args.run_dir}/ppo/checkpoints holds no checkpoint: run notebook 04 first")
            step, newest = checkpoints[-1]
            shutil.copytree(newest, trainer.out / "checkpoints" / newest.name)
            # resume() stops at cfg.max_steps by default, which a longer run's newest checkpoint can pass
            if trainer.resume(max_steps=step) != step:
                raise SystemExit(f"{newest} did not load")
            print(f"from {newest} (step {step}); value head weight norm "
                  f"{float(trainer.value_head.summary.weight.detach().norm()):.3f}")
        print("| rollout | mean score | policy-loss gradient | vf_coef · value-loss gradient | cosine | "
              "whole gradient (adapter and head) | explained variance |")
        print("|---|---|---|---|---|---|---|")
        for i in range(1, args.rollouts + 1):
            exp = make_experience(policy, trainer.value_head, tok, trainer.reward_fn, trainer.prompts_for(i), cfg,
                                  trainer.kl_ctl.value, seed=10_000 + i)
            norms = gradient_norms(policy, trainer, exp, cfg)
            print(f"| {i} | {float(exp.scores.mean()):.3f} | {norms['policy']:.4f} | {norms['value']:.4f} | "
                  f"{norms['cosine']:.3f} | {norms['total']:.4f} | "
                  f"{float(explained_variance(exp.values, exp.returns, exp.rollout.response_mask)):.3f} |", flush=True)
    print(f"max_grad_norm is {cfg.max_grad_norm}: an update whose whole gradient is below it is not clipped "
          f"(measured here on the whole rollout; PPO's updates take mini-batches of {cfg.mini_batch_size}).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
