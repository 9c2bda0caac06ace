"""Compose utility adapters and the (projected) safety adapter into one exact LoRA adapter."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from .._logging import quiet
from ..errors import AdapterMismatchError
from ..io.adapter import LoraAdapter, LoraModule
from ..io.models import BaseModelInfo
from ..linalg.lowrank import concat_lora, dense_to_lora, pad_rank, truncate_lora

if TYPE_CHECKING:
    from .baselines import DeltaMergeMethod

log = logging.getLogger(__name__)


def utility_coefficients(n: int, scheme: str, weights: Sequence[float] | None) -> list[float]:
    """``c_i``: 1 (``sum``) or 1/n (``average``), times the per-adapter weight if given."""
    if weights is not None and len(weights) != n:
        raise AdapterMismatchError(
            f"utility_weights has {len(weights)} values but {n} utility adapters were given; pass one weight per adapter"
        )
    base = 1.0 if scheme == "sum" else 1.0 / max(n, 1)
    return [base * (weights[i] if weights is not None else 1.0) for i in range(n)]


def compose_adapters(
    utility: Sequence[LoraAdapter],
    coefficients: Sequence[float],
    safety: LoraAdapter | None,
    safety_weights: dict[str, float],
    *,
    base: BaseModelInfo | None = None,
    recompress_rank: int | None = None,
) -> tuple[LoraAdapter, dict]:
    """``ΔW^m = Σ_i c_i ΔW_Ui^m + w^m ΔW_S^m`` for the union of modules, as one LoRA adapter.

    Each module becomes ``A = [c_1 s_1 A_1; …; w s_S A_S]``, ``B = [B_1 … B_S]`` (scale 1), an adapter
    missing the module contributes zero (listed in the report). All modules are then zero-padded to one
    common rank (or recompressed to ``recompress_rank`` by truncated SVD, with the relative Frobenius error
    per module) so the output is a plain PEFT config without rank patterns.

    Full-tensor entries (``modules_to_save``) are merged as differences from the base weight:
    ``W = W_base + Σ_i c_i (W_i − W_base) + w (W_S − W_base)``; this needs ``base``.

    Returns the merged adapter and a per-module report.
    """
    sources: list[tuple[str, LoraAdapter, float | None]] = [(f"utility[{i}]", a, c) for i, (a, c) in enumerate(zip(utility, coefficients))]
    if safety is not None:
        sources.append(("safety", safety, None))
    names = sorted({m for _, a, _ in sources for m in a.modules})
    merged_pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    report: dict[str, dict] = {}
    for module in tqdm(names, desc="compose", unit="module", disable=quiet(), leave=False):
        terms, present, absent = [], [], []
        for label, adapter, coef in sources:
            lm: LoraModule | None = adapter.modules.get(module)
            if lm is None:
                absent.append(label)
                continue
            weight = safety_weights.get(module, 0.0) if coef is None else coef
            present.append(label)
            if weight != 0.0:
                terms.append((weight * lm.scale, lm.A, lm.B))
        entry: dict = {"present_in": present, "absent_in": absent}
        if "safety" in present:
            entry["safety_weight"] = safety_weights.get(module, 0.0)
        if not terms:  # every contribution has weight 0: the module's update is exactly zero
            lm0 = next(a.modules[module] for _, a, _ in sources if module in a.modules)
            terms = [(0.0, lm0.A[:1], lm0.B[:, :1])]
        A, B = concat_lora(terms)
        entry["rank_concat"] = int(A.shape[0])
        if recompress_rank is not None:
            A, B, err = truncate_lora(A, B, recompress_rank)
            entry["recompression_rel_error"] = err
        merged_pairs[module] = (A, B)
        report[module] = entry
    modules, rank = _common_rank_modules(merged_pairs, report)
    full = _merge_full_tensors(sources, safety_weights, base)
    for key in full:
        report[key] = {"full_tensor": True, "present_in": [lbl for lbl, a, _ in sources if key in a.full_tensors]}
    merged = LoraAdapter(modules=modules, full_tensors=full, config={"r": rank, "lora_alpha": rank})
    return merged, report


def _common_rank_modules(
    merged_pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], report: dict[str, dict]
) -> tuple[dict[str, LoraModule], int]:
    """Zero-pad every merged ``(A, B)`` to one common rank (scale 1), so the output needs no rank pattern;
    log how many modules were missing from some adapter. Returns the modules and the rank."""
    partial = [m for m, e in report.items() if e["absent_in"]]
    if partial:
        log.info("%d of %d modules are missing from some adapters (they contribute zero there; see report)",
                 len(partial), len(merged_pairs))
    rank = max((a.shape[0] for a, _ in merged_pairs.values()), default=0)
    return {m: LoraModule(*pad_rank(A, B, rank), scale=1.0) for m, (A, B) in merged_pairs.items()}, rank


def _merge_full_tensors(sources, safety_weights: dict[str, float], base: BaseModelInfo | None) -> dict[str, torch.Tensor]:
    keys = sorted({k for _, a, _ in sources for k in a.full_tensors})
    if not keys:
        return {}
    if base is None:
        raise AdapterMismatchError(
            f"full-tensor entries {keys} (modules_to_save) are merged as differences from the base weight; pass the base model"
        )
    out = {}
    for key in keys:
        w_base = base.load_parameter(key).to(torch.float64)
        total = w_base.clone()
        for _, adapter, coef in sources:
            if key in adapter.full_tensors:
                weight = safety_weights.get(key, 0.0) if coef is None else coef
                total += weight * (adapter.full_tensors[key].to(torch.float64) - w_base)
        out[key] = total.to(torch.float32)
    return out


def compose_dense(
    method: DeltaMergeMethod,
    utility: Sequence[LoraAdapter],
    coefficients: Sequence[float],
    safety: LoraAdapter | None,
    safety_weights: dict[str, float],
    options: Any,
    *,
    recompress_rank: int | None = None,
) -> tuple[LoraAdapter, dict]:
    """Run a dense method module by module over the union of modules and factor each result back into LoRA.

    For module m: ``ΔW_Ui^m`` and ``ΔW_S^m`` in float64 from the factors (an adapter missing m contributes
    nothing and is listed under ``absent_in``), ``ΔW^m = method.merge_module(...)``, then the best rank-R pair
    by truncated SVD with ``R = recompress_rank`` or, by default, ``min(Σ ranks of the inputs present, d_out,
    d_in)`` (the rank the exact task-arithmetic sum would have). The relative Frobenius error of that
    truncation is ``recompression_rel_error`` (≈ 0 when ΔW^m has rank ≤ R, e.g. safe_lora and safemerge;
    real for TIES/DARE/magnitude, whose pruned sums are full rank). Only one module's dense matrices are held
    at a time. Full-tensor entries (modules_to_save) are refused by the caller.
    """
    sources: list[tuple[str, LoraAdapter]] = [(f"utility[{i}]", a) for i, a in enumerate(utility)]
    if safety is not None:
        sources.append(("safety", safety))
    names = sorted({m for _, a in sources for m in a.modules})
    merged_pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    report: dict[str, dict] = {}
    for module in tqdm(names, desc=method.name, unit="module", disable=quiet(), leave=False):
        present = [label for label, a in sources if module in a.modules]
        entry: dict = {"present_in": present, "absent_in": [label for label, a in sources if module not in a.modules]}
        u_deltas, u_coefs = [], []
        for a, c in zip(utility, coefficients):
            if module in a.modules:
                u_deltas.append(a.modules[module].delta(torch.float64))  # (d_out, d_in)
                u_coefs.append(c)
        s_delta = safety.modules[module].delta(torch.float64) if safety is not None and module in safety.modules else None
        if s_delta is not None:
            entry["safety_weight"] = safety_weights.get(module, 0.0)
        dW, facts = method.merge_module(module, u_deltas, u_coefs, s_delta, safety_weights.get(module, 0.0), options)
        rank_in = sum(a.modules[module].rank for _, a in sources if module in a.modules)
        rank = recompress_rank if recompress_rank is not None else min(rank_in, *dW.shape)
        A, B, err = dense_to_lora(dW, rank)
        entry.update(facts)
        entry.update({"rank_inputs": rank_in, "rank": rank, "recompression_rel_error": err})
        merged_pairs[module] = (A, B)
        report[module] = entry
    modules, rank = _common_rank_modules(merged_pairs, report)
    return LoraAdapter(modules=modules, config={"r": rank, "lora_alpha": rank}), report
