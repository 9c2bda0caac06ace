"""Property tests (Hypothesis) for the generalized eigenproblem and the projection of SST-Merge.

They check the pure linear algebra of :mod:`sstmerge.linalg.eigen` and :mod:`sstmerge.linalg.projection`
against its definition (docs/method.md, "The generalized eigenproblem" / "Projection and the modes"):
``F_harm v = λ (F_benign + δ I) v`` with ``δ = ε · tr(F_benign) / D``, solved in the span of the per-sample
gradients from ``K = G Gᵀ``, and the orthogonal projection ``P φ = Q Qᵀ φ`` with ``Q = Gᵀ basis_coef``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sstmerge.errors import FisherError
from sstmerge.linalg.eigen import (
    damping_from_gram,
    diagonal_scores,
    generalized_eigh_dense,
    safety_subspace_from_gram,
)
from sstmerge.linalg.projection import (
    layerwise_blend,
    orthogonal_projector,
    project_block,
    residual_blend,
    span_coefficients,
    topk_mask,
)

seeds = st.integers(min_value=0, max_value=2**32 - 1)
eps_values = st.sampled_from([1e-4, 1e-3, 1e-2, 1e-1, 1.0])
scales = st.sampled_from([1e-3, 1e-1, 1.0, 10.0, 1e3])
unit = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


def _low_rank(rng: np.random.Generator, n: int, d: int, r: int, scale: float) -> np.ndarray:
    """A random n × d matrix of rank exactly r (almost surely)."""
    return scale * (rng.standard_normal((n, r)) @ rng.standard_normal((r, d)))


@st.composite
def gradient_problems(draw, *, min_d: int = 2, max_d: int = 24):
    """Random per-sample gradients G_h (N_h × D) and G_b (N_b × D), possibly rank deficient."""
    n_h = draw(st.integers(1, 6))
    n_b = draw(st.integers(1, 6))
    d = draw(st.integers(min_d, max_d))
    r_h = draw(st.integers(1, min(n_h, d)))
    r_b = draw(st.integers(1, min(n_b, d)))
    rng = np.random.default_rng(draw(seeds))
    scale = draw(scales)
    G_h = _low_rank(rng, n_h, d, r_h, scale)
    G_b = _low_rank(rng, n_b, d, r_b, scale * float(rng.uniform(0.3, 3.0)))
    return G_h, G_b, draw(eps_values)


def _fishers(G_h: np.ndarray, G_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return G_h.T @ G_h / G_h.shape[0], G_b.T @ G_b / G_b.shape[0]


def _gram(G_h: np.ndarray, G_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    G = np.vstack([G_h, G_b])
    return G, G @ G.T


def _rank(A: np.ndarray) -> int:
    s = np.linalg.svd(A, compute_uv=False)
    return int((s > 1e-9 * max(s.max(initial=0.0), 1e-300)).sum())


def _well_conditioned(*mats: np.ndarray, floor: float = 1e-4) -> bool:
    """True when every non-zero singular value of each matrix is at least ``floor`` times the largest singular
    value of the first one (G). The Gram route squares the condition number (the solver drops K eigenvalues
    below 1e-10 of the largest, i.e. singular values of G below ~1e-5 of the largest), so random draws that are
    nearly rank deficient by accident are left out of the tight-tolerance checks; exact rank deficiency (the
    low-rank draws) is kept."""
    top = np.linalg.svd(mats[0], compute_uv=False).max(initial=0.0)
    for M in mats:
        s = np.linalg.svd(M, compute_uv=False)
        nz = s[s > 1e-9 * max(top, 1e-300)]
        if nz.size and nz.min() < floor * top:
            return False
    return True


def _span_projector(G: np.ndarray, basis_coef: np.ndarray) -> np.ndarray:
    """Dense ``P = Gᵀ B Bᵀ G`` (D × D)."""
    Q = G.T @ basis_coef
    return Q @ Q.T


# --------------------------------------------------------------------------------------------------------
# 1. the blends of the modes
# --------------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 24), seeds, unit)
def test_residual_blend_endpoints_and_layerwise_equivalence(d, seed, sigma):
    gen = torch.Generator().manual_seed(seed % 2**63)
    phi = torch.randn(d, generator=gen, dtype=torch.float64)
    P_phi = torch.randn(d, generator=gen, dtype=torch.float64)
    # r = 1: direct mode, φ reproduced exactly; r = 0: the full projection, exactly.
    assert torch.equal(residual_blend(phi, P_phi, 1.0), phi)
    assert torch.equal(residual_blend(phi, P_phi, 0.0), P_phi)
    assert torch.equal(layerwise_blend(phi, P_phi, 0.0), phi)
    assert torch.equal(layerwise_blend(phi, P_phi, 1.0), P_phi)
    # layerwise with strength σ is residual with r = 1 − σ
    torch.testing.assert_close(
        layerwise_blend(phi, P_phi, sigma), residual_blend(phi, P_phi, 1.0 - sigma), atol=1e-12, rtol=1e-12
    )
    # and the blend is the convex combination it claims to be
    torch.testing.assert_close(
        residual_blend(phi, P_phi, sigma), (1 - sigma) * P_phi + sigma * phi, atol=1e-12, rtol=1e-12
    )


@pytest.mark.parametrize("bad", [-0.1, 1.0 + 1e-9, 2.0, float("nan")])
def test_blends_reject_ratios_outside_unit_interval(bad):
    phi = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError):
        residual_blend(phi, phi, bad)
    with pytest.raises(ValueError):
        layerwise_blend(phi, phi, bad)


# --------------------------------------------------------------------------------------------------------
# 2. projectors are orthogonal projectors
# --------------------------------------------------------------------------------------------------------


def _with_duplicates(rng: np.random.Generator, V: np.ndarray, n_dup: int) -> np.ndarray:
    """Insert ``n_dup`` rescaled copies of existing columns at random positions (rank stays the same)."""
    for _ in range(n_dup):
        j = int(rng.integers(0, V.shape[1]))
        V = np.insert(V, int(rng.integers(0, V.shape[1] + 1)), float(rng.uniform(0.5, 2)) * V[:, j], axis=1)
    return V


@settings(max_examples=80, deadline=None)
@given(st.integers(2, 24), st.integers(1, 8), st.integers(0, 4), seeds)
def test_orthogonal_projector_is_idempotent_and_symmetric(d, k, n_dup, seed):
    rng = np.random.default_rng(seed)
    V = _with_duplicates(rng, rng.standard_normal((d, min(k, d))), n_dup)
    P = orthogonal_projector(V)
    assert P.shape == (d, d)
    np.testing.assert_allclose(P @ P, P, atol=1e-10)
    np.testing.assert_allclose(P, P.T, atol=1e-12)


@settings(max_examples=80, deadline=None)
@given(st.integers(2, 24), st.integers(1, 8), st.integers(0, 4), seeds)
def test_orthogonal_projector_projects_onto_span_of_v(d, k, n_dup, seed):
    """P = orth(V) orth(V)ᵀ: rank P = rank V and P V = V, also for rank-deficient V (duplicate columns)."""
    rng = np.random.default_rng(seed)
    V = _with_duplicates(rng, rng.standard_normal((d, min(k, d))), n_dup)
    P = orthogonal_projector(V)
    assert abs(np.trace(P) - np.linalg.matrix_rank(V)) < 1e-8
    np.testing.assert_allclose(P @ V, V, atol=1e-9 * max(1.0, np.abs(V).max()))


def test_orthogonal_projector_with_a_duplicate_column_before_an_independent_one():
    # span{e1, 2 e1, e2} = span{e1, e2}: the projector is diag(1, 1, 0)
    V = np.array([[1.0, 2.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(orthogonal_projector(V), np.diag([1.0, 1.0, 0.0]), atol=1e-12)
    # more columns than rows: span{e1, 2 e1, e2} = R^2
    np.testing.assert_allclose(orthogonal_projector(V[:2]), np.eye(2), atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(gradient_problems(), st.integers(1, 6), seeds)
def test_span_projector_from_subspace_is_an_orthogonal_projector_of_rank_k(problem, k, seed):
    G_h, G_b, eps = problem
    G, K = _gram(G_h, G_b)
    assume(_well_conditioned(G, G_h, G_b))
    sub = safety_subspace_from_gram(K, G_h.shape[0], k, dim=G.shape[1], eps=eps, clamp_k=True)
    assert sub.k == min(k, sub.available_rank)
    assert sub.coef.shape == sub.basis_coef.shape == (G.shape[0], sub.k)
    Q = G.T @ sub.basis_coef
    np.testing.assert_allclose(Q.T @ Q, np.eye(sub.k), atol=1e-8)  # QᵀQ = I
    P = _span_projector(G, sub.basis_coef)
    np.testing.assert_allclose(P @ P, P, atol=1e-8)
    np.testing.assert_allclose(P, P.T, atol=1e-10)
    assert np.linalg.matrix_rank(P, tol=1e-6) == sub.k
    assert abs(np.trace(P) - sub.k) < 1e-8
    # Q spans the eigenvectors: P V_k = V_k
    V = G.T @ sub.coef
    np.testing.assert_allclose(P @ V, V, atol=1e-8 * max(1.0, np.abs(V).max()))
    # the projection via coefficients matches the dense projector
    phi = np.random.default_rng(seed).standard_normal(G.shape[1])
    beta = span_coefficients(sub.basis_coef, G @ phi)
    np.testing.assert_allclose(G.T @ beta, P @ phi, atol=1e-9 * max(1.0, np.abs(phi).max()))


# --------------------------------------------------------------------------------------------------------
# 3. full rank k leaves the adapter unchanged
# --------------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 24), seeds)
def test_dense_projector_of_full_rank_basis_is_identity(d, seed):
    rng = np.random.default_rng(seed)
    V = rng.standard_normal((d, d)) + 0.5 * np.eye(d) * d  # well-conditioned, full rank
    np.testing.assert_allclose(orthogonal_projector(V), np.eye(d), atol=1e-10)


@settings(max_examples=60, deadline=None)
@given(st.data(), seeds, eps_values, scales)
def test_full_rank_k_in_the_reduced_solver_is_the_identity(data, seed, eps, scale):
    d = data.draw(st.integers(2, 6), label="D")
    n_h = data.draw(st.integers(d, 6), label="N_h")
    n_b = data.draw(st.integers(1, 6), label="N_b")
    rng = np.random.default_rng(seed)
    G_h = scale * rng.standard_normal((n_h, d))  # full column rank (almost surely)
    G_b = scale * rng.standard_normal((n_b, d))
    G, K = _gram(G_h, G_b)
    assume(_well_conditioned(G, G_h, G_b))
    sub = safety_subspace_from_gram(K, n_h, d, dim=d, eps=eps)
    assert sub.available_rank == d and sub.k == d
    for _ in range(3):
        phi = rng.standard_normal(d)
        beta = span_coefficients(sub.basis_coef, G @ phi)
        np.testing.assert_allclose(G.T @ beta, phi, atol=1e-8, rtol=1e-8)


# --------------------------------------------------------------------------------------------------------
# 4. F_harm = 0: no subspace
# --------------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(gradient_problems(), st.integers(1, 6))
def test_zero_harmful_fisher_gives_no_subspace(problem, k):
    _, G_b, eps = problem
    n_h = int(np.random.default_rng(G_b.shape[0] * 7 + k).integers(1, 7))
    G_h = np.zeros((n_h, G_b.shape[1]))
    G, K = _gram(G_h, G_b)
    sub = safety_subspace_from_gram(K, n_h, k, dim=G.shape[1], eps=eps, clamp_k=True)
    assert sub.k == 0 and sub.available_rank == 0
    assert sub.eigenvalues.shape == (0,)
    assert sub.coef.shape == (G.shape[0], 0) and sub.basis_coef.shape == (G.shape[0], 0)
    assert not np.any(_span_projector(G, sub.basis_coef))
    with pytest.raises(FisherError, match=r"k=1\b"):
        safety_subspace_from_gram(K, n_h, 1, dim=G.shape[1], eps=eps, clamp_k=False)


# --------------------------------------------------------------------------------------------------------
# 5. eigenpairs satisfy the equation
# --------------------------------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(gradient_problems(), st.integers(1, 6))
def test_eigenpairs_solve_the_generalized_problem(problem, k):
    G_h, G_b, eps = problem
    D = G_h.shape[1]
    F_h, F_b = _fishers(G_h, G_b)
    G, K = _gram(G_h, G_b)
    assume(_well_conditioned(G, G_h, G_b))
    delta = damping_from_gram(K, G_h.shape[0], D, eps)
    assert delta == pytest.approx(eps * np.trace(F_b) / D, rel=1e-10)
    sub = safety_subspace_from_gram(K, G_h.shape[0], k, dim=D, eps=eps, clamp_k=True)
    assert sub.damping == pytest.approx(delta, rel=1e-12)
    # the positive spectrum has rank(F_harm) = rank(G_h) entries (B = F_b + δI is positive definite); the solver
    # counts as positive only eigenvalues above 1e-12 λ_max, so a genuinely positive but negligible one may drop
    r_h = _rank(G_h)
    assert sub.available_rank <= r_h
    dense_vals, _ = generalized_eigh_dense(F_h, F_b, eps)
    if dense_vals[r_h - 1] > 1e-10 * dense_vals[0]:
        assert sub.available_rank == r_h
    assert sub.k == min(k, sub.available_rank) and sub.k >= 1
    lam = sub.eigenvalues
    assert lam.shape == (sub.available_rank,)
    assert np.all(lam > 0)
    assert np.all(np.diff(lam) <= 1e-12 * lam[0])  # descending
    B = F_b + delta * np.eye(D)
    V = G.T @ sub.coef  # D × k
    for j in range(sub.k):
        v = V[:, j]
        assert np.linalg.norm(v) > 0
        lhs, rhs = F_h @ v, lam[j] * (B @ v)
        # relative to the pair itself, plus the normwise backward error (what a stable solver guarantees; it
        # dominates for eigenvalues many orders below λ_max)
        bound = 1e-6 * (np.linalg.norm(lhs) + lam[j] * np.linalg.norm(B @ v) + 1e-12) + 1e-9 * (
            np.linalg.norm(F_h, 2) + lam[j] * np.linalg.norm(B, 2)
        ) * np.linalg.norm(v)
        assert np.linalg.norm(lhs - rhs) <= bound, (j, np.linalg.norm(lhs - rhs), bound)
    # the eigenvectors are (F_benign + δI)-orthonormal (as the docs say), hence not orthonormal in general
    np.testing.assert_allclose(V.T @ B @ V, np.eye(sub.k), atol=1e-7)


# --------------------------------------------------------------------------------------------------------
# 6. the reduced solver matches the dense one
# --------------------------------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(gradient_problems(), st.integers(1, 6))
def test_reduced_solver_matches_dense_eigh(problem, k):
    G_h, G_b, eps = problem
    D = G_h.shape[1]
    F_h, F_b = _fishers(G_h, G_b)
    G, K = _gram(G_h, G_b)
    assume(_well_conditioned(G, G_h, G_b))
    sub = safety_subspace_from_gram(K, G_h.shape[0], k, dim=D, eps=eps, clamp_k=True)
    dense_vals, dense_vecs = generalized_eigh_dense(F_h, F_b, eps)
    n_pos = sub.available_rank
    top = dense_vals[0]
    assert top > 0
    np.testing.assert_allclose(sub.eigenvalues, dense_vals[:n_pos], rtol=1e-6, atol=1e-9 * top)
    # everything past the available rank is (numerically) zero in the dense spectrum
    assert np.all(np.abs(dense_vals[n_pos:]) <= 1e-8 * top), dense_vals[n_pos:] / top

    k_eff = sub.k
    lam_next = dense_vals[k_eff] if k_eff < D else 0.0
    assume(dense_vals[k_eff - 1] - lam_next > 1e-6 * top)
    # with an eigen-gap the top-k subspace is unique: both projectors agree
    P_dense = orthogonal_projector(dense_vecs[:, :k_eff])
    P_red = _span_projector(G, sub.basis_coef)
    gap = (dense_vals[k_eff - 1] - lam_next) / top
    np.testing.assert_allclose(P_red, P_dense, atol=max(1e-7, 1e-12 / gap))


# --------------------------------------------------------------------------------------------------------
# 7. module blocks: Gram matrices add up, projections concatenate
# --------------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(gradient_problems(min_d=2), st.integers(1, 6), st.data())
def test_gram_is_additive_over_blocks_and_projection_is_blockwise(problem, k, data):
    G_h, G_b, eps = problem
    G, K = _gram(G_h, G_b)
    assume(_well_conditioned(G, G_h, G_b))
    D = G.shape[1]
    n_cuts = data.draw(st.integers(1, min(3, D - 1)), label="n_cuts")
    cuts = sorted(data.draw(st.sets(st.integers(1, D - 1), min_size=n_cuts, max_size=n_cuts), label="cuts"))
    bounds = [0, *cuts, D]
    blocks = [G[:, a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    K_sum = sum(Gm @ Gm.T for Gm in blocks)
    np.testing.assert_allclose(K_sum, K, rtol=1e-10, atol=1e-12 * max(1.0, np.abs(K).max()))

    sub = safety_subspace_from_gram(K_sum, G_h.shape[0], k, dim=D, eps=eps, clamp_k=True)
    phi = np.random.default_rng(data.draw(seeds, label="phi_seed")).standard_normal(D)
    phi_blocks = [phi[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    # G φ is accumulated block by block too
    G_phi = sum(Gm @ pm for Gm, pm in zip(blocks, phi_blocks))
    np.testing.assert_allclose(G_phi, G @ phi, rtol=1e-10, atol=1e-10 * max(1.0, np.abs(G @ phi).max()))
    beta = span_coefficients(sub.basis_coef, G_phi)
    per_block = [project_block(torch.from_numpy(Gm.copy()), beta) for Gm in blocks]
    assert all(t.dtype == torch.float64 for t in per_block)
    assert [t.shape[0] for t in per_block] == [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    full = torch.cat(per_block).numpy()
    ref = G.T @ beta
    np.testing.assert_allclose(full, ref, rtol=1e-10, atol=1e-10 * max(1.0, np.abs(ref).max()))
    # and it is the orthogonal projection of φ
    np.testing.assert_allclose(full, _span_projector(G, sub.basis_coef) @ phi, atol=1e-8 * max(1.0, np.abs(phi).max()))


# --------------------------------------------------------------------------------------------------------
# 8. invalid arguments
# --------------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(gradient_problems(), st.integers(-5, 0), st.sampled_from([0.0, -1e-3, -1.0]))
def test_invalid_arguments_raise_fisher_error(problem, bad_k, bad_eps):
    G_h, G_b, eps = problem
    G, K = _gram(G_h, G_b)
    n_h, N, D = G_h.shape[0], G.shape[0], G.shape[1]
    for clamp in (False, True):
        with pytest.raises(FisherError, match="k must be a positive integer"):
            safety_subspace_from_gram(K, n_h, bad_k, dim=D, eps=eps, clamp_k=clamp)
    with pytest.raises(FisherError, match="eps"):
        safety_subspace_from_gram(K, n_h, 1, dim=D, eps=bad_eps)
    for bad_n_harm in (0, N, -1, N + 1):
        with pytest.raises(FisherError):
            safety_subspace_from_gram(K, bad_n_harm, 1, dim=D, eps=eps)
    with pytest.raises(FisherError):
        damping_from_gram(K, N, D, eps)
    # k above the positive spectrum without clamping is an error naming k
    too_big = _rank(G_h) + 1
    with pytest.raises(FisherError, match=rf"k={too_big}\b"):
        safety_subspace_from_gram(K, n_h, too_big, dim=D, eps=eps, clamp_k=False)
    # all benign gradients zero: damping undefined
    _, K0 = _gram(G_h, np.zeros_like(G_b))
    with pytest.raises(FisherError):
        safety_subspace_from_gram(K0, n_h, 1, dim=D, eps=eps)
    # all gradients zero
    with pytest.raises(FisherError):
        safety_subspace_from_gram(np.zeros((N, N)), n_h, 1, dim=D, eps=eps)


# --------------------------------------------------------------------------------------------------------
# 9. the diagonal Fisher
# --------------------------------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(st.integers(2, 24), seeds, eps_values, st.integers(0, 30))
def test_diagonal_scores_and_topk_mask(d, seed, eps, k):
    rng = np.random.default_rng(seed)
    f_h = rng.exponential(size=d) * (rng.random(d) < 0.8)  # some exact zeros
    f_b = rng.exponential(size=d) * (rng.random(d) < 0.7)
    assume(f_b.sum() > 0)
    scores, delta = diagonal_scores(f_h, f_b, eps)
    assert delta == pytest.approx(eps * f_b.mean(), rel=1e-12)
    np.testing.assert_allclose(scores, f_h / (f_b + eps * f_b.mean()), rtol=1e-12)
    assert np.all(scores >= 0)

    mask = topk_mask(scores, k)
    assert mask.dtype == bool and mask.shape == (d,)
    assert int(mask.sum()) == min(k, d)
    if 0 < k < d:
        assert scores[mask].min() >= scores[~mask].max()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=24), st.integers(0, 30))
def test_topk_mask_breaks_ties_by_index(int_scores, k):
    scores = np.asarray(int_scores, dtype=np.float64)
    mask = topk_mask(scores, k)
    assert int(mask.sum()) == min(k, len(scores))
    expected = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]
    assert set(np.flatnonzero(mask).tolist()) == set(expected)


def test_diagonal_scores_zero_benign_raises():
    with pytest.raises(FisherError):
        diagonal_scores(np.ones(4), np.zeros(4))
