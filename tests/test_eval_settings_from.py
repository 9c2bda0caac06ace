"""``sst-merge eval --settings-from CONFIG``: an adapter scored with the settings an experiment's grid uses."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from sstmerge.cli.main import cli
from sstmerge.pipeline.config import load_experiment_config


@pytest.fixture
def captured(monkeypatch):
    """``evaluate`` replaced by a recorder of the settings it is given (no model is loaded)."""
    seen = {}

    def fake_evaluate(base, suites, *, settings, **kwargs):
        seen.update(settings)
        return {"suites": {}, "base": base}

    monkeypatch.setattr("sstmerge.eval.runner.evaluate", fake_evaluate)
    return seen


def _invoke(tmp_path, *argv):
    res = CliRunner().invoke(cli, ["eval", "--suite", "jailbreak", "--suite", "qa", "--suite", "overrefusal",
                                   "--out", str(tmp_path / "r.json"), *argv])
    return res


def test_settings_from_the_default_config_are_the_grids(tmp_path, captured):
    res = _invoke(tmp_path, "--settings-from", "default")
    assert res.exit_code == 0, res.output
    grid = load_experiment_config("default").eval
    for suite in ("jailbreak", "qa", "overrefusal"):
        assert captured[suite] == grid.settings(suite)
    # the grid's numbers, not the command's defaults (64 new tokens, every template, no decision cap)
    assert captured["jailbreak"].max_new_tokens == 32 and captured["jailbreak"].templates_per_prompt == 1
    assert captured["overrefusal"].decision_tokens == 16 and captured["qa"].max_new_tokens == 24
    assert json.loads((tmp_path / "r.json").read_text())["suites"] == {}


def test_explicit_flags_override_the_configs_settings(tmp_path, captured):
    res = _invoke(tmp_path, "--settings-from", "default", "--limit", "5", "--max-new-tokens", "48")
    assert res.exit_code == 0, res.output
    grid = load_experiment_config("default").eval
    assert captured["jailbreak"].limit == 5 and captured["qa"].limit == 5
    assert captured["jailbreak"].max_new_tokens == 48 and captured["qa"].max_new_tokens == 48
    assert captured["overrefusal"].decision_tokens == grid.settings("overrefusal").decision_tokens  # not given: kept


def test_without_settings_from_the_flags_decide(tmp_path, captured):
    res = _invoke(tmp_path)
    assert res.exit_code == 0, res.output
    assert captured["jailbreak"].max_new_tokens == 64 and captured["jailbreak"].templates_per_prompt is None


def test_settings_from_a_yaml_file_and_a_bad_name(tmp_path, captured):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("extends: default\neval:\n  max_new_tokens: {jailbreak: 12, qa: 10, overrefusal: 14}\n")
    res = _invoke(tmp_path, "--settings-from", str(cfg))
    assert res.exit_code == 0, res.output
    assert (captured["jailbreak"].max_new_tokens, captured["qa"].max_new_tokens) == (12, 10)
    captured.clear()
    (tmp_path / "r.json").unlink()
    res = _invoke(tmp_path, "--settings-from", "defualt")
    assert res.exit_code != 0 and not captured
    assert "defualt" in res.output and "default" in res.output
