"""Streaming merge: lazy adapters + a streamed safetensors writer give the same files as the in-memory path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sstmerge.io.adapter as adapter_io
from sstmerge import (
    AdapterFormatError,
    AdapterMismatchError,
    NonFiniteError,
    SSTMerger,
    read_adapter,
    save_merged_adapter,
)
from sstmerge.io.adapter import AdapterStreamWriter, LazyModules
from sstmerge.io.safetensors_stream import DTYPE_NAMES, SafetensorsStreamWriter

from .conftest import TINY_TARGETS


def st_header(path: Path) -> dict:
    raw = path.read_bytes()
    return json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])


# ------------------------------------------------------------------------------------ safetensors writer
@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}])
def test_stream_writer_is_byte_identical_to_save_file(tmp_path, metadata):
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for i, dtype in enumerate(DTYPE_NAMES):  # every dtype: checks the dtype order of the layout
        x = torch.randn(3, 5, generator=gen) * 10
        tensors[f"t{(7 * i) % 16}.é"] = x > 0 if dtype == torch.bool else x.to(dtype)
    tensors["empty"] = torch.zeros(0, 4)
    tensors["scalar"] = torch.tensor(2.5, dtype=torch.float64)
    tensors["strided"] = torch.randn(4, 6, generator=gen).T  # not contiguous
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "ref.safetensors"), metadata=metadata)
    specs = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    with SafetensorsStreamWriter(tmp_path / "mine.safetensors", specs, metadata=metadata) as w:
        for key in reversed(list(tensors)):  # any write order gives the same file
            w.write(key, tensors[key])
    assert (tmp_path / "mine.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert w.nbytes == (tmp_path / "mine.safetensors").stat().st_size
    with safe_open(str(tmp_path / "mine.safetensors"), framework="pt") as fh:
        for key, value in tensors.items():
            assert torch.equal(fh.get_tensor(key), value)


def test_stream_writer_refuses_wrong_tensors_and_incomplete_files(tmp_path):
    specs = {"a": (torch.float32, (2, 3)), "b": (torch.bfloat16, (4,))}
    with pytest.raises(ValueError, match="never written"):
        with SafetensorsStreamWriter(tmp_path / "x.safetensors", specs) as w:
            w.write("a", torch.zeros(2, 3))
    with SafetensorsStreamWriter(tmp_path / "y.safetensors", specs) as w:
        with pytest.raises(ValueError, match="declares torch.float32 \\(2, 3\\)"):
            w.write("a", torch.zeros(3, 2))
        with pytest.raises(KeyError, match="'c' was not declared"):
            w.write("c", torch.zeros(1))
        w.write("a", torch.zeros(2, 3))
        with pytest.raises(ValueError, match="already written"):
            w.write("a", torch.zeros(2, 3))
        w.write("b", torch.ones(4, dtype=torch.bfloat16))
    assert load_file(str(tmp_path / "y.safetensors"))["b"].dtype == torch.bfloat16


def test_adapter_stream_writer_matches_write_adapter(adapter_factory, tmp_path):
    adapter = read_adapter(adapter_factory(targets=("q_proj", "down_proj"), r=4))
    merged = adapter_io.LoraAdapter(
        modules={m: adapter_io.LoraModule(lm.A, lm.B * lm.scale, 1.0) for m, lm in adapter.modules.items()}
    )
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    adapter_io.write_adapter(merged, tmp_path / "a", dtype=torch.bfloat16, base_model_name_or_path="x")
    shapes = {m: lm.shape for m, lm in merged.modules.items()}
    with AdapterStreamWriter(tmp_path / "b", shapes, rank=4, dtype=torch.bfloat16, base_model_name_or_path="x") as w:
        for m in reversed(list(merged.modules)):
            w.write_module(m, merged.modules[m].A, merged.modules[m].B)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


# ------------------------------------------------------------------------------------ lazy reading
def test_lazy_adapter_reads_modules_on_access(adapter_factory, monkeypatch):
    path = adapter_factory(targets=("q_proj", "up_proj"), r=2, alpha=4, use_rslora=True,
                           rank_pattern={"model.layers.1.self_attn.q_proj": 3}, modules_to_save=["embed_tokens"])
    eager = read_adapter(path)
    reads = []
    real = adapter_io._read_tensors
    monkeypatch.setattr(adapter_io, "_read_tensors", lambda p, keys, *a: reads.append(keys) or real(p, keys, *a))
    lazy = read_adapter(path, lazy=True)
    assert isinstance(lazy.modules, LazyModules) and lazy.lazy and not eager.lazy
    # header facts without reading any tensor
    assert lazy.specs == eager.specs and lazy.full_shapes == eager.full_shapes
    assert list(lazy.modules) == list(eager.modules) and len(lazy.modules) == len(eager.modules)
    assert "model.layers.0.mlp.up_proj" in lazy.modules and "nope" not in lazy.modules
    assert reads == []
    for m, lm in eager.modules.items():
        got = lazy.modules[m]
        assert torch.equal(got.A, lm.A) and torch.equal(got.B, lm.B) and got.scale == lm.scale
    assert torch.equal(lazy.full_tensors["model.embed_tokens.weight"], eager.full_tensors["model.embed_tokens.weight"])
    assert len(reads) == len(eager.modules) + 1
    assert lazy.specs["model.layers.1.self_attn.q_proj"].rank == 3
    with pytest.raises(KeyError):
        lazy.modules["nope"]
    mat = lazy.materialize()
    assert not mat.lazy and mat.path == lazy.path and mat.files == lazy.files


def test_lazy_adapter_checks_values_when_a_module_is_read(adapter_factory):
    path = adapter_factory(targets=("q_proj", "v_proj"))
    weights = path / "adapter_model.safetensors"
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    state = load_file(str(weights))
    state[key][0, 1] = float("nan")
    save_file(state, str(weights))
    lazy = read_adapter(path, lazy=True)  # the header is fine
    lazy.modules["model.layers.0.self_attn.q_proj"]  # so are other modules
    with pytest.raises(NonFiniteError, match="NaN/Inf") as info:
        lazy.modules["model.layers.1.self_attn.v_proj"]
    assert key in str(info.value) and str(path) in str(info.value)
    with pytest.raises(NonFiniteError):  # the eager reader refuses the whole adapter at once
        read_adapter(path)


# ------------------------------------------------------------------------------------ streamed == in-memory
def merge_both(tmp_path: Path, base, utility, safety, **options):
    """The same merge in memory (+ save_merged_adapter) and streamed (merge_to); returns both results."""
    merger = SSTMerger(base, **options)
    mem = merger.merge(utility, safety)
    save_merged_adapter(mem, tmp_path / "mem")
    streamed = SSTMerger(base, **options).merge_to(utility, safety, tmp_path / "stream")
    return mem, streamed


def assert_same_merge(tmp_path: Path, mem, streamed):
    a, b = tmp_path / "mem", tmp_path / "stream"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ra, rb = json.loads((a / "merge_report.json").read_text()), json.loads((b / "merge_report.json").read_text())
    for key in ("modules", "output", "inputs", "warnings", "versions", "sstmerge_report_version"):
        assert ra[key] == rb[key], key
    # the Fisher pass's own facts differ between a computed and a cached pass (cache_hit, seconds)
    assert {**ra["method"], "fisher": None} == {**rb["method"], "fisher": None}
    assert ra["method"].get("fisher", {}).get("fingerprint") == rb["method"].get("fisher", {}).get("fingerprint")
    assert ra["config"]["stream"] is False and rb["config"]["stream"] is True
    drop = ("stream", "out")
    assert {k: v for k, v in ra["config"].items() if k not in drop} == {k: v for k, v in rb["config"].items() if k not in drop}
    assert list(ra["modules"]) == list(rb["modules"])  # same order too
    assert {"load_inputs", "validate", "compose", "write"} <= set(rb["timings"])
    # tensor-equal (independently of the byte comparison), and the streamed result's adapter reads the output
    sa, sb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert streamed.adapter.lazy and streamed.path == b.resolve()
    for m, lm in mem.adapter.modules.items():
        got = streamed.adapter.modules[m]
        assert torch.equal(got.A, lm.A.to(got.A.dtype)) and torch.equal(got.B, lm.B.to(got.B.dtype))
    assert any(float(lm.A.abs().max()) > 0 and float(lm.B.abs().max()) > 0 for lm in mem.adapter.modules.values())


@pytest.fixture
def trio(adapter_factory):
    u1 = adapter_factory(targets=("q_proj", "v_proj"), r=4, alpha=8)
    u2 = adapter_factory(targets=("q_proj", "k_proj", "up_proj"), r=2, alpha=4, use_rslora=True,
                         rank_pattern={"model.layers.1.self_attn.q_proj": 3})
    s = adapter_factory(targets=TINY_TARGETS, r=4, alpha=16, alpha_pattern={"down_proj": 2})
    return u1, u2, s


@pytest.mark.parametrize("options", [
    {},
    {"utility_coefficients": "average", "safety_weight": -0.7, "dtype": "bfloat16"},
    {"recompress_rank": 3},
    {"utility_weights": [0.0, 1.0], "safety_weight": 0.0},  # zero-weight terms (and all-zero modules)
], ids=["sum", "average-bf16", "recompress", "zero-weights"])
def test_streamed_equals_in_memory_direct(tiny_base, tmp_path, trio, options):
    u1, u2, s = trio
    mem, streamed = merge_both(tmp_path, tiny_base, [u1, u2], s, **options)
    assert_same_merge(tmp_path, mem, streamed)
    if "recompress_rank" in options:
        assert streamed.report["output"]["rank"] == 3
        assert streamed.report["output"]["max_recompression_rel_error"] > 1e-3


def test_streamed_equals_in_memory_with_missing_modules(tiny_base, tmp_path, adapter_factory):
    u = adapter_factory(targets=("q_proj",), r=2, alpha=2, layers_to_transform=[0])
    u2 = adapter_factory(targets=("q_proj", "o_proj"), r=3, alpha=3, layers_to_transform=[1])
    s = adapter_factory(targets=("q_proj", "v_proj"), r=4, alpha=4)
    mem, streamed = merge_both(tmp_path, tiny_base, [u, u2], s)
    assert_same_merge(tmp_path, mem, streamed)
    entry = streamed.report["modules"]["model.layers.1.self_attn.o_proj"]
    assert entry["present_in"] == ["utility[1]"] and entry["absent_in"] == ["utility[0]", "safety"]
    assert streamed.report["output"]["n_partial_modules"] == 5  # q_proj ×2, v_proj ×2, o_proj


def test_streamed_equals_in_memory_without_base_and_with_full_tensors(tiny_base, tmp_path, adapter_factory):
    u1 = adapter_factory(targets=("q_proj",), modules_to_save=["embed_tokens"])
    u2 = adapter_factory(targets=("v_proj",), modules_to_save=["embed_tokens"])
    mem, streamed = merge_both(tmp_path, tiny_base, [u1], u2)
    assert_same_merge(tmp_path, mem, streamed)
    assert streamed.report["modules"]["model.embed_tokens.weight"]["full_tensor"] is True
    u3, u4 = adapter_factory(targets=("q_proj",)), adapter_factory(targets=("q_proj", "k_proj"))
    mem, streamed = merge_both(tmp_path / "nobase", None, [u3, u4], None)
    assert_same_merge(tmp_path / "nobase", mem, streamed)


def test_streamed_equals_in_memory_dense_mode(tiny_base, tmp_path, trio):
    u1, u2, s = trio
    mem, streamed = merge_both(tmp_path, tiny_base, [u1, u2], s, mode="ties", density=0.5)
    assert_same_merge(tmp_path, mem, streamed)
    assert streamed.report["method"]["name"] == "ties"


def test_streamed_equals_in_memory_fisher_mode(tiny_base, tmp_path, adapter_factory):
    u = adapter_factory(targets=("q_proj", "v_proj"), r=4)
    s = adapter_factory(targets=("q_proj", "v_proj"), r=2, alpha=4)
    options = dict(mode="residual", residual_ratio=0.3, k=2, max_samples=4, cache_dir=tmp_path / "cache")
    mem, streamed = merge_both(tmp_path, tiny_base, [u], s, **options)  # the second run reuses the Fisher cache
    assert_same_merge(tmp_path, mem, streamed)
    assert streamed.report["method"]["effective_k"]["global"] == 2
    assert (tmp_path / "stream" / "spectrum.png").is_file()


def test_streaming_reads_each_input_module_once_and_validation_reads_nothing(tiny_base, tmp_path, trio, monkeypatch):
    reads = []
    real = adapter_io._read_tensors
    monkeypatch.setattr(adapter_io, "_read_tensors", lambda p, keys, *a: reads.append((p, tuple(keys))) or real(p, keys, *a))
    u1, u2, s = trio
    merger = SSTMerger(tiny_base)
    original = merger._prepare

    def prepare(*args, **kwargs):
        prep = original(*args, **kwargs)
        assert reads == [] and all(a.lazy for a in [*prep.inputs.utility, prep.inputs.safety])
        return prep

    merger._prepare = prepare
    merger.merge_to([u1, u2], s, tmp_path / "out")
    n_modules = sum(len(read_adapter(a).modules) for a in (u1, u2, s))
    input_reads = [r for r in reads if r[0].parent != (tmp_path / "out").resolve()]
    assert len(input_reads) == n_modules == len(set(input_reads))


def test_cli_streams_by_default_and_no_stream_gives_the_same_files(tiny_base, tmp_path, trio):
    from .test_cli import run

    u1, u2, s = trio
    for flag, out in ((None, "a"), ("--no-stream", "b")):
        args = ["-q", "merge", "--base", tiny_base, "--utility", u1, u2, "--safety", s, "--out", tmp_path / out]
        res = run(args + ([flag] if flag else []))
        assert res.exit_code == 0, res.output
        assert str((tmp_path / out).resolve()) in res.stdout
    ra = json.loads((tmp_path / "a" / "merge_report.json").read_text())
    rb = json.loads((tmp_path / "b" / "merge_report.json").read_text())
    assert ra["config"]["stream"] is True and rb["config"]["stream"] is False
    assert ra["output"]["sha256"] == rb["output"]["sha256"]
    assert "stream: true" in (tmp_path / "a" / "merge_config.yaml").read_text()


# ------------------------------------------------------------------------------------ failures
def test_crash_mid_stream_leaves_nothing(tiny_base, tmp_path, trio, monkeypatch):
    u1, u2, s = trio
    calls = {"n": 0}
    real = AdapterStreamWriter.write_module

    def flaky(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated crash after two modules")
        return real(self, *args)

    monkeypatch.setattr(AdapterStreamWriter, "write_module", flaky)
    out = tmp_path / "merged"
    with pytest.raises(KeyboardInterrupt):
        SSTMerger(tiny_base).merge_to([u1, u2], s, out)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_truncated_input_is_a_clear_error(tiny_base, tmp_path, trio):
    u1, u2, s = trio
    weights = u2 / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(AdapterFormatError, match="truncated") as info:
        SSTMerger(tiny_base).merge_to([u1, u2], s, tmp_path / "out")
    assert str(weights) in str(info.value)
    assert not (tmp_path / "out").exists()


def test_mismatched_factor_shapes_name_the_file_and_module(tmp_path, adapter_factory):
    path = adapter_factory(targets=("q_proj",), r=4)
    weights = path / "adapter_model.safetensors"
    state = load_file(str(weights))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    state[key] = state[key][:, :3].contiguous()  # B (d_out, 3) against A (4, d_in)
    save_file(state, str(weights))
    with pytest.raises(AdapterFormatError, match="not a LoRA pair") as info:
        read_adapter(path, lazy=True)
    assert str(path) in str(info.value) and "model.layers.0.self_attn.q_proj" in str(info.value)


def test_input_changed_while_merging_names_file_and_key(tiny_base, tmp_path, adapter_factory):
    a = adapter_factory(targets=("q_proj",), r=4)
    lazy = read_adapter(a, lazy=True)
    weights = a / "adapter_model.safetensors"
    state = load_file(str(weights))
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    state[key] = torch.zeros(4, 16)  # was (4, 32)
    save_file(state, str(weights))
    lazy.modules["model.layers.0.self_attn.q_proj"]  # unchanged module: fine
    with pytest.raises(AdapterFormatError, match="changed while merging") as info:
        lazy.modules["model.layers.1.self_attn.q_proj"]
    assert key in str(info.value) and str(weights) in str(info.value)
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(AdapterFormatError, match="truncated or replaced") as info:
        lazy.modules["model.layers.0.self_attn.q_proj"]
    assert str(weights) in str(info.value) and "lora_A" in str(info.value)


def test_shapes_disagreeing_between_adapters_without_base(tmp_path, adapter_factory):
    from sstmerge.io.models import build_tiny_llama

    from .conftest import make_adapter

    wide = make_adapter(build_tiny_llama(tmp_path / "wide", hidden_size=48, intermediate_size=64, seed=1),
                        tmp_path / "wide_adapter", seed=3)
    with pytest.raises(AdapterMismatchError, match="wide_adapter") as info:
        SSTMerger(None).merge_to([adapter_factory()], wide, tmp_path / "out")
    assert "model.layers.0.self_attn.q_proj" in str(info.value)
    assert not (tmp_path / "out").exists()
