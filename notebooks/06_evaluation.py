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
# 4. Over-optimisation (Gao et al. 2023): gold beside proxy reward over training, and the point where they part.
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
# differences between rows are differences between policies. Evaluations are cached in
# `run_dir/eval/policies/` (notebooks 04 and 05 use the same cache), and reused while the settings and the
# policy's weights are unchanged.

# %%
import time

import pandas as pd

from rlhf_helpers import plotting
from rlhf_helpers.config import stage_config
from rlhf_helpers.evaluate import (EvalConfig, curve_keys, evaluate_checkpoints, evaluate_stage, format_results,
                                   frontier_points, gold_proxy_over_training, missing_policies, results_table,
                                   stage_metrics)
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
# judge scores each answer; the reward model of notebook 03, normalised so that SFT answers score mean 0 and
# standard deviation 1, gives the proxy score. The KL column is the Monte-Carlo estimate
# $\frac{1}{N}\sum_i \sum_t \big(\log\pi(y_{i,t}) - \log\pi_\text{SFT}(y_{i,t})\big)$ over the policy's own samples.

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
# Win rate against SFT: per prompt, the gold judge picks the better of the two answers; a tie counts half.
# The 95% interval is a percentile bootstrap over prompts, so it shows how much the figure would move on
# another draw of prompts. With a few dozen prompts, intervals are wide: read them before the point estimate.

# %%
reference = "sft" if "sft" in evaluations else "base"
if reference != "sft":
    print("no SFT model in this run: win rates are against the base model instead")
table = results_table(evaluations, reference=reference, seed=seed)
format_results(table, reference)

# %%
plotting.win_rate_bars(table, reference)

# %% [markdown]
# Numbers hide what changed; here are the first answers of every policy to the same prompts.

# %%
pd.DataFrame({"prompt": [r["prompt"][:80] for r in evaluations[reference][0][:3]],
              **{name: [f"[{r['gold']:.2f}] {r['response'][:160]}" for r in rows[:3]]
                 for name, (rows, _) in evaluations.items()}})

# %% [markdown]
# ## 4. The reward–KL frontier
# Every RL method trades divergence from the reference for reward. Plotting gold reward against KL for each
# policy and for each checkpoint saved along its training shows how efficiently each method makes that
# trade: a curve that rises faster, further left, is better (Rafailov et al. 2023, figure 2). Checkpoints are
# scored on the first `cfg.n_checkpoint_prompts` prompts only, and so is every point of their dotted line
# (its ends too), so that a line compares like with like; the large markers use all the prompts.

# %%
ckpts = ({s: evaluate_checkpoints(run_dir, s, cfg, reward_model=rm, judge=judge, force=force)
          for s in present if s not in ("base", "sft")} if checkpoints else {})
print({s: [step for step, _ in c] for s, c in ckpts.items()} or "no checkpoints evaluated")
points = frontier_points(evaluations, ckpts, reference, cfg.n_checkpoint_prompts)
plotting.gold_kl_frontier(points, reference)

# %% [markdown]
# ## 5. Gold beside proxy over training: where the reward model started lying
# The online RL stages log, per step, the mean proxy reward (`objective/scores`) and the mean gold reward
# (`objective/gold`) of the very samples they trained on. Early on both rise together. When the policy finds
# answers the reward model over-rates, the proxy keeps rising while gold stalls or falls (Gao et al. 2023).
# The parting point is defined precisely in `evaluate.parting_point`: after smoothing both curves, the first
# step after which gold gains at most `gold_tol` while the proxy still ends higher by more than `min_proxy_rise`.

# %%
over = gold_proxy_over_training(run_dir)
for stage, s in over.items():
    p = s["parting"]
    print(f"{stage}: " + (f"parting at step {p['step']}: gold {p['gold_at']:.3f} -> {p['gold_end']:.3f}, "
                          f"proxy {p['proxy_at']:.2f} -> {p['proxy_end']:.2f}" if p else "gold kept pace with the proxy"))
plotting.gold_vs_proxy(over)

# %% [markdown]
# ## 6. Every stage's training curves
# The same `metrics.jsonl` files the live plots of earlier notebooks drew from, side by side.

# %%
curves = stage_metrics(run_dir)
plotting.stage_curves(curves, {s: curve_keys(s, rows) for s, rows in curves.items()})

# %% [markdown]
# ## 7. Save the results and build the report
# `run_dir/eval/summary.json` holds the table, the frontier and the parting points;
# `run_dir/eval/report.html` puts them and every figure on one page that opens without a network.
# `python -m rlhf_helpers.check_results RUN_DIR` reads the summary and checks the README's promises.

# %%
summary = {"profile": profile, "seed": seed, "reference": reference, "policies": table, "missing": missing,
           "frontier": points, "parting": {s: v["parting"] for s, v in over.items()}, "config": cfg,
           "wall_time_s": time.perf_counter() - t0}
atomic_write_json(stage_dir(run_dir, "eval") / "summary.json", summary)
report = build_report(run_dir)
print(f"report: {report} ({report.stat().st_size / 1e6:.1f} MB, plotly.js inlined)")

# %% [markdown]
# ## What you saw, and what to try
# - Every policy of the run on the same prompts: gold and proxy reward, win rate against SFT with its
#   interval, KL to SFT, diversity and length.
# - The reward–KL frontier of the final policies and their checkpoints, and the gold and proxy curves of the
#   online RL stages with the point where they part.
#
# Try: a larger `n_prompts` and `samples_per_prompt` (narrower intervals; 72 is the whole test split: 72
# prompts with 3 replies each narrowed the gain's interval to about ±0.02–0.03 on the cpu run, against
# ±0.04–0.08 for 32 prompts with one reply, and moved DPO's gain over SFT from +0.016 to −0.008); in
# notebook 04, a smaller KL coefficient or more steps, then come back here and watch the frontier stretch
# right and the parting point move earlier; read the answers of the policy with the highest proxy score and
# lowest gold: what did it learn?
