"""Policies in a run folder (rlhf_helpers.policies) and their shared evaluation (evaluate_stage).

A tiny random Llama with SmolLM2's tokenizer plays the SFT model, so loading, sampling and KL run in
seconds; adapters are saved as the stages save them.
"""
import json

import pytest
import torch

from rlhf_helpers import evaluate, policies
from rlhf_helpers.evaluate import EvalConfig, evaluate_stage
from rlhf_helpers.models import load_tokenizer


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    run = tmp_path_factory.mktemp("run")
    tok = load_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    sft = LlamaForCausalLM(cfg)
    sft.save_pretrained(run / "sft" / "model")
    tok.save_pretrained(run / "sft" / "model")
    base = str(run / "sft" / "model")
    # a trained-looking adapter (non-zero B) for ppo, and an untouched one (B = 0) for grpo
    moved = get_peft_model(LlamaForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    moved.save_pretrained(run / "ppo" / "adapter")
    moved.save_pretrained(run / "ppo" / "checkpoints" / "step-2" / "adapter")
    fresh = get_peft_model(LlamaForCausalLM.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj"]))
    fresh.save_pretrained(run / "grpo" / "adapter")
    fresh.save_pretrained(run / "grpo" / "checkpoints" / "checkpoint-3")
    (run / "grpo" / "checkpoints" / "checkpoint-x").mkdir()  # not a checkpoint: ignored
    return run


def small_cfg(**kw):
    return EvalConfig(**{"n_prompts": 3, "max_new_tokens": 6, "batch_size": 2, **kw})


def test_available_policies_and_checkpoints(run_dir):
    assert policies.available_policies(run_dir) == ["base", "sft", "ppo", "grpo"]
    assert [s for s, _ in policies.policy_checkpoints(run_dir, "ppo")] == [2]
    assert [s for s, _ in policies.policy_checkpoints(run_dir, "grpo")] == [3]
    assert policies.policy_checkpoints(run_dir, "dpo") == []
    assert policies.adapter_base(run_dir / "ppo" / "adapter") == str(run_dir / "sft" / "model")


def test_missing_stage_names_the_notebook(run_dir):
    with pytest.raises(FileNotFoundError, match="notebook 05"):
        policies.load_policy(run_dir, "dpo")


def test_a_copied_run_loads_its_adapters_on_its_own_sft_model(run_dir, tmp_path, monkeypatch):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    assert policies.adapter_base(copy / "ppo" / "adapter") == str(run_dir / "sft" / "model")  # peft's absolute path
    loaded = []

    class Stop(Exception):
        pass

    def load_model(path, **kw):
        loaded.append(path)
        raise Stop

    monkeypatch.setattr("rlhf_helpers.models.load_model", load_model)
    for run in (copy, run_dir):
        with pytest.raises(Stop):
            policies.load_policy(run, "ppo")
    assert loaded == [str(copy / "sft" / "model"), str(run_dir / "sft" / "model")]  # each run's own SFT model


def test_loaded_adapter_changes_the_policy_and_disables_to_the_reference(run_dir):
    model, tok = policies.load_policy(run_dir, "ppo")
    ref, _ = policies.load_policy(run_dir, "sft")
    ids = tok(["Hello there"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        moved = model(ids).logits
        with model.disable_adapter():
            disabled = model(ids).logits
        plain = ref(ids).logits
    assert torch.allclose(disabled, plain, atol=1e-5)
    assert not torch.allclose(moved, plain, atol=1e-3)


def test_kl_is_zero_for_an_untouched_adapter_and_positive_on_average_for_a_moved_one(run_dir):
    cfg = small_cfg(n_prompts=6, max_new_tokens=8)
    _, fresh = evaluate_stage(run_dir, "grpo", cfg, reward_model=None)
    rows, moved = evaluate_stage(run_dir, "ppo", cfg, reward_model=None)
    assert fresh["kl_mean"] == pytest.approx(0.0, abs=1e-5)
    assert moved["kl_mean"] > 0.0  # KL(p || q) >= 0; its Monte-Carlo mean over 6 samples is positive here
    assert all(r["kl"] is not None and r["proxy"] is None for r in rows)
    assert {"gold_mean", "distinct_1", "distinct_2", "length_mean", "eos_frac"} <= set(moved)


def test_evaluate_stage_caches_and_recomputes_when_settings_change(run_dir, monkeypatch):
    cfg = small_cfg()
    rows, metrics = evaluate_stage(run_dir, "sft", cfg, reward_model=None)
    assert metrics["kl_mean"] == 0.0 and len(rows) == 3
    assert metrics["rows_file"].startswith("eval/policies/sft.") and metrics["rows_file"].endswith(".jsonl")
    cached = json.loads((run_dir / metrics["rows_file"]).with_suffix(".json").read_text())
    assert cached["metrics"] == metrics

    def fail(*a, **k):
        raise AssertionError("the cached evaluation should have been reused")

    monkeypatch.setattr(policies, "load_policy", fail)
    again, _ = evaluate_stage(run_dir, "sft", cfg, reward_model=None)
    assert again == rows
    with pytest.raises(AssertionError, match="reused"):
        evaluate_stage(run_dir, "sft", small_cfg(seed=1), reward_model=None)


def test_several_samples_per_prompt_come_prompt_major_and_are_cached_apart(run_dir, monkeypatch):
    rows, metrics = evaluate_stage(run_dir, "sft", small_cfg(samples_per_prompt=2), reward_model=None)
    assert [(r["prompt"], r["sample"]) for r in rows][:4] == [(rows[0]["prompt"], 0), (rows[0]["prompt"], 1),
                                                              (rows[2]["prompt"], 0), (rows[2]["prompt"], 1)]
    assert len(rows) == 6 and metrics["n"] == 6 and metrics["prompts"] == 3 and metrics["samples_per_prompt"] == 2
    assert rows[0]["response"] != rows[1]["response"]  # two samples, not one reply twice
    one, one_metrics = evaluate_stage(run_dir, "sft", small_cfg(), reward_model=None)
    assert len(one) == 3  # the one-sample evaluation comes from its own cache entry, not the two-sample one
    assert one_metrics["rows_file"] != metrics["rows_file"]

    def fail(*a, **k):
        raise AssertionError("a cached evaluation should have been reused")

    monkeypatch.setattr(policies, "load_policy", fail)  # both are now served from the cache, neither replaced
    assert evaluate_stage(run_dir, "sft", small_cfg(samples_per_prompt=2), reward_model=None)[0] == rows
    assert evaluate_stage(run_dir, "sft", small_cfg(), reward_model=None)[0] == one
    monkeypatch.undo()
    ckpt, m = evaluate_stage(run_dir, "ppo", small_cfg(samples_per_prompt=2), reward_model=None, name="ppo-step2",
                             adapter=run_dir / "ppo" / "checkpoints" / "step-2" / "adapter")
    assert len(ckpt) == 3 and m["samples_per_prompt"] == 1  # checkpoints take one sample per prompt


def test_same_seed_same_samples_and_the_progress_bar_changes_nothing(run_dir, capsys):
    model, tok = policies.load_policy(run_dir, "ppo")
    a = evaluate.sample_with_kl(model, tok, ["Say hi.", "Name a colour."], max_new_tokens=6, seed=3)
    assert "reply" not in capsys.readouterr().err  # no bar unless one is named
    b = evaluate.sample_with_kl(model, tok, ["Say hi.", "Name a colour."], max_new_tokens=6, seed=3,
                                progress="ppo: 2 held-out prompts")
    assert a == b
    err = capsys.readouterr().err
    assert "ppo: 2 held-out prompts" in err and "2/2" in err  # the bar counted both replies


def test_an_interrupted_sampling_closes_its_bar(monkeypatch):
    from tqdm.auto import tqdm

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("rlhf_helpers.ppo.rollout", interrupted)
    try:
        evaluate.sample_with_kl(None, None, ["Say hi."], max_new_tokens=6, progress="interrupted sampling")
    except KeyboardInterrupt:  # the traceback is still held here, as Jupyter holds it after an interruption
        left = [bar for bar in tqdm._instances if bar.desc == "interrupted sampling"]
    assert left == []  # the bar was closed, not left on screen until the traceback goes


def test_kl_does_not_depend_on_how_the_samples_are_chunked(run_dir, monkeypatch):
    model, tok = policies.load_policy(run_dir, "ppo")
    prompts = ["Say hi.", "Name a colour.", "Count to three."]
    whole = evaluate.sample_with_kl(model, tok, prompts, max_new_tokens=6, seed=3)
    monkeypatch.setattr(evaluate, "FORWARD_CHUNK", 1)  # one sequence per forward pass
    one_by_one = evaluate.sample_with_kl(model, tok, prompts, max_new_tokens=6, seed=3)
    assert [r["response"] for r in one_by_one] == [r["response"] for r in whole]
    assert [r["kl"] for r in one_by_one] == pytest.approx([r["kl"] for r in whole], abs=1e-4)


@pytest.mark.parametrize("config, why", [("{oops", "JSONDecodeError"), ("[10]", "AttributeError"),
                                         ('{"max_steps": "ten"}', "ValueError"),
                                         ('{"max_steps": -1}', "max_steps=-1 is negative")])
def test_checkpoints_of_a_stage_whose_config_cannot_be_read_are_all_listed_and_said(tmp_path, capsys, config, why):
    for step in (5, 10, 11):
        (tmp_path / "dpo" / "checkpoints" / f"checkpoint-{step}").mkdir(parents=True)
        (tmp_path / "dpo" / "checkpoints" / f"checkpoint-{step}" / "adapter_config.json").write_text("{}")
    path = tmp_path / "dpo" / "config.json"
    path.write_text(config)
    assert [s for s, _ in policies.policy_checkpoints(tmp_path, "dpo")] == [5, 10, 11]
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: cannot read the stage's max_steps (") and why in out
    assert "including any past the stage's end" in out
    assert [s for s, _ in policies.policy_checkpoints(tmp_path, "dpo", say=False)] == [5, 10, 11]
    (tmp_path / "grpo").mkdir()
    (tmp_path / "grpo" / "config.json").write_text(config)  # no checkpoints to list: nothing to say
    assert policies.policy_checkpoints(tmp_path, "grpo") == [] and capsys.readouterr().out == ""
    path.write_text('{"max_steps": 10}')  # readable again: the checkpoint past the end is left out, as before
    assert [s for s, _ in policies.policy_checkpoints(tmp_path, "dpo", say=False)] == [5, 10]


def test_evaluate_stage_recomputes_after_retraining_or_a_new_reward_model(run_dir, tmp_path, monkeypatch):
    """The cache is reused while the weights and the run's reward model are those it was made from, and only then."""
    import os
    import shutil

    from rlhf_helpers import reward_model

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("eval"))  # this test touches files: a copy
    norm = run / "rm" / "model" / "normalization.json"  # a run with a reward model (loading it is faked: None)
    norm.parent.mkdir(parents=True, exist_ok=True)
    norm.write_text("{}")
    monkeypatch.setattr(reward_model, "load_run_reward_model", lambda *a, **k: None)
    cfg = small_cfg(n_prompts=2, max_new_tokens=4)
    step2 = run / "ppo" / "checkpoints" / "step-2" / "adapter"
    rows, _ = evaluate_stage(run, "ppo", cfg)  # reward_model="auto": the run's
    ckpt, _ = evaluate_stage(run, "ppo", cfg, name="ppo-step2", adapter=step2)

    class Recomputed(Exception):
        pass

    def recompute(*a, **k):
        raise Recomputed

    def later(path):  # as a retraining leaves it: written after the cached evaluation
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**10))
        return st

    def restore(path, st):
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    monkeypatch.setattr(policies, "load_policy", recompute)
    assert evaluate_stage(run, "ppo", cfg)[0] == rows  # nothing changed: served from the cache
    assert evaluate_stage(run, "ppo", cfg, name="ppo-step2", adapter=step2)[0] == ckpt
    before = later(norm)  # a new reward model
    with pytest.raises(Recomputed):
        evaluate_stage(run, "ppo", cfg)
    with pytest.raises(Recomputed):
        evaluate_stage(run, "ppo", cfg, name="ppo-step2", adapter=step2)
    with pytest.raises(Recomputed):  # scored by no reward model: not what the cache holds either
        evaluate_stage(run, "ppo", cfg, reward_model=None)
    restore(norm, before)
    assert evaluate_stage(run, "ppo", cfg)[0] == rows  # the reward model the cache was made with: reused again
    later(run / "ppo" / "adapter" / "adapter_model.safetensors")  # PPO retrained
    with pytest.raises(Recomputed):
        evaluate_stage(run, "ppo", cfg)
    assert evaluate_stage(run, "ppo", cfg, name="ppo-step2", adapter=step2)[0] == ckpt  # its checkpoint did not change
    later(step2 / "adapter_model.safetensors")
    with pytest.raises(Recomputed):
        evaluate_stage(run, "ppo", cfg, name="ppo-step2", adapter=step2)
