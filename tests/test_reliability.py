"""Reliability: nothing lost, nothing non-finite, nothing stale (docs/reliability.md).

Classes of failure, each with its negative paths: output claims (``--overwrite`` never touches an input, the
current directory or a folder sstmerge did not write, for every command), non-finite values (options, tables,
input configs, output dtype), concurrent writers, integrity of every cache (Fisher store/statistics/meta,
evaluation entries, stage folders of the grid, converted models), evaluation settings, names from configs,
signals and stale temp folders, the CLI's one error handler. The fault-injection tests at the end kill
(SIGKILL), terminate (SIGTERM), pause and size-limit real ``sst-merge`` processes at random points
(:mod:`tests.fault_runner`; the seed is printed and can be fixed with ``SSTMERGE_FAULT_SEED``).
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from sstmerge import (
    AdapterFormatError,
    AdapterMismatchError,
    ConfigError,
    NonFiniteError,
    OutputBusyError,
    OutputExistsError,
    UnsafeOutputError,
    merge_utility_safety,
)
from sstmerge.cli.main import cli, expand_greedy
from sstmerge.io.atomic import MARKER_NAME, OutputClaim, Terminated, atomic_output_dir, install_signal_handlers
from sstmerge.io.integrity import read_checked_json

from .conftest import TINY_TARGETS, make_adapter

REPO = Path(__file__).resolve().parents[1]


def cli_run(args, cwd: Path | None = None):
    old = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        return CliRunner().invoke(cli, expand_greedy(list(map(str, args))), catch_exceptions=False)
    finally:
        os.chdir(old)


def leftovers(folder: Path) -> list[str]:
    """Temp folders/files and lock files sstmerge left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith((".tmp-", ".old-")) or p.name.endswith("-lock"))


@pytest.fixture(scope="module")
def proj(tmp_path_factory, tiny_base):
    """A user's project folder: the base, a utility and a safety adapter, a data file."""
    root = tmp_path_factory.mktemp("proj")
    base = root / "base"
    shutil.copytree(tiny_base, base)
    make_adapter(base, root / "U", seed=11, targets=TINY_TARGETS)
    make_adapter(base, root / "S", seed=12, targets=TINY_TARGETS)
    shutil.copy(REPO / "src/sstmerge/data/bundled/benign_train.jsonl", root / "benign.jsonl")
    return root


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------ output claims
@pytest.mark.parametrize("out", ["{root}", "{root}/S", "{root}/U", "{root}/base", ".", "..", "{root}/benign.jsonl"])
def test_merge_never_replaces_an_input_or_the_working_directory(proj, out):
    before = snapshot(proj)
    cwd = proj / "U"  # "." and ".." are relative to a folder inside the project
    res = cli_run(["-q", "merge", "--base", proj / "base", "--utility", proj / "U", "--safety", proj / "S",
                   "--mode", "residual", "--benign-data", proj / "benign.jsonl", "--out", out.format(root=proj),
                   "--overwrite"], cwd=cwd)
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("error: ") and ("input of this run" in res.stderr or "current directory" in res.stderr)
    assert snapshot(proj) == before


def test_overwrite_replaces_only_folders_sstmerge_wrote(proj, tmp_path):
    args = ["-q", "merge", "--base", proj / "base", "--utility", proj / "U", "--safety", proj / "S"]
    user = tmp_path / "notes"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    res = cli_run(args + ["--out", user, "--overwrite"])
    assert res.exit_code == 2 and "sstmerge did not write it" in res.stderr
    assert (user / "thesis.tex").read_text() == "years of work"
    # a file, a symlink: refused
    (tmp_path / "file").write_text("x")
    assert "is a file" in cli_run(args + ["--out", tmp_path / "file", "--overwrite"]).stderr
    (tmp_path / "link").symlink_to(user)
    assert "symbolic link" in cli_run(args + ["--out", tmp_path / "link", "--overwrite"]).stderr
    # an sstmerge output is replaced; once a user adds a file to it, it is not
    out = tmp_path / "merged"
    assert cli_run(args + ["--out", out]).exit_code == 0
    assert cli_run(args + ["--out", out]).exit_code == 2  # exists, no --overwrite
    assert cli_run(args + ["--out", out, "--overwrite", "--safety-weight", "0.5"]).exit_code == 0
    assert json.loads((out / "merge_report.json").read_text())["config"]["safety_weight"] == 0.5
    (out / "my_eval.json").write_text("{}")
    res = cli_run(args + ["--out", out, "--overwrite"])
    assert res.exit_code == 2 and "my_eval.json" in res.stderr
    assert (out / "my_eval.json").exists()
    assert leftovers(tmp_path) == []


def test_home_and_root_are_refused(proj):
    for out in ("/", str(Path.home())):
        res = cli_run(["-q", "merge", "--base", proj / "base", "--utility", proj / "U", "--out", out, "--overwrite"])
        assert res.exit_code == 2 and "refusing to write" in res.stderr


def test_train_eval_fisher_and_grid_follow_the_same_rules(proj, tmp_path, monkeypatch):
    before = snapshot(proj)
    base = proj / "base"
    # train: into its data file's folder / the base
    res = cli_run(["-q", "train", "--base", base, "--data", proj / "benign.jsonl", "--out", proj, "--overwrite",
                   "--steps", "1"])
    assert res.exit_code == 2 and "input of this run" in res.stderr
    res = cli_run(["-q", "train", "--base", base, "--data", proj / "benign.jsonl", "--out", base, "--overwrite",
                   "--steps", "1"])
    assert res.exit_code == 2 and "input of this run" in res.stderr
    # eval --out: an existing file needs --overwrite, and only sstmerge's results are replaced
    res = cli_run(["-q", "eval", "--base", base, "--suite", "overrefusal", "--out", proj / "U" / "adapter_config.json",
                   "--overwrite", "--limit", "1"])
    assert res.exit_code == 2 and "not a results file written by sstmerge" in res.stderr
    res = cli_run(["-q", "eval", "--base", base, "--suite", "overrefusal", "--data", proj / "benign.jsonl",
                   "--out", proj / "benign.jsonl", "--overwrite", "--limit", "1"])
    assert res.exit_code == 2 and "input of this run" in res.stderr
    # fisher --out
    res = cli_run(["-q", "fisher", "--base", base, "--safety", proj / "S", "--out", proj, "--overwrite"])
    assert res.exit_code == 2 and "input of this run" in res.stderr
    # tiny-model into the working directory
    res = cli_run(["tiny-model", "."], cwd=proj / "U")
    assert res.exit_code == 2 and "current directory" in res.stderr
    # experiments: the working directory, a folder holding the config's data, a user folder
    cfg = tmp_path / "grid.yaml"
    cfg.write_text(yaml.safe_dump({"base": str(base), "adapters": {"u": {"data": [str(proj / "benign.jsonl")]}},
                                   "safety": "u", "variants": {"v": ["u"]}}))
    res = cli_run(["experiments", "--config", cfg, "--out", "."], cwd=proj / "U")
    assert res.exit_code == 2 and "current directory" in res.stderr
    res = cli_run(["experiments", "--config", cfg, "--out", proj])
    assert res.exit_code == 2 and "input of this run" in res.stderr
    user = tmp_path / "documents"
    user.mkdir()
    (user / "cv.pdf").write_text("x")
    res = cli_run(["experiments", "--config", cfg, "--out", user])
    assert res.exit_code == 2 and "not an experiment folder" in res.stderr
    assert snapshot(proj) == before


def test_concurrent_claims_of_one_output_fail_fast(tmp_path):
    out = tmp_path / "m"
    with OutputClaim(out, kind="test") as first:
        with pytest.raises(OutputBusyError, match="another sstmerge process"):
            with OutputClaim(out, kind="test"):
                pass
        with first.write() as tmp:
            (tmp / "a.txt").write_text("first")
    # a second writer that checked before the first committed cannot replace its result
    late = OutputClaim(tmp_path / "n", kind="test")
    with atomic_output_dir(tmp_path / "n") as tmp:
        (tmp / "a.txt").write_text("winner")
    with pytest.raises(OutputExistsError):
        with late, late.write() as tmp:
            (tmp / "a.txt").write_text("loser")
    assert (tmp_path / "n" / "a.txt").read_text() == "winner"
    assert (out / "a.txt").read_text() == "first" and MARKER_NAME in os.listdir(out)
    assert leftovers(tmp_path) == []


def test_concurrent_grids_and_eval_results_fail_fast(tmp_path):
    from sstmerge.io.atomic import atomic_output_file, lock_path
    from sstmerge.io.locking import PathLock
    from sstmerge.pipeline.experiments import claim_run_folder

    with claim_run_folder(tmp_path / "grid", []):
        with pytest.raises(OutputBusyError):
            with claim_run_folder(tmp_path / "grid", []):
                pass
    with claim_run_folder(tmp_path / "grid", []):  # reusable once released
        pass
    dest = tmp_path / "r.json"
    with PathLock(lock_path(dest)):
        with pytest.raises(OutputBusyError):
            atomic_output_file(dest, "{}")
    assert not dest.exists()


def test_stale_temp_folders_of_killed_runs_are_removed_on_the_next_claim(proj, tmp_path):
    stale = tmp_path / ".tmp-merged-sstmerge-abcd1234"
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"\0" * 1000)
    other = tmp_path / ".tmp-other-sstmerge-abcd1234"  # another destination's: not ours to remove
    other.mkdir()
    merge_utility_safety(proj / "base", [proj / "U"], None, tmp_path / "merged", stream=True)
    assert not stale.exists() and other.exists()


def test_sigterm_removes_the_temp_folder(tmp_path):
    previous = signal.getsignal(signal.SIGTERM)
    install_signal_handlers()
    try:
        with pytest.raises(Terminated):
            with atomic_output_dir(tmp_path / "out") as tmp:
                (tmp / "partial").write_text("x")
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(10**6):  # the handler raises at the next bytecode
                    pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------ finite values
BAD_NUMBERS = ["nan", "inf", "-inf"]


@pytest.mark.parametrize("mode, flag", [("direct", "--safety-weight"), ("direct", "--utility-weights"),
                                        ("residual", "--residual-ratio"), ("residual", "--damping"),
                                        ("ties", "--density"), ("safe_lora", "--similarity-threshold"),
                                        ("safemerge", "--safemerge-alpha")])
@pytest.mark.parametrize("value", BAD_NUMBERS)
def test_non_finite_options_are_rejected_at_parse_time(proj, tmp_path, mode, flag, value):
    res = cli_run(["-q", "merge", "--base", proj / "base", "--utility", proj / "U", "--safety", proj / "S",
                   "--mode", mode, flag, value, "--out", tmp_path / "m"])
    assert res.exit_code == 2 and "finite number" in res.stderr, res.stderr
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("options", [
    {"utility_weights": [1e39]},
    {"safety_weight": 1e39},
    {"dtype": "float16", "safety_weight": 1e6},
    {"mode": "ties", "safety_weight": 1e45},
])
def test_merges_that_overflow_are_never_written(proj, tmp_path, options, stream):
    out = tmp_path / "m"
    with pytest.raises(NonFiniteError, match="nothing was written"):
        merge_utility_safety(proj / "base", [proj / "U"], proj / "S", out, stream=stream, **options)
    assert not out.exists() and leftovers(tmp_path) == []
    # the check is on values: a large but representable merge is written
    merge_utility_safety(proj / "base", [proj / "U"], proj / "S", out, stream=stream,
                         **{**options, **{k: [1e3] if k == "utility_weights" else 1e3 for k in options
                                          if k in ("utility_weights", "safety_weight")}})
    assert (out / "adapter_model.safetensors").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("text, needle", [
    ("q_proj: .nan\ndefault: 1.0\n", "finite"),
    ("q_proj: .inf\ndefault: 1.0\n", "finite"),
    ("q_prj: 0.5\ndefault: 1.0\n", "Did you mean 'q_proj'"),
])
@pytest.mark.parametrize("which", ["layer_weights", "preset"])
def test_tables_reject_non_finite_values_and_unknown_module_types(proj, tmp_path, text, needle, which):
    table = tmp_path / "table.yaml"
    table.write_text(text)
    options = {"layer_weights": str(table)} if which == "layer_weights" else {"mode": "layerwise", "preset": str(table)}
    with pytest.raises(ConfigError, match=needle):
        merge_utility_safety(proj / "base", [proj / "U"], proj / "S", tmp_path / "m", **options)


@pytest.mark.parametrize("key, value, needle", [
    ("lora_alpha", float("inf"), "positive finite number"),
    ("lora_alpha", float("nan"), "positive finite number"),
    ("r", 4.5, "whole number"),
    ("alpha_pattern", {"q_proj": float("inf")}, "positive finite number"),
    ("rank_pattern", {"q_proj": 2.5}, "whole number"),
    ("rank_pattern", ["q_proj"], "mapping"),
])
def test_adapter_configs_with_non_finite_or_fractional_values_are_refused(proj, tmp_path, key, value, needle):
    bad = tmp_path / "bad"
    shutil.copytree(proj / "U", bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    config[key] = value
    (bad / "adapter_config.json").write_text(json.dumps(config))  # json writes Infinity / NaN as Python does
    with pytest.raises(AdapterFormatError, match=needle):
        merge_utility_safety(proj / "base", [bad], None, tmp_path / "m")


def test_recompress_rank_is_capped_at_the_full_rank(proj, tmp_path):
    result = merge_utility_safety(proj / "base", [proj / "U"], proj / "S", tmp_path / "m", recompress_rank=100000)
    hidden = 32  # the tiny Llama's largest min(d_out, d_in)
    assert result.report["output"]["rank"] <= hidden
    assert result.report["config"]["recompress_rank"] == hidden
    assert any("exceeds the full rank" in w for w in result.report["warnings"])
    assert (tmp_path / "m" / "adapter_model.safetensors").stat().st_size < 200_000


def test_merge_config_yaml_reruns_from_another_directory(proj, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(proj / "U", work / "U")
    assert cli_run(["-q", "merge", "--base", proj / "base", "--utility", "U", "--out", "m"], cwd=work).exit_code == 0
    config = yaml.safe_load((work / "m" / "merge_config.yaml").read_text())
    assert config["utility"] == [str(work / "U")]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = cli_run(["-q", "merge", "--config", work / "m" / "merge_config.yaml", "--out", "again"], cwd=elsewhere)
    assert res.exit_code == 0, res.output
    assert load_file(elsewhere / "again" / "adapter_model.safetensors").keys() == \
        load_file(work / "m" / "adapter_model.safetensors").keys()


def test_fisher_command_takes_the_flags_its_errors_recommend(proj, tmp_path):
    res = cli_run(["-q", "fisher", "--base", proj / "base", "--safety", proj / "S", "--allow-pickle",
                   "--max-samples", "2", "--cache-dir", tmp_path / "c", "--out", tmp_path / "rep"])
    assert res.exit_code == 0, res.output
    res = cli_run(["-q", "fisher", "--base", proj / "base", "--safety", proj / "S", "--max-samples", "2",
                   "--cache-dir", tmp_path / "c", "--out", tmp_path / "rep"])
    assert res.exit_code == 2 and "--overwrite" in res.stderr
    res = cli_run(["-q", "fisher", "--base", proj / "base", "--safety", proj / "S", "--max-samples", "2",
                   "--cache-dir", tmp_path / "c", "--out", tmp_path / "rep", "--overwrite"])
    assert res.exit_code == 0, res.output


# ------------------------------------------------------------------------------------ the CLI's error handler
@pytest.mark.parametrize("err, needle", [
    (errno.ENOSPC, "disk is full"),
    (errno.EFBIG, "file-size limit"),
    (errno.EACCES, "permission denied"),
])
def test_os_errors_while_writing_become_error_lines(proj, tmp_path, monkeypatch, err, needle):
    import sstmerge.io.adapter as adapter_io

    def fail(self, *args, **kwargs):  # what the kernel answers when the disk fills up mid-write
        raise OSError(err, os.strerror(err), str(self.path))

    monkeypatch.setattr(adapter_io.AdapterStreamWriter, "write_module", fail)
    res = cli_run(["-q", "merge", "--base", proj / "base", "--utility", proj / "U", "--out", tmp_path / "m"])
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("error: ") and needle in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "m").exists() and leftovers(tmp_path) == []


def test_hostile_pickled_base_is_an_error_line(proj, tmp_path):
    base = tmp_path / "pbase"
    shutil.copytree(proj / "base", base)
    (base / "model.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'PWNED'}",))

    torch.save({"x": Payload()}, base / "pytorch_model.bin")
    res = cli_run(["-q", "merge", "--base", base, "--utility", proj / "U", "--safety", proj / "S", "--mode", "residual",
                   "--max-samples", "2", "--out", tmp_path / "m", "--cache-dir", tmp_path / "c"])
    assert res.exit_code == 2 and "refused to unpickle" in res.stderr
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "m").exists()


def test_a_base_without_tokenizer_is_an_error_line(proj, tmp_path):
    from sstmerge.io.models import build_tiny_llama

    base = build_tiny_llama(tmp_path / "notok", with_tokenizer=False)
    res = cli_run(["-q", "train", "--base", base, "--data", "bundled:benign_train", "--out", tmp_path / "a",
                   "--steps", "1"])
    assert res.exit_code == 2 and "tokenizer" in res.stderr and not (tmp_path / "a").exists()
    res = cli_run(["-q", "merge", "--base", base, "--utility", proj / "U", "--safety", proj / "S", "--mode", "residual",
                   "--max-samples", "2", "--out", tmp_path / "m", "--cache-dir", tmp_path / "c"])
    assert res.exit_code == 2 and "tokenizer" in res.stderr and not (tmp_path / "m").exists()


# ------------------------------------------------------------------------------------ evaluation settings
@pytest.mark.parametrize("flag, value", [("--limit", "0"), ("--limit", "-1"), ("--batch-size", "0"),
                                         ("--max-new-tokens", "0"), ("--shots", "-1"), ("--templates-per-prompt", "0")])
def test_eval_rejects_settings_that_would_give_wrong_answers(proj, tmp_path, flag, value):
    res = cli_run(["-q", "eval", "--base", proj / "base", "--suite", "jailbreak", flag, value, "--out", tmp_path / "r.json"])
    assert res.exit_code == 2 and res.stderr.startswith("error: ") and "whole number" in res.stderr
    assert not (tmp_path / "r.json").exists()


def test_eval_refuses_more_shots_than_exemplars(proj, tmp_path):
    res = cli_run(["-q", "eval", "--base", proj / "base", "--suite", "mcq", "--shots", "50", "--out", tmp_path / "r.json"])
    assert res.exit_code == 2 and "exemplars" in res.stderr and not (tmp_path / "r.json").exists()


def test_a_damping_too_small_for_float64_is_an_error_line(proj, tmp_path):
    res = cli_run(["-q", "merge", "--base", proj / "base", "--utility", proj / "U", "--safety", proj / "S",
                   "--mode", "residual", "--max-samples", "2", "--damping", "1e-300", "--out", tmp_path / "m",
                   "--cache-dir", tmp_path / "c"])
    assert res.exit_code == 2 and "larger --damping" in res.stderr and not (tmp_path / "m").exists()


def test_eval_checks_the_adapter_against_the_base(proj, tmp_path):
    from sstmerge.eval.runner import evaluate
    from sstmerge.io.models import build_tiny_llama

    bigger = build_tiny_llama(tmp_path / "big", hidden_size=48, intermediate_size=96)
    with pytest.raises(AdapterMismatchError, match="another model size"):
        evaluate(str(bigger), ["overrefusal"], adapter=str(proj / "U"), cache_dir=tmp_path / "c")
    deeper = make_adapter(build_tiny_llama(tmp_path / "deep", num_hidden_layers=3), tmp_path / "A3", seed=3,
                          targets=("q_proj",))
    with pytest.raises(AdapterMismatchError, match="does not exist"):
        evaluate(str(proj / "base"), ["overrefusal"], adapter=str(deeper), cache_dir=tmp_path / "c")


# ------------------------------------------------------------------------------------ cache integrity
def _fisher_merge(proj, cache, out, **kw):
    kw = {"mode": "residual", "k": 2, **kw}
    return merge_utility_safety(proj / "base", [proj / "U"], proj / "S", out, max_samples=4, fisher_batch_size=4,
                                cache_dir=cache, **kw)


def _entry(cache: Path) -> Path:
    (entry,) = [p for p in (cache / "fisher").iterdir() if p.is_dir()]
    return entry


def _corrupt_rows(entry: Path) -> None:
    store = json.loads((entry / "store.json").read_text())
    with open(entry / "grads.f32", "r+b") as fh:  # NaN bytes into row 1
        fh.seek(1 * store["dim"] * 4 + 8)
        fh.write(np.full(4, np.nan, dtype=np.float32).tobytes())


def _flip(path: Path, offset_from_end: int = 16) -> None:
    with open(path, "r+b") as fh:
        fh.seek(-offset_from_end, os.SEEK_END)
        b = fh.read(1)
        fh.seek(-offset_from_end, os.SEEK_END)
        fh.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize("damage", ["nan_rows", "done_flag", "gram", "summary_truncated", "meta_edited", "meta_empty",
                                    "store_json", "crc_truncated"])
def test_damaged_fisher_cache_is_detected_repaired_and_gives_the_clean_result(proj, tmp_path, damage, caplog):
    # the per-module scope reads the per-module Gram blocks (the global scope needs only their sum, in the summary)
    options = {"scope": "per_module", "k": 1} if damage == "gram" else {}
    clean = _fisher_merge(proj, tmp_path / "c", tmp_path / "clean", **options)
    entry = _entry(tmp_path / "c")
    if damage == "nan_rows":
        _corrupt_rows(entry)
    elif damage == "done_flag":  # a row marked done that holds other data
        store = json.loads((entry / "store.json").read_text())
        with open(entry / "grads.f32", "r+b") as fh:
            fh.seek(2 * store["dim"] * 4)
            fh.write(bytes(64))
    elif damage == "gram":
        _flip(entry / "stats" / "gram.npy")
    elif damage == "summary_truncated":
        p = entry / "stats" / "summary.safetensors"
        p.write_bytes(p.read_bytes()[:100])
    elif damage == "meta_edited":
        meta = json.loads((entry / "fisher_meta.json").read_text())
        meta["payload"]["n_harm"] = 3
        (entry / "fisher_meta.json").write_text(json.dumps(meta))
    elif damage == "meta_empty":
        (entry / "fisher_meta.json").write_text("")
    elif damage == "store_json":
        (entry / "store.json").write_text("{not json")
    elif damage == "crc_truncated":
        p = entry / "crc.u32"
        p.write_bytes(p.read_bytes()[:8])
    caplog.set_level("WARNING")
    again = _fisher_merge(proj, tmp_path / "c", tmp_path / "again", **options)
    assert "damaged" in caplog.text and again.report["method"]["fisher"]["cache_hit"] in (True, False)
    a = load_file(tmp_path / "clean" / "adapter_model.safetensors")
    b = load_file(tmp_path / "again" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
    assert clean.report["method"]["fisher"]["cache_hit"] is False
    # the entry is whole again: the next run is a verified cache hit
    third = _fisher_merge(proj, tmp_path / "c", tmp_path / "third", **options)
    assert third.report["method"]["fisher"]["cache_hit"] is True
    assert leftovers(entry) == [] and leftovers(entry / "stats") == []


@pytest.mark.parametrize("damage", ["sketch_rows", "weighted_result", "weighted_part"])
def test_damaged_sketch_store_or_weighted_pass_is_repaired_and_gives_the_clean_result(proj, tmp_path, damage, caplog):
    """The sketch store (issue #16): damaged sketch rows are found by their CRCs and recomputed; a damaged
    weighted-pass result is rebuilt from its parts, a damaged part's rows are summed again."""
    options = {"fisher_store": "sketch", "sketch_dim": 64}
    clean = _fisher_merge(proj, tmp_path / "c", tmp_path / "clean", **options)
    entry = _entry(tmp_path / "c")
    (weighted,) = list((entry / "weighted").iterdir())
    if damage == "sketch_rows":
        store = json.loads((entry / "sketch" / "store.json").read_text())
        with open(entry / "sketch" / "grads.bf16", "r+b") as fh:  # bytes into row 1
            fh.seek(1 * store["dim"] * 2 + 8)
            fh.write(bytes([0x7F, 0xC0] * 4))
    elif damage == "weighted_result":
        _flip(weighted / "result.safetensors")
    else:
        (weighted / "result.safetensors").unlink()
        (part,) = list(weighted.glob("part-*.safetensors"))
        part.write_bytes(part.read_bytes()[:-7])
    caplog.set_level("WARNING")
    again = _fisher_merge(proj, tmp_path / "c", tmp_path / "again", **options)
    assert "damaged" in caplog.text and again.report["method"]["fisher"]["store"]["kind"] == "sketch"
    a = load_file(tmp_path / "clean" / "adapter_model.safetensors")
    b = load_file(tmp_path / "again" / "adapter_model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    assert clean.report["method"]["fisher"]["store"]["kind"] == "sketch"
    third = _fisher_merge(proj, tmp_path / "c", tmp_path / "third", **options)
    assert third.report["method"]["fisher"]["cache_hit"] is True


def test_fisher_cache_damaged_beyond_repair_names_the_folder_to_delete(proj, tmp_path, monkeypatch):
    import sstmerge.fisher.run as fisher_run

    _fisher_merge(proj, tmp_path / "c", tmp_path / "clean")
    entry = _entry(tmp_path / "c")
    monkeypatch.setattr(fisher_run, "discard_damaged", lambda *a, **k: None)  # repair has no effect
    (entry / "fisher_meta.json").write_text("")
    with pytest.raises(Exception, match=f"delete.*{entry.name}|{entry.name}.*delete"):
        _fisher_merge(proj, tmp_path / "c", tmp_path / "again")
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("damage", ["truncated", "empty", "edited", "old_format", "not_json"])
def test_damaged_eval_cache_entries_are_recomputed(proj, tmp_path, damage, caplog):
    from sstmerge.eval.runner import evaluate
    from sstmerge.eval.suites import EvalSettings

    settings = EvalSettings(max_new_tokens=3, limit=3, batch_size=4)
    first = evaluate(str(proj / "base"), ["overrefusal"], adapter=str(proj / "U"), settings=settings,
                     cache_dir=tmp_path / "c")
    (entry,) = (tmp_path / "c" / "eval").glob("*.json")
    text = entry.read_text()
    if damage == "truncated":
        entry.write_text(text[: len(text) // 2])
    elif damage == "empty":
        entry.write_text("")
    elif damage == "edited":
        data = json.loads(text)
        data["payload"]["metrics"]["overrefusal_rate[keyword]"] = 0.999
        entry.write_text(json.dumps(data))
    elif damage == "old_format":
        entry.write_text(json.dumps(json.loads(text)["payload"]))
    else:
        entry.write_bytes(b"\x00\xff" * 10)
    caplog.set_level("WARNING")
    second = evaluate(str(proj / "base"), ["overrefusal"], adapter=str(proj / "U"), settings=settings,
                      cache_dir=tmp_path / "c")
    assert "damaged evaluation cache entry" in caplog.text
    assert second["suites"]["overrefusal"]["cache_hit"] is False
    assert second["suites"]["overrefusal"]["metrics"] == first["suites"]["overrefusal"]["metrics"]
    third = evaluate(str(proj / "base"), ["overrefusal"], adapter=str(proj / "U"), settings=settings,
                     cache_dir=tmp_path / "c")
    assert third["suites"]["overrefusal"]["cache_hit"] is True
    assert read_checked_json(entry)["metrics"] == first["suites"]["overrefusal"]["metrics"]


def test_base_weights_in_pickle_files_are_part_of_the_cache_key(proj, tmp_path):
    from sstmerge.io.hashing import model_files

    base = tmp_path / "b"
    shutil.copytree(proj / "base", base)
    (base / "pytorch_model.bin").write_bytes(b"x")
    assert base / "pytorch_model.bin" in model_files(base)


def test_grid_reuses_stage_folders_only_when_intact(proj, tmp_path, caplog):
    from sstmerge.pipeline.stages import reusable_stage as _reusable

    out = tmp_path / "m"
    merge_utility_safety(proj / "base", [proj / "U"], proj / "S", out)
    assert _reusable(out, "merge_report.json")
    _flip(out / "adapter_model.safetensors", 8)
    caplog.set_level("WARNING")
    assert not _reusable(out, "merge_report.json") and "damaged" in caplog.text


def test_converted_model_cache_is_verified(tmp_path):
    from sstmerge.io.integrity import file_digest
    from sstmerge.io.models import _conversion_intact

    folder = tmp_path / "SmolLM2"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights" * 100)
    (folder / "sstmerge_source.json").write_text(json.dumps({"files": {"model.safetensors":
                                                                       file_digest(folder / "model.safetensors")}}))
    assert _conversion_intact(folder)
    (folder / "model.safetensors").write_bytes(b"weightz" * 100)
    assert not _conversion_intact(folder)
    (folder / "sstmerge_source.json").write_text("{}")
    assert not _conversion_intact(folder)


# ------------------------------------------------------------------------------------ names from configs
@pytest.mark.parametrize("where", ["adapter", "variant", "grid"])
@pytest.mark.parametrize("name", ["../../escape", "/abs/path", "a/b", "..", ".hidden", ""])
def test_names_in_experiment_configs_must_be_simple(tmp_path, where, name):
    from sstmerge.pipeline.experiments import load_experiment_config

    adapters = {"s": {"data": ["bundled:harmful_train"]}, "u": {"data": ["bundled:benign_train"]}}
    cfg = {"adapters": adapters, "safety": "s", "variants": {"v": ["u"]},
           "grid": [{"name": "direct", "mode": "direct"}]}
    if where == "adapter":
        cfg["adapters"][name] = cfg["adapters"].pop("u")
        cfg["variants"] = {"v": [name]}
    elif where == "variant":
        cfg["variants"] = {name: ["u"]}
    else:
        cfg["grid"] = [{"name": name, "mode": "direct"}]
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="simple name"):
        load_experiment_config(path)


def test_every_stage_path_stays_under_out(tmp_path):
    from sstmerge.io.atomic import ensure_within

    assert ensure_within(tmp_path / "adapters" / "x", tmp_path) == (tmp_path / "adapters" / "x").resolve()
    for bad in (tmp_path / ".." / "x", Path("/etc/x"), tmp_path):
        with pytest.raises(UnsafeOutputError):
            ensure_within(bad, tmp_path)


# ------------------------------------------------------------------------------------ fault injection
FAULT_SEED = int(os.environ.get("SSTMERGE_FAULT_SEED") or random.SystemRandom().randrange(10**6))


@pytest.fixture(scope="module")
def faults(proj, tmp_path_factory):
    """Run every fault scenario in one runner process (one import of torch/transformers/peft); returns the
    plan's folders and the runs' results."""
    rng = random.Random(FAULT_SEED)
    root = tmp_path_factory.mktemp("faults")
    base, U, S = proj / "base", proj / "U", proj / "S"
    merge = ["-q", "merge", "--base", base, "--utility", U, "--safety", S]
    fisher = ["-q", "fisher", "--base", base, "--safety", S, "--utility", U, "--fisher-batch-size", "2"]
    ev = ["-q", "eval", "--base", base, "--adapter", U, "--suite", "overrefusal", "--limit", "4",
          "--max-new-tokens", "3", "--batch-size", "2"]
    n_modules = len(TINY_TARGETS) * 2
    points = {"merge_kill": rng.randint(1, n_modules), "merge_term": rng.randint(1, n_modules),
              "replace_term": rng.randint(1, n_modules), "fisher_kill": rng.randint(9, 16),
              "stats_term": rng.randint(1, n_modules)}
    # an earlier output that a terminated --overwrite run must leave intact
    merge_utility_safety(base, [U], None, root / "old")
    old_bytes = snapshot(root / "old")

    def fault(target, after, action):
        return {"target": target, "after": after, "action": action}

    write_module = "sstmerge.io.adapter:AdapterStreamWriter.write_module"
    plan = {
        "merge_kill": [{"argv": merge + ["--out", root / "a"], "fault": fault(write_module, points["merge_kill"], "KILL")}],
        "merge_term": [{"argv": merge + ["--out", root / "b"], "fault": fault(write_module, points["merge_term"], "TERM")}],
        "nostream_kill": [{"argv": merge + ["--no-stream", "--out", root / "c"],
                           "fault": fault("sstmerge.io.adapter:save_file", 1, "KILL")}],
        "replace_term": [{"argv": merge + ["--out", root / "old", "--overwrite", "--safety-weight", "0.3"],
                          "fault": fault(write_module, points["replace_term"], "TERM")}],
        "fisher_kill": [{"argv": fisher + ["--max-samples", "16", "--cache-dir", root / "fk"],
                         "fault": fault("sstmerge.fisher.store:GradientStore.write_rows", points["fisher_kill"], "KILL")}],
        "stats_term": [{"argv": fisher + ["--max-samples", "3", "--cache-dir", root / "st"],
                        "fault": fault("sstmerge.fisher.stats:StatsWriter.write", points["stats_term"], "TERM")}],
        "eval_kill_in_cache_write": [{"argv": ev + ["--cache-dir", root / "ek", "--out", root / "ek.json"],
                                      "fault": fault("os:fsync", 1, "KILL")}],
        "eval_term": [{"argv": ev + ["--cache-dir", root / "et", "--out", root / "et.json"],
                       "fault": fault("sstmerge.eval.suites:generate", 1, "TERM")}],
        "concurrent_merge": [
            {"argv": merge + ["--out", root / "same"], "fault": fault(write_module, 1, "SLEEP:4")},
            {"argv": merge + ["--out", root / "same"], "delay": 2.0},
        ],
        "concurrent_fisher": [
            {"argv": fisher + ["--max-samples", "3", "--cache-dir", root / "cf"]},
            {"argv": fisher + ["--max-samples", "3", "--cache-dir", root / "cf"], "delay": 0.3},
        ],
        "ulimit_merge": [{"argv": merge + ["--out", root / "u"], "fsize_limit": 6000}],
        "ulimit_fisher": [{"argv": fisher + ["--max-samples", "3", "--cache-dir", root / "uf"], "fsize_limit": 20000}],
    }
    names = list(plan)
    plan_file, results_file = root / "plan.json", root / "results.json"
    plan_file.write_text(json.dumps([[{**r, "argv": [str(a) for a in r["argv"]]} for r in plan[n]] for n in names]))
    env = dict(os.environ, OMP_NUM_THREADS="1", SSTMERGE_QUIET="1", PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("fault_runner.py")), str(plan_file),
                           str(results_file)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = dict(zip(names, json.loads(results_file.read_text())))
    print(f"fault-injection seed {FAULT_SEED} (SSTMERGE_FAULT_SEED={FAULT_SEED} reproduces it); points {points}")
    return {"root": root, "results": results, "points": points, "old_bytes": old_bytes}


def _why(faults, name) -> str:
    return f"seed {FAULT_SEED}, points {faults['points']}: {json.dumps(faults['results'][name])[-3000:]}"


def test_killed_merge_leaves_nothing_at_out_and_the_next_run_cleans_up(faults, proj):
    root, r = faults["root"], faults["results"]
    assert r["merge_kill"][0]["code"] == -signal.SIGKILL, _why(faults, "merge_kill")
    assert not (root / "a").exists()
    assert [p for p in os.listdir(root) if p.startswith(".tmp-a-")], "SIGKILL leaves its temp folder (cleaned below)"
    assert r["nostream_kill"][0]["code"] == -signal.SIGKILL and not (root / "c").exists()
    merge_utility_safety(proj / "base", [proj / "U"], proj / "S", root / "a", stream=True)
    assert not [p for p in os.listdir(root) if p.startswith(".tmp-a-")] and (root / "a" / MARKER_NAME).exists()


def test_terminated_merge_removes_its_temp_folder_and_keeps_the_old_output(faults):
    root, r = faults["root"], faults["results"]
    for name in ("merge_term", "replace_term"):
        assert r[name][0]["code"] == 128 + signal.SIGTERM, _why(faults, name)
        assert "terminated by signal" in r[name][0]["stderr"]
    assert not (root / "b").exists()
    assert snapshot(root / "old") == faults["old_bytes"]
    assert not [p for p in os.listdir(root) if p.startswith((".tmp-b-", ".tmp-old-", ".old-", ".b.", ".old."))]


def test_killed_fisher_pass_resumes_to_the_uninterrupted_result(faults, proj, tmp_path):
    from sstmerge.fisher.run import FisherSettings, compute_fisher
    from sstmerge.io.adapter import read_adapter
    from sstmerge.io.models import load_base_info

    root, r = faults["root"], faults["results"]
    assert r["fisher_kill"][0]["code"] == -signal.SIGKILL, _why(faults, "fisher_kill")
    base, u, s = load_base_info(proj / "base"), [read_adapter(proj / "U")], read_adapter(proj / "S")
    settings = FisherSettings(max_samples=16, batch_size=2)
    resumed = compute_fisher(base, u, [1.0], s, settings, root / "fk")
    assert resumed.meta["cache_hit"] is False and resumed.meta["resumed_from"] == 16  # one checkpoint of 16 rows
    fresh = compute_fisher(base, u, [1.0], s, settings, tmp_path / "fresh")
    np.testing.assert_allclose(resumed.stats.gram_total, fresh.stats.gram_total, rtol=1e-6)
    # terminated during the statistics: the rerun finishes them, same numbers
    assert r["stats_term"][0]["code"] == 128 + signal.SIGTERM, _why(faults, "stats_term")
    settings3 = FisherSettings(max_samples=3, batch_size=2)
    again = compute_fisher(base, u, [1.0], s, settings3, root / "st")
    fresh3 = compute_fisher(base, u, [1.0], s, settings3, tmp_path / "fresh3")
    np.testing.assert_allclose(again.stats.gram_total, fresh3.stats.gram_total, rtol=1e-6)
    assert leftovers(again.folder) == [] and leftovers(again.folder / "stats") == []


def test_killed_or_terminated_eval_leaves_no_entry_and_the_rerun_cleans_up(faults, proj):
    from sstmerge.eval.runner import evaluate
    from sstmerge.eval.suites import EvalSettings

    root, r = faults["root"], faults["results"]
    assert r["eval_kill_in_cache_write"][0]["code"] == -signal.SIGKILL, _why(faults, "eval_kill_in_cache_write")
    assert r["eval_term"][0]["code"] == 128 + signal.SIGTERM, _why(faults, "eval_term")
    assert not list((root / "ek" / "eval").glob("*.json")) and list((root / "ek" / "eval").glob(".tmp-*"))
    assert not (root / "et" / "eval").exists() or not list((root / "et" / "eval").iterdir())
    assert not (root / "ek.json").exists() and not (root / "et.json").exists()
    # the same settings as the killed `sst-merge eval` (whose refusal suites stop answers once decided): same key
    settings = EvalSettings(max_new_tokens=3, limit=4, batch_size=2, stop_when_decided=True)
    out = evaluate(str(proj / "base"), ["overrefusal"], adapter=str(proj / "U"), settings=settings, cache_dir=root / "ek")
    assert out["suites"]["overrefusal"]["cache_hit"] is False
    assert not list((root / "ek" / "eval").glob(".tmp-*"))


def test_concurrent_writers_of_one_output_cannot_both_succeed(faults):
    root, r = faults["root"], faults["results"]
    codes = sorted(run["code"] for run in r["concurrent_merge"])
    assert codes == [0, 2], _why(faults, "concurrent_merge")
    loser = next(run for run in r["concurrent_merge"] if run["code"] == 2)
    assert "being written by another sstmerge process" in loser["stderr"]
    assert (root / "same" / "adapter_model.safetensors").exists()
    # two Fisher passes on one fresh cache key: one computes, the other waits and reuses it
    assert [run["code"] for run in r["concurrent_fisher"]] == [0, 0], _why(faults, "concurrent_fisher")
    assert sum("cache hit: True" in run["stdout"] for run in r["concurrent_fisher"]) == 1


def test_file_size_limit_is_an_error_line_and_leaves_nothing(faults):
    root, r = faults["root"], faults["results"]
    for name in ("ulimit_merge", "ulimit_fisher"):
        run = r[name][0]
        assert run["code"] == 2, _why(faults, name)
        assert run["stderr"].splitlines()[-1].startswith("error: ") and "ulimit -f" in run["stderr"]
        assert "Traceback" not in run["stderr"]
    assert not (root / "u").exists() and not [p for p in os.listdir(root) if p.startswith(".tmp-u-")]
