"""Fisher statistics, caching/resume, and the Fisher-subspace merge modes on a tiny random Llama."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from sstmerge import ConfigError, DataError, FisherError, merge_utility_safety, read_adapter
from sstmerge.data.chat import encode_example
from sstmerge.data.jsonl import bundled_path, load_examples
from sstmerge.fisher import run as fisher_run
from sstmerge.fisher.point import flat_phi
from sstmerge.fisher.run import FisherSettings, compute_fisher
from sstmerge.io.models import load_base_info

from .conftest import TINY_TARGETS, load_tiny
from .test_merge_direct import assert_state_close, peft_weights

SMALL = dict(max_samples=6, cache_dir=None)


@pytest.fixture
def pair(adapter_factory):
    u = adapter_factory(targets=("q_proj", "v_proj", "up_proj"), r=4, alpha=8)
    s = adapter_factory(targets=TINY_TARGETS, r=4, alpha=8)
    return u, s


def fisher_for(tiny_base, u, s, cache, **settings):
    base = load_base_info(tiny_base)
    return compute_fisher(base, [read_adapter(u)], [1.0], read_adapter(s),
                          FisherSettings(max_samples=6, **settings), cache)


def reference_gradients(tiny_base, u, s, n=6):
    """Per-sample gradients through an independent path: HF's own loss (mean NLL × answer tokens)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    model = load_tiny(tiny_base)
    with torch.no_grad():
        for name, lm in read_adapter(u).modules.items():
            model.get_submodule(name).weight += lm.delta().float()
    model = PeftModel.from_pretrained(model, str(s), is_trainable=True).eval()
    examples = load_examples(bundled_path("harmful_train"), max_samples=n) + load_examples(bundled_path("benign_train"), max_samples=n)
    rows = []
    names = sorted(read_adapter(s).modules)
    for ex in examples:
        enc = encode_example(tok, ex, 256)
        ids, labels = torch.tensor([enc["input_ids"]]), torch.tensor([enc["labels"]])
        n_tok = int((labels[:, 1:] != -100).sum())
        loss = model(input_ids=ids, labels=labels).loss * n_tok
        model.zero_grad()
        loss.backward()
        row = {}
        for m in names:
            sub = model.get_base_model().get_submodule(m)
            row[m] = torch.cat([sub.lora_A["default"].weight.grad.reshape(-1), sub.lora_B["default"].weight.grad.reshape(-1)]).double()
        rows.append(row)
    return {m: torch.stack([r[m] for r in rows]) for m in names}


def test_streamed_statistics_equal_stored_per_sample_gradients(tiny_base, tmp_path, pair):
    u, s = pair
    run = fisher_for(tiny_base, u, s, tmp_path / "cache")
    G = reference_gradients(tiny_base, u, s)
    phi = flat_phi(read_adapter(s))
    assert run.stats.n_harm == 6 and run.stats.n_benign == 6
    for m, G_m in G.items():
        np.testing.assert_allclose(run.stats.gram[m], (G_m @ G_m.T).numpy(), rtol=1e-4, atol=1e-6 * float((G_m**2).sum()))
        np.testing.assert_allclose(run.stats.G_phi[m], (-G_m @ phi[m]).numpy(), rtol=1e-4, atol=1e-5 * float(G_m.norm() * phi[m].norm()))
        np.testing.assert_allclose(run.stats.diag_harm[m], (G_m[:6] ** 2).mean(0).numpy(), rtol=1e-4, atol=1e-9)
    assert max(float(np.abs(k).max()) for k in run.stats.gram.values()) > 0


def test_resumed_pass_equals_uninterrupted(tiny_base, tmp_path, pair, monkeypatch):
    u, s = pair
    full = fisher_for(tiny_base, u, s, tmp_path / "a")
    real = fisher_run.iter_batched_gradients

    def crashing(*args, **kwargs):
        for n, item in enumerate(real(*args, **kwargs)):
            if n == 3:
                raise KeyboardInterrupt("simulated crash")
            yield item

    monkeypatch.setattr(fisher_run, "iter_batched_gradients", crashing)
    with pytest.raises(KeyboardInterrupt):
        fisher_for(tiny_base, u, s, tmp_path / "b", checkpoint_every=4, batch_size=2)
    monkeypatch.setattr(fisher_run, "iter_batched_gradients", real)
    resumed = fisher_for(tiny_base, u, s, tmp_path / "b", checkpoint_every=4, batch_size=2)
    assert resumed.meta["resumed_from"] == 4 and not resumed.meta["cache_hit"]  # 3 batches of 2 ran, 4 were synced
    for m in full.stats.modules:  # other batches pad differently: equal up to float32 rounding of the gradients
        scale = float(np.abs(full.stats.gram[m]).max())
        np.testing.assert_allclose(resumed.stats.gram[m], full.stats.gram[m], rtol=1e-5, atol=1e-6 * scale)
        np.testing.assert_allclose(resumed.stats.G_phi[m], full.stats.G_phi[m], rtol=1e-5,
                                   atol=1e-6 * float(np.abs(full.stats.G_phi[m]).max()))
    again = fisher_for(tiny_base, u, s, tmp_path / "b")
    assert again.meta["cache_hit"] is True
    np.testing.assert_array_equal(again.stats.gram_total, resumed.stats.gram_total)


def test_residual_ratio_one_is_direct(tiny_base, tmp_path, pair):
    u, s = pair
    merge_utility_safety(tiny_base, [u], s, tmp_path / "direct", safety_weight=0.7)
    res = merge_utility_safety(tiny_base, [u], s, tmp_path / "res", mode="residual", residual_ratio=1.0, k=3,
                               safety_weight=0.7, max_samples=6, cache_dir=tmp_path / "cache")
    assert_state_close(peft_weights(tiny_base, tmp_path / "res"), peft_weights(tiny_base, tmp_path / "direct"))
    assert res.report["method"]["effective_k"] == {"global": 3}


def test_residual_merge_projects_and_reports(tiny_base, tmp_path, pair):
    u, s = pair
    out = tmp_path / "res"
    first = merge_utility_safety(tiny_base, [u], s, out, mode="residual", residual_ratio=0.0, k=3, max_samples=6,
                                 cache_dir=tmp_path / "cache")
    m = first.report["method"]
    assert len(m["eigenvalues"]["global"]) == m["available_rank"]["global"] >= 3
    assert m["eigenvalues"]["global"] == sorted(m["eigenvalues"]["global"], reverse=True)
    assert 0 < m["projection_norm_kept_total"] < 1
    assert (out / "spectrum.png").stat().st_size > 1000
    assert "top λ" in (out / "merge_report.txt").read_text()
    # the merged safety part is the projection: P(P φ) = P φ, so projecting the projected adapter again is a no-op
    assert m["fisher"]["cache_hit"] is False
    second = merge_utility_safety(tiny_base, [u], s, tmp_path / "res_k2", mode="residual", residual_ratio=0.0, k=2,
                                  max_samples=6, cache_dir=tmp_path / "cache")
    assert second.report["method"]["fisher"]["cache_hit"] is True
    assert second.report["method"]["projection_norm_kept_total"] <= m["projection_norm_kept_total"] + 1e-12


def test_layerwise_presets_and_custom_table(tiny_base, tmp_path, pair):
    u, s = pair
    common = dict(mode="layerwise", k=3, max_samples=6, cache_dir=tmp_path / "cache")
    r = merge_utility_safety(tiny_base, [u], s, tmp_path / "sf", preset="safety_first", **common)
    strengths = {k.rsplit(".", 1)[-1]: v["strength"] for k, v in r.report["method"]["per_module"].items()}
    assert strengths["q_proj"] == 0.3 and strengths["down_proj"] == 0.8
    table = tmp_path / "table.yaml"
    table.write_text(yaml.safe_dump({"q_proj": 0.0, "default": 0.0}))
    zero = merge_utility_safety(tiny_base, [u], s, tmp_path / "zero", preset=str(table), **common)
    assert zero.report["method"]["per_module"]["model.layers.0.mlp.down_proj"]["strength"] == 0.0
    merge_utility_safety(tiny_base, [u], s, tmp_path / "direct")
    assert_state_close(peft_weights(tiny_base, tmp_path / "zero"), peft_weights(tiny_base, tmp_path / "direct"))
    minimal = merge_utility_safety(tiny_base, [u], s, tmp_path / "min", preset="minimal", **common)
    assert {v["strength"] for v in minimal.report["method"]["per_module"].values()} == {0.1}


def test_v3_layer_weights(tiny_base, tmp_path, pair):
    u, s = pair
    r = merge_utility_safety(tiny_base, [], s, tmp_path / "v3", layer_weights="v3", safety_weight=2.0)
    assert r.report["modules"]["model.layers.0.mlp.down_proj"]["safety_weight"] == pytest.approx(0.6)
    assert r.report["modules"]["model.layers.0.self_attn.q_proj"]["safety_weight"] == pytest.approx(2.0)
    sa = read_adapter(s)
    merged = read_adapter(tmp_path / "v3")
    for name in ("model.layers.1.mlp.up_proj", "model.layers.1.self_attn.o_proj"):
        w = 0.6 if "mlp" in name else 2.0
        torch.testing.assert_close(merged.modules[name].delta(), w * sa.modules[name].delta(), atol=1e-6, rtol=1e-5)


def test_global_equals_per_module_with_one_module(tiny_base, tmp_path, adapter_factory):
    u = adapter_factory(targets=("v_proj",), layers_to_transform=[0])
    s = adapter_factory(targets=("q_proj",), layers_to_transform=[1])
    common = dict(mode="residual", residual_ratio=0.2, k=2, max_samples=6, cache_dir=tmp_path / "cache")
    g = merge_utility_safety(tiny_base, [u], s, tmp_path / "g", scope="global", **common)
    p = merge_utility_safety(tiny_base, [u], s, tmp_path / "p", scope="per_module", **common)
    assert_state_close(peft_weights(tiny_base, tmp_path / "g"), peft_weights(tiny_base, tmp_path / "p"))
    assert g.report["method"]["eigenvalues"]["global"] == pytest.approx(
        p.report["method"]["eigenvalues"]["model.layers.1.self_attn.q_proj"])


def test_diagonal_estimator_is_a_mask(tiny_base, tmp_path, pair):
    u, s = pair
    r = merge_utility_safety(tiny_base, [], s, tmp_path / "diag", mode="residual", residual_ratio=0.0, k=50,
                             fisher="diagonal", max_samples=6, cache_dir=tmp_path / "cache")
    merged, orig = read_adapter(tmp_path / "diag"), read_adapter(s)
    kept = sum(int((lm.A != 0).sum() + (lm.B != 0).sum()) for lm in merged.modules.values())
    assert kept == 50  # exactly k coordinates of φ survive, unchanged
    for name, lm in merged.modules.items():
        o = orig.modules[name]
        nz = lm.A != 0
        torch.testing.assert_close(lm.A[nz], o.scale * o.A[nz])  # merged A carries the LoRA scale
    assert r.report["method"]["estimator"] == "diagonal"


def test_k_validation(tiny_base, tmp_path, pair):
    u, s = pair
    out = tmp_path / "m"
    common = dict(mode="residual", max_samples=6, cache_dir=tmp_path / "cache")
    with pytest.raises(FisherError, match=r"k=500 .*--clamp-k"):
        merge_utility_safety(tiny_base, [u], s, out, k=500, **common)
    assert not out.exists()
    with pytest.raises(ConfigError, match="k"):
        merge_utility_safety(tiny_base, [u], s, out, k=0, **common)
    r = merge_utility_safety(tiny_base, [u], s, out, k=500, clamp_k=True, **common)
    m = r.report["method"]
    assert m["k_requested"] == 500 and m["effective_k"]["global"] == m["available_rank"]["global"] <= 6


def test_bad_data_files(tiny_base, tmp_path, pair):
    u, s = pair
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "response": "ok"}\n{"prompt": "x"\n')
    out = tmp_path / "m"
    with pytest.raises(DataError, match="empty.jsonl"):
        merge_utility_safety(tiny_base, [u], s, out, mode="residual", harmful_data=str(empty), cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match=r"bad.jsonl.*line 2"):
        merge_utility_safety(tiny_base, [u], s, out, mode="residual", benign_data=str(bad), cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match="nope.jsonl"):
        merge_utility_safety(tiny_base, [u], s, out, mode="residual", benign_data=str(tmp_path / "nope.jsonl"))
    assert not out.exists() and not (tmp_path / "c").exists()


def test_zero_safety_adapter_and_bad_tables(tiny_base, tmp_path, pair, adapter_factory):
    u, s = pair
    zero = adapter_factory(targets=("q_proj",), scale=0.0)
    with pytest.raises(FisherError, match="zero in every module"):
        merge_utility_safety(tiny_base, [u], zero, tmp_path / "m", mode="residual", cache_dir=tmp_path / "c")
    with pytest.raises(ConfigError, match="Did you mean 'balanced'"):
        merge_utility_safety(tiny_base, [u], s, tmp_path / "m", mode="layerwise", preset="balnced")
    table = tmp_path / "t.yaml"
    table.write_text("q_proj: 1.5\n")
    with pytest.raises(ConfigError, match=r"t.yaml.*\[0.0, 1.0\]"):
        merge_utility_safety(tiny_base, [u], s, tmp_path / "m", mode="layerwise", preset=str(table))
    with pytest.raises(ConfigError, match="Did you mean 'v3'"):
        merge_utility_safety(tiny_base, [u], s, tmp_path / "m", layer_weights="v33")
    assert not (tmp_path / "m").exists()
