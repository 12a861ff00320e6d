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
# # 05 · DPO, GRPO and RLOO beside PPO
#
# Notebook 04 trained the policy with PPO: sample, score with the reward model, update, with a critic and
# a KL penalty. That is one answer among several. This notebook runs three more on the same footing (the
# same SFT starting point, the same preference pairs, the same reward model, a budget of the same order:
# not equal, and a settings table shows what each was given) and measures all four the same way, which is
# how the question a practitioner has, *which method, for what, at what cost*, can be answered from numbers.
#
# What one run answers depends on its profile. The `cpu` profile trains each method for a few steps and
# evaluates on a few dozen prompts: enough to see every piece work, not enough to rank the methods (their
# intervals overlap; `docs/rl_on_a_cpu_budget.md` in the repository measures why no RL stage beats SFT at
# that budget). The `gpu` profile trains longer and evaluates 72 prompts × 4 replies. It has not yet been run
# through this notebook; its PPO, the one method it has run, still had an interval of about ±0.03 of gold
# over SFT (docs section 19), wider than the gaps between methods seen so far, so one gpu run may not rank
# them either.
#
# **What you will learn**
# 1. DPO: learning straight from preference pairs, no reward model and no sampling; its *implicit reward*
#    set against the reward model's scores.
# 2. GRPO and RLOO: online RL without a critic, the group of replies to one prompt serving as the baseline.
# 3. How to compare methods fairly: gold reward, proxy reward, KL to the reference and win rate (with its
#    wins, ties and losses) on held-out prompts, beside what each method was given and its cost per sample.

# %% tags=["parameters"]
run_dir: str = "runs/dev"  # where this run's artifacts go; this notebook writes dpo/, grpo/, rloo/ and comparison/
profile: str = "cpu"  # smoke | cpu | gpu: steps, batch sizes, reply lengths
seed: int = 0  # seed for data order, sampling and the adapters
model_name: str = ""  # policy base when run_dir has no SFT model; empty keeps the profile's
dpo_beta: float = 0.1  # DPO's beta: the scale of its implicit reward and its pull towards the reference
dpo_sft_weight: float = 0.0  # weight of the chosen replies' log-likelihood in DPO's loss: 0 plain DPO, 1 RPO
kl_coef: float = -1.0  # KL coefficient beta of GRPO and RLOO; a negative value keeps the profile's
ppo_fallback_steps: int = 4  # PPO steps to run here when notebook 04 has left no PPO run in run_dir

# %% [markdown]
# ## Setup
# Every method starts from the SFT model of notebook 02 (the base model when there is none) with a fresh
# LoRA adapter; every reference is that model with the adapter switched off. The online methods optimise
# the normalised reward model of notebook 03 (the gold judge when it is missing), and the gold judge rides
# along with weight 0: logged, never optimised, so we can see whether the proxy is being fooled.

# %%
import dataclasses
import gc
import time

import pandas as pd
from IPython.display import Markdown, display

from rlhf_helpers import comparison, plotting
from rlhf_helpers.config import stage_config
from rlhf_helpers.dpo import DPOStageConfig, load_training_pairs, train_dpo
from rlhf_helpers.evaluate import EvalConfig, evaluate_stage, results_table
from rlhf_helpers.gold import GoldJudge
from rlhf_helpers.data import train_prompts
from rlhf_helpers.online_rl import GRPOStageConfig, RLOOStageConfig, run_reward, train_grpo, train_rloo
from rlhf_helpers.paths import stage_dir
from rlhf_helpers.policies import adapter_dir, load_policy
from rlhf_helpers.ppo import PPOConfig, train_ppo
from rlhf_helpers.reward_model import split_pairs
from rlhf_helpers.sft import sft_policy_path
from rlhf_helpers.tracking import atomic_write_json, read_json

t0 = time.perf_counter()
common = dict(seed=seed, model_name=model_name or None)
dpo_cfg = stage_config(DPOStageConfig, profile, beta=dpo_beta, sft_weight=dpo_sft_weight, **common)
grpo_cfg = stage_config(GRPOStageConfig, profile, beta=kl_coef if kl_coef >= 0 else None, **common)
rloo_cfg = stage_config(RLOOStageConfig, profile, beta=kl_coef if kl_coef >= 0 else None, **common)
eval_cfg = stage_config(EvalConfig, profile, **common)
policy_path, fell_back = sft_policy_path(run_dir, dpo_cfg.model_name)
reference = "base" if fell_back else "sft"
reward, reward_name = run_reward(run_dir, dpo_cfg.dtype, dpo_cfg.device)
gold = GoldJudge()
prompts = train_prompts()
print(f"policy {policy_path}; reward {reward_name}; {len(prompts)} training prompts")

# %% [markdown]
# ## 1. DPO: preferences without a reward model
# DPO turns the RLHF objective around: for the KL-regularised optimum, the reward is a function of the
# policy itself, $\hat r(x, y) = \beta \log \frac{\pi(y|x)}{\pi_{ref}(y|x)}$ (plus a term that cancels
# between two replies to one prompt). So a Bradley–Terry loss on that implicit reward,
# $-\log\sigma(\hat r(x, y_w) - \hat r(x, y_l))$, trains the policy directly on the pairs of notebook 03.
# No reward model, no sampling, no critic: one forward pass of policy and reference per reply.
#
# What $\beta$ means here (notebook 00, section 6): DPO takes the labels' Bradley–Terry temperature to be 1, and
# on labels drawn at temperature $T$ it aims at the optimum for a KL coefficient of $\beta T$ on the scale the
# annotator judged by. Notebook 03's annotator labels at $T = 0.1$ gold units, so `dpo_beta` 0.1 is a leash of
# 0.01 per unit of gold: looser than the number suggests, and not comparable with PPO's $\beta$, which weighs the
# KL against the reward model's normalised score.
#
# The held-out pairs are split by prompt exactly as notebook 03 split them for the reward model, so
# neither model has seen them; TRL scores them once at the end, and the next section looks closer.
#
# How to read the curves. A fresh adapter *is* the reference, so at step 1 every implicit reward and margin
# is exactly 0 and `train/loss` is $\log 2 \approx 0.693$, the loss of a coin flip; below it, the pairs are
# being ordered. (With `dpo_sft_weight` above 0, RPO, the loss also holds that weight times the chosen
# replies' negative log-likelihood, so it starts higher.) `rewards/margins` (the batch mean of
# $\hat r(y_w) - \hat r(y_l)$) should grow from 0.
# `rewards/accuracies` (the share of the batch's pairs with a positive margin) starts at 0, not one half:
# TRL counts a tie as wrong. It moves in steps of one over the pairs per step, so one batch's value says
# little; the table after the curves gives means over the first and the second half of the steps.
# `logps/chosen` is the policy's log-probability of the chosen replies, summed over their tokens: it can
# fall while the margin grows, since DPO pushes the chosen reply up *relative to* the rejected one, and
# both can go down. With a warm-up, transformers runs step 1 at learning rate 0, so step 2 is scored on the
# same weights as step 1 (the line below the curves prints step 1's rate).

# %%
pairs, pairs_source = load_training_pairs(run_dir)
train_pairs, eval_pairs = split_pairs(pairs, dpo_cfg.eval_fraction, seed, dpo_cfg.n_train, dpo_cfg.n_eval)
print(f"{len(train_pairs)} training pairs, {len(eval_pairs)} held-out pairs, from {pairs_source}")
live = plotting.LiveCurves(["train/loss", "rewards/margins", "rewards/accuracies", "logps/chosen"], title="DPO (live)")
dpo_summary = train_dpo(dpo_cfg, run_dir, policy_path, train_pairs, eval_pairs=eval_pairs, on_row=live.update)

# %%
print(f"{dpo_summary['steps']} steps of {dpo_cfg.pairs_per_step} pairs ({dpo_summary['pairs_seen']} pairs seen, "
      f"{dpo_summary['wall_time_s']:.0f} s); step 1's learning rate: {dpo_summary['learning_rate_first']}; "
      f"accuracy moves in steps of {1 / dpo_cfg.pairs_per_step:.2f}")
plotting.halves_table({"rewards/margins": dpo_summary["margin_halves"],
                       "rewards/accuracies": dpo_summary["accuracy_halves"]})

# %% [markdown]
# ### The implicit reward against the reward model
# DPO has a reward model hidden inside it. On each held-out pair, compare its margin
# $\hat r(y_w) - \hat r(y_l)$ with the trained reward model's score margin. Dots in the upper-right agree
# with the annotator in both; the correlation says how much the two learned the same thing from the same
# pairs. (Only differences between replies to one prompt are comparable: DPO's reward level for a
# prompt is not identified.)

# %%
policy, tok = load_policy(run_dir, "dpo", dtype=dpo_cfg.dtype, device=dpo_cfg.device, load_in_4bit=dpo_cfg.load_in_4bit)
margins, implicit = comparison.implicit_vs_reward(policy, tok, eval_pairs, dpo_cfg.beta, reward)
del policy
gc.collect()
display(plotting.implicit_reward_scatter(margins["rm_margin"], margins["dpo_margin"],
                                         hover=[p.prompt[:70] for p in eval_pairs], x_title=f"{reward_name} margin"))
implicit

# %% [markdown]
# `dpo_pair_accuracy` and `rm_pair_accuracy` are the shares of held-out pairs each orders as the annotator
# did (a margin of exactly 0 counts as wrong); `spearman_margins` compares the two margins pair by pair;
# `within_prompt_agreement` is the share of two replies *to one prompt* that the two rewards order the same
# way, over `within_prompt_comparisons` such comparisons. Rewards of replies to different prompts are never
# compared, since DPO's level for a prompt is not identified. A DPO run of a few steps hardly moves its
# implicit reward, so it can sit at chance while the reward model, trained longer on the same pairs, orders
# more of them right. Read each figure against its size:

# %%
display(Markdown(comparison.held_out_note(implicit, comparison.rm_held_out_accuracy(run_dir))))

# %% [markdown]
# ## 2. GRPO: the group is the baseline
# GRPO samples `num_generations` replies to each prompt, scores them, and takes each reply's advantage
# relative to its siblings: $A_i = (r_i - \mathrm{mean}_g\, r) / \mathrm{std}_g\, r$. A reply better than
# its siblings is reinforced, a worse one discouraged; no value network has to learn what a prompt is
# worth. The loss is PPO's clipped ratio per token, plus $\beta$ times TRL's k3 estimate of the KL,
# $e^{\Delta} - \Delta - 1$ with $\Delta = \log\pi_{ref} - \log\pi$, added to each token's loss (not to
# the reward). TRL's own default is $\beta = 0$, which loads no reference and computes no KL at all; we set
# it above zero (the settings table in section 5 shows the value). TRL 1.16 also multiplies that k3 term by
# the token's probability ratio (`use_bias_correction_kl`, on by default). On-policy the ratio is 1, so the
# logged value is k3 unchanged, but the gradient becomes $(\log\pi - \log\pi_{ref})\,\nabla\log\pi$, that
# of the reverse KL $\mathrm{KL}(\pi\,\|\,\pi_{ref})$; the gradient of k3 alone, as in the GRPO paper and
# older TRL, is in expectation that of the forward KL $\mathrm{KL}(\pi_{ref}\,\|\,\pi)$.
#
# Two of GRPO's choices carry a bias that Dr. GRPO (Liu et al. 2025) pointed out. Dividing by the group's
# spread gives the replies to a prompt on which they scored almost alike advantages as large as those to a
# prompt on which they differed widely, so on prompts too easy or too hard for the policy, small and often
# noisy differences are blown up to full size. And averaging each reply's token losses before averaging over replies
# (`loss_type="grpo"`, the paper's, which this stage sets) gives each token of a short reply more weight
# than a token of a long one: a good short reply is pushed up harder, a bad long one pushed down more
# gently. TRL 1.16's own defaults are `loss_type="dapo"` (tokens averaged over the whole batch) and
# `scale_rewards="group"`; `scale_rewards="none"` drops the division.
#
# The score optimised is of the kind PPO optimises: the reward model's, minus the missing-EOS penalty for a
# reply cut off at the training token cap, `max_completion_length` (without it, the reward model would
# score half-written replies and nothing would teach the policy to finish). The cap and the penalty are each
# stage's own: the cpu profile gives PPO 96 tokens and a penalty of 0.5, GRPO and RLOO 64 tokens and 1.0
# (the settings table in section 5 reads them from each stage's config). In a short run that penalty is
# much of the signal: when most replies hit the cap, whether a reply ended moves its score more than what
# it says. So the curves include `response/eos_frac`, the share of the step's replies that ended, and the
# rise table keeps the penalised score (`objective/scores`, the one optimised) apart from the reward
# model's score alone (`objective/raw_scores`, the "proxy reward" of section 6).
#
# Given enough steps the proxy rises and the KL grows; whether the gold follows is the question (in one gpu-profile
# PPO run on an H100, the proxy of its training batches rose while their gold fell once the KL passed about 4 nats:
# `docs/rl_on_a_cpu_budget.md`, section 18, and notebook 06's parting point; with the KL held near 4 nats by the
# adaptive controller, aiming at 3 but moving β at most 2% a step, a second run's gold did not fall, section 19). In a
# short run each step scores a couple of new prompts, so the curves mostly show how prompts differ: read the rise
# table's `change` against its `change_se` before reading a trend into them. The training loss is no progress signal:
# with one update per batch the clipped-ratio term averages to zero over each group, so GRPO's loss is about $\beta$
# times TRL's per-token KL, `train/kl` (logged again as `objective/kl_per_token`), not $\beta$ times the plotted
# `objective/kl`, which is that per-token figure times the mean reply length.

# %%
live = plotting.LiveCurves(["objective/scores", "objective/gold", "objective/kl", "response/eos_frac",
                            "completions/mean_length"], title="GRPO (live)")
grpo_summary = train_grpo(grpo_cfg, run_dir, policy_path, prompts, reward, gold, on_row=live.update)
gc.collect()
print({k: grpo_summary[k] for k in ("steps", "samples_seen", "kl_last", "kl_per_token_last")})
print(comparison.truncation_note(grpo_summary, eval_cfg.max_new_tokens))
plotting.rise_table(grpo_summary)  # mean over the first and the second half of the steps

# %% [markdown]
# ## 3. RLOO: leave one out
# RLOO (REINFORCE leave-one-out) uses the same groups with a different baseline: each reply is compared
# with the mean reward of the *other* replies to its prompt, an unbiased baseline. For a group of $K$ that
# advantage is $r_i - \frac{1}{K-1}\sum_{j \ne i} r_j = \frac{K}{K-1}(r_i - \mathrm{mean}_g\, r)$: GRPO's
# with `scale_rewards="none"` (no division by the group's spread), times a constant. What differs is where
# the KL goes: into the reward itself, $r_i - \beta \sum_t (\log\pi - \log\pi_{ref})$, once per reply
# (PPO spreads it over the tokens), and TRL's RLOO takes one probability ratio per reply where GRPO takes one
# per token. On-policy that makes RLOO's gradient for a reply a sum over its tokens, where this GRPO's is
# their mean. So the same $\beta$ is not the same leash: in GRPO a per-token k3 term set against advantages
# scaled to unit spread, in RLOO a summed log-ratio set against the reward in its own units. That summed
# log-ratio is a sample, not an expectation, and can be negative on a batch; its expected value, the KL,
# cannot. RLOO's loss sits at about 0 (the advantages of a group sum to zero). Same prompts, same budget,
# same reward as GRPO.

# %%
live = plotting.LiveCurves(["objective/scores", "objective/gold", "objective/kl", "response/eos_frac",
                            "completions/mean_length"], title="RLOO (live)")
rloo_summary = train_rloo(rloo_cfg, run_dir, policy_path, prompts, reward, gold, on_row=live.update)
gc.collect()
print({k: rloo_summary[k] for k in ("steps", "samples_seen", "kl_last", "kl_per_token_last")})
print(comparison.truncation_note(rloo_summary, eval_cfg.max_new_tokens))
plotting.rise_table(rloo_summary)  # mean over the first and the second half of the steps

# %% [markdown]
# ## 4. PPO, from notebook 04
# PPO's run is read from `run_dir/ppo/` as notebook 04 left it. When notebook 04 has not run, a short PPO
# run is made here (`ppo_fallback_steps`), and the table says so: its row then measures a smaller budget.

# %%
if adapter_dir(run_dir, "ppo") is not None and (stage_dir(run_dir, "ppo") / "summary.json").exists():
    ppo_source = "notebook 04"
else:
    ppo_cfg = stage_config(PPOConfig, profile, seed=seed, model_name=model_name or None)
    ppo_cfg = dataclasses.replace(ppo_cfg, max_steps=min(ppo_cfg.max_steps, max(1, ppo_fallback_steps)))
    print(f"No PPO run in {stage_dir(run_dir, 'ppo')}: running {ppo_cfg.max_steps} PPO steps here "
          f"(notebook 04 runs more).")
    train_ppo(ppo_cfg, run_dir, policy_path, reward, prompts, gold=gold)
    ppo_source = "a short run here (notebook 04 had not run)"
    gc.collect()
ppo_summary = read_json(stage_dir(run_dir, "ppo") / "summary.json")
print(f"PPO from {ppo_source}: {ppo_summary.get('steps')} steps, {ppo_summary.get('samples_seen')} samples seen")

# %% [markdown]
# ## 5. All four on held-out prompts
# First, what each method was given, read from its `config.json` and `summary.json`. The budgets are of
# the same order, not equal: learning rates, passes over each batch, prompts and replies differ, so do the
# token cap and the penalty on a reply cut off at it, and so does what β does. *Training samples* counts
# the replies a method trained on: sampled and scored for PPO, GRPO and RLOO; read from the pairs for DPO
# (two per pair, none sampled).

# %%
settings = comparison.settings_table(run_dir)
print(f"held-out evaluation: {eval_cfg.max_new_tokens} new tokens per reply at most")
pd.DataFrame(settings).set_index("method")

# %% [markdown]
# Then each policy answers the same held-out prompts with the same sampling seed. The gold judge scores them
# (what we actually want), the reward model too (what the online methods optimised), and the Monte-Carlo KL to
# the reference says how far each has moved. *Gold gain* and *proxy gain* are each method's mean score minus
# the reference's, paired prompt by prompt, with a bootstrap 95% interval over prompts: a proxy gain with no
# gold gain beside it is the reward model being optimised, not the goal. Win rate: how often the gold judge
# prefers the method's answer to the reference's, ties counting half, with a bootstrap 95% interval; *won /
# tied / lost* gives the prompts behind it, since many ties pull a win rate towards 0.5 whatever the rest say.
# *Refused: harmful / benign* counts the replies that refuse, of those to harmful requests and of those to
# benign ones. On the cpu run (training seed 0) PPO's gold loss lies in the few harmful prompts, where it
# drops SFT's refusals (notebook 04's reading; `docs/rl_on_a_cpu_budget.md`, section 16, where a second seed
# kept them): this column shows whether the others do.
# Evaluations are cached in `run_dir/eval/policies/`, shared with notebooks 04 and 06. Cost: wall time is the
# training stage's, and since the budgets differ, *s per sample* (wall time over training samples) is the
# fairer figure to compare, though still not like for like: an online method's sample is a reply generated
# and scored (in the cpu profile up to 96 tokens and two passes for PPO, 64 and one for GRPO and RLOO), DPO's
# a reply only scored, never generated; and the wall time includes loading and saving, which weigh more per
# sample in a shorter run. *Memory added* is the stage's peak memory above what the process held when the stage
# began (on CPU the resident set of the process: this notebook's for DPO, GRPO and RLOO, notebook 04's for
# PPO), since a peak alone would mostly show what earlier stages left behind.

# %%
stages = [reference, "dpo", "grpo", "rloo", "ppo"]
rm = reward if reward_name == "reward_model" else None
evaluations = {s: evaluate_stage(run_dir, s, eval_cfg, reward_model=rm) for s in stages}
costs = {s: comparison.stage_costs(run_dir, s) for s in stages if s != reference}
table = comparison.comparison_table(results_table(evaluations, reference, seed=seed), costs)
comparison.format_comparison(table, reference)

# %% [markdown]
# What each method bought against what it cost per training sample. The methods ran at different budgets
# (steps, replies, epochs: the settings table above), so total time compares budgets, not methods; per
# sample it compares the work each sample took. Marker size: the memory the stage added to what the
# process already held.

# %%
plotting.cost_figure(table, reference)

# %% [markdown]
# ## 6. Curves on shared axes
# The online methods side by side, by samples seen: the proxy reward, the gold reward of the same samples,
# the KL to the reference in nats per reply, and the share of replies that ended within the training cap.
# The proxy here is the reward model's score alone (`objective/raw_scores`), without the missing-EOS
# penalty that the optimised score carries. The KL is each trainer's own estimate on its training samples:
# for PPO and RLOO the sampled log-ratio summed over the reply, which can be negative on a batch; for GRPO
# TRL's k3 estimator, never negative, times the mean reply length. On samples from the policy both have the
# KL as their expected value (k3 usually with less spread), so the lines estimate one quantity with different noise.

# %%
curves, per_step = comparison.online_curves(run_dir)
display(plotting.method_curves(curves, list(comparison.CURVE_KEYS), per_step))
print("lowest training KL per method (nats per reply):",
      {m: round(v, 3) for m, v in comparison.lowest_kl(curves).items()})

# %% [markdown]
# ## 7. What these numbers say
# Written from the table above, not by hand: which method won, by how much and how surely, and what it
# cost at these budgets. On the smoke profile nothing has trained long enough to mean anything. On the cpu
# profile read it as a check that the comparison works, not as a ranking: a few steps per method and a few
# dozen held-out prompts leave the intervals overlapping, and the text says so when they do. The gpu
# profile trains longer and evaluates on more prompts.

# %%
display(Markdown(comparison.discussion(table, reference)))

# %% [markdown]
# ## Save

# %%
summary = {"profile": profile, "seed": seed, "reference": reference, "policy_path": policy_path,
           "fell_back_to_base": fell_back, "reward": reward_name, "pairs_source": pairs_source,
           "ppo_source": ppo_source,
           "table": table, "settings": settings, "implicit_reward": implicit, "eval_settings": eval_cfg,
           "notebook_wall_time_s": time.perf_counter() - t0}
atomic_write_json(stage_dir(run_dir, "comparison") / "summary.json", summary)
print(f"saved {stage_dir(run_dir, 'comparison') / 'summary.json'}: the table of section 5, the settings and the "
      f"implicit-reward figures")

# %% [markdown]
# ## What you saw, and what to try
# - DPO learning from pairs alone, and its implicit reward agreeing (or not) with the reward model.
# - GRPO and RLOO learning online from groups of samples, with the gold reward logged beside the proxy.
# - All four methods measured the same way, beside what each was given and what it cost per sample, and a
#   verdict read from the numbers, which on the cpu profile cannot rank them.
#
# Try: `dpo_beta=0.5` (a tighter leash: less KL once the loss levels off, though the logged margins, which
# are β times the gap in log-ratios, read larger); `kl_coef=0.0` (GRPO and RLOO with no KL term: TRL then
# loads no reference and computes no KL, so their lines leave the KL panel and only PPO's, from notebook 04,
# stays; over a few cpu steps the policy hardly moves either way; with longer training, as on the gpu
# profile, this is the setting under which the proxy can part from the gold); the gpu profile, whose longer
# training and 72 × 4 evaluation narrow the intervals (by how much for these methods is unmeasured);
# `dpo_sft_weight=1.0` (RPO: the chosen replies' log-likelihood beside DPO's loss, an anchor against the drift
# that lowers both replies' likelihood; on these fixed pairs, at the cpu profile's 10 steps, it changed
# nothing measurable: on 72 held-out prompts × 3 replies its gold gain over SFT was −0.000 [−0.017, +0.014],
# plain DPO's −0.000 [−0.016, +0.014], at a KL of 0.52 nats against 0.41); and DPO
# on the SFT model's own replies rather than on fixed pairs, a judge's best against its worst
# (`scripts/rejection_sampling_sft.py --objective dpo`; section 12 of `docs/rl_on_a_cpu_budget.md` in the
# repository measures it on the cpu run). Notebook 06 puts
# every policy on the reward–KL frontier and watches gold against proxy.
