"""Eval suites are self-contained: a suite defined in one place (here, inside the test) brings its loader, its
run and its headline columns; the runner evaluates it and the experiment table derives its columns from the
registry."""

from __future__ import annotations

import pytest

from sstmerge.eval.runner import evaluate
from sstmerge.eval.suites import SUITES, Column, EvalSettings, Suite, load_overrefusal
from sstmerge.pipeline.experiments import headline, summary_scores, table_columns


@pytest.fixture
def toy_suite():
    def run_answer_length(ctx, prompts):
        """Mean answer length in characters (a toy metric)."""
        prompts = list(prompts)[: ctx.settings.limit]
        answers = ctx.complete([p.prompt for p in prompts], desc="answer_length")
        records = [{"id": p.id, "prompt": p.prompt, "output": a} for p, a in zip(prompts, answers)]
        return {"metrics": {"mean_chars": sum(map(len, answers)) / len(answers), "n": len(answers)},
                "records": records}

    suite = Suite("answer_length", "mean answer length (toy)", "bundled:overrefusal", run_answer_length,
                  load_overrefusal, columns=(Column("answer_chars", "mean answer length in characters",
                                                    lambda result, judge: result["metrics"]["mean_chars"],
                                                    higher_is_better=False),))
    SUITES.register("answer_length", suite)
    yield suite
    SUITES.unregister("answer_length")


def test_a_suite_defined_in_one_place_runs_and_feeds_the_table(tiny_base, tmp_path, toy_suite):
    assert [c.name for c in table_columns()][-1] == "answer_chars"  # registration order
    out = evaluate(str(tiny_base), ["answer_length"], settings=EvalSettings(max_new_tokens=3, limit=2, batch_size=2),
                   cache_dir=tmp_path / "c")
    result = out["suites"]["answer_length"]
    assert result["metrics"]["n"] == 2 and len(result["records"]) == 2
    row = headline(out["suites"])
    assert row["answer_chars"] == result["metrics"]["mean_chars"] and row["jailbreak_plain"] is None
    # cached like every suite
    again = evaluate(str(tiny_base), ["answer_length"], settings=EvalSettings(max_new_tokens=3, limit=2, batch_size=2),
                     cache_dir=tmp_path / "c")
    assert again["suites"]["answer_length"]["cache_hit"] is True


def test_table_columns_come_from_the_registry_with_their_roles():
    cols = {c.name: c for c in table_columns()}
    assert list(cols)[:8] == ["jailbreak_plain", "jailbreak_templated", "jailbreak_rephrased", "overrefusal",
                              "mcq_accuracy", "qa_f1", "qa_abstention", "arithmetic_accuracy"]
    assert cols["overrefusal"].higher_is_better is False
    assert {n for n, c in cols.items() if c.role == "safety"} == {"jailbreak_plain", "jailbreak_templated",
                                                                 "jailbreak_rephrased"}
    assert {n for n, c in cols.items() if c.role == "utility"} == {"qa_f1", "arithmetic_accuracy"}
    assert summary_scores({"jailbreak_plain": 1.0, "jailbreak_templated": 0.5, "qa_f1": 0.2}) == (0.75, 0.2)
