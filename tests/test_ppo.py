"""PPO: estimators and losses against slow reference loops, rollouts and masks, and short runs of a tiny
randomly initialised Llama (with a character-level stand-in tokenizer) that learn, repeat, and resume."""
import json
import math
import re
import string

import pytest
import torch
from transformers import BatchEncoding, LlamaConfig, LlamaForCausalLM

from rlhf_helpers.config import stage_config
from rlhf_helpers.gold import GoldJudge
from rlhf_helpers.models import attach_lora, default_lora_config, reference_model
from rlhf_helpers.ppo import (
    AdaptiveKLController, FixedKLController, PPOConfig, PPOTrainer, ValueHead, apply_missing_eos_penalty,
    compute_gae, explained_variance, forward_logprobs_values, generation_config, leave_one_out_baseline,
    list_checkpoints, logprobs_and_entropy, make_experience, masked_mean, masked_whiten, per_token_rewards, ppo_losses,
    print_step, response_mask_from_eos, rollout,
)
from rlhf_helpers.rewards import reward_identity
from rlhf_helpers.tracking import read_json, read_metrics

PAD, BOS, EOS = 0, 1, 2  # as in SmolLM2: the pad token <|endoftext|> is not the end-of-turn token <|im_end|>
# weights N(0, 0.2²): at transformers' default 0.02 the logits are nearly uniform and lm_head's rows so short
# (norm ≈ 0.1) that an adapter on the hidden layers can hardly move them
INIT_RANGE = 0.2


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and leave the machine's other core alone."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class CharTokenizer:
    """Character-level stand-in for SmolLM2's tokenizer: ChatML template, left padding, pad id 0 ≠ EOS."""

    SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    pad_token_id, eos_token_id = PAD, EOS

    def __init__(self, vocab_size: int = 64):
        chars = (string.ascii_lowercase + " .,?!\n'" + string.digits + string.ascii_uppercase)
        self.vocab = self.SPECIAL + list(chars[: vocab_size - len(self.SPECIAL)])
        self.ids = {t: i for i, t in enumerate(self.vocab)}
        self.padding_side = "left"

    def encode(self, text: str) -> list[int]:
        out = []
        for piece in re.split(r"(<\|[a-z_]+\|>)", text):
            if piece in self.ids and piece in self.SPECIAL:
                out.append(self.ids[piece])
            else:
                out.extend(self.ids.get(c, self.ids["?"]) for c in piece)
        return out

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def __call__(self, texts, return_tensors="pt", padding=True, add_special_tokens=False):
        rows = [self.encode(t) for t in texts]
        width = max(len(r) for r in rows)
        ids = [[PAD] * (width - len(r)) + r for r in rows]  # left padding
        mask = [[0] * (width - len(r)) + [1] * len(r) for r in rows]
        return BatchEncoding({"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)})

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.vocab[i] for i in ids if not (skip_special_tokens and i < len(self.SPECIAL)))

    def batch_decode(self, rows, skip_special_tokens=False):
        return [self.decode(r, skip_special_tokens) for r in rows]

    def convert_ids_to_tokens(self, ids):
        return [self.vocab[i] for i in ids]


def tiny_base(seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         initializer_range=INIT_RANGE, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    return LlamaForCausalLM(config)


def tiny_policy(seed: int = 0, r: int = 4):
    return attach_lora(tiny_base(seed), default_lora_config(r=r, alpha=2 * r, dropout=0.0)).eval()


PROMPTS = ["say a", "hello there", "what is up?", "abc", "write a poem", "hi", "tell me more", "ok go"]
TARGET = "0"  # a token the seed-0 tiny model samples ~5% of the time


def fraction_of_target(prompts, responses):
    """Toy reward: the share of response characters (tokens) equal to TARGET."""
    return torch.tensor([r.count(TARGET) / max(len(r), 1) for r in responses])


def share_of_lowercase(prompts, responses):
    """A dense toy reward (every batch has spread), for checks that need non-zero advantages."""
    return torch.tensor([sum(c.islower() for c in r) / max(len(r), 1) for r in responses])


def tiny_config(**overrides) -> PPOConfig:
    base = dict(batch_size=8, num_mini_batches=2, ppo_epochs=2, response_length=8, temperature=1.0,
                learning_rate=1e-2, init_kl_coef=0.05, missing_eos_penalty=0.0, max_steps=4, save_steps=0,
                sample_every=2, n_samples=2, seed=0)
    return PPOConfig(**{**base, **overrides})


def without_timings(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


# --- pure functions against slow references -------------------------------------------------------------

def test_masked_mean_and_whiten_use_valid_tokens_only():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    valid = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert masked_mean(values, mask).item() == pytest.approx(3.0)
    assert masked_mean(values, mask, dim=1).tolist() == pytest.approx([2.0, 4.5])
    white = masked_whiten(values, mask)
    expected = (valid - valid.mean()) / valid.std(unbiased=True)
    assert torch.allclose(white[mask], expected, atol=1e-5)
    assert torch.all(white[~mask] == 0)
    kept = masked_whiten(values, mask, shift_mean=False)  # reward whitening: scale only
    assert torch.allclose(kept[mask], expected + valid.mean(), atol=1e-5)


def test_explained_variance_over_valid_tokens():
    returns = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    values = torch.tensor([[1.5, 2.0, 2.0, -9.0], [4.0, 4.0, 9.0, 9.0]])
    r, v = returns[mask], values[mask]
    expected = 1 - ((r - v) - (r - v).mean()).pow(2).mean() / (r - r.mean()).pow(2).mean()
    assert explained_variance(values, returns, mask).item() == pytest.approx(expected.item())
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)  # perfect predictions
    assert explained_variance(torch.zeros_like(returns), returns, mask).item() == pytest.approx(0.0)
    assert explained_variance(returns + 3, returns, mask).item() == pytest.approx(1.0)  # an offset costs nothing
    assert explained_variance(-returns, returns, mask).item() < 0  # worse than predicting the mean
    assert math.isnan(explained_variance(values, torch.ones_like(returns), mask).item())


def test_logprobs_match_a_loop():
    torch.manual_seed(0)
    logits, tokens, temp = torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3)), 0.7
    got, _ = logprobs_and_entropy(logits, tokens, temp, with_entropy=False)
    for b in range(2):
        for t in range(3):
            row = logits[b, t] / temp
            assert got[b, t].item() == pytest.approx((row[tokens[b, t]] - torch.logsumexp(row, 0)).item(), abs=1e-6)


def test_response_mask_from_first_eos_never_from_pad_id():
    response = torch.tensor([
        [5, EOS, 7, EOS],    # EOS early: everything after it is masked
        [5, PAD, EOS, 9],    # a real token equal to the pad id before EOS stays valid
        [PAD, 4, 5, 6],      # no EOS at all: every token is valid, has_eos False
        [EOS, PAD, PAD, PAD],  # EOS first: the EOS itself is the one valid token
    ])
    mask, has_eos = response_mask_from_eos(response, EOS)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert has_eos.tolist() == [True, True, False, True]


def test_per_token_rewards_and_missing_eos_penalty():
    score = torch.tensor([1.0, -2.0, 0.5])
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, -9.0], [-0.3, -0.2, -7.0, -7.0], [-1.0, -1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -1.0], [-0.1, -0.4, -1.0, -1.0], [-2.0, -1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)  # rows of 3, 2, 4 tokens
    beta = 0.1
    rewards, kl = per_token_rewards(score, logprobs, ref, mask, beta)
    for b in range(3):
        n = int(mask[b].sum())
        for t in range(4):
            want_kl = (logprobs[b, t] - ref[b, t]).item() if t < n else 0.0
            want = -beta * want_kl + (score[b].item() if t == n - 1 else 0.0)  # the score on the last real token
            assert kl[b, t].item() == pytest.approx(want_kl, abs=1e-6)
            assert rewards[b, t].item() == pytest.approx(want, abs=1e-6), (b, t)
    assert rewards[0, 3] == 0 and rewards[1, 2:].abs().sum() == 0  # nothing lands on padding
    penalised = apply_missing_eos_penalty(score, torch.tensor([True, False, False]), 1.0)
    assert penalised.tolist() == pytest.approx([1.0, -3.0, -0.5])


def test_leave_one_out_baseline_is_the_mean_of_each_replys_siblings():
    scores = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 4.0])  # two prompts, three replies each
    baseline = leave_one_out_baseline(scores, 3)
    assert baseline.tolist() == pytest.approx([2.5, 2.0, 1.5, 7.0, 7.0, 10.0])
    assert (scores - baseline).reshape(2, 3).sum(dim=1).tolist() == pytest.approx([0.0, 0.0])
    assert leave_one_out_baseline(scores, 2).tolist() == pytest.approx([2.0, 1.0, 10.0, 3.0, 4.0, 10.0])
    for k in (1, 4):
        with pytest.raises(ValueError, match=f"k >= 2 dividing the batch \\(6\\), got k={k}"):
            leave_one_out_baseline(scores, k)


def test_safety_term_script_adds_the_refusal_rule_to_the_reward_and_repeats_harmful_prompts(load_script):
    script = load_script("scripts/ppo_safety_term.py")
    bomb, garden = "How do I make a pipe bomb?", "How do I grow tomatoes?"
    refuse, comply = "I can't help with that. Please contact a professional.", "Sure, here is how."

    def half(prompts, responses):
        return torch.tensor([0.5] * len(prompts))

    reward_fn = script.SafetyTerm(half, 2.0)
    got = reward_fn([bomb, bomb, garden, garden], [refuse, comply, refuse, comply])
    assert got.tolist() == pytest.approx([2.5, -1.5, -1.5, 2.5])  # +w where the rule holds, -w where not
    # what the PPO stage records of it, so that a rerun with another weight or reward starts over
    identity = reward_identity(reward_fn)
    assert identity["weight"] == 2.0 and identity["reward"] == reward_identity(half) and json.dumps(identity)
    assert reward_identity(script.SafetyTerm(half, 1.0)) != identity
    assert reward_identity(script.SafetyTerm(GoldJudge(), 2.0))["reward"] == GoldJudge().to_config()
    assert script.repeat_harmful([garden, bomb], 3) == [garden, bomb, bomb, bomb]
    assert script.repeat_harmful([garden, bomb], 1) == [garden, bomb]
    with pytest.raises(ValueError, match="at least 1"):
        script.repeat_harmful([garden], 0)


def test_print_step_prints_one_line_a_step_and_nan_gold_when_gold_is_not_watched(capsys):
    metrics = {"objective/scores": 0.25, "objective/kl": 0.125, "time/step_s": 40.04}
    print_step(3, metrics)
    print_step(4, {**metrics, "objective/gold": 0.75})
    assert capsys.readouterr().out.splitlines() == ["step 3: score 0.250 gold nan kl 0.125 (40.0 s)",
                                                    "step 4: score 0.250 gold 0.750 kl 0.125 (40.0 s)"]


def gae_reference(rewards, values, mask, gamma, lam):
    """Slow GAE: A_t = Σ_{k≥t} (γλ)^{k−t} δ_k over each row's valid tokens, V = 0 after the last one."""
    adv, ret = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        n = int(mask[b].sum())
        for t in range(n):
            total = 0.0
            for k in range(t, n):
                next_v = values[b, k + 1].item() if k + 1 < n else 0.0
                delta = rewards[b, k].item() + gamma * next_v - values[b, k].item()
                total += (gamma * lam) ** (k - t) * delta
            adv[b, t] = total
            ret[b, t] = total + values[b, t].item()
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8)])
def test_gae_matches_reference_loop_with_padding(gamma, lam):
    torch.manual_seed(1)
    rewards, values = torch.randn(4, 6), torch.randn(4, 6)
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] + [0] * 5, [1] * 5 + [0]], dtype=torch.bool)
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = gae_reference(rewards, values, mask, gamma, lam)
    assert torch.allclose(adv, ref_adv, atol=1e-5) and torch.allclose(ret, ref_ret, atol=1e-5)
    assert torch.all(adv[~mask] == 0) and torch.all(ret[~mask] == 0)
    with pytest.raises(ValueError, match="prefix"):
        compute_gae(rewards, values, torch.tensor([[1, 0, 1, 1, 1, 1]] * 4, dtype=torch.bool), gamma, lam)


def test_gae_with_zero_values_gives_each_token_lambda_to_the_k_of_the_score():
    """What notebook 04 draws: with V = 0 and only a final score, a token k places before the end gets
    λ^k of it at γ = 1, and all of it at λ = 1 (the return)."""
    T = 64
    score = torch.zeros(1, T)
    score[0, -1] = 1.0
    whole, zeros = torch.ones(1, T, dtype=torch.bool), torch.zeros(1, T)
    k = torch.arange(T - 1, -1, -1, dtype=torch.float32)  # places before the end
    adv, ret = compute_gae(score, zeros, whole, 1.0, 0.95)
    assert torch.allclose(adv[0], 0.95 ** k, atol=1e-6)
    assert torch.allclose(ret[0], adv[0])
    adv1, _ = compute_gae(score, zeros, whole, 1.0, 1.0)
    assert torch.allclose(adv1[0], torch.ones(T))


def test_ppo_losses_match_reference_loop():
    torch.manual_seed(2)
    B, T, eps, eps_v, vf_coef = 3, 5, 0.2, 0.2, 0.1
    old_lp = torch.randn(B, T) - 2
    new_lp = old_lp + 0.4 * torch.randn(B, T)  # some ratios beyond 1 ± ε
    adv, ret = torch.randn(B, T), torch.randn(B, T)
    old_v = torch.randn(B, T)
    new_v = old_v + 0.5 * torch.randn(B, T)
    mask = torch.tensor([[1] * 5, [1] * 2 + [0] * 3, [1] * 4 + [0]], dtype=torch.bool)
    new_lp[1, 3] = 80.0  # garbage on padding must not leak in (exp would overflow)
    loss, m = ppo_losses(new_lp, old_lp, adv, new_v, old_v, ret, mask, eps, eps_v, vf_coef)
    pg, vf, clipped, vclipped, approx, ratios = [], [], [], [], [], []
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            r = math.exp(new_lp[b, t] - old_lp[b, t])
            a = adv[b, t].item()
            unclipped, clip = -a * r, -a * min(max(r, 1 - eps), 1 + eps)
            pg.append(max(unclipped, clip))
            clipped.append(clip > unclipped)
            v, v0, R = new_v[b, t].item(), old_v[b, t].item(), ret[b, t].item()
            vc = v0 + min(max(v - v0, -eps_v), eps_v)
            vf.append(max((v - R) ** 2, (vc - R) ** 2))
            vclipped.append((vc - R) ** 2 > (v - R) ** 2)
            approx.append(0.5 * math.log(r) ** 2)
            ratios.append(r)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert 0 < mean(clipped) < 1 and 0 < mean(vclipped) < 1  # both branches exercised
    assert loss.item() == pytest.approx(mean(pg) + vf_coef * 0.5 * mean(vf), rel=1e-5)
    assert m["loss/policy_avg"] == pytest.approx(mean(pg), rel=1e-5)
    assert m["loss/value_avg"] == pytest.approx(0.5 * mean(vf), rel=1e-5)
    assert m["policy/clipfrac_avg"] == pytest.approx(mean(clipped))
    assert m["val/clipfrac_avg"] == pytest.approx(mean(vclipped))
    assert m["policy/approxkl_avg"] == pytest.approx(mean(approx), rel=1e-5)
    assert m["val/ratio"] == pytest.approx(mean(ratios), rel=1e-5)
    same, m0 = ppo_losses(old_lp, old_lp, adv, old_v, old_v, ret, mask, eps, eps_v, vf_coef)
    assert (m0["val/ratio"], m0["policy/clipfrac_avg"], m0["policy/approxkl_avg"]) == (1.0, 0.0, 0.0)


def test_kl_controllers_follow_ziegler_formula():
    ctl = AdaptiveKLController(0.05, target=6.0, horizon=10000)
    ctl.update(12.0, n_steps=100)  # far above target: error clipped to +0.2
    assert ctl.value == pytest.approx(0.05 * (1 + 0.2 * 100 / 10000))
    before = ctl.value
    ctl.update(6.6, n_steps=100)  # proportional error 0.1
    assert ctl.value == pytest.approx(before * (1 + 0.1 * 100 / 10000)) and ctl.value > before
    before = ctl.value
    ctl.update(3.0, n_steps=100)  # below target: error −0.5 clipped to −0.2
    assert ctl.value == pytest.approx(before * (1 - 0.2 * 100 / 10000)) and ctl.value < before
    fixed = FixedKLController(0.05)
    fixed.update(100.0, n_steps=1000)
    assert fixed.value == 0.05


def test_config_validation_and_profiles():
    cfg = stage_config(PPOConfig, "cpu", batch_size=8, num_mini_batches=2)
    assert cfg.mini_batch_size == 4 and cfg.stage == "ppo"
    paper = PPOConfig()  # the defaults are the paper's; profiles may override them (the cpu one takes λ = 1)
    assert (paper.init_kl_coef, paper.gamma, paper.lam, paper.cliprange, paper.vf_coef) == (0.05, 1.0, 0.95, 0.2, 0.1)
    with pytest.raises(ValueError, match="num_mini_batches"):
        PPOConfig(batch_size=6, num_mini_batches=4)
    with pytest.raises(ValueError, match="temperature"):
        PPOConfig(temperature=0)
    with pytest.raises(ValueError, match="cliprange"):
        PPOConfig(cliprange=1.5)
    with pytest.raises(ValueError, match=r"samples_per_prompt \(3\) must be >= 1 and divide batch_size \(8\)"):
        PPOConfig(batch_size=8, samples_per_prompt=3)
    with pytest.raises(ValueError, match=r"group_baseline .* needs samples_per_prompt >= 2 .*got 1; raise samples_per_prompt"):
        PPOConfig(group_baseline=True)


# --- rollouts and forward passes on a tiny model ---------------------------------------------------------

def test_rollout_masks_after_first_eos_and_decodes_valid_tokens():
    policy, tok = tiny_policy(), CharTokenizer()
    cfg = tiny_config(response_length=40)
    ro = rollout(policy, tok, PROMPTS, cfg, seed=3)
    B, T = ro.response_ids.shape
    assert B == len(PROMPTS) and T <= 40 and ro.query_ids.shape[1] == ro.response_start
    assert ro.has_eos.any() and (~ro.has_eos).any()  # this seed gives both kinds of row
    for b in range(B):
        row, mask = ro.response_ids[b], ro.response_mask[b]
        eos_at = (row == EOS).nonzero()
        n = int(eos_at[0]) + 1 if len(eos_at) else T
        assert bool(ro.has_eos[b]) == (len(eos_at) > 0)
        assert mask.tolist() == [True] * n + [False] * (T - n)
        assert torch.all(row[n:] == PAD)  # padding after EOS
        assert ro.texts[b] == tok.decode(row[:n].tolist(), skip_special_tokens=True).strip()
    assert torch.equal(ro.query_mask, ro.query_ids.ne(PAD).long())  # queries are left-padded


def test_forward_pass_matches_unpadded_rows_and_sampling_distribution(capsys):
    policy, tok = tiny_policy(), CharTokenizer()
    # sampling settings as a hub checkpoint ships them (Qwen2.5-Instruct: repetition_penalty 1.1, top_k 20):
    # generate would apply them on top of PPO's own unless the rollout clears them
    policy.get_base_model().generation_config.update(repetition_penalty=1.5, top_k=3, min_p=0.2,
                                                     no_repeat_ngram_size=2, do_sample=True, temperature=0.3)
    cfg = tiny_config(response_length=6, temperature=0.7)
    ro = rollout(policy, tok, PROMPTS[:4], cfg, seed=1)
    assert "ignoring the sampling settings in its generation_config (do_sample=True, min_p=0.2, " \
           "no_repeat_ngram_size=2, repetition_penalty=1.5, temperature=0.3, top_k=3)" in capsys.readouterr().out
    head = ValueHead(32)
    torch.nn.init.normal_(head.summary.weight)
    with torch.no_grad():
        lp, values, entropy = forward_logprobs_values(policy, head, ro.query_response_ids, ro.attention_mask,
                                                      ro.response_start, cfg.temperature)
    assert lp.shape == values.shape == entropy.shape == ro.response_ids.shape
    for b in range(4):  # slow reference: each row alone, no padding, default positions
        q = ro.query_ids[b][ro.query_mask[b].bool()]
        ids = torch.cat([q, ro.response_ids[b]])[None]
        with torch.no_grad():
            out = policy(input_ids=ids, output_hidden_states=True)
        logits = out.logits[0, len(q) - 1:-1] / cfg.temperature
        want = torch.log_softmax(logits, -1).gather(-1, ro.response_ids[b][:, None])[:, 0]
        n = int(ro.response_mask[b].sum())
        assert torch.allclose(lp[b, :n], want[:n], atol=1e-5)
        probs = torch.softmax(logits, -1)
        want_h = -(probs * torch.log(probs)).sum(-1)  # entropy of softmax(logits / T), written out
        assert torch.allclose(entropy[b, :n], want_h[:n], atol=1e-5)
        want_v = head(out.hidden_states[-1][0, len(q) - 1:-1])
        assert torch.allclose(values[b, :n], want_v[:n], atol=1e-5)
    with torch.no_grad():  # without the entropy: the same log-probs and values, no third tensor
        lp_only, values_only, none = forward_logprobs_values(policy, head, ro.query_response_ids, ro.attention_mask,
                                                             ro.response_start, cfg.temperature, with_entropy=False)
    assert none is None and torch.equal(lp_only, lp) and torch.equal(values_only, values)
    # the sampler draws from exactly softmax(logits / T): compare with generate's own processed scores
    gen = generation_config(cfg, tok)
    assert (gen.top_k, gen.top_p, gen.temperature, gen.do_sample) == (0, 1.0, 0.7, True)
    gen.output_scores, gen.return_dict_in_generate = True, True
    with torch.no_grad():
        out = policy.generate(input_ids=ro.query_ids, attention_mask=ro.query_mask, generation_config=gen)
    sampled = out.sequences[:, ro.response_start:]
    mask, _ = response_mask_from_eos(sampled, EOS)
    lp2, _, _ = forward_logprobs_values(policy, None, out.sequences, torch.cat(
        [ro.query_mask, torch.ones_like(sampled)], 1), ro.response_start, cfg.temperature)
    scores = torch.log_softmax(torch.stack(out.scores, 1), -1).gather(-1, sampled[..., None])[..., 0]
    assert torch.allclose(lp2[mask], scores[mask], atol=1e-4)


# --- the trainer -----------------------------------------------------------------------------------------

def make_trainer(run_dir, cfg=None, reward=fraction_of_target):
    return PPOTrainer(tiny_policy(), CharTokenizer(), reward, cfg or tiny_config(), run_dir, PROMPTS)


def test_updates_checkpoint_where_the_model_asks_for_it_with_dropout_still_off(tmp_path):
    # peft turns gradient checkpointing on for 4-bit models; transformers only checkpoints a layer in training
    # mode, and the policy stays in eval mode (dropout off), so without help the updates kept every activation
    def trainer_and_calls(checkpointing: bool):
        policy = attach_lora(tiny_base(), default_lora_config(r=4, alpha=8, dropout=0.5)).eval()
        if checkpointing:
            policy.get_base_model().gradient_checkpointing_enable({"use_reentrant": False})
        trainer = PPOTrainer(policy, CharTokenizer(), share_of_lowercase, tiny_config(), tmp_path / str(checkpointing),
                             PROMPTS)
        calls, mlp = [], trainer.policy.get_base_model().model.layers[0].mlp
        forward = mlp.forward

        def counted(*args, **kwargs):  # not a forward hook: hooks do not fire when checkpoint recomputes
            calls.append(torch.is_grad_enabled())
            return forward(*args, **kwargs)

        mlp.forward = counted
        return trainer, calls

    plain, plain_calls = trainer_and_calls(False)
    ckpt, ckpt_calls = trainer_and_calls(True)
    m_plain, m_ckpt = plain.step(), ckpt.step()
    # a checkpointed layer runs again in the backward pass: one more call per mini-batch update
    n_updates = plain.cfg.ppo_epochs * plain.cfg.num_mini_batches
    assert len(ckpt_calls) - len(plain_calls) == n_updates
    assert ckpt.minibatch_stats[0]["val/ratio"] == pytest.approx(1.0, abs=1e-6)  # the 0.5 dropout stayed off
    for key in ("loss/policy_avg", "loss/value_avg", "val/ratio", "policy/approxkl_avg"):
        assert m_ckpt[key] == pytest.approx(m_plain[key], rel=1e-4, abs=1e-7)  # the same updates
    layers = ckpt.policy.get_base_model().model.layers
    assert not any(m.training for m in ckpt.policy.modules()) and layers[0].gradient_checkpointing


def test_first_step_starts_at_the_reference_and_updates_only_adapter_and_head(tmp_path):
    # T = 0.7: the reference must be scored at the sampling temperature too, or the step-1 KL is not 0
    trainer = make_trainer(tmp_path, tiny_config(temperature=0.7), reward=share_of_lowercase)
    base = {n: p.detach().clone() for n, p in trainer.policy.named_parameters() if not p.requires_grad}
    lora = {n: p.detach().clone() for n, p in trainer.policy.named_parameters() if p.requires_grad}
    m = trainer.step()
    assert abs(m["objective/kl"]) < 1e-6  # lora_B = 0: the policy is the reference before any update
    assert m["val/explained_variance"] == pytest.approx(0.0, abs=1e-6)  # the head starts at V = 0
    first = trainer.minibatch_stats[0]  # first mini-batch of the first epoch
    assert first["val/ratio"] == pytest.approx(1.0, abs=1e-6)
    assert first["policy/clipfrac_avg"] == 0.0 and first["policy/approxkl_avg"] < 1e-10
    assert len(trainer.minibatch_stats) == trainer.cfg.ppo_epochs * trainer.cfg.num_mini_batches
    named = dict(trainer.policy.named_parameters())
    assert all(torch.equal(named[n], p) for n, p in base.items())  # the base model is frozen
    assert any(not torch.equal(named[n], p) for n, p in lora.items())
    assert trainer.value_head.summary.weight.abs().sum() > 0  # the head learned from 0
    m2 = trainer.step()
    assert m2["objective/kl"] != 0  # now the adapter moved the policy away from the reference
    # disabling the adapter gives back the base model: the same seed builds the same base weights
    ids = torch.tensor([[BOS, 10, 11, 12, 13]])
    fresh = tiny_base()(input_ids=ids).logits
    assert not torch.allclose(trainer.policy(input_ids=ids).logits, fresh, atol=1e-6)
    with reference_model(trainer.policy):
        assert torch.allclose(trainer.policy(input_ids=ids).logits, fresh, atol=1e-6)
    for key in ("objective/kl", "objective/scores", "objective/rlhf_reward", "objective/kl_coef", "policy/approxkl_avg",
                "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "val/ratio", "val/explained_variance", "policy/entropy_avg",
                "response/length_mean", "response/eos_frac", "time/rollout_s", "time/score_s", "time/update_s",
                "tokens/generated"):
        assert isinstance(m2[key], (int, float)), key
    assert m2["objective/rlhf_reward"] == pytest.approx(m2["objective/scores"] - 0.05 * m2["objective/kl"], abs=1e-6)


def test_the_trainer_refuses_a_policy_without_lora_a_pad_that_is_eos_and_an_adapter_of_another_shape(tmp_path):
    with pytest.raises(TypeError, match="LoRA adapter"):
        PPOTrainer(tiny_base(), CharTokenizer(), fraction_of_target, tiny_config(), tmp_path, PROMPTS)
    tok = CharTokenizer()
    tok.pad_token_id = EOS
    with pytest.raises(ValueError, match="pad"):
        PPOTrainer(tiny_policy(), tok, fraction_of_target, tiny_config(), tmp_path, PROMPTS)
    make_trainer(tmp_path, tiny_config(save_steps=1)).train(1)
    other = PPOTrainer(tiny_policy(r=8), CharTokenizer(), fraction_of_target, tiny_config(save_steps=1), tmp_path,
                       PROMPTS)
    with pytest.raises((RuntimeError, ValueError), match="size mismatch|does not fit"):
        other.resume()


def test_missing_eos_penalty_and_adaptive_kl_in_a_step(tmp_path):
    cfg = tiny_config(missing_eos_penalty=1.0, ppo_epochs=1, adaptive_kl=True, whiten_rewards=True)
    trainer = make_trainer(tmp_path, cfg)
    m = trainer.step()
    assert 0 < m["response/eos_frac"] < 1
    assert m["objective/scores"] == pytest.approx(m["objective/raw_scores"] - (1 - m["response/eos_frac"]), abs=1e-6)
    # KL 0 is far below target 6: the error clips to −0.2 and β shrinks by 0.2·batch_size/horizon
    assert trainer.kl_ctl.value == pytest.approx(0.05 * (1 - 0.2 * 8 / 10000))
    before = trainer.kl_ctl.value
    assert trainer.step()["objective/kl_coef"] == before  # the next step's rewards use the updated β


def test_reward_whitening_scales_the_rewards_about_their_mean_and_keeps_the_mean(tmp_path):
    trainer = make_trainer(tmp_path, reward=share_of_lowercase)
    prompts = trainer.prompts_for(1)
    args = (trainer.policy, trainer.value_head, trainer.tokenizer, share_of_lowercase, prompts)
    plain = make_experience(*args, tiny_config(), kl_coef=0.05, seed=1)
    white = make_experience(*args, tiny_config(whiten_rewards=True), kl_coef=0.05, seed=1)
    mask = plain.rollout.response_mask
    assert torch.equal(plain.rollout.response_ids, white.rollout.response_ids)  # the same replies
    r = plain.rewards[mask]
    assert r.std() > 0.1  # a scale that whitening visibly changes
    assert torch.allclose(white.rewards[mask], (r - r.mean()) / r.std() + r.mean(), atol=1e-4)  # TRL's shift_mean=False
    assert torch.all(white.rewards[~mask] == 0)
    assert not torch.allclose(white.advantages, plain.advantages)  # and GAE ran on the whitened rewards


def test_advantage_whitening_is_a_switch(tmp_path):
    trainer = make_trainer(tmp_path, reward=share_of_lowercase)
    args = (trainer.policy, trainer.value_head, trainer.tokenizer, share_of_lowercase, trainer.prompts_for(1))
    white = make_experience(*args, tiny_config(), kl_coef=0.05, seed=1)
    plain = make_experience(*args, tiny_config(whiten_advantages=False), kl_coef=0.05, seed=1)
    mask = plain.rollout.response_mask
    assert torch.equal(plain.rollout.response_ids, white.rollout.response_ids)  # the same replies
    gae, returns = compute_gae(plain.rewards, plain.values, mask, tiny_config().gamma, tiny_config().lam)
    assert torch.allclose(plain.advantages, gae) and torch.allclose(plain.returns, returns)  # GAE as it is
    a = white.advantages[mask]
    assert abs(float(a.mean())) < 1e-5 and float(a.std()) == pytest.approx(1.0, abs=1e-3)  # the default whitens
    assert not torch.allclose(plain.advantages[mask], a)
    assert torch.allclose(white.returns, plain.returns)  # the value targets are never whitened


def test_monitors_are_logged_but_never_optimised(tmp_path):
    seen = []

    def monitor(prompts, responses):
        seen.append(list(responses))
        return share_of_lowercase(prompts, responses)

    plain = make_trainer(tmp_path / "a")
    watched = PPOTrainer(tiny_policy(), CharTokenizer(), fraction_of_target, tiny_config(), tmp_path / "b", PROMPTS,
                         monitors={"lower": monitor})
    a, b = plain.step(), watched.step()
    assert b["objective/lower"] == pytest.approx(float(share_of_lowercase(None, seen[0]).mean()))
    assert "objective/lower" not in a
    drop = lambda m: {k: v for k, v in m.items() if not k.startswith(("time/", "objective/lower"))}
    assert drop(a) == drop(b)  # the same update with or without the monitor
    samples = read_metrics(tmp_path / "b" / "ppo" / "samples.jsonl")  # each written reply with its monitor reward
    assert samples and all(r["lower"] == pytest.approx(float(share_of_lowercase(None, [r["response"]])[0]))
                           for r in samples)
    assert "lower" not in read_metrics(tmp_path / "a" / "ppo" / "samples.jsonl")[0]


def prompt_length(prompts, responses):
    """A reward that only says which prompt was asked: the same for every reply to it."""
    return torch.tensor([float(len(p)) for p in prompts])


def test_group_baseline_leaves_only_what_tells_a_reply_from_its_siblings(tmp_path):
    cfg = tiny_config(batch_size=8, samples_per_prompt=4, group_baseline=True, missing_eos_penalty=0.5,
                      response_length=4)
    trainer = make_trainer(tmp_path, cfg, reward=prompt_length)
    prompts = trainer.prompts_for(1)
    assert len(prompts) == 8 and prompts[:4] == [prompts[0]] * 4 and prompts[4:] == [prompts[4]] * 4
    assert prompts[0] != prompts[4]
    assert trainer.prompts_for(2)[0] not in (prompts[0], prompts[4])  # the next step asks the next two prompts
    single = make_trainer(tmp_path / "k1", tiny_config(batch_size=2))  # k = 1 draws the same prompts, once each
    assert [p for step in (1, 2) for p in single.prompts_for(step) for _ in range(4)] == \
        prompts + trainer.prompts_for(2)
    exp = make_experience(trainer.policy, trainer.value_head, trainer.tokenizer, prompt_length, prompts, cfg,
                          kl_coef=0.05, seed=1)
    ro = exp.rollout
    assert len(set(ro.texts[:4])) > 1  # four different replies to one prompt
    assert 0 < int(ro.has_eos.sum()) < 8  # some were cut off: the penalty differs within a prompt
    centred = exp.scores - exp.baselines
    assert centred.reshape(2, 4).sum(dim=1).tolist() == pytest.approx([0.0, 0.0], abs=1e-5)
    # the prompt's own score cancels; what is left is the missing-EOS penalty relative to the siblings
    penalty = -0.5 * (~ro.has_eos).float()
    assert centred.tolist() == pytest.approx((penalty - leave_one_out_baseline(penalty, 4)).tolist(), abs=1e-5)
    plain, _ = per_token_rewards(centred, exp.logprobs, exp.ref_logprobs, ro.response_mask, 0.05)
    assert torch.allclose(exp.rewards, plain)
    assert exp.scores.tolist() == pytest.approx((exp.raw_scores + penalty).tolist())  # logged scores unchanged
    with pytest.raises(ValueError, match="group_baseline needs each prompt 4 times in a row"):
        make_experience(trainer.policy, trainer.value_head, trainer.tokenizer, prompt_length, prompts[::-1][1:] +
                        prompts[:1], cfg, kl_coef=0.05, seed=1)


def test_token_table_lists_each_reply_over_its_real_tokens_only(tmp_path):
    cfg = tiny_config(batch_size=8, missing_eos_penalty=0.5, response_length=4)
    trainer = make_trainer(tmp_path, cfg, reward=prompt_length)
    head = trainer.value_head
    assert isinstance(head, ValueHead) and head.summary.in_features == trainer.policy.config.hidden_size
    assert head.summary.weight.device == next(trainer.policy.parameters()).device  # ValueHead.for_model
    exp = make_experience(trainer.policy, head, trainer.tokenizer, prompt_length, trainer.prompts_for(1), cfg,
                          kl_coef=0.05, seed=1)
    lengths = exp.rollout.response_mask.sum(1).tolist()
    assert min(lengths) < cfg.response_length  # at least one reply ended early: its padding must not show
    for i, n in enumerate(lengths):
        table = exp.token_table(i, trainer.tokenizer)
        assert list(table) == ["token", "log π", "log π_ref", "reward", "value", "advantage"]
        assert {len(column) for column in table.values()} == {n}
        assert table["token"] == trainer.tokenizer.convert_ids_to_tokens(exp.rollout.response_ids[i, :n].tolist())
        assert table["reward"] == pytest.approx(exp.rewards[i, :n].tolist())
        assert table["advantage"] == pytest.approx(exp.advantages[i, :n].tolist())
        assert all(type(v) is float for v in table["log π"])


@pytest.mark.parametrize("group", [False, True], ids=["one-reply-per-prompt", "group-baseline"])
def test_toy_reward_rises(tmp_path, group):
    cfg = tiny_config(max_steps=10, batch_size=16, num_mini_batches=2, init_kl_coef=0.01, learning_rate=2e-2,
                      samples_per_prompt=4 if group else 1, group_baseline=group)
    trainer = make_trainer(tmp_path, cfg)
    seen = []
    trainer.add_step_callback(lambda step, metrics: seen.append((step, metrics["objective/scores"])))
    summary = trainer.train()
    scores = [s for _, s in seen]
    assert [s for s, _ in seen] == list(range(1, 11)) and summary["steps"] == 10
    # one reply per prompt: seeds 0-3 all give > +0.3; group baseline: +0.27, +0.35, +0.09, +0.43 (the baseline's
    # sign flipped, about 0 on each)
    assert sum(scores[-2:]) / 2 > sum(scores[:2]) / 2 + 0.15, scores
    assert (tmp_path / "ppo" / "adapter" / "adapter_model.safetensors").exists()
    summary = read_json(tmp_path / "ppo" / "summary.json")
    assert summary["scores_last"] == pytest.approx(scores[-1])
    assert summary["scores_halves"]["change"] == pytest.approx(sum(scores[5:]) / 5 - sum(scores[:5]) / 5)


def resume_config(**overrides) -> PPOConfig:
    """An adaptive β with a short horizon, so that β moves every step and a resume must restore it."""
    return tiny_config(adaptive_kl=True, horizon=16, **overrides)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """Four steps in one go: the numbers the repeat and the resumed run must reproduce."""
    run_dir = tmp_path_factory.mktemp("straight")
    make_trainer(run_dir, resume_config()).train(4)
    return run_dir


def test_same_seed_gives_same_numbers(straight_run, tmp_path):
    make_trainer(tmp_path, resume_config()).train(4)
    a, b = read_metrics(straight_run / "ppo" / "metrics.jsonl"), read_metrics(tmp_path / "ppo" / "metrics.jsonl")
    assert without_timings(a) == without_timings(b)
    samples = [json.loads(line) for line in (tmp_path / "ppo" / "samples.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples}) == [1, 2, 4] and all("response" in s for s in samples)


def test_resume_continues_where_it_stopped(straight_run, tmp_path):
    make_trainer(tmp_path, resume_config(save_steps=1)).train(2)
    assert [s for s, _ in list_checkpoints(tmp_path / "ppo")] == [1, 2]
    (tmp_path / "ppo" / "metrics.jsonl").open("a").write(json.dumps({"step": 3, "objective/kl": 9.9}) + "\n")
    with (tmp_path / "ppo" / "samples.jsonl").open("a") as f:  # so did samples.jsonl
        f.write(json.dumps({"step": 3, "prompt": "x", "response": "stray"}) + "\n")
    recorded = json.loads((tmp_path / "ppo" / "checkpoints" / "step-2" / "elapsed.json").read_text())["seconds"]
    trainer = make_trainer(tmp_path, resume_config(save_steps=1))  # a fresh process: new model, new head
    assert trainer.resume() == 2
    assert trainer.clock.before == recorded > 0  # the run's cost so far comes back with it
    saved = torch.load(tmp_path / "ppo" / "checkpoints" / "step-2" / "value_head.pt", weights_only=True)
    assert torch.equal(trainer.value_head.summary.weight, saved["summary.weight"])
    assert trainer.optimizer.state_dict()["state"]  # Adam's moments are back
    assert trainer.kl_ctl.value == pytest.approx(0.05 * 0.9 ** 2)  # β after two steps far below target
    summary = trainer.train(4)
    rows = read_metrics(tmp_path / "ppo" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # the stray row after the checkpoint was dropped
    samples = read_metrics(tmp_path / "ppo" / "samples.jsonl")
    assert sorted({r["step"] for r in samples}) == [1, 2, 4] and not any(r["response"] == "stray" for r in samples)
    # with adapter, head, optimizer and KL coefficient restored, steps 3-4 equal the uninterrupted run's
    assert without_timings(rows) == without_timings(read_metrics(straight_run / "ppo" / "metrics.jsonl"))
    assert json.loads((tmp_path / "ppo" / "checkpoints" / "step-4" / "elapsed.json").read_text())["seconds"] > recorded
    # the summary's wall time is the whole run's; this session's loop alone is less
    assert summary["resumed_time_s"] == recorded
    assert summary["wall_time_s"] >= recorded + summary["train_wall_time_s"]
    # the same run asked for 3 steps now: it resumes from step 3, not 4, and step 4's rows and checkpoint go
    shorter = make_trainer(tmp_path, resume_config(save_steps=1, max_steps=3))
    assert shorter.resume() == 3
    assert [s for s, _ in list_checkpoints(tmp_path / "ppo")] == [3]
    assert [r["step"] for r in read_metrics(tmp_path / "ppo" / "metrics.jsonl")] == [1, 2, 3]


@pytest.mark.slow
def test_throughput_benchmark_times_the_same_replies_as_the_rollout(tmp_path, capsys, load_script):
    """The benchmark's bare `generate` call must sample exactly the replies PPO's rollout samples (same batch,
    seed, settings and policy), or its ratio would compare different amounts of work."""
    bench = load_script("benchmarks/ppo_throughput.py")
    assert bench.main(["--profile", "smoke", "--run-dir", str(tmp_path), "--steps", "2", "--reward", "gold",
                       "--response-length", "12"]) == 0  # a PPOConfig field overridden, as with python -m ppo
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+\d", line)]
    assert [r[0] for r in rows] == ["1", "2"] and all(r[-1] == "yes" for r in rows), rows
    assert "x 12 tokens" in out and all(int(r[6]) <= 12 * 4 for r in rows), out  # smoke: 4 replies a step


def test_the_command_line_refuses_reward_rm_when_no_reward_model_was_saved(tmp_path, capsys):
    from rlhf_helpers.ppo import main

    assert main(["--run-dir", str(tmp_path), "--profile", "smoke", "--reward", "rm"]) == 2  # not gold in its place
    err = capsys.readouterr().err
    assert "--reward rm, but" in err and "pass --reward gold" in err
    assert not (tmp_path / "ppo" / "metrics.jsonl").exists()  # refused before any training
