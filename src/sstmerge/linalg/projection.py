"""Projection onto the safety subspace and the blends of the SST-Merge modes. Pure functions.

The generalized eigenvectors ``V_k`` are (F_benign + δI)-orthonormal, not orthonormal, so the projection is
``P φ = Q Qᵀ φ`` with ``Q = orth(V_k)`` (idempotent: P² = P). With ``Q = Gᵀ B`` (``B`` = ``basis_coef``, N × k,
see :mod:`sstmerge.linalg.eigen`) this is ``P φ = Gᵀ β`` with ``β = B Bᵀ (G φ)``: only the inner products
``G φ`` (N) are needed to get β, and module m of Pφ is ``G_mᵀ β``.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch


def orthogonal_projector(V: np.ndarray) -> np.ndarray:
    """Dense ``P = Q Qᵀ`` with ``Q = orth(V)`` (D × D), for reference/tests on small D."""
    if V.shape[1] == 0:
        return np.zeros((V.shape[0], V.shape[0]))
    Q = scipy.linalg.orth(V)  # SVD-based: correct for rank-deficient V whatever the column order
    return Q @ Q.T


def span_coefficients(basis_coef: np.ndarray, G_phi: np.ndarray) -> np.ndarray:
    """``β = B Bᵀ (G φ)`` (N,): ``P φ = Gᵀ β`` for the orthonormal basis ``Q = Gᵀ B``."""
    return basis_coef @ (basis_coef.T @ G_phi)


def project_block(G_m: torch.Tensor, beta: np.ndarray) -> torch.Tensor:
    """Module m of ``P φ``: ``G_mᵀ β`` (D_m,) from the module's per-sample gradient block G_m (N × D_m)."""
    return G_m.to(torch.float64).T @ torch.as_tensor(beta, dtype=torch.float64)


def residual_blend(phi: torch.Tensor, P_phi: torch.Tensor, residual_ratio: float) -> torch.Tensor:
    """``φ' = (1 − r) P φ + r φ``: r = 1 is direct (no projection), r = 0 the full projection."""
    if not 0.0 <= residual_ratio <= 1.0:
        raise ValueError(f"residual_ratio must lie in [0, 1], got {residual_ratio}")
    return (1.0 - residual_ratio) * P_phi + residual_ratio * phi


def layerwise_blend(phi: torch.Tensor, P_phi: torch.Tensor, strength: float) -> torch.Tensor:
    """``φ'_m = (1 − σ) φ_m + σ P φ_m`` with projection strength σ ∈ [0, 1] (σ = 1 − r of the residual mode)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"projection strength must lie in [0, 1], got {strength}")
    return (1.0 - strength) * phi + strength * P_phi


def topk_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the ``k`` largest scores (ties broken by index): the diagonal-Fisher 'projection'."""
    mask = np.zeros(scores.shape[0], dtype=bool)
    if k > 0:
        mask[np.argsort(-scores, kind="stable")[:k]] = True
    return mask
