"""Exact composition of LoRA updates and truncated-SVD recompression. Pure functions of tensors.

Notation (one module): ``ΔW_i = s_i · B_i @ A_i`` with ``A_i``: (r_i, d_in), ``B_i``: (d_out, r_i).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def concat_lora(terms: Sequence[tuple[float, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Represent ``Σ_i c_i · B_i @ A_i`` exactly as one LoRA pair of rank ``Σ r_i`` (scale 1).

    ``Σ_i c_i B_i A_i = [B_1 … B_n] · [c_1 A_1; …; c_n A_n]``: the coefficient (which should already include
    each adapter's LoRA scale ``s_i``) goes on the A rows only, so it enters linearly. Adding factors instead,
    ``(ΣB_i)(ΣA_i)``, would add cross terms ``B_i A_j`` and square the weights.

    Args:
        terms: ``(c_i, A_i (r_i, d_in), B_i (d_out, r_i))``; all d_in equal, all d_out equal.
    Returns:
        ``A`` (Σr_i, d_in), ``B`` (d_out, Σr_i), in float32 or the widest input dtype.
    """
    if not terms:
        raise ValueError("concat_lora needs at least one term")
    dtype = torch.promote_types(torch.float32, terms[0][1].dtype)
    A = torch.cat([c * a.to(dtype) for c, a, _ in terms], dim=0)  # (R, d_in)
    B = torch.cat([b.to(dtype) for _, _, b in terms], dim=1)  # (d_out, R)
    return A, B


def pad_rank(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad a LoRA pair to ``rank`` (extra A rows and B columns are zero, so ``B @ A`` is unchanged)."""
    r = A.shape[0]
    if rank < r:
        raise ValueError(f"cannot pad rank {r} down to {rank}")
    if rank == r:
        return A, B
    A_pad = torch.cat([A, A.new_zeros(rank - r, A.shape[1])], dim=0)  # (rank, d_in)
    B_pad = torch.cat([B, B.new_zeros(B.shape[0], rank - r)], dim=1)  # (d_out, rank)
    return A_pad, B_pad


def lowrank_svd(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``ΔW = B @ A`` without forming ΔW: ``B = Q_B R_B``, ``Aᵀ = Q_A R_A``,
    ``R_B R_Aᵀ = U Σ Vᵀ``  ⇒  ``ΔW = (Q_B U) Σ (Q_A V)ᵀ``.

    Returns ``U`` (d_out, R), ``S`` (R,) descending, ``V`` (d_in, R), in float64. Cost O((d_out + d_in) R²).
    """
    A64, B64 = A.to(torch.float64), B.to(torch.float64)
    Q_B, R_B = torch.linalg.qr(B64)  # (d_out, R), (R, R)
    Q_A, R_A = torch.linalg.qr(A64.T)  # (d_in, R), (R, R)
    U_c, S, Vh_c = torch.linalg.svd(R_B @ R_A.T)  # core (R, R)
    return Q_B @ U_c, S, Q_A @ Vh_c.T


def truncate_lora(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` approximation (Eckart–Young) of ``ΔW = B @ A`` as a LoRA pair with scale 1.

    ``B' = U_k Σ_k^{1/2}``, ``A' = Σ_k^{1/2} V_kᵀ``; relative error
    ``‖ΔW − B'A'‖_F / ‖ΔW‖_F = sqrt(Σ_{i>k} σ_i²) / sqrt(Σ_i σ_i²)`` (0 when ΔW = 0).
    If ``rank`` exceeds the current rank the pair is returned zero-padded (error 0).

    Returns ``A'`` (rank, d_in), ``B'`` (d_out, rank) in float32 or A's dtype if wider, and the relative error.
    """
    if rank <= 0:
        raise ValueError(f"recompression rank must be positive, got {rank}")
    dtype = torch.promote_types(torch.float32, A.dtype)
    U, S, V = lowrank_svd(A, B)
    k = min(rank, S.shape[0])
    total = float((S**2).sum())
    error = float(torch.sqrt((S[k:] ** 2).sum() / total)) if total > 0 else 0.0
    root = torch.sqrt(S[:k])
    A_k = (root[:, None] * V[:, :k].T).to(dtype)  # (k, d_in)
    B_k = (U[:, :k] * root[None, :]).to(dtype)  # (d_out, k)
    A_k, B_k = pad_rank(A_k, B_k, rank)
    return A_k, B_k, error
