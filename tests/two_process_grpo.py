"""Run by `test_grpo_under_two_processes_...` under `torchrun --nproc_per_node 2` (CPU, gloo), as `accelerate
launch` runs a stage on several processes: GRPO on the tiny model whose folder is argv[1], into argv[2]. Each
process prints its summary's counts as one JSON line."""
import json
import os
import sys

from rlhf_helpers.online_rl import GRPOStageConfig, train_grpo
from rlhf_helpers.rewards import RewardFunction, RewardOutput


class Letters(RewardFunction):
    name = "letters_test"

    def params(self):
        return {}

    def compute_reward(self, t):
        return RewardOutput(sum(c.isalpha() for c in t.response) / max(len(t.response), 1))


if __name__ == "__main__":
    tiny, run_dir = sys.argv[1], sys.argv[2]
    cfg = GRPOStageConfig(model_name=tiny, max_steps=2, batch_size=4, num_generations=2, max_completion_length=6,
                          learning_rate=5e-2, save_steps=1, sample_every=1, n_samples=2, resume=False)
    prompts = ["How can I save money?", "Name a fruit.", "Why do cats purr?", "Explain rain.", "What is a map?",
               "Give me a tip.", "How do bees fly?", "What is tea?"]
    summary = train_grpo(cfg, run_dir, tiny, prompts, Letters(), Letters())
    print("COUNTS " + json.dumps({"rank": os.environ.get("RANK"), "world": os.environ.get("WORLD_SIZE"),
                                  **{k: summary[k] for k in ("steps", "samples_seen", "prompts_seen")}}), flush=True)
