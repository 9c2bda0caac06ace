"""The dense baselines: TIES, DARE, magnitude, Safe LoRA, SafeMERGE (each a :class:`~.method.DenseMethod`).

A dense method merges one module at a time: it gets the dense updates ``ΔW_U1..ΔW_Un`` (the utility adapters
present in that module), their coefficients ``c_i``, the safety update ``ΔW_S`` (or None) and its weight
``w^m``, and returns the merged dense ``ΔW`` plus facts for the report; the shared composer factors each
result back into a LoRA pair by truncated SVD. The tensor math lives in :mod:`sstmerge.linalg.task_vectors`.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from ..linalg import task_vectors as tv
from .method import DenseMethod, register_method
from .options import MethodParams


class DensityParams(MethodParams):
    density: float = Field(0.5, gt=0.0, le=1.0, description="share of the entries of each ΔW that is kept (1 = no pruning)")


class SignParams(DensityParams):
    majority_sign_method: Literal["total", "frequency"] = Field(
        "total", description="elect the sign of the summed values (total) or the most frequent sign")


class SimilarityParams(MethodParams):
    similarity_threshold: float = Field(
        0.35, ge=0.0, le=2.0, description="τ; a utility update with cos(ΔW_U, P_V ΔW_U) < τ is projected (safe_lora) "
        "or flags its module (safemerge); 0 = never, > 1 = always")


class SafemergeParams(SimilarityParams):
    safemerge_alpha: float = Field(0.5, ge=0.0, le=1.0, description="flagged modules get α·Σ c_i ΔW_Ui + (1-α)·w·ΔW_S")


def _task_tensors(utility_deltas, coefficients, safety_delta, safety_weight):
    """``[ΔW_U1..ΔW_Un, ΔW_S]`` with weights ``[c_1..c_n, w^m]`` (the safety term only where present)."""
    deltas, weights = list(utility_deltas), list(coefficients)
    if safety_delta is not None:
        deltas.append(safety_delta)
        weights.append(safety_weight)
    return deltas, weights


@register_method
class TiesMerge(DenseMethod):
    """TIES (Yadav et al. 2023, PEFT's ties): trim to density, elect sign, disjoint mean of [c_i ΔW_Ui, w ΔW_S]."""

    name = "ties"
    Params = SignParams

    def merge_module(self, name, utility_deltas, coefficients, safety_delta, safety_weight, params, seed):
        deltas, weights = _task_tensors(utility_deltas, coefficients, safety_delta, safety_weight)
        return tv.ties_merge(deltas, weights, params.density, params.majority_sign_method), {}


@register_method
class DareLinearMerge(DenseMethod):
    """DARE linear (Yu et al. 2023, PEFT's dare_linear): random drop + rescale by 1/density, then weighted sum."""

    name = "dare_linear"
    Params = DensityParams
    use_ties: ClassVar[bool] = False

    def merge_module(self, name, utility_deltas, coefficients, safety_delta, safety_weight, params, seed):
        deltas, weights = _task_tensors(utility_deltas, coefficients, safety_delta, safety_weight)
        module_seed = tv.module_seed(seed, name)
        merged = tv.dare_merge(deltas, weights, params.density, seed=module_seed, use_ties=self.use_ties,
                               majority_sign_method=getattr(params, "majority_sign_method", "total"))
        return merged, {"dare_seed": module_seed}

    def describe(self, options):
        return {**super().describe(options), "seed": options.seed, "module_seed": "(seed + crc32(module)) mod 2^63"}


@register_method
class DareTiesMerge(DareLinearMerge):
    """DARE-TIES (PEFT's dare_ties): random drop + rescale, then TIES sign election and disjoint mean."""

    name = "dare_ties"
    Params = SignParams
    use_ties = True


@register_method
class MagnitudeMerge(DenseMethod):
    """Magnitude pruning (PEFT's magnitude_prune): keep the top-density share of each ΔW, then weighted sum."""

    name = "magnitude"
    Params = DensityParams

    def merge_module(self, name, utility_deltas, coefficients, safety_delta, safety_weight, params, seed):
        deltas, weights = _task_tensors(utility_deltas, coefficients, safety_delta, safety_weight)
        return tv.magnitude_merge(deltas, weights, params.density), {}


@register_method
class SafeLoraMerge(DenseMethod):
    """Safe LoRA-style (Hsu et al. 2024): project utility updates with cos(ΔW_U, P_V ΔW_U) < τ onto col(ΔW_S), add w ΔW_S."""

    name = "safe_lora"
    Params = SimilarityParams
    needs_safety = True

    def merge_module(self, name, utility_deltas, coefficients, safety_delta, safety_weight, params, seed):
        merged, sims, projected = tv.safe_lora_merge(utility_deltas, coefficients, safety_delta, safety_weight,
                                                     params.similarity_threshold)
        return merged, {"similarity": sims, "projected": projected}

    def describe(self, options):
        return {**super().describe(options),
                "alignment_direction": "V = ΔW_S per module; P_V = orthogonal projection onto col(V)"}

    def summarize(self, modules):
        tested = {m: e for m, e in modules.items() if any(s is not None for s in e.get("similarity", []))}
        projected = sorted(m for m, e in tested.items() if any(e["projected"]))
        return {"n_modules_tested": len(tested), "n_modules_projected": len(projected), "projected_modules": projected}


@register_method
class SafemergeMerge(DenseMethod):
    """SafeMERGE-style (Djuraev et al. 2025): modules with cos < τ get α Σ c_i ΔW_Ui + (1−α) w ΔW_S, others utility only."""

    name = "safemerge"
    Params = SafemergeParams
    needs_safety = True

    def merge_module(self, name, utility_deltas, coefficients, safety_delta, safety_weight, params, seed):
        merged, sims, flagged = tv.safemerge_merge(utility_deltas, coefficients, safety_delta, safety_weight,
                                                   params.similarity_threshold, params.safemerge_alpha)
        return merged, {"similarity": sims, "flagged": flagged}

    def describe(self, options):
        return {**super().describe(options),
                "flag_rule": "a module is flagged if ANY utility update's similarity is below the threshold"}

    def summarize(self, modules):
        flagged = sorted(m for m, e in modules.items() if e.get("flagged"))
        return {"n_modules_flagged": len(flagged), "flagged_modules": flagged}
