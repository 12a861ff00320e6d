"""Load, validate and convert the JSONL data files the notebooks train on.

One JSON object per line. Formats (`--format`), all normalised into dataclasses from
`rlhf_helpers.data_formats`; unknown keys (`id`, `domain`, `split`, ...) are kept in `metadata`:

| format        | a line holds                                                     | becomes           |
|---------------|------------------------------------------------------------------|-------------------|
| `prompts`     | `{"prompt": str}`; an optional `split` must be "train" or "test" | `PromptRecord`    |
| `sft`         | `{"prompt": str, "response": str}` or `{"messages": [...]}`      | `SFTRecord`       |
|               | (chat: roles system/user/assistant, >= 1 user turn, ends with    |                   |
|               | an assistant turn)                                               |                   |
| `preferences` | `{"prompt", "chosen", "rejected"}` as strings, or TRL's          | `PreferencePair`  |
|               | conversational form: `prompt` a message list, `chosen` and       |                   |
|               | `rejected` lists holding exactly one assistant message           |                   |
| `ranked`      | `{"prompt", "responses": [str, ...] (>= 2), "ranking": [int]}`   | n(n-1)/2 pairs    |
|               | `ranking` lists response indices best first (a permutation)      |                   |
| `ratings`     | `{"prompt", "response_a", "response_b", "preference"}` with      | one pair, or none |
|               | preference "a", "b" or "tie" (case-insensitive; no numbers)      |                   |
| `hh`          | Anthropic HH-RLHF `{"chosen": str, "rejected": str}` transcripts | one pair          |
|               | (`\\n\\nHuman: ...\\n\\nAssistant: ...`); prompt = the transcript up |                   |
|               | to and including the final `\\n\\nAssistant:`, plus chat messages  |                   |

Bad-input policy. Every error is a `DataError` reading `path:line: field 'x': what. how to fix`.
- Errors: malformed JSON; a line that is JSON but not an object; a missing field; a wrongly typed
  field; an empty or whitespace-only string; chosen identical to rejected (after stripping); a ranking
  that is not a permutation of 0..n-1 (length, duplicates, range, non-integers, booleans); HH
  transcripts whose dialogue before the final reply differs, or with no Assistant turn; bytes that are
  not UTF-8 (the line and byte offset are named); a line longer than `max_line_bytes` (default 1 MiB;
  checked before decoding, so a huge line is never decoded whole); a byte-order mark after line 1; a
  key given twice in one object; NaN or Infinity anywhere; a lone UTF-16 surrogate escape (`"\\ud800"`,
  which cannot be written back as UTF-8); a prompt `split` other than "train" or "test". A UTF-16 or
  UTF-32 file (one with its byte-order mark) and a file holding one JSON array (`[{...}, ...]`) get one
  error for the whole file, saying how to convert it.
- Accepted but reported as counted warnings, never silently: a UTF-8 BOM at the start of the file
  (stripped) and CRLF line endings (read as LF); records that repeat an earlier line exactly (kept); a
  file with no records; a pair file giving no pairs.
- Skipped and counted: blank lines (`LoadReport.blank_lines`), and in `LoadReport.skipped` (reason ->
  count) ratings ties (`tie`) and ranked pairs whose two texts are identical (`identical_responses`;
  the other pairs of that row are kept).
`load_*` raise the first error by default (`errors="raise"`) and log the warnings and skips (blank
lines included); `errors="collect"` keeps going and returns `(records, report)` with every error in
`report.errors`. The CLI collects:

    python -m rlhf_helpers.data validate FILE --format F [--max-line-bytes N]
    python -m rlhf_helpers.data convert FILE --format F --out OUT.jsonl [--conversational]

exit 0 when valid, 1 with the errors listed (first 20), 2 on usage errors. A file with no records is
an error to the CLI, and so is one giving no pairs to `convert` (it would write an empty file).
`convert` writes prompt/chosen/rejected only: it counts, as warnings, the extra fields it leaves out
and, without `--conversational`, the pairs whose system message or earlier turns it drops. This module
imports only the standard library, so validating a file does not load torch or `datasets`.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shlex
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from rlhf_helpers.data_formats import (
    PAIR_FORMATS,
    PARSERS,
    SPLITS,
    DataError,
    PreferencePair,
    PromptRecord,
    SFTRecord,
    json_type,
)
from rlhf_helpers.tracking import atomic_write_text

__all__ = [
    "DataError", "PromptRecord", "SFTRecord", "PreferencePair", "LoadReport", "FORMATS", "PAIR_FORMATS",
    "read_jsonl", "load", "load_prompts", "split_prompts", "load_sft", "load_preferences", "write_jsonl",
    "to_trl_preference_dataset", "train_test_split", "main",
]

log = logging.getLogger(__name__)

FORMATS = tuple(PARSERS)
DEFAULT_MAX_LINE_BYTES = 1 << 20
MAX_STORED_ERRORS = 1000
"""`errors="collect"` keeps this many `DataError`s; `LoadReport.n_errors` counts them all."""
MAX_SHOWN_ERRORS = 20
BOM = b"\xef\xbb\xbf"
# byte-order marks of the encodings that are not UTF-8, longest first (UTF-32 LE's starts with UTF-16 LE's)
WIDE_BOMS = ((b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),
             (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))
NO_RECORDS = "no records found"
NO_PAIRS = "no preference pairs produced (every row was skipped)"
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class LoadReport:
    """What a load saw: counts, skips by reason, warnings and (with `errors="collect"`) errors."""

    path: str
    format: str
    lines: int = 0
    """Physical lines in the file, blank ones included."""
    records: int = 0
    """Lines that parsed into valid records (a ranked row counts once, however many pairs it gives)."""
    blank_lines: int = 0
    pairs: int = 0
    """PreferencePairs produced (pair formats only)."""
    skipped: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    errors: list[DataError] = field(default_factory=list)
    n_errors: int = 0

    @property
    def ok(self) -> bool:
        return self.n_errors == 0

    def add_error(self, err: DataError) -> None:
        self.n_errors += 1
        if len(self.errors) < MAX_STORED_ERRORS:
            self.errors.append(err)

    def add_skips(self, skips: dict[str, int]) -> None:
        for reason, count in skips.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + count

    def summary(self) -> str:
        """A few human lines; the CLI prints this."""
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        lines = [
            f"file: {self.path}",
            f"format: {self.format}",
            f"lines: {self.lines} (blank lines skipped: {self.blank_lines})",
            f"records: {self.records}",
        ]
        if self.format in PAIR_FORMATS:
            lines.append(f"pairs produced: {self.pairs}")
        lines.append(f"skipped: {skipped}")
        lines.append(f"warnings: {len(self.warnings)}")
        lines += [f"  - {w}" for w in self.warnings]
        lines.append("result: valid" if self.ok else f"result: INVALID, {self.n_errors} error(s)")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ reading

def _read_raw_line(f, limit: int) -> tuple[bytes | None, int]:
    """The next raw line (terminator included) and its size; None instead of the bytes when it is
    longer than `limit`, in which case the rest is read in chunks and dropped, never held whole."""
    raw = f.readline(limit + 2)  # + 2 leaves room for a CRLF after a line of exactly `limit` bytes
    if raw.endswith(b"\n") or len(raw) < limit + 2:
        return raw, len(raw)
    size, tail = len(raw), raw[-2:]
    while True:
        chunk = f.readline(1 << 20)
        if not chunk:
            break
        size, tail = size + len(chunk), (tail + chunk)[-2:]
        if chunk.endswith(b"\n"):
            break
    return None, size - (2 if tail == b"\r\n" else 1 if tail.endswith(b"\n") else 0)


def _decode_line(content: bytes, offset: int) -> str:
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"invalid UTF-8 byte 0x{content[e.start]:02x} at byte offset {e.start} of the line "
            f"(byte {offset + e.start} of the file)",
            "Re-encode the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in.jsonl > out.jsonl`)",
        ) from None


class _DuplicateKey(dict):
    """A decoded object that gave a key twice (`json` keeps the last value); `_check_values` reports it."""

    def __init__(self, pairs: list[tuple[str, Any]], key: str):
        super().__init__(pairs)
        self.key = key


def _object(pairs: list[tuple[str, Any]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) == len(keys):
        return dict(pairs)
    return _DuplicateKey(pairs, next(k for i, k in enumerate(keys) if k in keys[:i]))


_SURROGATE_HINT = ("A \\ud800-\\udbff escape must be followed by a \\udc00-\\udfff one (a pair is one character); "
                   "fix or remove the escape: such text cannot be written as UTF-8")


def _check_values(obj: dict) -> None:
    """Reject what `json.loads` accepts but a data file must not hold: a key given twice in one object,
    NaN/Infinity (not standard JSON) and lone UTF-16 surrogates (which cannot be written as UTF-8)."""
    stack: list[tuple[str | None, Any]] = [(None, obj)]  # a loop, not recursion: json allows deep nesting
    while stack:
        where, value = stack.pop()
        if isinstance(value, dict):
            if isinstance(value, _DuplicateKey):
                raise DataError("given more than once in one object (only the last value would be kept)",
                                "Keep one of them", field=value.key if where is None else f"{where}.{value.key}")
            for k in value:
                if _SURROGATE.search(k):
                    raise DataError(f"key {ascii(k)} holds a lone UTF-16 surrogate", _SURROGATE_HINT, field=where)
            stack += [(k if where is None else f"{where}.{k}", v) for k, v in reversed(value.items())]
        elif isinstance(value, list):
            stack += [(f"{where}[{i}]", v) for i, v in reversed(list(enumerate(value)))]
        elif isinstance(value, float) and not math.isfinite(value):
            raise DataError(f"{value} is not a JSON number (NaN and Infinity are non-standard; a number "
                            f"too large for a float, e.g. 1e400, reads as Infinity)",
                            "Write a finite number, or null for a missing value", field=where)
        elif isinstance(value, str) and (m := _SURROGATE.search(value)):
            raise DataError(f"lone UTF-16 surrogate \\u{ord(m.group()):04x} at character {m.start()}",
                            _SURROGATE_HINT, field=where)


def _parse_json(text: str) -> dict:
    try:
        obj = json.loads(text, object_pairs_hook=_object)
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON: {e.msg} at column {e.colno}",
                        "Each line must hold one complete JSON object") from None
    except RecursionError:
        raise DataError("JSON nested too deeply", "Flatten the record") from None
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {json_type(obj)}", 'Write one {"field": value, ...} object per line')
    _check_values(obj)
    return obj


def _scan(path: str | os.PathLike, max_line_bytes: int, report: LoadReport) -> Iterator[tuple[int, dict | DataError]]:
    """Yield (line_no, object) per non-blank line, or (line_no, DataError) for a bad one, so a caller
    can stop or keep going. Updates `report.lines`, `blank_lines` and the BOM/CRLF/duplicate warnings.
    A file that is not JSON Lines at all (UTF-16 or UTF-32, one JSON array) gives one error, not one per line."""
    if max_line_bytes < 1:
        raise ValueError(f"max_line_bytes must be positive, got {max_line_bytes}")
    crlf, first_crlf = 0, 0
    seen: dict[bytes, int] = {}  # digest of each distinct record -> its first line
    duplicates: list[tuple[int, int]] = []
    started = not_jsonl = False
    with open(path, "rb") as f:
        line_no = 0
        while True:
            offset = f.tell()
            raw, size = _read_raw_line(f, max_line_bytes)
            if raw == b"":
                break
            line_no += 1
            if not_jsonl:
                continue  # the one error already said what the file is; only count its lines
            try:
                if raw is None:
                    raise _too_long(size, max_line_bytes)
                if line_no == 1 and raw.startswith(b"\x1f\x8b"):  # gzip's magic number
                    not_jsonl = True
                    raise DataError("the file is gzip-compressed, not JSON Lines text",
                                    f"Decompress it first: `gunzip -k {shlex.quote(str(path))}`")
                wide = next(((b, c) for b, c in WIDE_BOMS if raw.startswith(b)), None) if line_no == 1 else None
                if wide:
                    not_jsonl, (bom, codec) = True, wide
                    raise DataError(f"the file is {codec.upper()} (it starts with the byte-order mark {bom.hex(' ')})",
                                    f"Re-encode it as UTF-8: `iconv -f {codec} -t utf-8 {shlex.quote(str(path))} "
                                    f"> out.jsonl`")
                content = raw[:-1] if raw.endswith(b"\n") else raw
                if content.endswith(b"\r") and raw.endswith(b"\n"):
                    crlf, first_crlf = crlf + 1, first_crlf or line_no
                    content = content[:-1]
                if content.startswith(BOM):
                    if line_no > 1:
                        raise DataError("UTF-8 byte-order mark (BOM) at the start of this line",
                                        "Files were probably concatenated; remove the BOM (U+FEFF)")
                    content, offset = content[len(BOM):], offset + len(BOM)
                    report.warnings.append("line 1: UTF-8 byte-order mark (BOM) at the start of the file; stripped")
                if len(content) > max_line_bytes:
                    raise _too_long(len(content), max_line_bytes)
                text = _decode_line(content, offset)
                if not text.strip():
                    report.blank_lines += 1
                    continue
                if not started and text.lstrip().startswith("["):
                    not_jsonl = True
                    raise DataError("the file is one JSON array, not JSON Lines (one object per line)",
                                    f"Convert it: `jq -c '.[]' {shlex.quote(str(path))} > out.jsonl`")
                started = True
                obj = _parse_json(text)
            except DataError as e:
                e.path, e.line, started = str(path), line_no, True
                yield line_no, e
                continue
            digest = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).digest()
            if digest in seen:
                duplicates.append((line_no, seen[digest]))
            else:
                seen[digest] = line_no
            yield line_no, obj
    report.lines = line_no
    if crlf:
        report.warnings.append(f"{crlf} line(s) end with CRLF (Windows line endings), first at line "
                               f"{first_crlf}; read as LF")
    if duplicates:
        report.warnings.append(f"{len(duplicates)} record(s) repeat an earlier line exactly, first line "
                               f"{duplicates[0][0]} (same as line {duplicates[0][1]}); kept")


def _too_long(size: int, limit: int) -> DataError:
    return DataError(f"line is {size:,} bytes, over the limit of {limit:,} bytes",
                     "Shorten or split the record, or raise max_line_bytes (--max-line-bytes)")


def read_jsonl(path: str | os.PathLike, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
               report: LoadReport | None = None) -> Iterator[tuple[int, dict]]:
    """Yield (1-based line number, object) for each non-blank line; raise the first `DataError`.

    Reads bytes line by line so the size limit is checked before decoding. BOM/CRLF warnings and
    blank-line counts go to `report` when given, else to this module's logger at the end.
    """
    own = report is None
    report = report if report is not None else LoadReport(str(path), "jsonl")
    for line_no, item in _scan(path, max_line_bytes, report):
        if isinstance(item, DataError):
            raise item
        yield line_no, item
    if own:
        _log_report(report)


def _log_report(report: LoadReport) -> None:
    """Callers of the list-returning helpers never see the report; the warnings still get out."""
    for w in report.warnings:
        log.warning("%s: %s", report.path, w)
    skipped = {**({"blank_lines": report.blank_lines} if report.blank_lines else {}), **report.skipped}
    if skipped:
        log.warning("%s: skipped %s", report.path, ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())))


# ------------------------------------------------------------------------------------------- loading

def load(path: str | os.PathLike, format: str, *, errors: str = "raise",
         max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> tuple[list[Any], LoadReport]:
    """Parse every line of `path` as `format`; return (records, report).

    `errors="raise"` stops at the first bad line; `errors="collect"` records it in `report.errors`,
    drops that line and goes on, so one run lists everything to fix.
    """
    if format not in PARSERS:
        raise ValueError(f"unknown format {format!r}; choose one of: {', '.join(FORMATS)}")
    if errors not in ("raise", "collect"):
        raise ValueError(f"errors must be 'raise' or 'collect', got {errors!r}")
    parser = PARSERS[format]
    report = LoadReport(str(path), format)
    records: list[Any] = []
    for line_no, item in _scan(path, max_line_bytes, report):
        if not isinstance(item, DataError):
            try:
                out, skips = parser(item)
            except DataError as e:
                e.path, e.line, item = str(path), line_no, e
            else:
                report.records += 1
                report.add_skips(skips)
                records.extend(out)
                continue
        if errors == "raise":
            raise item
        report.add_error(item)
    _finish(report, records)
    return records, report


def _finish(report: LoadReport, records: list[Any]) -> None:
    if report.format in PAIR_FORMATS:
        report.pairs = len(records)
    if not report.ok:
        return  # the errors already say what is wrong; "no records" would only repeat them
    if report.records == 0:
        report.warnings.append(NO_RECORDS)
    elif report.format in PAIR_FORMATS and not records:
        report.warnings.append(NO_PAIRS)


def _load_list(path, format: str, errors: str, max_line_bytes: int):
    records, report = load(path, format, errors=errors, max_line_bytes=max_line_bytes)
    if errors == "collect":
        return records, report
    _log_report(report)
    return records


def load_prompts(path: str | os.PathLike, *, errors: str = "raise",
                 max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> list[PromptRecord]:
    """Prompt records; with `errors="collect"` returns (records, LoadReport) instead."""
    return _load_list(path, "prompts", errors, max_line_bytes)


def split_prompts(split: str, path: str | os.PathLike | None = None) -> list[PromptRecord]:
    """The records of one split ("train" or "test") of a prompts file, the shipped data/prompts.jsonl by
    default, in file order. A `split` other than those two is a `DataError`; prompts with no `split`
    belong to neither side and are counted in a logged warning, never left out silently."""
    from .paths import data_path

    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(map(repr, SPLITS))}, got {split!r}")
    path = path or data_path("prompts.jsonl")
    records = load_prompts(path)
    counts = Counter(r.metadata.get("split") for r in records)
    if counts[None]:
        log.warning("%s: %d prompt(s) have no 'split', so are in neither the train nor the test split; "
                    "add \"split\": \"train\" or \"test\" to use them", path, counts[None])
    other = next(s for s in SPLITS if s != split)
    log.info("%s: %d %s prompt(s); left out %d %s and %d with no split", path, counts[split], split,
             counts[other], other, counts[None])
    return [r for r in records if r.metadata.get("split") == split]


def train_prompts(n: int | None = None) -> list[str]:
    """User messages of the shipped data/prompts.jsonl's train split (what notebooks 03-05 train on);
    the first `n` of them, or all with a logged warning when the split has fewer than `n`."""
    prompts = [r.prompt for r in split_prompts("train")]
    if n is not None and n > len(prompts):
        log.warning("train_prompts(n=%d): the train split has only %d prompts; using all of them", n, len(prompts))
    return prompts[:n]


def load_sft(path: str | os.PathLike, *, errors: str = "raise",
             max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> list[SFTRecord]:
    """SFT records from either shape; with `errors="collect"` returns (records, LoadReport) instead."""
    return _load_list(path, "sft", errors, max_line_bytes)


def load_preferences(path: str | os.PathLike, format: str = "preferences", *, errors: str = "raise",
                     max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> list[PreferencePair]:
    """PreferencePairs from any pair format (`preferences`, `ranked`, `ratings`, `hh`);
    with `errors="collect"` returns (pairs, LoadReport) instead."""
    if format not in PAIR_FORMATS:
        raise ValueError(f"format {format!r} does not give preference pairs; use one of {', '.join(PAIR_FORMATS)}")
    return _load_list(path, format, errors, max_line_bytes)


# ---------------------------------------------------------------------------------- writing, converting

def _as_dict(record: Any) -> dict:
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        return dataclasses.asdict(record)
    if isinstance(record, dict):
        return record
    raise TypeError(f"cannot write {type(record).__name__} as a JSONL record; give dicts or dataclasses")


def write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> Path:
    """Write dicts/dataclasses one per line, atomically: a reader never sees a half-written file."""
    text = "".join(json.dumps(_as_dict(r), ensure_ascii=False) + "\n" for r in records)
    return atomic_write_text(path, text)


def to_trl_preference_dataset(pairs: Iterable[PreferencePair], conversational: bool = False) -> list[dict]:
    """Rows for TRL's DPO/reward trainers: `Dataset.from_list(rows)` when you need a `datasets.Dataset`.

    Strings by default. `conversational=True` gives message lists: the pair's `prompt_messages` when
    it has them (so multi-turn context survives), else one user message; chosen/rejected one assistant
    message each. In string form a multi-turn conversational pair keeps only its last user message.
    """
    rows = []
    for p in pairs:
        if not conversational:
            rows.append({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected})
            continue
        prompt = p.prompt_messages if p.prompt_messages else [{"role": "user", "content": p.prompt}]
        rows.append({
            "prompt": [dict(m) for m in prompt],
            "chosen": [{"role": "assistant", "content": p.chosen}],
            "rejected": [{"role": "assistant", "content": p.rejected}],
        })
    return rows


_DERIVED_METADATA = {"ranked": ("chosen_rank", "rejected_rank"), "ratings": ("preference",)}
"""Metadata a parser adds from the fields it reads, so not an extra field of the input."""


def _conversion_losses(pairs: Sequence[PreferencePair], format: str, conversational: bool = False) -> list[str]:
    """What `to_trl_preference_dataset(pairs, conversational)` leaves out, as counted warnings: prompt
    context that the string form cannot hold, and the extra fields (metadata) of the input."""
    losses = []
    if not conversational and format != "hh":  # an HH pair's string prompt is its whole transcript
        cut = sum(1 for p in pairs if p.prompt_messages and len(p.prompt_messages) > 1)
        if cut:
            losses.append(f"{cut} pair(s) have a system message or earlier turns in 'prompt'; the string output "
                          f"keeps only the last user message (pass --conversational to keep them all)")
    derived = _DERIVED_METADATA.get(format, ())
    dropped = Counter(k for p in pairs for k in p.metadata if k not in derived)
    if dropped:
        losses.append("extra fields not written (pairs that had them): "
                      + ", ".join(f"{k}={v}" for k, v in sorted(dropped.items())))
    return losses


def _bucket(key: Any, seed: int) -> float:
    """A stable number in [0, 1) from the key text and the seed (sha256, unlike `hash`, is the same in
    every process and on every machine)."""
    text = key if isinstance(key, str) else json.dumps(key, sort_keys=True, ensure_ascii=False)
    digest = hashlib.sha256(f"{seed}\x00{text}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def train_test_split(records: Sequence[Any], test_fraction: float = 0.2, seed: int = 0,
                     key: Callable[[Any], Any] = lambda r: r.prompt) -> tuple[list[Any], list[Any]]:
    """Split by a hash of `key(record)` (the prompt): the same prompt always lands on the same side,
    whatever the order or the other records, so no prompt leaks from train into test.
    The test share is `test_fraction` of distinct keys on average, not exactly."""
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    train, test = [], []
    for r in records:
        (test if _bucket(key(r), seed) < test_fraction else train).append(r)
    return train, test


# ------------------------------------------------------------------------------------------------ CLI

def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rlhf_helpers.data",
                                     description="Validate or convert RLHF JSONL data files.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, formats, help_ in (("validate", FORMATS, "check a file and print a summary"),
                                 ("convert", PAIR_FORMATS, "write normalised prompt/chosen/rejected rows")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("file")
        p.add_argument("--format", required=True, choices=formats)
        p.add_argument("--max-line-bytes", type=int, default=DEFAULT_MAX_LINE_BYTES)
        if name == "convert":
            p.add_argument("--out", required=True, help="output .jsonl (written atomically)")
            p.add_argument("--conversational", action="store_true", help="message lists instead of strings")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 valid, 1 invalid or unreadable, 2 usage)."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.max_line_bytes < 1:
        parser.error("--max-line-bytes must be positive")
    if args.command == "convert" and Path(args.out).resolve() == Path(args.file).resolve():
        parser.error(f"--out {args.out} is the input file: converting in place would overwrite it; write to a "
                     f"new file, e.g. --out pairs.jsonl")
    try:
        records, report = load(args.file, args.format, errors="collect", max_line_bytes=args.max_line_bytes)
    except OSError as e:
        print(f"{args.file}: cannot read the file: {e.strerror or e}", file=sys.stderr)
        return 1
    if report.ok and (report.records == 0 or (args.command == "convert" and not records)):
        # `load` warns; to the CLI a file with nothing to use is a mistake (a wrong path, a failed export)
        empty = report.records == 0
        report.warnings.remove(NO_RECORDS if empty else NO_PAIRS)
        report.add_error(DataError(NO_RECORDS if empty else NO_PAIRS,
                                   "The file is empty or holds only blank lines; check the path" if empty
                                   else "There is nothing to write; see 'skipped' in the summary", path=args.file))
    if report.ok and args.command == "convert":
        report.warnings += _conversion_losses(records, args.format, args.conversational)
    print(report.summary())
    if not report.ok:
        for err in report.errors[:MAX_SHOWN_ERRORS]:
            print(err, file=sys.stderr)
        if report.n_errors > MAX_SHOWN_ERRORS:
            print(f"... and {report.n_errors - MAX_SHOWN_ERRORS} more", file=sys.stderr)
        return 1
    if args.command == "convert":
        try:
            write_jsonl(args.out, to_trl_preference_dataset(records, conversational=args.conversational))
        except OSError as e:  # a folder where the file should go, a file where a folder should, no permission
            print(f"{args.out}: cannot write the converted pairs: {e.strerror or e}; give --out a file path in a "
                  f"folder you can write", file=sys.stderr)
            return 1
        print(f"wrote {len(records)} pairs to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
