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
# # 06 · Evaluation: did alignment work, at what price, and where did the reward model start lying?
#
# Every earlier notebook trained something. This one closes the loop: each policy of the run answers the
# same held-out prompts with the same sampling seed, the gold judge (our stand-in for a careful human) and
# the trained reward model (the *proxy* the RL stages optimised) score the answers, and we ask three
# questions. Did alignment work (does the gold judge prefer the new policy)? At what price (how far did
# the policy move from the SFT model, and did its answers lose variety)? And where did optimising the
# proxy stop helping the gold reward?
#
# **What you will learn**
# 1. Win rates with honest error bars: paired comparisons, ties counted half, a bootstrap interval.
# 2. The Monte-Carlo KL to the reference, diversity (distinct-1/2) and length as the price of alignment.
# 3. The reward–KL frontier (as in the DPO paper) for every policy and every saved checkpoint.
# 4. Over-optimisation (Gao et al. 2022): gold beside proxy reward over training, and whether and where they part.
# 5. One self-contained report of the whole run, `run_dir/eval/report.html`.

# %% tags=["parameters"]
run_dir: str = "runs/dev"  # the run folder to evaluate; this notebook writes run_dir/eval/
profile: str = "cpu"  # smoke | cpu | gpu: how many prompts and tokens per policy
seed: int = 0  # sampling seed, the same for every policy
model_name: str = ""  # the base policy; empty keeps the profile's
n_prompts: int = 0  # held-out prompts per policy; 0 keeps the profile's value
samples_per_prompt: int = 0  # replies per prompt for the final policies; 0 keeps the profile's value
checkpoints: bool = True  # also evaluate every saved checkpoint, for the frontier
force: bool = False  # re-evaluate even where run_dir/eval/policies/ holds a cached result

# %% [markdown]
# ## Setup
# One evaluation config for every policy: the same prompts, reply length, temperature and seed, so that
# nothing but the policy differs between rows. That does not make every difference between rows the policies':
# a reply is one draw, and the same weights drawn again score differently. On the cpu profile's 16 checkpoint
# prompts, the same weights sampled in a batch of 32 prompts instead of 16 moved mean gold by 0.037–0.078 for
# SFT, PPO, GRPO and RLOO, and by 0.0005 for DPO (measured on a cpu run). So read each row's interval before
# its point estimate. Evaluations are cached in `run_dir/eval/policies/` (notebooks 04 and 05 use the same
# cache), one file per policy and sampling settings, and reused while the policy's weights and the reward
# model are unchanged: a 72-prompt evaluation from the command line (`.venv/bin/python -m rlhf_helpers.evaluate`) sits
# beside these and replaces none of them.

# %%
import time

from IPython.display import Markdown

from rlhf_helpers import plotting
from rlhf_helpers.comparison import discussion
from rlhf_helpers.config import stage_config
from rlhf_helpers.evaluate import (EvalConfig, curve_keys, evaluate_checkpoints, evaluate_line_ends, evaluate_stage,
                                   format_results, frontier_points, gold_proxy_over_training, line_gains,
                                   missing_policies, results_table, stage_metrics, widest_disagreements)
from rlhf_helpers.gold import GoldJudge
from rlhf_helpers.paths import stage_dir
from rlhf_helpers.policies import available_policies
from rlhf_helpers.report import build_report
from rlhf_helpers.reward_model import load_run_reward_model
from rlhf_helpers.tracking import atomic_write_json

t0 = time.perf_counter()
cfg = stage_config(EvalConfig, profile, seed=seed, model_name=model_name or None, n_prompts=n_prompts or None,
                   samples_per_prompt=samples_per_prompt or None)
cfg

# %% [markdown]
# ## 1. Which policies does this run hold?
# The base model is always there. The others exist only where their notebook has run: SFT (02), PPO (04),
# DPO, GRPO and RLOO (05). A missing one is listed with the reason, and everything below works with the rest.

# %%
present, missing = available_policies(run_dir), missing_policies(run_dir)
print("evaluating:", ", ".join(present))
for stage, why in missing.items():
    print(f"missing {stage}: {why}")

# %% [markdown]
# ## 2. Sample and score every policy
# Each policy answers `cfg.n_prompts` held-out prompts (balanced over domains, never trained on),
# `cfg.samples_per_prompt` times each (then win rates and gains compare each prompt's mean). The gold
# judge scores each answer; the reward model of notebook 03, normalised so that SFT answers sampled at
# temperature 1.0 score mean 0 and standard deviation 1 (the replies here, at `cfg.temperature`, score near
# that, not exactly at it), gives the proxy score. The KL column is the Monte-Carlo estimate
# $\frac{1}{N}\sum_i \sum_t \big(\log\pi_T(y_{i,t}) - \log\pi_{\text{SFT},T}(y_{i,t})\big)$ over the policy's own
# samples, both distributions at the sampling temperature $T$ (`cfg.temperature`), as PPO's `objective/kl` is.
# One reply's term can be negative; the mean cannot be, in expectation.

# %%
judge, rm = GoldJudge(), load_run_reward_model(run_dir, dtype=cfg.dtype, device=cfg.device)
print("proxy: the run's reward model" if rm else "proxy: none (no run_dir/rm/model; notebook 03 has not run)")
evaluations = {}
for name in present:
    t = time.perf_counter()
    evaluations[name] = evaluate_stage(run_dir, name, cfg, reward_model=rm, judge=judge, force=force)
    m = evaluations[name][1]
    print(f"{name:5s} gold {m['gold_mean']:.3f} on {m['prompts']} prompts, {m['n']} replies "
          f"({time.perf_counter() - t:.1f} s)")

# %% [markdown]
# ## 3. The results table
# Two ways to ask "does the gold judge prefer this policy to SFT?", both paired by prompt:
# - **gold gain**: the mean of (policy's gold − SFT's gold) over prompts. It keeps the size of each win.
# - **win rate**: per prompt, the gold judge picks the better of the two answers; a tie counts half. The
#   prompts won, tied and lost are beside it. Ties are common: with one seed for every policy, a policy that
#   moved little often writes SFT's reply word for word, and two replies often both hit gold's floor (0) or
#   ceiling (1). Every tie pulls the win rate towards 0.5.
#
# Each comes with a 95% percentile-bootstrap interval over prompts: resampling the prompts (each with its
# replies) shows how much the figure depends on which prompts and replies were drawn. A win rate of 0.34
# [0.22, 0.48] reads "SFT's reply was preferred more often; rates from 0.22 to 0.48 are consistent with these
# prompts (95%), all below an even 0.5". It is not the range a fresh evaluation's figure would fall in: that
# varies more, since the fresh figure has its own noise as well. A gain whose interval holds 0, or a win rate
# whose interval holds 0.5, has not told the policy from SFT on these prompts.
#
# Distinct-1 and distinct-2 are the shares of distinct words and word pairs over all of a policy's replies
# pooled: shorter replies score higher, so read them beside the length column. With one reply per prompt they
# measure variety across prompts, not the loss of variety per prompt that RL is known for; that needs
# `samples_per_prompt` > 1.
#
# "Refused: harmful / benign" counts the replies that decline in their first sentence, of those to harmful
# requests and of those to benign ones (`rlhf_helpers.rewards.is_harmful_prompt` and `is_refusal`, the
# rules notebook 01's safety reward uses). Gold rewards a fitting refusal and punishes a misplaced one, but a
# few harmful prompts weigh little in the mean: a policy that stops refusing them can lose most of its gold
# there and still not be told from SFT overall. Notebook 04's cpu run is such a case.
#
# The KL column is each policy's KL to SFT on its own replies. Every RL policy is SFT plus a small adapter, so
# its KL stays at a few nats or less; the base model's is tens of nats, because SFT trained a different model:
# every weight the adapter touched during SFT was merged into `sft/model/`, and the base model's replies are
# unlikely under it.

# %%
reference = "sft" if "sft" in evaluations else "base"
if reference != "sft":
    print("no SFT model in this run: win rates are against the base model instead")
table = results_table(evaluations, reference=reference, seed=seed)
format_results(table, reference)

# %%
plotting.win_rate_bars(table, reference)

# %% [markdown]
# What the table says, in words (the same reading notebook 05 gives its comparison; the base model is left
# out, as it was never meant to beat SFT).

# %%
Markdown(discussion([r for r in table if r["policy"] != "base" or reference == "base"], reference))

# %% [markdown]
# Numbers hide what changed. Here are the three prompts on which the policies from SFT on have gold rewards
# spread widest, with every policy's whole reply. With one seed for all, replies to a prompt often open with
# the same words and part later, so read to the end. Read them as the gold judge does, too: it scores form
# (length, structure, relevance, refusals, repetition), not correctness, so a wrong answer in good form can
# score 1 (notebook 01 says what gold cannot check).

# %%
widest = widest_disagreements({k: v for k, v in evaluations.items() if k != "base"}, k=3)
widest.style.set_properties(**{"white-space": "pre-wrap", "text-align": "left"})

# %% [markdown]
# ## 4. The reward–KL frontier
# Every RL method trades divergence from the reference for reward. Plotting gold reward against KL for each
# policy and for each checkpoint saved along its training shows how efficiently each method makes that
# trade: a curve that rises faster, further left, is better (Rafailov et al. 2023, figure 2). Checkpoints are
# scored on the first `cfg.n_checkpoint_prompts` prompts only, and so is every point of their dotted line:
# it starts at SFT and ends at the final policy, each sampled in the same batches with the same seed as the
# checkpoints (`evaluate.evaluate_line_ends`; sampling depends on the batch a prompt sits in, so taking
# the line's ends from the full evaluation would put the same weights at two places). The large markers use
# all the prompts (and every reply per prompt): where those are more prompts than the lines', lines and
# markers can sit at different heights for that reason alone (on a cpu run the first 16 prompts were the
# harder half). Points on a few dozen prompts with one reply each move by a few hundredths of gold between
# draws, and the KL of a policy that moved little is a small mean of terms of either sign: read small steps
# along a line as noise.

# %%
ckpts = ({s: evaluate_checkpoints(run_dir, s, cfg, reward_model=rm, judge=judge, force=force)
          for s in present if s not in ("base", "sft")} if checkpoints else {})
print({s: [step for step, _ in c] for s, c in ckpts.items()} or "no checkpoints evaluated")
ends = (evaluate_line_ends(run_dir, [s for s, c in ckpts.items() if c], cfg, reference=reference, reward_model=rm,
                           judge=judge, force=force) if any(ckpts.values()) else {})
points = frontier_points(evaluations, ckpts, reference, ends)
plotting.gold_kl_frontier(points, reference)

# %% [markdown]
# Read a line against its own start, never against the large markers. The table puts each stage's final gain
# over SFT on the line's prompts beside its gain on all the prompts: where they differ in sign or size, the
# prompts only the markers see, or a fresh draw of replies, decide it.

# %%
line_gains(points, reference)

# %% [markdown]
# ## 5. Gold beside proxy over training: did the reward model start lying?
# The online RL stages log, per step, the mean gold reward (`objective/gold`) and the mean proxy reward of
# the very samples they trained on: the reward model's score before the missing-EOS penalty
# (`objective/raw_scores`; each stage's `objective/scores`, drawn in section 6, has the penalty subtracted). When the
# policy finds answers the reward model over-rates, the proxy keeps rising while gold stalls or falls (Gao et
# al. 2022). The parting point is defined precisely in `evaluate.parting_point`: after smoothing both curves
# over 5 steps (the lines; the dots are single steps), the first step after which gold gains at most
# `gold_tol` while the proxy still ends higher by more than the larger of `min_proxy_rise` and twice the proxy's
# own noise, in a run whose proxy rose, and where gold then falls short of keeping pace with the proxy by more
# than twice its noise. The noise is each
# curve's own step-to-step scatter: without that test, a gold curve rising with the proxy "parted" in about
# half of simulated 40-step runs with this run's kind of scatter, the last steps' gain being lost in it.
#
# Two cautions. These are training prompts and training-length replies, so neither curve is on the scale of
# the table's columns (held-out prompts, `cfg.max_new_tokens`). And each step's mean is over a few prompts (2
# to 4 in the cpu profile): over 6–8 steps (PPO 8, GRPO and RLOO 6), a parting point would need a proxy that
# climbs clearly, which a short CPU run's does not. Each stage's sentence below says which case it is.

# %%
over = gold_proxy_over_training(run_dir)
for stage, s in over.items():
    print(f"{stage}: {s['note']}")
plotting.gold_vs_proxy(over)

# %% [markdown]
# ## 6. Every stage's training curves
# The same `metrics.jsonl` files the live plots of earlier notebooks drew from, side by side, a row of panels per
# stage. What to look for: SFT's and the reward model's losses falling (their own notebooks say by how much);
# in each RL stage, whether `objective/gold` follows `objective/scores` (the proxy) or parts from it, the
# over-optimisation section 5 measures; and `objective/kl` growing steadily rather than in a jump, which would say
# a step moved the policy far from its reference.

# %%
curves = stage_metrics(run_dir)
plotting.stage_curves(curves, {s: curve_keys(s, rows) for s, rows in curves.items()})

# %% [markdown]
# ## 7. Save the results and build the report
# `run_dir/eval/summary.json` holds the table, the frontier and the parting points;
# `run_dir/eval/report.html` puts them and every figure on one page that opens without a network.
# `.venv/bin/python -m rlhf_helpers.check_results RUN_DIR` reads the summary and checks the README's promises.

# %%
summary = {"profile": profile, "seed": seed, "reference": reference, "policies": table, "missing": missing,
           "frontier": points, "parting": {s: v["parting"] for s, v in over.items()},
           "parting_notes": {s: v["note"] for s, v in over.items()}, "config": cfg,
           "wall_time_s": time.perf_counter() - t0}
atomic_write_json(stage_dir(run_dir, "eval") / "summary.json", summary)
report = build_report(run_dir)
print(f"report: {report} ({report.stat().st_size / 1e6:.1f} MB, plotly.js inlined)")

# %% [markdown]
# ## What you saw, and what to try
# - Every policy of the run on the same prompts: gold and proxy reward, win rate against SFT with its
#   interval, KL to SFT, diversity and length.
# - The reward–KL frontier of the final policies and their checkpoints, and the gold and proxy curves of the
#   online RL stages, and whether (and where) they part.
#
# Try: a larger `n_prompts` and `samples_per_prompt` (narrower intervals; 72 is the whole test split: 72 prompts with
# 3 replies each narrowed the gain's interval to ±0.015–0.021 for the trained policies on the cpu run, against
# ±0.05–0.07 for 32 prompts with one reply, and moved PPO's gain over SFT from −0.035 to +0.010; on two cores each
# policy takes about 7 minutes at 72 × 3: the README's run took 14 minutes for SFT and PPO); in notebook 04, a smaller
# KL coefficient or more steps, then come back here and watch the frontier stretch right and, once the proxy climbs,
# look for a parting point; read the answers of the policy with the highest proxy score and lowest gold: what did it
# learn?
