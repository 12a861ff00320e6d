"""PPO for language models (notebook 04): a policy with a LoRA adapter, a value head, and a reward function.

TRL >= 1.13 has no PPO trainer, so it lives here, following "The N implementation details of RLHF with
PPO" (Huang et al. 2023) and TRL's former PPOv2Trainer. One `PPOTrainer.step()`:

1. rollout: `batch_size` prompts (batch_size / k prompts k times each, k = `samples_per_prompt`),
   chat-formatted and left-padded; sample up to `response_length` tokens at
   `temperature` (top-k and top-p off, so the sampler's distribution is exactly softmax(logits / T));
   everything after a response's first EOS is padding. The mask comes from the first-EOS position, never
   from pad-id equality. SmolLM2's own tokenizer pads with `<|im_end|>`, its EOS, so pad-id masking would hide
   every reply's real end; `models.load_tokenizer` pads with `<|endoftext|>` (id 0) instead, a token a
   response may still legitimately hold.
2. score: `reward_fn(prompts, responses) -> (B,)`, minus `missing_eos_penalty` where a response never ended;
   with `group_baseline`, minus the mean score of the response's k − 1 siblings before step 4 (RLOO's baseline).
3. forward: log π_old and values V (policy + value head), log π_ref (the same policy with its LoRA adapter
   disabled: no second copy), all at the sampling temperature.
4. per-token rewards r_t = −β·(log π_old − log π_ref)_t on every response token, plus the score on the last
   real token (the EOS, or the last token of a truncated response).
5. optional reward whitening; GAE(γ, λ) with V = 0 after the last token; advantage whitening.
6. `ppo_epochs` passes over shuffled mini-batches of the clipped policy loss + vf_coef · clipped value loss.
7. the KL controller updates β from the measured KL (fixed, or Ziegler et al.'s adaptive controller).

Dropout stays off throughout (the policy is kept in eval mode; gradients still flow), so that on the first
mini-batch the new and old log-probs agree and the ratio is 1: exactly in float32, within rounding in
bfloat16 on a GPU (its kernels differ with the batch's shape, so the first clip fraction can be a little above
0 there). transformers checkpoints a layer's activations (gradient checkpointing, which peft switches on for
4-bit models) only when that layer is in training mode; the updates therefore set the training flag on the
checkpointing layers alone, for their duration, and dropout, which lives in their sub-modules, stays off.

Metrics, one row per step in `run_dir/ppo/metrics.jsonl` (TRL's names where TRL has them):
  objective/kl               mean over sequences of Σ_t (log π_old − log π_ref)   (the Monte-Carlo sequence KL)
  objective/kl_coef          β used for this step's rewards
  objective/scores           mean score after the missing-EOS penalty
  objective/raw_scores       mean score from reward_fn, before the penalty
  objective/non_score_reward mean over sequences of Σ_t −β·kl_t
  objective/rlhf_reward      objective/scores − β·objective/kl
  objective/entropy          mean over sequences of Σ_t −log π_old(y_t)   (sampled-token entropy estimate)
  policy/approxkl_avg        ½·mean_t (log π_new − log π_old)²            (averaged over every mini-batch)
  policy/clipfrac_avg        share of tokens whose policy loss took the clipped branch
  policy/entropy_avg         mean over tokens of the policy's full-distribution entropy at temperature T
  loss/policy_avg            mean_t max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)),  ρ = π_new/π_old
  loss/value_avg             ½·mean_t max((V−R)², (V_clip−R)²)
  val/clipfrac_avg           share of tokens whose value loss took the clipped branch
  val/ratio                  mean_t ρ
  val/explained_variance     1 − Var(R − V)/Var(R) over the rollout's tokens, V from before the update: 1 is a
                             value head that predicts the returns of fresh samples, 0 one no better than their
                             mean (the zero-initialised head scores exactly 0 at step 1), below 0 worse
  response/length_mean       mean response length in tokens (EOS included)
  response/eos_frac          share of responses that reached EOS
  tokens/generated           response tokens generated this step (EOS included, padding not)
  time/rollout_s, time/score_s, time/forward_s, time/update_s, time/step_s   wall-clock seconds
Sample generations go to `run_dir/ppo/samples.jsonl` at step 1 and every `sample_every` steps, each with
its raw score, score, baseline (its siblings' mean score with group_baseline, else 0), sequence KL, whether
it ended, and every monitor's reward of it (`gold`).
Checkpoints: `run_dir/ppo/checkpoints/step-N/` (adapter/, value_head.pt, optimizer.pt, trainer_state.json,
elapsed.json: the seconds spent so far, so a resumed run reports what the whole run cost).
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from .config import DEFAULT_MODEL, SetupError, check_common_fields, command
from .models import (chat_prompt, clear_sampling_defaults, default_lora_config, load_model, num_layers,
                     reference_model)
from .paths import stage_dir
from .tracking import (MetricsLogger, _jsonable, atomic_write_dir, atomic_write_json,
                       PeakMemory, StageClock, keep_rows_through, read_json, remove_dir, rise_halves,
                       run_settings, resume_free, settings_changed)


@dataclass
class PPOConfig:
    """Settings of the PPO stage. Defaults follow the N-implementation-details paper and TRL's PPOv2."""

    stage: ClassVar[str] = "ppo"

    model_name: str = DEFAULT_MODEL
    """Policy base when run_dir has no SFT model (the notebook uses run_dir/sft/model when present)."""
    dtype: str = "float32"
    """Weights dtype (the profile sets bfloat16 on GPU); the log-softmax and the value head run in float32, on
    the hidden states and logits the model computed in this dtype."""
    load_in_4bit: bool = False
    """QLoRA 4-bit base weights (CUDA only)."""
    device: str = "cpu"
    """cpu, cuda or auto."""
    lora_r: int = 16
    """LoRA rank of the policy adapter (LoRA dropout is always 0: PPO needs π_new = π_old before updates)."""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_layers: int | None = None
    """Adapt only the top N transformer blocks (None: all); fewer is cheaper on a CPU."""
    learning_rate: float = 1e-4
    """AdamW learning rate of adapter and value head (full fine-tuning uses ~1e-5; LoRA tolerates ~10x)."""
    adam_eps: float = 1e-5
    """AdamW epsilon (1e-5, not PyTorch's 1e-8, as in the PPO implementations)."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm of each update to this (0 disables)."""
    batch_size: int = 16
    """Responses per rollout (batch_size / samples_per_prompt prompts); one step = one rollout."""
    samples_per_prompt: int = 1
    """Responses sampled to each prompt of a rollout (k); batch_size must be a multiple of it."""
    group_baseline: bool = False
    """Subtract from each score the mean score of the other k − 1 responses to its prompt (RLOO's
    leave-one-out baseline; needs samples_per_prompt >= 2). The score then says how much better a response
    is than its siblings, not how easy its prompt was: most of a judge's variance lies between prompts, which
    a fresh value head cannot predict. The missing-EOS penalty is part of the score, so it is centred too (it
    cancels where all k replies were cut off). The KL penalty and the logged scores are unchanged."""
    num_mini_batches: int = 1
    """Mini-batches per PPO epoch (one optimizer step each); must divide batch_size."""
    ppo_epochs: int = 4
    """Passes over each rollout batch."""
    response_length: int = 48
    """Maximum new tokens per response; a response that has not ended by then is truncated."""
    temperature: float = 0.7
    """Sampling temperature; log π and log π_ref are computed at the same temperature."""
    init_kl_coef: float = 0.05
    """β, the per-token KL penalty coefficient (the starting value when adaptive_kl=True)."""
    adaptive_kl: bool = False
    """Adapt β towards target_kl (Ziegler et al. 2019); False keeps β fixed."""
    target_kl: float = 6.0
    """Target sequence KL (nats) of the adaptive controller."""
    horizon: int = 10000
    """Adaptive controller horizon in samples: β changes by at most ±20%·batch_size/horizon per step."""
    cliprange: float = 0.2
    """Policy clip range ε: the ratio π_new/π_old is clipped to [1−ε, 1+ε]."""
    cliprange_value: float = 0.2
    """Value clip range: new values are clipped to within this of the rollout's values."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss (the value head shares the policy's backbone)."""
    gamma: float = 1.0
    """Discount γ of GAE (1: no discounting within a response)."""
    lam: float = 0.95
    """GAE λ (bias–variance trade-off of the advantage estimate). While V is still 0, a token k places
    before the end gets λ^k of the score (0.05 at k = 60 for λ = 0.95); λ = 1 gives every token all of it."""
    missing_eos_penalty: float = 1.0
    """Subtracted from the score of a response that never reached EOS (0 disables)."""
    whiten_rewards: bool = False
    """Scale the per-token rewards to unit variance over the batch before GAE (mean kept)."""
    whiten_advantages: bool = True
    """Normalise advantages to mean 0, variance 1 over the batch's valid tokens."""
    max_steps: int = 50
    """PPO steps (rollouts) to train for."""
    save_steps: int = 10
    """Checkpoint every this many steps, and at the last step (0: never); resume() continues from there."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept; older ones are deleted."""
    sample_every: int = 5
    """Write sample generations to samples.jsonl at step 1 and every this many steps (0: never)."""
    n_samples: int = 4
    """Responses written per sampling step: the rollout's first ones (with samples_per_prompt k, the k replies
    to one prompt, then the next prompt's)."""
    seed: int = 0
    """Seed of prompt order, sampling and mini-batch shuffling (each derived from seed and step)."""
    resume: bool = True
    """Continue from the newest checkpoint in run_dir/ppo/checkpoints when there is one (False: start over)."""

    def __post_init__(self) -> None:
        checks = [
            (self.learning_rate > 0, f"learning_rate must be > 0 (LoRA: 1e-5 .. 1e-3), got {self.learning_rate}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.samples_per_prompt >= 1 and self.batch_size % self.samples_per_prompt == 0,
             f"samples_per_prompt ({self.samples_per_prompt}) must be >= 1 and divide batch_size "
             f"({self.batch_size}); change one of them"),
            (not self.group_baseline or self.samples_per_prompt >= 2,
             f"group_baseline compares the replies to one prompt, so it needs samples_per_prompt >= 2 (e.g. 4, "
             f"dividing batch_size), got {self.samples_per_prompt}; raise samples_per_prompt or set "
             f"group_baseline=False (--group-baseline false)"),
            (self.num_mini_batches >= 1 and self.batch_size % self.num_mini_batches == 0,
             f"num_mini_batches ({self.num_mini_batches}) must be >= 1 and divide batch_size "
             f"({self.batch_size}); change one of them"),
            (self.ppo_epochs >= 1, f"ppo_epochs must be >= 1, got {self.ppo_epochs}"),
            (self.response_length >= 1, f"response_length must be >= 1, got {self.response_length}"),
            (self.temperature > 0, f"temperature must be > 0: PPO needs a sampling policy (try 0.7 .. 1.0), "
                                   f"got {self.temperature}"),
            (self.init_kl_coef >= 0, f"init_kl_coef must be >= 0 (0.01 .. 0.2 is usual), got {self.init_kl_coef}"),
            (self.target_kl > 0 and self.horizon > 0,
             f"target_kl and horizon must be > 0, got {self.target_kl} and {self.horizon}"),
            (not self.adaptive_kl or self.init_kl_coef > 0,
             "adaptive_kl=True multiplies β, so init_kl_coef must be > 0"),
            (0 < self.cliprange < 1, f"cliprange must be in (0, 1); 0.1 .. 0.3 is usual, got {self.cliprange}"),
            (self.cliprange_value > 0, f"cliprange_value must be > 0, got {self.cliprange_value}"),
            (self.vf_coef >= 0, f"vf_coef must be >= 0, got {self.vf_coef}"),
            (0 <= self.gamma <= 1 and 0 <= self.lam <= 1,
             f"gamma and lam must be in [0, 1], got {self.gamma}, {self.lam}"),
            (self.missing_eos_penalty >= 0,
             f"missing_eos_penalty must be >= 0 (0 disables), got {self.missing_eos_penalty}"),
            (self.max_grad_norm >= 0, f"max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm}"),
            (self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
            (self.save_steps >= 0 and self.sample_every >= 0, "save_steps and sample_every must be >= 0 (0: never)"),
            (self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}"),
            (self.n_samples >= 0, f"n_samples must be >= 0, got {self.n_samples}"),
            (isinstance(self.seed, int) and self.seed >= 0, f"seed must be a non-negative int, got {self.seed!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"PPOConfig: {message}")
        check_common_fields(self)

    @property
    def mini_batch_size(self) -> int:
        return self.batch_size // self.num_mini_batches


# --- pure functions: (tensors) -> (value, metrics) ----------------------------------------------------

def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` over positions where `mask` is true (0 where there are none)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp_min(1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp_min(1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 − Var(returns − values) / Var(returns) over the positions where `mask` is true: the share of the
    returns' variance that the value estimates account for (NaN when the returns do not vary)."""
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    error = returns - values
    var_error = masked_mean((error - masked_mean(error, mask)) ** 2, mask)
    return 1 - var_error / var_returns if var_returns > 0 else torch.tensor(float("nan"))


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(values − mean) / std over the valid tokens (unbiased variance); padded positions become 0.
    With shift_mean=False the mean is added back: only the scale changes (reward whitening)."""
    mean = masked_mean(values, mask)
    n = mask.sum().to(values.dtype)
    var = masked_mean((values - mean) ** 2, mask) * n / (n - 1).clamp_min(1)  # Bessel's correction
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor, temperature: float,
                         with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log softmax(logits / T) at `tokens`, entropy of softmax(logits / T)): (B, T, V), (B, T) -> two (B, T),
    from one log-softmax. Use the sampling temperature for policy and reference alike, so that the ratio and
    the KL compare the distributions sampled from. The entropy carries no gradient; None when `with_entropy`
    is false (it costs two more passes over B·T·V numbers)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (B, T, V)
    logprobs = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, T)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp.exp() * logp).sum(-1)
    return logprobs, entropy


def response_mask_from_eos(response_ids: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, has_eos): mask (B, T) is true up to and including each row's first EOS (every token when
    there is none); has_eos (B,) says whether the row has one. Pad ids play no part."""
    is_eos = response_ids == eos_token_id  # (B, T)
    has_eos = is_eos.any(dim=1)  # (B,)
    first = torch.where(has_eos, is_eos.int().argmax(dim=1), response_ids.shape[1])  # argmax: first maximum
    positions = torch.arange(response_ids.shape[1], device=response_ids.device)
    return positions[None, :] <= first[:, None], has_eos


def apply_missing_eos_penalty(scores: torch.Tensor, has_eos: torch.Tensor, penalty: float) -> torch.Tensor:
    """scores − penalty where the response never reached EOS: (B,), (B,) -> (B,)."""
    return scores - penalty * (~has_eos.bool()).to(scores.dtype)


def leave_one_out_baseline(scores: torch.Tensor, k: int) -> torch.Tensor:
    """For scores (B,) of B/k prompts' k consecutive responses each: the mean score of each response's
    k − 1 siblings, (B,). scores − baseline sums to 0 within each prompt (RLOO, Ahmadian et al. 2024)."""
    if k < 2 or scores.shape[0] % k:
        raise ValueError(f"a leave-one-out baseline needs k >= 2 dividing the batch ({scores.shape[0]}), got k={k}")
    groups = scores.reshape(-1, k)  # (B/k, k)
    return ((groups.sum(dim=1, keepdim=True) - groups) / (k - 1)).reshape(-1)


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last true position of each row of a (B, T) mask -> (B,)."""
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return (mask.long() * positions).argmax(dim=1)


def per_token_rewards(score: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                      mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, kl), both (B, T): kl_t = log π − log π_ref on valid tokens (0 elsewhere);
    rewards_t = −kl_coef·kl_t, plus score (B,) on each row's last valid token."""
    maskf = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * maskf  # (B, T), the k1 estimator per token
    rewards = -kl_coef * kl  # (B, T)
    last = last_valid_index(mask)  # (B,)
    rewards = rewards.scatter_add(1, last[:, None], score.to(rewards.dtype)[:, None])
    return rewards, kl


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both (B, T), by generalised advantage estimation (Schulman et al. 2016):
    δ_t = r_t + γ·V_{t+1} − V_t,  A_t = δ_t + γλ·A_{t+1},  R_t = A_t + V_t,
    with V = 0 after each row's last valid token (the episode ends there). `mask` must be a prefix mask
    (valid tokens first, padding after), as rollouts produce; padded positions come out 0."""
    valid = mask.bool()
    if (valid[:, 1:] & ~valid[:, :-1]).any():
        raise ValueError("compute_gae needs prefix masks (valid tokens, then padding); got a gap inside a row")
    maskf = valid.to(values.dtype)
    values, rewards = values * maskf, rewards * maskf  # padding: no reward, and V = 0 past the end
    T = rewards.shape[1]
    next_adv = torch.zeros_like(values[:, 0])  # (B,)
    reversed_adv = []
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(next_adv)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = delta + gamma * lam * next_adv
        reversed_adv.append(next_adv)
    advantages = torch.stack(reversed_adv[::-1], dim=1) * maskf  # (B, T)
    return advantages, (advantages + values) * maskf


def ppo_losses(new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
               new_values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange: float, cliprange_value: float, vf_coef: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped policy loss + vf_coef · clipped value loss, token means over `mask` (all inputs (B, T)).
    Returns (loss, metrics) with TRL's names: policy/approxkl_avg, policy/clipfrac_avg, loss/policy_avg,
    loss/value_avg, val/clipfrac_avg, val/ratio."""
    valid = mask.bool()
    logratio = torch.where(valid, new_logprobs - old_logprobs, 0.0)  # (B, T); padding never overflows exp
    ratio = logratio.exp()
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * ratio.clamp(1 - cliprange, 1 + cliprange)
    pg_loss = masked_mean(torch.max(pg_losses, pg_losses_clipped), valid)
    new_values = torch.where(valid, new_values, old_values)
    values_clipped = old_values + (new_values - old_values).clamp(-cliprange_value, cliprange_value)
    vf_losses = (new_values - returns) ** 2
    vf_losses_clipped = (values_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses, vf_losses_clipped), valid)
    loss = pg_loss + vf_coef * vf_loss
    with torch.no_grad():
        metrics = {
            "policy/approxkl_avg": 0.5 * masked_mean(logratio ** 2, valid),
            "policy/clipfrac_avg": masked_mean((pg_losses_clipped > pg_losses).float(), valid),
            "loss/policy_avg": pg_loss.detach(),
            "loss/value_avg": vf_loss.detach(),
            "val/clipfrac_avg": masked_mean((vf_losses_clipped > vf_losses).float(), valid),
            "val/ratio": masked_mean(ratio.detach(), valid),
        }
    return loss, {k: float(v) for k, v in metrics.items()}


class AdaptiveKLController:
    """Ziegler et al. (2019): e = clip(KL/target − 1, −0.2, 0.2); β ← β·(1 + e·n_steps/horizon)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class FixedKLController(AdaptiveKLController):
    """β stays at its initial value."""

    def __init__(self, kl_coef: float):
        super().__init__(kl_coef, target=1.0, horizon=1)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


def make_kl_controller(cfg: PPOConfig) -> AdaptiveKLController:
    if cfg.adaptive_kl:
        return AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.horizon)
    return FixedKLController(cfg.init_kl_coef)


# --- model pieces: value head, rollouts, forward passes ----------------------------------------------

class ValueHead(nn.Module):
    """V(s_t) = w·h_t + b on the policy's last hidden states.

    Why a head on the shared backbone: on a CPU a second network (the usual choice, a value model
    initialised from the reward model) doubles memory and forward/backward compute; the head costs one
    Linear, and the value loss (weighted by vf_coef) also shapes the LoRA adapter. The weights start at
    zero, so V = 0 at first and the first advantages are λ-weighted sums of the rewards after each token
    rather than noise."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    @classmethod
    def for_model(cls, model) -> "ValueHead":
        """A zero-initialised head sized for `model`'s hidden states, on the device of its weights (a head
        left on the CPU beside a CUDA policy fails at its first forward)."""
        return cls(model.config.get_text_config().hidden_size).to(next(model.parameters()).device)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.float()).squeeze(-1)  # (B, T, H) -> (B, T)


def build_policy(cfg: PPOConfig, model_name: str | None = None):
    """(policy with a fresh LoRA adapter, tokenizer) for `model_name` (default cfg.model_name).
    LoRA dropout is 0, so the policy's log-probs are deterministic."""
    name = model_name or cfg.model_name
    lora = default_lora_config(cfg.lora_r, cfg.lora_alpha, dropout=0.0, top_layers=cfg.lora_layers,
                               n_layers=num_layers(name) if cfg.lora_layers else None, model=name)
    return load_model(name, lora=lora, dtype=cfg.dtype, load_in_4bit=cfg.load_in_4bit, device=cfg.device)


@dataclass
class Rollout:
    """A batch of sampled responses. Queries are left-padded, so every response starts at column Tq."""

    prompts: list[Any]
    query_ids: torch.Tensor  # (B, Tq) left-padded
    query_mask: torch.Tensor  # (B, Tq) 1 on real prompt tokens
    response_ids: torch.Tensor  # (B, T) pad_token_id after the first EOS
    response_mask: torch.Tensor  # (B, T) bool, true up to and including the first EOS
    has_eos: torch.Tensor  # (B,) bool
    texts: list[str]  # decoded valid response tokens, special tokens skipped

    @property
    def query_response_ids(self) -> torch.Tensor:
        return torch.cat([self.query_ids, self.response_ids], dim=1)  # (B, Tq + T)

    @property
    def attention_mask(self) -> torch.Tensor:
        # padding after EOS stays visible, as during generation; it only ever follows the tokens scored
        return torch.cat([self.query_mask, torch.ones_like(self.response_ids)], dim=1)  # (B, Tq + T)

    @property
    def response_start(self) -> int:
        return self.query_ids.shape[1]


def generation_config(cfg: PPOConfig, tokenizer):
    """Pure sampling at cfg.temperature (top-k and top-p off, no other processors), so the sampled
    distribution is exactly the softmax(logits / T) that `logprobs_and_entropy` scores. That holds only
    where the model's own generation_config sets nothing more: `rollout` clears it first."""
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0,
                            max_new_tokens=cfg.response_length, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, use_cache=True)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """Seed torch inside the block only; the global RNG state is restored afterwards."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def rollout(policy, tokenizer, prompts: Sequence[Any], cfg: PPOConfig, seed: int) -> Rollout:
    """Sample one response per prompt: chat-formatted, left-padded, batched `generate` with the KV cache.

    The policy's generation_config is cleared of sampling settings first (`models.clear_sampling_defaults`),
    since `generate` would otherwise apply a checkpoint's repetition penalty or top-k on top of ours."""
    clear_sampling_defaults(policy)
    device = next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    tokenizer.padding_side = "left"
    enc = tokenizer([chat_prompt(tokenizer, p) for p in prompts], return_tensors="pt", padding=True,
                    add_special_tokens=False)
    query_ids, query_mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)  # (B, Tq)
    with _seeded(seed, device):
        out = policy.generate(input_ids=query_ids, attention_mask=query_mask,
                              generation_config=generation_config(cfg, tokenizer))  # (B, Tq + T)
    if was_training:
        policy.train()
    response = out[:, query_ids.shape[1]:]  # (B, T)
    mask, has_eos = response_mask_from_eos(response, tokenizer.eos_token_id)
    response = torch.where(mask, response, tokenizer.pad_token_id)
    lengths = mask.sum(dim=1).tolist()
    texts = tokenizer.batch_decode([row[:n].tolist() for row, n in zip(response, lengths)], skip_special_tokens=True)
    return Rollout(list(prompts), query_ids, query_mask, response, mask, has_eos, [t.strip() for t in texts])


def forward_logprobs_values(model, value_head: ValueHead | None, query_response_ids: torch.Tensor,
                            attention_mask: torch.Tensor, response_start: int, temperature: float,
                            with_entropy: bool = True):
    """(logprobs, values, entropy), each (B, T) over the response columns `response_start:`.
    logprobs at `temperature`; values from `value_head` on the last hidden states (None without a head);
    entropy of the full distribution (no gradient; None when `with_entropy` is false: see
    `logprobs_and_entropy`). Position ids count real tokens only, as `generate` does with left
    padding."""
    T = query_response_ids.shape[1] - response_start
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)  # (B, Tq + T)
    out = model(input_ids=query_response_ids, attention_mask=attention_mask, position_ids=position_ids,
                output_hidden_states=value_head is not None, logits_to_keep=T + 1, use_cache=False)
    logits = out.logits[:, -(T + 1):-1]  # (B, T, V): the position before each response token predicts it
    tokens = query_response_ids[:, response_start:]  # (B, T)
    logprobs, entropy = logprobs_and_entropy(logits, tokens, temperature, with_entropy)
    values = None
    if value_head is not None:
        values = value_head(out.hidden_states[-1][:, response_start - 1:-1])  # (B, T): V before each token
    return logprobs, values, entropy


@contextlib.contextmanager
def checkpointing_in_eval_mode(model):
    """Let `model`'s layers with gradient checkpointing switched on checkpoint while the model stays in eval
    mode. transformers checkpoints a layer only when the layer's own `training` flag is set; this sets that
    flag on those layers alone (not on their sub-modules, where dropout lives) and clears it afterwards. A
    model without gradient checkpointing is left as it is."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing
              and not m.training]
    for layer in layers:
        layer.training = True
    try:
        yield
    finally:
        for layer in layers:
            layer.training = False


@dataclass
class Experience:
    """Everything one rollout yields before the updates (steps 1–5 of the module docstring), each (B, T)
    over the response columns unless noted."""

    rollout: Rollout
    raw_scores: torch.Tensor  # (B,) reward_fn's scores
    scores: torch.Tensor  # (B,) after the missing-EOS penalty
    baselines: torch.Tensor  # (B,) subtracted from the scores before they enter the rewards (0 without one)
    logprobs: torch.Tensor  # log π_old at the sampling temperature
    ref_logprobs: torch.Tensor  # log π_ref, the adapter disabled
    values: torch.Tensor  # V(s_t) from the value head
    kl: torch.Tensor  # log π_old − log π_ref on response tokens, 0 elsewhere
    rewards: torch.Tensor  # −β·kl_t, plus the score (minus its baseline) on the last real token
    advantages: torch.Tensor  # GAE, whitened when cfg.whiten_advantages
    returns: torch.Tensor  # advantages (before whitening) + values: the value targets
    watched: dict[str, torch.Tensor]  # (B,) per monitor name: its reward of each reply (logged, never optimised)
    timings: dict[str, float]  # time/rollout_s, time/score_s, time/forward_s

    def token_table(self, i: int, tokenizer) -> dict[str, list]:
        """Reply `i` token by token, over its real tokens only: the token, log π, log π_ref, the per-token
        reward, V and the advantage, as plain Python lists (wherever the tensors live), ready for a DataFrame."""
        n = int(self.rollout.response_mask[i].sum())
        columns = {"log π": self.logprobs, "log π_ref": self.ref_logprobs, "reward": self.rewards,
                   "value": self.values, "advantage": self.advantages}
        return {"token": tokenizer.convert_ids_to_tokens(self.rollout.response_ids[i, :n].tolist()),
                **{name: t[i, :n].float().cpu().tolist() for name, t in columns.items()}}


def make_experience(policy, value_head: ValueHead, tokenizer, reward_fn, prompts: Sequence[Any], cfg: PPOConfig,
                    kl_coef: float, seed: int, monitors: dict[str, Callable] | None = None,
                    chunk: int | None = None) -> Experience:
    """Rollout, score, forward passes (policy, value, reference), per-token rewards and GAE: all that PPO
    computes from one batch of prompts before it updates anything."""
    t0 = time.perf_counter()
    ro = rollout(policy, tokenizer, prompts, cfg, seed=seed)
    t1 = time.perf_counter()
    device = ro.response_ids.device
    raw = torch.as_tensor(reward_fn(prompts, ro.texts), dtype=torch.float32).to(device).reshape(-1)
    if raw.shape != (len(prompts),):
        raise ValueError(f"reward_fn returned {tuple(raw.shape)} scores for {len(prompts)} responses")
    scores = apply_missing_eos_penalty(raw, ro.has_eos, cfg.missing_eos_penalty)  # (B,)
    watched = {name: torch.as_tensor(fn(prompts, ro.texts), dtype=torch.float32).reshape(-1)
               for name, fn in (monitors or {}).items()}
    t2 = time.perf_counter()
    chunk = chunk or cfg.mini_batch_size
    logprobs, values = chunked_forward(policy, value_head, ro, cfg.temperature, chunk)
    with reference_model(policy):
        ref_logprobs, _ = chunked_forward(policy, None, ro, cfg.temperature, chunk)
    mask = ro.response_mask  # (B, T)
    if cfg.group_baseline:
        k = cfg.samples_per_prompt
        if any(prompts[i] != prompts[i - i % k] for i in range(len(prompts))):
            raise ValueError(f"group_baseline needs each prompt {k} times in a row (samples_per_prompt={k}), as "
                             f"PPOTrainer.prompts_for gives them; these prompts are not in runs of {k}")
        baselines = leave_one_out_baseline(scores, k)
    else:
        baselines = torch.zeros_like(scores)
    rewards, kl = per_token_rewards(scores - baselines, logprobs, ref_logprobs, mask, kl_coef)  # (B, T)
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = compute_gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    timings = {"time/rollout_s": t1 - t0, "time/score_s": t2 - t1, "time/forward_s": time.perf_counter() - t2}
    return Experience(ro, raw, scores, baselines, logprobs, ref_logprobs, values, kl, rewards, advantages, returns,
                      watched, timings)


@torch.no_grad()
def chunked_forward(model, value_head: ValueHead | None, ro: Rollout, temperature: float, chunk: int):
    """log-probs (and values) of a whole rollout in chunks of `chunk` sequences, without gradients."""
    logprobs, values = [], []
    qr, am = ro.query_response_ids, ro.attention_mask
    for s in range(0, qr.shape[0], chunk):
        lp, v, _ = forward_logprobs_values(model, value_head, qr[s:s + chunk], am[s:s + chunk], ro.response_start,
                                           temperature, with_entropy=False)
        logprobs.append(lp)
        values.append(v)
    return torch.cat(logprobs), (torch.cat(values) if value_head is not None else None)


# --- the trainer ---------------------------------------------------------------------------------------

class PPOTrainer:
    """PPO on `policy` (a peft model with a LoRA adapter) against `reward_fn(prompts, responses) -> (B,)`.

    >>> trainer = PPOTrainer(policy, tok, as_ppo_reward(reward), cfg, run_dir, prompts)
    >>> trainer.add_step_callback(lambda step, metrics: print(step, metrics["objective/scores"]))
    >>> trainer.resume()          # optional: continue from run_dir/ppo/checkpoints
    >>> summary = trainer.train()

    `monitors` maps a name to another reward function that is logged, never optimised: `{"gold": judge}`
    logs `objective/gold`, the mean gold reward of each rollout, beside the proxy's `objective/scores`.

    `tokenizer` needs `eos_token_id`, `pad_token_id` (a different token), `apply_chat_template`,
    `__call__` (left padding) and `batch_decode`. Prompts are user messages (or message lists); each step
    takes the next batch_size / samples_per_prompt of them, each samples_per_prompt times, reshuffled every
    pass (seeded).
    """

    def __init__(self, policy, tokenizer, reward_fn: Callable[[Sequence[Any], Sequence[str]], Any],
                 cfg: PPOConfig, run_dir: str | os.PathLike, prompts: Sequence[Any],
                 monitors: dict[str, Callable[[Sequence[Any], Sequence[str]], Any]] | None = None,
                 clock: StageClock | None = None):
        if not hasattr(policy, "disable_adapter"):
            raise TypeError("PPOTrainer needs a peft model with a LoRA adapter (build_policy(cfg) or "
                            "attach_lora(model)): the reference is the policy with its adapter disabled")
        if not prompts:
            raise ValueError("PPOTrainer needs at least one prompt")
        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
            raise SetupError(f"PPO needs a pad token apart from the end of a reply, and this tokenizer's pad id is "
                             f"{tokenizer.pad_token_id} (eos {tokenizer.eos_token_id}): load it with "
                             f"models.load_tokenizer, which picks one where the vocabulary has one, or set "
                             f"tokenizer.pad_token to an unused special token")
        self.policy, self.tokenizer, self.reward_fn, self.cfg = policy, tokenizer, reward_fn, cfg
        self.prompts = list(prompts)
        self.monitors = dict(monitors or {})
        self.device = next(policy.parameters()).device
        self.policy.eval()  # dropout off for good: π_new = π_old on the first mini-batch
        self.value_head = ValueHead.for_model(policy)
        self.params = [p for p in policy.parameters() if p.requires_grad] + list(self.value_head.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate, eps=cfg.adam_eps, weight_decay=0.0)
        self.kl_ctl = make_kl_controller(cfg)
        self.out = stage_dir(run_dir, "ppo")
        self.logger = MetricsLogger(self.out, resume=True)
        self.settings: dict[str, Any] = run_settings(cfg)  # config.json; train_ppo adds its inputs' fingerprints
        self.samples_path = self.out / "samples.jsonl"
        self.step_count = 0
        self.resumed_from: str | None = None
        self.clock = clock or StageClock()  # its total goes into every checkpoint, and comes back on resume
        self.minibatch_stats: list[dict[str, float]] = []  # of the last step, in update order
        self.last_rollout: Rollout | None = None  # the last step's sampled replies (the benchmark compares them)
        self._callbacks: list[Callable[[int, dict], None]] = []

    def add_step_callback(self, fn: Callable[[int, dict], None]) -> None:
        """Call `fn(step, metrics)` after every step (live plots, early stopping flags, printing)."""
        self._callbacks.append(fn)

    # seeds are functions of (seed, step), so a resumed run draws what the uninterrupted one would have
    def _seed(self, step: int) -> int:
        return self.cfg.seed * 1_000_003 + step

    def prompts_for(self, step: int) -> list[Any]:
        """The `batch_size` prompts that step `step` (from 1) samples: the next batch_size / k of a seeded
        shuffle, reshuffled every pass over the prompts, each repeated k = samples_per_prompt times in a row."""
        n, k = len(self.prompts), self.cfg.samples_per_prompt
        b = self.cfg.batch_size // k
        chosen = []
        for pos in range((step - 1) * b, step * b):
            epoch, i = divmod(pos, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed * 7919 + epoch))
            chosen.extend([self.prompts[int(perm[i])]] * k)
        return chosen

    def step(self) -> dict[str, float]:
        """One rollout, its scores, and `ppo_epochs` × `num_mini_batches` clipped updates; logs one row."""
        cfg, step = self.cfg, self.step_count + 1
        prompts = self.prompts_for(step)
        t0 = time.perf_counter()
        kl_coef = self.kl_ctl.value
        exp = make_experience(self.policy, self.value_head, self.tokenizer, self.reward_fn, prompts, cfg, kl_coef,
                              seed=self._seed(step), monitors=self.monitors)
        t3 = time.perf_counter()
        self.last_rollout = exp.rollout
        with checkpointing_in_eval_mode(self.policy):
            update = self._update(exp.rollout, exp.logprobs, exp.values, exp.advantages, exp.returns, step)
        t4 = time.perf_counter()
        mask, seq_kl = exp.rollout.response_mask, exp.kl.sum(dim=1)  # (B, T), (B,)
        self.kl_ctl.update(float(seq_kl.mean()), cfg.batch_size)
        metrics = {
            "objective/kl": seq_kl.mean(), "objective/kl_coef": kl_coef, "objective/scores": exp.scores.mean(),
            "objective/raw_scores": exp.raw_scores.mean(), "objective/non_score_reward": (-kl_coef * seq_kl).mean(),
            "objective/rlhf_reward": exp.scores.mean() - kl_coef * seq_kl.mean(),
            "objective/entropy": (-exp.logprobs * mask).sum(dim=1).mean(),
            **{f"objective/{name}": each.mean() for name, each in exp.watched.items()}, **update,
            "val/explained_variance": explained_variance(exp.values, exp.returns, mask),
            "response/length_mean": mask.sum(dim=1).float().mean(),
            "response/eos_frac": exp.rollout.has_eos.float().mean(), "tokens/generated": int(mask.sum()),
            **exp.timings, "time/update_s": t4 - t3, "time/step_s": time.perf_counter() - t0,
        }
        metrics = {k: float(v) if torch.is_tensor(v) else v for k, v in metrics.items()}
        self.step_count = step
        self.logger.log(step, **metrics)
        if cfg.sample_every and cfg.n_samples and (step == 1 or step % cfg.sample_every == 0):
            self._write_samples(step, exp, seq_kl)
        for fn in self._callbacks:
            fn(step, metrics)
        return metrics

    def _update(self, ro: Rollout, old_logprobs, old_values, advantages, returns, step: int) -> dict[str, float]:
        cfg, mask = self.cfg, ro.response_mask
        qr, am = ro.query_response_ids, ro.attention_mask
        gen = torch.Generator().manual_seed(self._seed(step))
        self.minibatch_stats = []
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(cfg.batch_size, generator=gen).to(self.device)
            for s in range(0, cfg.batch_size, cfg.mini_batch_size):
                idx = order[s:s + cfg.mini_batch_size]
                new_logprobs, new_values, entropy = forward_logprobs_values(
                    self.policy, self.value_head, qr[idx], am[idx], ro.response_start, cfg.temperature)
                loss, stats = ppo_losses(new_logprobs, old_logprobs[idx], advantages[idx], new_values,
                                         old_values[idx], returns[idx], mask[idx], cfg.cliprange,
                                         cfg.cliprange_value, cfg.vf_coef)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
                self.optimizer.step()
                stats["policy/entropy_avg"] = float(masked_mean(entropy, mask[idx]))
                self.minibatch_stats.append(stats)
        return {k: sum(s[k] for s in self.minibatch_stats) / len(self.minibatch_stats) for k in self.minibatch_stats[0]}

    def _write_samples(self, step: int, exp: Experience, seq_kl) -> None:
        ro = exp.rollout
        with open(self.samples_path, "a", encoding="utf-8") as f:
            for i in range(min(self.cfg.n_samples, len(ro.texts))):
                row = {"step": step, "prompt": ro.prompts[i], "response": ro.texts[i],
                       "raw_score": exp.raw_scores[i], "score": exp.scores[i], "baseline": exp.baselines[i],
                       "kl": seq_kl[i],
                       "has_eos": bool(ro.has_eos[i]), **{name: each[i] for name, each in exp.watched.items()}}
                f.write(json.dumps(_jsonable(row)) + "\n")

    def _drop_after(self, step: int) -> None:
        """Forget what an earlier run did after `step`: metrics rows, samples and checkpoints."""
        self.logger.truncate_after(step)
        keep_rows_through(self.samples_path, step)
        for s, path in list_checkpoints(self.out):
            if s > step:
                remove_dir(path)

    # --- checkpoints ---------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write checkpoints/step-N/ whole (a temp folder renamed into place); keep the newest few."""
        def write(tmp: Path) -> None:
            self.policy.save_pretrained(tmp / "adapter")
            torch.save(self.value_head.state_dict(), tmp / "value_head.pt")
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            atomic_write_json(tmp / "trainer_state.json", {"step": self.step_count,
                                                           "kl_controller": self.kl_ctl.state_dict()})
            self.clock.stamp(tmp)

        target = atomic_write_dir(self.out / "checkpoints" / f"step-{self.step_count}", write)
        for _, old in list_checkpoints(self.out)[:-self.cfg.keep_checkpoints]:
            remove_dir(old)
        return target

    def resume(self, max_steps: int | None = None) -> int:
        """Load the newest checkpoint at or before `max_steps` (default cfg.max_steps): adapter, value head,
        optimizer, KL controller, step; drop the metrics rows, samples and checkpoints of later steps (a longer
        run before, now cut shorter, must not hand back a policy trained longer than asked). Returns the step
        reached (0 when there is none)."""
        from peft import set_peft_model_state_dict
        from peft.utils import load_peft_weights

        max_steps = max_steps or self.cfg.max_steps
        every = list_checkpoints(self.out)
        found = [(s, path) for s, path in every if s <= max_steps]
        if len(found) < len(every):
            print(f"Checkpoints in {self.out / 'checkpoints'} past max_steps={max_steps} (a longer run before) are "
                  "removed; resuming from an earlier one.")
        if not found:
            self._drop_after(0)
            print(f"No checkpoint in {self.out / 'checkpoints'}: starting at step 0.")
            return 0
        step, path = found[-1]
        weights = load_peft_weights(str(path / "adapter"), device=str(self.device))
        result = set_peft_model_state_dict(self.policy, weights)
        if result.unexpected_keys:
            raise RuntimeError(f"{path}/adapter does not fit this policy: unexpected {result.unexpected_keys[:3]}")
        load = dict(map_location=self.device, weights_only=True)
        self.value_head.load_state_dict(torch.load(path / "value_head.pt", **load))
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", **load))
        state = read_json(path / "trainer_state.json")
        self.kl_ctl.load_state_dict(state["kl_controller"])
        self.step_count, self.resumed_from = int(state["step"]), str(path)
        self.clock.resumed(path)
        self._drop_after(self.step_count)
        print(f"Resumed from {path} (step {self.step_count}).")
        return self.step_count

    def save_policy(self, folder: str | os.PathLike) -> Path:
        """The adapter (+ tokenizer when it can save) and value head, moved into `folder` whole."""
        def write(tmp: Path) -> None:
            self.policy.save_pretrained(tmp)
            if hasattr(self.tokenizer, "save_pretrained"):
                self.tokenizer.save_pretrained(tmp)
            torch.save(self.value_head.state_dict(), tmp / "value_head.pt")

        return atomic_write_dir(Path(folder), write)

    def train(self, max_steps: int | None = None) -> dict[str, Any]:
        """Step until `max_steps` (default cfg.max_steps), checkpointing every save_steps and at the end;
        save `adapter/` and write `summary.json`. Anything an earlier run logged after the current step
        (0, or where resume() left off) is dropped first."""
        max_steps = max_steps or self.cfg.max_steps
        self._drop_after(self.step_count)
        self.logger.save_config(self.settings)
        t0 = time.perf_counter()
        while self.step_count < max_steps:
            self.step()
            if self.cfg.save_steps and (self.step_count % self.cfg.save_steps == 0 or self.step_count == max_steps):
                self.save_checkpoint()
        adapter = self.save_policy(self.out / "adapter")
        rows = [r for r in self.logger.rows if "objective/scores" in r]
        first, last = (rows[0], rows[-1]) if rows else ({}, {})
        summary = {
            "steps": self.step_count, "resumed_from": self.resumed_from,
            # the whole run's cost, every session's (None when a resumed checkpoint did not record it), and
            # this session's training loop alone
            **self.clock.facts(), "train_wall_time_s": time.perf_counter() - t0,
            "scores_first": first.get("objective/scores"), "scores_last": last.get("objective/scores"),
            "gold_first": first.get("objective/gold"), "gold_last": last.get("objective/gold"),
            "rlhf_reward_first": first.get("objective/rlhf_reward"),
            "rlhf_reward_last": last.get("objective/rlhf_reward"),
            "kl_last": last.get("objective/kl"), "kl_coef_last": last.get("objective/kl_coef"),
            "eos_frac_last": last.get("response/eos_frac"), "length_mean_last": last.get("response/length_mean"),
            "tokens_generated": sum(r.get("tokens/generated", 0) for r in rows), "adapter_dir": str(adapter),
            **rise_halves(rows),
        }
        self.logger.summary(summary)
        return summary


def list_checkpoints(stage_folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of every finished checkpoint under `stage_folder/checkpoints`, oldest first."""
    folder = Path(stage_folder) / "checkpoints"
    found = []
    for path in folder.glob("step-*") if folder.is_dir() else []:
        suffix = path.name[len("step-"):]
        if suffix.isdigit() and (path / "trainer_state.json").exists():
            found.append((int(suffix), path))
    return sorted(found)


def as_tensor_reward(reward: Any) -> Callable[[Sequence[Any], Sequence[str]], torch.Tensor]:
    """A RewardFunction as PPO's `reward_fn(prompts, responses) -> (B,)`; other callables pass through."""
    from .rewards import RewardFunction, as_ppo_reward

    return as_ppo_reward(reward) if isinstance(reward, RewardFunction) else reward


def train_ppo(cfg: PPOConfig, run_dir: str | os.PathLike, policy_path: str, reward: Any, prompts: Sequence[Any], *,
              gold: Any = None, on_row: Callable[[dict], None] | None = None,
              callbacks: Sequence[Callable[[int, dict], None]] = ()) -> dict[str, Any]:
    """The PPO stage end to end: a fresh LoRA policy on `policy_path` (the SFT model), trained against
    `reward` (a RewardFunction, e.g. the normalised reward model, or a callable (prompts, responses) -> (B,)),
    resuming from the newest checkpoint when cfg.resume (unless it was made with other settings, prompts,
    SFT model or reward: config.json records their fingerprints); `gold` (a
    RewardFunction) is logged as `objective/gold` but never optimised. `on_row(row)` gets every metrics row
    (live curves). Returns the summary (also in run_dir/ppo/summary.json); the adapter is saved to
    run_dir/ppo/adapter."""
    from .rewards import reward_identity
    from .seeding import seed_everything

    memory = PeakMemory(cfg.device).start()
    clock = StageClock(memory=memory)
    seed_everything(cfg.seed)
    reward_fn = as_tensor_reward(reward)
    monitors = {"gold": as_tensor_reward(gold)} if gold is not None else {}
    policy, tok = build_policy(cfg, policy_path)
    trainer = PPOTrainer(policy, tok, reward_fn, cfg, run_dir, prompts, monitors=monitors, clock=clock)
    if on_row is not None:
        trainer.add_step_callback(lambda step, metrics: on_row({"step": step, **metrics}))
    for fn in callbacks:
        trainer.add_step_callback(fn)
    trainer.settings = run_settings(cfg, trainer.prompts, inputs={"policy": policy_path,
                                                                  "reward": reward_identity(reward)})
    if cfg.resume and not settings_changed(trainer.out, trainer.settings, resume_free(cfg)):
        trainer.resume()
        for row in trainer.logger.rows if on_row is not None else ():
            on_row(row)  # the steps done before: live curves start from step 1, not where this session does
    else:
        remove_dir(trainer.out / "checkpoints")
    summary = trainer.train()
    summary = {**summary, **clock.facts(),
               "policy_path": policy_path, "n_prompts": len(trainer.prompts),
               "samples_seen": trainer.step_count * cfg.batch_size}
    trainer.logger.summary(summary)
    return summary


def print_step(step: int, metrics: dict) -> None:
    """A step callback for shells: one line per step with its score, gold (when watched), KL and time."""
    gold = metrics.get("objective/gold", float("nan"))
    print(f"step {step}: score {metrics['objective/scores']:.3f} gold {gold:.3f} kl {metrics['objective/kl']:.3f} "
          f"({metrics['time/step_s']:.1f} s)", flush=True)


@command
def main(argv: Sequence[str] | None = None) -> int:
    """`python -m rlhf_helpers.ppo --run-dir R [--profile cpu] [--reward rm|gold] [--max-steps N] ...`:
    notebook 04's training, from a shell (or under `accelerate launch` on one process per machine)."""
    import argparse

    from .config import add_stage_arguments, stage_config_from_args
    from .data import train_prompts
    from .gold import GoldJudge
    from .online_rl import run_reward
    from .reward_model import load_run_reward_model
    from .sft import sft_policy_path

    parser = argparse.ArgumentParser(prog="python -m rlhf_helpers.ppo", description="PPO stage (notebook 04)")
    parser.add_argument("--reward", choices=("rm", "gold"), default=None,
                        help="rm: the reward model of run_dir/rm (an error when there is none); gold: the gold "
                             "judge; default: the reward model, or the gold judge with a note when there is none "
                             "(as notebook 04 does)")
    add_stage_arguments(parser, PPOConfig)
    args = vars(parser.parse_args(argv))
    which = args.pop("reward")
    run_dir, cfg = stage_config_from_args(parser, PPOConfig, args)
    policy_path, _ = sft_policy_path(run_dir, cfg.model_name)
    gold = GoldJudge()
    if which == "gold":
        reward = gold
    elif which == "rm":  # asked for by name: no quiet fallback to gold
        reward = load_run_reward_model(run_dir, cfg.dtype, cfg.device)
        if reward is None:
            raise SetupError(f"--reward rm, but {stage_dir(run_dir, 'rm')} holds no saved reward model: run "
                             f"notebook 03 (or python -m rlhf_helpers.reward_model --run-dir {run_dir}) first, or "
                             f"pass --reward gold to optimise the gold judge itself")
    else:  # as notebook 04: the reward model, or gold with a note
        reward = run_reward(run_dir, cfg.dtype, cfg.device)[0]
    summary = train_ppo(cfg, run_dir, policy_path, reward, train_prompts(), gold=gold, callbacks=[print_step])
    print({k: summary[k] for k in ("steps", "scores_last", "gold_last", "kl_last", "wall_time_s")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
