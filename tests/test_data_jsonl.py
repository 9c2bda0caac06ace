"""Tests for the JSONL loader and the bundled datasets (sstmerge.data.jsonl)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from sstmerge.data.examples import Example
from sstmerge.data.jsonl import BUNDLED_NAMES, bundled_path, load_examples, resolve_data
from sstmerge.errors import DataError
from sstmerge.eval.judges import KeywordRefusalJudge

REFUSAL_PREFIXES = ("I'm sorry", "I can't", "I cannot")
EXPECTED_ROWS = {"harmful_train": 64, "harmful_eval": 216, "benign_train": 64, "benign_eval": 48}


def write_jsonl(path: Path, rows: list, *, raw_lines: list[str] | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    if raw_lines is not None:
        lines = raw_lines
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def pr_rows(n: int) -> list[dict]:
    return [{"prompt": f"question {i}", "response": f"answer {i}", "id": i} for i in range(n)]


# --------------------------------------------------------------------------------------------- parsing


def test_prompt_response_format(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Hi?", "response": "Hello."}])
    (ex,) = load_examples(p)
    assert isinstance(ex, Example)
    assert ex.prompt == "Hi?" and ex.response == "Hello." and ex.messages is None
    assert ex.meta == {}
    assert ex.answer() == "Hello."
    assert ex.context() == [{"role": "user", "content": "Hi?"}]


def test_messages_format(tmp_path: Path) -> None:
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4."},
    ]
    p = write_jsonl(tmp_path / "d.jsonl", [{"messages": msgs, "source": "x"}])
    (ex,) = load_examples(p)
    assert ex.messages == (("system", "Be brief."), ("user", "2+2?"), ("assistant", "4."))
    assert isinstance(ex.messages, tuple) and all(isinstance(m, tuple) for m in ex.messages)
    assert ex.prompt is None and ex.response is None
    assert ex.meta == {"source": "x"}
    assert ex.answer() == "4."
    assert ex.chat() == msgs


def test_both_formats_mixed_in_one_file_and_meta_kept(tmp_path: Path) -> None:
    rows = [
        {"prompt": "a", "response": "b", "category": "math", "id": 7, "tags": ["x"]},
        {
            "messages": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}],
            "category": "chat",
        },
    ]
    p = write_jsonl(tmp_path / "d.jsonl", rows)
    exs = load_examples(p)
    assert len(exs) == 2
    assert exs[0].meta == {"category": "math", "id": 7, "tags": ["x"]}
    assert exs[1].meta == {"category": "chat"}
    assert exs[1].messages == (("user", "c"), ("assistant", "d"))


def test_blank_lines_skipped_and_str_path(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_text(
        '\n{"prompt": "a", "response": "b"}\n   \n\n{"prompt": "c", "response": "d"}\n\n', encoding="utf-8"
    )
    exs = load_examples(str(p))
    assert [e.prompt for e in exs] == ["a", "c"]


def test_no_trailing_newline_and_crlf(tmp_path: Path) -> None:
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"prompt": "a", "response": "b"}\r\n{"prompt": "c", "response": "d"}')
    assert [e.response for e in load_examples(p)] == ["b", "d"]


# -------------------------------------------------------------------------------------------- sampling


def test_sampling_deterministic_and_order_preserved(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "d.jsonl", pr_rows(50))
    a = load_examples(p, max_samples=10, seed=3)
    b = load_examples(p, max_samples=10, seed=3)
    c = load_examples(p, max_samples=10, seed=4)
    assert len(a) == 10
    assert a == b
    assert [e.meta["id"] for e in a] == [e.meta["id"] for e in b]
    assert [e.meta["id"] for e in a] != [e.meta["id"] for e in c]  # C(50,10) choices: a clash is ~0
    for sample in (a, c):
        ids = [e.meta["id"] for e in sample]
        assert ids == sorted(ids)  # file order kept
        assert len(set(ids)) == len(ids)


def test_sampling_default_seed_is_zero(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "d.jsonl", pr_rows(30))
    assert load_examples(p, max_samples=5) == load_examples(p, max_samples=5, seed=0)


@pytest.mark.parametrize("k", [20, 21, 1000, None])
def test_sampling_at_or_above_row_count_returns_all(tmp_path: Path, k: int | None) -> None:
    p = write_jsonl(tmp_path / "d.jsonl", pr_rows(20))
    exs = load_examples(p, max_samples=k, seed=1)
    assert [e.meta["id"] for e in exs] == list(range(20))


@pytest.mark.parametrize("k", [0, -1, -10])
def test_max_samples_non_positive(tmp_path: Path, k: int) -> None:
    p = write_jsonl(tmp_path / "d.jsonl", pr_rows(3))
    with pytest.raises(DataError, match="max_samples") as ei:
        load_examples(p, max_samples=k)
    assert "d.jsonl" in str(ei.value)


# ---------------------------------------------------------------------------------------------- errors


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found") as ei:
        load_examples(tmp_path / "nope.jsonl")
    assert "nope.jsonl" in str(ei.value)


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(DataError) as ei:
        load_examples(tmp_path)
    assert str(tmp_path) in str(ei.value)


@pytest.mark.parametrize("content", ["", "\n\n", "   \n\t\n"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    p = tmp_path / "empty.jsonl"
    p.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match="empty") as ei:
        load_examples(p)
    assert "empty.jsonl" in str(ei.value)


def _assert_line_error(path: Path, lineno: int, *match: str) -> DataError:
    with pytest.raises(DataError) as ei:
        load_examples(path)
    msg = str(ei.value)
    assert path.name in msg
    assert f"line {lineno}" in msg
    for m in match:
        assert m in msg, msg
    return ei.value


def test_invalid_json_names_line(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "a", "response": \n', encoding="utf-8")
    _assert_line_error(p, 3, "invalid JSON")


@pytest.mark.parametrize("row", [[1, 2], "text", 3, None, True])
def test_row_not_object(tmp_path: Path, row: object) -> None:
    p = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "response": "b"}, row])
    _assert_line_error(p, 2, "JSON object")


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        ({"response": "b"}, "prompt"),
        ({"prompt": "a"}, "response"),
        ({"prompt": "", "response": "b"}, "prompt"),
        ({"prompt": "a", "response": "   "}, "response"),
        ({"prompt": 5, "response": "b"}, "prompt"),
        ({"prompt": "a", "response": ["b"]}, "response"),
        ({"prompt": "a", "response": None}, "response"),
        ({"category": "x"}, "prompt"),
        ({}, "prompt"),
    ],
)
def test_bad_prompt_response(tmp_path: Path, row: dict, needle: str) -> None:
    good = [{"prompt": "ok", "response": "ok"}, {"prompt": "ok2", "response": "ok"}]
    p = write_jsonl(tmp_path / "bad.jsonl", [*good, row])
    _assert_line_error(p, 3, needle)


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        ("hello", "list"),
        ({"role": "user", "content": "x"}, "list"),
        ([], "empty"),
        ([{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}], "role"),
        ([{"content": "x"}, {"role": "assistant", "content": "y"}], "role"),
        ([{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}], "content"),
        ([{"role": "user"}, {"role": "assistant", "content": "y"}], "content"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": None}], "content"),
        ([{"role": "user", "content": "x"}], "assistant"),
        ([{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}], "assistant"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}], "empty"),
        (["user", "x"], "messages[0]"),
    ],
)
def test_bad_messages(tmp_path: Path, messages: object, needle: str) -> None:
    p = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "response": "ok"}, {"messages": messages}])
    _assert_line_error(p, 2, needle)


def test_mixed_formats_in_one_row_rejected(tmp_path: Path) -> None:
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    row = {"prompt": "a", "messages": msgs}
    p = write_jsonl(tmp_path / "bad.jsonl", [row])
    _assert_line_error(p, 1, "messages")


def test_line_number_counts_blank_lines(tmp_path: Path) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('\n\n{"prompt": "a", "response": "b"}\n\n{"prompt": "a"}\n', encoding="utf-8")
    _assert_line_error(p, 5, "response")


def test_data_error_is_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        load_examples(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------------------ bundled / resolve


@pytest.mark.parametrize("name", BUNDLED_NAMES)
def test_bundled_path_names(name: str) -> None:
    p = bundled_path(name)
    assert p.is_file() and p.name == f"{name}.jsonl"
    assert bundled_path(f"{name}.jsonl") == p


def test_bundled_path_unknown_suggests() -> None:
    with pytest.raises(DataError) as ei:
        bundled_path("harmfull_train")
    msg = str(ei.value)
    assert "Did you mean 'harmful_train'" in msg
    for name in BUNDLED_NAMES:
        assert name in msg


def test_bundled_path_unknown_without_close_match_lists_names() -> None:
    with pytest.raises(DataError) as ei:
        bundled_path("zzzz")
    assert "Did you mean" not in str(ei.value)
    assert "benign_eval" in str(ei.value)


def test_resolve_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_data("bundled:benign_eval") == bundled_path("benign_eval")
    assert resolve_data("bundled:benign_eval.jsonl") == bundled_path("benign_eval")
    assert resolve_data(str(tmp_path / "x.jsonl")) == tmp_path / "x.jsonl"
    assert resolve_data("rel/x.jsonl") == Path("rel/x.jsonl")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_data("~/d.jsonl") == tmp_path / "d.jsonl"
    with pytest.raises(DataError, match="Did you mean"):
        resolve_data("bundled:benign_evl")


def _bundled(name: str) -> list[Example]:
    return load_examples(bundled_path(name))


@pytest.mark.parametrize(("name", "n"), sorted(EXPECTED_ROWS.items()))
def test_bundled_files_load_with_expected_counts(name: str, n: int) -> None:
    exs = _bundled(name)
    assert len(exs) == n
    for e in exs:
        assert e.prompt and e.response and e.messages is None
        assert isinstance(e.meta.get("category"), str) and e.meta["category"]
        assert set(e.meta) <= {"category", "id", "form"}  # the held-out sets carry ids and (harmful) forms
    prompts = [e.prompt for e in exs]
    assert len(set(prompts)) == len(prompts), f"duplicate prompts in {name}"


def _norm(s: str) -> str:
    return " ".join(s.lower().split())


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("harmful_train", "harmful_eval"),
        ("benign_train", "benign_eval"),
        ("harmful_train", "benign_train"),
        ("harmful_train", "benign_eval"),
        ("harmful_eval", "benign_train"),
        ("harmful_eval", "benign_eval"),
    ],
)
def test_bundled_prompt_sets_disjoint(a: str, b: str) -> None:
    pa = {_norm(e.prompt) for e in _bundled(a)}
    pb = {_norm(e.prompt) for e in _bundled(b)}
    assert not pa & pb


@pytest.mark.parametrize("name", ["harmful_train", "harmful_eval", "harmful_rephrased", "harmful_train_rephrased",
                                  "harmful_train_templated"])
def test_bundled_harmful_responses_are_refusals(name: str) -> None:
    for e in _bundled(name):
        assert e.response.startswith(REFUSAL_PREFIXES), e.response


@pytest.mark.parametrize("name", ["harmful_train_short", "harmful_train_short2", "harmful_dev", "harmful_dev2", "harmful_dev3",
                                  "harmful_dev4"])
def test_later_harmful_sets_answer_with_refusals_the_judge_recognises(name: str) -> None:
    """Their refusals vary more ("I won't ..."), but each starts with "I" (the opener the unlikelihood term reads
    from the data) and the evaluation's keyword judge counts it as a refusal."""
    judge = KeywordRefusalJudge()
    for e in _bundled(name):
        assert e.response.startswith("I") and judge.is_refusal(e.response), e.response


@pytest.mark.parametrize("name", ["benign_train", "benign_eval", "contrast_train", "contrast_train_short", "overrefusal"])
def test_bundled_benign_responses_are_not_refusals(name: str) -> None:
    for e in _bundled(name):
        assert not e.response.startswith(REFUSAL_PREFIXES), e.response


@pytest.mark.parametrize("name", ["contrast_train", "contrast_train2", "contrast_train_short"])
def test_contrast_answers_are_not_judged_refusals(name: str) -> None:
    """The unlikelihood term acts on every training answer the keyword judge does not count as a refusal: a
    contrast answer it misread as one would teach the adapter to refuse that benign request."""
    judge = KeywordRefusalJudge()
    for e in _bundled(name):
        assert not judge.is_refusal(e.response), (e.prompt, e.response)


def test_short_harmful_and_contrast_pairs_share_a_length_profile() -> None:
    """harmful_train_short2 and contrast_train_short were written together so that neither prompt length nor
    style tells a refusal from an answer: their prompt-length medians match and both stay within 3-14 words."""
    harm = [len(e.prompt.split()) for e in _bundled("harmful_train_short2")]
    benign = [len(e.prompt.split()) for e in _bundled("contrast_train_short")]
    assert abs(statistics.median(harm) - statistics.median(benign)) <= 1
    assert max(harm) <= 14 and max(benign) <= 14 and min(harm) >= 3 and min(benign) >= 3


def test_bundled_benign_eval_has_borderline_probes() -> None:
    cats = [e.meta["category"] for e in _bundled("benign_eval")]
    assert cats.count("borderline") == 12
    assert "borderline" not in {e.meta["category"] for e in _bundled("benign_train")}


def test_bundled_data_card_present() -> None:
    card = bundled_path("harmful_train").parent / "DATA_CARD.md"
    text = card.read_text(encoding="utf-8")
    assert "Apache-2.0" in text
    for name in BUNDLED_NAMES:
        assert f"{name}.jsonl" in text
