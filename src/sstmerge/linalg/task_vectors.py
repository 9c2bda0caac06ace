"""Dense task-vector merges of one module's weight updates. Pure functions of tensors.

Notation (one module): task tensors ``ΔW_1..ΔW_T`` (each d_out × d_in, dense) with weights ``w_1..w_T``
(utility coefficients c_i, then the safety weight w^m). The baselines below never look at LoRA factors:
adding or pruning A and B separately is not a merge of the updates (see docs/method.md).

- TIES / DARE / magnitude pruning are PEFT's own functions (:mod:`peft.utils.merge_utils`); this module
  only fixes the calling conventions (weights tensor, deterministic DARE masks, no warning at density 1).
- Safe LoRA / SafeMERGE-style projections onto the column space of the safety update are defined here.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Sequence
from contextlib import contextmanager

import torch
from peft.utils import merge_utils


@contextmanager
def _density_one_is_fine():
    # PEFT warns "The density 1.0 is greater than or equal to 1, no pruning will be performed": that is the
    # documented meaning of density 1 here, not a mistake.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The density .* no pruning will be performed")
        yield


def _weights(weights: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(list(weights), dtype=like.dtype, device=like.device)  # (T,)


def _check(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> None:
    if not deltas:
        raise ValueError("need at least one task tensor")
    if len(deltas) != len(weights):
        raise ValueError(f"{len(deltas)} task tensors but {len(weights)} weights")


def task_arithmetic(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``ΔW = Σ_t w_t ΔW_t`` (d_out, d_in)."""
    _check(deltas, weights)
    return merge_utils.task_arithmetic(list(deltas), _weights(weights, deltas[0]))


def ties_merge(
    deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float, majority_sign_method: str = "total"
) -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023) as PEFT computes it (:func:`peft.utils.merge_utils.ties`).

    1. trim: ``τ_t = top-k(|ΔW_t|)`` with ``k = ⌊density · d_out · d_in⌋`` entries kept per task tensor;
    2. elect: ``γ = sign(Σ_t τ_t)`` (``total``) or ``sign(Σ_t sign τ_t)`` (``frequency``), 0 counts as +;
       the election uses the *unweighted* trimmed tensors;
    3. disjoint mean: ``ΔW[j] = Σ_{t ∈ A_j} w_t τ_t[j] / max(|A_j|, 1)``, ``A_j = {t : sign τ_t[j] = γ[j]}``.

    It is a *mean* over the agreeing tensors, not a sum: at density 1 with all signs agreeing, the result is
    ``Σ_t w_t ΔW_t / T`` (task arithmetic divided by T), and disagreeing entries are dropped.
    """
    _check(deltas, weights)
    with _density_one_is_fine():
        return merge_utils.ties(list(deltas), _weights(weights, deltas[0]), density, majority_sign_method)


def module_seed(seed: int, module: str) -> int:
    """Seed of one module's DARE masks: ``(seed + crc32(module name)) mod 2⁶³`` (stable across runs/platforms)."""
    return (int(seed) + zlib.crc32(module.encode("utf-8"))) % (2**63)


def dare_merge(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float,
    *,
    seed: int,
    use_ties: bool = False,
    majority_sign_method: str = "total",
) -> torch.Tensor:
    """DARE (Yu et al. 2023) as PEFT computes it (``dare_linear`` / ``dare_ties``), with reproducible masks.

    Drop and rescale: ``τ_t = M_t ⊙ ΔW_t / density``, ``M_t[j] ~ Bernoulli(density)`` i.i.d.; then
    ``ΔW = Σ_t w_t τ_t`` (linear) or TIES' elect + disjoint mean on the ``τ_t`` (``use_ties``). At density 1
    nothing is dropped (linear = task arithmetic). The masks are drawn from ``torch.manual_seed(seed)``
    inside :func:`torch.random.fork_rng`, so the caller's global RNG state is left untouched; the T masks
    come one after the other from that stream.
    """
    _check(deltas, weights)
    devices = [deltas[0].device] if deltas[0].device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), _density_one_is_fine():
        torch.manual_seed(seed)
        w = _weights(weights, deltas[0])
        if use_ties:
            return merge_utils.dare_ties(list(deltas), w, density, majority_sign_method)
        return merge_utils.dare_linear(list(deltas), w, density)


def magnitude_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    """Magnitude pruning then a weighted sum (:func:`peft.utils.merge_utils.magnitude_prune`):
    ``ΔW = Σ_t w_t top-k(|ΔW_t|)``, ``k = ⌊density · d_out · d_in⌋`` entries kept per task tensor."""
    _check(deltas, weights)
    with _density_one_is_fine():
        return merge_utils.magnitude_prune(list(deltas), _weights(weights, deltas[0]), density)


# ------------------------------------------------------------------------------- safety-direction projections
def column_space_basis(V: torch.Tensor, rtol: float = 1e-8) -> torch.Tensor:
    """Orthonormal basis ``Q`` (d_out, k) of the column space of ``V`` (d_out, d_in).

    ``V = U Σ Wᵀ`` (thin SVD); ``Q = U[:, σ_i > rtol · σ_1]``, so k = numerical rank of V (≤ r_S for a LoRA
    update of rank r_S). ``k = 0`` when V = 0.
    """
    U, S, _ = torch.linalg.svd(V, full_matrices=False)
    if S.numel() == 0 or float(S[0]) == 0.0:
        return V.new_zeros(V.shape[0], 0)
    return U[:, S > rtol * S[0]]


def project_columns(X: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``P_V X = Q (Qᵀ X)`` (d_out, d_in): the orthogonal projection of X's columns onto span(Q); P² = P."""
    return Q @ (Q.T @ X)


def frobenius_cosine(X: torch.Tensor, Y: torch.Tensor) -> float:
    """``⟨X, Y⟩_F / (‖X‖_F ‖Y‖_F)``; 0 when either is zero.

    For ``Y = P X`` with P an orthogonal projection this is ``‖P X‖_F / ‖X‖_F ∈ [0, 1]``.
    """
    nx, ny = float(X.norm()), float(Y.norm())
    if nx == 0.0 or ny == 0.0:
        return 0.0
    return float((X * Y).sum()) / (nx * ny)


def safety_similarities(
    utility_deltas: Sequence[torch.Tensor], safety_delta: torch.Tensor | None, rtol: float = 1e-8
) -> tuple[torch.Tensor | None, list[float | None]]:
    """The basis ``Q`` of the safety update's column space and ``cos(ΔW_Ui, P_V ΔW_Ui)`` per utility update.

    A similarity is ``None`` (undefined, never projected/flagged) when the utility update is zero or the
    module has no safety direction (no safety update, or ΔW_S = 0; then ``Q`` is None).
    """
    Q = column_space_basis(safety_delta, rtol) if safety_delta is not None else None
    if Q is not None and Q.shape[1] == 0:
        Q = None
    sims: list[float | None] = []
    for d in utility_deltas:
        if Q is None or float(d.abs().max()) == 0.0:
            sims.append(None)
        else:
            sims.append(frobenius_cosine(d, project_columns(d, Q)))
    return Q, sims


def safe_lora_merge(
    utility_deltas: Sequence[torch.Tensor],
    coefficients: Sequence[float],
    safety_delta: torch.Tensor | None,
    safety_weight: float,
    threshold: float,
) -> tuple[torch.Tensor, list[float | None], list[bool]]:
    """Safe LoRA-style (Hsu et al. 2024) merge of one module.

    ``ΔW = Σ_i c_i ΔW'_Ui + w ΔW_S`` with ``ΔW'_Ui = P_V ΔW_Ui`` if ``cos(ΔW_Ui, P_V ΔW_Ui) < τ`` else
    ``ΔW_Ui``; ``V = ΔW_S`` (the safety update is the alignment direction) and ``P_V = Q Qᵀ`` is the
    orthogonal projection onto V's column space (:func:`column_space_basis`). Each utility adapter is tested
    and projected on its own.

    Differs from the paper: there ``C = V Vᵀ / ‖V‖_F`` with ``V = W_aligned − W_unaligned`` (the alignment
    difference of the whole chat model, not an adapter) and C is not idempotent; here P_V is a true
    projection onto a rank ≤ r_S subspace. An update unrelated to V scores about ``sqrt(r_S / d_out)``.

    Args:
        utility_deltas: ``ΔW_Ui`` (d_out, d_in) each; coefficients: ``c_i``.
        safety_delta: ``ΔW_S`` (d_out, d_in) or None (module absent from the safety adapter).
    Returns:
        ``ΔW`` (d_out, d_in); per utility update its similarity (None: undefined) and whether it was projected.
    """
    if len(utility_deltas) != len(coefficients):
        raise ValueError(f"{len(utility_deltas)} utility updates but {len(coefficients)} coefficients")
    Q, sims = safety_similarities(utility_deltas, safety_delta)
    projected = [s is not None and s < threshold for s in sims]
    total = _zeros_like_any(utility_deltas, safety_delta)
    for d, c, p in zip(utility_deltas, coefficients, projected):
        total = total + c * (project_columns(d, Q) if p else d)
    if safety_delta is not None:
        total = total + safety_weight * safety_delta
    return total, sims, projected


def safemerge_merge(
    utility_deltas: Sequence[torch.Tensor],
    coefficients: Sequence[float],
    safety_delta: torch.Tensor | None,
    safety_weight: float,
    threshold: float,
    alpha: float,
) -> tuple[torch.Tensor, list[float | None], bool]:
    """SafeMERGE-style (Djuraev et al. 2025) merge of one module.

    The module is *flagged* when any utility update has ``cos(ΔW_Ui, P_V ΔW_Ui) < τ`` (same test as
    :func:`safe_lora_merge`). Flagged: ``ΔW = α Σ_i c_i ΔW_Ui + (1 − α) w ΔW_S``; not flagged:
    ``ΔW = Σ_i c_i ΔW_Ui`` (no safety update in that module). Modules without a defined similarity (no
    utility update, or no safety direction) are not flagged.

    Returns ``ΔW`` (d_out, d_in), the similarity per utility update, and whether the module was flagged.
    """
    if len(utility_deltas) != len(coefficients):
        raise ValueError(f"{len(utility_deltas)} utility updates but {len(coefficients)} coefficients")
    _, sims = safety_similarities(utility_deltas, safety_delta)
    flagged = any(s is not None and s < threshold for s in sims)
    utility = _zeros_like_any(utility_deltas, safety_delta)
    for d, c in zip(utility_deltas, coefficients):
        utility = utility + c * d
    if not flagged:
        return utility, sims, False
    return alpha * utility + (1.0 - alpha) * safety_weight * safety_delta, sims, True


def _zeros_like_any(deltas: Sequence[torch.Tensor], other: torch.Tensor | None) -> torch.Tensor:
    like = deltas[0] if deltas else other
    if like is None:
        raise ValueError("need at least one utility or safety update")
    return torch.zeros_like(like)
