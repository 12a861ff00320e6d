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
# # 02 · Supervised fine-tuning with LoRA
#
# RLHF starts from a model that already answers in the right shape. Supervised fine-tuning (SFT) gets it
# there: show the model a few hundred good answers and train it to predict them. The SFT model is also the
# *reference* every later stage stays close to and the policy the online stages start sampling from, so what
# it can and cannot produce shapes everything after it.
#
# **What you will learn**
# 1. What the model actually sees: the chat template, and why the loss falls on the answer only.
# 2. How LoRA trains a few million parameters instead of all of them.
# 3. How to watch a fine-tuning run (train and held-out loss) and check it did what you wanted: the SFT
#    model against the base model on held-out prompts, judged by the gold judge of notebook 01.

# %% tags=["parameters"]
run_dir: str = "runs/dev"  # where this run's artifacts go; this notebook writes run_dir/sft/
profile: str = "cpu"  # smoke | cpu | gpu: steps, batch size, comparison size
seed: int = 0  # seed for data order, dropout and sampling
model_name: str = ""  # base model; empty keeps the profile's (SmolLM2-135M-Instruct on CPU)
max_steps: int = 0  # optimizer steps; 0 keeps the profile's value
use_lora: bool = True  # LoRA adapter (True) or full fine-tuning (False)
learning_rate: float = 0.0  # 0 keeps the profile's (2e-3 on cpu, a LoRA rate); take about a tenth without LoRA

# %% [markdown]
# ## Setup
# Every setting lives in `SFTStageConfig` (documented fields, in `rlhf_helpers/sft.py`); the profile
# overrides a few, and the parameters above override the profile.

# %%
import time

from IPython.display import HTML, display

from rlhf_helpers import plotting
from rlhf_helpers.config import stage_config
from rlhf_helpers.evaluate import compare_policies, generate_and_score, heldout_prompts, refusal_counts, refusal_rate
from rlhf_helpers.gold import GoldJudge
from rlhf_helpers.paths import stage_dir
from rlhf_helpers.sft import SFTStageConfig, build_trainer, load_demonstrations, loss_mask_html, train_sft
from rlhf_helpers.tracking import MetricsLogger, read_metrics

t0 = time.perf_counter()
cfg = stage_config(SFTStageConfig, profile, seed=seed, model_name=model_name or None,
                   max_steps=max_steps or None, use_lora=use_lora, learning_rate=learning_rate or None)
out_dir = stage_dir(run_dir, "sft")
cfg

# %% [markdown]
# ## 1. The demonstrations
# `data/sft.jsonl` holds 224 answers written for this suite to be correct, concise, structured where it
# helps, polite without stock phrases, and to refuse harmful requests politely: the style the gold judge
# values (though it checks their form, not their facts). A tenth is held out (by prompt), and `n_eval` of
# those measure the loss on answers the model never trained on.

# %%
train_records, eval_records = load_demonstrations(cfg)
print(f"{len(train_records)} training and {len(eval_records)} held-out demonstrations")
for r in train_records[:2]:
    print(f"\nPROMPT: {r.prompt}\nRESPONSE: {r.response}")

# %% [markdown]
# ## 2. What the model sees, and where the loss falls
# The chat template wraps each exchange in special tokens (`<|im_start|>user`, `<|im_end|>`...), and
# SmolLM2's template adds a default system message. Training on the *whole* sequence would also teach the
# model to write user prompts; we only want it to learn the answers, so every prompt token gets the label
# −100 (ignored by the loss). Grey tokens below carry no loss; green ones do. Note the final `<|im_end|>`
# is green: the model must learn to *stop* (the newline the template writes after it is green too, as TRL
# takes everything after the prompt as the completion; generation ends at `<|im_end|>`, so it does no harm).

# %%
trainer, logger = build_trainer(cfg, run_dir, data=(train_records, eval_records))
display(HTML(loss_mask_html(trainer, 0)))
del trainer

# %% [markdown]
# ## 3. Train
# LoRA freezes the base weights $W$ and learns a low-rank update $W + \frac{\alpha}{r} BA$ with $B \in
# \mathbb{R}^{d\times r}$, $A \in \mathbb{R}^{r\times k}$ ($B$ starts at zero, so training starts from the
# base model exactly) on every linear layer (attention and MLP projections) of the top `lora_layers`
# blocks (16 of SmolLM2's 30 in the cpu profile): a few million trainable parameters instead of 135 million,
# and an adapter of about 10 MB (float32, cpu profile). The curve below redraws as the run logs; a checkpoint
# is saved every `save_steps`, and rerunning this cell after an interruption continues from the last one.
# `parameters` in the summary below counts the trainable ones against the total. Each `train/loss` point is
# the mean over the few batches since the last log, so it jumps; the held-out `eval/loss` is the curve to
# read. The stage saves the adapter (`sft/adapter/`) and, for the stages that follow, a copy of the model with
# the adapter merged in (`sft/model/`, as large as the base). With `use_lora=False` every weight trains, and
# `sft/model/` is the only copy.

# %%
live = plotting.LiveCurves(["train/loss", "eval/loss", "train/mean_token_accuracy"], every=2)
summary = train_sft(cfg, run_dir, on_row=live.update)
{k: summary[k] for k in ("steps", "eval_loss_before", "eval_loss_after", "parameters", "tokens_per_second",
                          "wall_time_s")}

# %% [markdown]
# The live figure above was fed from `metrics.jsonl`; here is the whole run from that file, with two more
# curves. `train/learning_rate` is the schedule: a short warm-up (`warmup`, a fraction of the steps), then
# cosine decay towards 0, so the last steps barely move the weights. `train/grad_norm` is the size of the
# gradient before transformers clips it to norm 1. On the cpu profile (seed 0) it stayed between about 0.4 and 0.7,
# so the clip never acted and the learning rate alone set the step size; a norm that climbs while the loss
# rises says the learning rate is too high.

# %%
rows = read_metrics(out_dir / "metrics.jsonl")
plotting.metric_curves(rows, ["train/loss", "eval/loss", "train/grad_norm", "train/learning_rate"], title="SFT run")

# %% [markdown]
# ## 4. Did it work? Base against SFT on held-out prompts
# Loss going down says the model fits the demonstrations; it does not say the answers got better. So sample
# one answer per held-out prompt from the base model and from the SFT model (same seed, same settings), and
# let the gold judge score both. The **win rate** counts the prompts where SFT's answer scores higher (ties
# count half), with a bootstrap 95% interval over prompts. The **gain** is the mean paired difference in
# gold with its own interval: it keeps the size of each win, so on a few dozen prompts it usually
# separates two policies sooner than the win rate does, though a few large losses can widen it. The two are
# in different units, so read each against its own "no difference": a win-rate interval that excludes 0.5,
# or a gain interval that excludes 0, says SFT differs from the base model on such prompts.

# %%
gold = GoldJudge()
prompts = heldout_prompts(cfg.n_compare)
gen = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=seed, dtype=cfg.dtype,
           device=cfg.device, batch_size=cfg.generation_batch_size)
base_rows = generate_and_score(cfg.model_name, prompts, gold, **gen)
sft_rows = generate_and_score(summary["model_dir"], prompts, gold, **gen)
table, wr = compare_policies(sft_rows, base_rows, "sft", "base")
print(f"gold: base {table['base gold'].mean():.3f}, SFT {table['sft gold'].mean():.3f}; "
      f"SFT win rate {wr['win_rate']:.2f} [{wr['ci_low']:.2f}, {wr['ci_high']:.2f}] over {wr['n']} prompts; "
      f"mean gold gain {wr['gain']:+.3f} [{wr['gain_ci_low']:+.3f}, {wr['gain_ci_high']:+.3f}]")

# %%
display(plotting.paired_scores(table, "base gold", "sft gold"))
table.head(8)

# %% [markdown]
# Read the replies as well as their scores. The gold judge scores form (an answer of the right shape and
# length, finished, not repetitive; a refusal where one is due), not facts: a fluent wrong answer can score
# 1.0. That is the judge this suite uses as the truth, and it is also a surface that later stages can learn
# to please without getting anything more right.

# %% [markdown]
# ## 5. Does it refuse a harmful request?
# One domain of the demonstrations is polite refusals. The mean gold above barely shows whether they were learnt:
# harmful prompts are one in eight. Yet they matter more than their share. PPO, GRPO and RLOO learn only from what
# this model *samples*: they reinforce what their rollouts contain, and a model that never refuses gives them no
# refusal to reinforce, so the gold judge's reward for refusing a harmful request stays out of their reach. (Notebook
# 03's live preference pairs are this model's answers too; on the cpu profile most of its pairs, though, come from a
# shipped snapshot sampled from the committed cpu run's SFT model, and those hold refusals either way.) So count
# refusals directly: several samples for each held-out harmful prompt, at the temperature later stages sample at, and
# false refusals among the benign answers above.

# %%
harmful = [p["prompt"] for p in heldout_prompts() if p["domain"] == "refusal"]
probe = dict(samples_per_prompt=cfg.n_refusal_samples, temperature=cfg.temperature, seed=seed, dtype=cfg.dtype,
             device=cfg.device)
refusals = {name: refusal_rate(path, harmful, **probe)
            for name, path in (("base", cfg.model_name), ("sft", summary["model_dir"]))}
counts = refusal_counts(sft_rows)  # the replies of section 4, harmful and benign prompts apart
for name, r in refusals.items():
    print(f"{name}: refuses {r['refused']}/{r['n']} answers to {len(harmful)} held-out harmful prompts "
          f"({r['rate']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}])")
print(f"sft: false refusals {counts['refused_benign']}/{counts['benign_replies']} benign held-out answers")
print("\n".join(f"  e.g. {e[:100]!r}" for e in refusals["sft"]["examples"]))

# %% [markdown]
# A rate of zero here would be the most important number in this notebook: no online RL stage could be
# expected to repair it, since they only reinforce refusals they sample. It was zero in an earlier version of
# the cpu profile, 24 steps of 8 demonstrations at learning rate 1e-3: in a separate probe, on a slightly
# smaller training set, that model refused 0 of 48 samples on 12 harmful prompts it had no demonstration for.
# Taking the demonstrations 4 at a time for 48 steps at learning rate 2e-3 (the profile now) made it refuse
# some of the time, with a lower held-out loss, in about the same time. Both changed together and their
# shares were not measured apart; one reading is that a short answer that is one demonstration in eight is
# learnt late, and more, larger-rate steps reach it within the same budget. The cell above gives this run's
# rate. Its interval takes the prompt as the unit, and is the wider of a bootstrap over prompts and Wilson's
# interval over them: a bootstrap cannot put an interval around a rate it never saw move (the base model,
# which refused none of its samples, would get [0.00, 0.00]), where Wilson's gives [0.00, 0.30] for none of
# 9 prompts: 36 samples show that a model refuses seldom, not that it never does.

# %% [markdown]
# ## Save the summary

# %%
summary.update({
    "profile": profile, "seed": seed, "n_compare": len(prompts),
    "gold_base_mean": float(table["base gold"].mean()), "gold_sft_mean": float(table["sft gold"].mean()),
    "win_rate_vs_base": wr, "refusal_rate_base": refusals["base"]["rate"],
    "refusal_rate_sft": refusals["sft"]["rate"], "refusals_n": refusals["sft"]["n"],
    "notebook_wall_time_s": time.perf_counter() - t0,
})
MetricsLogger(out_dir).summary(summary)
{k: summary[k] for k in ("gold_base_mean", "gold_sft_mean", "win_rate_vs_base", "refusal_rate_sft",
                         "notebook_wall_time_s")}

# %% [markdown]
# ## What you saw, and what to try
# - The chat template as tokens, and the loss mask that keeps the prompt out of the loss.
# - A LoRA run whose held-out loss falls (the training loss is noisy: in a single pass every batch is new), and an SFT
#   model that the gold judge scores above the base model on prompts neither saw in training, though 24 prompts are
#   too few to be sure of it (the win rate's interval holds 0.5). On 72 held-out prompts × 3 replies
#   (`.venv/bin/python -m rlhf_helpers.evaluate --run-dir RUN --n-prompts 72 --samples-per-prompt 3 base`) the base
#   model scores below SFT beyond its interval: the README's table.
#
# Try: `use_lora=False` with `learning_rate=2e-4` (full fine-tuning: slower, more memory, a bigger file; at the
# profile's LoRA rate every weight would move ten times too far, and the config warns; it also notes that the
# profile's `lora_layers` has no effect then); more `max_steps` (watch the held-out loss for the point where it stops
# falling); a different `model_name`. Next, notebook 03 samples from this SFT model to build preference pairs and
# trains a reward model on them.
