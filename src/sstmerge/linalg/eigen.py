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
    k_requested: int
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


def safety_subspace_from_gram(
    K: np.ndarray,
    n_harm: int,
    k: int,
    *,
    dim: int,
    eps: float = 1e-3,
    clamp_k: bool = False,
    rel_tol: float = 1e-10,
    where: str = "global",
) -> SafetySubspace:
    """Top-k solutions of ``F_harm v = λ (F_benign + δ I) v`` from the Gram matrix ``K = G Gᵀ`` (N × N).

    Rows ``0..n_harm-1`` of G are harmful samples, the rest benign. ``dim`` is D (for the damping).
    Raises :class:`FisherError` if ``k`` exceeds the number of positive eigenvalues (unless ``clamp_k``).
    """
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
        raise FisherError(f"{where}: all per-sample gradients are zero (is the safety adapter all zero?)")
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
    evals, C = evals[order], C[:, order]
    pos_tol = 1e-12 * max(float(evals.max(initial=0.0)), 1e-300)
    available = int((evals > pos_tol).sum()) if evals.max(initial=0.0) > 0 else 0
    k_eff = _check_k(k, available, clamp_k, where)
    to_coef = U / root  # (N, ρ) = U Λ^{-1/2}: v = W c = Gᵀ (U Λ^{-1/2} c)
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
