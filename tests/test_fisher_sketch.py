"""The store-free Fisher (issue #16): sketch store, weighted backward pass ``Gᵀβ``, their resume, the bf16
store and the accumulators, on the tiny random Llama. Disk/time ratios are measured in benchmarks/."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from sstmerge import FisherError, read_adapter
from sstmerge.fisher import run as fisher_run
from sstmerge.fisher.accumulate import RowAccumulator
from sstmerge.fisher.gradients import batched_per_sample_gradients, iter_weighted_gradient_sums
from sstmerge.fisher.point import flat_phi
from sstmerge.fisher.run import AUTO_FULL_MAX_BYTES, FisherSettings, compute_fisher, resolve_store
from sstmerge.io.models import load_base_info
from sstmerge.linalg.eigen import safety_subspace_from_gram
from sstmerge.linalg.projection import project_block, span_coefficients
from sstmerge.linalg.sketch import gram, sketch_module
from sstmerge.merge.subspace import project_safety, remove_directions

from .conftest import TINY_TARGETS
from .test_fisher_scale import point  # noqa: F401  (fixture)

EXACT = 1 << 20  # a sketch dimension above every tiny module's D_m: the sketch store is then exact


@pytest.fixture
def pair_paths(adapter_factory):
    return (adapter_factory(targets=("q_proj", "v_proj", "up_proj"), r=4, alpha=8),
            adapter_factory(targets=TINY_TARGETS, r=4, alpha=8))


@pytest.fixture
def pair(pair_paths):
    return tuple(read_adapter(p) for p in pair_paths)


def fisher(tiny_base, pair, cache, **settings):
    u, s = pair
    settings.setdefault("max_samples", 6)
    settings.setdefault("batch_size", 4)
    return compute_fisher(load_base_info(tiny_base), [u], [1.0], s, FisherSettings(**settings), cache)


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_weighted_sums_equal_the_stores_combination_per_module(point, batch_size):  # noqa: F811
    """``Σ_i β_m,i g_i,m`` with a different β per module (per-module scope), from one backward per batch,
    equals the per-sample gradients' combination, whatever the batching and padding."""
    model, layers, encoded, _ = point
    G = batched_per_sample_gradients(model, layers, encoded)
    gen = torch.Generator().manual_seed(0)
    betas = {m: torch.randn(len(encoded), generator=gen, dtype=torch.float64) for m in layers}
    total = {m: torch.zeros(G[m].shape[1]) for m in layers}
    seen = []
    for rows, sums in iter_weighted_gradient_sums(model, layers, encoded, betas, range(len(encoded)), batch_size):
        seen += rows
        for m in layers:
            total[m] += sums[m]
    assert sorted(seen) == list(range(len(encoded)))
    for m in layers:
        ref = betas[m].float() @ G[m]
        torch.testing.assert_close(total[m], ref, rtol=1e-4, atol=1e-5 * float(G[m].abs().max()))


def test_sketch_with_m_at_least_D_reproduces_the_full_store(tiny_base, tmp_path, pair):
    """m ≥ D_m keeps every module exactly: same Gram, G φ, diagonal Fisher; and the projection's Gᵀβ from the
    weighted backward pass equals the full store's column-chunk product (global and per-module scope)."""
    full = fisher(tiny_base, pair, tmp_path, store="full")
    sk = fisher(tiny_base, pair, tmp_path, store="sketch", sketch_dim=EXACT, store_dtype="float32")
    assert (full.kind, sk.kind) == ("full", "sketch") and full.folder != sk.folder
    report = sk.meta["store"]
    assert report["gram_rel_error_estimate"] == 0.0 and report["exact_modules"] == len(full.stats.modules)
    assert report["disk_bytes"] < full.meta["store"]["disk_bytes"] * 2  # exact sketch: the same numbers, permuted
    assert rel(sk.stats.gram_total, full.stats.gram_total) < 1e-6
    for m in full.stats.modules:
        assert rel(sk.stats.gram[m], full.stats.gram[m]) < 1e-6
        assert rel(sk.stats.G_phi[m], full.stats.G_phi[m]) < 1e-6
        assert rel(sk.stats.diag_harm[m], full.stats.diag_harm[m]) < 1e-6
        assert rel(sk.stats.diag_benign[m], full.stats.diag_benign[m]) < 1e-6
    phi = flat_phi(pair[1])
    for scope in ("global", "per_module"):
        a = project_safety(full, phi, k=4, scope=scope, estimator="empirical", eps=1e-3, clamp_k=True)
        b = project_safety(sk, phi, k=4, scope=scope, estimator="empirical", eps=1e-3, clamp_k=True)
        for m in phi:
            assert float(a.P_phi[m].norm()) > 0
            assert rel(b.P_phi[m], a.P_phi[m]) < 1e-4, (scope, m)
            assert rel(b.G_P[m], a.G_P[m]) < 1e-4
        assert a.basis_coef.keys() == b.basis_coef.keys() == ({"global"} if scope == "global" else set(phi))
        for name, coef in a.basis_coef.items():  # the directions reported, as coefficients in the gradient span
            assert coef.shape[0] == full.stats.n_harm + full.stats.n_benign
            assert rel(b.basis_coef[name] @ b.basis_coef[name].T, coef @ coef.T) < 1e-4  # same span, any sign
        ra = remove_directions(full, scope=scope, eps=1e-3, select=lambda basis, _: np.arange(basis.rank) >= 2)
        rb = remove_directions(sk, scope=scope, eps=1e-3, select=lambda basis, _: np.arange(basis.rank) >= 2)
        for m in phi:
            assert rel(rb.removed[m], ra.removed[m]) < 1e-4
    # diagonal estimator: a mask; G x from the (exact) sketches
    a = project_safety(full, phi, k=20, scope="global", estimator="diagonal", eps=1e-3, clamp_k=True)
    b = project_safety(sk, phi, k=20, scope="global", estimator="diagonal", eps=1e-3, clamp_k=True)
    for m in phi:
        torch.testing.assert_close(b.P_phi[m], a.P_phi[m])
        assert rel(b.G_P[m], a.G_P[m]) < 1e-5
    # the weighted pass is cached per β: asking again reads the result, no model is loaded
    beta = {m: np.linspace(-1, 1, 12) for m in phi}
    first = sk.combine(beta)
    assert len(list((sk.folder / "weighted").iterdir())) >= 1
    real = fisher_run.load_fisher_point
    fisher_run.load_fisher_point = None  # would fail if called
    try:
        again = sk.combine(beta)
    finally:
        fisher_run.load_fisher_point = real
    assert all(torch.equal(first[m], again[m]) for m in phi)


def test_sketched_statistics_converge_to_the_exact_ones_as_m_grows(tiny_base, tmp_path, pair):
    """On the tiny model's real per-sample gradients (full store as the reference): the sketched Gram, the top
    eigenvalues and the projected update approach the exact ones as m grows (mean over sketch seeds), and
    m ≥ D gives them exactly."""
    full = fisher(tiny_base, pair, tmp_path, store="full", max_samples=10)
    n_h, layout = full.stats.n_harm, full.stats.layout
    blocks = {m: full.store.block(m) for m, _, _ in layout}
    D = sum(a + b for _, a, b in layout)
    G_phi = sum(full.stats.G_phi[m] for m in full.stats.modules)
    exact = safety_subspace_from_gram(full.stats.gram_total, n_h, 4, dim=D, eps=1e-3)

    def P(sub):  # P φ with β from a (sketched) eigenproblem, mapped back exactly (Gᵀβ)
        beta = span_coefficients(sub.basis_coef, G_phi)
        return torch.cat([project_block(blocks[m], beta) for m, _, _ in layout])

    P_exact = P(exact)
    errors = {}
    for m_dim in (16, 64, 256, EXACT):
        e_gram, e_lam, e_proj = [], [], []
        for seed in range(4):
            K = sum(gram(sketch_module(blocks[m], m, m_dim, seed)) for m, _, _ in layout).numpy()
            sub = safety_subspace_from_gram(K, n_h, 4, dim=D, eps=1e-3)
            e_gram.append(rel(K, full.stats.gram_total))
            e_lam.append(float(np.max(np.abs(sub.eigenvalues[:4] - exact.eigenvalues[:4]) / exact.eigenvalues[:4])))
            e_proj.append(rel(P(sub), P_exact))
        errors[m_dim] = (np.mean(e_gram), np.mean(e_lam), np.mean(e_proj))
    for i in range(3):
        assert errors[16][i] > errors[64][i] > errors[256][i] > errors[EXACT][i], (i, errors)
    assert errors[EXACT][0] < 1e-6 and errors[EXACT][1] < 1e-5 and errors[EXACT][2] < 1e-4
    assert errors[16][0] > 0.05  # the small sketch is really approximate (the test can fail)


def test_sketch_store_reports_its_error_and_the_estimate_is_sound(tiny_base, tmp_path, pair, caplog):
    full = fisher(tiny_base, pair, tmp_path, store="full")
    caplog.set_level("WARNING")
    sk = fisher(tiny_base, pair, tmp_path, store="sketch", sketch_dim=64, sketch_seed=7)
    assert "Raise --sketch-dim (now 64" in caplog.text  # m = 64 on these modules: well above 2 %
    report = sk.meta["store"]
    assert report["sketch_dim"] == 64 and report["sketch_seed"] == 7 and report["sketched_modules"] > 0
    assert report["dtype"] == "bfloat16" and sk.store.path.name == "grads.bf16"  # auto: bf16 for sketches
    true = rel(sk.stats.gram_total, full.stats.gram_total)
    assert 0 < true and true / 3 < report["gram_rel_error_estimate"] < 3 * true
    assert report["disk_bytes"] < full.meta["store"]["disk_bytes"] / 6
    for m in full.stats.modules:  # G φ and the diagonal are exact sums, whatever the store's dtype
        assert rel(sk.stats.G_phi[m], full.stats.G_phi[m]) < 1e-6
        assert rel(sk.stats.diag_harm[m], full.stats.diag_harm[m]) < 1e-6
    other = fisher(tiny_base, pair, tmp_path, store="sketch", sketch_dim=64, sketch_seed=8)
    assert other.folder != sk.folder and not np.array_equal(other.stats.gram_total, sk.stats.gram_total)


def test_sketch_pass_and_weighted_pass_resume_after_a_kill(tiny_base, tmp_path, pair, monkeypatch):
    """A kill in the first pass (sketch rows + diagonal sums) or in the weighted pass resumes from the last
    checkpoint and gives the uninterrupted result."""
    whole = fisher(tiny_base, pair, tmp_path / "a", store="sketch", sketch_dim=64, batch_size=2)
    beta = {m: np.linspace(-1.0, 1.0, 12) * (j + 1) for j, m in enumerate(whole.stats.modules)}
    ref = whole.combine(beta)

    def crash_after(real, n_batches):
        def crashing(*args, **kwargs):
            for n, item in enumerate(real(*args, **kwargs)):
                if n == n_batches:
                    raise KeyboardInterrupt("simulated kill")
                yield item
        return crashing

    real = fisher_run.iter_batched_gradients
    monkeypatch.setattr(fisher_run, "iter_batched_gradients", crash_after(real, 3))
    with pytest.raises(KeyboardInterrupt):
        fisher(tiny_base, pair, tmp_path / "b", store="sketch", sketch_dim=64, batch_size=2, checkpoint_every=4)
    monkeypatch.setattr(fisher_run, "iter_batched_gradients", real)
    resumed = fisher(tiny_base, pair, tmp_path / "b", store="sketch", sketch_dim=64, batch_size=2, checkpoint_every=4)
    assert resumed.meta["resumed_from"] == 4 and not resumed.meta["cache_hit"]
    assert rel(resumed.stats.gram_total, whole.stats.gram_total) < 1e-5
    for m in whole.stats.modules:
        assert rel(resumed.stats.diag_harm[m], whole.stats.diag_harm[m]) < 1e-5
        assert rel(resumed.stats.diag_benign[m], whole.stats.diag_benign[m]) < 1e-5
        assert rel(resumed.stats.G_phi[m], whole.stats.G_phi[m]) < 1e-5

    real_w = fisher_run.iter_weighted_gradient_sums
    monkeypatch.setattr(fisher_run, "iter_weighted_gradient_sums", crash_after(real_w, 3))
    with pytest.raises(KeyboardInterrupt):
        resumed.combine(beta)
    monkeypatch.setattr(fisher_run, "iter_weighted_gradient_sums", real_w)
    parts = list(next((resumed.folder / "weighted").iterdir()).glob("part-*.safetensors"))
    assert len(parts) == 1  # rows of the first 2 batches (checkpoint_every=4) are kept
    calls = []

    def counting(*args, **kwargs):
        calls.append(list(args[4]))
        yield from real_w(*args, **kwargs)

    monkeypatch.setattr(fisher_run, "iter_weighted_gradient_sums", counting)
    got = resumed.combine(beta)
    assert len(calls) == 1 and len(calls[0]) == 12 - 4  # only the rows not yet summed
    for m in beta:
        assert rel(got[m], ref[m]) < 1e-5


def test_bf16_store_halves_the_disk_and_moves_eigenvalues_little(tiny_base, tmp_path, pair):
    full = fisher(tiny_base, pair, tmp_path, store="full")
    half = fisher(tiny_base, pair, tmp_path, store="full", store_dtype="bfloat16")
    assert half.folder != full.folder and half.store.path.name == "grads.bf16"
    assert half.meta["store"]["disk_bytes"] * 2 == full.meta["store"]["disk_bytes"]
    D = full.stats.dim()
    lam = [safety_subspace_from_gram(r.stats.gram_total, r.stats.n_harm, 4, dim=D, eps=1e-3).eigenvalues[:4]
           for r in (full, half)]
    assert 0 < float(np.max(np.abs(lam[1] - lam[0]) / lam[0])) < 0.05  # rounded (not equal), but close
    for m in full.stats.modules:
        assert rel(half.store.block(m), full.store.block(m)) < 2 ** -7  # bfloat16 keeps 8 significant bits


def test_auto_store_by_size_and_bad_settings(tiny_base, tmp_path, pair):
    assert resolve_store(FisherSettings(), 2000, 1000) == "full"
    assert resolve_store(FisherSettings(), 2000, 41_943_040) == "sketch"  # Llama-3.1-8B rank 16: 336 GB
    n = AUTO_FULL_MAX_BYTES // 4
    assert resolve_store(FisherSettings(), 1, n) == "full" and resolve_store(FisherSettings(), 1, n + 1) == "sketch"
    assert resolve_store(FisherSettings(store="sketch"), 1, 1) == "sketch"
    auto = fisher(tiny_base, pair, tmp_path)
    assert auto.kind == "full" and auto.folder == fisher(tiny_base, pair, tmp_path, store="full").folder
    with pytest.raises(ValueError, match="sketch_dim"):
        FisherSettings(sketch_dim=1)
    with pytest.raises(ValueError, match="store"):
        FisherSettings(store="disk")


def test_row_accumulator_parts_damage_and_overlap(tmp_path):
    acc = RowAccumulator(tmp_path, 6, {"x": 3})
    acc.add([0, 1], {"x": torch.tensor([1.0, 2.0, 3.0])})
    acc.checkpoint()
    with pytest.raises(ValueError, match="already"):
        acc.add([1, 2], {"x": torch.zeros(3)})
    with pytest.raises(ValueError, match="shape"):
        acc.add([2], {"x": torch.zeros(4)})
    other = RowAccumulator(tmp_path, 6, {"x": 3})  # a second process / a resumed run
    assert other.covered.tolist() == [True, True, False, False, False, False]
    other.add([4], {"x": torch.tensor([10.0, 0.0, 0.0])})
    other.checkpoint()
    covered, total = RowAccumulator.combined(tmp_path, 6, {"x": 3})
    assert covered.tolist() == [True, True, False, False, True, False]
    assert total["x"].tolist() == [11.0, 2.0, 3.0]
    part = sorted(tmp_path.glob("part-*.safetensors"), key=os.path.getmtime)[-1]
    part.write_bytes(part.read_bytes()[:-5])  # truncated: removed, its rows are recomputed
    covered, total = RowAccumulator.combined(tmp_path, 6, {"x": 3})
    assert covered.tolist() == [True, True, False, False, False, False] and total["x"].tolist() == [1.0, 2.0, 3.0]
    assert len(list(tmp_path.glob("part-*.safetensors"))) == 1
    covered, _ = RowAccumulator.combined(tmp_path, 6, {"y": 3})  # made for another problem: discarded
    assert not covered.any()


def test_weighted_pass_rejects_bad_betas(tiny_base, tmp_path, pair):
    sk = fisher(tiny_base, pair, tmp_path, store="sketch", sketch_dim=64)
    m = sk.stats.modules[0]
    with pytest.raises(FisherError, match=r"shape \(5,\), expected \(12,\)"):
        sk.combine({m: np.ones(5)})


def test_two_process_sketch_pass_equals_one_process(tiny_base, tmp_path, pair, pair_paths):
    """``torchrun --nproc-per-node 2 sst-merge fisher --fisher-store sketch``: the sketch rows and the diagonal
    sums of two processes (one accumulator part each) give the one-process statistics."""
    one = fisher(tiny_base, pair, tmp_path / "one", store="sketch", sketch_dim=64, max_samples=5, batch_size=2)
    u_dir, s_dir = pair_paths
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "sstmerge.cli.main", "-q", "fisher", "--base", str(tiny_base), "--utility", str(u_dir),
           "--safety", str(s_dir), "--max-samples", "5", "--fisher-batch-size", "2", "--fisher-device", "cpu",
           "--fisher-store", "sketch", "--sketch-dim", "64", "--cache-dir", str(tmp_path / "two")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = fisher(tiny_base, pair, tmp_path / "two", store="sketch", sketch_dim=64, max_samples=5, batch_size=2)
    assert two.meta["cache_hit"] and two.meta["world_size"] == 2
    assert len(list((two.folder / "sums").glob("part-*.safetensors"))) == 2
    assert rel(two.stats.gram_total, one.stats.gram_total) < 1e-5
    for m in one.stats.modules:
        assert rel(two.stats.diag_harm[m], one.stats.diag_harm[m]) < 1e-5
        assert rel(two.stats.G_phi[m], one.stats.G_phi[m]) < 1e-5


def test_two_process_weighted_pass_equals_one_process(tiny_base, tmp_path, pair, pair_paths):
    """The weighted backward pass sharded over two ``torchrun`` processes (each sums its own rows into its own
    accumulator part) gives the one-process Gᵀβ, which equals the full store's."""
    from safetensors.torch import load_file

    u_dir, s_dir = pair_paths
    runner = os.path.join(os.path.dirname(__file__), "dist_weighted_pass.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", runner,
           str(tiny_base), str(u_dir), str(s_dir), str(tmp_path / "two"), str(tmp_path / "two.safetensors")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = load_file(str(tmp_path / "two.safetensors"))
    full = fisher(tiny_base, pair, tmp_path / "one", store="full", max_samples=5, batch_size=2)
    betas = {m: np.linspace(-1.0, 1.0, 10) * (j + 1) for j, m in enumerate(full.stats.modules)}
    ref = full.combine(betas)
    folder = next((tmp_path / "two" / "fisher").iterdir())
    assert len(list(next((folder / "weighted").iterdir()).glob("part-*.safetensors"))) == 2
    for m in betas:
        assert float(ref[m].norm()) > 0 and rel(two[m], ref[m]) < 1e-4


def test_weighted_sums_with_several_betas(point):  # noqa: F811
    """p combinations ``G_mᵀ B_m`` (N × p betas) in one backward per batch equal the per-sample gradients'."""
    model, layers, encoded, _ = point
    G = batched_per_sample_gradients(model, layers, encoded)
    gen = torch.Generator().manual_seed(1)
    betas = {m: torch.randn(len(encoded), 3, generator=gen, dtype=torch.float64) for m in layers}
    total = {m: 0 for m in layers}
    for _, sums in iter_weighted_gradient_sums(model, layers, encoded, betas, range(len(encoded)), 3):
        for m in layers:
            total[m] = total[m] + sums[m]
    for m in layers:
        assert total[m].shape == (3, G[m].shape[1])
        torch.testing.assert_close(total[m], betas[m].float().T @ G[m], rtol=1e-4, atol=1e-5 * float(G[m].abs().max()))


def test_rayleigh_ritz_recovers_the_exact_subspace_from_any_spanning_candidates():
    """Rayleigh–Ritz over span(V) with exact G V: when V spans the gradients (p = N candidates, however badly
    chosen, e.g. from a wrong Gram), the top eigenvalues and the subspace equal the exact solution; with fewer
    candidates the Ritz values never exceed the exact eigenvalues."""
    from sstmerge.linalg.eigen import rayleigh_ritz

    gen = torch.Generator().manual_seed(0)
    N, D, n_h, k = 24, 300, 12, 4
    G = (torch.randn(N, 6, generator=gen, dtype=torch.float64) @ torch.randn(6, D, generator=gen, dtype=torch.float64)
         + 0.3 * torch.randn(N, D, generator=gen, dtype=torch.float64)).numpy()
    K = G @ G.T
    exact = safety_subspace_from_gram(K, n_h, k, dim=D, eps=1e-3)
    rough = safety_subspace_from_gram(K + 0.3 * np.abs(K).max() * np.diag(np.random.default_rng(1).random(N)), n_h,
                                      N - 2, dim=D, eps=1e-3, clamp_k=True)  # candidates from a wrong Gram
    Q_exact = np.linalg.qr(G.T @ exact.basis_coef)[0]  # (D, k)
    for A, full_span in ((np.eye(N), True), (rough.coef[:, :k + 4], False)):
        V = G.T @ A  # (D, p)
        mu, W = rayleigh_ritz(G @ V, V.T @ V, n_h, k, exact.damping)
        if full_span:
            np.testing.assert_allclose(mu, exact.eigenvalues[:k], rtol=1e-6)
            Q = np.linalg.qr(V @ W)[0]
            np.testing.assert_allclose(np.linalg.svd(Q_exact.T @ Q, compute_uv=False), 1.0, atol=1e-8)
        else:
            assert np.all(mu <= exact.eigenvalues[:k] * (1 + 1e-9)) and mu[0] > 0
    with pytest.raises(FisherError, match="rayleigh_ritz"):
        rayleigh_ritz(np.ones((4, 2)), np.eye(3), 2, 1, 1.0)


def test_weighted_pass_refuses_data_changed_since_the_first_pass(tiny_base, tmp_path, pair):
    """The weighted pass reloads the examples; a data file edited after the first pass would silently give Gᵀβ over
    other examples. It is an error naming the file; the same file again works."""
    import shutil

    from sstmerge.data.jsonl import resolve_data

    defaults = FisherSettings()
    harmful, benign = tmp_path / "harmful.jsonl", tmp_path / "benign.jsonl"
    shutil.copy(resolve_data(defaults.harmful_data), harmful)
    shutil.copy(resolve_data(defaults.benign_data), benign)
    sk = fisher(tiny_base, pair, tmp_path / "cache", store="sketch", sketch_dim=64, harmful_data=str(harmful),
                benign_data=str(benign))
    beta = {sk.stats.modules[0]: np.linspace(-1.0, 1.0, 12)}
    original = benign.read_bytes()
    lines = original.decode().splitlines(keepends=True)
    benign.write_text("".join(reversed(lines)))  # same examples, another order: other rows
    with pytest.raises(FisherError, match=r"benign_data .*benign\.jsonl changed since the Fisher pass"):
        sk.combine(beta)
    benign.write_bytes(original)
    assert float(sk.combine(beta)[sk.stats.modules[0]].norm()) > 0
