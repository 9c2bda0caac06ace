"""Merge methods: two small interfaces + one explicit registry.

A :class:`MergeMethod` decides the *projected safety adapter* S' and the per-module safety weight w^m;
composition (``ΔW^m = Σ_i c_i ΔW_Ui^m + w^m ΔW_S'^m``, exact by rank concatenation) is shared and lives in
:mod:`sstmerge.merge.compose`. ``w^m = safety_weight × layer_weights[type(m)]`` (table optional, any mode).
A :class:`~sstmerge.merge.baselines.DeltaMergeMethod` (TIES, DARE, magnitude, Safe LoRA, SafeMERGE) instead
merges the dense updates module by module (:func:`sstmerge.merge.compose.compose_dense`).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..errors import FisherError
from ..io.adapter import LoraAdapter, LoraModule
from ..linalg.projection import layerwise_blend
from ..registry import Registry
from .baselines import BASELINES, DeltaMergeMethod
from .tables import PRESETS, WEIGHT_TABLES, load_table, lookup

if TYPE_CHECKING:
    from .options import MergeOptions

log = logging.getLogger(__name__)


@dataclass
class SafetyPlan:
    """What a method hands to composition: S', the weight per module, and facts for the report."""

    safety: LoraAdapter
    weights: dict[str, float]  # module or full-tensor key -> w^m
    report: dict[str, Any] = field(default_factory=dict)


def safety_weights(safety: LoraAdapter, options: MergeOptions) -> tuple[dict[str, float], dict | None]:
    """``w^m = safety_weight × table[type(m)]`` for every module and full tensor of ``safety``."""
    keys = list(safety.modules) + list(safety.full_tensors)
    if options.layer_weights is None:
        return {k: options.safety_weight for k in keys}, None
    table = load_table(options.layer_weights, WEIGHT_TABLES)
    return {k: options.safety_weight * lookup(table, k, "layer_weights") for k in keys}, table


class MergeMethod(ABC):
    """Interface of a merge method."""

    name: ClassVar[str]
    needs_fisher: ClassVar[bool] = False
    needs_safety: ClassVar[bool] = False

    @abstractmethod
    def plan_safety(self, safety: LoraAdapter, options: MergeOptions, context: dict[str, Any]) -> SafetyPlan:
        """Return S' and w^m for every module / full tensor of ``safety``."""


class DirectMerge(MergeMethod):
    """Task arithmetic: S' = S, w^m = safety_weight (× layer_weights). No Fisher needed."""

    name = "direct"

    def plan_safety(self, safety: LoraAdapter, options: MergeOptions, context: dict[str, Any]) -> SafetyPlan:
        weights, table = safety_weights(safety, options)
        return SafetyPlan(safety=safety, weights=weights, report={"layer_weights": table} if table else {})


class _SubspaceMerge(MergeMethod):
    """Shared part of the Fisher-subspace modes: P φ from the Fisher pass, then a per-module blend."""

    needs_fisher = True
    needs_safety = True

    def estimator(self, options: MergeOptions) -> str:
        """Fisher estimator used for P φ: ``options.fisher`` unless the method forces one."""
        return options.fisher

    @abstractmethod
    def strength(self, module: str, options: MergeOptions) -> float:
        """Projection strength σ_m ∈ [0, 1]: φ'_m = (1 − σ_m) φ_m + σ_m P φ_m."""

    def describe(self, options: MergeOptions) -> dict[str, Any]:
        return {}

    def plan_safety(self, safety: LoraAdapter, options: MergeOptions, context: dict[str, Any]) -> SafetyPlan:
        from ..fisher.point import flat_phi
        from .subspace import project_safety_from_cache

        zero = [m for m, lm in safety.modules.items() if float(lm.delta().abs().max()) == 0.0]
        if len(zero) == len(safety.modules):
            raise FisherError(
                f"{safety.name}: the safety adapter's update ΔW is zero in every module (untrained, or B = 0); "
                "there is nothing to project"
            )
        phi = flat_phi(safety)
        estimator = self.estimator(options)
        run, proj = project_safety_from_cache(context["fisher"], phi, k=options.k, scope=options.scope,  # cached
                                              estimator=estimator, eps=options.damping, clamp_k=options.clamp_k)
        modules, kept = {}, {}
        for m, lm in safety.modules.items():
            sigma = self.strength(m, options)
            new = layerwise_blend(phi[m], proj.P_phi[m], sigma)
            nA = lm.A.numel()
            A = new[:nA].reshape(lm.A.shape).to(torch.float32)
            B = new[nA:].reshape(lm.B.shape).to(torch.float32)
            modules[m] = LoraModule(A=A, B=B, scale=lm.scale)
            norm = float(phi[m].norm())
            kept[m] = {
                "strength": sigma,
                "projection_norm_kept": float(proj.P_phi[m].norm()) / norm if norm > 0 else 0.0,
                "blend_norm_kept": float(new.norm()) / norm if norm > 0 else 0.0,
                "delta_norm_kept": float((B.double() @ A.double()).norm() / (lm.B.double() @ lm.A.double()).norm())
                if m not in zero else 0.0,
            }
        projected = LoraAdapter(modules=modules, full_tensors=safety.full_tensors, config=safety.config,
                                path=safety.path, files=safety.files)
        weights, table = safety_weights(safety, options)
        phi_all = torch.cat([phi[m] for m in sorted(phi)])
        P_all = torch.cat([proj.P_phi[m] for m in sorted(phi)])
        report = {
            "estimator": estimator,
            "scope": options.scope,
            "k_requested": options.k,
            "effective_k": proj.effective_k,
            "available_rank": proj.available_rank,
            "damping_eps": options.damping,
            "damping_delta": proj.damping,
            "eigenvalues": proj.spectra,
            "projection_norm_kept_total": float(P_all.norm() / phi_all.norm()),
            "per_module": kept,
            "layer_weights": table,
            "fisher": run.meta,
            **self.describe(options),
        }
        return SafetyPlan(safety=projected, weights=weights, report=report)


class ResidualMerge(_SubspaceMerge):
    """Residual: φ' = (1 − r) P φ + r φ with r = residual_ratio, the same for every module."""

    name = "residual"

    def strength(self, module: str, options: MergeOptions) -> float:
        return 1.0 - options.residual_ratio

    def describe(self, options: MergeOptions) -> dict[str, Any]:
        return {"residual_ratio": options.residual_ratio}


class LayerwiseMerge(_SubspaceMerge):
    """Layerwise: φ'_m = (1 − σ_t) φ_m + σ_t P φ_m, σ_t by module type from a preset or YAML table."""

    name = "layerwise"

    def strength(self, module: str, options: MergeOptions) -> float:
        return lookup(load_table(options.preset, PRESETS, lo=0.0, hi=1.0), module, f"preset {options.preset!r}")

    def describe(self, options: MergeOptions) -> dict[str, Any]:
        return {"preset": options.preset, "strengths": load_table(options.preset, PRESETS, lo=0.0, hi=1.0)}


class FisherMaskMerge(ResidualMerge):
    """Diagonal-Fisher mask baseline: residual blend with P φ = top-k coordinates of F_harm/F_benign (always diagonal)."""

    name = "fisher_mask"

    def estimator(self, options: MergeOptions) -> str:
        if options.fisher != "diagonal":
            log.info("fisher_mask always uses the diagonal Fisher estimator (fisher=%r is ignored)", options.fisher)
        return "diagonal"  # the coordinate mask is the point of this baseline


METHODS: Registry[type[MergeMethod] | type[DeltaMergeMethod]] = Registry("merge mode")
METHODS.register("direct", DirectMerge)
METHODS.register("residual", ResidualMerge)
METHODS.register("layerwise", LayerwiseMerge)
METHODS.register("fisher_mask", FisherMaskMerge)
for _baseline in BASELINES:
    METHODS.register(_baseline.name, _baseline)
