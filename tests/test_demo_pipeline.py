"""The demo pipeline end to end on the tiny model: train, merge (direct + residual), evaluate, resume."""

from __future__ import annotations

import json

from sstmerge.pipeline.demo import DemoOptions, run_demo, summary_table


def test_demo_runs_and_resumes(tiny_base, tmp_path):
    opts = DemoOptions(base=str(tiny_base), out=str(tmp_path / "demo"), steps=3, eval_samples=3, max_new_tokens=4,
                       fisher_samples=4, k=2, cache_dir=str(tmp_path / "cache"))
    summary = run_demo(opts)
    assert set(summary["results"]) == {"base", "utility", "safety", "merged_direct", "merged_residual"}
    for r in summary["results"].values():
        assert 0.0 <= r["refusal_rate_harmful"] <= 1.0 and len(r["examples"]) == 6
    assert summary["residual_merge"]["fisher_samples_each"] == 4
    assert json.loads((tmp_path / "demo" / "demo_summary.json").read_text())["options"]["steps"] == 3
    assert "merged_residual" in summary_table(summary)
    trained = (tmp_path / "demo" / "utility" / "train_report.json").stat().st_mtime_ns
    again = run_demo(opts)  # resumes: the trained adapters are reused, the Fisher comes from the cache
    assert (tmp_path / "demo" / "utility" / "train_report.json").stat().st_mtime_ns == trained
    assert again["results"].keys() == summary["results"].keys()
