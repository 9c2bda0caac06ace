"""Exact composition of LoRA updates and truncated-SVD recompression. Pure functions of tensors.

Notation (one module): ``ΔW_i = s_i · B_i @ A_i`` with ``A_i``: (r_i, d_in), ``B_i``: (d_out, r_i).
"""

from __future__ import annotations

import math

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


def full_rank_lora(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An exact LoRA pair (scale 1) of a dense update ``ΔW`` (d_out, d_in): ``B A = ΔW`` with no truncation.

    r = min(d_out, d_in). When d_out ≤ d_in: ``B = I_r`` (d_out, r), ``A = ΔW`` (r, d_in); otherwise
    ``A = I_r`` (r, d_in), ``B = ΔW`` (d_out, r). A product with an identity is exact in floating point, so the
    folded or PEFT-applied update equals ΔW bit for bit (in the factors' dtype: float32, or ΔW's if wider).
    """
    dtype = torch.promote_types(torch.float32, delta.dtype)
    W = delta.detach().to("cpu", dtype)
    d_out, d_in = W.shape
    if d_out <= d_in:
        return W.clone(), torch.eye(d_out, dtype=dtype)  # A (d_out, d_in), B (d_out, d_out)
    return torch.eye(d_in, dtype=dtype), W.clone()  # A (d_in, d_in), B (d_out, d_in)


def dense_to_lora(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` LoRA pair (scale 1) of a dense update ``ΔW`` (d_out, d_in).

    With ``X = ΔW`` (or ``ΔWᵀ`` when d_out < d_in, so that the Gram matrix is on the smaller side, q × q):
    the top-k eigenvectors ``V_k`` of ``XᵀX`` are X's top-k right singular vectors (k = min(rank, q); only
    those k are computed, ``scipy.linalg.eigh(subset_by_index=...)``, in float64), and ``X V_k V_kᵀ`` is the
    truncated SVD of X. The factors are balanced: ``σ_i = ‖X v_i‖``, the i-th column of B and row of A each
    carry ``σ_i^{1/2}``. The relative error is computed from the residual itself,
    ``‖X − X V_k V_kᵀ‖_F / ‖X‖_F`` (= the SVD tail ``sqrt(Σ_{i>k} σ_i²) / ‖σ‖``), 0 when ΔW = 0.

    Returns ``A'`` (rank, d_in), ``B'`` (d_out, rank) zero-padded to ``rank``, in float32 (or ΔW's dtype if
    wider), and the relative error.
    """
    import scipy.linalg

    if rank <= 0:
        raise ValueError(f"recompression rank must be positive, got {rank}")
    dtype = torch.promote_types(torch.float32, delta.dtype)
    W = delta.detach().to("cpu", torch.float64)
    transposed = W.shape[0] < W.shape[1]
    X = W.T if transposed else W  # (p, q), q <= p
    q = X.shape[1]
    k = min(rank, q)
    total = float((X * X).sum())
    if total == 0.0:
        return pad_rank(torch.zeros(0, W.shape[1], dtype=dtype), torch.zeros(W.shape[0], 0, dtype=dtype), rank) + (0.0,)
    _, V = scipy.linalg.eigh((X.T @ X).numpy(), subset_by_index=[q - k, q - 1])  # ascending
    V = torch.from_numpy(V[:, ::-1].copy())  # (q, k), descending
    XV = X @ V  # (p, k)
    sigma = XV.norm(dim=0)  # (k,)
    error = math.sqrt(float(((X - XV @ V.T) ** 2).sum()) / total)
    root = sigma.sqrt()
    inv_root = torch.where(sigma > 0, 1.0 / root.clamp_min(1e-300), torch.zeros_like(root))
    if transposed:  # ΔW ≈ V (XV)ᵀ: B = V σ^{1/2}, A = σ^{-1/2} (XV)ᵀ
        B_k, A_k = V * root[None, :], (XV * inv_root[None, :]).T
    else:  # ΔW ≈ (XV) Vᵀ: B = XV σ^{-1/2}, A = σ^{1/2} Vᵀ
        B_k, A_k = XV * inv_root[None, :], (V * root[None, :]).T
    return (*pad_rank(A_k.to(dtype).contiguous(), B_k.to(dtype).contiguous(), rank), error)
