"""The cpu profile's PPO with a rule-based safety term beside the reward model, and harmful prompts repeated.

    .venv/bin/python scripts/ppo_safety_term.py --run-dir R [--safety-weight 1.0] [--harmful-repeat 3] \
        [--seed 0] [--learning-rate 3e-4] [--max-steps 8]

R holds a run's `sft/` and `rm/` (e.g. hard links to runs/cpu's). A check behind docs/rl_on_a_cpu_budget.md,
section 17: notebook 03's reward model orders replies that refuse about as often right as wrong, and the cpu
profile's 8 steps see only 2 to 4 harmful requests, so nothing holds SFT's refusals in place. This tries the
usual remedy (Llama 2's separate safety reward; OpenAI's rule-based rewards): each reply's score is

    reward model (normalised) + w · (+1 if the reply refuses exactly when the prompt is harmful, else −1)

the rule being notebook 01's `safety` component (`rewards.RefusalAppropriateness`; the gold judge's safety
rule uses the same two detectors, so this term agrees with gold's by construction), and the training
prompts are the usual 248 with each of the 31 harmful ones repeated `--harmful-repeat` times in all. Then it
trains with the cpu profile's PPO settings into R/ppo (as `python -m rlhf_helpers.ppo` does, resuming from
R/ppo's newest checkpoint when its settings match). Evaluate the result with
`.venv/bin/python -m rlhf_helpers.evaluate ppo --run-dir R --profile cpu --n-prompts 72 --samples-per-prompt 12`.
"""
from __future__ import annotations

import argparse
from typing import Any, Sequence

import torch

from rlhf_helpers.config import stage_config
from rlhf_helpers.data import train_prompts
from rlhf_helpers.gold import GoldJudge
from rlhf_helpers.online_rl import run_reward
from rlhf_helpers.ppo import PPOConfig, as_tensor_reward, print_step, train_ppo
from rlhf_helpers.rewards import RefusalAppropriateness, is_harmful_prompt, reward_identity
from rlhf_helpers.sft import sft_policy_path


class SafetyTerm:
    """PPO's reward_fn: `reward`'s score plus `weight` where the reply refuses exactly when the prompt is
    harmful, minus `weight` where it does not (a harmful request answered, or a harmless one refused).

    A class rather than a closure for its `to_config()`: the PPO stage records it (`rewards.reward_identity`),
    so a rerun with another weight or another reward model starts over instead of resuming this one."""

    def __init__(self, reward: Any, weight: float):
        self.reward, self.weight = reward, float(weight)
        self.base, self.rule = as_tensor_reward(reward), RefusalAppropriateness()

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        right = torch.tensor(self.rule.score(prompts, responses), dtype=torch.float32)  # 1 or 0
        return torch.as_tensor(self.base(prompts, responses), dtype=torch.float32) + self.weight * (2 * right - 1)

    def to_config(self) -> dict[str, Any]:
        return {"type": "SafetyTerm", "weight": self.weight, "reward": reward_identity(self.reward),
                "rule": self.rule.to_config()}


def repeat_harmful(prompts: Sequence[str], times: int) -> list[str]:
    """The prompts, then every harmful one again `times` − 1 times (so it is drawn `times` as often)."""
    if times < 1:
        raise ValueError(f"--harmful-repeat must be at least 1 (1 leaves the prompts as they are), got {times}")
    harmful = [p for p in prompts if is_harmful_prompt(p)]
    return list(prompts) + harmful * (times - 1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--safety-weight", type=float, default=1.0,
                        help="w: the rule's ± term, in the normalised reward model's units (its std on SFT replies)")
    parser.add_argument("--harmful-repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learning-rate", type=float, default=None, help="default: the cpu profile's")
    parser.add_argument("--max-steps", type=int, default=None, help="default: the cpu profile's (8)")
    args = parser.parse_args(argv)
    overrides = {"seed": args.seed, **{k: v for k, v in (("learning_rate", args.learning_rate),
                                                          ("max_steps", args.max_steps)) if v is not None}}
    cfg = stage_config(PPOConfig, "cpu", **overrides)
    policy_path, _ = sft_policy_path(args.run_dir, cfg.model_name)
    reward, name = run_reward(args.run_dir, cfg.dtype, cfg.device)
    prompts = repeat_harmful(train_prompts(), args.harmful_repeat)
    n_harmful = sum(map(is_harmful_prompt, prompts))
    print(f"reward: {name} + {args.safety_weight} x safety rule; {len(prompts)} training prompts, {n_harmful} harmful")
    summary = train_ppo(cfg, args.run_dir, policy_path, SafetyTerm(reward, args.safety_weight), prompts,
                        gold=GoldJudge(), callbacks=[print_step])
    print({k: summary[k] for k in ("steps", "scores_last", "gold_last", "kl_last", "wall_time_s")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
