# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · PPO against the reward model
#
# The classic RLHF step: the SFT policy writes answers, the reward model of notebook 03 scores them, and
# Proximal Policy Optimization nudges the policy towards higher scores while a KL penalty keeps it close to
# the SFT model. TRL no longer ships a PPO trainer, so ours lives in `rlhf_helpers/ppo.py`, short enough to
# read in one sitting. This notebook walks through one PPO step piece by piece, with the code beside each
# piece, then trains and watches for the reward model being fooled.
#
# **What you will learn**
# 1. What one PPO step computes: rollout, score, per-token KL penalty, values, GAE advantages, the
#    clipped policy and value losses.
# 2. Which curves to watch (score, KL, clip fraction, entropy, length) and what healthy looks like.
# 3. How to catch reward hacking as it happens: the gold reward beside the proxy, step by step.

# %% tags=["parameters"]
run_dir: str = "runs/dev"  # where this run's artifacts go; this notebook writes run_dir/ppo/
profile: str = "cpu"  # smoke | cpu | gpu: steps, batch size, response length
seed: int = 0  # seed for prompt order, sampling and mini-batches
model_name: str = ""  # policy base when run_dir has no SFT model; empty keeps the profile's
reward: str = "rm"  # rm (the reward model of notebook 03; the gold judge when it is missing) or gold
max_steps: int = 0  # PPO steps; 0 keeps the profile's value
kl_coef: float = -1.0  # the KL coefficient beta; a negative value keeps the profile's; 0 also stops adapting it

# %% [markdown]
# ## Setup
# The policy starts from the SFT model of notebook 02 (the base model when there is none), with a fresh LoRA adapter;
# the reference is the same model with the adapter switched off. `lora_layers` puts the adapter on the top blocks only
# (all of them when it is None): the backward pass stops at the lowest one. The reward is the trained reward model of
# notebook 03, normalised so that SFT answers to held-out prompts, sampled at `fresh_temperature` (1.0), score mean 0
# and standard deviation 1; PPO samples at 0.7, where SFT's answers score near, not exactly at, 0 and 1 (section 2
# prints this run's mean). The cell prints which reward this run uses.

# %%
import time

import pandas as pd
import torch
from IPython.display import Markdown, display

from rlhf_helpers import plotting, ppo
from rlhf_helpers.config import stage_config
from rlhf_helpers.data import train_prompts
from rlhf_helpers.evaluate import (EvalConfig, evaluate_stage, gold_proxy_over_training, paired_win_rate,
                                   ppo_reading, widest_disagreements)
from rlhf_helpers.gold import GoldJudge
from rlhf_helpers.online_rl import run_reward
from rlhf_helpers.paths import stage_dir
from rlhf_helpers.rewards import as_ppo_reward
from rlhf_helpers.sft import sft_policy_path
from rlhf_helpers.tracking import MetricsLogger, read_json, read_metrics

t0 = time.perf_counter()
cfg = stage_config(ppo.PPOConfig, profile, seed=seed, model_name=model_name or None, max_steps=max_steps or None,
                   init_kl_coef=kl_coef if kl_coef >= 0 else None, adaptive_kl=False if kl_coef == 0 else None)
eval_cfg = stage_config(EvalConfig, profile, seed=seed, model_name=model_name or None)
policy_path, fell_back = sft_policy_path(run_dir, cfg.model_name)
gold = GoldJudge()
reward_fn, reward_name = run_reward(run_dir, cfg.dtype, cfg.device) if reward == "rm" else (gold, "gold_judge")
prompts = train_prompts()
out_dir = stage_dir(run_dir, "ppo")
print(f"policy: {policy_path}; reward: {reward_name}")
cfg

# %% [markdown]
# ## 1. One PPO step, piece by piece
# ### Rollout
# Sample `samples_per_prompt` answers to each prompt (here 4 answers in all, as a training step would draw
# them) with the KV cache, prompts left-padded so every answer starts in the same column. Sampling is pure
# temperature sampling (no top-k, no top-p), so the probabilities we compute later are exactly those the
# sampler used. A checkpoint can ship its own sampling settings in `generation_config.json` (Qwen2.5-Instruct's
# has a repetition penalty of 1.1, top-k 20 and top-p 0.8), and `generate` applies whatever a call leaves unset
# from there: the rollout clears them first (`models.clear_sampling_defaults`), or the answers would come from
# a distribution PPO never scores. Everything after an answer's first end-of-turn token is padding, and
# the mask comes from the position of that token, never from comparing ids with the pad id.
#
# Each answer then gets its score: `raw score` is the reward model's, and `score` is what PPO optimises,
# the raw score minus `missing_eos_penalty` when the answer never ended within `response_length` tokens.
# Mind how much of the signal that penalty is: SFT answers often run past the limit, and a penalty of one
# standard deviation of the reward model (`PPOConfig`'s default; the cpu profile takes half of one)
# outweighs most of what the model says about the content.
#
# With `group_baseline` (the cpu profile sets it, with 4 answers a prompt), `baseline` is the mean score of
# an answer's siblings, the other answers to the same prompt (RLOO's leave-one-out baseline), and PPO puts
# `score − baseline` on the last token instead of the score: how much better this answer is than the
# others to its prompt. Most of a batch's spread in score lies between prompts (some are easy to answer
# well), and that part says nothing about which way to move the answer; the baseline removes it. It
# removes the missing-EOS penalty too wherever all four answers ran long. Without the option the baseline
# is 0.

# %%
policy, tok = ppo.build_policy(cfg, policy_path)
value_head = ppo.ValueHead.for_model(policy)
k = cfg.samples_per_prompt  # each prompt k times in a row, as PPOTrainer.prompts_for gives them
demo_prompts = [p for p in prompts[:max(1, 4 // k)] for _ in range(k)]
exp = ppo.make_experience(policy, value_head, tok, ppo.as_tensor_reward(reward_fn), demo_prompts, cfg,
                          cfg.init_kl_coef, seed=seed, monitors={"gold": as_ppo_reward(gold)})
pd.DataFrame({"prompt": exp.rollout.prompts, "response": exp.rollout.texts,
              "tokens": exp.rollout.response_mask.sum(1).tolist(), "ended": exp.rollout.has_eos.tolist(),
              "raw score": exp.raw_scores.tolist(), "score": exp.scores.tolist(),
              "baseline": exp.baselines.tolist(), "score − baseline": (exp.scores - exp.baselines).tolist()}).round(3)

# %% [markdown]
# ### Rewards per token
# The reward model scores a whole answer, but PPO learns per token. Every token gets $-\beta\,(\log\pi -
# \log\pi_{ref})$, the KL penalty that keeps the policy near the SFT model, and the last real token also
# gets the score (less the baseline, with `group_baseline`). The log-ratio of the sampled token is the
# simplest KL estimator (k1 in Schulman's note on KL estimators): its mean over samples from $\pi$ is the
# KL, but one token's term is negative wherever $\pi$ gives that token less probability than $\pi_{ref}$
# does. An answer that never ended loses `missing_eos_penalty` first (subtracted, as TRL's PPO trainer did;
# OpenAI's original `lm-human-preferences` code replaced such a score with a fixed −1). The adapter starts
# at zero, so at this point $\pi = \pi_{ref}$ and every KL term is exactly 0.
#
# Both log-probabilities come from the logits divided by the sampling temperature, the distribution the
# answer was actually drawn from. Computed at temperature 1 instead, $\log\pi$ would not be the sampler's:
# the policy gradient would be taken for a policy other than the one that drew the answers, and the KL
# would compare other distributions than the sampled ones. (In trainers that take $\log\pi_{old}$ from the
# sampler's own logits, as TRL's last PPO trainer did, a mismatch also shows as a first ratio other than 1;
# here both come from the same forward pass, so it would not.)

# %%
display(plotting.show_source(ppo.per_token_rewards))
per_token = pd.DataFrame(exp.token_table(0, tok))
per_token.tail(6).round(4).replace(-0.0, 0.0)  # no "-0.0"

# %% [markdown]
# ### Advantages: GAE
# The value head (one linear layer on the policy's last hidden state: a shared backbone, half the cost of
# a separate value model on a CPU) predicts the return from each token on. Generalised advantage estimation
# blends one-step errors $\delta_t = r_t + \gamma V_{t+1} - V_t$ with weights $(\gamma\lambda)^k$:
# $A_t = \sum_k (\gamma\lambda)^k \delta_{t+k}$. $\lambda = 1$ gives the return minus the value (no bias,
# most variance); smaller $\lambda$ leans on the value head for what comes later. The `advantage` column
# above is $A_t$, whitened over the batch (mean 0, variance 1). Whitening subtracts the batch's mean, so a
# token whose raw advantage is about 0 (early in an answer, while $\lambda^k$ is small) ends up with minus
# that mean over the standard deviation: the same small push for every such token of the batch, whatever
# its own answer scored.
#
# Mind what $\lambda < 1$ does while the value head knows nothing yet. It starts at zero, so
# $\delta_t = r_t$, and the score on the last token reaches a token $k$ places before the end scaled by
# $\lambda^k$. At $\lambda = 0.95$ a token 60 places from the end gets 5% of it: the opening of an answer,
# where its plan and its length are decided, hears almost nothing of the score until the value head has
# learned to carry it back. (The "N implementation details" study, Huang et al.'s *The N Implementation Details
# of RLHF with PPO* (ICLR 2024 blog track), which reproduces OpenAI's original RLHF code, starts the value model
# from the reward model, so its values mean something from the first step.) The curve below is that share, from
# `compute_gae` itself; the closing notes below say what $\lambda = 1$ changed in separate runs from the cpu
# run's SFT model. The cpu profile takes $\lambda = 1$, so that the score reaches every token of an answer
# from the first step; `PPOConfig`'s default is the "N implementation details" study's 0.95.

# %%
display(plotting.show_source(ppo.compute_gae))
T = cfg.response_length
score_only = torch.zeros(1, T)
score_only[0, -1] = 1.0  # a score of 1 on the last token, no KL terms
no_values, whole = torch.zeros(1, T), torch.ones(1, T, dtype=torch.bool)
reach = {f"λ = {lam:g}": ppo.compute_gae(score_only, no_values, whole, cfg.gamma, lam)[0][0]
         for lam in sorted({cfg.lam, 0.95, 1.0})}
plotting.overlay_curves([{"tokens before the end": T - 1 - t, **{k: float(a[t]) for k, a in reach.items()}}
                         for t in range(T)], list(reach), x="tokens before the end", yaxis_title="advantage",
                        title="How much of a score of 1 on the last token reaches each token (V = 0, no KL)")

# %% [markdown]
# ### The clipped losses
# PPO reuses each batch for a few epochs. The ratio $\rho = \pi_{new}/\pi_{old}$ measures how far the
# update has moved; the policy loss takes the pessimistic branch of $\rho A$ and $\mathrm{clip}(\rho, 1\pm
# \epsilon) A$: once a token's ratio has left the range in the direction its advantage favours, its
# gradient stops, so nothing pushes it further in that batch (the ratio can still end up past the range,
# carried by the shared LoRA weights). On the very first mini-batch nothing has moved yet: the ratio is
# exactly 1 and nothing is clipped. The value loss is $\frac12$ the mean squared error of the values
# against the returns, made pessimistic the same way: each new value is also clipped to within
# `cliprange_value` of the rollout's, and the larger of the two squared errors counts. With the head still
# at $V = 0$ it is $\frac12$ the mean squared return.

# %%
display(plotting.show_source(ppo.ppo_losses))
new_logprobs, new_values, _ = ppo.forward_logprobs_values(policy, value_head, exp.rollout.query_response_ids,
                                                          exp.rollout.attention_mask, exp.rollout.response_start,
                                                          cfg.temperature)
_, stats = ppo.ppo_losses(new_logprobs, exp.logprobs, exp.advantages, new_values, exp.values, exp.returns,
                          exp.rollout.response_mask, cfg.cliprange, cfg.cliprange_value, cfg.vf_coef)
{k: round(v, 4) + 0.0 for k, v in stats.items()}  # + 0.0: no "-0.0"

# %%
del policy, value_head, exp, new_logprobs, new_values

# %% [markdown]
# ## 2. Before: the SFT policy on held-out prompts
# The yardstick for everything after: the SFT model's answers to held-out prompts (never trained on),
# scored by the gold judge and by the reward model. The same prompts and seed are used for every policy.

# %%
sft_rows, sft_metrics = evaluate_stage(run_dir, "sft" if not fell_back else "base", eval_cfg)
sft_metrics

# %% [markdown]
# ## 3. Train
# Each step: a rollout of `batch_size` replies (one to each prompt, or `samples_per_prompt` to each of fewer),
# `ppo_epochs` passes of clipped updates, then the KL controller. The cpu profile keeps β fixed (`adaptive_kl=False`,
# as TRL's last PPO trainer did). The gpu profile moves it towards `target_kl` nats a reply (Ziegler et al. 2019's
# controller), which held its run's KL near 4 nats (its target is 3, but with `horizon` 640 β moves at most 2% a step,
# so the KL runs past the target before β catches up) where a fixed β of 0.05 had let it reach 9.6
# (`docs/rl_on_a_cpu_budget.md`, sections 18 and 19); `objective/kl_coef` logs β. Watch the curves:
# - `objective/scores` (the proxy) should rise; `objective/kl` should grow slowly, not explode. Both are
#   means over one batch, so they jump from step to step; `objective/kl`, the sampled estimate
#   $\sum_t (\log\pi - \log\pi_{ref})$, can even dip below zero on a batch while the policy is still close
#   to the reference. Judge the trend, not one step. With `group_baseline` a step asks only
#   `batch_size / samples_per_prompt` prompts (4 in the cpu profile), so the batch's mean score mostly says
#   which prompts came up. PPO then optimises each answer's score against its siblings', which this curve
#   does not show: in the one PPO run that raised held-out gold over SFT (32 steps of this recipe,
#   `docs/rl_on_a_cpu_budget.md`, section 13), it fell. Section 5 below is the measurement that counts.
# - `policy/clipfrac_avg`, the share of tokens whose update was clipped: a few percent up to about 0.2 is
#   usual. Above ~0.3 the steps are too large for the clip range (lower the learning rate); near 0 they
#   are so small that the clip seldom binds, and each of the `ppo_epochs` passes is in effect a plain
#   policy-gradient step.
# - `policy/entropy_avg` falling fast means the policy is collapsing onto a few answers.
# - `response/length_mean` drifting is the classic sign of the reward model liking length for its own sake.
# - `val/explained_variance`, how much of the returns of each fresh rollout the value head predicts before
#   it trains on them (1: all; 0: no better than their mean). It starts at exactly 0, with the head at 0.

# %%
live = plotting.LiveCurves(["objective/scores", "objective/gold", "objective/kl", "policy/clipfrac_avg",
                            "policy/entropy_avg", "response/length_mean", "response/eos_frac",
                            "val/explained_variance"], title="PPO (live)")
summary = ppo.train_ppo(cfg, run_dir, policy_path, reward_fn, prompts, gold=gold, on_row=live.update)
print(f"{summary['steps']} steps in {summary['wall_time_s']:.0f} s")
plotting.rise_table(summary)

# %% [markdown]
# Did the rewards rise? The table compares the mean over the second half of the steps with the first half,
# with the standard error of the change. The first and the last step alone would mislead: each is one
# batch of a few prompts.

# %% [markdown]
# ## 4. Proxy against gold, step by step
# The reward model is only a proxy for what the annotator wanted. While both rise together, PPO is
# learning what we meant; where the proxy keeps rising and the gold reward stalls or falls, the policy has
# found what the reward model gets wrong (reward hacking). Both are measured on the same training samples.
# The proxy is drawn as the reward model scored it (`objective/raw_scores`; `objective/scores` also holds
# the missing-EOS penalty), on its own axis: the two are in different units, so only their trends compare.
# The lines are moving means, since one step is one small batch; the sentence under the figure says what
# they did, by the rule notebook 06 uses for every online stage.

# %%
rows = read_metrics(out_dir / "metrics.jsonl")
trend = gold_proxy_over_training(run_dir, stages=["ppo"])["ppo"]
display(plotting.gold_vs_proxy({"ppo": trend}))
print(trend["note"])

# %% [markdown]
# Samples written during training (`run_dir/ppo/samples.jsonl`): the first two replies of each sampled
# step, in full (prompts shortened); with `samples_per_prompt` above 1 they are two answers to the same
# prompt. Each step answers different prompts, so read them for what the policy does (does it end its
# replies, does it refuse, does it repeat itself), not as before-and-after pairs: section 5 has those.
# Columns: `ended`, whether the reply ended before `response_length` tokens (replies that did not stop
# mid-sentence); `raw score`, the reward model's; `score`, after the missing-EOS penalty; `baseline`, the
# mean score of the reply's siblings (0 without `group_baseline`); `gold`, the gold judge's (never
# optimised); `kl`, the reply's sampled $\sum_t \log\pi/\pi_{ref}$, which can be negative for one reply.

# %%
samples = pd.DataFrame(read_metrics(out_dir / "samples.jsonl"))
samples["prompt"] = samples["prompt"].map(lambda p: p if len(p) <= 100 else p[:100] + "…")
samples = samples.rename(columns={"has_eos": "ended", "raw_score": "raw score"})
columns = ["step", "prompt", "response", "ended", "raw score", "score", "baseline", "gold", "kl"]
with pd.option_context("display.max_colwidth", None):
    display(samples[[c for c in columns if c in samples]].groupby("step").head(2).round(3))

# %% [markdown]
# ## 5. After: PPO against SFT on held-out prompts
# Both policies answer the same held-out prompts with the same seed. Columns: `gold_mean` and `proxy_mean`,
# the mean gold and reward-model score; `kl_mean`, the KL from SFT per reply (nats, at the sampling
# temperature); `length_mean`, tokens per reply; `eos_frac`, the share of replies that ended within
# the evaluation's token limit; `distinct_2`, the share of distinct word pairs among all word pairs in the
# replies (lower: more repetitive); `n`, replies. The reading under the table also counts refusals apart on
# harmful and benign requests: notebook 03's reward model orders a refusal against an answer about as often
# wrongly as rightly (`docs/rl_on_a_cpu_budget.md`, section 1), so nothing in its reward holds SFT's
# refusals in place, and an overall gold figure can hide where they went.

# %%
ppo_rows, ppo_metrics = evaluate_stage(run_dir, "ppo", eval_cfg)
wins = paired_win_rate(ppo_rows, sft_rows)
display(pd.DataFrame([sft_metrics, ppo_metrics]).set_index("policy")[
    ["gold_mean", "proxy_mean", "kl_mean", "length_mean", "eos_frac", "distinct_2", "n"]].round(3))
display(Markdown(ppo_reading(rows, cfg, sft_metrics, ppo_metrics, ppo_rows, wins, sft_rows=sft_rows,
                             max_new_tokens=eval_cfg.max_new_tokens, note=trend["note"], reward_name=reward_name)))

# %% [markdown]
# Generations before and after, where they differ most: with one seed for both, the two policies' replies
# to a prompt often open alike and part later, so the first prompts seldom show a difference. These are the
# prompts whose gold differs most between the two, with both replies whole.

# %%
with pd.option_context("display.max_colwidth", None):
    display(widest_disagreements({"SFT": (sft_rows, sft_metrics), "PPO": (ppo_rows, ppo_metrics)}, k=3))

# %% [markdown]
# ## Save

# %%
summary = {**read_json(out_dir / "summary.json"), "profile": profile, "seed": seed,
           "reward": "rm" if reward_name == "reward_model" else "gold",
           "fell_back_to_base": fell_back, "eval_sft": sft_metrics, "eval_ppo": ppo_metrics,
           "win_rate_vs_sft": wins, "gold_gain": ppo_metrics["gold_mean"] - sft_metrics["gold_mean"],
           "notebook_wall_time_s": time.perf_counter() - t0}
MetricsLogger(out_dir).summary(summary)
{k: summary[k] for k in ("gold_gain", "kl_last", "notebook_wall_time_s")}

# %% [markdown]
# ## What you saw, and what to try
# - One PPO step taken apart: rollout, per-token KL penalty and score, values, GAE, the clipped losses
#   (ratio 1, nothing clipped, before any update).
# - A training run with the curves that tell a healthy run from a broken one, and the gold reward beside
#   the proxy to catch reward hacking.
# - PPO against SFT on held-out prompts: gold reward, win rate with its interval, and the KL paid for it.
#
# Try: `kl_coef=0.0` (no leash: the KL climbs faster; over enough steps, as in the `gpu` profile's first
# run at a fixed β of 0.05, watch for the proxy parting from gold); `reward="gold"` (optimise the gold judge
# directly: what this budget can do with a perfect reward model); `max_steps=32` (four times the steps: the
# recipe that raised held-out gold over SFT on one training seed of two, see the notes below).
#
# Mind the units of the missing-EOS penalty when you change the reward. `PPOConfig`'s default, 1.0, is one standard
# deviation of the normalised reward model but about three of the gold judge (whose scores on SFT answers spread about
# 0.3); the cpu profile's 0.5 is still about 1.5 of gold's. At 1.0 against gold (run B of docs section 3), PPO learned
# to end its replies and to refuse more often, harmless how-to questions included, and gained no gold (−0.020
# [−0.049, +0.011]). From a shell, a gold run with the penalty in
# gold's units and rollouts as long as the evaluation's replies, with the settings of the profile the runs below were
# measured under (8 prompts × 1 reply a step, no group baseline, one mini-batch, λ = 0.95), then its evaluation
# against SFT on all 72 held-out prompts, three replies each:
#
# ```bash
# .venv/bin/python -m rlhf_helpers.ppo --run-dir R --reward gold --missing-eos-penalty 0.2 --response-length 96 \
#     --learning-rate 3e-4 --max-steps 12 --batch-size 8 --samples-per-prompt 1 --group-baseline false \
#     --num-mini-batches 1 --lam 0.95
# .venv/bin/python -m rlhf_helpers.evaluate --run-dir R --n-prompts 72 --samples-per-prompt 3 ppo
# ```
#
# (R: a run folder holding notebook 02's `sft/`, such as a copy of this run's.) Measured in such runs from the cpu
# run's SFT model, not in this notebook: a gold gain of −0.000 [−0.026, +0.027] at a KL of about 1 nat; at learning
# rate 1e-3 with a penalty of 1.0 (run B there), −0.020 [−0.049, +0.011]: PPO learned to end its replies and to refuse
# more often, on harmful prompts and also on harmless how-to questions, where gold punishes a refusal. In about a
# hundred rollouts not even a perfect reward model lifts this SFT model; `docs/rl_on_a_cpu_budget.md` (section 3) has
# the six runs in a table. And the reward model itself leaves little to find: notebook 03's best-of-n shows that
# picking the best of 3 SFT replies by it (a KL of at most 0.43 nats from SFT, the order of the cpu profile's PPO:
# 0.54 nats on held-out replies in the README's table) buys about +0.01 of gold, where picking by gold buys +0.11.
#
# Nor is the λ of the GAE section what holds PPO back here: six runs with `--lam 1.0`, against gold and
# against the reward model, also landed within 0.01 of SFT (same page). Against gold it taught PPO to end its
# replies (0.55 → 0.73 within 96 tokens), which gold likes, by saying less, which gold does not.
# Nor is the baseline: with four replies per prompt and the score centred within each prompt (as GRPO and
# RLOO do), λ = 1 and learning rate 1e-3, PPO gained +0.003 against gold and +0.002 against the reward
# model, both ±0.03. The telling curve is `objective/scores`, the reward PPO optimises. It does not rise in
# any of these runs (second half against first, each within a standard error). Most of a batch's spread in
# reward lies between prompts, not between replies to one prompt, so 8 to 16 replies a step give an update
# direction that is mostly noise. Ten times the budget against gold, 80 steps of 16 replies (45 minutes
# here), gained −0.003 ± 0.02. It ended more replies (0.55 → 0.78) by saying less, as above.
# What once cleared SFT is the baseline with more prompts: 32 steps of 4 prompts × 4 replies of up to 96
# tokens, each score taken relative to its 3 siblings' mean, λ = 1, penalty 0.5, gained +0.025 [+0.004,
# +0.047] on the held-out prompts against the reward model, in 28 minutes, without ending more replies
# (section 13 of the page). A second training seed did not repeat it: −0.002 [−0.026, +0.018]. Yet on the
# same held-out prompts that seed-1 run's replies scored +0.331 [+0.196, +0.471] above SFT's by the reward model
# itself, a third of a standard deviation of SFT's replies. PPO raised the reward it was given, on prompts
# it never saw; gold did not follow. The evaluation prints both gains (`proxy_gain` beside `gain`): when
# the first rises and the second does not, the reward model is the limit, not the optimiser.
# This notebook's cpu profile is that recipe cut to 8 steps, about what 10 minutes buy; in the cpu run it
# gained +0.010 [−0.011, +0.030] on all 72 held-out prompts × 3 replies (the `evaluate` command above, not
# section 5's smaller table), and −0.011 [−0.029, +0.005] on a second training seed: level with SFT, like
# every 10-minute run before it, and so was the reward model's score (−0.067 and +0.046, both intervals
# holding 0). `max_steps=32` runs the 28-minute version; from a
# shell, `.venv/bin/python -m rlhf_helpers.ppo --run-dir R --profile cpu --max-steps 32`, then the evaluation above.
# Adding RPO's anchor to the 8-step loss (the log-likelihood of each prompt's best reply, which lifted DPO
# over SFT on the same reward model) left it level too: +0.008 [−0.014, +0.030] (section 13).
# Nor would a better reward model lift these 8 steps. Run against gold itself (`reward="gold"`), this
# profile gained +0.009 [−0.009, +0.029] and +0.008 [−0.011, +0.028] on two seeds, +0.011 [−0.009,
# +0.033] at learning rate 1e-3; 32 steps against gold gained +0.007 [−0.033, +0.047], refusing more and
# saying less (section 15). Ten minutes of PPO on two cores gained at most about 0.01 of gold here,
# whatever the reward, less than 72 held-out prompts × 3 replies can resolve.
# Sampled four times as finely (`--samples-per-prompt 12`, half an hour a policy here), even that 0.01 goes:
# the profile's two seeds gained −0.012 [−0.029, +0.004] and +0.001 [−0.012, +0.014] over SFT (pooled
# −0.005 [−0.017, +0.007]), and the seed-0 run against gold −0.005 [−0.017, +0.006]. On the 63 benign
# prompts all three gain +0.003 to +0.006; on the 9 harmful ones the seed-0 runs refuse less often than
# SFT (19 and 27 of 108 replies, SFT 35, seed 1 34) and lose 0.134 and 0.063 of gold there (section 16).
# The reward model orders refusals about as often right as wrong, and seed 0's 32 training prompts held
# 2 harmful requests (seed 1's held 4): too few to hold a refusal in place even with gold as the reward.
# A rule-based safety term beside the reward model (+w for refusing exactly the harmful requests, −w
# otherwise), with harmful prompts drawn three times as often (`scripts/ppo_safety_term.py`), kept SFT's
# refusals at w = 1 on one seed (33 of 108) and on the other refused benign requests too (46 of 756, SFT
# 20); in all it gained nothing, −0.002 [−0.013, +0.009] and −0.010 [−0.033, +0.011]. At w = 2 and
# learning rate 1e-3 it lost the refusals again (21 of 108) while its rollouts rewarded them (section 17).
# Nor is it the shared backbone: the value loss could in principle drag the adapter away from what the
# policy loss wants, but at the end of a cpu run its gradient on the adapter is about 2% of the policy
# loss's, and the value head explains little of the returns (`scripts/ppo_gradient_shares.py` measures
# both; the page has the figures).
# Notebook 05 runs DPO, GRPO and RLOO on the same data and budget and sets them beside this run.
