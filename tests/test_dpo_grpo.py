"""DPO, GRPO and RLOO stages: config mappings onto TRL, the implicit reward against TRL's own, a DPO step
raising the margin, the reward adapter, the shared metric aliases, resume, and the comparison's discussion.

Training tests use a tiny random Llama with SmolLM2's real tokenizer (TRL needs a real tokenizer), saved to a
temporary folder, so each run takes seconds."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.utils.notebook import NotebookProgressCallback

from rlhf_helpers.comparison import comparison_table, discussion
from rlhf_helpers.config import stage_config
from rlhf_helpers.data import PreferencePair
from rlhf_helpers.dpo import (
    DPOStageConfig, PeakMemory, build_trainer, completion_ids, length_notice, length_report, pair_implicit_margins,
    train_dpo,
)
from rlhf_helpers.callbacks import quiet_datasets, without_notebook_progress
from rlhf_helpers.dpo import build_trl_config as dpo_trl_config
from rlhf_helpers.dpo import trl_kwargs as dpo_trl_kwargs
from rlhf_helpers.sft import SFTStageConfig
from rlhf_helpers.models import default_lora_config, load_model, load_tokenizer
from rlhf_helpers.online_rl import (
    GRPOStageConfig, RLOOStageConfig, SampleRecorder, objective_aliases, train_grpo, train_rloo,
)
from rlhf_helpers.online_rl import build_trl_config as rl_trl_config
from rlhf_helpers.policies import adapter_base, load_policy, policy_checkpoints
from rlhf_helpers.reward_model import RewardModel
from rlhf_helpers.rewards import RewardFunction, RewardOutput, as_trl_reward_func
from rlhf_helpers.tracking import read_metrics


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    """A 2-block random Llama with SmolLM2's tokenizer (pad <|endoftext|>, EOS <|im_end|>), saved to disk."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


PAIRS = [PreferencePair(f"Tell me about {t}.", f"{t.capitalize()} are lovely and worth learning about.", "zq xv kk zq",
                        metadata={"gold_chosen": 1.0, "gold_rejected": 0.0}) for t in ("cats", "maps", "bees", "boats")]


# --- config mappings ------------------------------------------------------------------------------------

def test_dpo_config_maps_onto_trl(tmp_path):
    cfg = stage_config(DPOStageConfig, "cpu", max_steps=7, beta=0.3, learning_rate=1e-4, seed=3, grad_accum=2)
    args = dpo_trl_config(cfg, tmp_path)
    assert (args.max_steps, args.beta, args.learning_rate, args.seed, args.data_seed) == (7, 0.3, 1e-4, 3, 3)
    assert args.per_device_train_batch_size == cfg.batch_size and args.gradient_accumulation_steps == 2
    assert args.max_length == cfg.max_length and args.truncation_mode == "keep_start" and args.loss_type == ["sigmoid"]
    assert args.save_steps == cfg.save_steps and args.logging_steps == cfg.logging_steps
    assert args.bf16 is False and args.fp16 is False and args.use_cpu is True  # TRL's own default is bf16=True
    assert args.gradient_checkpointing is False and args.disable_dropout is True  # TRL's default checkpoints
    assert args.precompute_ref_log_probs is False and args.report_to in ("none", [], ["none"])
    assert args.eval_strategy == "no"  # eval_steps=0: evaluated once, at the end
    assert args.loss_weights is None  # sft_weight 0: plain DPO, no second term
    rpo = dpo_trl_config(stage_config(DPOStageConfig, "cpu", sft_weight=0.5), tmp_path)
    assert (rpo.loss_type, rpo.loss_weights) == (["sigmoid", "sft"], [1.0, 0.5])  # RPO: DPO + 0.5 x chosen NLL
    with pytest.raises(ValueError, match="sft_weight must be >= 0"):
        DPOStageConfig(sft_weight=-1.0)
    gpu = dpo_trl_kwargs(stage_config(DPOStageConfig, "gpu"), tmp_path, with_eval=True)  # not built: no GPU here
    assert gpu["bf16"] is True and gpu["use_cpu"] is False and gpu["eval_strategy"] == "steps"
    with pytest.raises(ValueError, match="beta must be > 0"):
        DPOStageConfig(beta=0.0)
    with pytest.raises(ValueError, match="unknown|no field"):
        stage_config(DPOStageConfig, "cpu", kl_coef=0.1)


@pytest.mark.parametrize("cls", [GRPOStageConfig, RLOOStageConfig])
def test_online_configs_map_onto_trl_with_a_kl_term(cls, tmp_path):
    from trl import GRPOConfig, RLOOConfig

    cfg = stage_config(cls, "cpu", seed=2)
    args = rl_trl_config(cfg, tmp_path)
    assert isinstance(args, GRPOConfig if cls is GRPOStageConfig else RLOOConfig)
    assert args.beta == cfg.beta > 0  # the KL is used and logged
    assert (args.num_generations, args.per_device_train_batch_size) == (cfg.num_generations, cfg.batch_size)
    assert args.generation_batch_size == cfg.batch_size and args.steps_per_generation == 1  # fresh samples every step
    assert args.max_completion_length == cfg.max_completion_length and args.temperature == cfg.temperature == 0.7
    assert (args.top_k, args.top_p, args.num_iterations) == (0, 1.0, 1)
    assert args.reward_weights == [1.0, 0.0]  # the proxy is optimised, the gold only logged
    assert args.bf16 is False and args.use_cpu is True and args.gradient_checkpointing is False
    assert (args.max_steps, args.learning_rate, args.seed) == (cfg.max_steps, cfg.learning_rate, 2)
    if cls is GRPOStageConfig:
        assert (args.loss_type, args.scale_rewards) == ("grpo", "group")
        assert args.use_bias_correction_kl is True  # TRL's default, said in the docstring: ratio × k3
        assert rl_trl_config(stage_config(cls, "cpu", use_bias_correction_kl=False), tmp_path).use_bias_correction_kl \
            is False  # the paper's k3 gradient
    else:
        assert args.normalize_advantages is False
    with pytest.raises(ValueError, match="multiple of num_generations"):
        cls(batch_size=6, num_generations=4)
    with pytest.raises(ValueError, match="num_generations must be >= 2"):
        cls(batch_size=4, num_generations=1)


def test_trl_grpo_default_has_no_kl(tmp_path):
    """Why our GRPO sets beta: TRL's GRPOConfig defaults to 0 (no reference, no KL logged)."""
    from trl import GRPOConfig, RLOOConfig

    assert GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False).beta == 0.0
    assert RLOOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False).beta > 0
    assert GRPOStageConfig().beta > 0 and RLOOStageConfig().beta > 0


# --- pure helpers ---------------------------------------------------------------------------------------

def test_objective_aliases_by_hand():
    row = {"rewards/proxy/mean": 0.5, "rewards/gold/mean": 0.3, "train/kl": 0.02, "completions/mean_length": 10.0}
    out = objective_aliases(row, beta=0.1)
    assert out["objective/scores"] == 0.5 and out["objective/gold"] == 0.3
    assert out["objective/kl_per_token"] == 0.02 and out["objective/kl"] == pytest.approx(0.2)
    assert out["objective/rlhf_reward"] == pytest.approx(0.5 - 0.1 * 0.2) and out["objective/kl_coef"] == 0.1
    assert objective_aliases({"train/loss_mean": 0.1}, 0.1) == {}  # the end-of-training row is no sample row
    no_kl = objective_aliases({"rewards/proxy/mean": 0.5}, beta=0.0)
    assert no_kl["objective/kl"] is None and no_kl["objective/rlhf_reward"] is None
    # truncated replies masked out: TRL's KL is over ended replies' tokens, so their mean length scales it
    ended = objective_aliases({**row, "completions/mean_terminated_length": 4.0}, beta=0.1, ended_only=True)
    assert ended["objective/kl"] == pytest.approx(0.08)


def test_namespaced_puts_every_eval_key_under_eval():
    from rlhf_helpers.callbacks import namespaced

    logs = {"eval_rewards/margins": 0.3, "eval_loss": 0.6, "rewards/margins": 0.2, "loss": 0.7, "epoch": 1.0}
    assert namespaced(logs) == {"eval/rewards/margins": 0.3, "eval/loss": 0.6, "rewards/margins": 0.2,
                                "train/loss": 0.7, "train/epoch": 1.0}


@pytest.mark.parametrize("make", [lambda w: DPOStageConfig(warmup=w), lambda w: GRPOStageConfig(warmup=w),
                                  lambda w: RLOOStageConfig(warmup=w), lambda w: SFTStageConfig(warmup=w)],
                         ids=["dpo", "grpo", "rloo", "sft"])
def test_warmup_is_a_fraction_of_the_steps(make):
    assert make(0.0).warmup == 0.0 and make(0.5).warmup == 0.5
    for bad in (1.0, 5, -0.1):  # transformers reads 1 or more as a number of steps
        with pytest.raises(ValueError, match="warmup is a fraction of max_steps"):
            make(bad)


def test_peak_memory_sees_an_allocation():
    mem = PeakMemory("cpu").start()  # a cpu stage counts host memory, even on a machine with a GPU
    block = torch.ones(64 * 2**20 // 4 * 4)  # 256 MiB of float32, touched
    block += 1
    peak = mem.peak_mb()
    del block
    assert peak >= mem.start_mb + 200, (peak, mem.start_mb)
    assert mem.facts()["peak_memory_kind"] in ("rss_peak_since_start", "rss_peak_of_process")


def test_discussion_is_written_from_the_numbers():
    def row(policy, gold, proxy, kl, win, lo, hi):
        return {"policy": policy, "gold": gold, "proxy": proxy, "kl": kl, "win_rate": win, "ci_low": lo, "ci_high": hi,
                "n": 32}
    results = [row("sft", 0.50, 0.0, 0.0, None, None, None), row("dpo", 0.62, 0.4, 1.5, 0.70, 0.55, 0.85),
               row("grpo", 0.48, 0.9, 3.0, 0.45, 0.30, 0.60)]
    costs = {"dpo": {"samples_seen": 320, "wall_time_s": 100.0, "peak_memory_mb": 900.0, "memory_at_start_mb": 600.0,
                     "peak_memory_kind": "rss_peak_since_start", "steps": 40},
             "grpo": {"samples_seen": 96, "wall_time_s": 400.0, "peak_memory_mb": 1200.0, "steps": 12}}
    table = comparison_table(results, costs)
    assert table[1]["wall_time_s"] == 100.0 and table[0]["wall_time_s"] is None
    # per sample: 100 s / 320 and 400 s / 96; memory above the start only where the start was recorded
    assert table[1]["seconds_per_sample"] == 0.3125 and table[2]["seconds_per_sample"] == pytest.approx(400 / 96)
    assert table[1]["memory_added_mb"] == 300.0 and table[2]["memory_added_mb"] is None
    assert table[0]["seconds_per_sample"] is None and table[0]["memory_added_mb"] is None
    text = discussion(table, "sft")
    assert "**dpo** scored highest" in text and "0.620" in text and "[0.55, 0.85]" in text
    assert "Better than sft beyond the bootstrap interval: dpo" in text
    assert "Not distinguishable from sft" in text and "grpo" in text.split("Not distinguishable")[1]
    assert "over-optimisation: grpo" in text  # proxy up, gold down
    assert "cheapest per training sample was dpo" in text
    assert "dpo 100 s for 320 training samples, 0.3 s each, 300 MB above its starting memory; grpo 400 s for 96 " \
           "training samples, 4.2 s each." in text
    assert "peak" not in text.split("**Cost")[1]  # a peak that includes earlier stages is not quoted
    assert "matched or beat the online methods" in text
    results[1] = row("dpo", 0.40, 0.4, 1.5, 0.30, 0.15, 0.45)  # change the numbers: the text follows
    results[2] = row("grpo", 0.55, 0.9, 3.0, 0.65, 0.52, 0.78)
    text = discussion(comparison_table(results, costs), "sft")
    assert "**grpo** scored highest" in text and "Worse than sft beyond the bootstrap interval: dpo" in text
    assert "Per training sample DPO took 8% of grpo's time" in text  # 0.3125 s of 4.17 s
    assert "grpo beat DPO on gold" in text
    assert "and the gold reward beyond its interval: grpo (proxy +0.90, gold +0.050)" in text  # a rise gold shares
    results[1] = row("dpo", 0.548, 0.4, 1.5, 0.55, 0.40, 0.70)  # within GOLD_TIE of grpo: a tie, not a win
    text = discussion(comparison_table(results, costs), "sft")
    assert "DPO and grpo reached the same gold (0.548 and 0.550" in text and "beat DPO" not in text
    assert "is shared, less than 0.005 apart: grpo (0.550, winning 0.65 [0.52, 0.78]), dpo (0.548" in text
    assert "scored highest" not in text
    results[2] = row("grpo", 0.55, 0.9, 3.0, 0.55, 0.40, 0.70)  # best above sft, but its interval holds 0.5
    text = discussion(comparison_table(results, costs), "sft")
    verdict = text.split("When each wins, by these numbers.")[1]
    assert "None, by gold: the best, grpo (+0.050 over sft, level with dpo), wins 0.55 [0.40, 0.70]" in verdict
    assert "grpo took 4.2 s, 13.3 times dpo's 0.3 s" in verdict  # per sample, not the total budget
    assert "400 s" in text.split("When each wins")[0] and "400 s" not in verdict
    assert "the method to start with" not in verdict and "beat DPO" not in verdict and "paid off" not in verdict
    flat = [row("sft", 0.5, 0.1, 0.0, None, None, None), row("dpo", 0.5, 0.1, 0.0, 0.5, 0.5, 0.5)]
    text = discussion(comparison_table(flat, costs), "sft")  # nothing moved: no winner is named
    assert "no method raised the mean gold reward" in text and "None, yet" in text and "scored highest" not in text
    assert "No method moved measurably" in text
    assert "No method raised the reward model's score beyond resampling noise (0.50 on 32 replies, in units of " \
           "the standard deviation of sft's proxy scores)" in text
    fell = [row("sft", 0.5, 0.1, 0.0, None, None, None), row("rloo", 0.6, -0.9, 0.3, 0.45, 0.30, 0.60)]
    text = discussion(comparison_table(fell, costs), "sft")
    assert "Lowered it beyond resampling noise (0.50 on 32 replies, in units of the standard deviation of sft's " \
           "proxy scores): rloo (proxy -1.00, gold +0.100)" in text
    assert "nothing yet to be gamed" in text
    assert "**rloo** scored highest" in text and "wins fewer than half of its comparisons" in text  # mean vs wins
    # a shared lead whose holders win under half; a count of wins and a size of gains that disagree; KL ± its error
    tied = [row("sft", 0.5, 0.1, 0.0, None, None, None),
            {**row("grpo", 0.6, 0.1, 0.3, 0.45, 0.30, 0.60), "kl_sem": 0.1, "wins": 8, "ties": 13, "losses": 11},
            {**row("dpo", 0.598, 0.1, 0.9, 0.30, 0.15, 0.45), "gain": 0.098, "gain_ci_low": -0.02, "gain_ci_high": 0.2,
             "kl_sem": 0.2}]
    text = discussion(comparison_table(tied, costs), "sft")
    assert "is shared" in text and "Yet grpo, dpo win fewer than half of their comparisons" in text
    assert "grpo (0.600, winning 0.45 [0.30, 0.60]; 8 won, 13 tied, 11 lost)" in text  # ties shown, not hidden
    assert "For dpo the two measures disagree: by the size of its gains it is not told apart from sft, by the " \
           "count of its wins (the win rate's interval) worse than sft." in text
    assert "dpo moved furthest (KL 0.90 ± 0.20 nats per reply), grpo least (0.30 ± 0.10)" in text
    # the verdict goes by the paired gold gain where rows have one: a gain whose interval clears 0 is "better"
    # though the win rate's interval holds 0.5 (many ties); a paired proxy interval decides the proxy's rise
    paired = [{**row("sft", 0.5, 0.0, 0.0, None, None, None), "proxy_gain_ci_low": None},
              {**row("ppo", 0.537, 0.39, 0.5, 0.56, 0.44, 0.69), "gain": 0.037, "gain_ci_low": 0.011,
               "gain_ci_high": 0.067, "proxy_gain": 0.39, "proxy_gain_ci_low": 0.19, "proxy_gain_ci_high": 0.59}]
    paired[0]["proxy_gain_ci_low"] = paired[0]["proxy_gain_ci_high"] = 0.0
    text = discussion(comparison_table(paired, costs), "sft")
    assert "Better than sft beyond the gold gain's interval: ppo." in text and "Not distinguishable" not in text
    assert "the two measures disagree: by the size of its gains it is better than sft, by the count of its wins " \
           "(the win rate's interval) not told apart from sft." in text
    assert "Raised the reward model's score beyond its paired interval (the same prompts, bootstrapped) and the " \
           "gold reward beyond its interval: ppo" in text
    assert "None, by gold" not in text
    paired[1] = {**paired[1], "gain_ci_low": -0.01}  # the gain's interval now holds 0: no winner by gold
    text = discussion(comparison_table(paired, costs), "sft")
    assert "None, by gold: the best, ppo (+0.037 over sft), with a gain interval of [-0.010, +0.067], wins 0.56 " \
           "[0.44, 0.69]: not told apart from sft" in text
    # on fewer than 10 prompts (the smoke profile's 4) no interval is read as a verdict, however it came out
    few = [{**r, "n": 4} for r in paired]
    few[1] = {**few[1], "win_rate": 1.0, "ci_low": 1.0, "ci_high": 1.0, "gain_ci_low": 0.011}
    text = discussion(comparison_table(few, costs), "sft")
    assert "Mean gold on 4 held-out prompts: sft 0.500, ppo 0.537. On fewer than 10 prompts" in text
    assert "Better than" not in text and "[1.00, 1.00]" not in text and "When each wins" not in text
    assert "Raised the reward model's score" not in text and "Gold gained per nat" not in text
    # what needs no interval is still said; with one trained policy there is no furthest and least to name
    assert "ppo moved KL 0.50 nats per reply from the reference." in text and "least" not in text
    # DPO's share of the best's time is quoted when the best is better by its gold gain's interval, as every
    # verdict reads, not by the count of its wins
    cheap = row("dpo", 0.40, 0.4, 1.5, 0.30, 0.15, 0.45)
    gains = {"gain": 0.05, "gain_ci_low": 0.01, "gain_ci_high": 0.09}
    many_ties = {**row("grpo", 0.55, 0.9, 3.0, 0.56, 0.45, 0.66), **gains}  # the win interval holds 0.5
    assert "Per training sample DPO took" in discussion(comparison_table([results[0], cheap, many_ties], costs), "sft")
    level = {**row("grpo", 0.55, 0.9, 3.0, 0.65, 0.52, 0.78), **gains, "gain_ci_low": -0.01}  # wins, gain holds 0
    assert "Per training sample DPO took" not in discussion(comparison_table([results[0], cheap, level], costs), "sft")


# --- the reward adapter ---------------------------------------------------------------------------------

@pytest.mark.slow


def test_reward_adapter_returns_what_the_reward_model_returns(tiny):
    from transformers import LlamaForSequenceClassification

    tok = load_tokenizer(tiny, padding_side="right")
    torch.manual_seed(1)
    head = LlamaForSequenceClassification.from_pretrained(tiny, num_labels=1).eval()
    head.config.pad_token_id = tok.pad_token_id
    rm = RewardModel(head, tok, shift=0.3, scale=2.0, batch_size=2)
    prompts = ["How do I boil an egg?", "Name a colour.", "Why is the sky blue?"]
    replies = ["Put it in boiling water for nine minutes.", "Blue.", "Rayleigh scattering of sunlight by air."]
    expected = rm.score(prompts, replies)
    assert len(set(expected)) == 3  # distinct scores, so a mix-up would show
    fn = as_trl_reward_func(rm, "proxy")
    conversational = fn([[{"role": "user", "content": p}] for p in prompts],
                        [[{"role": "assistant", "content": r}] for r in replies], trainer_state=None)
    assert conversational == expected and fn(prompts, replies) == expected and fn.__name__ == "proxy"
    raw = rm.raw_scores(prompts, replies)
    assert np.allclose(expected, (raw - 0.3) / 2.0)  # the normalised score is what flows into TRL


def test_sample_recorder_passes_scores_through(tmp_path):
    class Words(RewardFunction):
        name = "words_test"

        def compute_reward(self, t):
            return RewardOutput(float(len(t.response.split())))

    rec = SampleRecorder(as_trl_reward_func(Words(), "proxy"), Words(), tmp_path / "s.jsonl", every=2, n=1)
    assert rec.__name__ == "proxy"
    state = type("State", (), {"global_step": 0})()
    assert rec(["p", "q"], ["a b", "c"], trainer_state=state) == [2.0, 1.0]  # step 1: recorded
    state.global_step = 1
    rec(["p"], ["a"], trainer_state=state)  # step 2: recorded
    state.global_step = 2
    rec(["p"], ["x y z"], trainer_state=state)  # step 3: not recorded
    rows = read_metrics(tmp_path / "s.jsonl")
    assert [(r["step"], r["response"], r["proxy"], r["gold"]) for r in rows] == [(1, "a b", 2.0, 2.0),
                                                                               (2, "a", 1.0, 1.0)]


def test_sample_recorder_writes_once_per_block_when_batches_are_reused_and_on_the_main_process_only(tmp_path):
    class Words(RewardFunction):
        name = "words_test"

        def compute_reward(self, t):
            return RewardOutput(float(len(t.response.split())))

    def steps_written(recorder, calls):
        state = type("State", (), {"global_step": 0})()
        for step in calls:
            state.global_step = step - 1  # TRL's state before the step that samples
            recorder(["p"], ["a"], trainer_state=state)
        return [r["step"] for r in read_metrics(recorder.path)] if recorder.path.exists() else []

    # num_iterations 2: TRL samples at steps 1, 3, 5, ...; every 5 steps falls on 5, then 10 is skipped: 11
    rec = SampleRecorder(as_trl_reward_func(Words(), "proxy"), Words(), tmp_path / "a.jsonl", every=5, n=1)
    assert steps_written(rec, [1, 3, 5, 7, 9, 11, 13, 15]) == [1, 5, 11, 15]
    rec = SampleRecorder(as_trl_reward_func(Words(), "proxy"), Words(), tmp_path / "b.jsonl", every=5, n=1)
    assert steps_written(rec, range(1, 11)) == [1, 5, 10]  # sampling every step: the multiples, as before
    rec = SampleRecorder(as_trl_reward_func(Words(), "proxy"), Words(), tmp_path / "c.jsonl", every=5, n=1)
    assert steps_written(rec, [7, 8, 9, 10, 11]) == [10]  # resumed at step 7: the next multiple
    rec = SampleRecorder(as_trl_reward_func(Words(), "proxy"), Words(), tmp_path / "d.jsonl", every=1, n=1)
    rec.is_main_process = False  # another process under accelerate launch
    assert steps_written(rec, [1, 2]) == []


def test_sample_recorder_penalises_replies_that_never_ended_and_logs_the_raw_scores(tmp_path):
    class Words(RewardFunction):
        name = "words_test"

        def compute_reward(self, t):
            return RewardOutput(float(len(t.response.split())))

    logged: dict[str, float] = {}
    rec = SampleRecorder(as_trl_reward_func(Words(), "proxy"), Words(), tmp_path / "s.jsonl", every=0, n=0,
                         eos_token_id=2, missing_eos_penalty=1.5)
    scores = rec(["p", "q"], ["a b c", "d"], completion_ids=[[5, 6, 7], [8, 2]], log_metric=logged.__setitem__)
    assert scores == [3.0 - 1.5, 1.0]  # only the first reply lacks EOS (id 2)
    assert logged == {"objective/raw_scores": 2.0, "response/eos_frac": 0.5}
    with pytest.raises(ValueError, match="missing_eos_penalty"):
        GRPOStageConfig(missing_eos_penalty=-1.0)


# --- DPO on a tiny model --------------------------------------------------------------------------------

def tiny_dpo_config(tiny, **overrides) -> DPOStageConfig:
    base = dict(model_name=tiny, max_steps=1, batch_size=4, learning_rate=5e-3, warmup=0.0, lora_r=8, lora_alpha=16,
                max_length=128, logging_steps=1, save_steps=100, resume=False)
    return DPOStageConfig(**{**base, **overrides})


@pytest.mark.slow
def test_a_dpo_step_raises_the_margin_and_matches_trls_implicit_reward(tiny, tmp_path):
    cfg = tiny_dpo_config(tiny)
    fresh, tok = load_model(tiny, lora=default_lora_config(8, 16, dropout=0.0))
    before_c, before_r = pair_implicit_margins(fresh, tok, PAIRS, cfg.beta)
    assert np.allclose(before_c, 0) and np.allclose(before_r, 0)  # a fresh adapter is the reference
    summary = train_dpo(cfg, tmp_path, tiny, PAIRS, eval_pairs=PAIRS[:2])
    assert summary["steps"] == 1 and summary["pairs_seen"] == 4 and summary["samples_seen"] == 8
    assert summary["lengths"]["train"] == {"pairs": 4, "dropped_prompt_too_long": 0, "truncated": 0}
    policy, tok = load_policy(tmp_path, "dpo")
    after_c, after_r = pair_implicit_margins(policy, tok, PAIRS, cfg.beta)
    margin = after_c - after_r
    assert margin.mean() > 0.005 and (margin > 0).all(), margin  # from exactly 0, on every pair
    # TRL's own evaluation of the same pairs agrees with our implicit reward (same tokens, same formula);
    # leaving out the two end-of-turn tokens would move it by ~10%
    assert summary["eval_margin"] == pytest.approx(margin[:2].mean(), rel=1e-3, abs=1e-7)
    assert adapter_base(tmp_path / "dpo" / "adapter") == tiny  # the adapter's base is the policy folder
    assert policy_checkpoints(tmp_path, "dpo")  # a TRL checkpoint-N adapter
    rows = read_metrics(tmp_path / "dpo" / "metrics.jsonl")
    assert rows[0]["step"] == 1 and rows[0]["rewards/margins"] == 0.0  # step 1 is scored before its update
    saved = json.loads((tmp_path / "dpo" / "summary.json").read_text())
    assert saved["margin_first"] == 0.0 and saved["eval_pairs"] == 2  # the held-out pairs it was scored on
    assert saved["learning_rate_first"] == cfg.learning_rate  # no warm-up: step 1 learns
    assert saved["eval_time_s"] > 0 and saved["wall_time_s"] > 0  # the closing evaluation is timed apart
    assert set(saved["accuracy_halves"]) == {"first_half", "second_half", "change", "change_se", "steps_per_half"}


@pytest.mark.slow
def test_sft_weight_adds_the_chosen_replies_nll_to_the_dpo_loss(tiny, tmp_path):
    # at step 1 the fresh adapter is the reference, so DPO's term is log 2 and the rest is w x the chosen NLL
    model, tok = load_model(tiny)
    nll, n = 0.0, 0
    for p in PAIRS:
        prompt, reply = completion_ids(tok, [{"role": "user", "content": p.prompt}], p.chosen)
        ids = torch.tensor([prompt + reply])
        with torch.no_grad():
            logps = model(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
        nll, n = nll - logps[len(prompt) - 1:].sum().item(), n + len(reply)
    losses = {}
    for w in (0.0, 0.5):
        train_dpo(tiny_dpo_config(tiny, sft_weight=w), tmp_path / str(w), tiny, PAIRS)
        losses[w] = read_metrics(tmp_path / str(w) / "dpo" / "metrics.jsonl")[0]["train/loss"]
    assert losses[0.0] == pytest.approx(np.log(2), abs=1e-4)
    assert losses[0.5] - losses[0.0] == pytest.approx(0.5 * nll / n, rel=1e-3)
    saved = json.loads((tmp_path / "0.5" / "dpo" / "summary.json").read_text())
    assert saved["sft_weight"] == 0.5


@pytest.mark.slow
def test_dpo_tokenisation_and_drop_counts_match_trl(tiny, tmp_path):
    long_prompt = PreferencePair(" ".join(["word"] * 80), "Yes.", "No.", metadata={})
    long_reply = PreferencePair("Hi?", "a long reply " * 30, "No.", metadata={})
    pairs = PAIRS[:2] + [long_prompt, long_reply]
    cfg = tiny_dpo_config(tiny, max_length=64)
    trainer, _ = build_trainer(cfg, tmp_path, tiny, pairs)
    trainer.add_callback(NotebookProgressCallback)  # what a notebook kernel gets; the stage takes it out
    without_notebook_progress(trainer)
    assert not any(isinstance(c, NotebookProgressCallback) for c in trainer.callback_handler.callbacks)
    tok = trainer.processing_class
    report = length_report(tok, pairs, cfg.max_length)
    assert report == {"pairs": 4, "dropped_prompt_too_long": 1, "truncated": 1}
    assert length_notice("train", report, 64) == (
        "DPO train pairs: 1 of 4 are longer than max_length=64 tokens (prompt + reply) and TRL keeps their first 64; "
        "1 of 4 are dropped, their prompt alone filling it (raise max_length to keep them whole).")
    assert len(trainer.train_dataset) == 3  # TRL dropped exactly the one we counted
    kept = [p for p in pairs if p is not long_prompt]
    for ex, pair in zip(trainer.train_dataset, kept):
        prompt_ids, chosen = completion_ids(tok, [{"role": "user", "content": pair.prompt}], pair.chosen)
        assert ex["prompt_ids"] == prompt_ids and ex["chosen_ids"] == chosen
        assert tok.decode(chosen).startswith(pair.chosen[:10]) and "<|im_end|>" in tok.decode(chosen)


# --- GRPO and RLOO on a tiny model ------------------------------------------------------------------------

class Recording(RewardFunction):
    """A deterministic reward that remembers every batch it scored."""

    name = "recording_test"

    def __init__(self, scale: float):
        self.scale, self.batches = scale, []

    def params(self):
        return {"scale": self.scale}

    def value(self, response: str) -> float:
        return self.scale * sum(c.isalpha() for c in response) / max(len(response), 1)

    def score(self, prompts, responses):  # the path TRL's reward functions take (as_trl_reward_func)
        scores = [self.value(r) for r in responses]
        self.batches.append(scores)
        return scores

    def compute_reward(self, t):  # single scores (the sample recorder) are not recorded
        return RewardOutput(self.value(t.response))


PROMPTS = ["How can I save money?", "Name a fruit.", "Why do cats purr?", "Explain rain.", "What is a map?",
           "Give me a tip.", "How do bees fly?", "What is tea?"]


def tiny_rl_config(cls, tiny, **overrides):
    base = dict(model_name=tiny, max_steps=2, batch_size=4, num_generations=2, max_completion_length=6,
                learning_rate=5e-2, save_steps=1, sample_every=1, n_samples=2, resume=False)
    return cls(**{**base, **overrides})


@pytest.mark.slow
@pytest.mark.parametrize("cls,train", [(GRPOStageConfig, train_grpo), (RLOOStageConfig, train_rloo)],
                         ids=["grpo", "rloo"])
def test_online_rows_carry_the_shared_aliases(cls, train, tiny, tmp_path):
    proxy, gold = Recording(1.0), Recording(-2.0)
    cfg = tiny_rl_config(cls, tiny)
    summary = train(cfg, tmp_path, tiny, PROMPTS, proxy, gold)
    rows = [r for r in read_metrics(tmp_path / cfg.stage / "metrics.jsonl") if "objective/scores" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert len(proxy.batches) == len(gold.batches) == 2 and all(len(b) == 4 for b in proxy.batches)
    for row, p, g in zip(rows, proxy.batches, gold.batches):
        assert row["objective/raw_scores"] == pytest.approx(np.mean(p), abs=1e-6)  # the proxy of those very samples
        penalty = cfg.missing_eos_penalty * (1 - row["response/eos_frac"])  # the mean penalty of replies cut short
        assert row["objective/scores"] == pytest.approx(np.mean(p) - penalty, abs=1e-6)
        assert row["objective/gold"] == pytest.approx(np.mean(g), abs=1e-6)
        assert row["train/reward"] == pytest.approx(row["objective/scores"], abs=1e-6)  # gold has weight 0
        assert row["objective/kl"] == pytest.approx(row["objective/kl_per_token"] * row["completions/mean_length"])
        assert row["objective/kl_coef"] == cfg.beta
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # before any update, π = π_ref
    assert rows[1]["objective/kl"] > 0  # after one, the KL is measured
    assert summary["steps"] == 2 and summary["samples_seen"] == 8 and summary["prompts_seen"] == 4
    assert summary["kl_last"] == rows[1]["objective/kl"] and summary["peak_memory_mb"] > 0
    assert adapter_base(tmp_path / cfg.stage / "adapter") == tiny
    assert [s for s, _ in policy_checkpoints(tmp_path, cfg.stage)] == [1, 2]
    samples = read_metrics(tmp_path / cfg.stage / "samples.jsonl")
    assert [s["step"] for s in samples] == [1, 1, 2, 2] and all("gold" in s for s in samples)


@pytest.mark.slow
def test_grpo_under_two_processes_counts_both_and_writes_each_sample_once(tiny, tmp_path, two_processes):
    """What `accelerate launch` does on several processes, on the CPU: torchrun starts two (gloo), each samples its
    own batch_size replies a step, and only the main process writes samples.jsonl."""
    import os

    res = two_processes(os.path.join(os.path.dirname(__file__), "two_process_grpo.py"), tiny, str(tmp_path))
    counts = [json.loads(line[len("COUNTS "):]) for line in res.stdout.splitlines() if line.startswith("COUNTS ")]
    assert sorted(c["rank"] for c in counts) == ["0", "1"] and {c["world"] for c in counts} == {"2"}
    for c in counts:  # 2 steps × 4 replies × 2 processes (the count of one process alone would be 8)
        assert (c["steps"], c["samples_seen"], c["prompts_seen"]) == (2, 16, 8), c
    samples = read_metrics(tmp_path / "grpo" / "samples.jsonl")
    assert [s["step"] for s in samples] == [1, 1, 2, 2]  # n_samples a step, written once (two writers: 8 rows)
    # the summary is the main process's: the other's logger saw no rows, and its summary would be empty
    summary = json.loads((tmp_path / "grpo" / "summary.json").read_text())
    assert summary["scores_first"] is not None and summary["scores_last"] is not None


@pytest.mark.slow
@pytest.mark.parametrize("stage, first_metric", [("sft", "train_loss_first"), ("dpo", "margin_first")])
def test_sft_and_dpo_command_lines_under_two_processes_write_the_main_process_summary_once(tmp_path, stage,
                                                                                          first_metric, two_processes):
    """`accelerate launch` of the SFT and DPO command lines, as torchrun starts it on the CPU (gloo): both
    processes train, one writes the adapter and the summary, and one prints it."""
    res = two_processes("-m", f"rlhf_helpers.{stage}", "--run-dir", str(tmp_path), "--profile", "smoke")
    assert sum(line.startswith("{'steps': 2") for line in res.stdout.splitlines()) == 1, res.stdout[-2000:]
    summary = json.loads((tmp_path / stage / "summary.json").read_text())
    assert summary["steps"] == 2 and summary[first_metric] is not None
    rows = read_metrics(tmp_path / stage / "metrics.jsonl")
    assert len([r["step"] for r in rows if "train/loss" in r]) == len({r["step"] for r in rows if "train/loss" in r})
    assert (tmp_path / stage / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_grpo_reusing_each_batch_counts_the_samples_it_drew(tiny, tmp_path):
    proxy = Recording(1.0)
    cfg = tiny_rl_config(GRPOStageConfig, tiny, num_iterations=2)
    summary = train_grpo(cfg, tmp_path, tiny, PROMPTS, proxy, Recording(0.0))
    assert summary["steps"] == 2 and len(proxy.batches) == 1  # one batch of 4, optimised on twice
    assert summary["samples_seen"] == 4 and summary["prompts_seen"] == 2
    assert [s["step"] for s in read_metrics(tmp_path / cfg.stage / "samples.jsonl")] == [1, 1]


@pytest.mark.slow
def test_grpo_resumes_from_its_checkpoint(tiny, tmp_path):
    train_grpo(tiny_rl_config(GRPOStageConfig, tiny, max_steps=1), tmp_path, tiny, PROMPTS, Recording(1.0))
    samples = tmp_path / "grpo" / "samples.jsonl"
    assert samples.exists()
    with samples.open("a") as f:  # a row an interrupted session wrote after its checkpoint
        f.write(json.dumps({"step": 2, "prompt": "x", "response": "stray"}) + "\n")
    summary = train_grpo(tiny_rl_config(GRPOStageConfig, tiny, max_steps=2, resume=True), tmp_path, tiny, PROMPTS,
                         Recording(1.0))
    assert summary["resumed_from"] and Path(summary["resumed_from"]).name == "checkpoint-1"
    assert summary["steps"] == 2
    recorded = json.loads((Path(summary["resumed_from"]) / "elapsed.json").read_text())["seconds"]
    assert summary["resumed_time_s"] == recorded > 0 and summary["wall_time_s"] > recorded  # both sessions
    rows = [r for r in read_metrics(tmp_path / "grpo" / "metrics.jsonl") if "objective/scores" in r]
    assert [r["step"] for r in rows] == [1, 2]  # step 1 kept once, step 2 added
    assert not any(r.get("response") == "stray" for r in read_metrics(samples))  # redone, not kept


def test_running_a_finished_stage_again_trains_no_further_step(tiny, tmp_path, capsys):
    from safetensors.torch import load_file

    def adapter(stage):
        return load_file(tmp_path / stage / "adapter" / "adapter_model.safetensors")

    runs = {"grpo": lambda: train_grpo(tiny_rl_config(GRPOStageConfig, tiny, max_steps=2, resume=True), tmp_path,
                                       tiny, PROMPTS, Recording(1.0)),
            "dpo": lambda: train_dpo(tiny_dpo_config(tiny, max_steps=2, save_steps=1, resume=True), tmp_path, tiny,
                                     PAIRS)}
    for stage, run in runs.items():
        first = run()
        weights = adapter(stage)
        again = run()  # transformers alone would take a third step here, and a fourth on the next rerun
        assert (first["steps"], again["steps"]) == (2, 2), stage
        assert all(torch.equal(weights[k], v) for k, v in adapter(stage).items()), stage  # the same model
        assert "trained nothing more" in capsys.readouterr().out
        assert again["resumed_time_s"] > 0 and again["peak_memory_earlier_sessions_mb"] > 0  # the first run's
    # a checkpoint past max_steps (a longer run before, or a rerun before this fix): it goes, max_steps' is used
    import shutil

    ckpts = tmp_path / "grpo" / "checkpoints"
    shutil.copytree(ckpts / "checkpoint-2", ckpts / "checkpoint-3")
    state = json.loads((ckpts / "checkpoint-3" / "trainer_state.json").read_text())
    (ckpts / "checkpoint-3" / "trainer_state.json").write_text(json.dumps({**state, "global_step": 3}))
    assert runs["grpo"]()["steps"] == 2 and "past max_steps=2" in capsys.readouterr().out
    assert not (ckpts / "checkpoint-3").exists()


def nudged_copy(folder, dest):
    """`folder` copied to `dest`, then one weight changed: an SFT model retrained in place."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(folder, dest)
    weights = load_file(dest / "model.safetensors")
    name = next(iter(weights))
    save_file({**weights, name: weights[name] + 0.01}, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def test_a_rerun_trains_again_when_the_policy_or_reward_has_changed(tiny, tmp_path, capsys):
    """A finished stage run again is restored from its checkpoint, unless the SFT model it starts from or the
    reward it optimises has changed since (config.json records their fingerprints): resuming a policy trained
    from another model, or against another reward, would report that run as this one."""
    import shutil

    policy = tmp_path / "sft_model"
    shutil.copytree(tiny, policy)

    def grpo(reward, start=policy):
        return train_grpo(tiny_rl_config(GRPOStageConfig, str(start), max_steps=1, resume=True), tmp_path / "run",
                          str(start), PROMPTS, reward)

    assert grpo(Recording(1.0))["resumed_from"] is None
    assert grpo(Recording(1.0))["resumed_from"]  # nothing changed: the finished run is kept
    capsys.readouterr()
    assert grpo(Recording(2.0))["resumed_from"] is None  # another reward: trained again
    assert "other settings (reward_sha256)" in capsys.readouterr().out
    shutil.rmtree(policy)
    nudged_copy(Path(tiny), policy)
    assert grpo(Recording(2.0))["resumed_from"] is None  # the same path, other weights: trained again
    assert "other settings (policy_sha256)" in capsys.readouterr().out


def test_ppo_reruns_when_its_prompts_policy_or_reward_have_changed(tiny, tmp_path, capsys):
    from rlhf_helpers.ppo import PPOConfig, train_ppo

    cfg = PPOConfig(model_name=tiny, batch_size=2, num_mini_batches=1, ppo_epochs=1, response_length=4,
                    max_steps=1, save_steps=1, sample_every=0, n_samples=0, device="cpu")
    other = nudged_copy(Path(tiny), tmp_path / "sft_model")

    def ppo(policy=tiny, reward=Recording(1.0), prompts=PROMPTS[:2]):
        return train_ppo(cfg, tmp_path / "run", str(policy), reward, prompts)

    assert ppo()["resumed_from"] is None
    seen = []
    kept = train_ppo(cfg, tmp_path / "run", tiny, Recording(1.0), PROMPTS[:2], on_row=seen.append)
    assert kept["resumed_from"]  # nothing changed: the finished run is kept
    assert [r["step"] for r in seen] == [1]  # and its live curves are drawn from the rows it kept
    capsys.readouterr()
    for changed, field in ((dict(prompts=PROMPTS[2:4]), "data_sha256"), (dict(reward=Recording(2.0)), "reward_sha256"),
                           (dict(policy=other), "policy_sha256")):
        assert ppo(**changed)["resumed_from"] is None, field
        assert f"other settings ({field})" in capsys.readouterr().out
        ppo()  # back to the first run's inputs, trained again


@pytest.mark.slow
def test_command_lines_run_each_stage(tiny, tmp_path, capsys):
    from rlhf_helpers import dpo, online_rl

    common = ["--run-dir", str(tmp_path), "--profile", "smoke", "--model-name", tiny, "--max-steps", "1"]
    assert dpo.main(common + ["--n-train", "2", "--n-eval", "1", "--beta", "0.2", "--resume", "false"]) == 0
    assert json.loads((tmp_path / "dpo" / "config.json").read_text())["beta"] == 0.2
    assert online_rl.main(["rloo"] + common + ["--beta", "0.07", "--max-completion-length", "4"]) == 0
    saved = json.loads((tmp_path / "rloo" / "config.json").read_text())
    assert saved["beta"] == 0.07 and saved["max_completion_length"] == 4 and saved["num_generations"] == 2
    out = capsys.readouterr().out
    assert "No SFT model" in out and "No reward model" in out  # the fallbacks are said aloud
    assert (tmp_path / "rloo" / "adapter" / "adapter_config.json").exists()


def test_online_curves_compare_the_penalty_free_proxy(tmp_path):
    from rlhf_helpers.comparison import lowest_kl, online_curves
    from rlhf_helpers.tracking import MetricsLogger

    ppo = MetricsLogger(tmp_path / "ppo")  # PPO's scores carry its missing-EOS penalty; raw_scores do not
    ppo.log(1, **{"objective/scores": -0.9, "objective/raw_scores": 0.1, "objective/gold": 0.4, "objective/kl": 0.0})
    ppo.log(2, **{"objective/scores": -0.5, "objective/raw_scores": 0.5, "objective/gold": 0.5, "objective/kl": 0.3})
    ppo.summary({"steps": 2, "samples_seen": 16})
    grpo = MetricsLogger(tmp_path / "grpo")
    grpo.log(1, **{"objective/scores": 0.2, "objective/gold": 0.6, "objective/kl": 0.0})
    grpo.log(1, **{"train/loss_mean": 0.0})  # the end-of-training row: no curve point
    grpo.summary({"steps": 1, "samples_seen": 8})
    curves, per_step = online_curves(tmp_path)
    assert per_step == {"ppo": 8.0, "grpo": 8.0} and "rloo" not in curves
    assert [r["proxy reward"] for r in curves["ppo"]] == [0.1, 0.5] and curves["ppo"][1]["KL to reference (nats)"] == 0.3
    assert curves["grpo"] == [{"step": 1, "proxy reward": 0.2, "gold reward": 0.6, "KL to reference (nats)": 0.0,
                               "share of replies that ended": None}]
    ppo.log(3, **{"objective/scores": -0.7, "objective/raw_scores": 0.3, "objective/gold": 0.5, "objective/kl": -0.2})
    ppo.summary({"steps": 3, "samples_seen": 24})
    curves, _ = online_curves(tmp_path)
    curves["rloo"] = [{"step": 1, "KL to reference (nats)": None}]  # a method with no KL logged is left out
    assert lowest_kl(curves) == {"ppo": -0.2, "grpo": 0.0}


# --- what the comparison shows beside the results ---------------------------------------------------------

def _stage(tmp_path, stage, config, summary):
    (tmp_path / stage).mkdir()
    (tmp_path / stage / "config.json").write_text(json.dumps(config))
    (tmp_path / stage / "summary.json").write_text(json.dumps(summary))


def test_settings_table_shows_what_each_method_was_given(tmp_path):
    from rlhf_helpers.comparison import settings_table

    _stage(tmp_path, "dpo", {"learning_rate": 1e-3, "lr_scheduler": "cosine", "warmup": 0.1, "max_length": 256,
                             "beta": 0.1}, {"steps": 10, "pairs_seen": 40, "samples_seen": 80})
    _stage(tmp_path, "grpo", {"learning_rate": 1e-3, "lr_scheduler": "constant", "warmup": 0.0, "beta": 0.05,
                              "num_generations": 4, "num_iterations": 1, "max_completion_length": 64,
                              "missing_eos_penalty": 1.0}, {"steps": 6, "prompts_seen": 12, "samples_seen": 48})
    _stage(tmp_path, "rloo", {"learning_rate": 1e-3, "lr_scheduler": "constant", "beta": 0.0, "num_generations": 4,
                              "num_iterations": 1, "max_completion_length": 64},
           {"steps": 6, "prompts_seen": 12, "samples_seen": 48})
    _stage(tmp_path, "ppo", {"learning_rate": 3e-4, "ppo_epochs": 2, "num_mini_batches": 1, "response_length": 64,
                             "init_kl_coef": 0.05, "adaptive_kl": False, "missing_eos_penalty": 0.5},
           {"steps": 16, "samples_seen": 128})
    rows = {r["method"]: r for r in settings_table(tmp_path, ("dpo", "grpo", "rloo", "ppo", "missing"))}
    assert list(rows) == ["dpo", "grpo", "rloo", "ppo"]  # a stage that did not run has no row
    assert not (tmp_path / "missing").exists()  # and reading it made no folder
    assert rows["ppo"]["learning rate"] == 3e-4 and rows["ppo"]["passes over each batch"] == 2
    assert rows["ppo"]["prompts drawn"] == 128 and rows["ppo"]["replies per prompt"] == 1
    assert rows["ppo"]["β"].startswith("0.05: per-token")
    (tmp_path / "ppo" / "config.json").write_text(json.dumps({"samples_per_prompt": 4, "group_baseline": True}))
    grouped = {r["method"]: r for r in settings_table(tmp_path, ("ppo",))}["ppo"]
    assert grouped["prompts drawn"] == 32 and grouped["replies per prompt"] == 4  # 128 replies, 4 to each prompt
    assert rows["grpo"]["prompts drawn"] == 12 and rows["grpo"]["replies per prompt"] == 4
    assert rows["grpo"]["β"] == "0.05: k3 per token in the loss" and rows["grpo"]["token cap in training"] == "64 (reply)"
    assert rows["rloo"]["β"] == "0: no KL term, no reference"
    assert rows["ppo"]["missing-EOS penalty"] == 0.5 and rows["grpo"]["missing-EOS penalty"] == 1.0
    assert rows["dpo"]["missing-EOS penalty"] is None  # DPO samples nothing, so nothing is cut off
    assert rows["dpo"]["prompts drawn"] == 40 and rows["dpo"]["training samples"] == 80
    assert rows["dpo"]["schedule"] == "cosine, warm-up 0.1 of the steps" and rows["grpo"]["schedule"] == "constant"


def test_implicit_order_agreement_ignores_each_prompts_level():
    from rlhf_helpers.comparison import implicit_order_agreement

    replies = [("p", "a", 3.0, 0.3), ("p", "b", 1.0, 0.1), ("p", "c", 2.0, 0.5),  # a>b agree, a>c no, c>b agree
               ("q", "d", 0.0, 9.0), ("q", "e", 1.0, -9.0),                       # d<e disagree
               ("q", "d", 0.0, 9.0),                                              # the same reply again: no pair
               ("r", "f", 1.0, 0.0), ("r", "g", 1.0, 5.0)]                        # a tie: left out
    assert implicit_order_agreement(replies) == (2 / 4, 4)
    shifted = [(p, y, a, b + {"p": 100.0, "q": -50.0, "r": 0.0}[p]) for p, y, a, b in replies]
    assert implicit_order_agreement(shifted) == (2 / 4, 4)  # a constant per prompt changes nothing
    assert implicit_order_agreement([("p", "a", 1.0, 1.0)]) == (None, 0)


def test_notes_read_their_numbers_from_the_summaries(tmp_path):
    from rlhf_helpers.comparison import held_out_note, rm_held_out_accuracy, truncation_note
    from rlhf_helpers.plotting import rise_table

    assert rm_held_out_accuracy(tmp_path) is None  # notebook 03 has not run
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "summary.json").write_text(json.dumps(
        {"eval_accuracy": 0.6057, "eval_accuracy_ci": [0.519, 0.692], "eval_pairs": 104}))
    full = rm_held_out_accuracy(tmp_path)
    assert full == {"accuracy": 0.6057, "ci_low": 0.519, "ci_high": 0.692, "pairs": 104}  # a summary before the count
    (tmp_path / "rm" / "summary.json").write_text(json.dumps(  # TRL dropped 3 held-out pairs past max_length
        {"eval_accuracy": 0.6057, "eval_accuracy_ci": [0.519, 0.692], "eval_pairs": 101, "eval_accuracy_pairs": 104}))
    assert rm_held_out_accuracy(tmp_path) == full  # the accuracy's own 104, not TRL's 101
    note = held_out_note({"n_pairs": 24, "rm_pair_accuracy": 0.75, "dpo_pair_accuracy": 0.5}, full)
    assert "reward model orders 0.75 as the annotator did and DPO 0.50" in note
    assert "±0.20 (95%)" in note and "all 104 of its held-out pairs: **0.61 [0.52, 0.69]**" in note
    summary = {"stage": "grpo", "steps": 6, "max_completion_length": 64, "eos_frac_first": 0.0, "eos_frac_last": 0.25,
               "scores_halves": {"first_half": -0.9, "second_half": -1.5, "change": -0.6, "change_se": 0.65},
               "raw_scores_halves": {"first_half": 0.1, "second_half": -0.5, "change": -0.6, "change_se": 0.6},
               "eos_frac_halves": {"first_half": 0.2, "second_half": 0.25, "change": 0.05, "change_se": 0.2},
               "gold_halves": {"first_half": 0.49, "second_half": 0.63, "change": 0.14, "change_se": 0.09}}
    assert truncation_note(summary, 96) == ("grpo: replies that ended within the 64-token training cap: 0% at step 1, "
                                            "25% at step 6; the others lost the missing-EOS penalty. The held-out "
                                            "evaluation lets replies run to 96 tokens.")
    assert "0% at its one step" in truncation_note({**summary, "steps": 1, "eos_frac_first": 0.0, "eos_frac_last": 0.0}, 96)
    table = rise_table(summary)
    assert table.loc["score optimised: proxy − EOS penalty (objective/scores)", "change"] == -0.6
    assert table.loc["replies that ended (response/eos_frac)", "second_half"] == 0.25
    assert len(table) == 4


def test_quiet_datasets_turns_the_bars_off_and_back_on():
    import datasets

    datasets.enable_progress_bars()
    with quiet_datasets():
        assert not datasets.is_progress_bar_enabled()
    assert datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # off before: stays off
    with quiet_datasets():
        pass
    assert not datasets.is_progress_bar_enabled()
    datasets.enable_progress_bars()
