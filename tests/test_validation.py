"""Every bad input is a clear, typed error naming the file/key/shape, and no output folder is left behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sstmerge import UnsafeOutputError
from sstmerge import (
    AdapterFormatError,
    AdapterMismatchError,
    ConfigError,
    ModelError,
    NonFiniteError,
    OutputExistsError,
    PickleRefusedError,
    UnsupportedAdapterError,
    merge_utility_safety,
    read_adapter,
)
from sstmerge.io.models import build_tiny_llama

from .conftest import make_adapter


def edit_config(adapter: Path, **changes) -> Path:
    path = adapter / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))
    return adapter


def edit_weights(adapter: Path, fn) -> Path:
    path = adapter / "adapter_model.safetensors"
    state = load_file(str(path))
    state = fn(state)
    save_file(state, str(path))
    return adapter


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith((".tmp-", ".old-"))]


@pytest.fixture
def good(adapter_factory):
    return adapter_factory(targets=("q_proj", "v_proj"))


def merge_fails(tiny_base, tmp_path, utility, safety, exc_type, *needles, **options):
    out = tmp_path / "out" / "merged"
    (tmp_path / "out").mkdir(exist_ok=True)
    with pytest.raises(exc_type) as info:
        merge_utility_safety(tiny_base, utility, safety, out, **options)
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    assert_nothing_written(out)
    return info.value


def test_dora_is_refused(tiny_base, tmp_path, good, adapter_factory):
    bad = edit_config(adapter_factory(), use_dora=True)
    merge_fails(tiny_base, tmp_path, [good], bad, UnsupportedAdapterError, "use_dora", "DoRA", str(bad.name))


def test_dora_magnitude_key_is_refused_even_if_config_lies(tiny_base, tmp_path, good, adapter_factory):
    def add_magnitude(state):
        state["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(32)
        return state

    bad = edit_weights(adapter_factory(), add_magnitude)
    merge_fails(tiny_base, tmp_path, [good], bad, UnsupportedAdapterError, "lora_magnitude_vector")


@pytest.mark.parametrize("changes,needle", [
    ({"peft_type": "IA3"}, "peft_type='IA3'"),
    ({"bias": "all"}, "bias='all'"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"lora_bias": True}, "lora_bias"),
])
def test_unsupported_variants(tiny_base, tmp_path, good, adapter_factory, changes, needle):
    bad = edit_config(adapter_factory(), **changes)
    merge_fails(tiny_base, tmp_path, [good, bad], None, UnsupportedAdapterError, needle)


def test_truncated_safetensors(tiny_base, tmp_path, good, adapter_factory):
    bad = adapter_factory()
    weights = bad / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    merge_fails(tiny_base, tmp_path, [good], bad, AdapterFormatError, "adapter_model.safetensors", "truncated")


def test_corrupt_config(tiny_base, tmp_path, good, adapter_factory):
    bad = adapter_factory()
    (bad / "adapter_config.json").write_text('{"r": 4, "lora_alpha": ')
    merge_fails(tiny_base, tmp_path, [good], bad, AdapterFormatError, "adapter_config.json", "not valid JSON")


def test_missing_weights_and_missing_folder(tiny_base, tmp_path, good, adapter_factory):
    bad = adapter_factory()
    (bad / "adapter_model.safetensors").unlink()
    merge_fails(tiny_base, tmp_path, [good], bad, AdapterFormatError, "no adapter_model.safetensors")
    merge_fails(tiny_base, tmp_path, [good], tmp_path / "nope", AdapterFormatError, "does not exist")


def test_missing_lora_B(tiny_base, tmp_path, good, adapter_factory):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    bad = edit_weights(adapter_factory(), lambda s: {k: v for k, v in s.items() if k != key})
    merge_fails(tiny_base, tmp_path, [good], bad, AdapterFormatError, "model.layers.0.self_attn.q_proj", "lora_B")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_values(tiny_base, tmp_path, good, adapter_factory, value):
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"

    def poison(state):
        state[key][0, 0] = value
        return state

    bad = edit_weights(adapter_factory(), poison)
    merge_fails(tiny_base, tmp_path, [good], bad, NonFiniteError, key, "NaN/Inf")


def test_rank_pattern_disagreeing_with_tensors(tiny_base, tmp_path, good, adapter_factory):
    bad = edit_config(adapter_factory(), rank_pattern={"model.layers.0.self_attn.q_proj": 2})
    merge_fails(tiny_base, tmp_path, [good], bad, AdapterFormatError, "model.layers.0.self_attn.q_proj", "rank 2")


def test_module_missing_from_base(tiny_base, tmp_path, good, adapter_factory):
    def rename(state):
        return {k.replace("layers.1.", "layers.7."): v for k, v in state.items()}

    bad = edit_weights(adapter_factory(), rename)
    err = merge_fails(tiny_base, tmp_path, [good], bad, AdapterMismatchError, "model.layers.7.self_attn.q_proj")
    assert "Did you mean" in str(err)


def test_shape_mismatch_names_both_shapes(tiny_base, tmp_path, good):
    other_base = build_tiny_llama(tmp_path / "wide", hidden_size=48, intermediate_size=64, seed=1)
    bad = make_adapter(other_base, tmp_path / "wide_adapter", seed=3)
    merge_fails(tiny_base, tmp_path, [good], bad, AdapterMismatchError, "48x48", "32x32", "wide_adapter")


def test_mismatched_base_name_is_a_warning(tiny_base, tmp_path, good, adapter_factory):
    other = adapter_factory(base_name="meta-llama/Llama-3.1-8B")
    result = merge_utility_safety(tiny_base, [good], other, tmp_path / "merged")
    assert any("meta-llama/Llama-3.1-8B" in w for w in result.report["warnings"])
    assert "Llama-3.1-8B" in (tmp_path / "merged" / "merge_report.txt").read_text()


def test_legacy_pickle_needs_opt_in(tiny_base, tmp_path, good, adapter_factory):
    src = adapter_factory()
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(src / "adapter_config.json", legacy / "adapter_config.json")
    torch.save(load_file(str(src / "adapter_model.safetensors")), legacy / "adapter.pt")
    merge_fails(tiny_base, tmp_path, [good], legacy / "adapter.pt", PickleRefusedError, "--allow-pickle", "adapter.pt")
    loaded = read_adapter(legacy / "adapter.pt", allow_pickle=True)
    reference = read_adapter(src)
    for name, lm in reference.modules.items():
        torch.testing.assert_close(loaded.modules[name].delta(), lm.delta())
    result = merge_utility_safety(tiny_base, [good], legacy / "adapter.pt", tmp_path / "merged", allow_pickle=True)
    assert result.report["output"]["n_modules"] == 4


class NotATensor:  # pickled objects are refused by weights_only=True
    pass


def test_pickle_with_objects_is_refused_even_with_opt_in(tiny_base, tmp_path, good, adapter_factory):
    legacy = tmp_path / "evil"
    legacy.mkdir()
    shutil.copy(adapter_factory() / "adapter_config.json", legacy / "adapter_config.json")
    torch.save({"x": NotATensor()}, legacy / "adapter.pt")
    merge_fails(tiny_base, tmp_path, [good], legacy / "adapter.pt", AdapterFormatError, "weights_only=True",
                allow_pickle=True)


def test_bad_options(tiny_base, tmp_path, good):
    merge_fails(tiny_base, tmp_path, [good], good, ConfigError, "Did you mean 'direct'", mode="dirct")
    merge_fails(tiny_base, tmp_path, [good], good, ConfigError, "utility_weights", utility_weights=[1.0, 2.0])
    merge_fails(tiny_base, tmp_path, [good], good, ConfigError, "residual_ratio", residual_ratio=1.5)
    merge_fails(tiny_base, tmp_path, [good], good, ConfigError, "Did you mean 'safety_weight'", safty_weight=1.0)


def test_existing_output_is_kept_unless_overwrite(tiny_base, tmp_path, good):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        merge_utility_safety(tiny_base, [good], None, out)
    assert (out / "keep.txt").read_text() == "precious"
    # --overwrite never deletes a folder that sstmerge did not write
    with pytest.raises(UnsafeOutputError, match="did not write"):
        merge_utility_safety(tiny_base, [good], None, out, overwrite=True)
    assert (out / "keep.txt").read_text() == "precious"
    # an earlier sstmerge output is replaced
    (out / "keep.txt").unlink()
    merge_utility_safety(tiny_base, [good], None, out, overwrite=True)
    merge_utility_safety(tiny_base, [good], good, out, overwrite=True)
    assert (out / "adapter_model.safetensors").exists() and (out / ".sstmerge-output.json").exists()


def test_crash_while_writing_leaves_nothing(tiny_base, tmp_path, good, monkeypatch):
    import sstmerge.io.adapter as adapter_io

    def boom(*args, **kwargs):
        raise KeyboardInterrupt("simulated crash during write")

    monkeypatch.setattr(adapter_io, "save_file", boom)
    out = tmp_path / "merged"
    with pytest.raises(KeyboardInterrupt):
        merge_utility_safety(tiny_base, [good], good, out, stream=False)  # the in-memory writer
    assert_nothing_written(out)


def test_unknown_base_alias(tmp_path, good):
    from sstmerge import ModelError

    with pytest.raises(ModelError, match="Did you mean 'smollm2'"):
        merge_utility_safety("smollm", [good], None, tmp_path / "x")


@pytest.mark.parametrize("recorded, spec, folder, same", [
    ("smollm2", "/cache/models/SmolLM2-135M-Instruct", "/cache/models/SmolLM2-135M-Instruct", True),  # alias recorded
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2", "/cache/models/SmolLM2-135M-Instruct", True),  # alias given
    ("smollm2", "smollm2", "/cache/models/SmolLM2-135M-Instruct", True),
    ("/elsewhere/SmolLM2-135M-Instruct/", "/cache/models/SmolLM2-135M-Instruct", "/cache/models/SmolLM2-135M-Instruct", True),
    ("smollm2", "/models/Llama-3.1-8B", "/models/Llama-3.1-8B", False),
    ("meta-llama/Llama-3.1-8B", "smollm2", "/cache/models/SmolLM2-135M-Instruct", False),
])
def test_a_recorded_alias_names_the_base_it_stands_for(recorded, spec, folder, same):
    from sstmerge.io.models import BaseModelInfo
    from sstmerge.io.validate import _same_base

    base = BaseModelInfo(spec=spec, path=Path(folder), config={}, linear_shapes={}, param_shapes={})
    assert _same_base(recorded, base) is same


def test_an_adapter_given_twice_is_a_warning_not_a_silent_double(tiny_base, tmp_path, good, adapter_factory):
    """Listing one folder twice is legal (its update is added twice, as the warning says) but almost always a slip."""
    safety = adapter_factory()
    twice = merge_utility_safety(tiny_base, [good, tmp_path / ".." / tmp_path.name / good.name], safety)
    assert [w for w in twice.report["warnings"] if "given twice as a utility adapter" in w and good.name in w]
    both = merge_utility_safety(tiny_base, [good], good)
    assert [w for w in both.report["warnings"] if "both a utility adapter and the safety adapter" in w]
    apart = merge_utility_safety(tiny_base, [good], safety)
    assert not [w for w in apart.report["warnings"] if "twice" in w or "both a utility" in w]


@pytest.mark.parametrize("damage, needle", [
    (lambda d: (d / "config.json").write_text("{"), "config.json cannot be read as JSON"),
    (lambda d: (d / "model.safetensors").unlink(), "has no weight files"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]),
     "model.safetensors is truncated or not a safetensors file"),
])
def test_a_damaged_base_model_folder_is_an_error_naming_the_file(tiny_base, tmp_path, damage, needle):
    """Loading the base weights (training, evaluation, the Fisher pass) used to end in transformers' or safetensors'
    traceback; it is one error naming the folder, the damaged file and the fix."""
    from click.testing import CliRunner

    from sstmerge.cli.main import cli
    from sstmerge.io.models import load_causal_lm

    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    damage(base)
    with pytest.raises(ModelError, match="cannot load the base model from") as err:
        load_causal_lm(base)
    assert needle in str(err.value) and "save or copy it again" in str(err.value)
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "hi", "response": "hello"}\n')
    res = CliRunner().invoke(cli, ["-q", "train", "--base", str(base), "--data", str(data), "--out", str(tmp_path / "A"),
                                   "--steps", "1"])
    assert res.exit_code == 2 and "Traceback" not in res.output and not (tmp_path / "A").exists()
