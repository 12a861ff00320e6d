"""Rewards: the RewardFunction API, components, weighted combinations, JSON configs and adapters.

The API follows the Flux tutorial: `RewardFunction.compute_reward(trajectory) -> RewardOutput(reward,
metadata)`. Rewards compose by weights, `0.7 * quality + 0.3 * safety`, and every combination reports its
components in `metadata["components"]`. Each component scores in [0, 1], higher is better, so that a
weight slider has one meaning: how much you care.

A reward round-trips through JSON (`reward.to_config()`, `build_reward(config)`), serves TRL's GRPO/RLOO
trainers as a `reward_funcs` callable (`as_trl_reward_func`), and scores batches for our PPO
(`as_ppo_reward`). The gold judge that plays the human lives in `rlhf_helpers.gold`.

Command line: `python -m rlhf_helpers.rewards score FILE.jsonl [--config reward_config.json]` prints one
JSON line per input line (`prompt`/`response` fields) with the reward and its components.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

from . import text_stats as ts


@dataclass
class Trajectory:
    """One prompt and the response to score, with an optional reference answer and free metadata."""

    prompt: str
    response: str
    reference: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class RewardOutput:
    """A scalar reward and whatever explains it (component scores, counts)."""

    reward: float
    metadata: dict[str, Any] = field(default_factory=dict)


REGISTRY: dict[str, type["RewardFunction"]] = {}


class RewardFunction:
    """Base class: override `compute_reward`. Combine with `+` and scalar `*`."""

    name: ClassVar[str] = "reward"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            REGISTRY[cls.name] = cls

    def compute_reward(self, trajectory: Trajectory) -> RewardOutput:
        raise NotImplementedError

    def __call__(self, trajectory: Trajectory) -> RewardOutput:
        return self.compute_reward(trajectory)

    def batch(self, trajectories: Sequence[Trajectory]) -> list[RewardOutput]:
        """Score many trajectories (override for a vectorised reward such as a reward model)."""
        return [self.compute_reward(t) for t in trajectories]

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """Plain floats for parallel lists of prompts and responses."""
        if len(prompts) != len(responses):
            raise ValueError(f"score() got {len(prompts)} prompts but {len(responses)} responses")
        return [o.reward for o in self.batch([Trajectory(p, r) for p, r in zip(prompts, responses)])]

    def params(self) -> dict[str, Any]:
        """Constructor arguments, for `to_config`."""
        return {}

    def to_config(self) -> dict[str, Any]:
        return {"type": self.name, **({"params": self.params()} if self.params() else {})}

    def __mul__(self, weight: float) -> "WeightedSum":
        return WeightedSum([(float(weight), self)])

    __rmul__ = __mul__

    def __add__(self, other: "RewardFunction") -> "WeightedSum":
        return WeightedSum(_terms(self) + _terms(other))


def _terms(fn: RewardFunction) -> list[tuple[float, RewardFunction]]:
    return list(fn.terms) if isinstance(fn, WeightedSum) else [(1.0, fn)]


class WeightedSum(RewardFunction):
    """Σ_i w_i · r_i; metadata lists each component's own score under its name."""

    name = "weighted_sum"

    def __init__(self, terms: Sequence[tuple[float, RewardFunction]]):
        if not terms:
            raise ValueError("a weighted sum needs at least one (weight, reward) term")
        self.terms = list(terms)

    def compute_reward(self, trajectory: Trajectory) -> RewardOutput:
        components, total = {}, 0.0
        for weight, fn in self.terms:
            out = fn.compute_reward(trajectory)
            components[fn.name] = out.reward
            total += weight * out.reward
        return RewardOutput(total, {"components": components, "weights": self.weights})

    @property
    def weights(self) -> dict[str, float]:
        return {fn.name: w for w, fn in self.terms}

    def with_weights(self, weights: dict[str, float]) -> "WeightedSum":
        """A copy with some weights changed (unknown names raise, listing the components)."""
        unknown = set(weights) - set(self.weights)
        if unknown:
            raise KeyError(f"no component(s) {sorted(unknown)}; components: {sorted(self.weights)}")
        return WeightedSum([(float(weights.get(fn.name, w)), fn) for w, fn in self.terms])

    def to_config(self) -> dict[str, Any]:
        return {"type": self.name, "terms": [{"weight": w, **fn.to_config()} for w, fn in self.terms]}


class Clipped(RewardFunction):
    """The inner reward clipped to [low, high]."""

    name = "clipped"

    def __init__(self, inner: RewardFunction, low: float = 0.0, high: float = 1.0):
        if low >= high:
            raise ValueError(f"clip range needs low < high, got [{low}, {high}]")
        self.inner, self.low, self.high = inner, low, high

    def compute_reward(self, trajectory: Trajectory) -> RewardOutput:
        out = self.inner.compute_reward(trajectory)
        return RewardOutput(min(self.high, max(self.low, out.reward)), {**out.metadata, "unclipped": out.reward})

    def to_config(self) -> dict[str, Any]:
        return {"type": self.name, "low": self.low, "high": self.high, "inner": self.inner.to_config()}


class Normalized(RewardFunction):
    """(r − shift) / scale: e.g. mean 0 and standard deviation 1 on a reference set (`fit`)."""

    name = "normalized"

    def __init__(self, inner: RewardFunction, shift: float = 0.0, scale: float = 1.0):
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.inner, self.shift, self.scale = inner, shift, scale

    @classmethod
    def fit(cls, inner: RewardFunction, trajectories: Sequence[Trajectory]) -> "Normalized":
        rewards = [o.reward for o in inner.batch(trajectories)]
        mean = sum(rewards) / len(rewards)
        std = (sum((r - mean) ** 2 for r in rewards) / len(rewards)) ** 0.5
        return cls(inner, mean, std if std > 1e-8 else 1.0)

    def compute_reward(self, trajectory: Trajectory) -> RewardOutput:
        out = self.inner.compute_reward(trajectory)
        return RewardOutput((out.reward - self.shift) / self.scale, {**out.metadata, "raw": out.reward})

    def to_config(self) -> dict[str, Any]:
        return {"type": self.name, "shift": self.shift, "scale": self.scale, "inner": self.inner.to_config()}


# --- components: each scores in [0, 1], higher is better ------------------------------------------

class LengthWindow(RewardFunction):
    """1 inside [min_words, max_words]; falls linearly to 0 over `slack` words on either side."""

    name = "length"

    def __init__(self, min_words: int = 40, max_words: int = 150, slack: int = 40):
        if not 0 <= min_words <= max_words or slack <= 0:
            raise ValueError("need 0 <= min_words <= max_words and slack > 0")
        self.min_words, self.max_words, self.slack = min_words, max_words, slack

    def compute_reward(self, t: Trajectory) -> RewardOutput:
        n = len(ts.words(t.response))
        gap = max(self.min_words - n, n - self.max_words, 0)
        return RewardOutput(max(0.0, 1.0 - gap / self.slack), {"words": n})

    def params(self):
        return {"min_words": self.min_words, "max_words": self.max_words, "slack": self.slack}


class Structure(RewardFunction):
    """Lists or ordered steps: 1 with at least `min_items` list lines or ordinal words, 0.5 with one."""

    name = "structure"
    ORDINALS = re.compile(r"\b(first|second|third|then|next|finally)\b", re.IGNORECASE)

    def __init__(self, min_items: int = 2):
        self.min_items = min_items

    def compute_reward(self, t: Trajectory) -> RewardOutput:
        items = len(ts.list_items(t.response)) + len(self.ORDINALS.findall(t.response))
        return RewardOutput(1.0 if items >= self.min_items else 0.5 * (items > 0), {"structure_items": items})

    def params(self):
        return {"min_items": self.min_items}


class KeywordPresence(RewardFunction):
    """1 if any of `keywords` occurs (case-insensitive, whole words); the naive marker check."""

    name = "keywords"
    DEFAULT: ClassVar[tuple[str, ...]] = ()

    def __init__(self, keywords: Sequence[str] | None = None):
        self.keywords = tuple(keywords or self.DEFAULT)
        self._re = re.compile(r"\b(" + "|".join(map(re.escape, self.keywords)) + r")", re.IGNORECASE)

    def compute_reward(self, t: Trajectory) -> RewardOutput:
        hits = self._re.findall(t.response)
        return RewardOutput(1.0 if hits else 0.0, {f"{self.name}_hits": len(hits)})

    def params(self):
        return {"keywords": list(self.keywords)}


class ExplanationMarkers(KeywordPresence):
    """Explains why: 'because', 'therefore', 'for example', 'this means'."""

    name = "explanation"
    DEFAULT = ("because", "therefore", "for example", "for instance", "this means", "so that", "which means")


class Politeness(KeywordPresence):
    """Courtesy words: 'please', 'thank', 'hope', 'glad', 'happy to'."""

    name = "politeness"
    DEFAULT = ("please", "thank", "hope", "glad", "happy to")


class RepetitionPenalty(RewardFunction):
    """1 − (share of word n-grams that repeat an earlier one): 1 for fresh text, near 0 for a loop."""

    name = "repetition"

    def __init__(self, n: int = 3):
        self.n = n

    def compute_reward(self, t: Trajectory) -> RewardOutput:
        rep = ts.repeated_fraction(ts.words(t.response), self.n)
        return RewardOutput(1.0 - rep, {"repeated_fraction": rep})

    def params(self):
        return {"n": self.n}


class Relevance(RewardFunction):
    """Share of the prompt's content words (up to `max_terms`) that the response uses."""

    name = "relevance"

    def __init__(self, max_terms: int = 6):
        self.max_terms = max_terms

    def compute_reward(self, t: Trajectory) -> RewardOutput:
        prompt_terms = list(dict.fromkeys(ts.content_words(t.prompt)))
        if not prompt_terms:
            return RewardOutput(1.0, {"prompt_terms": 0})
        used = set(ts.content_words(t.response))
        hits = sum(term in used for term in prompt_terms)
        return RewardOutput(min(1.0, hits / min(len(prompt_terms), self.max_terms)), {"prompt_terms_used": hits})

    def params(self):
        return {"max_terms": self.max_terms}


HARMFUL = re.compile(
    r"\b(bombs?|explosives?|weapons?|guns?|poison\w*|ricin|anthrax|nerve agent|kill|murder|"
    r"hurt (?:someone|somebody|people|my)|stalk\w*|follow (?:someone|somebody|her|him) home|"
    r"track (?:my|his|her|their|someone's) \w+'?s? (?:location|phone)|spy on|secretly (?:read|record|watch)|"
    r"hack(?:ing)? into|break into|get into (?:my|someone's|their) \w+'?s? (?:system|account)|crack (?:[\w'-]+ ){0,3}password|"
    r"access someone's|someone else's (?:account|email|phone)|steal\w*|shoplift\w*|launder\w*|counterfeit|"
    r"forge[dr]?y?|fake (?:id|passport|documents?|reviews?|charity)|pretending to be (?:their|a|the) bank|impersonat\w*|"
    r"malware|ransomware|virus to|phishing|meth|methamphetamine|overdose|self-harm|suicide|untraceable|threaten\w*|"
    r"humiliat\w*|harass\w*|bully\w*|pile on|revenge|private photos|where a stranger .* lives|"
    r"without (?:them|him|her|anyone|their|his) (?:knowing|noticing|consent)|slip into someone's drink|"
    r"drug (?:someone|her|him)|scam\w*|fraud\w*|cheat on (?:a|my|the) (?:exam|test|taxes)|"
    r"change my (?:marks|grades)|disable .*(?:alarms|sprinklers)|start(?:ing)? a fire|arson|"
    r"stop eating completely|starve myself)\b",
    re.IGNORECASE,
)
REFUSAL = re.compile(
    r"\b(i can(?:'|no)t|i cannot|i won'?t|i will not|i'm not able to|i am not able to|i'm unable to|"
    r"i am unable to|i must decline|i'm sorry, but|i am sorry, but|not something i can help)",
    re.IGNORECASE,
)


def is_harmful_prompt(prompt: str) -> bool:
    """A request where a polite refusal is right (weapons, poisons, stalking, break-ins, fraud, harassment,
    self-harm ...). A keyword rule: transparent, and checked against every prompt we ship."""
    return bool(HARMFUL.search(prompt))


def is_refusal(response: str) -> bool:
    """The response declines in its first sentence (a refusal later on, or inside a quoted email, is not one)."""
    first = ts.sentences(response.strip()[:240])
    return bool(first) and bool(REFUSAL.search(first[0]))


class RefusalAppropriateness(RewardFunction):
    """1 when the response refuses exactly when the prompt is harmful; 0 otherwise."""

    name = "safety"

    def compute_reward(self, t: Trajectory) -> RewardOutput:
        harmful, refused = is_harmful_prompt(t.prompt), is_refusal(t.response)
        return RewardOutput(float(harmful == refused), {"harmful_prompt": harmful, "refused": refused})


class FormatCheck(RewardFunction):
    """Share of format checks passed: non-empty, ends a sentence, no chat markers, balanced code fences.

    Chat markers are the turn tokens of ChatML (SmolLM2, Qwen), Llama 3, Gemma and Mistral written out as text,
    and a line holding only a role name."""

    name = "format"
    MARKERS = re.compile(r"<\|im_(?:start|end)\|>|<\|endoftext\|>|<\|(?:eot_id|start_header_id|end_header_id|"
                         r"begin_of_text|end_of_text)\|>|<(?:start|end)_of_turn>|\[/?INST\]|"
                         r"^(?:assistant|user|system|model)\s*$", re.MULTILINE)

    def compute_reward(self, t: Trajectory) -> RewardOutput:
        checks = {
            "non_empty": bool(t.response.strip()),
            "ends_cleanly": ts.ends_cleanly(t.response),
            "no_chat_markers": not self.MARKERS.search(t.response),
            "balanced_code_fences": len(ts.CODE_FENCE.findall(t.response)) % 2 == 0,
        }
        return RewardOutput(sum(checks.values()) / len(checks), {"format_checks": checks})


class QualityReward(RewardFunction):
    """The Flux tutorial's naive reward, kept as written there: easy to read, and easy to game."""

    name = "naive_quality"

    def compute_reward(self, trajectory: Trajectory) -> RewardOutput:
        response = trajectory.response
        words = response.split()
        word_count = len(words)
        score = 0.0
        if 50 <= word_count <= 200:
            score += 0.3
        elif word_count < 50:
            score += 0.1
        else:
            score += 0.2
        if any(x in response for x in ["First", "Second", "Finally", "1.", "2."]):
            score += 0.2
        if any(w in response.lower() for w in ["because", "therefore", "means", "example"]):
            score += 0.3
        if any(w in response.lower() for w in ["please", "thank", "hope", "glad"]):
            score += 0.1
        unique_ratio = len(set(words)) / max(len(words), 1)
        if unique_ratio < 0.5:
            score -= 0.2
        return RewardOutput(max(0.0, min(1.0, score)), {"word_count": word_count, "unique_ratio": unique_ratio})


COMPONENTS = ("length", "structure", "explanation", "politeness", "repetition", "relevance", "safety", "format")


def default_mix(weights: dict[str, float] | None = None) -> WeightedSum:
    """All eight components with the given weights (defaults below; 0 keeps a component visible but off)."""
    defaults = {"length": 0.2, "structure": 0.1, "explanation": 0.1, "politeness": 0.05,
                "repetition": 0.2, "relevance": 0.15, "safety": 0.15, "format": 0.05}
    weights = {**defaults, **(weights or {})}
    unknown = set(weights) - set(COMPONENTS)
    if unknown:
        raise KeyError(f"unknown component(s) {sorted(unknown)}; components: {list(COMPONENTS)}")
    return WeightedSum([(float(weights[name]), REGISTRY[name]()) for name in COMPONENTS])


# --- configs --------------------------------------------------------------------------------------

def build_reward(config: dict[str, Any]) -> RewardFunction:
    """The reward described by `config` (as written by `to_config`); a bad field raises a ValueError naming
    its path in the config (`terms[1].params.min_wrds`) and how to fix it."""
    from . import gold  # noqa: F401  (registers the gold judge)

    return _build(config, "")


def _at(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _number(config: dict[str, Any], key: str, where: str, example: str) -> float:
    """config[key] as a float; missing, non-numeric (booleans and strings included) and NaN/inf raise."""
    if key not in config:
        raise ValueError(f"field '{_at(where, key)}': missing; give a finite number, e.g. \"{key}\": {example}")
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"field '{_at(where, key)}': expected a finite number, got {value!r:.40}; "
                         f"write a JSON number, e.g. \"{key}\": {example}")
    return float(value)


def _construct(cls: type, args: list[Any], kwargs: dict[str, Any], where: str) -> RewardFunction:
    """cls(*args, **kwargs), naming the config field whose values the constructor rejects."""
    try:
        return cls(*args, **kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{f'field {where!r}: ' if where else ''}{e}") from e


def _check_names(cls: type, kwargs: dict[str, Any], where: str, skip: int = 0) -> None:
    """Every key of `kwargs` is a parameter of `cls` (after its first `skip`, given positionally)."""
    params = list(inspect.signature(cls).parameters.values())[skip:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    names = [p.name for p in params]
    unknown = [k for k in kwargs if k not in names]
    if unknown:
        raise ValueError(f"field '{_at(where, unknown[0])}': {cls.name!r} has no parameter {unknown[0]!r}; "
                         f"valid parameters: {', '.join(names) or 'none'}")


def _build(config: Any, where: str) -> RewardFunction:
    if not isinstance(config, dict) or "type" not in config:
        raise ValueError(f"{f'field {where!r}: ' if where else ''}a reward config is an object with a 'type' field; "
                         f"got {config!r:.200}")
    kind = config["type"]
    if kind == WeightedSum.name:
        terms, at = config.get("terms"), _at(where, "terms")
        if not isinstance(terms, list) or not terms:
            raise ValueError(f"field '{at}': expected a non-empty list of terms, got {terms!r:.80}; "
                             'write [{"weight": 1.0, "type": ...}, ...]')
        built = []
        for i, term in enumerate(terms):  # a term's weight sits beside its own fields: not one of them
            inner = {k: v for k, v in term.items() if k != "weight"} if isinstance(term, dict) else term
            fn = _build(inner, f"{at}[{i}]")
            built.append((_number(term, "weight", f"{at}[{i}]", "1.0"), fn))
        return WeightedSum(built)
    if kind in (Clipped.name, Normalized.name):
        cls, extra = REGISTRY[kind], {k: v for k, v in config.items() if k not in ("type", "inner")}
        _check_names(cls, extra, where, skip=1)
        inner = _build(config.get("inner"), _at(where, "inner"))
        return _construct(cls, [inner], {k: _number(config, k, where, "0.0") for k in extra}, where)
    if not isinstance(kind, str) or kind not in REGISTRY:
        raise ValueError(f"field '{_at(where, 'type')}': unknown reward type {kind!r}; known: {sorted(REGISTRY)}")
    params, at = config.get("params", {}), _at(where, "params")
    if not isinstance(params, dict):
        raise ValueError(f"field '{at}': expected an object of parameters, got {params!r:.80}")
    _check_names(REGISTRY[kind], params, at)
    return _construct(REGISTRY[kind], [], params, at)


def reward_identity(reward: Any) -> Any:
    """What a training run records of its reward, to know on resume whether it changed: its `to_config()`
    where it has one (every RewardFunction; a reward model's names its weights' fingerprint; any callable
    object may define one for its settings); for a plain callable only its qualified name, so a callable
    whose code or captured values change under the same name goes unnoticed."""
    if isinstance(reward, RewardFunction) or callable(getattr(reward, "to_config", None)):
        return reward.to_config()
    return f"{getattr(reward, '__module__', '?')}.{getattr(reward, '__qualname__', type(reward).__qualname__)}"


def save_reward_config(reward: RewardFunction, path: str | Path) -> Path:
    from .tracking import atomic_write_json

    return atomic_write_json(path, reward.to_config())


def load_reward_config(path: str | Path) -> RewardFunction:
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); rewrite it with save_reward_config") from e
    try:
        return build_reward(config)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a valid reward config: {e}") from e


# --- adapters -------------------------------------------------------------------------------------

def _text(x: Any, role: str | None = None) -> str:
    """Plain text from a string or a TRL conversational message list (last message of `role`)."""
    if isinstance(x, str):
        return x
    msgs = [m for m in x if role is None or m.get("role") == role] or list(x)
    return msgs[-1]["content"] if msgs else ""


def as_trl_reward_func(reward: RewardFunction, name: str | None = None) -> Callable[..., list[float]]:
    """A callable for TRL's `reward_funcs` (GRPO, RLOO): f(prompts, completions, **kw) -> list[float]."""

    def reward_func(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        return reward.score([_text(p, "user") for p in prompts], [_text(c, "assistant") for c in completions])

    reward_func.__name__ = name or reward.name  # TRL logs rewards/<__name__>/mean
    return reward_func


def as_ppo_reward(reward: RewardFunction) -> Callable[[Sequence[str], Sequence[str]], "Any"]:
    """A callable for our PPO: f(prompts, responses) -> float tensor of shape (B,)."""
    import torch

    def score(prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        return torch.tensor(reward.score(prompts, responses), dtype=torch.float32)  # (B,)

    return score


# --- command line ---------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    from .data import DataError, read_jsonl

    parser = argparse.ArgumentParser(prog="python -m rlhf_helpers.rewards")
    sub = parser.add_subparsers(dest="command", required=True)
    sc = sub.add_parser("score", help="score prompt/response lines; one JSON line out per line in")
    sc.add_argument("file")
    sc.add_argument("--config", help="a reward_config.json; default: the gold judge")
    args = parser.parse_args(argv)
    from .gold import GoldJudge

    scored = 0
    try:
        reward = load_reward_config(args.config) if args.config else GoldJudge()
        for line_no, row in read_jsonl(args.file):
            scored += 1
            for key in ("prompt", "response"):
                if not isinstance(row.get(key), str):
                    raise DataError(f"needs a string '{key}'", path=args.file, line=line_no, field=key,
                                    hint="each line is {\"prompt\": ..., \"response\": ...}")
            out = reward(Trajectory(row["prompt"], row["response"]))
            comps = out.metadata.get("components", {})
            print(json.dumps({"line": line_no, "reward": round(out.reward, 6),
                              "components": {k: round(v, 6) for k, v in comps.items()}}))
    except (DataError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not scored:  # a wrong path or a failed export, most likely: say so rather than print nothing
        print(f"error: {args.file}: no lines to score (the file is empty or holds only blank lines); each line is "
              f'{{"prompt": ..., "response": ...}}', file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
