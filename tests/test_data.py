"""Tests for rlhf_helpers.data: every format, every bad input, the split and the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_helpers.data import (
    DataError,
    PreferencePair,
    load,
    load_preferences,
    load_prompts,
    load_sft,
    read_jsonl,
    split_prompts,
    to_trl_preference_dataset,
    train_prompts,
    train_test_split,
    write_jsonl,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "data" / "examples"

HH_PROMPT = "\n\nHuman: Hi there.\n\nAssistant: Hello! How can I help?\n\nHuman: Name a colour."
HH_CHOSEN = HH_PROMPT + "\n\nAssistant:  Blue. \n"
HH_REJECTED = HH_PROMPT + "\n\nAssistant: I would rather not."


def write(tmp_path: Path, rows: list, name: str = "data.jsonl") -> Path:
    """Rows may be dicts (dumped as JSON) or raw str lines; joined with LF."""
    path = tmp_path / name
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def first_error(path: Path, format: str) -> DataError:
    with pytest.raises(DataError) as info:
        load(path, format)
    return info.value


def assert_error(err: DataError, path: Path, line: int, field: str | None) -> str:
    """The message must name the file, the line and (when there is one) the field."""
    text = str(err)
    assert err.path == str(path) and err.line == line
    assert text.startswith(f"{path}:{line}: "), text
    if field is not None:
        assert err.field == field
        assert f"field '{field}'" in text, text
    assert err.hint and err.hint in text
    return text


# ------------------------------------------------------------------------------------ valid formats

def test_prompts_keep_extra_fields_as_metadata(tmp_path):
    path = write(tmp_path, [{"prompt": "Hi", "domain": "chat", "id": 7}, {"prompt": "Bye"}])
    recs = load_prompts(path)
    assert [r.prompt for r in recs] == ["Hi", "Bye"]
    assert recs[0].metadata == {"domain": "chat", "id": 7} and recs[1].metadata == {}


def test_sft_pair_shape(tmp_path):
    path = write(tmp_path, [{"prompt": "2+2?", "response": "4", "id": "a"}])
    (rec,) = load_sft(path)
    assert (rec.prompt, rec.response, rec.metadata) == ("2+2?", "4", {"id": "a"})
    assert rec.messages == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


def test_sft_messages_shape_multi_turn(tmp_path):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
    (rec,) = load_sft(write(tmp_path, [{"messages": msgs}]))
    assert rec.prompt == "2+2?" and rec.response == "4"
    assert rec.messages == msgs and rec.prompt_messages == msgs[:-1]


def test_preferences_string_shape(tmp_path):
    (p,) = load_preferences(write(tmp_path, [{"prompt": "P", "chosen": "good", "rejected": "bad", "src": 1}]))
    assert (p.prompt, p.chosen, p.rejected, p.metadata, p.prompt_messages) == ("P", "good", "bad", {"src": 1}, None)


def test_preferences_conversational_shape(tmp_path):
    prompt = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "yes"}],
           "rejected": [{"role": "assistant", "content": "no"}]}
    (p,) = load_preferences(write(tmp_path, [row]))
    assert (p.prompt, p.chosen, p.rejected) == ("Q", "yes", "no")
    assert p.prompt_messages == prompt
    (trl,) = to_trl_preference_dataset([p], conversational=True)
    assert trl == {"prompt": prompt, "chosen": [{"role": "assistant", "content": "yes"}],
                   "rejected": [{"role": "assistant", "content": "no"}]}


def test_ranked_n3_gives_three_pairs_best_first(tmp_path):
    row = {"prompt": "P", "responses": ["mid", "worst", "best"], "ranking": [2, 0, 1]}
    pairs, report = load(write(tmp_path, [row]), "ranked")
    assert {(p.chosen, p.rejected) for p in pairs} == {("best", "mid"), ("best", "worst"), ("mid", "worst")}
    assert len(pairs) == 3 and report.pairs == 3 and report.records == 1


def test_ranked_n4_gives_six_pairs(tmp_path):
    row = {"prompt": "P", "responses": ["a", "b", "c", "d"], "ranking": [3, 2, 1, 0]}
    pairs = load_preferences(write(tmp_path, [row]), "ranked")
    assert len(pairs) == 6 and all(p.chosen > p.rejected for p in pairs)  # d > c > b > a


def test_ranked_identical_responses_are_skipped_and_counted(tmp_path):
    row = {"prompt": "P", "responses": ["same", "other", " same "], "ranking": [0, 1, 2]}
    pairs, report = load(write(tmp_path, [row]), "ranked", errors="collect")
    assert [(p.chosen, p.rejected) for p in pairs] == [("same", "other"), ("other", " same ")]
    assert report.skipped == {"identical_responses": 1} and report.ok


def test_ratings_ties_skipped_and_counted(tmp_path):
    rows = [{"prompt": "P", "response_a": "x", "response_b": "y", "preference": "a"},
            {"prompt": "P", "response_a": "x", "response_b": "y", "preference": "B"},
            {"prompt": "P", "response_a": "x", "response_b": "y", "preference": "tie"},
            {"prompt": "Q", "response_a": "u", "response_b": "v", "preference": "TIE"}]
    pairs, report = load(write(tmp_path, rows), "ratings")
    assert [(p.chosen, p.rejected) for p in pairs] == [("x", "y"), ("y", "x")]
    assert report.skipped == {"tie": 2} and report.records == 4 and report.pairs == 2
    assert "tie=2" in report.summary()


def test_hh_split_two_turn_dialogue(tmp_path):
    (p,) = load_preferences(write(tmp_path, [{"chosen": HH_CHOSEN, "rejected": HH_REJECTED}]), "hh")
    assert p.prompt == HH_PROMPT + "\n\nAssistant:"
    assert p.chosen == "Blue." and p.rejected == "I would rather not."
    assert p.prompt_messages == [{"role": "user", "content": "Hi there."},
                                 {"role": "assistant", "content": "Hello! How can I help?"},
                                 {"role": "user", "content": "Name a colour."}]


def test_hh_prompt_mismatch_is_an_error(tmp_path):
    other = HH_REJECTED.replace("Name a colour.", "Name a number.")
    path = write(tmp_path, [{"chosen": HH_CHOSEN, "rejected": HH_CHOSEN.replace("Blue", "Red")},
                            {"chosen": HH_CHOSEN, "rejected": other}])
    text = assert_error(first_error(path, "hh"), path, 2, "rejected")
    assert "differs" in text


@pytest.mark.parametrize("chosen, rejected, field, words", [
    ("\n\nHuman: Hi", "\n\nHuman: Hi", "chosen", "no '\\n\\nAssistant:' turn"),
    ("\n\nHuman: Hi\n\nAssistant: Yo", "\n\nHuman: Hi\n\nAssistant:  Yo ", "rejected", "identical"),
    ("\n\nHuman: Hi\n\nAssistant: Yo", "\n\nHuman: Hi\n\nAssistant:   ", "rejected", "empty"),
    ("Hello\n\nAssistant: Yo", "Hello\n\nAssistant: No", "chosen", "does not start"),
])
def test_hh_bad_transcripts(tmp_path, chosen, rejected, field, words):
    path = write(tmp_path, [{"chosen": chosen, "rejected": rejected}])
    assert words in assert_error(first_error(path, "hh"), path, 1, field)


# ---------------------------------------------------------------------------------------- bad input

GOOD_PREF = {"prompt": "P", "chosen": "c", "rejected": "r"}


@pytest.mark.parametrize("format, row, field, words", [
    ("preferences", {"prompt": "P", "chosen": "c"}, "rejected", "missing"),
    ("preferences", {"prompt": "P", "chosen": 3, "rejected": "r"}, "chosen", "expected a string, got number"),
    ("preferences", {"prompt": None, "chosen": "c", "rejected": "r"}, "prompt", "got null"),
    ("preferences", {"prompt": "P", "chosen": "", "rejected": "r"}, "chosen", "empty string"),
    ("preferences", {"prompt": "P", "chosen": "c", "rejected": " \t\n"}, "rejected", "whitespace-only"),
    ("preferences", {"prompt": "P", "chosen": " same", "rejected": "same "}, "rejected", "identical to 'chosen'"),
    ("preferences", {"prompt": "P", "chosen": [{"role": "assistant", "content": "c"}], "rejected": "r"},
     "chosen", "list of messages"),
    ("preferences", {"prompt": [{"role": "user", "content": "P"}], "chosen": [{"role": "assistant", "content": "c"}],
                     "rejected": [{"role": "user", "content": "r"}]}, "rejected", "exactly one assistant"),
    ("prompts", {"text": "P"}, "prompt", "missing"),
    ("prompts", {"prompt": ["P"]}, "prompt", "got array"),
    ("sft", {"prompt": "P"}, "response", "missing"),
    ("sft", {"messages": [{"role": "user", "content": "Q"}]}, "messages", "last message has role 'user'"),
    ("sft", {"messages": [{"role": "robot", "content": "Q"}, {"role": "assistant", "content": "A"}]},
     "messages[0].role", "unknown role"),
    ("sft", {"messages": [{"role": "system", "content": "S"}, {"role": "assistant", "content": "A"}]},
     "messages", "no user message"),
    ("sft", {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": " "}]},
     "messages[1].content", "whitespace-only"),
    ("sft", {"messages": "hi"}, "messages", "expected an array"),
    ("ranked", {"prompt": "P", "responses": ["a"], "ranking": [0]}, "responses", "at least 2"),
    ("ranked", {"prompt": "P", "responses": ["a", 5], "ranking": [0, 1]}, "responses[1]", "expected a string"),
    ("ratings", {"prompt": "P", "response_a": "x", "response_b": "y", "preference": 1}, "preference", "'a', 'b' or 'tie'"),
    ("ratings", {"prompt": "P", "response_a": "x", "response_b": "y", "preference": "c"}, "preference", "'a', 'b' or 'tie'"),
    ("ratings", {"prompt": "P", "response_a": "x", "response_b": "x", "preference": "a"}, "response_b", "identical"),
    ("hh", {"chosen": HH_CHOSEN}, "rejected", "missing"),
    ("sft", {"messages": ["hi", {"role": "assistant", "content": "A"}]}, "messages[0]", "expected a message object"),
    ("sft", {"messages": [{"content": "Q"}, {"role": "assistant", "content": "A"}]}, "messages[0].role", "missing"),
    ("sft", {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant"}]}, "messages[1].content", "missing"),
    ("sft", {"messages": []}, "messages", "empty array"),
    ("sft", {"prompt": "P", "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
     "prompt", "given together with 'messages'"),
    ("sft", {"response": "R", "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]},
     "response", "given together with 'messages'"),
    ("preferences", {"prompt": [{"role": "system", "content": "S"}], "chosen": [{"role": "assistant", "content": "c"}],
                     "rejected": [{"role": "assistant", "content": "r"}]}, "prompt", "no user message"),
    ("preferences", {"prompt": [{"role": "user", "content": "P"}], "chosen": "c",
                     "rejected": [{"role": "assistant", "content": "r"}]},
     "chosen", "is a string but 'prompt' is a list of messages"),
    ("preferences", {"prompt": [{"role": "user", "content": "P"}], "chosen": [{"role": "assistant", "content": "c"}],
                     "rejected": 3}, "rejected", "is a number but 'prompt' is a list of messages"),
    ("hh", {"chosen": HH_CHOSEN + "\n\nHuman: And another?", "rejected": HH_REJECTED}, "chosen",
     "ends with a Human turn"),
    ("hh", {"chosen": "\n\nHuman: Hi\n\nAssistant:\n\nHuman: Hello?\n\nAssistant: Yo",
            "rejected": "\n\nHuman: Hi\n\nAssistant:\n\nHuman: Hello?\n\nAssistant: No"},
     "chosen", "turn 2 (Assistant) is empty"),
])
def test_bad_field_names_file_line_and_field(tmp_path, format, row, field, words):
    good = {"preferences": GOOD_PREF, "prompts": {"prompt": "P"}, "sft": {"prompt": "P", "response": "R"},
            "ranked": {"prompt": "P", "responses": ["a", "b"], "ranking": [1, 0]},
            "ratings": {"prompt": "P", "response_a": "x", "response_b": "y", "preference": "a"},
            "hh": {"chosen": HH_CHOSEN, "rejected": HH_REJECTED}}[format]
    path = write(tmp_path, [good, good, row, good])
    text = assert_error(first_error(path, format), path, 3, field)
    assert words in text


@pytest.mark.parametrize("ranking, words", [
    ([0, 1], "has 2 entries for 3 responses"),
    ([0, 1, 1], "index 1 appears more than once"),
    ([0, 1, 3], "index 3 is out of range 0..2"),
    ([0, 1, -1], "index -1 is out of range"),
    ([0, 1, 2.0], "not an integer index"),
    ([0, True, 2], "boolean"),
    ([0, "1", 2], "string"),
    ("0,1,2", "expected an array"),
])
def test_ranking_not_a_permutation(tmp_path, ranking, words):
    path = write(tmp_path, [{"prompt": "P", "responses": ["a", "b", "c"], "ranking": ranking}])
    text = assert_error(first_error(path, "ranked"), path, 1, "ranking")
    assert words in text and "exactly once" in text


@pytest.mark.parametrize("line, words", [
    ('{"prompt": "P", "chosen": "c", ', "not valid JSON"),
    ("[1, 2, 3]", "expected a JSON object, got array"),
    ('"just a string"', "expected a JSON object, got string"),
])
def test_malformed_json_and_non_objects(tmp_path, line, words):
    path = write(tmp_path, [GOOD_PREF, line])
    assert words in assert_error(first_error(path, "preferences"), path, 2, None)


def test_non_utf8_bytes_name_line_and_offset(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    text = assert_error(first_error(path, "prompts"), path, 2, None)
    assert "0xe9" in text and "byte offset 15 of the line" in text and "Re-encode the file as UTF-8" in text


def test_huge_line_rejected_with_default_limit(tmp_path):
    path = tmp_path / "huge.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "' + b"x" * 2_000_000 + b'"}\n{"prompt": "b"}\n')
    text = assert_error(first_error(path, "prompts"), path, 2, None)
    assert "2,000,014 bytes" in text and "1,048,576" in text
    recs, report = load(path, "prompts", errors="collect")  # the rest of the file is still read
    assert [r.prompt for r in recs] == ["a", "b"] and report.n_errors == 1 and report.lines == 3
    assert len(load_prompts(path, max_line_bytes=3_000_000)) == 3


def test_line_of_exactly_the_limit_passes_with_crlf(tmp_path):
    line = b'{"prompt": "' + b"y" * 20 + b'"}'
    path = tmp_path / "edge.jsonl"
    path.write_bytes(line + b"\r\n" + line + b"\n")
    assert len(load_prompts(path, max_line_bytes=len(line))) == 2
    with pytest.raises(DataError, match="over the limit"):
        load_prompts(path, max_line_bytes=len(line) - 1)


def test_bom_and_crlf_accepted_but_reported(tmp_path):
    path = tmp_path / "win.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\r\n{"prompt": "b"}\r\n{"prompt": "c"}\n')
    recs, report = load(path, "prompts")
    assert [r.prompt for r in recs] == ["a", "b", "c"]
    assert len(report.warnings) == 2
    assert any("byte-order mark" in w for w in report.warnings)
    assert any("2 line(s) end with CRLF" in w for w in report.warnings)
    assert "warnings: 2" in report.summary()


def test_clean_file_has_no_warnings(tmp_path):
    _, report = load(write(tmp_path, [{"prompt": "a"}]), "prompts")
    assert report.warnings == [] and report.skipped == {} and report.ok


def test_bom_after_line_one_is_an_error(tmp_path):
    path = tmp_path / "cat.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n\xef\xbb\xbf{"prompt": "b"}\n')
    assert "byte-order mark" in assert_error(first_error(path, "prompts"), path, 2, None)


def test_blank_lines_skipped_and_counted(tmp_path):
    path = write(tmp_path, ["", '{"prompt": "a"}', "   ", "", '{"prompt": "b"}', "\t"])
    recs, report = load(path, "prompts")
    assert len(recs) == 2 and report.blank_lines == 4 and report.lines == 6
    assert [n for n, _ in read_jsonl(path)] == [2, 5]


def test_empty_file_is_reported(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    recs, report = load(path, "prompts")
    assert recs == [] and "no records found" in report.warnings


def test_collect_mode_lists_every_error_and_keeps_good_rows(tmp_path):
    path = write(tmp_path, [GOOD_PREF, "{oops", {"prompt": "P", "chosen": "", "rejected": "r"}, GOOD_PREF, "7"])
    pairs, report = load_preferences(path, errors="collect")
    assert len(pairs) == 2 and report.records == 2
    assert [e.line for e in report.errors] == [2, 3, 5] and report.n_errors == 3 and not report.ok
    assert report.errors[1].field == "chosen"


def test_str_of_error_matches_documented_form():
    err = DataError("empty string", "every response needs text", field="chosen", path="data/x.jsonl", line=7)
    assert str(err) == "data/x.jsonl:7: field 'chosen': empty string. every response needs text"
    assert isinstance(err, ValueError)


def test_unknown_format_and_errors_mode():
    with pytest.raises(ValueError, match="choose one of"):
        load("x.jsonl", "nope")
    with pytest.raises(ValueError, match="does not give preference pairs"):
        load_preferences("x.jsonl", "sft")
    with pytest.raises(ValueError, match="errors must be"):
        load("x.jsonl", "prompts", errors="ignore")


# ------------------------------------------------------------------------------ writing and converting

def test_write_jsonl_round_trip_and_trl_strings(tmp_path):
    pairs = [PreferencePair("P", "c", "r", {"id": 1}), PreferencePair("Q", "ç", "r2")]
    out = write_jsonl(tmp_path / "sub" / "out.jsonl", to_trl_preference_dataset(pairs))
    back = load_preferences(out)
    assert [(p.prompt, p.chosen, p.rejected) for p in back] == [("P", "c", "r"), ("Q", "ç", "r2")]
    assert [p.name for p in out.parent.iterdir()] == ["out.jsonl"]  # no temp file left behind


def test_to_trl_conversational_without_prompt_messages():
    (row,) = to_trl_preference_dataset([PreferencePair("P", "c", "r")], conversational=True)
    assert row["prompt"] == [{"role": "user", "content": "P"}]
    assert row["rejected"] == [{"role": "assistant", "content": "r"}]


# ------------------------------------------------------------------------------------------- the split

def _pairs(prompts):
    return [PreferencePair(p, "c", "r") for p in prompts]


def test_split_duplicated_prompt_lands_on_one_side():
    recs = _pairs([f"prompt {i}" for i in range(50)] + ["repeated"] * 40)
    for seed in range(5):
        train, test = train_test_split(recs, 0.5, seed=seed)
        in_train = {id(r) for r in train}  # by identity: the repeated pairs are equal dataclasses
        assert len(in_train) + len({id(r) for r in test}) == len(recs)
        sides = {("train" if id(r) in in_train else "test") for r in recs if r.prompt == "repeated"}
        assert len(sides) == 1
        assert not {r.prompt for r in train} & {r.prompt for r in test}


def test_split_is_order_independent_and_seeded():
    prompts = [f"question number {i}" for i in range(300)]
    _, test_a = train_test_split(_pairs(prompts), 0.3, seed=1)
    _, test_b = train_test_split(_pairs(prompts[::-1][:200] + ["extra"] * 3), 0.3, seed=1)
    in_both = set(prompts[100:])
    assert {r.prompt for r in test_a} & in_both == {r.prompt for r in test_b} & in_both
    _, test_c = train_test_split(_pairs(prompts), 0.3, seed=2)
    assert {r.prompt for r in test_a} != {r.prompt for r in test_c}


def test_split_fraction_roughly_respected():
    train, test = train_test_split(_pairs([f"p{i}" for i in range(1000)]), test_fraction=0.2, seed=0)
    assert len(train) + len(test) == 1000 and 150 <= len(test) <= 250
    assert train_test_split(_pairs(["a", "b"]), 0.0)[1] == []
    assert train_test_split(_pairs(["a", "b"]), 1.0)[0] == []
    with pytest.raises(ValueError):
        train_test_split([], 1.5)


# -------------------------------------------------------------------------------------- examples, CLI

EXAMPLE_FORMATS = {"prompts.jsonl": "prompts", "sft.jsonl": "sft", "sft_messages.jsonl": "sft",
                   "preferences.jsonl": "preferences", "preferences_conversational.jsonl": "preferences",
                   "ranked.jsonl": "ranked", "ratings.jsonl": "ratings", "hh.jsonl": "hh"}


def test_every_example_file_is_listed():
    assert sorted(p.name for p in EXAMPLES.glob("*.jsonl")) == sorted(EXAMPLE_FORMATS)


@pytest.mark.parametrize("name", sorted(EXAMPLE_FORMATS))
def test_examples_validate(name):
    records, report = load(EXAMPLES / name, EXAMPLE_FORMATS[name], errors="collect")
    assert report.ok, [str(e) for e in report.errors]
    assert 3 <= report.lines <= 6 and records and report.warnings == []


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "rlhf_helpers.data", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def test_cli_validate_valid_file():
    res = run_cli("validate", str(EXAMPLES / "ranked.jsonl"), "--format", "ranked")
    assert res.returncode == 0, res.stderr
    assert "pairs produced: 10" in res.stdout and "result: valid" in res.stdout


def test_cli_validate_bad_file_lists_errors_with_cap(tmp_path):
    rows = [GOOD_PREF] + [{"prompt": "P", "chosen": "c", "rejected": "c"}] * 25
    path = write(tmp_path, rows, "bad.jsonl")
    res = run_cli("validate", str(path), "--format", "preferences")
    assert res.returncode == 1
    assert f"{path}:2: field 'rejected': identical to 'chosen'" in res.stderr
    assert f"{path}:21:" in res.stderr and f"{path}:22:" not in res.stderr
    assert "... and 5 more" in res.stderr and "INVALID, 25 error(s)" in res.stdout


def test_cli_convert_and_usage_errors(tmp_path):
    out = tmp_path / "pairs.jsonl"
    res = run_cli("convert", str(EXAMPLES / "hh.jsonl"), "--format", "hh", "--out", str(out))
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 3 and set(rows[0]) == {"prompt", "chosen", "rejected"}
    assert rows[0]["prompt"].endswith("\n\nAssistant:")
    assert run_cli("validate", str(out), "--format", "bogus").returncode == 2
    assert run_cli("convert", str(out), "--format", "sft", "--out", str(out)).returncode == 2
    before = out.read_bytes()
    res = run_cli("convert", str(out), "--format", "preferences", "--out", str(out))
    assert res.returncode == 2 and "is the input file" in res.stderr and out.read_bytes() == before
    res = run_cli("convert", str(out), "--format", "preferences", "--out", str(tmp_path))  # a folder
    assert res.returncode == 1 and "cannot write the converted pairs" in res.stderr and "Traceback" not in res.stderr
    missing = tmp_path / "missing.jsonl"
    res = run_cli("validate", str(missing), "--format", "sft")
    assert res.returncode == 1 and f"{missing}: cannot read the file: No such file" in res.stderr
    assert "Traceback" not in res.stderr
    res = run_cli("validate", str(EXAMPLES / "sft.jsonl"), "--format", "sft", "--max-line-bytes", "0")
    assert res.returncode == 2 and "--max-line-bytes must be positive" in res.stderr


# ------------------------------------------------------------------------- input that json.loads lets by

@pytest.mark.parametrize("codec,name", [("utf-16-le", "UTF-16"), ("utf-16-be", "UTF-16"),
                                        ("utf-32-le", "UTF-32"), ("utf-32-be", "UTF-32")])
def test_a_wide_encoding_is_one_error_that_names_it_with_an_iconv_hint(tmp_path, codec, name):
    path = tmp_path / "wide.jsonl"
    path.write_bytes('\ufeff{"prompt": "a"}\n{"prompt": "b"}\n'.encode(codec))  # the BOM in the file's own bytes
    _, report = load(path, "prompts", errors="collect")
    (err,) = report.errors
    text = assert_error(err, path, 1, None)
    assert f"the file is {name}" in text and f"iconv -f {name.lower()} -t utf-8 {path}" in text
    assert "latin1" not in text and ("UTF-16" not in text) == (name == "UTF-32")


def test_json_array_file_is_one_error_with_a_jq_hint(tmp_path):
    path = write(tmp_path, ["", "[", '  {"prompt": "a"},', '  {"prompt": "b"}', "]"], "array.json")
    records, report = load(path, "prompts", errors="collect")
    (err,) = report.errors
    assert records == [] and report.lines == 5
    assert "one JSON array" in assert_error(err, path, 2, None) and f"jq -c '.[]' {path}" in str(err)


@pytest.mark.parametrize("line, field", [
    ('{"prompt": "x\\ud800y", "chosen": "c", "rejected": "r"}', "prompt"),
    ('{"prompt": [{"role": "user", "content": "Q"}, {"role": "user", "content": "\\udc00"}], '
     '"chosen": [{"role": "assistant", "content": "c"}], "rejected": [{"role": "assistant", "content": "r"}]}',
     "prompt[1].content"),
    ('{"prompt": "P", "chosen": "c", "rejected": "r", "note": {"by": "a\\ud83d"}}', "note.by"),
])
def test_lone_surrogate_is_an_error_naming_the_field(tmp_path, line, field):
    path = write(tmp_path, [GOOD_PREF, line])
    assert "lone UTF-16 surrogate" in assert_error(first_error(path, "preferences"), path, 2, field)


def test_surrogate_pair_escape_is_one_character_and_fine(tmp_path):
    (p,) = load_preferences(write(tmp_path, ['{"prompt": "P", "chosen": "\\ud83d\\ude00", "rejected": "r"}']))
    assert p.chosen == "\U0001f600"


def test_cli_convert_of_a_lone_surrogate_fails_cleanly(tmp_path):
    path = write(tmp_path, ['{"prompt": "P", "chosen": "x\\ud800y", "rejected": "r"}'])
    out = tmp_path / "out.jsonl"
    res = run_cli("convert", str(path), "--format", "preferences", "--out", str(out))
    assert res.returncode == 1 and f"{path}:1: field 'chosen': lone UTF-16 surrogate" in res.stderr
    assert "Traceback" not in res.stderr and not out.exists()


@pytest.mark.parametrize("line, field", [
    ('{"prompt": "a", "prompt": "b"}', "prompt"),
    ('{"prompt": "P", "meta": {"rater": 1, "rater": 2}}', "meta.rater"),
])
def test_duplicate_key_is_an_error_naming_the_key(tmp_path, line, field):
    path = write(tmp_path, [{"prompt": "ok"}, line])
    assert "more than once" in assert_error(first_error(path, "prompts"), path, 2, field)


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_nan_and_infinity_are_errors_naming_the_field(tmp_path, number):
    path = write(tmp_path, [GOOD_PREF, f'{{"prompt": "P", "chosen": "c", "rejected": "r", "scores": [0.5, {number}]}}'])
    assert "not a JSON number" in assert_error(first_error(path, "preferences"), path, 2, "scores[1]")


def test_exact_duplicate_records_are_kept_and_counted(tmp_path):
    path = write(tmp_path, [{"prompt": "a", "id": 1}, {"prompt": "b"}, '{"id": 1, "prompt": "a"}', {"prompt": "b"},
                            {"prompt": "a", "id": 2}])
    recs, report = load(path, "prompts")
    assert len(recs) == 5 and report.ok
    assert report.warnings == ["2 record(s) repeat an earlier line exactly, first line 3 (same as line 1); kept"]


def test_list_loaders_log_blank_lines_like_the_cli(tmp_path, caplog):
    path = write(tmp_path, ["", '{"prompt": "a"}', "  "])
    with caplog.at_level("WARNING", logger="rlhf_helpers.data"):
        assert len(load_prompts(path)) == 1
    assert f"{path}: skipped blank_lines=2" in caplog.text


# ------------------------------------------------------------------------------------- prompt splits

@pytest.mark.parametrize("split", ["Train", "validation", "", None, 1])
def test_prompt_split_must_be_train_or_test(tmp_path, split):
    path = write(tmp_path, [{"prompt": "a", "split": "train"}, {"prompt": "b", "split": split}])
    text = assert_error(first_error(path, "prompts"), path, 2, "split")
    assert "unknown split" in text and "'train', 'test'" in text


def test_split_prompts_selects_one_split_and_counts_prompts_without_one(tmp_path, caplog):
    path = write(tmp_path, [{"prompt": "a", "split": "train"}, {"prompt": "b", "split": "test"}, {"prompt": "c"},
                            {"prompt": "d", "split": "train"}, {"prompt": "e"}])
    with caplog.at_level("WARNING", logger="rlhf_helpers.data"):
        assert [r.prompt for r in split_prompts("train", path)] == ["a", "d"]
    assert "2 prompt(s) have no 'split'" in caplog.text
    with pytest.raises(ValueError, match="split must be one of"):
        split_prompts("validation", path)


def test_train_prompts_says_when_n_is_more_than_the_split(caplog):
    every = train_prompts()
    assert len(every) == 248 and train_prompts(3) == every[:3]
    assert "train split has only" not in caplog.text
    with caplog.at_level("WARNING", logger="rlhf_helpers.data"):
        assert train_prompts(999) == every
    assert "train_prompts(n=999): the train split has only 248 prompts" in caplog.text


# ------------------------------------------------------------------------- what the CLI will not pass

def test_cli_convert_reports_lost_context_and_extra_fields(tmp_path):
    out = tmp_path / "out.jsonl"
    res = run_cli("convert", str(EXAMPLES / "preferences_conversational.jsonl"), "--format", "preferences",
                  "--out", str(out))
    assert res.returncode == 0 and "2 pair(s) have a system message or earlier turns" in res.stdout
    res = run_cli("convert", str(EXAMPLES / "preferences_conversational.jsonl"), "--format", "preferences",
                  "--out", str(out), "--conversational")
    assert res.returncode == 0 and "warnings: 0" in res.stdout
    assert json.loads(out.read_text(encoding="utf-8").splitlines()[1])["prompt"][0]["role"] == "system"
    rows = [{"prompt": "P", "responses": ["a", "b", "c"], "ranking": [2, 0, 1], "id": 1, "rater": "r1"},
            {"prompt": "Q", "responses": ["a", "b"], "ranking": [0, 1], "id": 2}]
    res = run_cli("convert", str(write(tmp_path, rows)), "--format", "ranked", "--out", str(out))
    assert res.returncode == 0 and "extra fields not written (pairs that had them): id=4, rater=3" in res.stdout
    assert "chosen_rank" not in res.stdout and "earlier turns" not in res.stdout


def test_cli_hh_convert_keeps_the_context_in_the_prompt_string(tmp_path):
    res = run_cli("convert", str(EXAMPLES / "hh.jsonl"), "--format", "hh", "--out", str(tmp_path / "out.jsonl"))
    assert res.returncode == 0 and "warnings: 0" in res.stdout


@pytest.mark.parametrize("command", ["validate", "convert"])
@pytest.mark.parametrize("content", [b"", b"\n  \n"])
def test_cli_file_with_no_records_exits_1(tmp_path, command, content):
    path, out = tmp_path / "empty.jsonl", tmp_path / "out.jsonl"
    path.write_bytes(content)
    extra = ["--out", str(out)] if command == "convert" else []
    res = run_cli(command, str(path), "--format", "preferences", *extra)
    assert res.returncode == 1 and f"{path}: no records found. The file is empty" in res.stderr
    assert "result: INVALID, 1 error(s)" in res.stdout and "warnings: 0" in res.stdout and not out.exists()


def test_cli_convert_with_no_pairs_exits_1_but_validate_passes(tmp_path):
    path, out = write(tmp_path, [{"prompt": "P", "response_a": "x", "response_b": "y", "preference": "tie"}]), \
        tmp_path / "out.jsonl"
    res = run_cli("convert", str(path), "--format", "ratings", "--out", str(out))
    assert res.returncode == 1 and "no preference pairs produced" in res.stderr and not out.exists()
    res = run_cli("validate", str(path), "--format", "ratings")
    assert res.returncode == 0 and "no preference pairs produced" in res.stdout


def test_a_gzipped_file_is_one_error_with_a_gunzip_hint(tmp_path):
    import gzip

    path = tmp_path / "prompts.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"prompt": "hi"}\n' * 3))
    res = run_cli("validate", str(path), "--format", "prompts")
    assert res.returncode == 1 and res.stderr.count("\n") == 1
    assert f"{path}:1: the file is gzip-compressed" in res.stderr and "gunzip -k" in res.stderr
