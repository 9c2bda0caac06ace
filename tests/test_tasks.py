"""Bundled utility tasks: generators, reproducible bundled files, train/test disjointness, arithmetic scoring,
and the `sst-merge train` command."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from sstmerge.cli.main import cli
from sstmerge.data.jsonl import BUNDLED_DIR, bundled_path, load_examples
from sstmerge.data.make_bundled import EVAL_SEED, N_QA_EVAL, generated_files
from sstmerge.data.tasks import extract_final_number, generate_arithmetic
from sstmerge.errors import DataError
from sstmerge.data.fictional import generate_fictional_qa
from sstmerge.eval.data import load_arithmetic


def test_bundled_generated_files_are_reproducible():
    for name, text in generated_files().items():
        assert (BUNDLED_DIR / name).read_text(encoding="utf-8") == text, f"regenerate with python -m sstmerge.data.make_bundled ({name})"


def test_train_and_test_items_never_overlap():
    qa_train = load_examples(bundled_path("qa_train"))
    qa_test = generate_fictional_qa(n=N_QA_EVAL, seed=EVAL_SEED)  # the qa suite's default items
    train_prompts = {e.prompt for e in qa_train}
    test_docs = {it.document for it in qa_test}
    assert not any(doc in p for p in train_prompts for doc in test_docs)
    arith_train = {e.prompt.split("\n")[0] for e in load_examples(bundled_path("arithmetic_train"))}
    arith_test = {it.question for it in load_arithmetic(bundled_path("arithmetic_eval"))}
    assert not arith_train & arith_test
    harm_train = {e.prompt for e in load_examples(bundled_path("harmful_train"))}
    harm_test = {e.prompt for e in load_examples(bundled_path("harmful_eval"))}
    assert not harm_train & harm_test


def test_arithmetic_generator_is_correct_and_deterministic():
    items = generate_arithmetic(30, seed=5)
    assert items == generate_arithmetic(30, seed=5) and items != generate_arithmetic(30, seed=6)
    for it in items:
        a, b = (int(x) for x in it.work.split(" = ")[0].replace("×", "x").replace("+", "x").replace("-", "x").split(" x "))
        assert it.answer == {"add": a + b, "sub": a - b, "mul": a * b}[it.operation]
        assert str(a) in it.question and str(b) in it.question
    assert {it.operation for it in items} == {"add", "sub", "mul"}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("12 + 30 = 42. The answer is 42.", 42),
        ("The answer is 1,024", 1024),
        ("First 3 + 4 = 7, then the answer is: 9. Done at step 2.", 9),  # "answer is" wins over later numbers
        ("I think it's 17 apples", 17),
        ("No idea.", None),
        ("", None),
        ("The answer is -5.", -5),
    ],
)
def test_extract_final_number(text, expected):
    assert extract_final_number(text) == expected


def test_load_arithmetic_rejects_bad_rows(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"question": "2+2?", "answer": "four"}\n')
    with pytest.raises(DataError, match=r"a\.jsonl, line 1: 'answer' must be an integer"):
        load_arithmetic(f)
    f.write_text('{"answer": 4}\n')
    with pytest.raises(DataError, match="question"):
        load_arithmetic(f)
    f.write_text("")
    with pytest.raises(DataError, match="empty"):
        load_arithmetic(f)


def test_train_command_writes_an_adapter_with_provenance(tiny_base, tmp_path):
    out = tmp_path / "a6"
    res = CliRunner().invoke(cli, ["-q", "train", "--base", str(tiny_base), "--data", "bundled:arithmetic_train",
                                   "--data", "bundled:benign_train", "--max-samples", "4", "--steps", "2",
                                   "--batch-size", "2", "--r", "4", "--lora-alpha", "8", "--max-length", "48",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "train_report.json").read_text())
    assert report["n_examples"] == 8 and [d["spec"] for d in report["data"]] == ["bundled:arithmetic_train", "bundled:benign_train"]
    assert all(len(d["sha256"]) == 64 for d in report["data"])
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "bundled:arithmetic_trian"], "Did you mean 'arithmetic_train'"),
        (["--data", "bundled:qa_train", "--steps", "0"], "--steps"),
        (["--data", "missing.jsonl"], "not found"),
    ],
)
def test_train_command_bad_input(tiny_base, tmp_path, args, message):
    out = tmp_path / "never"
    res = CliRunner().invoke(cli, ["-q", "train", "--base", str(tiny_base), "--out", str(out), *args])
    assert res.exit_code == 2 and message in res.output, res.output
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))
