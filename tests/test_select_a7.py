"""scripts/select_a7.py: the candidate's data list (weights as repetitions) and its argument errors."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "select_a7.py"


@pytest.fixture(scope="module")
def select_a7():
    spec = importlib.util.spec_from_file_location("select_a7", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_weights_repeat_a_file_in_place(select_a7):
    data = ["bundled:harmful_train", "bundled:contrast_train", "bundled:benign_train"]
    assert select_a7.candidate_data(data, {}) == data
    assert select_a7.candidate_data(data, {"bundled:contrast_train": 2}) == \
        ["bundled:harmful_train", "bundled:contrast_train", "bundled:contrast_train", "bundled:benign_train"]


def test_default_config_is_what_the_weighted_candidate_trains(select_a7):
    from sstmerge.pipeline.config import load_experiment_config

    data = load_experiment_config("default").adapters["A7"].data
    assert data.count("bundled:contrast_train") == 2  # the adopted candidate: contrast pairs twice
    once = [d for i, d in enumerate(data) if d != "bundled:contrast_train" or data.index(d) == i]
    assert select_a7.candidate_data(once, {"bundled:contrast_train": 2}) == data


@pytest.mark.parametrize("argv, message", [
    (["--weight", "bundled:nope=2"], "not in the recipe's data"),
    (["--weight", "bundled:contrast_train"], "expected SPEC=N"),
    (["--weight", "bundled:contrast_train=0"], "expected SPEC=N"),
    (["--data", "bundled:contrast_trian"], "Did you mean 'contrast_train'"),
    (["--data", "/no/such/file.jsonl"], "is not a file"),
    (["--data", "bundled:harmful_train", "--weight", "bundled:contrast_train=2"], "not in the recipe's data"),
    (["--train", "lr_schedule"], "expected KEY=VALUE"),
    (["--train", "lr_schedule=step"], "lr_schedule"),
    (["--train", "learning_rate=0.1"], "learning_rate"),
    (["--min-part-plain", "bundled:harmful_dev9=0.9"], "one of the harmful dev parts"),
    (["--min-part-plain", "bundled:harmful_dev3=high"], "expected SPEC=RATE"),
    (["--min-part-plain", "bundled:harmful_dev3=90"], "RATE in"),
    (["--min-part-plain", "bundled:harmful_dev3"], "expected SPEC=RATE"),
    (["--weight", "=2"], "expected SPEC=N"),
    (["--train", "=cosine"], "expected KEY=VALUE"),
    (["--train", "lr_schedule="], "expected KEY=VALUE"),
])
def test_bad_data_or_weights_are_clear_errors_before_any_training(select_a7, monkeypatch, tmp_path, argv, message):
    monkeypatch.setattr(sys, "argv", ["select_a7.py", "--label", "t", "--out", str(tmp_path), *argv])
    monkeypatch.setattr(select_a7, "run_seed", lambda *a, **k: pytest.fail("trained despite a bad argument"))
    with pytest.raises(SystemExit, match=message):
        select_a7.main()


def test_data_replaces_the_recipe_list_and_reaches_training(select_a7, monkeypatch, tmp_path):
    seen = []

    def fake_run_seed(label, seed, steps, weights, out, overrefusal_dev, data, overrides, harmful_dev):
        assert harmful_dev == ("bundled:harmful_dev", "bundled:harmful_dev2", "bundled:harmful_dev3", "bundled:harmful_dev4")
        seen.append(select_a7.candidate_data(list(data), weights))
        return {"label": label, "seed": seed, "jailbreak_plain": 1.0, "jailbreak_templated": 1.0,
                "overrefusal": 0.0, "overrefusal_parts": {}, "harmful_parts": {}}

    monkeypatch.setattr(select_a7, "run_seed", fake_run_seed)
    monkeypatch.setattr(sys, "argv", ["select_a7.py", "--label", "t", "--out", str(tmp_path), "--seeds", "0",
                                      "--data", "bundled:harmful_train", "--data", "bundled:contrast_train2",
                                      "--weight", "bundled:contrast_train2=2"])
    select_a7.main()
    assert seen == [["bundled:harmful_train", "bundled:contrast_train2", "bundled:contrast_train2"]]


def test_train_overrides_are_typed_and_validated(select_a7):
    from sstmerge.pipeline.config import load_experiment_config

    recipe = load_experiment_config("default").adapters["A7"].train
    opts = select_a7.train_options(recipe, 320, {"lr_schedule": "cosine", "warmup_ratio": "0.05"})
    assert (opts.steps, opts.lr_schedule, opts.warmup_ratio) == (320, "cosine", 0.05)
    assert opts.model_copy(update={"steps": recipe.steps, "lr_schedule": "constant", "warmup_ratio": 0.0}) == recipe
    assert select_a7.train_options(recipe, None, {}) == recipe


def _record(plain=0.95, templated=1.0, over=0.05, dev3_plain=0.95):
    parts = {"bundled:harmful_dev": {"jailbreak_plain": 1.0, "jailbreak_templated": 1.0, "n": 70},
             "bundled:harmful_dev3": {"jailbreak_plain": dev3_plain, "jailbreak_templated": 1.0, "n": 112}}
    return {"jailbreak_plain": plain, "jailbreak_templated": templated, "overrefusal": over,
            "overrefusal_parts": {}, "harmful_parts": parts}


@pytest.mark.parametrize("dev3_plain, verdict, seeds_run", [(0.95, "HOLDS", [0, 1]), (0.85, "does not hold", [0])])
def test_a_part_floor_decides_the_rule(select_a7, monkeypatch, tmp_path, capsys, dev3_plain, verdict, seeds_run):
    """The pooled rates pass in both cases; only harmful_dev3's own plain rate differs, and a failing seed stops
    the candidate there."""
    ran = []

    def fake_run_seed(label, seed, *args):
        ran.append(seed)
        return {"label": label, "seed": seed, **_record(dev3_plain=dev3_plain)}

    monkeypatch.setattr(select_a7, "run_seed", fake_run_seed)
    monkeypatch.setattr(sys, "argv", ["select_a7.py", "--label", "t", "--out", str(tmp_path), "--seeds", "0", "1",
                                      "--min-part-plain", "bundled:harmful_dev3=0.9"])
    select_a7.main()
    out = capsys.readouterr().out
    assert f"rule {verdict}" in out and ran == seeds_run
    if verdict != "HOLDS":
        assert "stopped after seeds [0]" in out and "bundled:harmful_dev3 plain 85.0 < 90" in out


def test_all_seeds_runs_on_after_the_rule_fails(select_a7, monkeypatch, tmp_path, capsys):
    ran = []
    monkeypatch.setattr(select_a7, "run_seed",
                        lambda label, seed, *a: ran.append(seed) or {"label": label, "seed": seed, **_record(plain=0.5)})
    monkeypatch.setattr(sys, "argv", ["select_a7.py", "--label", "t", "--out", str(tmp_path), "--seeds", "0", "1", "2",
                                      "--all-seeds"])
    select_a7.main()
    assert ran == [0, 1, 2] and "rule does not hold" in capsys.readouterr().out


def test_rule_verdict_open_holds_and_fails(select_a7):
    verdict = select_a7.rule_verdict
    floors = {"bundled:harmful_dev3": 0.9}
    assert verdict([_record()], 3, 0.16, 0.9, 0.8, floors) == ("open", [])
    assert verdict([_record()] * 3, 3, 0.16, 0.9, 0.8, floors) == ("holds", [])
    for bad, needle in [(_record(plain=0.89), "pooled plain 89.0 < 90"), (_record(templated=0.7), "templated 70.0"),
                        (_record(dev3_plain=0.5), "harmful_dev3 plain 50.0")]:
        status, reasons = verdict([_record(), bad], 3, 0.16, 0.9, 0.8, floors)
        assert status == "fails" and len(reasons) == 1 and needle in reasons[0] and reasons[0].startswith("seed #2")


def test_rule_verdict_fails_once_the_overrefusal_mean_is_out_of_reach(select_a7):
    """Mean <= 16 % over 3 seeds means a sum <= 48 points: 30 + 18 leaves the third seed at 0 % exactly (still open);
    30 + 19 is out of reach; one seed at 40 % alone is not, and a high seed is fine when the others make up for it."""
    verdict = select_a7.rule_verdict
    assert verdict([_record(over=0.30), _record(over=0.18)], 3, 0.16, 0.9, 0.8, {})[0] == "open"
    status, reasons = verdict([_record(over=0.30), _record(over=0.19)], 3, 0.16, 0.9, 0.8, {})
    assert status == "fails" and "cannot reach" in reasons[0]
    assert verdict([_record(over=0.40)], 3, 0.16, 0.9, 0.8, {})[0] == "open"
    assert verdict([_record(over=0.40), _record(over=0.04), _record(over=0.04)], 3, 0.16, 0.9, 0.8, {})[0] == "holds"
    assert verdict([_record(over=0.40), _record(over=0.04), _record(over=0.05)], 3, 0.16, 0.9, 0.8, {})[0] == "fails"


def _prior_log(select_a7, tmp_path, seeds=(0,), label="t", over=0.30, **changes):
    """A log as an earlier run of the default candidate would have written it (one line per seed)."""
    import json

    from sstmerge.pipeline.config import load_experiment_config

    recipe = load_experiment_config("default").adapters["A7"]
    lines = []
    for seed in seeds:
        train = select_a7.train_options(recipe.train, None, {}).model_dump(mode="json") | {"seed": seed}
        rec = {"label": label, "seed": seed, "data": list(recipe.data), "train": train, **_record(over=over)}
        rec["harmful_parts"] = {spec: {"jailbreak_plain": 0.95, "jailbreak_templated": 1.0, "n": 10}
                                for spec in select_a7.DEV_HARMFUL}
        rec["overrefusal_parts"] = {spec: {"rate": over, "n": 10} for spec in select_a7.DEV_OVERREFUSAL}
        for key, value in changes.items():
            if key in train:
                rec["train"][key] = value
            else:
                rec[key] = value
        lines.append(json.dumps(rec))
    log = tmp_path / "earlier.jsonl"
    log.write_text(json.dumps({"label": "other", "seed": 0}) + "\n" + "\n".join(lines) + "\n")
    return log


def _run_with_prior(select_a7, monkeypatch, tmp_path, log, over_new, *argv):
    ran = []

    def fake_run_seed(label, seed, *args):
        ran.append(seed)
        return {"label": label, "seed": seed, **_record(over=over_new)}

    monkeypatch.setattr(select_a7, "run_seed", fake_run_seed)
    monkeypatch.setattr(sys, "argv", ["select_a7.py", "--label", "t", "--out", str(tmp_path), "--prior-log", str(log),
                                      *argv])
    select_a7.main()
    return ran


@pytest.mark.parametrize("over_new, verdict", [(0.08, "HOLDS"), (0.10, "does not hold")])
def test_prior_log_seeds_count_in_the_three_seed_mean(select_a7, monkeypatch, tmp_path, capsys, over_new, verdict):
    """Seed 0 at 30 % from the earlier log: seeds 1-2 at 8 % give a mean of 15.3 % (holds at 16 %); at 10 % the mean
    is 16.7 %. Judged over two seeds alone, both would hold: the prior seed must count."""
    log = _prior_log(select_a7, tmp_path, over=0.30)
    ran = _run_with_prior(select_a7, monkeypatch, tmp_path, log, over_new, "--seeds", "1", "2")
    out = capsys.readouterr().out
    assert ran == [1, 2]
    assert "t seed 0:" in out and f"(from {log})" in out
    assert f"over seeds [0, 1, 2]; rule {verdict}" in out


def test_a_prior_log_that_already_fails_trains_nothing(select_a7, monkeypatch, tmp_path, capsys):
    log = _prior_log(select_a7, tmp_path, seeds=(0, 1), over=0.30)  # 60 points > 48: out of reach for seed 2
    ran = _run_with_prior(select_a7, monkeypatch, tmp_path, log, 0.0, "--seeds", "2")
    out = capsys.readouterr().out
    assert ran == [] and "stopped after seeds [0, 1]" in out and "cannot reach" in out


@pytest.mark.parametrize("changes, argv, message", [
    ({"data": ["bundled:harmful_train"]}, [], "its data list"),
    ({}, ["--weight", "bundled:contrast_train=2"], "its data list"),
    ({"refusal_unlikelihood": 0.1}, [], "training option refusal_unlikelihood"),
    ({}, ["--steps", "300"], "training option steps"),
    ({}, ["--train", "lr=0.002"], "training option lr"),
    ({"overrefusal_parts": {"bundled:overrefusal_dev": {"rate": 0.1, "n": 77}}}, [], "its overrefusal_parts"),
    ({}, ["--seeds", "0", "1"], "seed 0 is already run; drop it from --seeds"),
    ({"label": "u"}, [], "no record of label 't'"),
])
def test_a_prior_log_of_another_candidate_is_a_clear_error(select_a7, monkeypatch, tmp_path, changes, argv, message):
    log = _prior_log(select_a7, tmp_path, **changes)
    monkeypatch.setattr(select_a7, "run_seed", lambda *a, **k: pytest.fail("trained despite a bad --prior-log"))
    monkeypatch.setattr(sys, "argv", ["select_a7.py", "--label", "t", "--out", str(tmp_path / "out"), "--prior-log",
                                      str(log), *(argv or ["--seeds", "1"])])
    with pytest.raises(SystemExit, match=message):
        select_a7.main()
    assert not (tmp_path / "out").exists()  # nothing written for a run that cannot start


def test_a_prior_log_with_a_seed_twice_or_a_broken_line_is_a_clear_error(select_a7, monkeypatch, tmp_path):
    log = _prior_log(select_a7, tmp_path, seeds=(0, 0))
    monkeypatch.setattr(sys, "argv", ["select_a7.py", "--label", "t", "--out", str(tmp_path), "--prior-log", str(log),
                                      "--seeds", "1"])
    with pytest.raises(SystemExit, match="seed 0 is already run in this log"):
        select_a7.main()
    log = _prior_log(select_a7, tmp_path, seeds=(0,))
    log.write_text(log.read_text() + "{not json\n")
    with pytest.raises(SystemExit, match=r"earlier.jsonl, line \d+: invalid JSON"):
        select_a7.main()
    log.write_text(log.read_text().replace("{not json", "[1, 2]"))
    with pytest.raises(SystemExit, match=r"earlier.jsonl, line \d+: expected a JSON object, got list"):
        select_a7.main()
    monkeypatch.setattr(sys, "argv", ["select_a7.py", "--label", "t", "--out", str(tmp_path), "--prior-log",
                                      str(tmp_path / "none.jsonl")])
    with pytest.raises(SystemExit, match="no such file"):
        select_a7.main()


def test_specs_split_at_the_last_equals_and_option_names_at_the_first(select_a7):
    """A path may hold '=' (its count never does); a YAML value may hold '=' (an option name never does)."""
    assert select_a7.key_value("--weight", "runs/a=b/x.jsonl=2", "SPEC=N", "x") == ("runs/a=b/x.jsonl", "2")
    assert select_a7.key_value("--train", "note=a=b", "KEY=VALUE", "x", key_is_spec=False) == ("note", "a=b")
    with pytest.raises(SystemExit, match=r"--weight 'x.jsonl': expected SPEC=N, e.g. bundled:c=2"):
        select_a7.key_value("--weight", "x.jsonl", "SPEC=N", "bundled:c=2")
