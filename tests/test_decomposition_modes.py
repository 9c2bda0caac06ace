"""The statistics used for what they measure (issue #13): the exact eigen-decomposition of an update
``φ = φ_⊥ + Σ c_i v_i``, the ``complement`` (tax removal) and ``protect`` (utility protection) modes, the
predicted effect in the report, and ``k = auto``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sstmerge import merge_utility_safety, read_adapter
from sstmerge.data.chat import encode_example
from sstmerge.data.jsonl import bundled_path, load_examples
from sstmerge.errors import AdapterMismatchError, ConfigError, FisherError, SSTMergeError
from sstmerge.fisher.gradients import batched_per_sample_gradients, looped_per_sample_gradients
from sstmerge.fisher.point import fisher_target, flat_phi, load_fisher_point
from sstmerge.fisher.run import FisherSettings, compute_fisher
from sstmerge.io.models import load_base_info
from sstmerge.linalg.eigen import (
    choose_k,
    eigen_coordinates,
    generalized_eigenbasis_from_gram,
    generalized_eigh_dense,
    quadratic_forms,
    removal_coefficients,
    safety_subspace_from_gram,
)

from .conftest import TINY_TARGETS, make_adapter

FISHER = {"max_samples": 4, "fisher_batch_size": 4}


# ------------------------------------------------------------------------------------------ the algebra
def _problem(seed: int, n_h: int, n_b: int, D: int, rank: int):
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((n_h + n_b, rank)) @ rng.standard_normal((rank, D))  # possibly rank-deficient
    phi = rng.standard_normal(D)
    return G, phi


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n_h=st.integers(1, 6), n_b=st.integers(1, 6), D=st.integers(14, 24),
       rank=st.integers(2, 12), eps=st.sampled_from([1e-3, 1e-1]))
def test_decomposition_is_exact_and_splits_the_quadratic_forms(seed, n_h, n_b, D, rank, eps):
    G, phi = _problem(seed, n_h, n_b, D, rank)
    K = G @ G.T
    basis = generalized_eigenbasis_from_gram(K, n_h, dim=D, eps=eps)
    V = G.T @ basis.coef  # (D, ρ) all eigenvectors
    F_h, F_b = G[:n_h].T @ G[:n_h] / n_h, G[n_h:].T @ G[n_h:] / n_b
    delta = basis.damping
    M = F_b + delta * np.eye(D)
    np.testing.assert_allclose(V.T @ M @ V, np.eye(basis.rank), atol=1e-6)  # (F_b + δI)-orthonormal
    np.testing.assert_allclose(F_h @ V, M @ V * basis.eigenvalues, atol=1e-6 * max(1.0, np.abs(F_h).max()))
    ref, _ = generalized_eigh_dense(F_h, F_b, eps)
    np.testing.assert_allclose(basis.eigenvalues[: basis.positive], ref[: basis.positive], rtol=1e-6)
    assert basis.positive <= n_h and basis.rank == np.linalg.matrix_rank(G)

    c = eigen_coordinates(basis, K, G @ phi)
    span = G.T @ np.linalg.pinv(G.T) @ phi  # orthogonal projection of φ onto the row space of G
    np.testing.assert_allclose(V @ c, span, atol=1e-6 * np.abs(phi).max())  # φ = φ_⊥ + Σ c_i v_i
    np.testing.assert_allclose((basis.eigenvalues * c**2).sum(), phi @ F_h @ phi, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose((c**2).sum(), span @ M @ span, rtol=1e-6)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n_h=st.integers(1, 6), n_b=st.integers(1, 6), data=st.data())
def test_removing_directions_zeroes_exactly_their_coordinates(seed, n_h, n_b, data):
    D = 20
    G, phi = _problem(seed, n_h, n_b, D, rank=10)
    K = G @ G.T
    basis = generalized_eigenbasis_from_gram(K, n_h, dim=D, eps=1e-2)
    c = eigen_coordinates(basis, K, G @ phi)
    remove = np.array(data.draw(st.lists(st.booleans(), min_size=basis.rank, max_size=basis.rank)))
    beta = removal_coefficients(basis, c, remove)
    phi2 = phi - G.T @ beta
    c2 = eigen_coordinates(basis, K, G @ phi2)
    scale = np.abs(c).max()
    np.testing.assert_allclose(c2[remove], 0.0, atol=1e-8 * scale)  # the targeted forms vanish there
    np.testing.assert_allclose(c2[~remove], c[~remove], atol=1e-8 * scale)  # and nothing else moves
    null = np.eye(D) - G.T @ np.linalg.pinv(G.T)
    np.testing.assert_allclose(null @ phi2, null @ phi, atol=1e-9)  # φ_⊥ is kept
    if not remove.any():
        assert np.all(beta == 0)


def test_choose_k_rules():
    lam = np.array([8.0, 4.0, 2.0, 1.0, 0.5, 0.0, 0.0])
    assert choose_k(lam, "mass", 0.5) == 1  # 8 / 15.5 ≥ 0.5
    assert choose_k(lam, "mass", 0.9) == 3  # (8+4+2)/15.5 = 0.903
    assert choose_k(lam, "mass", 1.0) == 5
    assert choose_k(np.array([10.0, 9.0, 1.0, 0.9]), "eigengap") == 2
    assert choose_k(np.array([3.0]), "eigengap") == 1
    with pytest.raises(FisherError, match="no positive"):
        choose_k(np.zeros(3))
    with pytest.raises(FisherError, match="k rule"):
        choose_k(lam, "elbow")


def test_quadratic_forms_from_inner_products():
    rng = np.random.default_rng(0)
    G, x = rng.standard_normal((7, 9)), rng.standard_normal(9)
    forms = quadratic_forms(G @ x, 3)
    F_h, F_b = G[:3].T @ G[:3] / 3, G[3:].T @ G[3:] / 4
    assert forms["harm_form"] == pytest.approx(x @ F_h @ x)
    assert forms["benign_form"] == pytest.approx(x @ F_b @ x)
    assert forms["refusal_gain"] == pytest.approx((G[:3] @ x).mean())


def test_subspace_of_the_full_basis_is_the_old_solver():
    G, _ = _problem(3, 5, 5, 30, 10)
    K = G @ G.T
    sub = safety_subspace_from_gram(K, 5, 3, dim=30)
    basis = generalized_eigenbasis_from_gram(K, 5, dim=30)
    np.testing.assert_allclose(sub.eigenvalues, basis.eigenvalues[: basis.positive])
    np.testing.assert_allclose(np.abs(G.T @ sub.coef), np.abs(G.T @ basis.coef[:, :3]), rtol=1e-8, atol=1e-10)


# ------------------------------------------------------------------------------------------ the merges
@pytest.fixture(scope="module")
def trio(tmp_path_factory, tiny_base):
    root = tmp_path_factory.mktemp("decomp")
    u1 = make_adapter(tiny_base, root / "u1", seed=31, targets=TINY_TARGETS, scale=0.3)
    u2 = make_adapter(tiny_base, root / "u2", seed=32, targets=TINY_TARGETS, scale=0.3)
    s = make_adapter(tiny_base, root / "s", seed=33, targets=TINY_TARGETS, scale=0.3)
    return u1, u2, s, root / "cache"


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def _dense(result) -> dict[str, torch.Tensor]:
    return {m: lm.delta(torch.float64) for m, lm in result.adapter.modules.items()}


def test_complement_with_no_direction_removed_is_direct(tiny_base, trio, tmp_path):
    u1, _, s, cache = trio
    direct = merge_utility_safety(tiny_base, [u1], s, tmp_path / "d")
    comp = merge_utility_safety(tiny_base, [u1], s, tmp_path / "c", mode="complement", bottom_k=0, cache_dir=cache,
                                **FISHER)
    assert (tmp_path / "c" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "d" / "adapter_model.safetensors").read_bytes()
    m = comp.report["method"]
    assert m["predicted_utility_cost_after"] == m["predicted_utility_cost_before"]
    assert set(m["removed_directions"].values()) == {0}
    assert direct.report["config"]["mode"] == "direct"


def _fisher_run(tiny_base, utility, coefficients, safety, cache):
    base = load_base_info(tiny_base)
    settings = FisherSettings(max_samples=4, batch_size=4, benign_data="bundled:benign_train")
    return compute_fisher(base, utility, coefficients, safety, settings, cache)


def _G_times(run, phi: dict[str, torch.Tensor]) -> np.ndarray:
    out = np.zeros(run.stats.n_harm + run.stats.n_benign)
    for m, x in phi.items():
        for lo, hi, C in run.store.iter_column_chunks(m):
            out += (C.double() @ x[lo:hi]).numpy()
    return out


@pytest.mark.parametrize("scope", ["global", "per_module"])
def test_complement_removes_the_tax_directions_and_reports_what_it_did(tiny_base, trio, tmp_path, scope):
    u1, _, s, cache = trio
    res = merge_utility_safety(tiny_base, [u1], s, tmp_path / "c", mode="complement", scope=scope, cache_dir=cache,
                               stream=False, **FISHER)
    m = res.report["method"]
    assert sum(m["removed_directions"].values()) > 0
    assert m["predicted_utility_cost_after"] < m["predicted_utility_cost_before"]
    assert 0.0 < m["factor_norm_removed_share"] < 1.0
    assert set(m["per_module"]) == set(read_adapter(s).modules)

    # independent check: recompute G φ' from the gradient store with the factors that were written
    run = _fisher_run(tiny_base, [read_adapter(u1)], [1.0], read_adapter(s), cache)
    assert run.meta["cache_hit"]
    out = read_adapter(tmp_path / "c")
    safety = read_adapter(s)
    # the merged adapter is u1 ⊕ S' by rank concatenation: S' is its last block of rows/columns
    phi_new = {}
    for name, lm in safety.modules.items():
        r = lm.A.shape[0]
        A_new, B_new = out.modules[name].A[-r:], out.modules[name].B[:, -r:]
        w = out.modules[name].scale / lm.scale  # composition folds s_S into A: A_out = s_S A', scale 1
        phi_new[name] = torch.cat([(A_new.double() * w).reshape(-1), B_new.double().reshape(-1)])
    G_new = _G_times(run, phi_new)
    G_old = _G_times(run, flat_phi(safety))
    direct = quadratic_forms(G_old, run.stats.n_harm)
    tol = 1e-5 * max(abs(v) for v in direct.values())  # the store and the written factors are float32
    assert direct == pytest.approx(m["predicted_effect"]["direct"], rel=1e-6, abs=tol)
    assert quadratic_forms(G_new, run.stats.n_harm) == pytest.approx(m["predicted_effect"]["merge"], rel=1e-4, abs=tol)
    # the removed directions' coordinates are (numerically) zero in the output
    stats = run.stats
    groups = {"global": stats.modules} if scope == "global" else {mm: [mm] for mm in stats.modules}
    for name, members in groups.items():
        K = stats.gram_total if scope == "global" else stats.gram[members[0]]
        dim = sum(stats.dim(x) for x in members)
        basis = generalized_eigenbasis_from_gram(K, stats.n_harm, dim=dim, eps=1e-3)
        G_m = sum(_G_times_module(run, x, phi_new[x]) for x in members)
        c_new = eigen_coordinates(basis, K, G_m)
        c_old = eigen_coordinates(basis, K, sum(stats.G_phi[x] for x in members))
        removed = m["scopes"][name]["removed"]
        assert np.abs(c_new[removed]).max(initial=0.0) <= 1e-4 * np.abs(c_old).max()
        kept = np.setdiff1d(np.arange(basis.rank), removed)
        np.testing.assert_allclose(c_new[kept], c_old[kept], rtol=1e-3, atol=1e-4 * np.abs(c_old).max())


def _G_times_module(run, module, x):
    out = np.zeros(run.stats.n_harm + run.stats.n_benign)
    for lo, hi, C in run.store.iter_column_chunks(module):
        out += (C.double() @ x[lo:hi]).numpy()
    return out


def test_protect_with_no_direction_removed_leaves_the_utility_adapters_unchanged(tiny_base, trio, tmp_path):
    u1, u2, s, cache = trio
    merge_utility_safety(tiny_base, [u1, u2], s, tmp_path / "d", utility_coefficients="average")
    res = merge_utility_safety(tiny_base, [u1, u2], s, tmp_path / "p", mode="protect", k=0,
                               utility_coefficients="average", cache_dir=cache, **FISHER)
    assert (tmp_path / "p" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "d" / "adapter_model.safetensors").read_bytes()
    assert all(sum(u["removed_directions"].values()) == 0 for u in res.report["method"]["utility"].values())


def test_protect_removes_top_directions_from_each_utility_adapter(tiny_base, trio, tmp_path):
    u1, u2, s, cache = trio
    res = merge_utility_safety(tiny_base, [u1, u2], s, tmp_path / "p", mode="protect", k=2,
                               utility_coefficients="average", cache_dir=cache, stream=False, **FISHER)
    rep = res.report["method"]["utility"]
    assert set(rep) == {"u1", "u2"}
    for u in rep.values():
        assert u["coefficient"] == 0.5
        assert set(u["removed_directions"].values()) == {2}
        assert u["predicted_safety_after"] < u["predicted_safety_before"]
        assert u["predicted_effect"]["merge"]["harm_form"] < u["predicted_effect"]["direct"]["harm_form"]
        assert 0.0 < u["delta_norm_kept_median"] < 1.0 + 1e-9
    # the safety adapter is untouched: merged = Σ c_i ΔW_Ui' + ΔW_S, and ΔW_S enters unchanged
    direct = merge_utility_safety(tiny_base, [u1, u2], s, tmp_path / "d", utility_coefficients="average", stream=False)
    safety = read_adapter(s)
    diff = {m: _dense(res)[m] - _dense(direct)[m] for m in safety.modules}
    assert max(float(d.abs().max()) for d in diff.values()) > 0  # the utility part did change
    # two Fisher entries were computed (one per utility adapter), at the merge's own point
    assert res.report["method"]["utility"]["u1"]["fisher"]["utility_coefficients"] == [0.5, 1.0]


def test_utility_fisher_point_is_the_merge_point_and_its_gradients_are_per_example(tiny_base, trio):
    u1, u2, s, _ = trio
    U1, U2, S = read_adapter(u1), read_adapter(u2), read_adapter(s)
    base = load_base_info(tiny_base)
    model_s, tok, _ = load_fisher_point(base, [U1, U2], [0.5, 0.7], S)
    model_u, _, layers = load_fisher_point(base, [U2, S], [0.7, 1.0], fisher_target(U1, 0.5))
    examples = load_examples(bundled_path("harmful_train"), max_samples=3) + load_examples(bundled_path("benign_train"), max_samples=3)
    encoded = [encode_example(tok, e, 256) for e in examples]
    ids = torch.tensor([encoded[0]["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model_u(input_ids=ids).logits, model_s(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    looped = dict(looped_per_sample_gradients(model_u, layers, encoded))
    batched = batched_per_sample_gradients(model_u, layers, encoded)
    assert set(layers) == set(U1.modules)
    for m in layers:
        ref = torch.stack([looped[i][m] for i in range(len(encoded))])
        assert float(ref.abs().max()) > 0
        torch.testing.assert_close(batched[m], ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    # the coefficient sits in B: the LoRA layers hold c·B
    m0 = next(iter(layers))
    torch.testing.assert_close(layers[m0].B.weight.detach(), 0.5 * U1.modules[m0].B.float())


def test_k_auto_is_chosen_per_scope_and_recorded(tiny_base, trio, tmp_path):
    u1, _, s, cache = trio
    res = merge_utility_safety(tiny_base, [u1], s, tmp_path / "a", mode="residual", k="auto", k_mass=0.6,
                               cache_dir=cache, **FISHER)
    m = res.report["method"]
    assert m["k_requested"] == "auto" and m["k_rule"] == "mass"
    assert m["effective_k"]["global"] == choose_k(np.array(m["eigenvalues"]["global"]), "mass", 0.6)
    cfg = json.loads((tmp_path / "a" / "merge_report.json").read_text())["config"]
    assert cfg["k"] == "auto"


def test_subspace_modes_report_their_predicted_effect(tiny_base, trio, tmp_path):
    u1, _, s, cache = trio
    fac = merge_utility_safety(tiny_base, [u1], s, tmp_path / "f", mode="residual", k=2, residual_ratio=0.5,
                               blend="factors", cache_dir=cache, **FISHER).report["method"]["predicted_effect"]
    lin = merge_utility_safety(tiny_base, [u1], s, tmp_path / "l", mode="residual", k=2, residual_ratio=0.5,
                               cache_dir=cache, **FISHER).report["method"]["predicted_effect"]
    assert lin["direct"] == fac["direct"] and lin["projected"] == fac["projected"]
    assert "merge" not in lin and "note" in lin  # a linear blend has no single factor vector
    # the factor blend is linear in φ: its gains interpolate the two ends
    expect = 0.5 * fac["direct"]["refusal_gain"] + 0.5 * fac["projected"]["refusal_gain"]
    assert fac["merge"]["refusal_gain"] == pytest.approx(expect, rel=1e-6)


# ------------------------------------------------------------------------------------------ bad input
def _nothing_written(folder):
    return not folder.exists() and not list(folder.parent.glob(f".tmp-{folder.name}-*"))


def test_complement_threshold_outside_the_spectrum_is_an_error(tiny_base, trio, tmp_path):
    u1, _, s, cache = trio
    for threshold in (-1.0, 1e300):
        with pytest.raises(FisherError, match="outside the spectrum"):
            merge_utility_safety(tiny_base, [u1], s, tmp_path / "x", mode="complement", threshold=threshold,
                                 cache_dir=cache, **FISHER)
        assert _nothing_written(tmp_path / "x")
    with pytest.raises(FisherError, match="bottom_k=999"):
        merge_utility_safety(tiny_base, [u1], s, tmp_path / "x", mode="complement", bottom_k=999, cache_dir=cache,
                             **FISHER)
    assert _nothing_written(tmp_path / "x")


def test_protect_k_beyond_the_positive_spectrum_is_an_error(tiny_base, trio, tmp_path):
    u1, _, s, cache = trio
    with pytest.raises(FisherError, match="k=50"):
        merge_utility_safety(tiny_base, [u1], s, tmp_path / "x", mode="protect", k=50, cache_dir=cache, **FISHER)
    assert _nothing_written(tmp_path / "x")


@pytest.mark.parametrize("mode", ["complement", "protect"])
def test_missing_fisher_data_and_safety_are_errors(tiny_base, trio, tmp_path, mode):
    u1, _, s, cache = trio
    with pytest.raises(SSTMergeError, match="nope.jsonl"):
        merge_utility_safety(tiny_base, [u1], s, tmp_path / "x", mode=mode, harmful_data=str(tmp_path / "nope.jsonl"),
                             cache_dir=cache)
    with pytest.raises(ConfigError, match="--safety"):
        merge_utility_safety(tiny_base, [u1], None, tmp_path / "x", mode=mode, cache_dir=cache)
    assert _nothing_written(tmp_path / "x")


def test_protect_refuses_utility_adapters_with_other_targets(tiny_base, trio, tmp_path, adapter_factory):
    _, _, s, cache = trio
    narrow = adapter_factory(targets=("q_proj", "v_proj"))
    with pytest.raises(AdapterMismatchError, match="target modules differ"):
        merge_utility_safety(tiny_base, [narrow], s, tmp_path / "x", mode="protect", cache_dir=cache, **FISHER)
    with pytest.raises(ConfigError, match="at least one --utility"):
        merge_utility_safety(tiny_base, [], s, tmp_path / "x", mode="protect", cache_dir=cache, **FISHER)
    assert _nothing_written(tmp_path / "x")


def test_cli_k_accepts_auto_and_rejects_words(tiny_base, trio, tmp_path):
    from click.testing import CliRunner

    from sstmerge.cli.main import cli

    u1, _, s, cache = trio
    args = ["merge", "--base", str(tiny_base), "--utility", str(u1), "--safety", str(s), "--mode", "residual",
            "--max-samples", "4", "--cache-dir", str(cache)]
    bad = CliRunner().invoke(cli, args + ["--k", "lots", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "neither an integer nor one of auto" in bad.output
    ok = CliRunner().invoke(cli, args + ["--k", "auto", "--out", str(tmp_path / "y")])
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "y" / "merge_report.json").read_text())["method"]["k_requested"] == "auto"
