"""The generalized eigenproblem of SST-Merge, exactly, in the span of the per-sample gradients.

Problem (D = number of safety-adapter parameters in the scope)::

    F_harm v = λ (F_benign + δ I) v,       F_harm   = G_hᵀ G_h / N_h        (D × D)
                                           F_benign = G_bᵀ G_b / N_b
                                           δ = ε · tr(F_benign) / D        (relative damping)

with ``G_h`` (N_h × D), ``G_b`` (N_b × D) the per-sample gradients. Every eigenvector with λ > 0 lies in the
row space of ``G = [G_h; G_b]`` (N × D, N = N_h + N_b), so only the Gram matrix ``K = G Gᵀ`` (N × N) is
needed. With ``K = U Λ Uᵀ`` (rank ρ, Λ > 0), ``W = Gᵀ U Λ^{-1/2}`` is an orthonormal basis of the row space
and, writing ``v = W c``::

    M_h c = λ (M_b + δ I) c,   M_h = Λ^{1/2} Uᵀ diag(1/N_h on harmful rows) U Λ^{1/2}      (ρ × ρ)
                               M_b = Λ^{1/2} Uᵀ diag(1/N_b on benign rows)  U Λ^{1/2}

a symmetric-definite problem solved by ``scipy.linalg.eigh(M_h, M_b + δ I)`` (never ``eigh(inv(B) A)``,
which is not symmetric). Directions outside the row space have λ = 0 and never enter the top-k.

The whole eigenbasis (:func:`generalized_eigenbasis_from_gram`) decomposes an update φ exactly
(:func:`eigen_coordinates`): ``φ = φ_⊥ + Σ_i c_i v_i`` with ``c_i = v_iᵀ (F_benign + δI) φ`` and φ_⊥ orthogonal to
the span, so ``φᵀ F_harm φ = Σ λ_i c_i²`` and ``φ_spanᵀ (F_benign + δI) φ_span = Σ c_i²``: per direction, the
predicted safety and utility cost. The ``complement`` and ``protect`` modes remove chosen terms of that sum.

Everything here is a pure function of tensors/arrays (float64).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from ..errors import FisherError


@dataclass
class SafetySubspace:
    """The top-k generalized eigenvectors, represented in the gradient span.

    ``coef`` (N × k): the eigenvectors are ``V_k = Gᵀ coef``. ``basis_coef`` (N × k): an orthonormal basis
    ``Q = Gᵀ basis_coef`` of span(V_k) (``QᵀQ = I``). ``eigenvalues``: all positive generalized
    eigenvalues, descending (the spectrum); ``k``: the effective k used.
    """

    eigenvalues: np.ndarray  # (n_pos,) descending
    coef: np.ndarray  # (N, k)
    basis_coef: np.ndarray  # (N, k)
    k: int
    k_requested: int | str
    available_rank: int
    damping: float
    dim: int


def damping_from_gram(K: np.ndarray, n_harm: int, dim: int, eps: float) -> float:
    """``δ = ε · tr(F_benign) / D`` with ``tr(F_benign) = tr(K_bb) / N_b`` (K_bb = benign block of K)."""
    n_b = K.shape[0] - n_harm
    if n_b <= 0:
        raise FisherError("the benign Fisher needs at least one benign sample")
    tr_fb = float(np.trace(K[n_harm:, n_harm:])) / n_b
    return eps * tr_fb / dim


def _check_k(k: int, available: int, clamp_k: bool, where: str) -> int:
    if k <= 0:
        raise FisherError(f"{where}: k must be a positive integer, got {k}")
    if k > available:
        if not clamp_k:
            raise FisherError(
                f"{where}: k={k} but only {available} generalized eigenvalues are numerically positive (the rank of "
                f"F_harm is at most the number of harmful samples, and directions below the numerical tolerance "
                f"count as zero); use k <= {available}, more harmful samples, "
                "or --clamp-k to use k=" + str(available) + " (recorded as the effective k)"
            )
        return available
    return k


@dataclass
class GeneralizedEigenbasis:
    """All ρ generalized eigenvectors in the gradient span (ρ = rank of K), descending by λ.

    ``coef`` (N × ρ): ``v_i = Gᵀ coef[:, i]``; the ``v_i`` are (F_benign + δI)-orthonormal and span the row
    space of G. ``eigenvalues`` (ρ,) includes the (numerically) zero ones: directions that F_harm does not
    see (benign-only directions, at least ρ − N_h of them). ``positive``: how many are numerically > 0.
    """

    eigenvalues: np.ndarray  # (ρ,) descending
    coef: np.ndarray  # (N, ρ)
    positive: int
    damping: float
    dim: int
    n_harm: int

    @property
    def rank(self) -> int:
        return int(self.eigenvalues.shape[0])


def _span_solve(K: np.ndarray, n_harm: int, dim: int, eps: float, rel_tol: float, where: str):
    """The reduced problem ``M_h c = λ (M_b + δI) c`` in W-coordinates (module docstring). Returns
    ``(Λ (ρ,), U (N, ρ), λ (ρ,) descending, C (ρ, ρ) (M_b+δI)-orthonormal columns, δ)``."""
    K = np.asarray(K, dtype=np.float64)
    K = 0.5 * (K + K.T)
    N = K.shape[0]
    if not 0 < n_harm < N:
        raise FisherError(f"{where}: need harmful and benign samples, got {n_harm} harmful of {N}")
    if eps <= 0:
        raise FisherError(f"damping eps must be > 0, got {eps}")
    lam, U = np.linalg.eigh(K)  # ascending
    keep = lam > rel_tol * max(float(lam.max(initial=0.0)), 0.0)
    if not keep.any():
        raise FisherError(f"{where}: all per-sample gradients are zero (is the adapter all zero?)")
    lam, U = lam[keep], U[:, keep]  # ρ
    root = np.sqrt(lam)
    S = U * root  # (N, ρ) = U Λ^{1/2}
    w = np.zeros(N)
    w[:n_harm] = 1.0 / n_harm
    M_h = S.T @ (w[:, None] * S)
    w_b = np.zeros(N)
    w_b[n_harm:] = 1.0 / (N - n_harm)
    M_b = S.T @ (w_b[:, None] * S)
    delta = damping_from_gram(K, n_harm, dim, eps)
    if delta <= 0:
        raise FisherError(f"{where}: the benign Fisher is zero (all benign gradients vanish); damping undefined")
    try:
        evals, C = scipy.linalg.eigh(M_h, M_b + delta * np.eye(len(lam)))  # ascending, C is (M_b+δI)-orthonormal
    except np.linalg.LinAlgError as exc:  # δ too small for float64 next to M_b: not positive definite in practice
        raise FisherError(f"{where}: F_benign + δI is numerically singular with δ = {delta:.3g} (damping eps = {eps:g}); "
                          f"use a larger --damping (e.g. 1e-6 or the default 1e-3) [{exc}]") from None
    order = np.argsort(evals)[::-1]
    return lam, U, evals[order], C[:, order], delta


def _n_positive(evals: np.ndarray) -> int:
    """Eigenvalues above the numerical tolerance (relative to the largest)."""
    pos_tol = 1e-12 * max(float(evals.max(initial=0.0)), 1e-300)
    return int((evals > pos_tol).sum()) if evals.max(initial=0.0) > 0 else 0


def generalized_eigenbasis_from_gram(
    K: np.ndarray, n_harm: int, *, dim: int, eps: float = 1e-3, rel_tol: float = 1e-10, where: str = "global"
) -> GeneralizedEigenbasis:
    """Every solution of ``F_harm v = λ (F_benign + δ I) v`` in the span of the gradients, from ``K = G Gᵀ``.

    Rows ``0..n_harm-1`` of G are harmful samples, the rest benign; ``dim`` is D (for the damping δ).
    Eigenvalues within rounding of 0 (relative 1e-12) are set to exactly 0.
    """
    lam, U, evals, C, delta = _span_solve(K, n_harm, dim, eps, rel_tol, where)
    positive = _n_positive(evals)
    evals = np.where(np.abs(evals) <= 1e-12 * max(float(evals.max(initial=0.0)), 1e-300), 0.0, evals)
    to_coef = U / np.sqrt(lam)  # (N, ρ) = U Λ^{-1/2}: v = W c = Gᵀ (U Λ^{-1/2} c)
    return GeneralizedEigenbasis(eigenvalues=evals, coef=to_coef @ C, positive=positive, damping=delta, dim=dim,
                                 n_harm=n_harm)


def eigen_coordinates(basis: GeneralizedEigenbasis, K: np.ndarray, G_phi: np.ndarray) -> np.ndarray:
    """Coordinates ``c`` (ρ,) of φ in the eigenbasis: ``φ = φ_⊥ + Σ_i c_i v_i`` with φ_⊥ ⟂ span(G).

    ``c_i = v_iᵀ (F_benign + δI) φ = coef_iᵀ (K_{:,b} (Gφ)_b / N_b + δ Gφ)`` (only the Gram matrix and the inner
    products ``Gφ`` are needed). Then ``φᵀ F_harm φ = Σ_i λ_i c_i²`` (the predicted safety) and
    ``φ_spanᵀ (F_benign + δI) φ_span = Σ_i c_i²`` (the predicted utility cost, damping included).
    """
    K = np.asarray(K, dtype=np.float64)
    G_phi = np.asarray(G_phi, dtype=np.float64)
    b = slice(basis.n_harm, K.shape[0])
    n_b = K.shape[0] - basis.n_harm
    metric_phi = K[:, b] @ G_phi[b] / n_b + basis.damping * G_phi  # G (F_benign + δI) φ   (N,)
    return basis.coef.T @ metric_phi


def removal_coefficients(basis: GeneralizedEigenbasis, c: np.ndarray, remove: np.ndarray) -> np.ndarray:
    """``β`` (N,) with ``Σ_{i ∈ remove} c_i v_i = Gᵀ β``: subtracting ``Gᵀβ`` from φ removes its components
    along the chosen eigenvectors (oblique: the others, and φ_⊥, are untouched)."""
    remove = np.asarray(remove, dtype=bool)
    return basis.coef[:, remove] @ c[remove]


def choose_k(eigenvalues: np.ndarray, rule: str = "mass", mass: float = 0.9, where: str = "global") -> int:
    """k from the spectrum (positive eigenvalues, descending).

    - ``mass``: the smallest k whose top-k eigenvalues hold at least ``mass`` of the positive spectrum's sum
      ``Σ_i λ_i`` (the share of ``tr`` of the whitened F_harm that the subspace explains);
    - ``eigengap``: the k before the largest relative gap ``λ_k / λ_{k+1}`` among the positive eigenvalues
      (k = the number of positive eigenvalues when there is only one).
    """
    lam = np.asarray(eigenvalues, dtype=np.float64)
    lam = lam[lam > 0]
    if lam.size == 0:
        raise FisherError(f"{where}: no positive generalized eigenvalue; k cannot be chosen from the spectrum")
    if rule == "mass":
        if not 0.0 < mass <= 1.0:
            raise FisherError(f"k_mass must lie in (0, 1], got {mass}")
        share = np.cumsum(lam) / lam.sum()
        return int(min(np.searchsorted(share, mass - 1e-12) + 1, lam.size))
    if rule == "eigengap":
        if lam.size == 1:
            return 1
        return int(np.argmax(lam[:-1] / lam[1:]) + 1)
    raise FisherError(f"unknown k rule {rule!r}; use 'mass' or 'eigengap'")


def quadratic_forms(G_x: np.ndarray, n_harm: int) -> dict[str, float]:
    """The Fisher model's view of an update x from its inner products ``G x`` (N,):

    ``refusal_gain = mean_{i harm} g_iᵀ x`` (first-order change of the refusal log-likelihood),
    ``benign_gain = mean_{j benign} g_jᵀ x``, ``harm_form = xᵀ F_harm x`` and ``benign_form = xᵀ F_benign x``.
    """
    G_x = np.asarray(G_x, dtype=np.float64)
    h, b = G_x[:n_harm], G_x[n_harm:]
    return {"refusal_gain": float(h.mean()), "benign_gain": float(b.mean()),
            "harm_form": float(np.mean(h * h)), "benign_form": float(np.mean(b * b))}


def safety_subspace_from_gram(
    K: np.ndarray,
    n_harm: int,
    k: int | str,
    *,
    dim: int,
    eps: float = 1e-3,
    clamp_k: bool = False,
    rel_tol: float = 1e-10,
    where: str = "global",
    k_rule: str = "mass",
    k_mass: float = 0.9,
) -> SafetySubspace:
    """Top-k solutions of ``F_harm v = λ (F_benign + δ I) v`` from the Gram matrix ``K = G Gᵀ`` (N × N).

    Rows ``0..n_harm-1`` of G are harmful samples, the rest benign. ``dim`` is D (for the damping).
    ``k="auto"`` chooses k from the spectrum (:func:`choose_k` with ``k_rule``, ``k_mass``).
    Raises :class:`FisherError` if ``k`` exceeds the number of positive eigenvalues (unless ``clamp_k``).
    """
    lam, U, evals, C, delta = _span_solve(K, n_harm, dim, eps, rel_tol, where)
    available = _n_positive(evals)
    k_num = choose_k(evals[:available], k_rule, k_mass, where) if k == "auto" else k
    k_eff = _check_k(k_num, available, clamp_k, where)
    to_coef = U / np.sqrt(lam)  # (N, ρ) = U Λ^{-1/2}: v = W c = Gᵀ (U Λ^{-1/2} c)
    C_k = C[:, :k_eff]
    if k_eff > 0:
        Q_c, _ = np.linalg.qr(C_k)  # orthonormal basis of span(C_k) in W-coordinates
    else:
        Q_c = np.zeros((len(lam), 0))
    return SafetySubspace(
        eigenvalues=evals[:available].copy(),
        coef=to_coef @ C_k,
        basis_coef=to_coef @ Q_c,
        k=k_eff,
        k_requested=k,
        available_rank=available,
        damping=delta,
        dim=dim,
    )


def generalized_eigh_dense(F_harm: np.ndarray, F_benign: np.ndarray, eps: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Reference dense solver for small D: ``F_harm v = λ (F_benign + δ I) v``, δ = ε tr(F_benign)/D.

    Returns eigenvalues (descending) and eigenvectors (columns, (F_benign+δI)-orthonormal).
    """
    D = F_harm.shape[0]
    delta = eps * float(np.trace(F_benign)) / D
    evals, V = scipy.linalg.eigh(F_harm, F_benign + delta * np.eye(D))
    order = np.argsort(evals)[::-1]
    return evals[order], V[:, order]


def diagonal_scores(F_harm_diag: np.ndarray, F_benign_diag: np.ndarray, eps: float = 1e-3) -> tuple[np.ndarray, float]:
    """Diagonal Fisher: the generalized eigenproblem degenerates to per-coordinate ratios
    ``λ_j = F_harm_jj / (F_benign_jj + δ)``, δ = ε · mean(F_benign_jj); eigenvectors are coordinate axes, so
    the "subspace" is a coordinate mask (top-k coordinates), not a learned subspace."""
    D = F_harm_diag.shape[0]
    delta = eps * float(F_benign_diag.sum()) / D
    if delta <= 0:
        raise FisherError("the benign diagonal Fisher is zero; damping undefined")
    return F_harm_diag / (F_benign_diag + delta), delta


def rayleigh_ritz(GV: np.ndarray, VtV: np.ndarray, n_harm: int, k: int, delta: float,
                  rel_tol: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
    """Top-k solutions of ``F_harm u = μ (F_benign + δI) u`` restricted to ``span(V)`` (V: D × p, e.g. a
    subspace found from an approximate Fisher), from exact products only::

        u = V w,   H w = μ B w,   H = (GV)_hᵀ (GV)_h / N_h,   B = (GV)_bᵀ (GV)_b / N_b + δ VᵀV

    ``GV`` (N × p) = G V (per-sample gradients times the candidates; harmful rows first), ``VtV`` (p × p).
    The Ritz values μ are the exact Rayleigh quotients of the returned directions (each ≤ the true λ_i), and
    when span(V) holds the true top-k eigenvectors they are recovered exactly, whatever error the candidates'
    statistics had. Directions of V that are numerically dependent are dropped first. Returns ``(μ (k',),
    W (p, k'))``, k' = min(k, rank), μ descending, W B-orthonormal. The benchmarks use it to score a sketched
    subspace under the exact Fisher (``benchmarks/bench_eigen_scale.exact_ritz_values``).
    """
    GV, VtV = np.asarray(GV, dtype=np.float64), np.asarray(VtV, dtype=np.float64)
    N, p = GV.shape
    if not 0 < n_harm < N or VtV.shape != (p, p):
        raise FisherError(f"rayleigh_ritz: GV {GV.shape} with {n_harm} harmful rows and VᵀV {VtV.shape}")
    s, Q = np.linalg.eigh(0.5 * (VtV + VtV.T))  # whiten V: V Q s^{-1/2} is orthonormal
    keep = s > rel_tol * max(float(s.max(initial=0.0)), 0.0)
    T = Q[:, keep] / np.sqrt(s[keep])  # (p, r)
    Y = GV @ T  # (N, r)
    H = Y[:n_harm].T @ Y[:n_harm] / n_harm
    B = Y[n_harm:].T @ Y[n_harm:] / (N - n_harm) + delta * np.eye(T.shape[1])
    mu, C = scipy.linalg.eigh(0.5 * (H + H.T), 0.5 * (B + B.T))
    order = np.argsort(mu)[::-1][: min(k, len(mu))]
    return mu[order], T @ C[:, order]
