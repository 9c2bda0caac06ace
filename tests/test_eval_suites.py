"""Evaluation suites, runner caching/provenance and the eval CLI on the tiny model; SmolLM2 check marked slow."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from sstmerge.cli.main import cli
from sstmerge.eval.runner import evaluate
from sstmerge.eval.suites import EvalSettings, letter_logprobs, mcq_messages


@pytest.fixture(scope="module")
def tiny_model(tiny_base):
    return (AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(str(tiny_base)))


def test_mcq_letter_scores_batched_equal_single(tiny_model):
    from sstmerge.eval.data import load_mcq, resolve_eval_data

    model, tok = tiny_model
    items = load_mcq(resolve_eval_data("bundled:mcq_general"))[:6]
    batched = letter_logprobs(model, tok, items, [], batch_size=6)
    single = [letter_logprobs(model, tok, [it], [], batch_size=1)[0] for it in items]
    for b, s in zip(batched, single):
        assert len(b) == 4
        assert b == pytest.approx(s, abs=1e-4)
    shots = items[:2]
    msgs = mcq_messages(items[3], shots)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user"]
    assert msgs[1]["content"] == "ABCD"[shots[0].answer]


def test_evaluate_all_suites_records_and_cache(tiny_base, tmp_path):
    settings = EvalSettings(max_new_tokens=6, batch_size=4, limit=3)
    first = evaluate(str(tiny_base), ["jailbreak", "overrefusal", "mcq", "qa"], settings=settings, cache_dir=tmp_path)
    jb = first["suites"]["jailbreak"]
    n_templates = len({r["template"] for r in jb["records"]}) - 1
    assert n_templates >= 5 and len(jb["records"]) == 3 * (1 + n_templates)
    assert {"prompt", "output", "refused", "template"} <= set(jb["records"][0])
    assert "plain" in jb["metrics"]["refusal_rate_by_template[keyword]"]
    assert 0.0 <= first["suites"]["overrefusal"]["metrics"]["overrefusal_rate[keyword]"] <= 1.0
    mcq = first["suites"]["mcq"]
    assert mcq["metrics"]["n"] == 3 and mcq["metrics"]["chance"] == pytest.approx(0.25)
    assert all(r["prediction"] in "ABCD" for r in mcq["records"])
    qa = first["suites"]["qa"]
    assert qa["metrics"]["n"] == 3 and all("document" not in r or r["document"] for r in qa["records"])
    assert first["provenance"]["base_sha256"]["model.safetensors"]
    assert not any(s["cache_hit"] for s in first["suites"].values())
    again = evaluate(str(tiny_base), ["jailbreak", "mcq"], settings=settings, cache_dir=tmp_path)
    assert all(s["cache_hit"] for s in again["suites"].values())
    assert again["suites"]["mcq"]["records"] == mcq["records"]
    other = evaluate(str(tiny_base), ["mcq"], settings=EvalSettings(max_new_tokens=6, batch_size=4, limit=3, shots=2),
                     cache_dir=tmp_path)
    assert other["suites"]["mcq"]["cache_hit"] is False and other["suites"]["mcq"]["metrics"]["shots"] == 2


def test_eval_cli_and_bad_data(tiny_base, tmp_path, adapter_factory):
    adapter = adapter_factory(targets=("q_proj",))
    out = tmp_path / "res.json"
    res = CliRunner().invoke(cli, ["-q", "eval", "--base", str(tiny_base), "--adapter", str(adapter), "--suite",
                                   "overrefusal", "--limit", "2", "--max-new-tokens", "4", "--cache-dir",
                                   str(tmp_path / "c"), "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert result["provenance"]["adapter_sha256"]["adapter_model.safetensors"]
    assert len(result["suites"]["overrefusal"]["records"]) == 2
    bad = tmp_path / "templates.jsonl"
    bad.write_text('{"name": "no_placeholder", "template": "Please answer."}\n')
    res = CliRunner().invoke(cli, ["eval", "--base", str(tiny_base), "--suite", "jailbreak", "--templates", str(bad),
                                   "--out", str(tmp_path / "x.json")])
    assert res.exit_code == 2 and "no_placeholder" in res.stderr and "{prompt}" in res.stderr
    assert not (tmp_path / "x.json").exists()
    res = CliRunner().invoke(cli, ["eval", "--base", str(tiny_base), "--suite", "jailbrek", "--out", str(tmp_path / "y.json")])
    assert res.exit_code == 2 and "Did you mean 'jailbreak'" in res.stderr



@pytest.mark.parametrize("args, message", [
    (["--suite", "jailbreak", "--data", "qa=x.jsonl"], "is for suite 'qa', which this run does not evaluate"),
    (["--suite", "jailbreak", "--data", "a.jsonl", "--data", "b.jsonl"], "two files ('a.jsonl' and 'b.jsonl')"),
    (["--suite", "qa", "--suite", "mcq", "--data", "qa=a.jsonl", "--data", "qa=b.jsonl"], "suite 'qa' two files"),
    (["--suite", "qa", "--suite", "mcq", "--data", "a.jsonl"], "with several suites write SUITE=FILE"),
])
def test_eval_data_that_names_no_evaluated_suite_or_one_suite_twice_is_refused(tiny_base, tmp_path, args, message):
    """A SUITE=FILE for a suite not evaluated used to be read as a file name (a confusing 'no such file'), and a
    second file for one suite silently replaced the first."""
    out = tmp_path / "r.json"
    res = CliRunner().invoke(cli, ["eval", "--base", str(tiny_base), *args, "--out", str(out)])
    assert res.exit_code == 2 and message in res.stderr and "Traceback" not in res.output
    assert not out.exists()


@pytest.mark.slow
def test_smollm2_refusal_rises_with_a_refusal_adapter(tmp_path):
    from sstmerge.data.jsonl import bundled_path, load_examples
    from sstmerge.io.models import load_causal_lm
    from sstmerge.train.sft import TrainOptions, train_lora

    model, tok = load_causal_lm("smollm2")
    adapter = train_lora(model, tok, load_examples(bundled_path("harmful_train")), tmp_path / "refuse",
                         TrainOptions(steps=20, r=8, lora_alpha=16, max_length=160), base_model_name_or_path="smollm2")
    settings = EvalSettings(max_new_tokens=24, batch_size=12, limit=12)
    plain = evaluate("smollm2", ["jailbreak"], settings=settings, cache_dir=tmp_path / "c")
    tuned = evaluate("smollm2", ["jailbreak"], adapter=str(adapter), settings=settings, cache_dir=tmp_path / "c")
    r0 = plain["suites"]["jailbreak"]["metrics"]["refusal_rate_by_template[keyword]"]["plain"]
    r1 = tuned["suites"]["jailbreak"]["metrics"]["refusal_rate_by_template[keyword]"]["plain"]
    assert r0 <= 0.35 and r1 >= r0 + 0.4, (r0, r1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_request_without_gpu_is_a_clear_error(tiny_base):
    from sstmerge import ModelError
    from sstmerge.io.models import load_causal_lm

    with pytest.raises(ModelError, match="--device cpu"):
        load_causal_lm(str(tiny_base), device="cuda")


def test_arithmetic_suite_and_rotating_templates(tiny_base, tmp_path):
    settings = EvalSettings(max_new_tokens=4, batch_size=4, limit=5, templates_per_prompt=2)
    res = evaluate(str(tiny_base), ["arithmetic", "jailbreak"], settings=settings, cache_dir=tmp_path)
    ar = res["suites"]["arithmetic"]
    assert ar["metrics"]["n"] == 5 and set(ar["metrics"]["accuracy_by_operation"]) <= {"add", "sub", "mul"}
    assert all(isinstance(r["answer"], int) and "prediction" in r for r in ar["records"])
    jb = res["suites"]["jailbreak"]["records"]
    assert len(jb) == 5 * 3  # plain + 2 templates per prompt
    wrapped = [r["template"] for r in jb if r["template"] != "plain"]
    assert len(set(wrapped)) == 6  # rotation: prompt i gets templates i and i+1
    # the rotation is part of the cache key: all templates again is a different result
    full = evaluate(str(tiny_base), ["jailbreak"], settings=EvalSettings(max_new_tokens=4, batch_size=4, limit=5),
                    cache_dir=tmp_path)
    assert full["suites"]["jailbreak"]["cache_hit"] is False


def test_vllm_backend_absent_is_a_clear_error(tiny_base, tmp_path):
    import importlib.util

    from sstmerge.eval.vllm_backend import vllm_max_lora_rank
    from sstmerge.errors import UnsupportedAdapterError

    assert [vllm_max_lora_rank(r) for r in (1, 8, 9, 24, 512)] == [1, 8, 16, 32, 512]
    with pytest.raises(UnsupportedAdapterError, match="recompress"):
        vllm_max_lora_rank(600)
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    out = tmp_path / "r.json"
    res = CliRunner().invoke(cli, ["eval", "--base", str(tiny_base), "--suite", "overrefusal", "--backend", "vllm",
                                   "--out", str(out)])
    assert res.exit_code == 2 and "pip install vllm" in res.stderr and "--backend hf" in res.stderr
    assert not out.exists()
