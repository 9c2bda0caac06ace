"""The experiment grid end to end on the tiny model (the quick profile's stages), resume, and config errors."""

from __future__ import annotations

import csv
import json

import pytest

from sstmerge.errors import ConfigError
from sstmerge.pipeline.experiments import (
    expand_grid,
    headline,
    load_experiment_config,
    pareto_front,
    run_experiments,
)


def _tiny_overrides(tiny_base, tmp_path, grid=None) -> dict:
    small = {"train": {"steps": 2, "batch_size": 2, "max_length": 64}, "max_samples": 4}
    over = {
        "base": str(tiny_base),
        "cache_dir": str(tmp_path / "cache"),
        "adapters": {"A5": small, "A6": small, "A7": small},
        "merge_defaults": {"max_samples": 4, "k": 2, "max_length": 64},
        "eval": {"limit": {"jailbreak": 2, "overrefusal": 2, "mcq": 3, "qa": 2, "arithmetic": 2},
                 "max_new_tokens": {"jailbreak": 3, "overrefusal": 3, "qa": 3, "arithmetic": 3}, "batch_size": 4},
    }
    if grid is not None:
        over["grid"] = grid
    return over


def test_quick_profile_runs_end_to_end_and_resumes(tiny_base, tmp_path):
    cfg = load_experiment_config("default", quick=True, overrides=_tiny_overrides(tiny_base, tmp_path))
    names = [e.name for e in expand_grid(cfg)]
    assert names == ["A5+A6+A7/direct", "A5+A6+A7/residual", "A5+A6+A7/complement", "A5+A6+A7/ties",
                     "A5+A6+A7/safe_lora"]
    out = tmp_path / "results"
    result = run_experiments(cfg, out)

    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows)[:4] == ["base", "A5 alone", "A6 alone", "A7 alone"]
    assert set(names) <= set(rows)
    for r in rows.values():
        for col in ("jailbreak_plain", "jailbreak_templated", "overrefusal", "mcq_accuracy", "qa_f1", "arithmetic_accuracy"):
            assert r[col] is not None and 0.0 <= r[col] <= 1.0, (r["name"], col)
    # every file of the result exists and agrees with the returned rows
    with open(out / "results.csv") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert [r["name"] for r in csv_rows] == list(rows)
    md = (out / "results.md").read_text()
    assert "| A5+A6+A7/residual |" in md or "| **A5+A6+A7/residual** |" in md
    assert (out / "safety_vs_utility.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "results.json").read_text())["config"]["base"] == str(tiny_base)
    # merges carry their own reports; the residual merge ran on the variant's own benign data
    residual = json.loads((out / "merges").glob("A5+A6+A7__residual-*").__next__().joinpath("merge_report.json").read_text())
    assert residual["config"]["benign_data"].endswith(".jsonl") and "benign-A5+A6+A7" in residual["config"]["benign_data"]
    assert residual["method"]["effective_k"] == {"global": 2}
    complement = json.loads((out / "merges").glob("A5+A6+A7__complement-*").__next__().joinpath("merge_report.json").read_text())
    assert complement["method"]["predicted_utility_cost_after"] < complement["method"]["predicted_utility_cost_before"]
    assert "predicted utility cost" in md
    facts = rows["A5+A6+A7/residual"]["merge_facts"]
    assert facts["effective_k"] == {"global": 2} and 0 < facts["projection_norm_kept_total"] <= 1
    assert rows["A5+A6+A7/safe_lora"]["merge_facts"]["n_modules_projected"] >= 0 and rows["base"]["merge_facts"] is None
    assert "Merge facts" in md and "projection kept" in md

    # resume: nothing is retrained, re-merged or re-evaluated
    stamps = {p: p.stat().st_mtime_ns for p in (out / "adapters").glob("*/train_report.json")}
    again = run_experiments(cfg, out)
    assert {p: p.stat().st_mtime_ns for p in (out / "adapters").glob("*/train_report.json")} == stamps
    assert all(r["eval_cache_hit"] for r in again["rows"])
    assert [r["name"] for r in again["rows"]] == list(rows)
    assert not any(k.startswith(("train:", "merge:")) for k in again["timings"])


def test_grid_expansion_sweeps_and_deduplicates(tiny_base, tmp_path):
    grid = [{"name": "direct", "mode": "direct"},
            {"name": "sw", "mode": "direct", "variants": ["A5+A7"], "sweep": {"safety_weight": [0.5, 1.0]}},
            {"name": "residual", "mode": "residual", "variants": ["A5+A7"], "sweep": {"residual_ratio": [0.5, 0.9], "k": [2, 3]}}]
    cfg = load_experiment_config("default", overrides=_tiny_overrides(tiny_base, tmp_path, grid))
    names = [e.name for e in expand_grid(cfg)]
    # sw=1.0 on A5+A7 equals direct on A5+A7: kept once, under the first name
    assert names == ["A5+A7/direct", "A6+A7/direct", "A5+A6+A7/direct", "A5+A7/sw-safety_weight=0.5",
                     "A5+A7/residual-residual_ratio=0.5-k=2", "A5+A7/residual-residual_ratio=0.5-k=3",
                     "A5+A7/residual-residual_ratio=0.9-k=2", "A5+A7/residual-residual_ratio=0.9-k=3"]


def test_default_config_has_the_seed_grid():
    cfg = load_experiment_config("default")
    names = [e.name for e in expand_grid(cfg)]
    for v in ("A5+A7", "A6+A7", "A5+A6+A7"):
        assert {f"{v}/direct", f"{v}/complement", f"{v}/protect"} <= set(names)
        assert {f"{v}/residual-residual_ratio={r}" for r in (0.5, 0.7, 0.9)} <= set(names)
    assert {f"A5+A6+A7/projection-k={k}" for k in (4, 16, "auto")} <= set(names)
    assert {f"A5+A6+A7/protect-k={k}" for k in (4, 16)} <= set(names)
    assert {"A5+A6+A7/complement_pm", "A5+A6+A7/protect_pm", "A5+A6+A7/projection_pm"} <= set(names)
    for p in ("safety_first", "balanced", "utility_first", "minimal"):
        assert f"A5+A6+A7/layerwise-preset={p}" in names
    for b in ("ties", "dare_linear", "dare_ties", "magnitude", "safe_lora", "safemerge", "fisher_mask", "v3_weights"):
        assert f"A5+A6+A7/{b}" in names
    assert {f"A5+A6+A7/safety_weight-safety_weight={w}" for w in (0.0, 0.5, 1.5)} <= set(names)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"safety": "A9"}, "safety adapter 'A9' is not among adapters"),
        ({"variants": {"X": ["A55"]}}, "unknown adapter 'A55'"),
        ({"grid": [{"name": "d", "mode": "direct", "variants": ["A5+A8"]}]}, "unknown variant 'A5+A8'"),
        ({"grid": [{"name": "d", "mode": "residul"}]}, "residual"),  # did-you-mean from the method registry
        ({"grid": [{"name": "d", "mode": "residual", "options": {"residual_ratio": 2}}]}, "residual_ratio"),
        ({"evaluation": {}}, "unknown key 'evaluation'"),
        ({"adapters": {"A5": {"train": {"stpes": 3}}}}, "stpes"),
    ],
)
def test_bad_configs_are_clear_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("+", r"\+")):
        load_experiment_config("default", overrides=overrides)


def test_missing_config_and_quick_without_section(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_experiment_config(tmp_path / "nope.yaml")
    f = tmp_path / "c.yaml"
    f.write_text("adapters: {S: {data: [bundled:harmful_train]}}\nsafety: S\nvariants: {}\n")
    with pytest.raises(ConfigError, match="quick"):
        load_experiment_config(f, quick=True)


def test_pareto_front_and_headline():
    pts = [(0.1, 0.9), (0.5, 0.5), (0.4, 0.4), (0.9, 0.1), (0.5, 0.5)]
    assert pareto_front(pts) == [0, 1, 4, 3]  # (0.4, 0.4) is dominated; ties both kept
    suites = {"jailbreak": {"records": [{"template": "plain", "refused": {"keyword": True}},
                                        {"template": "t1", "refused": {"keyword": False}},
                                        {"template": "plain", "refused": {"keyword": True}},
                                        {"template": "t2", "refused": {"keyword": True}}]},
              "arithmetic": {"metrics": {"accuracy": 0.25}}}
    row = headline(suites)
    assert row["jailbreak_plain"] == 1.0 and row["jailbreak_templated"] == 0.5
    assert row["arithmetic_accuracy"] == 0.25 and row["qa_f1"] is None


def test_top_level_seed_reaches_training_and_merges():
    cfg = load_experiment_config("default", overrides={"seed": 3, "adapters": {"A6": {"train": {"seed": 11}}}})
    assert cfg.adapters["A5"].train.seed == 3 and cfg.adapters["A7"].train.seed == 3
    assert cfg.adapters["A6"].train.seed == 11  # an explicit recipe seed wins
    assert all(e.options["seed"] == 3 for e in expand_grid(cfg))
