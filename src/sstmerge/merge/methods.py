"""The built-in task-arithmetic methods: ``direct`` and the Fisher-subspace modes (``residual``, ``layerwise``,
``fisher_mask``). Importing this module registers them and the dense baselines (:mod:`.baselines`).

Each is a :class:`~sstmerge.merge.method.TaskArithmeticMethod`: its ``transform`` returns the inputs with the
safety adapter replaced by S' (the projected blend) and the per-module weights ``w^m``; composition
``ΔW^m = Σ_i c_i ΔW_Ui^m + w^m ΔW_S'^m`` (exact, rank concatenation) is shared.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from typing import Any, Literal

import torch
from pydantic import Field

from ..errors import FisherError
from ..io.adapter import LoraAdapter, LoraModule
from ..linalg.projection import layerwise_blend
from . import baselines  # noqa: F401 - registers the dense baselines
from .method import METHODS, MergeContext, MergeInputs, TaskArithmeticMethod, register_method
from .options import MergeOptions, MethodParams
from .tables import PRESETS, WEIGHT_TABLES, load_table, lookup, module_type

log = logging.getLogger(__name__)

__all__ = ["METHODS", "DirectMerge", "ResidualMerge", "LayerwiseMerge", "FisherMaskMerge", "safety_weights"]


def linear_blend(A: torch.Tensor, B: torch.Tensor, A_P: torch.Tensor, B_P: torch.Tensor,
                 strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of ``(1 − σ)·B A + σ·B_P A_P`` by rank concatenation (exact; the LoRA scale stays outside):
    ``A' = [(1 − σ) A; σ A_P]`` (≤ 2r, d_in), ``B' = [B, B_P]`` (d_out, ≤ 2r). A term with weight 0 is left out,
    so σ = 0 returns the original factors unchanged (the merge is then ``direct`` byte for byte) and σ = 1 the
    projected ones. A, A_P: (r, d_in); B, B_P: (d_out, r)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"projection strength must lie in [0, 1], got {strength}")
    terms = [(w, a, b) for w, a, b in ((1.0 - strength, A, B), (strength, A_P, B_P)) if w != 0.0]
    if len(terms) == 1 and terms[0][0] == 1.0:
        return terms[0][1], terms[0][2]
    A_new = torch.cat([w * a.to(torch.float32) for w, a, _ in terms], dim=0)  # (Σr, d_in)
    B_new = torch.cat([b.to(torch.float32) for _, _, b in terms], dim=1)  # (d_out, Σr)
    return A_new, B_new


def safety_weights(safety: LoraAdapter | None, options: MergeOptions) -> tuple[dict[str, float], dict | None]:
    """``w^m = safety_weight × table[type(m)]`` for every module and full tensor of ``safety``."""
    if safety is None:
        return {}, None
    keys = list(safety.specs) + list(safety.full_shapes)
    if options.layer_weights is None:
        return {k: options.safety_weight for k in keys}, None
    table = load_table(options.layer_weights, WEIGHT_TABLES)
    return {k: options.safety_weight * lookup(table, k, "layer_weights") for k in keys}, table


@register_method
class DirectMerge(TaskArithmeticMethod):
    """Task arithmetic: Σ c_i ΔW_Ui + w ΔW_S (w = safety_weight × layer_weights). No Fisher needed."""

    name = "direct"


class SubspaceParams(MethodParams):
    """Parameters of the Fisher-subspace modes."""

    k: int = Field(10, ge=1, description="dimension of the safety subspace")
    scope: Literal["global", "per_module"] = Field("global", description="one subspace over all modules, or one per module")
    clamp_k: bool = Field(False, description="if k exceeds the available rank, use the rank (recorded) instead of failing")
    damping: float = Field(1e-3, gt=0, description="relative damping ε: δ = ε · tr(F_benign) / D")
    fisher: Literal["empirical", "diagonal"] = Field(
        "empirical", description="Fisher estimator: empirical (exact low-rank) or diagonal (a coordinate mask)")


class BlendParams(MethodParams):
    blend: Literal["linear", "factors"] = Field(
        "linear", description="linear: blend the weight updates, ΔW'_S = (1-σ)·ΔW_S + σ·ΔW_PS (exact, by rank "
        "concatenation; r = 1 is direct); factors: blend the LoRA factors as the original research code did "
        "(ΔW scales by about (1-σ)², kept to reproduce its numbers)")


class ResidualParams(SubspaceParams, BlendParams):
    residual_ratio: float = Field(
        0.7, ge=0.0, le=1.0, description="ΔW'_S = r·ΔW_S + (1-r)·ΔW_PS; 1 = direct, 0 = full projection")


class LayerwiseParams(SubspaceParams, BlendParams):
    preset: str = Field(
        "balanced", description="projection strengths per module type (safety_first, balanced, utility_first, "
        "minimal) or a YAML file {q_proj: 0.3, ..., default: 0.5}")


class FisherMaskParams(BlendParams):
    k: int = Field(10, ge=1, description="number of coordinates kept (top F_harm/F_benign ratios)")
    scope: Literal["global", "per_module"] = Field("global", description="one mask over all modules, or one per module")
    clamp_k: bool = Field(False, description="if k exceeds the coordinates with a positive ratio, use those instead of failing")
    damping: float = Field(1e-3, gt=0, description="relative damping ε: δ = ε · Σ diag(F_benign) / D")
    residual_ratio: float = Field(0.7, ge=0.0, le=1.0, description="ΔW'_S = r·ΔW_S + (1-r)·ΔW_mask(S)")


class _SubspaceMerge(TaskArithmeticMethod):
    """Shared part of the Fisher-subspace modes: P φ from the Fisher pass, then a per-module blend."""

    needs_fisher = True
    needs_safety = True

    def estimator(self, params: Any) -> str:
        """Fisher estimator used for P φ: ``params.fisher`` unless the method forces one."""
        return params.fisher

    @abstractmethod
    def strength(self, module: str, params: Any) -> float:
        """Projection strength σ_m ∈ [0, 1]: φ'_m = (1 − σ_m) φ_m + σ_m P φ_m."""

    def describe(self, params: Any) -> dict[str, Any]:
        return {}

    def transform(self, inputs: MergeInputs, options: MergeOptions, ctx: MergeContext) -> tuple[MergeInputs, dict]:
        from ..fisher.point import flat_phi
        from .subspace import project_safety_from_cache

        safety, params = inputs.safety, options.params

        # ‖B A‖ per module, once: zero modules (ΔW = s·B A with s > 0) and the function-level shares below
        norm_dW = {m: float((lm.B.double() @ lm.A.double()).norm()) for m, lm in safety.modules.items()}
        zero = [m for m, n in norm_dW.items() if n == 0.0]
        if len(zero) == len(safety.modules):
            raise FisherError(
                f"{safety.name}: the safety adapter's update ΔW is zero in every module (untrained, or B = 0); "
                "there is nothing to project"
            )
        phi = flat_phi(safety)
        estimator = self.estimator(params)
        run, proj = project_safety_from_cache(ctx.fisher, phi, k=params.k, scope=params.scope,  # cached
                                              estimator=estimator, eps=params.damping, clamp_k=params.clamp_k)
        modules, kept = {}, {}
        for m, lm in safety.modules.items():
            sigma = self.strength(m, params)
            nA = lm.A.numel()
            A_P = proj.P_phi[m][:nA].reshape(lm.A.shape).to(torch.float32)  # the projected factors
            B_P = proj.P_phi[m][nA:].reshape(lm.B.shape).to(torch.float32)
            if params.blend == "linear":
                A, B = linear_blend(lm.A, lm.B, A_P, B_P, sigma)
            else:
                new = layerwise_blend(phi[m], proj.P_phi[m], sigma)
                A = new[:nA].reshape(lm.A.shape).to(torch.float32)
                B = new[nA:].reshape(lm.B.shape).to(torch.float32)
            modules[m] = LoraModule(A=A, B=B, scale=lm.scale)
            norm, dW = float(phi[m].norm()), norm_dW[m]
            kept[m] = {
                "strength": sigma,
                "projection_norm_kept": float(proj.P_phi[m].norm()) / norm if norm > 0 else 0.0,
                "projected_delta_norm_kept": float((B_P.double() @ A_P.double()).norm()) / dW if dW > 0 else 0.0,
                "delta_norm_kept": float((B.double() @ A.double()).norm()) / dW if dW > 0 else 0.0,
            }
        projected = LoraAdapter(modules=modules, full_tensors=safety.full_tensors, config=safety.config,
                                path=safety.path, files=safety.files)
        phi_all = torch.cat([phi[m] for m in sorted(phi)])
        P_all = torch.cat([proj.P_phi[m] for m in sorted(phi)])
        report = {
            "estimator": estimator,
            "scope": params.scope,
            "k_requested": params.k,
            "effective_k": proj.effective_k,
            "available_rank": proj.available_rank,
            "damping_eps": params.damping,
            "damping_delta": proj.damping,
            "eigenvalues": proj.spectra,
            "projection_norm_kept_total": float(P_all.norm() / phi_all.norm()),
            "blend": params.blend,
            "delta_norm_kept_median": float(torch.tensor([e["delta_norm_kept"] for e in kept.values()]).median()),
            "per_module": kept,
            "fisher": run.meta,
            **self.describe(params),
        }
        return inputs.replace(safety=projected), report


@register_method
class ResidualMerge(_SubspaceMerge):
    """Residual: φ' = (1 − r) P φ + r φ with r = residual_ratio, the same for every module."""

    name = "residual"
    Params = ResidualParams

    def strength(self, module: str, params: Any) -> float:
        return 1.0 - params.residual_ratio

    def describe(self, params: Any) -> dict[str, Any]:
        return {"residual_ratio": params.residual_ratio}


@register_method
class LayerwiseMerge(_SubspaceMerge):
    """Layerwise: φ'_m = (1 − σ_t) φ_m + σ_t P φ_m, σ_t by module type from a preset or YAML table."""

    name = "layerwise"
    Params = LayerwiseParams

    def validate(self, inputs: MergeInputs, options: MergeOptions) -> list[str]:
        types = {module_type(m) for a in (*inputs.utility, inputs.safety) if a is not None
                 for m in list(a.specs) + list(a.full_shapes)}
        load_table(options.params.preset, PRESETS, lo=0.0, hi=1.0, known_types=types)
        return []

    def strength(self, module: str, params: Any) -> float:
        return lookup(load_table(params.preset, PRESETS, lo=0.0, hi=1.0), module, f"preset {params.preset!r}")

    def describe(self, params: Any) -> dict[str, Any]:
        return {"preset": params.preset, "strengths": load_table(params.preset, PRESETS, lo=0.0, hi=1.0)}


@register_method
class FisherMaskMerge(ResidualMerge):
    """Diagonal-Fisher mask baseline: residual blend with P φ = top-k coordinates of F_harm/F_benign."""

    name = "fisher_mask"
    Params = FisherMaskParams

    def estimator(self, params: Any) -> str:
        return "diagonal"  # the coordinate mask is the point of this baseline


