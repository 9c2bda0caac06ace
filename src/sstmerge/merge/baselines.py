"""Baseline merge methods that work on dense weight updates: TIES, DARE, magnitude, Safe LoRA, SafeMERGE.

A :class:`DeltaMergeMethod` merges one module at a time: it gets the dense updates
``ΔW_U1..ΔW_Un`` (the utility adapters present in that module), their coefficients ``c_i``, the safety update
``ΔW_S`` (or None) and its weight ``w^m``, and returns the merged dense ``ΔW`` plus facts for the report.
:func:`sstmerge.merge.compose.compose_dense` runs it over the modules and factors each result back into a
LoRA pair by truncated SVD. The tensor math lives in :mod:`sstmerge.linalg.task_vectors`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..linalg import task_vectors as tv

if TYPE_CHECKING:
    from .options import MergeOptions


class DeltaMergeMethod(ABC):
    """Interface of a method that merges the dense per-module updates (no LoRA factors involved)."""

    name: ClassVar[str]
    needs_fisher: ClassVar[bool] = False
    needs_safety: ClassVar[bool] = False

    @abstractmethod
    def merge_module(
        self,
        name: str,
        utility_deltas: Sequence[torch.Tensor],
        coefficients: Sequence[float],
        safety_delta: torch.Tensor | None,
        safety_weight: float,
        options: MergeOptions,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Merged ``ΔW`` (d_out, d_in) of module ``name`` and its report entry."""

    def describe(self, options: MergeOptions) -> dict[str, Any]:
        """The options this method used (for report["method"])."""
        return {}

    def summarize(self, modules: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Method-level facts gathered from the per-module report entries."""
        return {}


def _task_tensors(utility_deltas, coefficients, safety_delta, safety_weight):
    """``[ΔW_U1..ΔW_Un, ΔW_S]`` with weights ``[c_1..c_n, w^m]`` (the safety term only where present)."""
    deltas, weights = list(utility_deltas), list(coefficients)
    if safety_delta is not None:
        deltas.append(safety_delta)
        weights.append(safety_weight)
    return deltas, weights


class TiesMerge(DeltaMergeMethod):
    """TIES (Yadav et al. 2023, PEFT's ties): trim to density, elect sign, disjoint mean of [c_i ΔW_Ui, w ΔW_S]."""

    name = "ties"

    def merge_module(self, name, utility_deltas, coefficients, safety_delta, safety_weight, options):
        deltas, weights = _task_tensors(utility_deltas, coefficients, safety_delta, safety_weight)
        return tv.ties_merge(deltas, weights, options.density, options.majority_sign_method), {}

    def describe(self, options):
        return {"density": options.density, "majority_sign_method": options.majority_sign_method}


class DareLinearMerge(DeltaMergeMethod):
    """DARE linear (Yu et al. 2023, PEFT's dare_linear): random drop + rescale by 1/density, then weighted sum."""

    name = "dare_linear"
    use_ties: ClassVar[bool] = False

    def merge_module(self, name, utility_deltas, coefficients, safety_delta, safety_weight, options):
        deltas, weights = _task_tensors(utility_deltas, coefficients, safety_delta, safety_weight)
        seed = tv.module_seed(options.seed, name)
        merged = tv.dare_merge(deltas, weights, options.density, seed=seed, use_ties=self.use_ties,
                               majority_sign_method=options.majority_sign_method)
        return merged, {"dare_seed": seed}

    def describe(self, options):
        out = {"density": options.density, "seed": options.seed, "module_seed": "(seed + crc32(module)) mod 2^63"}
        if self.use_ties:
            out["majority_sign_method"] = options.majority_sign_method
        return out


class DareTiesMerge(DareLinearMerge):
    """DARE-TIES (PEFT's dare_ties): random drop + rescale, then TIES sign election and disjoint mean."""

    name = "dare_ties"
    use_ties = True


class MagnitudeMerge(DeltaMergeMethod):
    """Magnitude pruning (PEFT's magnitude_prune): keep the top-density share of each ΔW, then weighted sum."""

    name = "magnitude"

    def merge_module(self, name, utility_deltas, coefficients, safety_delta, safety_weight, options):
        deltas, weights = _task_tensors(utility_deltas, coefficients, safety_delta, safety_weight)
        return tv.magnitude_merge(deltas, weights, options.density), {}

    def describe(self, options):
        return {"density": options.density}


class SafeLoraMerge(DeltaMergeMethod):
    """Safe LoRA-style (Hsu et al. 2024): project utility updates with cos(ΔW_U, P_V ΔW_U) < τ onto col(ΔW_S), add w ΔW_S."""

    name = "safe_lora"
    needs_safety = True

    def merge_module(self, name, utility_deltas, coefficients, safety_delta, safety_weight, options):
        merged, sims, projected = tv.safe_lora_merge(utility_deltas, coefficients, safety_delta, safety_weight,
                                                     options.similarity_threshold)
        return merged, {"similarity": sims, "projected": projected}

    def describe(self, options):
        return {"similarity_threshold": options.similarity_threshold,
                "alignment_direction": "V = ΔW_S per module; P_V = orthogonal projection onto col(V)"}

    def summarize(self, modules):
        tested = {m: e for m, e in modules.items() if any(s is not None for s in e.get("similarity", []))}
        projected = sorted(m for m, e in tested.items() if any(e["projected"]))
        return {"n_modules_tested": len(tested), "n_modules_projected": len(projected), "projected_modules": projected}


class SafemergeMerge(DeltaMergeMethod):
    """SafeMERGE-style (Djuraev et al. 2025): modules with cos < τ get α Σ c_i ΔW_Ui + (1−α) w ΔW_S, others utility only."""

    name = "safemerge"
    needs_safety = True

    def merge_module(self, name, utility_deltas, coefficients, safety_delta, safety_weight, options):
        merged, sims, flagged = tv.safemerge_merge(utility_deltas, coefficients, safety_delta, safety_weight,
                                                   options.similarity_threshold, options.safemerge_alpha)
        return merged, {"similarity": sims, "flagged": flagged}

    def describe(self, options):
        return {"similarity_threshold": options.similarity_threshold, "safemerge_alpha": options.safemerge_alpha,
                "flag_rule": "a module is flagged if ANY utility update's similarity is below the threshold"}

    def summarize(self, modules):
        flagged = sorted(m for m, e in modules.items() if e.get("flagged"))
        return {"n_modules_flagged": len(flagged), "flagged_modules": flagged}


BASELINES: tuple[type[DeltaMergeMethod], ...] = (
    TiesMerge, DareLinearMerge, DareTiesMerge, MagnitudeMerge, SafeLoraMerge, SafemergeMerge,
)
