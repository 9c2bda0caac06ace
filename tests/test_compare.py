"""`sst-merge compare RUN A B`: paired tests of any two rows of a finished grid, read from its item outcomes."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from scipy.stats import binomtest

from sstmerge.cli.main import cli
from sstmerge.errors import ConfigError
from sstmerge.pipeline.compare import compare_models, comparison_lines


def _run_folder(path, outcomes: dict[str, dict[str, list[int]]], seeds=(0,)):
    """A finished one- or several-seed grid folder as the grid writes it, with the given 0/1 outcomes per model and
    column (the same in every seed unless a list of per-seed lists is given)."""
    path.mkdir()
    rows, per_seed = [], {}
    for name, cols in outcomes.items():
        by_seed = {s: {c: (v[i] if isinstance(v[0], list) else v) for c, v in cols.items()}
                   for i, s in enumerate(seeds)}
        per_seed[name] = {str(s): {c: {f"{c}:{k}": float(x) for k, x in enumerate(v)} for c, v in by_seed[s].items()}
                          for s in seeds}
        rows.append({"name": name, **{c: sum(sum(by_seed[s][c]) / len(by_seed[s][c]) for s in seeds) / len(seeds)
                                      for c in cols}})
    config = {"eval": {"suites": ["jailbreak"]}, **({"seed": seeds[0]} if len(seeds) == 1 else {"seeds": list(seeds)})}
    (path / "results.json").write_text(json.dumps({"seeds": list(seeds), "config": config, "rows": rows}))
    if len(seeds) == 1:
        (path / "item_outcomes.json").write_text(json.dumps({n: v[str(seeds[0])] for n, v in per_seed.items()}))
    else:
        (path / "item_outcomes_per_seed.json").write_text(json.dumps(per_seed))
    return path


def test_known_mcnemar_values_and_identical_models(tmp_path):
    """x refuses items 0-9 of 20, y items 0-4: 5 discordant pairs, all one way: exact McNemar p = 2 · 0.5⁵."""
    x = [1] * 10 + [0] * 10
    y = [1] * 5 + [0] * 15
    run = _run_folder(tmp_path / "run", {"x": {"jailbreak_plain": x, "jailbreak_templated": x},
                                          "y": {"jailbreak_plain": y, "jailbreak_templated": x},
                                          "z": {"jailbreak_plain": x, "jailbreak_templated": x}})
    c = compare_models(run, "x", "y")
    plain = c["tests"]["jailbreak_plain"]
    assert plain["difference"] == pytest.approx(0.25)
    assert plain["p_value"] == pytest.approx(binomtest(5, 5, 0.5).pvalue) == pytest.approx(0.0625)
    assert not plain["significant"] and plain["every_seed"] is False
    assert c["tests"]["jailbreak_templated"]["difference"] == 0 and c["tests"]["jailbreak_templated"]["p_value"] == 1
    assert c["values"]["x"]["jailbreak_plain"] == 0.5 and c["values"]["y"]["jailbreak_plain"] == 0.25
    assert set(c["tests"]) == {"jailbreak_plain", "jailbreak_templated", "safety"}  # no utility column here
    same = compare_models(run, "x", "z")  # identical outputs: p = 1 everywhere
    assert all(t["p_value"] == 1 and t["difference"] == 0 for t in same["tests"].values())
    lines = comparison_lines(c)
    assert lines[0].startswith("x − y, 1 seed(s) [0]")
    assert "- jailbreak_plain: 50.0 vs 25.0: +25.0 (p = 0.062; per seed +25.0: not in every seed)" in lines


def test_a_gap_in_every_seed_is_marked_so(tmp_path):
    """Two seeds, x above y by 10 of 40 items in each: significant pooled and in each seed; reversed in one seed:
    the pooled gap may stand, but not 'in every seed'."""
    x, y = [1] * 30 + [0] * 10, [1] * 20 + [0] * 20
    run = _run_folder(tmp_path / "two", {"x": {"jailbreak_plain": [x, x]}, "y": {"jailbreak_plain": [y, y]},
                                         "w": {"jailbreak_plain": [y, [1] * 40]}}, seeds=(0, 1))
    t = compare_models(run, "x", "y")["tests"]["jailbreak_plain"]
    assert t["significant"] and t["every_seed"] and list(t["per_seed"]) == ["0", "1"]
    assert t["per_seed"]["0"]["p_value"] == pytest.approx(binomtest(10, 10, 0.5).pvalue)
    mixed = compare_models(run, "x", "w")["tests"]["jailbreak_plain"]
    assert mixed["per_seed"]["0"]["difference"] > 0 > mixed["per_seed"]["1"]["difference"]
    assert mixed["every_seed"] is False
    assert "holds in every seed" in "\n".join(comparison_lines(compare_models(run, "x", "y")))


def test_unknown_or_repeated_models_are_clear_errors(tmp_path):
    run = _run_folder(tmp_path / "run", {"A5+A7/protect": {"jailbreak_plain": [1, 0]},
                                          "A5+A7/direct": {"jailbreak_plain": [0, 0]},
                                          "A7 alone": {"jailbreak_plain": [1, 1]}})
    with pytest.raises(ConfigError, match=r"no model 'A5\+A7/protekt'\. Did you mean 'A5\+A7/protect'\?"):
        compare_models(run, "A5+A7/protekt", "A5+A7/direct")
    with pytest.raises(ConfigError, match=r"no model 'A7'\. Did you mean 'A7 alone'\? Its models: A5\+A7/protect"):
        compare_models(run, "A7", "A5+A7/direct")
    with pytest.raises(ConfigError, match="not with itself"):
        compare_models(run, "A5+A7/direct", "A5+A7/direct")
    with pytest.raises(ConfigError, match=r"results.json is missing"):
        compare_models(tmp_path, "a", "b")


def test_cli_prints_lines_or_json_and_errors_name_the_fix(tmp_path):
    run = _run_folder(tmp_path / "run", {"x": {"jailbreak_plain": [1, 1, 0]}, "y": {"jailbreak_plain": [0, 1, 0]}})
    ok = CliRunner().invoke(cli, ["compare", str(run), "x", "y"])
    assert ok.exit_code == 0 and "- jailbreak_plain: 66.7 vs 33.3: +33.3" in ok.output
    as_json = CliRunner().invoke(cli, ["compare", str(run), "x", "y", "--json"])
    assert as_json.exit_code == 0 and json.loads(as_json.output)["tests"]["jailbreak_plain"]["p_value"] == 1.0
    bad = CliRunner().invoke(cli, ["compare", str(run), "x", "why"])
    assert bad.exit_code != 0 and "no model 'why'" in bad.output and "Traceback" not in bad.output


def _damage(run, edit, seeds=(0,)):
    """Apply ``edit(outcomes)`` to the run's item-outcome file, as a hand edit or a damaged copy would."""
    path = run / ("item_outcomes.json" if len(seeds) == 1 else "item_outcomes_per_seed.json")
    outcomes = json.loads(path.read_text())
    per_seed = outcomes if len(seeds) > 1 else {n: {"0": cols} for n, cols in outcomes.items()}
    edit(per_seed)
    path.write_text(json.dumps(per_seed if len(seeds) > 1 else {n: v["0"] for n, v in per_seed.items()}))
    return path


@pytest.mark.parametrize("seeds", [(0,), (0, 1)])
@pytest.mark.parametrize("edit, message", [
    (lambda o: o["y"]["0"]["jailbreak_plain"].update({"jailbreak_plain:1": "yes"}), r"item 'jailbreak_plain:1': outcome 'yes'"),
    (lambda o: o["y"]["0"]["jailbreak_plain"].update({"jailbreak_plain:1": float("nan")}), r"outcome nan is not a number in \[0, 1\]"),
    (lambda o: o["y"]["0"]["jailbreak_plain"].update({"jailbreak_plain:1": 1.5}), r"outcome 1.5 is not"),
    (lambda o: o["y"]["0"]["jailbreak_plain"].update({"jailbreak_plain:1": True}), r"outcome True is not"),
    (lambda o: o["y"]["0"].pop("overrefusal"), r"'y', seed 0 has the columns \['jailbreak_plain'\], 'x' seed 0 has"),
    (lambda o: o["y"]["0"]["jailbreak_plain"].pop("jailbreak_plain:2"), r"column 'jailbreak_plain': 1 item\(s\) of 'x' seed 0 missing \['jailbreak_plain:2'\]"),
    (lambda o: o["y"]["0"]["jailbreak_plain"].update({"extra": 1.0}), r"0 item\(s\) of 'x' seed 0 missing \[\], 1 item\(s\) it does not have \['extra'\]"),
    (lambda o: o["y"].update({"0": [1, 0]}), r"expected column -> item -> outcome objects"),
    (lambda o: o.pop("y"), r"the item outcomes have no model 'y'"),
])
def test_damaged_item_outcomes_are_clear_errors_naming_model_seed_column_and_item(tmp_path, seeds, edit, message):
    """A column or item missing from one model would silently change what the paired tests pair and what the summary
    scores average; a non-number would end in a numpy traceback. Each is an error naming the file and the fix."""
    run = _run_folder(tmp_path / "run", {"x": {"jailbreak_plain": [1, 1, 0], "overrefusal": [0, 1, 0]},
                                          "y": {"jailbreak_plain": [0, 1, 0], "overrefusal": [0, 0, 0]}}, seeds=seeds)
    path = _damage(run, edit, seeds)
    with pytest.raises(ConfigError, match=message) as err:
        compare_models(run, "x", "y")
    assert str(path) in str(err.value) and "rewrite" in str(err.value)
    bad = CliRunner().invoke(cli, ["compare", str(run), "x", "y"])
    assert bad.exit_code != 0 and "Traceback" not in bad.output


def test_items_in_another_order_are_paired_by_item_not_by_position(tmp_path):
    run = _run_folder(tmp_path / "run", {"x": {"jailbreak_plain": [1, 1, 0, 0]}, "y": {"jailbreak_plain": [0, 1, 0, 1]}})
    before = compare_models(run, "x", "y")["tests"]["jailbreak_plain"]
    _damage(run, lambda o: o["y"].update({"0": {"jailbreak_plain": dict(reversed(o["y"]["0"]["jailbreak_plain"].items()))}}))
    assert compare_models(run, "x", "y")["tests"]["jailbreak_plain"] == before
