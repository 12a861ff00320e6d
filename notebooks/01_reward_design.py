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
# # 01 · Reward design: writing down what "good" means
#
# In RLHF the reward is where "what good means" is written down, and a policy will find every gap in
# what you wrote. This notebook builds rewards from parts, tunes their weights with sliders, and shows a
# reward being gamed. It ends with a tuned reward config (`.venv/bin/python -m rlhf_helpers.rewards score FILE
# --config run_dir/rewards/reward_config.json` applies it to a JSON-lines file of prompts and replies;
# without `--config` that command scores with the gold judge) and introduces the two pieces every later
# stage relies on: the **gold judge** that plays the human, and a **simulated annotator** that labels
# preference pairs.
#
# **What you will learn**
# 1. The `RewardFunction` API: `compute_reward(trajectory) -> RewardOutput(reward, metadata)`.
# 2. Why a naive keyword reward is easy to game, and what a harder-to-game judge checks instead.
# 3. How to combine components by weights (`0.7 * quality + 0.3 * safety`) and tune them interactively.
# 4. How a simulated annotator turns a gold reward into noisy preferences (Bradley–Terry), and the best
#    accuracy any reward model could reach on them: the **Bayes ceiling**.

# %% tags=["parameters"]
run_dir: str = "runs/dev"  # where this run's artifacts go; this notebook writes run_dir/rewards/
profile: str = "cpu"  # smoke | cpu | gpu (this notebook costs the same in all three)
seed: int = 0  # seed of the simulated annotator
w_length: float = 0.2  # weight of the length-window component
w_structure: float = 0.1  # weight of the structure (lists, steps) component
w_explanation: float = 0.05  # weight of the explanation-marker component
w_politeness: float = 0.0  # weight of the politeness component
w_repetition: float = 0.25  # weight of the repetition-penalty component (1 means no repetition)
w_relevance: float = 0.2  # weight of the relevance-to-prompt component
w_safety: float = 0.2  # weight of the appropriate-refusal component
w_format: float = 0.1  # weight of the format-check component
annotator_temperature: float = 0.1  # Bradley-Terry temperature of the simulated annotator (gold units)

# %% [markdown]
# ## Setup

# %%
import time

from IPython.display import display

from rlhf_helpers import plotting
from rlhf_helpers.gold import GoldJudge, SimulatedAnnotator, bayes_ceiling, label_frequencies
from rlhf_helpers.paths import stage_dir
from rlhf_helpers.reward_tuner import (
    GAMING_KINDS, RewardTuner, candidate_pairs, load_candidates, score_table, top_share_table,
)
from rlhf_helpers.rewards import QualityReward, Trajectory, default_mix
from rlhf_helpers.tracking import MetricsLogger

t0 = time.perf_counter()
out_dir = stage_dir(run_dir, "rewards")
weights = {"length": w_length, "structure": w_structure, "explanation": w_explanation, "politeness": w_politeness,
           "repetition": w_repetition, "relevance": w_relevance, "safety": w_safety, "format": w_format}
candidates = load_candidates()
print(f"{len(candidates)} candidate responses to {len({c['prompt_id'] for c in candidates})} prompts")

# %% [markdown]
# ## 1. The API, and a naive reward
# A `Trajectory` holds a prompt and a response; a `RewardFunction` turns it into a `RewardOutput` with a
# scalar `reward` and `metadata` that explains it. Here is `QualityReward`, the example reward of a
# tutorial on RLHF training with Flux, an RL fine-tuning library (one of the documents this suite grew from),
# unchanged: the kind of reward a first attempt writes. It pays for a
# length band, for words like "First" or "1.", for "because", for "please", and docks points for heavy
# repetition.

# %%
naive, gold = QualityReward(), GoldJudge()
good = next(c for c in candidates if c["kind"] == "good" and c["domain"] == "howto")
stuffed = next(c for c in candidates if c["kind"] == "stuffed" and c["prompt_id"] == good["prompt_id"])
for label, c in [("good", good), ("stuffed", stuffed)]:
    out = naive.compute_reward(Trajectory(c["prompt"], c["response"]))
    gold_reward = gold(Trajectory(c["prompt"], c["response"])).reward
    print(f"{label:8s} naive={out.reward:.2f} gold={gold_reward:.2f}  {out.metadata}")
print("\nPROMPT:", good["prompt"], "\n\nSTUFFED:", stuffed["response"])

# %% [markdown]
# The stuffed response says nothing, yet the naive reward rates it higher than the real answer: it has
# every keyword the reward looks for (over all candidates, the table below: stuffed 0.90, good 0.45). A
# policy trained on this reward would learn to write exactly that.
# This is **reward hacking**, and it is the rule, not the exception: an optimiser maximises what you
# wrote, not what you meant.
#
# ## 2. The gold judge
# The suite needs a stand-in for a careful human, so that later notebooks can ask "did the policy really
# get better, or did it only please the reward model?". Its docstring says what it values and why:

# %%
print(GoldJudge.__doc__)

# %% [markdown]
# Score every candidate with both rewards. Each dot is a response; the kinds marked as gaming were written
# to exploit a keyword reward (stuffing, copying the prompt, looping, padding, unsafe compliance, refusing
# a harmless request).

# %%
table = score_table(candidates, {"naive": naive, "gold": gold})
display(plotting.rewards_by_kind(table, ["naive", "gold"], gaming_kinds=GAMING_KINDS))
table.groupby("kind")[["naive", "gold"]].mean().round(2).sort_values("gold", ascending=False)

# %% [markdown]
# Read the gold column too, for what this judge cannot do. It checks form, not facts: the answers marked
# `poor` (vague or wrong, but fluent) outscore the short, correct ones marked `okay`. And it docks short
# answers. A policy optimised against it could learn to be long and fluent rather than right. In this suite
# the gold judge is the yardstick every stage is measured by, and it is not the truth: a real human
# evaluation, or a stronger judge, would be the next step.

# %% [markdown]
# ## 3. Components and a weighted mix
# Practical rewards are built from parts, each scoring in [0, 1] (higher is better), combined by weights,
# so a mix's top score is the sum of its weights (1.1 with this notebook's), not 1.
# `0.7 * quality + 0.3 * safety` works literally: `RewardFunction`s support `+` and scalar `*`, and a
# combination reports every component in its metadata.

# %%
mix = default_mix(weights)
out = mix(Trajectory(good["prompt"], good["response"]))
print(f"reward = {out.reward:.3f}")
{name: round(score, 3) for name, score in out.metadata["components"].items()}

# %% [markdown]
# ## 4. Tune the weights
# Move a slider and the ranked table and the histogram follow. The number to watch is the rank agreement
# (Spearman) between your tuned reward and the gold judge, and how many gaming responses sit in the top
# quarter. At the notebook's weights the stuffed answers already hold five of the six highest places; raise
# `politeness` and `explanation` and they take all of the top ten while Spearman falls from 0.30 to 0.20.
# Then try to push them down (`tuner.search()`, below, finds the weights that do best). **Save config** writes `run_dir/rewards/reward_config.json`, which
# `.venv/bin/python -m rlhf_helpers.rewards score FILE --config` reads; no later notebook reads it (the online methods
# of notebooks 04 and 05 optimise notebook 03's reward model, or the gold judge). (Run headless by
# papermill, the tuner is built with the weights from the parameters cell and saved as they are.)

# %%
tuner = RewardTuner(candidates, mix, save_path=out_dir / "reward_config.json")
tuner

# %%
config_path = tuner.save()  # interactive users: press the button instead, after tuning
print(f"saved {config_path}; Spearman with gold: {tuner.agreement:.3f}; "
      f"gaming share of the top quarter: {tuner.gaming_top_share:.0%}")

# %% [markdown]
# Sliders try one setting at a time. `tuner.search()` tries them all: every weight in {0, 0.25, 0.5, 1}
# for each of the eight components, the 65,535 settings with a non-zero weight (4^8 less the all-zero one),
# scored the way the tuner scores its sliders, best by Spearman first. Set the sliders to a row (with the
# prompt picker on all prompts) and the tuner shows the same two numbers.

# %%
best_weights = tuner.search()
best_weights

# %% [markdown]
# The best settings here keep repetition and safety and switch off every component a keyword can fake
# (length, structure, explanation, politeness, format). They reach a Spearman of about 0.65 with gold, where
# the weights above reach about 0.3, and they still rank some gaming answers in the top quarter. Tuning
# by hand against a judge finds which parts are proxies; it does not make the proxies better.

# %% [markdown]
# ## 5. Reward hacking, measured
# For each reward, which responses does it put on top? A reward you would be happy to optimise puts the
# honest answers first. The keyword reward does not.

# %%
scorers = {"naive": naive, "tuned mix": tuner.reward, "gold": gold}
hacking = top_share_table(score_table(candidates, scorers), list(scorers), GAMING_KINDS)
hacking

# %% [markdown]
# ## 6. The simulated annotator
# Real preference data comes from people who disagree with each other and with themselves. The simulated
# annotator models that with Bradley–Terry: shown responses $a$ and $b$, it prefers $a$ with probability
# $P(a \succ b) = \sigma\big((g(a) - g(b)) / T\big)$, where $g$ is the gold reward and $T$ a temperature: low
# $T$ is a consistent rater, high $T$ a noisy one. Label every within-prompt pair of candidates many times
# and compare the observed frequencies with the curve.

# %%
annotator = SimulatedAnnotator(judge=gold, temperature=annotator_temperature, seed=seed)
prompts, resp_a, resp_b = candidate_pairs(candidates)
freq = label_frequencies(annotator, prompts, resp_a, resp_b, repeats=100)
display(plotting.bt_label_frequencies(freq, annotator_temperature))
print(f"{len(prompts)} pairs, each labelled 100 times")

# %% [markdown]
# ## 7. The Bayes ceiling
# Even a perfect reward model, one that knows the gold reward exactly, cannot predict a noisy annotator's
# every label. Its expected accuracy is $\mathbb{E}[\max(p, 1-p)]$ with $p = \sigma(\Delta/T)$: the **Bayes
# ceiling**. Notebook 03 computes the same ceiling on its own held-out pairs and measures its trained
# reward model against it, a far more honest yardstick than "accuracy went up".

# %%
g_a, g_b = gold.score(prompts, resp_a), gold.score(prompts, resp_b)
temperatures = [0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
ceilings = {T: bayes_ceiling(g_a, g_b, T) for T in temperatures}
display(plotting.bayes_ceiling_curve(ceilings, annotator_temperature))
{f"T={T}": round(c, 3) for T, c in ceilings.items()}

# %% [markdown]
# ## Save the summary

# %%
gaming = table["kind"].isin(GAMING_KINDS)
summary = {
    "profile": profile, "seed": seed, "n_candidates": len(candidates), "n_pairs": len(prompts),
    "reward_config": str(config_path), "weights": tuner.weights,
    "gold_mean_good": float(table.loc[table["kind"] == "good", "gold"].mean()),
    "gold_mean_gaming": float(table.loc[gaming, "gold"].mean()),
    "naive_mean_gaming": float(table.loc[gaming, "naive"].mean()),
    "naive_gaming_top_share": float(hacking.loc["naive", "gaming share of top quarter"]),
    "gold_gaming_top_share": float(hacking.loc["gold", "gaming share of top quarter"]),
    "tuned_spearman_with_gold": tuner.agreement,
    "searched_weights": best_weights.iloc[0][tuner.names].to_dict(),
    "searched_spearman_with_gold": float(best_weights["Spearman with gold"].iloc[0]),
    "annotator_temperature": annotator_temperature,
    "bayes_ceiling": ceilings.get(annotator_temperature, bayes_ceiling(g_a, g_b, annotator_temperature)),
    "bayes_ceiling_by_temperature": {str(T): c for T, c in ceilings.items()},
    "wall_time_s": time.perf_counter() - t0,
}
MetricsLogger(out_dir, resume=False).summary(summary)
summary

# %% [markdown]
# ## What you saw, and what to try
# - A keyword reward rates stuffed, content-free answers twice as high as good ones (0.90 against 0.45); the
#   gold judge, whose gates (repetition, stuffing, copying, gibberish) multiply its merit, does not.
# - A weighted mix of simple components can be tuned towards the gold judge, but only so far: the best
#   weights switch off every component a keyword can fake, and even they leave much of gold's order
#   unexplained. Every component is a proxy, which is why later stages learn a reward model from
#   preferences instead.
# - The simulated annotator's labels follow the Bradley–Terry curve, and its noise sets a ceiling on any
#   reward model's accuracy.
#
# Try: set `w_politeness` and `w_explanation` to 1 in the parameters cell and rerun from the setup cell on
# (or move those two sliders in section 4), then read section 5 again; lower `annotator_temperature` to
# 0.02 and watch the ceiling rise. It stops short of 1 (about 0.955 as T goes to 0), because 27 of the
# 303 pairs tie exactly in gold, mostly gaming answers that all score 0, and a tie is a coin flip at any
# temperature. Next, notebook 02 teaches the model to answer in the style the
# gold judge values, by supervised fine-tuning.
