"""The experiment grid end to end on the tiny model (the quick profile's stages), resume, and config errors."""

from __future__ import annotations

import csv
import json
import re
import statistics

import pytest

from sstmerge.errors import ConfigError, UnsafeOutputError
from sstmerge.pipeline.combine import combine_runs
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
        "eval": {"limit": {"jailbreak": 2, "rephrased": 2, "overrefusal": 2, "mcq": 3, "qa": 2, "arithmetic": 2},
                 "max_new_tokens": {"jailbreak": 3, "rephrased": 3, "overrefusal": 3, "qa": 3, "arithmetic": 3},
                 "batch_size": 4},
    }
    if grid is not None:
        over["grid"] = grid
    return over


def test_quick_profile_runs_end_to_end_and_resumes(tiny_base, tmp_path):
    cfg = load_experiment_config("default", quick=True, overrides=_tiny_overrides(tiny_base, tmp_path))
    names = [e.name for e in expand_grid(cfg)]
    assert names == ["A5+A6+A7/direct", "A5+A6+A7/residual", "A5+A6+A7/complement", "A5+A6+A7/ties"]
    assert "mcq" not in cfg.eval.suites  # quick: not part of the safety / utility scores
    out = tmp_path / "results"
    result = run_experiments(cfg, out)

    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows)[:2] == ["base", "A7 alone"]  # quick: the base and the safety adapter alone
    assert set(names) <= set(rows)
    for r in rows.values():
        for col in ("jailbreak_plain", "jailbreak_templated", "overrefusal", "qa_f1", "arithmetic_accuracy"):
            assert r[col] is not None and 0.0 <= r[col] <= 1.0, (r["name"], col)
        assert "mcq_accuracy" not in r  # a suite the run leaves out has no column
    # every file of the result exists and agrees with the returned rows
    with open(out / "results.csv") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert "mcq_accuracy" not in csv_rows[0] and "mcq_accuracy" not in result["columns"]
    assert [r["name"] for r in csv_rows] == list(rows)
    md = (out / "results.md").read_text()
    assert re.search(r"\| (\*\*)?A5\+A6\+A7/residual(\*\*)?( †)? \|", md)
    # every rate carries its 95 % interval over items; merges are tested against direct of their variant
    for r in rows.values():
        for col in ("jailbreak_plain", "overrefusal", "qa_f1", "arithmetic_accuracy", "safety", "utility"):
            ci = r["intervals"][col]
            assert ci["low"] <= r[col] <= ci["high"] and ci["n"] >= 1, (r["name"], col)
        assert r["jailbreak_plain_sd"] is None  # one seed: no sd
    assert rows["A5+A6+A7/direct"]["vs_direct"] is None and rows["base"]["vs_direct"] is None
    vs = rows["A5+A6+A7/ties"]["vs_direct"]
    assert vs["jailbreak_plain"]["method"] == "mcnemar_exact"  # 0/1 outcomes (F1 too, when every F1 is 0 or 1)
    assert 0.0 <= vs["safety"]["p_value"] <= 1.0
    assert set(result["pareto_front"]) <= set(result["pareto_front_significant"])
    assert "jailbreak_plain_low" in csv_rows[0] and "safety_vs_direct_p" in csv_rows[0]
    items = json.loads((out / "item_outcomes.json").read_text())
    assert len(items["A5+A6+A7/direct"]["jailbreak_plain"]) == rows["A5+A6+A7/direct"]["intervals"]["jailbreak_plain"]["n"]
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
    assert rows["base"]["merge_facts"] is None
    assert "Merge facts" in md and "projection kept" in md

    # resume: nothing is retrained, re-merged or re-evaluated
    stamps = {p: p.stat().st_mtime_ns for p in (out / "adapters").glob("*/train_report.json")}
    again = run_experiments(cfg, out)
    assert {p: p.stat().st_mtime_ns for p in (out / "adapters").glob("*/train_report.json")} == stamps
    assert all(r["eval_cache_hit"] for r in again["rows"])
    assert [r["name"] for r in again["rows"]] == list(rows)
    assert not any(k.startswith(("train:", "merge:")) for k in again["timings"])


def test_two_seed_grid_reports_mean_and_sd_across_seeds(tiny_base, tmp_path):
    grid = [{"name": "direct", "mode": "direct", "variants": ["A5+A6+A7"]},
            {"name": "ties", "mode": "ties", "variants": ["A5+A6+A7"], "options": {"density": 0.5}}]
    over = _tiny_overrides(tiny_base, tmp_path, grid) | {"seeds": [0, 1]}
    over["eval"]["suites"] = ["jailbreak", "qa", "arithmetic"]
    cfg = load_experiment_config("default", overrides=over)
    assert cfg.seed_list() == [0, 1] and cfg.for_seed(1).adapters["A7"].train.seed == 1
    out = tmp_path / "results"
    result = run_experiments(cfg, out)
    assert result["seeds"] == [0, 1]
    per_seed = result["adapters_per_seed"]
    assert per_seed["0"]["A7"] != per_seed["1"]["A7"]  # adapters trained once per seed
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["A5+A6+A7/direct"]["per_seed"]["0"]["adapter"] != rows["A5+A6+A7/direct"]["per_seed"]["1"]["adapter"]
    for name in ("A7 alone", "A5+A6+A7/direct", "A5+A6+A7/ties", "base"):
        r = rows[name]
        for col in ("jailbreak_plain", "jailbreak_templated", "qa_f1", "arithmetic_accuracy", "safety", "utility"):
            values = [r["per_seed"][s][col] for s in ("0", "1")]
            assert r[col] == pytest.approx(statistics.mean(values)), (name, col)
            assert r[f"{col}_sd"] == pytest.approx(statistics.stdev(values)), (name, col)
            ci = r["intervals"][col]
            assert ci["low"] - 1e-9 <= r[col] <= ci["high"] + 1e-9
    assert rows["base"]["per_seed"]["0"] == rows["base"]["per_seed"]["1"]  # one base model: evaluated once
    # `sst-merge compare` reads the same tests back from the folder: ties against direct is the table's vs_direct
    from sstmerge.pipeline.compare import compare_models
    assert compare_models(out, "A5+A6+A7/ties", "A5+A6+A7/direct")["tests"] == rows["A5+A6+A7/ties"]["vs_direct"]
    assert rows["A5+A6+A7/ties"]["vs_direct"]["jailbreak_plain"]["n"] == 2
    ties_vs = rows["A5+A6+A7/ties"]["vs_direct"]["safety"]  # and each seed's own test against its own direct
    assert list(ties_vs["per_seed"]) == ["0", "1"] and isinstance(ties_vs["every_seed"], bool)
    assert ties_vs["every_seed"] == all(t["significant"] and (t["difference"] > 0) == (ties_vs["difference"] > 0)
                                        for t in ties_vs["per_seed"].values())
    md = (out / "results.md").read_text()
    assert "seed by seed" in md and next(line for line in md.splitlines()
                                         if line.startswith("- A5+A6+A7/ties: safety")).count("per seed") >= 2
    assert "2 training seed(s) [0, 1]" in md and " ±" in md
    ties_facts = next(line for line in md.splitlines() if line.startswith("- A5+A6+A7/ties:"))
    assert "seed 0: max SVD truncation error" in ties_facts and "seed 1: max SVD" in ties_facts  # each seed's merge
    with open(out / "results.csv") as fh:
        assert "safety_sd" in next(csv.reader(fh))
    # resume: every seed's stages are reused
    again = run_experiments(cfg, out)
    assert all(r["eval_cache_hit"] for r in again["rows"])
    assert not any(k.startswith(("train:", "merge:")) for k in again["timings"])

    # the same seeds run apart (one folder each, as on two machines) and joined give the same table
    for s in (0, 1):
        run_experiments(load_experiment_config("default", overrides=over | {"seeds": [s]}), tmp_path / f"seed{s}")
    joined = combine_runs([tmp_path / "seed1", tmp_path / "seed0"], tmp_path / "joined")
    assert joined["seeds"] == [0, 1] and joined["base_reproduced"]
    assert [r["name"] for r in joined["rows"]] == [r["name"] for r in result["rows"]]
    same = ("jailbreak_plain", "jailbreak_templated", "qa_f1", "arithmetic_accuracy", "safety", "utility")
    for a, b in zip(joined["rows"], result["rows"]):
        for col in same:
            assert a[col] == pytest.approx(b[col]) and a[f"{col}_sd"] == pytest.approx(b[f"{col}_sd"]), (a["name"], col)
            assert a["intervals"][col] == pytest.approx(b["intervals"][col]), (a["name"], col)
        assert (a["vs_direct"] is None) == (b["vs_direct"] is None)
        if a["vs_direct"]:
            assert {c: t["p_value"] for c, t in a["vs_direct"].items()} == \
                pytest.approx({c: t["p_value"] for c, t in b["vs_direct"].items()})
            assert {c: t["every_seed"] for c, t in a["vs_direct"].items()} == \
                {c: t["every_seed"] for c, t in b["vs_direct"].items()}
    assert joined["pareto_front_significant"] == result["pareto_front_significant"]
    assert json.loads((tmp_path / "joined" / "item_outcomes.json").read_text()) == \
        json.loads((out / "item_outcomes.json").read_text())
    assert "2 training seed(s) [0, 1]" in (tmp_path / "joined" / "results.md").read_text()
    assert [p["seeds"] for p in joined["combined_from"]] == [[0], [1]]
    # a run of several seeds joins a run of another: its per-seed outcomes are read
    run_experiments(load_experiment_config("default", overrides=over | {"seeds": [2]}), tmp_path / "seed2")
    three = combine_runs([out, tmp_path / "seed2"], tmp_path / "three")
    r = {row["name"]: row for row in three["rows"]}["A5+A6+A7/ties"]
    assert three["seeds"] == [0, 1, 2] and list(r["per_seed"]) == ["0", "1", "2"]
    assert r["safety"] == pytest.approx(statistics.mean(r["per_seed"][s]["safety"] for s in ("0", "1", "2")))
    # every part's timings are kept, the base evaluation of each part under its own key
    assert {"eval:base@seeds0+1", "eval:base@seed2"} <= set(three["timings"])


def test_combine_refuses_what_is_not_one_experiment(tiny_base, tmp_path, monkeypatch):
    """Repeated seeds, another grid, an unfinished folder, a lone folder: clear errors naming the folder."""
    grid = [{"name": "direct", "mode": "direct", "variants": ["A5+A7"]}]
    over = _tiny_overrides(tiny_base, tmp_path, grid)
    over["eval"]["suites"] = ["jailbreak", "arithmetic"]
    over["references"] = False
    for s in (0, 1):
        run_experiments(load_experiment_config("default", overrides=over | {"seeds": [s]}), tmp_path / f"s{s}")
    run_experiments(load_experiment_config("default", overrides=over | {"seeds": [0]}), tmp_path / "again0")
    assert combine_runs([tmp_path / "s0", tmp_path / "s1"], tmp_path / "pair")["base_reproduced"] is None  # no base row
    with pytest.raises(ConfigError, match=r"seed 0 is in both .*s0.* and .*again0"):
        combine_runs([tmp_path / "s0", tmp_path / "again0"], tmp_path / "out")
    other = over | {"seeds": [2], "merge_defaults": over["merge_defaults"] | {"safety_weight": 0.5}}
    run_experiments(load_experiment_config("default", overrides=other), tmp_path / "other")
    with pytest.raises(ConfigError, match=r"other ran another grid .* differs at merge_defaults.safety_weight"):
        combine_runs([tmp_path / "s0", tmp_path / "other"], tmp_path / "out")
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(ConfigError, match=r"unfinished/results.json is missing: the grid has not finished"):
        combine_runs([tmp_path / "s0", tmp_path / "unfinished"], tmp_path / "out")
    s1_items = (tmp_path / "s1" / "item_outcomes.json").read_text()
    (tmp_path / "s1" / "item_outcomes.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"s1/item_outcomes.json cannot be read as JSON"):
        combine_runs([tmp_path / "s0", tmp_path / "s1"], tmp_path / "out")
    with pytest.raises(ConfigError, match="at least two"):
        combine_runs([tmp_path / "s0"], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written by a refused combination
    # a refused --out (an input; a foreign folder) fails before the table is computed, and nothing is touched
    (tmp_path / "s1" / "item_outcomes.json").write_text(s1_items)
    before = {p: p.read_bytes() for p in (tmp_path / "s0").rglob("*") if p.is_file()}

    def no_tables(*args, **kwargs):
        raise AssertionError("the tables were computed before --out was checked")

    monkeypatch.setattr("sstmerge.pipeline.aggregate.average_seeds", no_tables)
    with pytest.raises(UnsafeOutputError, match=r"--out .*s0 is an input"):
        combine_runs([tmp_path / "s0", tmp_path / "s1"], tmp_path / "s0")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(UnsafeOutputError, match=r"foreign exists and is not an experiment folder"):
        combine_runs([tmp_path / "s0", tmp_path / "s1"], tmp_path / "foreign")
    assert {p: p.read_bytes() for p in (tmp_path / "s0").rglob("*") if p.is_file()} == before
    assert [p.name for p in (tmp_path / "foreign").iterdir()] == ["notes.txt"]


def test_seed_and_seeds_are_exclusive_and_layers_replace_each_other(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("adapters: {S: {data: [bundled:harmful_train]}}\nsafety: S\nvariants: {}\nseed: 1\nseeds: [0, 1]\n")
    with pytest.raises(ConfigError, match="either `seed`"):
        load_experiment_config(f)
    with pytest.raises(ConfigError, match="each seed once"):
        load_experiment_config("default", overrides={"seeds": [0, 0]})
    assert load_experiment_config("default", overrides={"seed": 5}).seed_list() == [5]  # replaces the YAML's seeds
    assert load_experiment_config("default", overrides={"seeds": [3, 4]}).seed_list() == [3, 4]


def test_references_pick_the_models_evaluated_alone():
    full = load_experiment_config("default")
    assert full.reference_models() == (True, ["A5", "A6", "A7"])
    assert load_experiment_config("default", quick=True).reference_models() == (True, ["A7"])
    assert load_experiment_config("default", overrides={"references": False}).reference_models() == (False, [])
    assert load_experiment_config("default", overrides={"references": ["A6"]}).reference_models() == (False, ["A6"])
    with pytest.raises(ConfigError, match=r"references: unknown model .A8.*Did you mean"):
        load_experiment_config("default", overrides={"references": ["base", "A8"]})


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


def test_default_config_has_the_headline_grid_with_three_seeds_and_exact_dense_rows():
    cfg = load_experiment_config("default")
    assert cfg.seed_list() == [0, 1, 2]
    names = [e.name for e in expand_grid(cfg)]
    for v in ("A5+A7", "A6+A7", "A5+A6+A7"):
        assert {f"{v}/direct", f"{v}/complement", f"{v}/protect"} <= set(names)
    exps = {e.name: e for e in expand_grid(cfg)}
    for b in ("ties", "dare_linear", "dare_ties", "magnitude"):
        assert f"A5+A6+A7/{b}" in names and "recompress_rank" not in exps[f"A5+A6+A7/{b}"].options
        assert exps[f"A5+A6+A7/{b}_dense"].options["recompress_rank"] == "full"  # the exact dense result
    for b in ("safe_lora", "safemerge", "fisher_mask", "residual"):
        assert f"A5+A6+A7/{b}" in names
    assert load_experiment_config("default", quick=True).seed_list() == [0]


def test_eval_settings_from_the_config_are_what_the_grid_evaluates_with():
    """``EvalConfig.settings`` is the one translation of the YAML eval section (the grid and the slow A7 test
    both use it): ``batch_size: auto`` is the device default (None), templates only for the jailbreak suite, the
    refusal-verdict stop only for refusal suites."""
    ev = load_experiment_config("default").eval
    assert ev.batch_size == "auto" and ev.settings("jailbreak").batch_size is None
    jb, qa, over = ev.settings("jailbreak"), ev.settings("qa"), ev.settings("overrefusal")
    assert jb.templates_per_prompt == 1 and qa.templates_per_prompt is None and over.templates_per_prompt is None
    assert jb.stop_when_decided and over.stop_when_decided and not qa.stop_when_decided
    assert jb.decision_tokens == 16 and qa.decision_tokens is None
    assert jb.max_new_tokens == 32 and qa.max_new_tokens == 24 and ev.settings("mcq").max_new_tokens == 64
    quick = load_experiment_config("default", quick=True).eval
    assert quick.settings("jailbreak").limit == 24 and quick.settings("qa").limit == 16
    pinned = load_experiment_config("default", overrides={"eval": {"batch_size": 8}}).eval
    assert pinned.settings("qa").batch_size == 8


def test_sweeps_config_extends_the_default():
    sweeps, default = load_experiment_config("sweeps"), load_experiment_config("default")
    assert sweeps.seed_list() == [0] and sweeps.adapters == default.adapters and sweeps.eval == default.eval
    names = [e.name for e in expand_grid(sweeps)]
    assert {f"A5+A6+A7/protect-k={k}" for k in (4, 16, "auto")} <= set(names)
    assert {f"A5+A6+A7/projection-k={k}" for k in (4, 16, "auto")} <= set(names)
    assert {"A5+A6+A7/complement_pm", "A5+A6+A7/protect_pm", "A5+A6+A7/projection_pm"} <= set(names)
    for p in ("safety_first", "balanced", "utility_first", "minimal"):
        assert f"A5+A6+A7/layerwise-preset={p}" in names
    assert {f"A5+A6+A7/safety_weight-safety_weight={w}" for w in (0.0, 0.5, 1.5)} <= set(names)


def test_extends_loops_and_bad_values_are_clear_errors(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("extends: b.yaml\n")
    b.write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_experiment_config(a)
    a.write_text("extends: [default]\n")
    with pytest.raises(ConfigError, match="names one config"):
        load_experiment_config(a)
    a.write_text("extends: default\nseeds: [7]\n")
    assert load_experiment_config(a).seed_list() == [7]


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
        # a misspelt task used to surface hours later as "improved: False" with no numbers
        ({"adapters": {"A5": {"task": "qa_f2"}}}, "task 'qa_f2' is not a results column. Did you mean 'qa_f1'?"),
        # two entries with one name but different merges would share one results row and merge folder
        ({"grid": [{"name": "d", "mode": "direct"}, {"name": "d", "mode": "direct", "options": {"safety_weight": 0.5}}]},
         "two grid entries named 'd' merge"),
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
    suites = {"jailbreak": {"records": [{"id": "a", "template": "plain", "refused": {"keyword": True}},
                                        {"id": "a", "template": "t1", "refused": {"keyword": False}},
                                        {"id": "b", "template": "plain", "refused": {"keyword": True}},
                                        {"id": "b", "template": "t2", "refused": {"keyword": True}}]},
              "arithmetic": {"records": [{"id": str(i), "correct": i == 0} for i in range(4)]}}
    row = headline(suites)
    assert row["jailbreak_plain"] == 1.0 and row["jailbreak_templated"] == 0.5
    assert row["arithmetic_accuracy"] == 0.25 and row["qa_f1"] is None


def test_top_level_seed_reaches_training_and_merges():
    cfg = load_experiment_config("default", overrides={"seed": 3, "adapters": {"A6": {"train": {"seed": 11}}}})
    assert cfg.adapters["A5"].train.seed == 3 and cfg.adapters["A7"].train.seed == 3
    assert cfg.adapters["A6"].train.seed == 11  # an explicit recipe seed wins
    assert all(e.options["seed"] == 3 for e in expand_grid(cfg))
