"""Scale paths of the Fisher pass: batched per-sample gradients, chunked statistics, on-disk statistics,
and the multi-process (torchrun, gloo) pass. Correctness only; speed is measured in benchmarks/."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from sstmerge import read_adapter
from sstmerge.data.chat import encode_example
from sstmerge.data.jsonl import bundled_path, load_examples
from sstmerge.fisher.gradients import batched_per_sample_gradients, iter_batched_gradients, looped_per_sample_gradients
from sstmerge.fisher.point import load_fisher_point, module_layout
from sstmerge.fisher.run import FisherSettings, compute_fisher
from sstmerge.fisher.stats import FisherStats, StatsWriter, compute_stats, stats_in_memory
from sstmerge.fisher.store import GradientStore, InMemoryGradients
from sstmerge.io.models import load_base_info

from .conftest import TINY_TARGETS


@pytest.fixture
def point(tiny_base, adapter_factory):
    u = read_adapter(adapter_factory(targets=("q_proj", "up_proj"), r=4, alpha=8))
    s = read_adapter(adapter_factory(targets=TINY_TARGETS, r=4, alpha=8))
    base = load_base_info(tiny_base)
    model, tok, layers = load_fisher_point(base, [u], [1.0], s)
    examples = load_examples(bundled_path("harmful_train"), max_samples=4) + load_examples(bundled_path("benign_train"), max_samples=4)
    encoded = [encode_example(tok, e, 256) for e in examples]
    return model, layers, encoded, s


def test_batched_per_sample_gradients_equal_looped(point):
    model, layers, encoded, _ = point
    lengths = {len(e["input_ids"]) for e in encoded}
    assert len(lengths) > 1, "the batch must mix lengths so that padding is exercised"
    looped = dict(looped_per_sample_gradients(model, layers, encoded))
    batched = batched_per_sample_gradients(model, layers, encoded)
    for m in layers:
        ref = torch.stack([looped[i][m] for i in range(len(encoded))])  # (N, D_m)
        assert float(ref.abs().max()) > 0
        torch.testing.assert_close(batched[m], ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    # the weight gradients were never touched: only ∂ℓ/∂o was asked of autograd
    assert all(layer.A.weight.grad is None and layer.B.weight.grad is None for layer in layers.values())


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_weighted_backward_equals_the_stores_combination(point, batch_size):
    """Gᵀβ from one β-weighted backward per batch (no per-sample gradient formed) equals Σ_i β_i g_i from the
    per-sample gradients, whatever the batching and padding; zero weights skip their examples (issue #16)."""
    from sstmerge.fisher.gradients import weighted_gradient_sum

    model, layers, encoded, _ = point
    G = batched_per_sample_gradients(model, layers, encoded)
    beta = torch.linspace(-1.0, 2.0, len(encoded))
    beta[1] = 0.0
    got = weighted_gradient_sum(model, layers, encoded, beta.tolist(), batch_size)
    for m in layers:
        ref = beta @ G[m]  # (D_m,)
        torch.testing.assert_close(got[m], ref, rtol=1e-4, atol=1e-5 * float(G[m].abs().max()))
    assert all(layer.A.weight.grad is None and layer.B.weight.grad is None for layer in layers.values())
    # the hooks' path the weighted pass runs (one β per module) agrees with this autograd reference
    from sstmerge.fisher.gradients import iter_weighted_gradient_sums

    hooked = {m: 0 for m in layers}
    for _, sums in iter_weighted_gradient_sums(model, layers, encoded, {m: beta.double() for m in layers},
                                               range(len(encoded)), batch_size):
        hooked = {m: hooked[m] + sums[m] for m in layers}
    for m in layers:
        torch.testing.assert_close(hooked[m].float(), got[m], rtol=1e-4, atol=1e-5 * float(G[m].abs().max()))
    with pytest.raises(ValueError, match="2 weights for"):
        weighted_gradient_sum(model, layers, encoded, [1.0, 2.0], batch_size)


def test_iter_batched_covers_indices_once_whatever_the_batch_size(point):
    model, layers, encoded, _ = point
    full = batched_per_sample_gradients(model, layers, encoded)
    m = next(iter(layers))
    for batch_size in (1, 3):
        seen = {}
        for rows, grads in iter_batched_gradients(model, layers, encoded, [5, 0, 3, 6], batch_size):
            for b, i in enumerate(rows):
                seen[i] = grads[m][b]
        assert sorted(seen) == [0, 3, 5, 6]
        for i, g in seen.items():
            torch.testing.assert_close(g, full[m][i], rtol=1e-4, atol=1e-5 * float(full[m].abs().max()))


def _random_blocks(seed=0, n=9, layout=(("a", 30, 45), ("b", 12, 7))):
    gen = torch.Generator().manual_seed(seed)
    blocks = {m: torch.randn(n, na + nb, generator=gen) for m, na, nb in layout}
    phi = {m: torch.randn(na + nb, generator=gen, dtype=torch.float64) for m, na, nb in layout}
    return blocks, phi, [tuple(x) for x in layout]


def test_chunked_statistics_equal_dense_float64():
    blocks, phi, layout = _random_blocks()
    n_h = 4
    stats = stats_in_memory(InMemoryGradients(blocks, n_h, layout), phi, max_elems=9 * 8)  # 8 columns per chunk
    for m, G in blocks.items():
        G = G.double()
        np.testing.assert_allclose(stats.gram[m], (G @ G.T).numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(stats.G_phi[m], (G @ phi[m]).numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(stats.diag_harm[m], (G[:n_h] ** 2).mean(0).numpy(), rtol=1e-6)
        np.testing.assert_allclose(stats.diag_benign[m], (G[n_h:] ** 2).mean(0).numpy(), rtol=1e-6)
    np.testing.assert_allclose(stats.gram_total, sum(stats.gram[m] for m in blocks), rtol=1e-12)


def test_store_and_stats_folder_round_trip(tmp_path):
    blocks, phi, layout = _random_blocks(seed=1)
    n = 9
    store = GradientStore.open(tmp_path / "f", n, 4, layout)
    assert store.done == 0
    for rows in ([8, 2, 5], [0, 1, 3, 4, 6, 7]):
        store.write_rows(rows, {m: blocks[m][rows] for m in blocks})
        store.mark_done(rows)
    assert store.done == n
    for m in blocks:
        torch.testing.assert_close(store.block(m), blocks[m])
        chunks = list(store.iter_column_chunks(m, max_elems=n * 5))
        assert len(chunks) > 1
        torch.testing.assert_close(torch.cat([c for _, _, c in chunks], 1), blocks[m])
    # a reopened store (e.g. another process) sees the same rows; a different problem is refused
    again = GradientStore.open(tmp_path / "f", n, 4, layout, create=False)
    torch.testing.assert_close(again.block("b"), blocks["b"])
    from sstmerge import CacheCorruptError

    with pytest.raises(CacheCorruptError, match="made for another problem"):
        GradientStore.open(tmp_path / "f", n + 1, 4, layout, create=False)
    # statistics written module by module by two "processes", then loaded lazily
    ref = stats_in_memory(InMemoryGradients(blocks, 4, layout), phi)
    folder = tmp_path / "stats"
    StatsWriter(folder, n, layout, create=True)
    assert not FisherStats.is_complete(folder)
    parts = [compute_stats(store, phi, folder, modules=[m], create=False) for m in ("b", "a")]
    StatsWriter(folder, n, layout, create=False).finish(4, sum(p[0] for p in parts), sum(p[1] for p in parts))
    loaded = FisherStats.load(folder)
    assert loaded.layout == layout and loaded.n_harm == 4 and loaded.n_benign == 5
    np.testing.assert_allclose(loaded.gram_total, ref.gram_total, rtol=1e-12)
    for m in blocks:
        np.testing.assert_allclose(loaded.gram[m], ref.gram[m], rtol=1e-12)
        np.testing.assert_allclose(loaded.G_phi[m], ref.G_phi[m], rtol=1e-12)
        np.testing.assert_allclose(loaded.diag_harm[m], ref.diag_harm[m], rtol=1e-12)
        np.testing.assert_allclose(loaded.diag_benign[m], ref.diag_benign[m], rtol=1e-12)


def test_store_refuses_wrong_row_width(tmp_path):
    blocks, _, layout = _random_blocks()
    store = GradientStore.open(tmp_path / "f", 9, 4, layout)
    from sstmerge import FisherError

    with pytest.raises(FisherError, match="expected"):
        store.write_rows([0], {"a": blocks["a"][:1], "b": blocks["b"][:1, :3]})


def test_two_process_fisher_equals_one_process(tiny_base, tmp_path, adapter_factory):
    """``torchrun --nproc-per-node 2 sst-merge fisher`` (gloo on CPU) gives the one-process statistics."""
    u = adapter_factory(targets=("q_proj", "v_proj"), r=4, alpha=8)
    s = adapter_factory(targets=TINY_TARGETS, r=4, alpha=8)
    settings = FisherSettings(max_samples=5, batch_size=2)
    one = compute_fisher(load_base_info(tiny_base), [read_adapter(u)], [1.0], read_adapter(s), settings,
                         tmp_path / "one")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "sstmerge.cli.main", "-q", "fisher", "--base", str(tiny_base), "--utility", str(u), "--safety", str(s),
           "--max-samples", "5", "--fisher-batch-size", "2", "--fisher-device", "cpu", "--cache-dir", str(tmp_path / "two")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folder = tmp_path / "two" / "fisher" / one.folder.name
    two = FisherStats.load(folder / "stats")
    from sstmerge.io.integrity import read_checked_json

    meta = read_checked_json(folder / "fisher_meta.json")
    assert meta["world_size"] == 2 and meta["n_harm"] == 5 and meta["n_benign"] == 5
    assert two.layout == one.stats.layout
    scale = float(np.abs(one.stats.gram_total).max())
    np.testing.assert_allclose(two.gram_total, one.stats.gram_total, rtol=1e-5, atol=1e-6 * scale)
    for m in one.stats.modules:
        np.testing.assert_allclose(two.gram[m], one.stats.gram[m], rtol=1e-5, atol=1e-6 * scale)
        np.testing.assert_allclose(two.G_phi[m], one.stats.G_phi[m], rtol=1e-5,
                                   atol=1e-6 * float(np.abs(one.stats.G_phi[m]).max()))
        np.testing.assert_allclose(two.diag_harm[m], one.stats.diag_harm[m], rtol=1e-4,
                                   atol=1e-6 * float(one.stats.diag_harm[m].max()))
    store = GradientStore.open(folder, 10, 5, module_layout(read_adapter(s)), create=False)
    assert store.done == 10
