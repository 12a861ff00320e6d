"""Text features shared by the reward components, the gold judge and the evaluation (distinct-n).

Deliberately simple and transparent: word tokens by regex, a small stopword list, a crude stemmer.
Everything here is a pure function of strings.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

WORD = re.compile(r"[A-Za-z][A-Za-z'\-]*|\d+(?:\.\d+)?")
SENTENCE_END = re.compile(r"[.!?](?:[\"')\]]*)(?:\s+|$)")
LIST_LINE = re.compile(r"^\s*(?:\d+[.)]|[-*•])\s+\S", re.MULTILINE)
CODE_FENCE = re.compile(r"```")

STOPWORDS = frozenset("""
a an the and or but if then so than that this these those there here of to in on at by for with from
into onto over under about as is are was were be been being am do does did doing have has had having
i me my mine we us our you your yours he him his she her it its they them their what which who whom
whose when where why how can could should would will shall may might must not no nor only own same
too very just also any all each every some such more most other few both s t don't can't won't it's
i'm you're let's up down out off again further once
""".split())


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters, apostrophes, hyphens; numbers)."""
    return [w.lower() for w in WORD.findall(text)]


def stem(word: str) -> str:
    """A crude suffix stripper: enough to match 'explains'/'explained'/'explaining'."""
    for suffix in ("ing", "ed", "es", "s", "ly"):
        if len(word) > len(suffix) + 3 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


def content_words(text: str) -> list[str]:
    """Stemmed words that carry meaning (no stopwords, no one-letter tokens)."""
    return [stem(w) for w in words(text) if w not in STOPWORDS and len(w) > 1]


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(tokens: Sequence[str], n: int) -> float:
    """Share of n-grams that are distinct (1.0 for no repetition; 1.0 for texts shorter than n)."""
    grams = ngrams(tokens, n)
    return len(set(grams)) / len(grams) if grams else 1.0


def repeated_fraction(tokens: Sequence[str], n: int = 3) -> float:
    """Share of n-grams that repeat an earlier n-gram: 0 for fresh text, near 1 for a loop."""
    return 1.0 - distinct_n(tokens, n)


def sentences(text: str) -> list[str]:
    """Sentences split at . ! ? followed by space or end; list lines count as sentences."""
    parts: list[str] = []
    for line in text.splitlines():
        parts.extend(s.strip() for s in SENTENCE_END.split(line) if s and s.strip())
    return parts


def repeated_sentence_fraction(text: str) -> float:
    """Share of sentences (normalised) that are copies of an earlier one."""
    sents = [" ".join(words(s)) for s in sentences(text)]
    sents = [s for s in sents if s]
    if len(sents) < 2:
        return 0.0
    counts = Counter(sents)
    return sum(c - 1 for c in counts.values()) / len(sents)


def list_items(text: str) -> list[str]:
    """Lines that are numbered or bulleted list items."""
    return [m.group(0) for m in re.finditer(r"^\s*(?:\d+[.)]|[-*•])\s+.*$", text, re.MULTILINE)]


def ends_cleanly(text: str) -> bool:
    """True when the text ends a sentence, a closed code block, or a letter's sign-off, not mid-word."""
    t = text.rstrip()
    if not t or len(CODE_FENCE.findall(t)) % 2:  # an unclosed code block was cut off
        return False
    if t[-1] in ".!?:)\"'" or t.endswith("```"):
        return True
    lines = [line.strip() for line in t.splitlines() if line.strip()]
    # "Best regards,\nSam": a short name line after a line ending in a comma
    return len(lines) >= 2 and lines[-2].endswith(",") and len(lines[-1].split()) <= 3


def copy_fraction(response: str, source: str, n: int = 4) -> float:
    """Share of the response's word n-grams that appear verbatim in `source` (prompt copying)."""
    resp = ngrams(words(response), n)
    if not resp:
        return 0.0
    src = set(ngrams(words(source), n))
    return sum(g in src for g in resp) / len(resp)


def distinct_stats(texts: Sequence[str]) -> dict[str, float]:
    """distinct-1 and distinct-2 over a set of texts (pooled n-grams), and mean length in words."""
    toks = [words(t) for t in texts]
    uni = [g for t in toks for g in ngrams(t, 1)]
    bi = [g for t in toks for g in ngrams(t, 2)]
    return {
        "distinct_1": len(set(uni)) / len(uni) if uni else 0.0,
        "distinct_2": len(set(bi)) / len(bi) if bi else 0.0,
        "mean_words": sum(map(len, toks)) / len(toks) if toks else 0.0,
    }
