"""Count sketches of per-sample gradients: their inner products without keeping them. Pure functions of tensors.

Every quantity the Fisher eigenproblem needs is an inner product of per-sample gradients g_i ∈ R^D (the Gram
``G Gᵀ``, ``G φ``). A count sketch ``S`` (m × D) sends coordinate j to bucket ``h(j) ∈ [0, m)`` with sign
``s(j) = ±1``::

    (S g)_b = Σ_{j : h(j) = b} s(j) g_j                      (m,)

and preserves inner products in expectation: ``E[(S g)ᵀ(S g')] = gᵀ g'``, with variance
``(‖g‖² ‖g'‖² + (gᵀ g')² − 2 Σ_j g_j² g'_j²) / m``, so a Gram matrix ``K = G Gᵀ`` (N × N) is estimated by
``(G Sᵀ)(G Sᵀ)ᵀ`` with relative error O(1/√m), whatever D is. With ``m ≥ D`` the buckets are a random
injection (distinct buckets), so the sketch is exact: ``(S g)ᵀ(S g') = gᵀ g'``.

Blocks (modules) are sketched with independent hashes (a seed per block) into the same m buckets: the sum
``Σ_m S_m g_m`` is a count sketch of the concatenation ``[g_1, …, g_M]``, so a pass over modules never needs
the whole gradient. Sketching is linear, so batches, chunks and processes add up.

Error control without the exact Gram: two independent sketches ``K_1, K_2`` of the same gradients are unbiased
and independent, so ``E‖K_1 − K_2‖²_F = 2 E‖K_1 − K‖²_F``; :func:`gram_error_estimate` turns that into an
estimate of each sketch's relative Frobenius error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from .task_vectors import module_seed


def sketch_hash(d: int, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The hash of a count sketch of ``d`` coordinates into ``m`` buckets: ``bucket`` (d,) int64 in [0, m) and
    ``sign`` (d,) float32 of ±1, drawn from ``seed``. With ``m ≥ d`` the buckets are distinct (exact sketch)."""
    if d < 0 or m < 1:
        raise ValueError(f"count sketch of {d} coordinates into {m} buckets: need d >= 0 and m >= 1")
    gen = torch.Generator().manual_seed(int(seed))
    bucket = torch.randperm(m, generator=gen)[:d] if m >= d else torch.randint(m, (d,), generator=gen)
    sign = torch.randint(2, (d,), generator=gen).to(torch.float32).mul_(2).sub_(1)
    return bucket, sign


def count_sketch(G: torch.Tensor, bucket: torch.Tensor, sign: torch.Tensor, m: int,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Row-wise sketch ``G Sᵀ``: gradients ``G`` (n, d) → sketches (n, m) in float32, added into ``out`` when given
    (blocks and batches accumulate). ``bucket``/``sign`` (d,) from :func:`sketch_hash`."""
    if G.ndim != 2 or G.shape[1] != bucket.shape[0] or sign.shape != bucket.shape:
        raise ValueError(f"count_sketch: G {tuple(G.shape)} needs (n, {bucket.shape[0]}) columns, one per hashed "
                         f"coordinate (bucket {tuple(bucket.shape)}, sign {tuple(sign.shape)})")
    if out is None:
        out = torch.zeros(G.shape[0], m, dtype=torch.float32, device=G.device)
    elif out.shape != (G.shape[0], m):
        raise ValueError(f"count_sketch: out is {tuple(out.shape)}, expected ({G.shape[0]}, {m})")
    return out.index_add_(1, bucket.to(G.device), G.to(torch.float32) * sign.to(G.device))


def sketch_blocks(blocks: Mapping[str, torch.Tensor], m: int, seed: int) -> torch.Tensor:
    """``Σ_name S_name G_name``: per-block gradients ``{name: (n, d_name)}`` → one (n, m) sketch of their
    concatenation, each block hashed with its own seed (``module_seed(seed, name)``), so the result does not depend
    on the blocks' order (up to float rounding) and any subset of blocks can be sketched elsewhere and added."""
    out = None
    for name, G in blocks.items():
        bucket, sign = sketch_hash(G.shape[1], m, module_seed(seed, name))
        out = count_sketch(G, bucket, sign, m, out)
    if out is None:
        raise ValueError("sketch_blocks: no blocks")
    return out


def gram(SG: torch.Tensor) -> torch.Tensor:
    """The Gram matrix ``(G Sᵀ)(G Sᵀ)ᵀ`` (n, n) of sketched gradients, accumulated in float64."""
    S = SG.to(torch.float64)
    return S @ S.T


def relative_error(estimate: torch.Tensor, exact: torch.Tensor) -> float:
    """``‖estimate − exact‖_F / ‖exact‖_F`` (0 when both are 0)."""
    num = float(torch.linalg.norm((estimate - exact).to(torch.float64)))
    den = float(torch.linalg.norm(exact.to(torch.float64)))
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def gram_error_estimate(SG_1: torch.Tensor, SG_2: torch.Tensor) -> float:
    """Estimated relative Frobenius error of one sketched Gram, from two independent sketches of the same
    gradients: ``‖K_1 − K_2‖_F / (√2 ‖(K_1 + K_2) / 2‖_F)`` (see the module docstring; the mean of the two
    stands in for the unknown exact Gram)."""
    K1, K2 = gram(SG_1), gram(SG_2)
    scale = float(torch.linalg.norm((K1 + K2) / 2))
    if scale == 0:
        return 0.0
    return float(torch.linalg.norm(K1 - K2)) / (math.sqrt(2) * scale)


def module_sketch_width(d: int, m: int) -> int:
    """Columns a module of ``d`` coordinates takes in a sketch of dimension ``m``: ``d`` when ``d ≤ m`` (kept
    exactly, see :func:`sketch_module`), else ``m`` rounded down to even (two independent halves)."""
    if m < 2:
        raise ValueError(f"sketch dimension {m}: need m >= 2")
    return d if d <= m else m - m % 2


def sketch_module(G: torch.Tensor, name: str, m: int, seed: int) -> torch.Tensor:
    """One module's per-sample gradients ``G`` (n, d) → its sketch (n, :func:`module_sketch_width`) float32.

    - ``d ≤ m``: an injective count sketch (a signed permutation), so inner products are exact;
    - ``d > m``: two independent count sketches ``S_1, S_2`` (m/2 buckets each, seeds from ``seed`` and the
      module name) side by side, each scaled by 1/√2: the sketched Gram is ``(K_1 + K_2) / 2``, unbiased, and
      the two halves' Grams are independent estimates of the same ``G Gᵀ``, which :func:`gram_error_from_halves`
      turns into an error bar at no extra cost.
    """
    return sketch_module_chunks([(0, G.shape[1], G)], name, G.shape[1], m, seed)


def sketch_module_chunks(chunks, name: str, d: int, m: int, seed: int) -> torch.Tensor:
    """:func:`sketch_module` of a module given as column chunks ``(lo, hi, G[:, lo:hi])`` (any order, together
    covering its ``d`` columns once): sketching is linear, so chunk sketches add up. → (n, width) float32."""
    width = module_sketch_width(d, m)
    if d <= m:
        hashes = [(sketch_hash(d, d, module_seed(seed, name)), 1.0, 0, d)]
    else:
        half = width // 2
        hashes = [(sketch_hash(d, half, module_seed(seed, f"{name}#half{h}")), 1.0 / math.sqrt(2.0), h * half, half)
                  for h in range(2)]
    out = None
    for lo, hi, C in chunks:
        if out is None:
            out = torch.zeros(C.shape[0], width, dtype=torch.float32, device=C.device)
        for (bucket, sign), scale, start, buckets in hashes:
            count_sketch(C, bucket[lo:hi], sign[lo:hi] * scale, buckets, out[:, start : start + buckets])
    if out is None:
        raise ValueError(f"sketch of module {name}: no column chunks")
    return out


def sketch_halves(SG: torch.Tensor, d: int, m: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The two independent half-sketches of a module sketched by :func:`sketch_module`, each rescaled to an
    unbiased sketch on its own (``√2 ×``); None when the module was kept exactly (``d ≤ m``)."""
    if d <= m:
        return None
    half = SG.shape[1] // 2
    return SG[:, :half] * math.sqrt(2.0), SG[:, half:] * math.sqrt(2.0)


def gram_error_from_halves(K_1: torch.Tensor, K_2: torch.Tensor) -> float:
    """Estimated relative Frobenius error of the averaged Gram ``(K_1 + K_2) / 2`` from two independent
    unbiased estimates: each has error ≈ ``‖K_1 − K_2‖_F / √2`` (see the module docstring), their mean
    half the variance, so ``‖K_1 − K_2‖_F / (2 ‖(K_1 + K_2)/2‖_F)``."""
    scale = float(torch.linalg.norm((K_1 + K_2).to(torch.float64) / 2))
    if scale == 0:
        return 0.0
    return float(torch.linalg.norm((K_1 - K_2).to(torch.float64))) / (2.0 * scale)
