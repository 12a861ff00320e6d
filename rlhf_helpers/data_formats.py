"""Record types and per-format parsers for `rlhf_helpers.data`.

Each parser turns one decoded JSON object into normalised records and a dict of skip counts
(reason -> count). Parsers know nothing about files: they raise `DataError` with only `field`,
`message` and `hint` set, and the loader in `rlhf_helpers.data` fills in `path` and `line`. That
keeps them pure, so they are easy to test and to reuse on in-memory rows. The formats and the
bad-input policy are documented in the `rlhf_helpers.data` module docstring.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

ROLES = ("system", "user", "assistant")

Skips = dict[str, int]


class DataError(ValueError):
    """One problem in a data file: where it is (`path`, 1-based `line`, `field`), what, and how to fix it.

    `str()` reads `path:line: field 'x': message. hint`, the form editors and terminals can jump to.
    `path`/`line`/`field` are None when they do not apply (a file-level problem, a line that is not JSON).
    """

    def __init__(self, message: str, hint: str = "", *, field: str | None = None,
                 path: str | None = None, line: int | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.field = field
        self.path = path
        self.line = line

    def __str__(self) -> str:
        where = ":".join(str(p) for p in (self.path, self.line) if p is not None)
        parts = [f"{where}: " if where else ""]
        if self.field is not None:
            parts.append(f"field '{self.field}': ")
        parts.append(self.message.rstrip("."))
        if self.hint:
            parts.append(f". {self.hint}")
        return "".join(parts)

    def __reduce__(self):  # keep attributes through pickling (multiprocessing, pytest-xdist)
        return (_rebuild_error, (self.message, self.hint, self.field, self.path, self.line))


def _rebuild_error(message, hint, field, path, line) -> DataError:
    return DataError(message, hint, field=field, path=path, line=line)


@dataclass
class PromptRecord:
    """A prompt for generation or RL rollouts; unknown keys (`id`, `domain`, ...) go to `metadata`."""

    prompt: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class SFTRecord:
    """One demonstration. `messages` is the full conversation in TRL's conversational format;
    `prompt` is the last user message and `response` the final assistant message."""

    prompt: str
    response: str
    messages: list[dict[str, Any]]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_messages(self) -> list[dict[str, Any]]:
        """Everything before the final assistant message (the model's input for SFT)."""
        return self.messages[:-1]


@dataclass
class PreferencePair:
    """One comparison: `chosen` is preferred over `rejected` for `prompt`.

    `prompt_messages` keeps the conversation when the source had one (conversational preferences,
    HH transcripts); `prompt` is then the last user message (conversational) or the transcript up to
    and including the final `\\n\\nAssistant:` marker (HH).
    """

    prompt: str
    chosen: str
    rejected: str
    metadata: dict[str, Any] = field(default_factory=dict)
    prompt_messages: list[dict[str, Any]] | None = None

    @property
    def conversation(self) -> list[dict[str, Any]]:
        """The prompt as a chat template reads it: the source's messages (a system message and earlier turns
        included) when it had them, else the one user message (copies)."""
        if self.prompt_messages:
            return [dict(m) for m in self.prompt_messages]
        return [{"role": "user", "content": self.prompt}]


# ---------------------------------------------------------------------------------------- field checks

def json_type(value: Any) -> str:
    """The JSON name of a value's type, as a user who wrote the file would say it."""
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def require(obj: dict, name: str, fmt: str, needed: str) -> Any:
    """`obj[name]`, or a 'missing' error that lists the fields the format needs."""
    if name not in obj:
        raise DataError("missing", f"A '{fmt}' record needs {needed}", field=name)
    return obj[name]


def check_text(value: Any, name: str, hint: str = "Every field needs text") -> str:
    """A non-empty string: numbers, nulls and whitespace-only strings are errors."""
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {json_type(value)} {_short(value)}",
                        "Write the text as a JSON string in double quotes", field=name)
    if not value.strip():
        raise DataError("empty string" if not value else "whitespace-only string", hint, field=name)
    return value


def check_distinct(chosen: str, rejected: str, name: str, other: str) -> None:
    """Two responses that are the same text teach nothing (and give a zero-margin pair)."""
    if chosen.strip() == rejected.strip():
        raise DataError(f"identical to '{other}'",
                        "A comparison needs two different responses; drop the row or fix one side",
                        field=name)


def check_messages(value: Any, name: str) -> list[dict[str, Any]]:
    """A non-empty list of {"role": system|user|assistant, "content": non-empty str} dicts (copied)."""
    if not isinstance(value, list):
        raise DataError(f"expected an array of messages, got {json_type(value)}",
                        'Write it as [{"role": "user", "content": "..."}, ...]', field=name)
    if not value:
        raise DataError("empty array", "Give at least one message", field=name)
    out = []
    for i, msg in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(msg, dict):
            raise DataError(f"expected a message object, got {json_type(msg)}",
                            'Each message is {"role": ..., "content": ...}', field=where)
        if "role" not in msg:
            raise DataError("missing", "Each message needs 'role' and 'content'", field=f"{where}.role")
        role = msg["role"]
        if not isinstance(role, str) or role not in ROLES:
            raise DataError(f"unknown role {_short(role)}", f"Use one of {', '.join(ROLES)}",
                            field=f"{where}.role")
        if "content" not in msg:
            raise DataError("missing", "Each message needs 'role' and 'content'", field=f"{where}.content")
        check_text(msg["content"], f"{where}.content", "Every message needs text")
        out.append(dict(msg))
    return out


def extras(obj: dict, known: tuple[str, ...]) -> dict[str, Any]:
    """Keys a format does not use are kept as metadata rather than dropped."""
    return {k: v for k, v in obj.items() if k not in known}


def _last(messages: list[dict], role: str) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == role)


# --------------------------------------------------------------------------------------------- parsers

SPLITS = ("train", "test")
"""Values of a prompt's optional `split` field; a prompt without one is in neither split."""


def parse_prompts(obj: dict) -> tuple[list[PromptRecord], Skips]:
    """{"prompt"}, with an optional `split` that must be one of SPLITS: `split_prompts` selects on it, so a
    misspelt split ("Train", "validation") must not quietly put a prompt in neither split."""
    prompt = check_text(require(obj, "prompt", "prompts", "'prompt'"), "prompt", "Every prompt needs text")
    if "split" in obj and obj["split"] not in SPLITS:
        raise DataError(f"unknown split {json.dumps(obj['split'], ensure_ascii=False)[:40]}",
                        f"Use one of {', '.join(map(repr, SPLITS))} (lower case), or leave 'split' out for a "
                        f"prompt in neither split", field="split")
    return [PromptRecord(prompt, extras(obj, ("prompt",)))], {}


def parse_sft(obj: dict) -> tuple[list[SFTRecord], Skips]:
    """Either {"prompt", "response"} or {"messages": [...]} ending in an assistant turn."""
    if "messages" not in obj:
        needed = "'prompt' and 'response' (or a 'messages' list)"
        prompt = check_text(require(obj, "prompt", "sft", needed), "prompt", "Every prompt needs text")
        response = check_text(require(obj, "response", "sft", needed), "response", "Every response needs text")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return [SFTRecord(prompt, response, messages, extras(obj, ("prompt", "response")))], {}
    both = [k for k in ("prompt", "response") if k in obj]
    if both:
        raise DataError("given together with 'messages'",
                        "Use either 'messages' or 'prompt'/'response', not both", field=both[0])
    messages = check_messages(obj["messages"], "messages")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"last message has role '{messages[-1]['role']}'",
                        "An SFT conversation must end with the assistant reply to learn", field="messages")
    if not any(m["role"] == "user" for m in messages):
        raise DataError("no user message", "Add at least one message with role 'user'", field="messages")
    return [SFTRecord(_last(messages, "user"), messages[-1]["content"], messages,
                      extras(obj, ("messages",)))], {}


_PREF_NEEDED = "'prompt', 'chosen' and 'rejected'"


def _one_reply(value: Any, name: str) -> str:
    """Conversational chosen/rejected: exactly one assistant message (earlier turns belong in 'prompt')."""
    messages = check_messages(value, name)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise DataError(f"has {len(messages)} message(s) with roles {[m['role'] for m in messages]}",
                        "Give exactly one assistant message; move earlier turns into 'prompt'", field=name)
    return messages[0]["content"]


def parse_preferences(obj: dict) -> tuple[list[PreferencePair], Skips]:
    """Strings {"prompt","chosen","rejected"} or TRL's conversational form (lists of messages)."""
    prompt = require(obj, "prompt", "preferences", _PREF_NEEDED)
    chosen = require(obj, "chosen", "preferences", _PREF_NEEDED)
    rejected = require(obj, "rejected", "preferences", _PREF_NEEDED)
    meta = extras(obj, ("prompt", "chosen", "rejected"))
    if isinstance(prompt, list):
        prompt_messages = check_messages(prompt, "prompt")
        if not any(m["role"] == "user" for m in prompt_messages):
            raise DataError("no user message", "Add a message with role 'user'", field="prompt")
        for name, value in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(value, list):
                raise DataError(f"is a {json_type(value)} but 'prompt' is a list of messages",
                                "Use strings for all three fields or message lists for all three",
                                field=name)
        chosen_text, rejected_text = _one_reply(chosen, "chosen"), _one_reply(rejected, "rejected")
        check_distinct(chosen_text, rejected_text, "rejected", "chosen")
        return [PreferencePair(_last(prompt_messages, "user"), chosen_text, rejected_text, meta,
                               prompt_messages)], {}
    check_text(prompt, "prompt", "Every prompt needs text")
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if isinstance(value, list):
            raise DataError("is a list of messages but 'prompt' is a string",
                            "Use strings for all three fields or message lists for all three", field=name)
        check_text(value, name, "Every response needs text")
    check_distinct(chosen, rejected, "rejected", "chosen")
    return [PreferencePair(prompt, chosen, rejected, meta)], {}


def _check_ranking(ranking: Any, n: int) -> list[int]:
    """A permutation of 0..n-1; every way it can fail gets its own message."""
    hint = f"List every response index 0..{n - 1} exactly once, best first (e.g. {list(range(n))[::-1]})"
    if not isinstance(ranking, list):
        raise DataError(f"expected an array of indices, got {json_type(ranking)}", hint, field="ranking")
    if len(ranking) != n:
        raise DataError(f"has {len(ranking)} entries for {n} responses", hint, field="ranking")
    seen: set[int] = set()
    for i, idx in enumerate(ranking):
        if type(idx) is not int:  # bool is an int subclass; true/false are not indices
            raise DataError(f"entry {i} is {json_type(idx)} {_short(idx)}, not an integer index",
                            hint, field="ranking")
        if not 0 <= idx < n:
            raise DataError(f"index {idx} is out of range 0..{n - 1}", hint, field="ranking")
        if idx in seen:
            raise DataError(f"index {idx} appears more than once", hint, field="ranking")
        seen.add(idx)
    return ranking


def parse_ranked(obj: dict) -> tuple[list[PreferencePair], Skips]:
    """All n*(n-1)/2 implied pairs, chosen = better ranked; pairs of identical texts are skipped."""
    needed = "'prompt', 'responses' and 'ranking'"
    prompt = check_text(require(obj, "prompt", "ranked", needed), "prompt", "Every prompt needs text")
    responses = require(obj, "responses", "ranked", needed)
    if not isinstance(responses, list) or len(responses) < 2:
        got = f"{len(responses)} response(s)" if isinstance(responses, list) else json_type(responses)
        raise DataError(f"expected an array of at least 2 strings, got {got}",
                        "Rank two or more responses", field="responses")
    for i, r in enumerate(responses):
        check_text(r, f"responses[{i}]", "Every response needs text")
    ranking = _check_ranking(require(obj, "ranking", "ranked", needed), len(responses))
    meta = extras(obj, ("prompt", "responses", "ranking"))
    pairs, skipped = [], 0
    for better in range(len(ranking)):
        for worse in range(better + 1, len(ranking)):
            chosen, rejected = responses[ranking[better]], responses[ranking[worse]]
            if chosen.strip() == rejected.strip():
                skipped += 1
                continue
            pairs.append(PreferencePair(prompt, chosen, rejected,
                                        {**meta, "chosen_rank": better, "rejected_rank": worse}))
    return pairs, ({"identical_responses": skipped} if skipped else {})


def parse_ratings(obj: dict) -> tuple[list[PreferencePair], Skips]:
    """{"prompt","response_a","response_b","preference": "a"|"b"|"tie"}; ties are skipped and counted."""
    needed = "'prompt', 'response_a', 'response_b' and 'preference'"
    prompt = check_text(require(obj, "prompt", "ratings", needed), "prompt", "Every prompt needs text")
    a = check_text(require(obj, "response_a", "ratings", needed), "response_a", "Every response needs text")
    b = check_text(require(obj, "response_b", "ratings", needed), "response_b", "Every response needs text")
    pref = require(obj, "preference", "ratings", needed)
    choice = pref.strip().lower() if isinstance(pref, str) else None
    if choice not in ("a", "b", "tie"):
        raise DataError(f"expected 'a', 'b' or 'tie', got {json_type(pref)} {_short(pref)}",
                        "Write the preferred response as the string \"a\", \"b\" or \"tie\" "
                        "(numbers are not accepted: 0/1 vs 1/2 is ambiguous)", field="preference")
    if choice == "tie":
        return [], {"tie": 1}
    check_distinct(a, b, "response_b", "response_a")
    meta = extras(obj, ("prompt", "response_a", "response_b", "preference"))
    chosen, rejected = (a, b) if choice == "a" else (b, a)
    return [PreferencePair(prompt, chosen, rejected, {**meta, "preference": choice})], {}


_HH_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):")


def split_hh(text: str, name: str) -> tuple[str, list[dict[str, str]], str]:
    """Split an HH transcript into (prompt up to and including the final Assistant marker,
    earlier turns as chat messages, final assistant reply stripped)."""
    fix = "Write it as '\\n\\nHuman: ...\\n\\nAssistant: ...', ending with the Assistant reply"
    marks = list(_HH_MARKER.finditer(text))
    if not marks or text[: marks[0].start()].strip() or marks[0].group(1) != "Human":
        raise DataError("does not start with a 'Human:' turn", fix, field=name)
    if not any(m.group(1) == "Assistant" for m in marks):
        raise DataError("has no '\\n\\nAssistant:' turn", fix, field=name)
    if marks[-1].group(1) != "Assistant":
        raise DataError("ends with a Human turn, not an Assistant reply", fix, field=name)
    ends = [m.start() for m in marks[1:]] + [len(text)]
    messages = []
    for k, (mark, end) in enumerate(zip(marks[:-1], ends)):
        content = text[mark.end():end].strip()
        if not content:
            raise DataError(f"turn {k + 1} ({mark.group(1)}) is empty", "Every turn needs text", field=name)
        messages.append({"role": "user" if mark.group(1) == "Human" else "assistant", "content": content})
    reply = text[marks[-1].end():].strip()
    if not reply:
        raise DataError("final Assistant reply is empty", "Every response needs text", field=name)
    return text[: marks[-1].end()], messages, reply


def parse_hh(obj: dict) -> tuple[list[PreferencePair], Skips]:
    """Anthropic HH-RLHF: two transcripts sharing every turn but the last Assistant reply."""
    needed = "'chosen' and 'rejected' transcripts"
    chosen = check_text(require(obj, "chosen", "hh", needed), "chosen", "Give the full transcript")
    rejected = check_text(require(obj, "rejected", "hh", needed), "rejected", "Give the full transcript")
    prompt, messages, chosen_reply = split_hh(chosen, "chosen")
    other_prompt, _, rejected_reply = split_hh(rejected, "rejected")
    if prompt != other_prompt:
        at = next((i for i, (x, y) in enumerate(zip(prompt, other_prompt)) if x != y),
                  min(len(prompt), len(other_prompt)))
        raise DataError(f"dialogue before the final Assistant reply differs from 'chosen' "
                        f"(first difference at character {at})",
                        "Both transcripts must share every turn and differ only in the last reply",
                        field="rejected")
    check_distinct(chosen_reply, rejected_reply, "rejected", "chosen")
    meta = extras(obj, ("chosen", "rejected"))
    return [PreferencePair(prompt, chosen_reply, rejected_reply, meta, messages)], {}


Parser = Callable[[dict], "tuple[list[Any], Skips]"]

PARSERS: dict[str, Parser] = {
    "prompts": parse_prompts,
    "sft": parse_sft,
    "preferences": parse_preferences,
    "ranked": parse_ranked,
    "ratings": parse_ratings,
    "hh": parse_hh,
}
PAIR_FORMATS = ("preferences", "ranked", "ratings", "hh")
