"""GRPO and RLOO (notebook 05), on TRL's GRPOTrainer and RLOOTrainer.

Both sample a *group* of `num_generations` replies per prompt from the current policy, score them with the
reward, and use the group itself as the baseline, so neither needs a value network (PPO's critic):
- GRPO (Shao et al. 2024, the algorithm of the Flux tutorial): advantage A_i = (r_i − mean_g r) / std_g r,
  a clipped PPO-style ratio loss per token (averaged over each reply's tokens, then over replies), and
  β·KL(π‖π_ref) added to that per-token loss: the k3 estimator exp(Δ) − Δ − 1 with Δ = log π_ref − log π
  (always ≥ 0; this is what TRL logs), which TRL 1.16 multiplies by the probability ratio π/π_old
  (`use_bias_correction_kl`, on by default; DeepSeek-V3.2). The ratio's value is 1 on-policy but its
  gradient is not, so the penalty's gradient per token is that of log π − log π_ref, the unbiased gradient
  of the reverse KL(π‖π_ref), not k3's own (1 − π_ref/π)·∇log π, the paper's, which is in expectation the
  gradient of the forward KL(π_ref‖π). Set `use_bias_correction_kl=False` for the paper's.
- RLOO (Ahmadian et al. 2024): the KL penalty goes into the reward, r_i − β·Σ_t (log π − log π_ref)_t
  (the sampled log-ratio summed over the reply, which can be negative on a batch), and the advantage is r_i
  minus the mean reward of the *other* replies to the same prompt (leave-one-out). That advantage is
  K/(K−1)·(r_i − mean_g r) for groups of K: GRPO's with scale_rewards="none", times a constant. TRL's RLOO
  also takes one probability ratio per reply (its summed log-probability), not one per token.
So the same β is not the same leash: a per-token term in GRPO's loss (averaged over the reply's tokens), a
summed log-ratio in RLOO's reward (weighting the whole reply's score-function gradient).
In TRL 1.16 both call the KL coefficient `beta` (GRPOConfig's default is 0, which loads no reference and
logs no KL; ours is above zero). The policy is the SFT model with a fresh LoRA adapter that TRL adds from
our peft config, and the reference is that model with the adapter disabled.

Rewards: the proxy (the normalised reward model, through `rewards.as_trl_reward_func`, minus
`missing_eos_penalty` for a reply that never ended, as in our PPO; each stage sets its own) with weight 1,
and the gold judge with weight 0: TRL computes and logs it (`rewards/gold/mean`) but never optimises it.

Metrics, one row per logged step in `run_dir/<stage>/metrics.jsonl`: TRL's keys (`rewards/proxy/mean`,
`rewards/gold/mean`, `train/kl`, `train/reward`, `completions/mean_length`, `completions/clipped_ratio`,
`train/entropy`, `train/loss`...) plus the aliases every RL stage (ppo, grpo, rloo) shares:
  objective/scores          mean proxy reward of the step's samples, penalty in   (rewards/proxy/mean)
  objective/raw_scores      the same before the missing-EOS penalty (as PPO's)
  response/eos_frac         share of the step's replies that ended
  objective/gold            mean gold reward of the step's samples                (rewards/gold/mean)
  objective/kl_per_token    TRL's `kl` (train/kl): mean over completion tokens of the per-token KL estimate
                            (GRPO's k3, ≥ 0; RLOO's sampled log-ratio, which can be < 0); GRPO's loss is
                            about β times this, since its policy term averages to 0 on-policy
  objective/kl              sequence KL, objective/kl_per_token · completions/mean_length, comparable with
                            PPO's objective/kl (the mean over samples of Σ_t of the per-token estimate);
                            with mask_truncated_completions, over ended replies (their mean length)
  objective/kl_coef         β
  objective/rlhf_reward     objective/scores − β·objective/kl
Sample replies go to `samples.jsonl` at step 1 and every `sample_every` steps.

Outputs in `run_dir/<stage>/`: `metrics.jsonl`, `samples.jsonl`, `summary.json`, `config.json`,
`checkpoints/checkpoint-N/` (adapters, resumable) and `adapter/` (base: `policy_path`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

from .callbacks import (ClockCallback, MetricsCallback, is_main_process, namespaced, quiet_datasets,
                        train_or_restore, without_notebook_progress)
from .config import DEFAULT_MODEL, check_common_fields, command
from .dpo import save_adapter
from .models import checkpointing_flag, count_parameters, default_lora_config, load_model, precision_flags
from .paths import stage_dir
from .rewards import RewardFunction, Trajectory, as_trl_reward_func, reward_identity
from .seeding import seed_everything
from .data import train_prompts
from .tracking import MetricsLogger, PeakMemory, StageClock, _jsonable, keep_rows_through, resume_point, rise_halves


@dataclass
class OnlineRLConfig:
    """Settings shared by GRPO and RLOO; `GRPOStageConfig` and `RLOOStageConfig` add their own."""

    stage: ClassVar[str] = ""

    model_name: str = DEFAULT_MODEL
    """Policy base when run_dir has no SFT model (the notebook uses run_dir/sft/model when present)."""
    dtype: str = "float32"
    """Weights dtype (the profile sets bfloat16 on GPU)."""
    load_in_4bit: bool = False
    """QLoRA 4-bit base weights (CUDA only)."""
    device: str = "cpu"
    """cpu, cuda or auto."""
    beta: float = 0.05
    """KL coefficient β (> 0 keeps the policy near the reference and logs the KL; 0 drops both)."""
    learning_rate: float = 1e-4
    """AdamW learning rate of the LoRA adapter (the profiles may set another, and PPO's may differ: see
    notebook 05's settings table)."""
    max_steps: int = 50
    """Optimizer steps; a fresh batch is sampled every num_iterations steps (every step at the default 1)."""
    batch_size: int = 16
    """Completions per step: (prompts per step) × num_generations."""
    num_generations: int = 4
    """Replies sampled per prompt: the group whose rewards form the baseline (>= 2)."""
    max_completion_length: int = 48
    """Longest reply in tokens; a reply that has not ended by then is cut."""
    temperature: float = 0.7
    """Sampling temperature (top-k and top-p off)."""
    num_iterations: int = 1
    """Optimisation passes over each sampled batch (μ; 1 keeps it on-policy and the clip inactive)."""
    epsilon: float = 0.2
    """Clip range of the probability ratio."""
    missing_eos_penalty: float = 1.0
    """Subtracted from the proxy score of a reply that never ended (cut at max_completion_length), as in our
    PPO: without it the reward model scores half-written replies and the policy is never taught to stop."""
    mask_truncated_completions: bool = False
    """Leave replies cut at max_completion_length out of the loss (DAPO's advice). A cut reply then gets no
    gradient at all: missing_eos_penalty still lowers its score, which only raises its ended siblings'
    advantages; TRL's KL then covers ended replies alone, and so does objective/kl."""
    warmup: float = 0.0
    """Warm-up as a fraction of max_steps."""
    lr_scheduler: str = "constant"
    """Learning-rate schedule (transformers name)."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_layers: int | None = None
    """Adapt only the top N transformer blocks (None: all); fewer is cheaper on a CPU."""
    n_prompts: int | None = None
    """Use at most this many training prompts (None: all)."""
    logging_steps: int = 1
    """Log every this many steps."""
    save_steps: int = 10
    """Checkpoint every this many steps (resume continues from the last one)."""
    sample_every: int = 5
    """Write sample replies to samples.jsonl at step 1 and every this many steps (0: never)."""
    n_samples: int = 4
    """Replies written per sampling step."""
    seed: int = 0
    """Seed of prompt order, sampling and the adapter's initialisation."""
    resume: bool = True
    """Continue from the last checkpoint in run_dir/<stage>/checkpoints when one exists."""

    def __post_init__(self):
        name = type(self).__name__
        checks = [
            (self.beta >= 0, f"beta must be >= 0 (0.01 .. 0.1 is usual; 0 turns the KL off), got {self.beta}"),
            (self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
            (self.num_generations >= 2, f"num_generations must be >= 2 (the group is the baseline), got "
                                        f"{self.num_generations}"),
            (self.batch_size >= self.num_generations and self.batch_size % self.num_generations == 0,
             f"batch_size ({self.batch_size}) must be a multiple of num_generations ({self.num_generations}): "
             f"each step samples whole groups"),
            (self.max_completion_length >= 1, f"max_completion_length must be >= 1, got {self.max_completion_length}"),
            (self.missing_eos_penalty >= 0, f"missing_eos_penalty must be >= 0 (0 disables), got "
                                            f"{self.missing_eos_penalty}"),
            (self.temperature > 0, f"temperature must be > 0 (sampling; try 0.7 .. 1.0), got {self.temperature}"),
            (0 <= self.warmup < 1, f"warmup is a fraction of max_steps, in [0, 1), got {self.warmup} (transformers "
                                   f"reads 1 or more as a number of steps)"),
            (self.num_iterations >= 1 and 0 < self.epsilon < 1,
             f"num_iterations must be >= 1 and epsilon in (0, 1), got {self.num_iterations}, {self.epsilon}"),
            (self.logging_steps >= 1 and self.save_steps >= 1 and self.sample_every >= 0,
             "logging_steps and save_steps must be >= 1, sample_every >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{name}: {message}")
        check_common_fields(self)

    @property
    def prompts_per_step(self) -> int:
        return self.batch_size // self.num_generations


@dataclass
class GRPOStageConfig(OnlineRLConfig):
    """GRPO: group-normalised advantages, KL in the loss."""

    stage: ClassVar[str] = "grpo"

    loss_type: str = "grpo"
    """TRL's loss aggregation: 'grpo' (the paper's: token mean per reply, then mean), 'dapo', 'dr_grpo', 'bnpo'."""
    scale_rewards: str = "group"
    """Divide advantages by the group's reward std ('group', the paper's), the batch's ('batch') or not ('none')."""
    use_bias_correction_kl: bool = True
    """Multiply the per-token k3 KL by the probability ratio (TRL 1.16's default): the penalty's gradient is then
    that of log π − log π_ref, the reverse KL's unbiased one; False keeps the paper's k3 gradient (in
    expectation the forward KL's)."""


@dataclass
class RLOOStageConfig(OnlineRLConfig):
    """RLOO: leave-one-out baseline, KL in the reward."""

    stage: ClassVar[str] = "rloo"

    normalize_advantages: bool = False
    """Scale advantages to mean 0, std 1 over the batch (TRL's default: no)."""


def trl_kwargs(cfg: OnlineRLConfig, output_dir: str | Path) -> dict[str, Any]:
    """Our fields as TRL GRPOConfig / RLOOConfig arguments (tested field by field)."""
    kwargs = dict(
        output_dir=str(output_dir), max_steps=cfg.max_steps, learning_rate=cfg.learning_rate, beta=cfg.beta,
        per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=1, num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length, temperature=cfg.temperature, top_p=1.0, top_k=0,
        num_iterations=cfg.num_iterations, epsilon=cfg.epsilon, reward_weights=[1.0, 0.0],
        mask_truncated_completions=cfg.mask_truncated_completions, warmup_steps=cfg.warmup,
        lr_scheduler_type=cfg.lr_scheduler, max_grad_norm=cfg.max_grad_norm, logging_steps=cfg.logging_steps,
        logging_first_step=True, save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=2,
        report_to="none", **precision_flags(cfg.dtype, cfg.device), **checkpointing_flag(cfg.load_in_4bit),
        disable_dropout=True, shuffle_dataset=True, log_completions=False, trust_remote_code=False,
        seed=cfg.seed, data_seed=cfg.seed, dataloader_num_workers=0,
    )
    if isinstance(cfg, GRPOStageConfig):
        kwargs.update(loss_type=cfg.loss_type, scale_rewards=cfg.scale_rewards,
                      use_bias_correction_kl=cfg.use_bias_correction_kl)
    elif isinstance(cfg, RLOOStageConfig):
        kwargs.update(normalize_advantages=cfg.normalize_advantages)
    return kwargs


def build_trl_config(cfg: OnlineRLConfig, output_dir: str | Path):
    """TRL's GRPOConfig or RLOOConfig from ours (bf16 only off-CPU, gradient checkpointing only for 4-bit)."""
    from trl import GRPOConfig, RLOOConfig

    kinds = {GRPOStageConfig: GRPOConfig, RLOOStageConfig: RLOOConfig}
    if type(cfg) not in kinds:
        raise TypeError(f"build_trl_config needs a GRPOStageConfig or RLOOStageConfig, got {type(cfg).__name__}")
    return kinds[type(cfg)](**trl_kwargs(cfg, output_dir))


# --- metrics ------------------------------------------------------------------------------------------------

def objective_aliases(row: dict[str, Any], beta: float, ended_only: bool = False) -> dict[str, Any]:
    """The keys every RL stage shares (see the module docstring), from a namespaced TRL training row.
    `ended_only` (mask_truncated_completions): TRL's KL is a mean over ended replies' tokens alone, so the
    sequence KL takes their mean length, not every reply's."""
    scores = row.get("rewards/proxy/mean")
    if scores is None:
        return {}
    kl_token = row.get("train/kl")
    length = row.get("completions/mean_terminated_length" if ended_only else "completions/mean_length")
    kl = kl_token * length if kl_token is not None and length is not None else None
    return {"objective/scores": scores, "objective/gold": row.get("rewards/gold/mean"),
            "objective/kl_per_token": kl_token, "objective/kl": kl, "objective/kl_coef": beta,
            "objective/rlhf_reward": scores - beta * kl if kl is not None else None}


class OnlineRLMetricsCallback(MetricsCallback):
    """TRL's logs into metrics.jsonl, with the shared `objective/*` aliases; `on_row(row)` after each row (and
    at once for the rows a resumed run already holds)."""

    def __init__(self, logger: MetricsLogger, beta: float, on_row: Callable[[dict], None] | None = None,
                 ended_only: bool = False):
        super().__init__(logger, on_row)
        self.beta, self.ended_only = beta, ended_only

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        values = namespaced(logs)
        values.update(objective_aliases(values, self.beta, self.ended_only))
        row = self.logger.log(state.global_step, **values)
        if self.on_row:
            self.on_row(row)


class SampleRecorder:
    """Wraps TRL's proxy reward function. Subtracts `missing_eos_penalty` from the score of every reply that
    never reached `eos_token_id` (TRL cut it at max_completion_length), as our PPO does, so that all three RL
    methods optimise the same kind of score (the cap and the penalty are each stage's setting); logs
    `objective/raw_scores` (before the penalty) and `response/eos_frac` through TRL's `log_metric`. At step 1
    and at the first sampled batch of every `every` steps (TRL samples every num_iterations steps), it appends
    the first `n` replies with their raw proxy and gold rewards to `path`; on the main process alone
    (`is_main_process`, which `build_trainer` sets), so that `accelerate launch` writes each sample once."""

    def __init__(self, reward_func: Callable[..., list[float]], gold: RewardFunction, path: Path, every: int, n: int,
                 eos_token_id: int | None = None, missing_eos_penalty: float = 0.0):
        self.reward_func, self.gold, self.path, self.every, self.n = reward_func, gold, path, every, n
        self.eos_token_id, self.missing_eos_penalty = eos_token_id, missing_eos_penalty
        self.is_main_process = True
        self._last_step: int | None = None  # the step of the previous call (None: none yet in this session)
        self.__name__ = reward_func.__name__  # TRL names the metric rewards/<__name__>/mean

    def _due(self, step: int) -> bool:
        """Step 1, and the first call in each later block of `every` steps (a multiple of `every` when TRL
        samples every step; the call after one it skipped when it samples every num_iterations steps)."""
        previous = step - 1 if self._last_step is None else self._last_step
        self._last_step = step
        return bool(self.every and self.n) and (step == 1 or step // self.every > previous // self.every)

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        raw = list(self.reward_func(prompts, completions, **kwargs))
        ids = kwargs.get("completion_ids")
        has_eos = [None] * len(raw) if ids is None or self.eos_token_id is None else \
            [self.eos_token_id in list(row) for row in ids]
        penalty = self.missing_eos_penalty
        scores = [s - penalty if penalty and ended is False else s for s, ended in zip(raw, has_eos)]
        log_metric = kwargs.get("log_metric")
        if log_metric is not None and raw:
            log_metric("objective/raw_scores", sum(raw) / len(raw))
            if has_eos[0] is not None:
                log_metric("response/eos_frac", sum(has_eos) / len(has_eos))
        state = kwargs.get("trainer_state")
        step = (state.global_step + 1) if state is not None else 0
        if self._due(step) and self.is_main_process:
            from .rewards import _text

            with open(self.path, "a", encoding="utf-8") as f:
                for p, c, s, ended in list(zip(prompts, completions, raw, has_eos))[: self.n]:
                    prompt, reply = _text(p, "user"), _text(c, "assistant")
                    row = {"step": step, "prompt": prompt, "response": reply, "proxy": s, "has_eos": ended,
                           "gold": self.gold(Trajectory(prompt, reply)).reward}
                    f.write(json.dumps(_jsonable(row)) + "\n")
        return scores


# --- data and rewards ---------------------------------------------------------------------------------------

def run_reward(run_dir, dtype: str = "float32", device: str = "cpu") -> tuple[RewardFunction, str]:
    """(the proxy reward, its name): notebook 03's normalised reward model, else the gold judge, said aloud."""
    from .gold import GoldJudge
    from .reward_model import load_run_reward_model

    rm = load_run_reward_model(run_dir, dtype=dtype, device=device)
    if rm is not None:
        return rm, "reward_model"
    print(f"No reward model in {stage_dir(run_dir, 'rm')}: optimising the gold judge itself (run notebook 03 for a "
          f"learned proxy); proxy and gold then coincide, so over-optimisation cannot show.")
    return GoldJudge(), "gold_judge"


def to_dataset(prompts: Sequence[str | list[dict]]):
    """TRL conversational prompt-only examples."""
    from datasets import Dataset

    if not prompts:
        raise ValueError("GRPO/RLOO need at least one training prompt (data/prompts.jsonl, split 'train')")
    return Dataset.from_list([{"prompt": [{"role": "user", "content": p}] if isinstance(p, str) else list(p)}
                              for p in prompts])


# --- training -----------------------------------------------------------------------------------------------

def build_trainer(cfg: OnlineRLConfig, run_dir: str | Path, policy_path: str, prompts: Sequence[str | list[dict]],
                  reward: RewardFunction, gold: RewardFunction, logger: MetricsLogger, on_row=None,
                  callbacks: Sequence[Any] = ()):
    """The policy (plain weights of `policy_path`; TRL adds the LoRA adapter), prompts, proxy and gold reward
    functions and TRL's GRPOTrainer or RLOOTrainer, ready to `train()`."""
    from trl import GRPOTrainer, RLOOTrainer

    seed_everything(cfg.seed)
    out = stage_dir(run_dir, cfg.stage)
    model, tok = load_model(policy_path, dtype=cfg.dtype, load_in_4bit=cfg.load_in_4bit, device=cfg.device,
                            padding_side="left")
    lora = default_lora_config(cfg.lora_r, cfg.lora_alpha, dropout=0.0, top_layers=cfg.lora_layers,
                               n_layers=model.config.num_hidden_layers if cfg.lora_layers else None, model=model)
    proxy = SampleRecorder(as_trl_reward_func(reward, "proxy"), gold, out / "samples.jsonl", cfg.sample_every,
                           cfg.n_samples, eos_token_id=tok.eos_token_id, missing_eos_penalty=cfg.missing_eos_penalty)
    trainer_cls = GRPOTrainer if isinstance(cfg, GRPOStageConfig) else RLOOTrainer
    trainer = trainer_cls(model=model, reward_funcs=[proxy, as_trl_reward_func(gold, "gold")],
                          args=build_trl_config(cfg, out / "checkpoints"), train_dataset=to_dataset(prompts),
                          processing_class=tok, peft_config=lora,
                          callbacks=[OnlineRLMetricsCallback(logger, cfg.beta, on_row,
                                                             ended_only=cfg.mask_truncated_completions), *callbacks])
    proxy.is_main_process = trainer.accelerator.is_main_process  # under accelerate launch, one writer of samples
    return without_notebook_progress(trainer)


@quiet_datasets()
def train_online(cfg: OnlineRLConfig, run_dir: str | Path, policy_path: str, prompts: Sequence[str | list[dict]],
                 reward: RewardFunction, gold: RewardFunction | None = None, on_row=None,
                 callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train GRPO or RLOO (by the config's type) against `reward`, logging `gold` (default: the gold judge)
    without optimising it; save `adapter/`, write `summary.json`; returns the summary."""
    from .gold import GoldJudge

    if not isinstance(reward, RewardFunction):
        raise TypeError(f"reward must be a RewardFunction (e.g. load_run_reward_model(run_dir)), got {type(reward).__name__}")
    gold = GoldJudge() if gold is None else gold
    prompts = list(prompts)[: cfg.n_prompts]
    memory = PeakMemory(cfg.device).start()
    clock = StageClock(memory=memory)
    out = stage_dir(run_dir, cfg.stage)
    ckpt, logger, settings = resume_point(out, cfg, data=prompts,
                                          inputs={"policy": policy_path, "reward": reward_identity(reward)})
    clock.resumed(ckpt)
    start = int(Path(ckpt).name.split("-")[-1]) if ckpt else 0
    keep_rows_through(out / "samples.jsonl", start)
    logger.save_config(settings)
    trainer = build_trainer(cfg, run_dir, policy_path, prompts, reward, gold, logger, on_row,
                            [*callbacks, ClockCallback(clock)])
    result = train_or_restore(trainer, ckpt)
    model, tok = trainer.model, trainer.processing_class
    main_process = is_main_process()
    adapter = save_adapter(model, tok, out / "adapter") if main_process else out / "adapter"
    rows = [r for r in logger.rows if "objective/scores" in r]
    first, last = (rows[0], rows[-1]) if rows else ({}, {})
    steps = trainer.state.global_step
    batches = -(-steps // cfg.num_iterations) * trainer.accelerator.num_processes  # each sampled once, reused μ times
    summary = {
        "stage": cfg.stage, "policy_path": policy_path, "reward": getattr(reward, "name", type(reward).__name__),
        "beta": cfg.beta, "steps": steps, "n_prompts": len(prompts), "samples_seen": batches * cfg.batch_size,
        "prompts_seen": batches * cfg.prompts_per_step, "num_generations": cfg.num_generations,
        "scores_first": first.get("objective/scores"), "scores_last": last.get("objective/scores"),
        "gold_first": first.get("objective/gold"), "gold_last": last.get("objective/gold"),
        "kl_last": last.get("objective/kl"), "kl_per_token_last": last.get("objective/kl_per_token"),
        "length_mean_last": last.get("completions/mean_length"),
        "clipped_ratio_last": last.get("completions/clipped_ratio"), "eos_frac_first": first.get("response/eos_frac"),
        "eos_frac_last": last.get("response/eos_frac"), "max_completion_length": cfg.max_completion_length,
        "raw_scores_first": first.get("objective/raw_scores"), "raw_scores_last": last.get("objective/raw_scores"),
        **rise_halves(rows),
        "train_runtime_s": result.metrics.get("train_runtime"), **clock.facts(),
        "parameters": count_parameters(model), "resumed_from": ckpt, "adapter_dir": str(adapter),
    }
    if main_process:
        logger.summary(summary)
    return summary


def train_grpo(cfg: GRPOStageConfig, run_dir: str | Path, policy_path: str, prompts: Sequence[str | list[dict]],
               reward: RewardFunction, gold: RewardFunction | None = None, on_row=None,
               callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """GRPO stage end to end (see `train_online`); writes run_dir/grpo/."""
    if not isinstance(cfg, GRPOStageConfig):
        raise TypeError(f"train_grpo needs a GRPOStageConfig, got {type(cfg).__name__}")
    return train_online(cfg, run_dir, policy_path, prompts, reward, gold, on_row, callbacks)


def train_rloo(cfg: RLOOStageConfig, run_dir: str | Path, policy_path: str, prompts: Sequence[str | list[dict]],
               reward: RewardFunction, gold: RewardFunction | None = None, on_row=None,
               callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """RLOO stage end to end (see `train_online`); writes run_dir/rloo/."""
    if not isinstance(cfg, RLOOStageConfig):
        raise TypeError(f"train_rloo needs an RLOOStageConfig, got {type(cfg).__name__}")
    return train_online(cfg, run_dir, policy_path, prompts, reward, gold, on_row, callbacks)


@command
def main(argv: Sequence[str] | None = None) -> int:
    """`python -m rlhf_helpers.online_rl {grpo,rloo} --run-dir runs/x --profile cpu [--beta 0.1 ...]` (also under
    `accelerate launch`): the stage against the run's reward model (else the gold judge), from its SFT model
    (else the base model), on the training prompts."""
    import argparse

    from .config import add_stage_arguments, stage_config_from_args
    from .sft import sft_policy_path

    parser = argparse.ArgumentParser(prog="python -m rlhf_helpers.online_rl", description="GRPO and RLOO stages (TRL)")
    sub = parser.add_subparsers(dest="stage", required=True)
    classes = {"grpo": GRPOStageConfig, "rloo": RLOOStageConfig}
    for name, cls in classes.items():
        p = sub.add_parser(name, help=cls.__doc__)
        add_stage_arguments(p, cls)
    args = vars(parser.parse_args(argv))
    stage = args.pop("stage")
    run_dir, cfg = stage_config_from_args(sub.choices[stage], classes[stage], args)
    policy_path, _ = sft_policy_path(run_dir, cfg.model_name)
    reward, _ = run_reward(run_dir, cfg.dtype, cfg.device)
    summary = train_online(cfg, run_dir, policy_path, train_prompts(), reward)
    if is_main_process():
        print({k: summary[k] for k in ("steps", "samples_seen", "scores_first", "scores_last", "gold_first",
                                       "gold_last", "kl_last", "wall_time_s")})
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
