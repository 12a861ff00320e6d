"""The reward model (notebook 03): TRL's RewardTrainer on a scalar-head backbone, plus diagnostics.

Backbone: the SFT model (or any causal LM) loaded as `AutoModelForSequenceClassification(num_labels=1)`,
whose `score` head reads the hidden state of the last non-padding token. The text of a reply is the
tokenizer's chat template over the prompt and the reply (`scoring_text`), as TRL's RewardTrainer renders its
training pairs. ChatML (SmolLM2's template) ends the reply's turn with `<|im_end|>\\n`, so the token the head
reads is that `\\n`. Padding uses `<|endoftext|>`, a token the template never writes, so padding is never
taken for text. LoRA adapts the top `lora_layers` blocks only: the backward pass stops below them, which
makes training about three times cheaper on a CPU; the head is trained in full (`modules_to_save=["score"]`).

Loss (Bradley–Terry): −log σ(r(x, y_w) − r(x, y_l)), TRL's, with its small centring term.

After training the scores are normalised so that SFT samples score mean 0 and standard deviation 1; the
shift and scale are saved in `normalization.json` beside the adapter, and `RewardModel` applies them.
Outputs in `run_dir/rm/`: `adapter/`, `normalization.json`, `metrics.jsonl`, `summary.json`, `config.json`.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from .callbacks import (ClockCallback, MetricsCallback, is_main_process, quiet_datasets, train_or_restore,
                        without_notebook_progress)
from .config import DEFAULT_MODEL, SetupError, check_common_fields, command
from .data import PreferencePair, to_trl_preference_dataset
from .models import (_resolve_device, _torch_dtype, block_linears, checkpointing_flag, load_tokenizer,
                     precision_flags, quiet_loading_bars, resolve_model_path)
from .paths import run_sft_model, stage_dir
from .rewards import RewardFunction, RewardOutput, Trajectory
from .seeding import seed_everything
from .tracking import StageClock, atomic_write_dir, atomic_write_json, fingerprint, resume_point


@dataclass
class RMStageConfig:
    """Settings of the preference and reward-model stage."""

    stage: ClassVar[str] = "rm"
    LR_FOLLOWS_LENGTH: ClassVar[bool] = True  # build_trl_config's cosine with a 10% warm-up, over max_steps
    EVAL_ONLY: ClassVar[tuple[str, ...]] = ("n_fresh", "fresh_temperature", "fresh_samples_per_prompt")
    """Fields only notebook 03's fresh samples read, after training (normalisation, rank correlation with gold,
    best-of-n): changing them keeps the trained reward model. `generation_batch_size` is not one: it also
    batches the live samples, and a batch's size changes what a seeded `generate` samples."""

    model_name: str = DEFAULT_MODEL
    """Backbone when run_dir has no SFT model (the notebook uses run_dir/sft/model when present)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator."""
    lora_layers: int | None = 8
    """Adapt only the top N transformer blocks (None: all); the score head is always trained."""
    learning_rate: float = 5e-4
    """Peak learning rate (the head starts from scratch, so higher than SFT's)."""
    max_steps: int = 40
    """Optimizer steps."""
    batch_size: int = 8
    """Pairs per optimizer step."""
    max_length: int = 320
    """Tokens per chat sequence; longer pairs are dropped by TRL, and we count them."""
    center_rewards_coefficient: float = 0.01
    """TRL's penalty on the mean reward, keeping scores centred during training."""
    eval_fraction: float = 0.2
    """Share of pairs held out (split by prompt) for accuracy and calibration."""
    n_train: int | None = None
    """Use at most this many training pairs (None: all)."""
    n_eval: int | None = None
    """Use at most this many held-out pairs (None: all)."""
    eval_steps: int = 20
    """Evaluate every this many steps."""
    logging_steps: int = 2
    """Log every this many steps."""
    save_steps: int = 20
    """Checkpoint every this many steps."""
    annotator_temperature: float = 0.1
    """Bradley–Terry temperature of the simulated annotator that labels live samples."""
    use_snapshot: bool = True
    """Train on data/preference_snapshot.jsonl (plus the live pairs) when it exists."""
    n_live_prompts: int = 8
    """Train prompts sampled live from the SFT policy in the notebook (to show how)."""
    sample_temperatures: tuple[float, ...] = (0.7, 1.3)
    """One sample per prompt at each temperature; consecutive samples are paired."""
    fresh_temperature: float = 1.0
    """Sampling temperature of the fresh held-out samples (normalisation, Spearman with gold)."""
    max_new_tokens: int = 128
    """Reply length when sampling."""
    n_fresh: int = 24
    """Held-out prompts sampled fresh from the SFT policy, for normalisation and the rank correlation with gold."""
    fresh_samples_per_prompt: int = 2
    """Fresh replies per held-out prompt: with two or more, the notebook measures how often the reward model
    orders replies to the same prompt as gold does, and what best-of-n picking by it buys in gold."""
    generation_batch_size: int = 32
    """Replies sampled per `generate` call (live pairs and fresh samples). On 2 CPU cores one batch of 32
    replies of 128 tokens took 49 s, two batches of 16 took 67 s (measured)."""
    dtype: str = "float32"
    """Weights dtype."""
    device: str = "cpu"
    """cpu, cuda or auto."""
    seed: int = 0
    """Seed of the live samples, their labels, the train/held-out split, the fresh samples, and of training
    unless `train_seed` is set."""
    train_seed: int | None = None
    """Seed of training alone (the new head's and LoRA's initial values, the batch order); None: `seed`.
    Change it to see how much training noise alone moves a reward model, on the same pairs and split."""
    resume: bool = True
    """Continue from the last checkpoint in run_dir/rm/checkpoints when one exists and was made with these
    settings and training pairs."""

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "max_length", "eval_steps", "logging_steps", "save_steps",
                     "n_live_prompts", "n_fresh", "max_new_tokens", "generation_batch_size", "lora_r"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        if self.train_seed is not None and (isinstance(self.train_seed, bool) or not isinstance(self.train_seed, int)
                                            or self.train_seed < 0):
            raise ValueError(f"train_seed must be None (train with seed) or a whole number >= 0, "
                             f"got {self.train_seed!r}")
        if not self.use_snapshot and self.n_live_prompts < 2:
            raise ValueError(f"with use_snapshot=False every pair is sampled live, and holding prompts out needs pairs "
                             f"on 2 or more: set n_live_prompts >= 2 (got {self.n_live_prompts}), or use_snapshot=True")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.fresh_temperature < 0:
            raise ValueError(f"fresh_temperature must be >= 0 (0 is greedy), got {self.fresh_temperature}")
        if self.annotator_temperature <= 0:
            raise ValueError("annotator_temperature must be > 0")
        self.sample_temperatures = tuple(float(t) for t in self.sample_temperatures)
        if len(self.sample_temperatures) < 2 or min(self.sample_temperatures) <= 0:
            raise ValueError("sample_temperatures needs at least two positive temperatures, e.g. (0.7, 1.3)")
        if not 0 < self.eval_fraction < 1:
            raise ValueError("eval_fraction must be in (0, 1)")
        if self.fresh_samples_per_prompt < 1:
            raise ValueError(f"fresh_samples_per_prompt must be >= 1 (2 or more to compare replies to one prompt), "
                             f"got {self.fresh_samples_per_prompt}")
        check_common_fields(self)

    @property
    def training_seed(self) -> int:
        """The seed training uses: `train_seed`, or `seed` when it is None."""
        return self.seed if self.train_seed is None else self.train_seed


def lora_for_rm(cfg: RMStageConfig, model):
    """LoRA on the linear layers of `model`'s top `lora_layers` blocks (`models.block_linears`: every block
    without `lora_layers`), with the score head trained in full."""
    from peft import LoraConfig

    names, holder = block_linears(model)
    n_layers = model.config.num_hidden_layers
    layers = None if cfg.lora_layers is None else list(range(max(0, n_layers - cfg.lora_layers), n_layers))
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, task_type="SEQ_CLS",
                      target_modules=names, layers_to_transform=layers, layers_pattern=holder if layers else None,
                      modules_to_save=["score"])


def load_backbone(name: str, dtype: str = "float32", device: str = "cpu", head_from_adapter: bool = False):
    """`(model, tokenizer)`: a sequence classifier with one output, padding with a non-end-of-turn token.

    The score head is new, and transformers reports it as "newly initialized ... consider training". With
    `head_from_adapter` (loading a trained reward model, whose adapter carries the head) that report would
    mislead, so it is silenced; any other warning or error still shows."""
    from transformers import AutoModelForSequenceClassification

    path = resolve_model_path(name)
    tok = load_tokenizer(name, padding_side="right")
    quiet_loading_bars()
    log = logging.getLogger("transformers.modeling_utils")
    level = log.level
    if head_from_adapter:
        log.setLevel(logging.ERROR)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=_torch_dtype(dtype),
                                                                   trust_remote_code=False)
    finally:
        log.setLevel(level)
    model.config.pad_token_id = tok.pad_token_id
    return model.to(_resolve_device(device)), tok


def to_dataset(pairs: Sequence[PreferencePair]):
    """TRL conversational preference examples with an explicit prompt: the pair's whole conversation (a system
    message and earlier turns included), as DPO trains on it."""
    from datasets import Dataset

    return Dataset.from_list(to_trl_preference_dataset(pairs, conversational=True))


def build_trl_config(cfg: RMStageConfig, output_dir: str | Path):
    from trl import RewardConfig

    return RewardConfig(
        output_dir=str(output_dir), max_steps=cfg.max_steps, learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        max_length=cfg.max_length, center_rewards_coefficient=cfg.center_rewards_coefficient,
        eval_strategy="steps", eval_steps=cfg.eval_steps, logging_steps=cfg.logging_steps, logging_first_step=True,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=1, report_to="none",
        **precision_flags(cfg.dtype, cfg.device), **checkpointing_flag(False),
        lr_scheduler_type="cosine", warmup_steps=0.1, seed=cfg.training_seed, data_seed=cfg.training_seed,
        disable_dropout=True,
    )


@quiet_datasets()
def train_reward_model(cfg: RMStageConfig, run_dir: str | Path, backbone: str, train_pairs: Sequence[PreferencePair],
                       eval_pairs: Sequence[PreferencePair], on_row=None) -> tuple["RewardModel", dict[str, Any]]:
    """Train with TRL's RewardTrainer; returns the (un-normalised) RewardModel and training facts."""
    from peft import get_peft_model
    from trl import RewardTrainer

    seed_everything(cfg.training_seed)  # before the backbone loads: the new head's initial values follow it
    out = stage_dir(run_dir, "rm")
    ckpt, logger, settings = resume_point(out, cfg, data=train_pairs, inputs={"backbone": backbone})
    logger.save_config(settings)
    model, tok = load_backbone(backbone, cfg.dtype, cfg.device)
    model = get_peft_model(model, lora_for_rm(cfg, model))
    trainer = RewardTrainer(model=model, args=build_trl_config(cfg, out / "checkpoints"), train_dataset=to_dataset(train_pairs),
                            eval_dataset=to_dataset(eval_pairs), processing_class=tok,
                            callbacks=[MetricsCallback(logger, on_row)])
    without_notebook_progress(trainer)  # the notebook's live curves show progress
    dropped = {"train": len(train_pairs) - len(trainer.train_dataset), "eval": len(eval_pairs) - len(trainer.eval_dataset)}
    if any(dropped.values()):
        print(f"TRL dropped pairs longer than max_length={cfg.max_length} tokens: {dropped}")
    clock = StageClock()  # train_runtime_s times the training alone, as it always has
    clock.resumed(ckpt)
    trainer.add_callback(ClockCallback(clock))
    train_or_restore(trainer, ckpt)
    facts = {"steps": trainer.state.global_step, "train_pairs": len(trainer.train_dataset),
             "eval_pairs": len(trainer.eval_dataset), "dropped_too_long": dropped,
             "train_runtime_s": clock.seconds, "resumed_time_s": clock.before, "resumed_from": ckpt,
             "backbone": backbone, "training_seed": cfg.training_seed}
    model.eval()
    return RewardModel(model, tok), facts


def scoring_text(tokenizer, prompt: str | Sequence[dict], response: str) -> str:
    """The text a reward model reads for `response` to `prompt` (a user message or a message list): the
    tokenizer's chat template over the conversation, as TRL's RewardTrainer renders its training pairs, so
    that any backbone is scored on the text it was trained on. With ChatML this is `chat_prompt(...) +
    response + "<|im_end|>\\n"` exactly (a test checks it on SmolLM2's template)."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    conversation = messages + [{"role": "assistant", "content": response}]
    return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False)


class RewardModel(RewardFunction):
    """A trained reward model as a RewardFunction: r(x, y) = (score(x, y) − shift) / scale."""

    name = "reward_model"

    def __init__(self, model, tokenizer, shift: float = 0.0, scale: float = 1.0, batch_size: int = 8):
        self.model, self.tokenizer, self.shift, self.scale, self.batch_size = model, tokenizer, shift, scale, batch_size
        self.source: str | None = None  # the folder it was loaded from (set by load)
        self.weights_sha256: str | None = None  # that folder's fingerprint (set by load)

    @torch.no_grad()
    def raw_scores(self, prompts: Sequence[str | Sequence[dict]], responses: Sequence[str]) -> np.ndarray:
        """Un-normalised head outputs, batched, right-padded with attention masks. A prompt is a user message
        or a message list (`scoring_text`). Texts are batched in order of length (less padding to compute), and
        the scores returned in the order given."""
        self.model.eval()
        self.tokenizer.padding_side = "right"
        device = next(self.model.parameters()).device
        texts = [scoring_text(self.tokenizer, p, r) for p, r in zip(prompts, responses)]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        scores = np.zeros(len(texts), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            idx = order[start:start + self.batch_size]
            batch = self.tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True,
                                   add_special_tokens=False).to(device)
            scores[idx] = self.model(**batch).logits[:, 0].float().cpu().numpy()  # (B,)
        return scores

    def score(self, prompts: Sequence[str | Sequence[dict]], responses: Sequence[str]) -> list[float]:
        return ((self.raw_scores(prompts, responses) - self.shift) / self.scale).tolist()

    def batch(self, trajectories: Sequence[Trajectory]) -> list[RewardOutput]:
        scores = self.score([t.prompt for t in trajectories], [t.response for t in trajectories])
        return [RewardOutput(s) for s in scores]

    def compute_reward(self, trajectory: Trajectory) -> RewardOutput:
        return self.batch([trajectory])[0]

    def to_config(self) -> dict[str, Any]:
        """Its normalisation and its saved folder's `fingerprint` (None for a model never saved), not where the
        folder lies (a run folder copied elsewhere keeps its checkpoints): what a PPO or GRPO run records of
        its reward, to know on resume whether it changed. A reward model is rebuilt with `RewardModel.load`,
        not `build_reward`."""
        return {"type": self.name, "shift": self.shift, "scale": self.scale, "weights_sha256": self.weights_sha256}

    def fit_normalization(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, float]:
        """Set shift and scale so that these (SFT) samples score mean 0, standard deviation 1."""
        raw = self.raw_scores(prompts, responses)
        self.shift, self.scale = float(raw.mean()), float(raw.std()) if raw.std() > 1e-8 else 1.0
        return {"shift": self.shift, "scale": self.scale, "n": int(raw.size)}

    def save(self, folder: str | Path) -> Path:
        """Adapter + head, tokenizer and normalization.json, moved into place whole."""
        def write(tmp: Path) -> None:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / "normalization.json", {"shift": self.shift, "scale": self.scale})

        return atomic_write_dir(folder, write)

    @classmethod
    def load(cls, folder: str | Path, backbone: str, dtype: str = "float32", device: str = "cpu") -> "RewardModel":
        from peft import PeftModel

        folder = Path(folder)
        model, tok = load_backbone(backbone, dtype, device, head_from_adapter=True)
        model = PeftModel.from_pretrained(model, str(folder)).eval()
        norm = json.loads((folder / "normalization.json").read_text())
        loaded = cls(model, tok, norm["shift"], norm["scale"])
        loaded.source = str(folder)  # evaluation caches know which saved model scored them
        loaded.weights_sha256 = fingerprint(folder)
        return loaded


def load_run_reward_model(run_dir: str | Path, dtype: str = "float32", device: str = "cpu") -> RewardModel | None:
    """The reward model notebook 03 saved in run_dir (None when there is none), on run_dir's SFT model.

    Its adapter, score head and normalisation fit the backbone it was trained on, whose weights' fingerprint
    `rm/config.json` records (`backbone_sha256`): where the SFT model has been trained again since, this
    raises SetupError, saying to train the reward model again, rather than score with a head on weights it
    never saw."""
    rm_dir = stage_dir(run_dir, "rm")
    summary = rm_dir / "summary.json"
    if not (rm_dir / "model" / "normalization.json").exists() or not summary.exists():
        return None
    try:
        backbone = json.loads(summary.read_text())["backbone"]
    except (ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise SetupError(f"{summary}: no readable 'backbone' field ({e.__class__.__name__}: {e}); the reward "
                         f"model's summary is damaged: run notebook 03 again (or python -m "
                         f"rlhf_helpers.reward_model --run-dir {run_dir})") from e
    backbone = run_sft_model(run_dir, backbone)  # this run's SFT model, should the run have moved
    config = rm_dir / "config.json"
    try:
        recorded = json.loads(config.read_text()).get("backbone_sha256") if config.exists() else None
    except ValueError:
        recorded = None  # an unreadable config.json: resume_point reports it when the stage runs again
    if recorded and Path(backbone).exists() and fingerprint(backbone) != recorded:
        raise SetupError(f"{rm_dir}: the reward model was trained on other weights than those now in {backbone} "
                         f"(they differ from {config}'s backbone_sha256: was notebook 02 run again since?). Train "
                         f"the reward model again: run notebook 03 (or python -m rlhf_helpers.reward_model "
                         f"--run-dir {run_dir})")
    return RewardModel.load(rm_dir / "model", backbone, dtype, device)


def split_pairs(pairs: Sequence[PreferencePair], eval_fraction: float, seed: int = 0,
                n_train: int | None = None, n_eval: int | None = None):
    """Train/held-out pairs split by prompt (no prompt on both sides), with at least one pair on each side."""
    from .data import train_test_split

    if len({p.prompt for p in pairs}) < 2:
        raise ValueError(f"need pairs from at least 2 prompts to hold some out; got {len(pairs)} pair(s)")
    train, held = train_test_split(pairs, test_fraction=eval_fraction, seed=seed)
    if not held or not train:  # tiny sets: move one prompt's pairs across
        src, dst = (train, held) if not held else (held, train)
        moved = src[-1].prompt
        dst.extend(p for p in src if p.prompt == moved)
        src[:] = [p for p in src if p.prompt != moved]
    return train[:n_train], held[:n_eval]


# --- diagnostics ----------------------------------------------------------------------------------

def pair_margins(rm: RewardModel, pairs: Sequence[PreferencePair]) -> tuple[np.ndarray, np.ndarray]:
    """Raw scores of the chosen and rejected responses of each pair."""
    prompts = [p.conversation for p in pairs]
    chosen = rm.raw_scores(prompts, [p.chosen for p in pairs])
    rejected = rm.raw_scores(prompts, [p.rejected for p in pairs])
    return chosen, rejected


def accuracy_against_ceiling(chosen: Sequence[float], rejected: Sequence[float], prompts: Sequence[str],
                             ceiling: float, n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """Held-out pair accuracy read against both of its ends: chance (0.5) and the Bayes ceiling.

    `gap_closed` = (accuracy − 0.5) / (ceiling − 0.5) is the share of what could be learnt that was: a
    ratio to the ceiling alone flatters, since a coin flip already scores 0.5 / ceiling of it. The 95%
    interval resamples prompts, keeping a prompt's pairs together (they share the prompt, so they are not
    independent); `gap_closed_low` and `_high` are the same interval on that scale."""
    correct = np.asarray(chosen, dtype=float) > np.asarray(rejected, dtype=float)  # (P,)
    if not len(correct) or len(prompts) != len(correct):
        raise ValueError(f"need one prompt per pair and at least one pair; got {len(correct)} pairs and "
                         f"{len(prompts)} prompts")
    keys = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
    group = np.array([keys[p] for p in prompts])
    hits = np.bincount(group, weights=correct, minlength=len(keys))  # (G,)
    counts = np.bincount(group, minlength=len(keys))  # (G,)
    draws = np.random.default_rng(seed).integers(0, len(keys), (n_boot, len(keys)))  # (B, G)
    low, high = np.quantile(hits[draws].sum(1) / counts[draws].sum(1), [0.025, 0.975])
    accuracy = float(correct.mean())
    span = ceiling - 0.5

    def closed(a: float) -> float:
        return float((a - 0.5) / span) if span > 0 else float("nan")

    return {"accuracy": accuracy, "ci_low": float(low), "ci_high": float(high), "ceiling": float(ceiling),
            "n_pairs": int(len(correct)), "n_prompts": len(keys), "gap_closed": closed(accuracy),
            "gap_closed_low": closed(low), "gap_closed_high": closed(high)}


def calibration_bins(p_chosen: np.ndarray, bins: int = 10) -> dict[str, list[float]]:
    """Predicted P(chosen ≻ rejected) = σ(r_c − r_r), binned by the prediction of the *first-listed* response.

    Each pair is seen from both sides (p and 1 − p, with outcomes 1 and 0), so bins cover [0, 1] and a
    calibrated model puts every bin on the diagonal. Keep `bins` even, so that 0.5 is an edge: with an odd
    number the middle bin holds pairs together with their mirror images and shows (0.5, 0.5) whatever the
    model does, and a weak reward model's predictions mostly fall there."""
    p = np.concatenate([p_chosen, 1 - p_chosen])
    y = np.concatenate([np.ones_like(p_chosen), np.zeros_like(p_chosen)])
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(p, edges) - 1, 0, bins - 1)
    out: dict[str, list[float]] = {"predicted": [], "observed": [], "count": []}
    for k in range(bins):
        m = idx == k
        if m.any():
            out["predicted"].append(float(p[m].mean()))
            out["observed"].append(float(y[m].mean()))
            out["count"].append(int(m.sum()))
    return out


# --- command line -----------------------------------------------------------------------------------

@command
def main(argv: Sequence[str] | None = None) -> int:
    """`python -m rlhf_helpers.reward_model --run-dir R [--profile cpu] [--pairs FILE] [--max-steps N] ...`:
    notebook 03's training from a shell (or under `accelerate launch`). It reads labelled pairs (those notebook
    03 wrote to run_dir/preferences/pairs.jsonl, or FILE in the same format, gold fields included), splits
    them by prompt as the notebook does, trains, normalises on fresh SFT samples of held-out prompts, and
    writes run_dir/rm/model and the summary later stages read. The notebook's live sampling and labelling,
    best-of-n and figures stay in the notebook."""
    import argparse

    from .config import add_stage_arguments, stage_config_from_args
    from .evaluate import generate_and_score, heldout_prompts
    from .gold import GoldJudge, pair_ceiling
    from .preferences import read_pairs
    from .reward_tuner import spearman
    from .sft import sft_policy_path
    from .tracking import MetricsLogger

    parser = argparse.ArgumentParser(prog="python -m rlhf_helpers.reward_model",
                                     description="Reward-model stage (notebook 03's training)")
    parser.add_argument("--pairs", default=None,
                        help="labelled pairs, as notebook 03 writes them (default: run_dir/preferences/pairs.jsonl)")
    add_stage_arguments(parser, RMStageConfig)
    args = vars(parser.parse_args(argv))
    pairs_file = args.pop("pairs")
    run_dir, cfg = stage_config_from_args(parser, RMStageConfig, args)
    path = Path(pairs_file) if pairs_file else stage_dir(run_dir, "preferences") / "pairs.jsonl"
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "no such file"
        fix = ("give --pairs a JSONL file of labelled pairs (python -m rlhf_helpers.data validate FILE --format "
               "preferences checks one)" if pairs_file else
               f"run notebook 03 first (python -m rlhf_helpers.run --only 03 --run-dir {run_dir}), which writes "
               f"it, or pass --pairs FILE")
        raise SetupError(f"{path}: {what}. To fix: {fix}")
    pairs = read_pairs(path)  # a bad line raises DataError, which `command` reports with its file, line and field
    try:
        train_pairs, eval_pairs = split_pairs(pairs, cfg.eval_fraction, cfg.seed, cfg.n_train, cfg.n_eval)
    except ValueError as e:  # too few prompts to hold some out
        raise SetupError(str(e)) from e
    policy_path, fell_back = sft_policy_path(run_dir, cfg.model_name)
    rm, facts = train_reward_model(cfg, run_dir, policy_path, train_pairs, eval_pairs)
    if not is_main_process():  # under accelerate launch every process trained; one evaluates and saves
        return 0
    fresh_prompts = [p for p in heldout_prompts(cfg.n_fresh) for _ in range(cfg.fresh_samples_per_prompt)]
    fresh = generate_and_score(policy_path, fresh_prompts, GoldJudge(), max_new_tokens=cfg.max_new_tokens,
                               temperature=cfg.fresh_temperature, seed=cfg.seed + 1, dtype=cfg.dtype,
                               device=cfg.device, batch_size=cfg.generation_batch_size)
    norm = rm.fit_normalization([r["prompt"] for r in fresh], [r["response"] for r in fresh])
    rho = spearman([r["gold"] for r in fresh], rm.score([r["prompt"] for r in fresh], [r["response"] for r in fresh]))
    chosen, rejected = pair_margins(rm, eval_pairs)
    ceiling = pair_ceiling(eval_pairs)
    report = accuracy_against_ceiling(chosen, rejected, [p.prompt for p in eval_pairs], ceiling, seed=cfg.seed)
    out = stage_dir(run_dir, "rm")
    rm.save(out / "model")
    summary = {"seed": cfg.seed, "policy": policy_path, "fell_back_to_base": fell_back, **facts,
               "pairs_file": str(path), "n_pairs": len(pairs), "annotator_temperature": cfg.annotator_temperature,
               "eval_accuracy": report["accuracy"], "eval_accuracy_ci": [report["ci_low"], report["ci_high"]],
               "eval_prompts": report["n_prompts"], "eval_accuracy_pairs": report["n_pairs"],
               "bayes_ceiling": ceiling, "gap_closed": report["gap_closed"],
               "gap_closed_ci": [report["gap_closed_low"], report["gap_closed_high"]], "spearman_with_gold": rho,
               "normalization": norm, "fresh_samples_per_prompt": cfg.fresh_samples_per_prompt}
    MetricsLogger(out).summary(summary)
    print(f"held-out accuracy {report['accuracy']:.3f} [{report['ci_low']:.3f}, {report['ci_high']:.3f}] on "
          f"{report['n_pairs']} pairs, Bayes ceiling {ceiling:.3f}; Spearman with gold {rho:.3f} on {len(fresh)} "
          f"fresh samples; saved {out / 'model'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
