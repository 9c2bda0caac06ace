"""From Fisher statistics to ``P φ`` per module (global or per-module scope; empirical or diagonal)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import CacheCorruptError, FisherError
from ..fisher.run import FisherRun, discard_damaged
from ..linalg.eigen import diagonal_scores, safety_subspace_from_gram
from ..linalg.projection import project_block, span_coefficients, topk_mask

log = logging.getLogger(__name__)


@dataclass
class Projection:
    P_phi: dict[str, torch.Tensor]  # module -> (D_m,) float64
    spectra: dict[str, list[float]] = field(default_factory=dict)  # scope -> eigenvalues (descending)
    effective_k: dict[str, int] = field(default_factory=dict)
    damping: dict[str, float] = field(default_factory=dict)
    available_rank: dict[str, int] = field(default_factory=dict)


def project_safety_from_cache(fisher, phi: dict[str, torch.Tensor], **kwargs) -> tuple[FisherRun, Projection]:
    """``fisher()`` (compute or load the Fisher run), then :func:`project_safety`. The projection reads the
    gradient store again (``Gᵀβ``); if that read finds damaged rows, they are discarded and the entry
    recomputed once (``fisher()`` again) before projecting anew."""
    for attempt in (1, 2):
        run = fisher()
        try:
            return run, project_safety(run, phi, **kwargs)
        except CacheCorruptError as exc:
            if attempt == 2:
                raise CacheCorruptError(f"{exc}. Delete the Fisher cache entry {run.folder} and run again") from None
            log.warning("Fisher cache %s is damaged (%s): recomputing the damaged rows", run.folder, exc)
            run.store.close()
            discard_damaged(run.folder, exc, run.store.layout)
    raise AssertionError("unreachable")


def project_safety(
    run: FisherRun, phi: dict[str, torch.Tensor], *, k: int, scope: str, estimator: str, eps: float, clamp_k: bool
) -> Projection:
    """``P φ_m`` for every module m of the safety adapter."""
    stats = run.stats
    modules = stats.modules
    groups = {"global": modules} if scope == "global" else {m: [m] for m in modules}
    out = Projection(P_phi={})
    for scope_name, members in groups.items():
        dim = sum(stats.dim(m) for m in members)
        if estimator == "empirical":
            K = stats.gram_total if scope == "global" else sum(stats.gram[m] for m in members)
            sub = safety_subspace_from_gram(K, stats.n_harm, k, dim=dim, eps=eps, clamp_k=clamp_k, where=f"scope {scope_name}")
            G_phi = sum(stats.G_phi[m] for m in members)
            beta = span_coefficients(sub.basis_coef, G_phi)  # (N,)
            for m in members:
                chunks = run.store.iter_column_chunks(m)  # G_mᵀ β one column chunk at a time
                out.P_phi[m] = torch.cat([project_block(C, beta) for _, _, C in chunks])
            out.spectra[scope_name] = sub.eigenvalues.tolist()
            out.effective_k[scope_name] = sub.k
            out.damping[scope_name] = sub.damping
            out.available_rank[scope_name] = sub.available_rank
        elif estimator == "diagonal":
            f_h = np.concatenate([stats.diag_harm[m] for m in members])
            f_b = np.concatenate([stats.diag_benign[m] for m in members])
            scores, delta = diagonal_scores(f_h, f_b, eps)
            available = int((scores > 0).sum())
            if k > available and not clamp_k:
                raise FisherError(f"scope {scope_name}: k={k} but only {available} coordinates have a positive "
                                  f"ratio; use k <= {available} or --clamp-k")
            k_eff = min(k, available)
            mask = torch.from_numpy(topk_mask(scores, k_eff))
            offset = 0
            for m in members:
                size = stats.dim(m)
                out.P_phi[m] = phi[m] * mask[offset : offset + size].to(phi[m].dtype)
                offset += size
            out.spectra[scope_name] = np.sort(scores)[::-1][: max(k_eff, min(100, len(scores)))].tolist()
            out.effective_k[scope_name] = k_eff
            out.damping[scope_name] = delta
            out.available_rank[scope_name] = available
        else:
            raise FisherError(f"unknown Fisher estimator {estimator!r}")
    return out
