"""From Fisher statistics to what the subspace modes change, per module (global or per-module scope).

- :func:`project_safety`: ``P φ`` onto the top-k safety subspace (empirical) or a top-k coordinate mask
  (diagonal), for the blends of ``residual``, ``layerwise`` and ``fisher_mask``;
- :func:`remove_directions`: ``Σ_{i ∈ L} c_i v_i`` for a chosen set L of generalized eigenvectors (the
  ``complement`` and ``protect`` modes subtract it), with the predicted safety and utility cost per scope.

Both also return the inner products ``G x`` of the per-sample gradients with what they produce, so the merge
report can evaluate the Fisher's quadratic forms (:func:`~sstmerge.linalg.eigen.quadratic_forms`) on the final
update without another pass over the gradients.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch

from ..errors import CacheCorruptError, FisherError
from ..fisher.run import FisherRun, discard_damaged
from ..linalg.eigen import (
    GeneralizedEigenbasis,
    choose_k,
    diagonal_scores,
    eigen_coordinates,
    generalized_eigenbasis_from_gram,
    removal_coefficients,
    safety_subspace_from_gram,
)
from ..linalg.projection import span_coefficients, topk_mask

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Projection:
    P_phi: dict[str, torch.Tensor]  # module -> (D_m,) float64
    spectra: dict[str, list[float]] = field(default_factory=dict)  # scope -> eigenvalues (descending)
    effective_k: dict[str, int] = field(default_factory=dict)
    damping: dict[str, float] = field(default_factory=dict)
    available_rank: dict[str, int] = field(default_factory=dict)
    G_P: dict[str, np.ndarray] = field(default_factory=dict)  # module -> G_m P φ_m (N,)
    # scope -> (N, k) coefficients of the chosen directions in the gradient span, v_j = G_scopeᵀ coef[:, j]
    # (empirical estimator only; what benchmarks compare subspaces with)
    basis_coef: dict[str, np.ndarray] = field(default_factory=dict)


def with_fisher(fisher: Callable[[], FisherRun], use: Callable[[FisherRun], T]) -> tuple[FisherRun, T]:
    """``fisher()`` (compute or load the Fisher run), then ``use(run)``. ``use`` may read the gradient store
    again (``Gᵀβ``); if that read finds damaged rows, they are discarded and the entry recomputed once
    (``fisher()`` again) before ``use`` runs anew."""
    for attempt in (1, 2):
        run = fisher()
        try:
            return run, use(run)
        except CacheCorruptError as exc:
            if attempt == 2:
                raise CacheCorruptError(f"{exc}. Delete the Fisher cache entry {run.folder} and run again") from None
            log.warning("Fisher cache %s is damaged (%s): recomputing the damaged rows", run.folder, exc)
            run.close()
            discard_damaged(run.folder, exc)
    raise AssertionError("unreachable")


def project_safety_from_cache(fisher, phi: dict[str, torch.Tensor], **kwargs) -> tuple[FisherRun, Projection]:
    """:func:`project_safety` on ``fisher()``'s run, repairing a damaged store once (:func:`with_fisher`)."""
    return with_fisher(fisher, lambda run: project_safety(run, phi, **kwargs))


def _groups(modules: list[str], scope: str) -> dict[str, list[str]]:
    return {"global": modules} if scope == "global" else {m: [m] for m in modules}


def project_safety(
    run: FisherRun, phi: dict[str, torch.Tensor], *, k: int | str, scope: str, estimator: str, eps: float,
    clamp_k: bool, k_rule: str = "mass", k_mass: float = 0.9,
) -> Projection:
    """``P φ_m`` (and ``G_m P φ_m``) for every module m of the safety adapter; ``k="auto"`` chooses k per
    scope from the spectrum (:func:`~sstmerge.linalg.eigen.choose_k`)."""
    stats = run.stats
    out = Projection(P_phi={})
    betas: dict[str, np.ndarray] = {}  # module -> β of its scope: P φ_m = G_mᵀ β, all scopes in one pass
    for scope_name, members in _groups(stats.modules, scope).items():
        dim = sum(stats.dim(m) for m in members)
        where = f"scope {scope_name}"
        if estimator == "empirical":
            K = stats.gram_total if scope == "global" else sum(stats.gram[m] for m in members)
            sub = safety_subspace_from_gram(K, stats.n_harm, k, dim=dim, eps=eps, clamp_k=clamp_k, where=where,
                                            k_rule=k_rule, k_mass=k_mass)
            G_phi = sum(stats.G_phi[m] for m in members)
            beta = span_coefficients(sub.basis_coef, G_phi)  # (N,)
            for m in members:
                betas[m] = beta
                out.G_P[m] = run.gram_times(m, beta)  # G_m G_mᵀ β
            out.spectra[scope_name] = sub.eigenvalues.tolist()
            out.effective_k[scope_name] = sub.k
            out.damping[scope_name] = sub.damping
            out.available_rank[scope_name] = sub.available_rank
            out.basis_coef[scope_name] = sub.basis_coef
        elif estimator == "diagonal":
            f_h = np.concatenate([stats.diag_harm[m] for m in members])
            f_b = np.concatenate([stats.diag_benign[m] for m in members])
            scores, delta = diagonal_scores(f_h, f_b, eps)
            available = int((scores > 0).sum())
            k_scope = choose_k(np.sort(scores)[::-1], k_rule, k_mass, where) if k == "auto" else k
            if k_scope > available and not clamp_k:
                raise FisherError(f"scope {scope_name}: k={k_scope} but only {available} coordinates have a positive "
                                  f"ratio; use k <= {available} or --clamp-k")
            k_eff = min(k_scope, available)
            mask = torch.from_numpy(topk_mask(scores, k_eff))
            offset = 0
            for m in members:
                size = stats.dim(m)
                out.P_phi[m] = phi[m] * mask[offset : offset + size].to(phi[m].dtype)
                out.G_P[m] = run.G_times(m, out.P_phi[m])
                offset += size
            out.spectra[scope_name] = np.sort(scores)[::-1][: max(k_eff, min(100, len(scores)))].tolist()
            out.effective_k[scope_name] = k_eff
            out.damping[scope_name] = delta
            out.available_rank[scope_name] = available
        else:
            raise FisherError(f"unknown Fisher estimator {estimator!r}")
    if betas:
        out.P_phi.update(run.combine(betas))  # G_mᵀ β: store column chunks, or the weighted backward pass
    return out


@dataclass
class Removal:
    """What :func:`remove_directions` found: ``removed[m]`` = module m of ``Σ_{i ∈ L} c_i v_i`` (D_m,) float64,
    ``G_removed[m] = G_m removed[m]`` (N,), and per scope the spectrum and the predicted effect."""

    removed: dict[str, torch.Tensor]
    G_removed: dict[str, np.ndarray]
    scopes: dict[str, dict] = field(default_factory=dict)


Selector = Callable[[GeneralizedEigenbasis, str], np.ndarray]


def remove_directions(run: FisherRun, *, scope: str, eps: float, select: Selector) -> Removal:
    """Decompose the adapter of the Fisher run, ``φ = φ_⊥ + Σ_i c_i v_i`` (per scope), and return the part
    along the eigenvectors ``select(basis, scope_name)`` (a boolean mask over the descending spectrum) picks.

    Per scope the report holds the spectrum, the removed indices and eigenvalue range, the predicted safety
    ``Σ λ_i c_i²`` and utility cost ``Σ c_i²`` before and after, and the Euclidean share of φ removed.
    """
    stats = run.stats
    out = Removal(removed={}, G_removed={})
    betas: dict[str, np.ndarray] = {}  # module -> β of its scope: removed_m = G_mᵀ β, all scopes in one pass
    for scope_name, members in _groups(stats.modules, scope).items():
        dim = sum(stats.dim(m) for m in members)
        K = stats.gram_total if scope == "global" else sum(stats.gram[m] for m in members)
        basis = generalized_eigenbasis_from_gram(K, stats.n_harm, dim=dim, eps=eps, where=f"scope {scope_name}")
        c = eigen_coordinates(basis, K, sum(stats.G_phi[m] for m in members))
        mask = np.asarray(select(basis, scope_name), dtype=bool)
        beta = removal_coefficients(basis, c, mask)  # Σ_L c_i v_i = Gᵀ β
        for m in members:
            if mask.any():
                betas[m] = beta
                out.G_removed[m] = run.gram_times(m, beta)
            else:
                out.removed[m] = torch.zeros(stats.dim(m), dtype=torch.float64)
                out.G_removed[m] = np.zeros(K.shape[0])
        lam, c2 = basis.eigenvalues, c * c
        removed_idx = np.flatnonzero(mask)
        out.scopes[scope_name] = {
            "eigenvalues": lam.tolist(),
            "rank": basis.rank,
            "positive": basis.positive,
            "damping_delta": basis.damping,
            "removed": removed_idx.tolist(),
            "removed_lambda_range": [float(lam[mask].min()), float(lam[mask].max())] if mask.any() else None,
            "predicted_safety_before": float((lam * c2).sum()),
            "predicted_safety_after": float((lam * c2)[~mask].sum()),
            "predicted_utility_cost_before": float(c2.sum()),
            "predicted_utility_cost_after": float(c2[~mask].sum()),
        }
    if betas:
        out.removed.update(run.combine(betas))  # G_mᵀ β: store column chunks, or the weighted backward pass
    return out
