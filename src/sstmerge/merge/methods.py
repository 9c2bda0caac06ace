"""The built-in task-arithmetic methods: ``direct``, the Fisher-subspace modes (``residual``, ``layerwise``,
``fisher_mask``) and the decomposition modes (``complement``, ``protect``). Importing this module registers
them and the dense baselines (:mod:`.baselines`).

Each is a :class:`~sstmerge.merge.method.TaskArithmeticMethod`: its ``transform`` returns the inputs with the
safety adapter replaced by S' (the projected blend, or S without its tax directions) or the utility adapters
replaced by U' (without the directions that erode refusals), and the per-module weights ``w^m``; composition
``ΔW^m = Σ_i c_i ΔW_Ui^m + w^m ΔW_S'^m`` (exact, rank concatenation) is shared.

Every Fisher-based mode reports its predicted effect: the Fisher's quadratic forms
(:func:`~sstmerge.linalg.eigen.quadratic_forms`) on the update it changed, for ``direct`` (the adapter as given)
and for the merge, and the function-level share ``‖ΔW'_m‖ / ‖ΔW_m‖`` kept per module.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field

from ..errors import AdapterMismatchError, ConfigError, FisherError, UnsupportedAdapterError
from ..io.adapter import LoraAdapter, LoraModule
from ..linalg.eigen import choose_k, quadratic_forms
from ..linalg.projection import layerwise_blend
from . import baselines  # noqa: F401 - registers the dense baselines
from .method import METHODS, MergeContext, MergeInputs, TaskArithmeticMethod, register_method
from .options import MergeOptions, MethodParams
from .tables import PRESETS, WEIGHT_TABLES, load_table, lookup, module_type

log = logging.getLogger(__name__)

__all__ = ["METHODS", "DirectMerge", "ResidualMerge", "LayerwiseMerge", "FisherMaskMerge", "ComplementMerge",
           "ProtectMerge", "safety_weights"]

#: k of a subspace: a positive integer, or "auto" (chosen per scope from the spectrum by ``k_rule``)
KChoice = Annotated[int, Field(ge=1)] | Literal["auto"]


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


class AutoKParams(MethodParams):
    k: KChoice = Field(10, description="number of directions, or auto (per scope, from the spectrum)")
    k_rule: Literal["mass", "eigengap"] = Field(
        "mass", description="with k = auto: mass = the smallest k whose top eigenvalues hold k_mass of the positive "
        "spectrum's sum; eigengap = the k before the largest ratio λ_k/λ_(k+1)")
    k_mass: float = Field(0.9, gt=0.0, le=1.0, description="share of the spectrum's mass for k = auto with k_rule mass")


class SubspaceParams(AutoKParams):
    """Parameters of the Fisher-subspace modes."""

    k: KChoice = Field(10, description="dimension of the safety subspace, or auto (per scope, from the spectrum)")
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


class FisherMaskParams(BlendParams, AutoKParams):
    k: KChoice = Field(10, description="number of coordinates kept (top F_harm/F_benign ratios), or auto")
    scope: Literal["global", "per_module"] = Field("global", description="one mask over all modules, or one per module")
    clamp_k: bool = Field(False, description="if k exceeds the coordinates with a positive ratio, use those instead of failing")
    damping: float = Field(1e-3, gt=0, description="relative damping ε: δ = ε · Σ diag(F_benign) / D")
    residual_ratio: float = Field(0.7, ge=0.0, le=1.0, description="ΔW'_S = r·ΔW_S + (1-r)·ΔW_mask(S)")


def _function_share(A: torch.Tensor, B: torch.Tensor, norm_dW: float) -> float:
    """``‖B' A'‖ / ‖B A‖`` (the LoRA scale cancels): the share of the weight update a module keeps."""
    return float((B.double() @ A.double()).norm()) / norm_dW if norm_dW > 0 else 0.0


def _update_norms(adapter: LoraAdapter) -> dict[str, float]:
    """``‖B A‖`` per module (ΔW = s·B A; the scale is left out, it cancels in every share)."""
    return {m: float((lm.B.double() @ lm.A.double()).norm()) for m, lm in adapter.modules.items()}


def _factors(lm: LoraModule, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of module ``lm``'s shapes from a flat ``[vec(A); vec(B)]`` (float32, the output dtype)."""
    nA = lm.A.numel()
    return flat[:nA].reshape(lm.A.shape).to(torch.float32), flat[nA:].reshape(lm.B.shape).to(torch.float32)


def _predicted(n_harm: int, direct: np.ndarray, merged: np.ndarray | None, note: str = "") -> dict[str, Any]:
    """The report's ``predicted_effect``: quadratic forms for the adapter as given (direct) and as merged."""
    out: dict[str, Any] = {"direct": quadratic_forms(direct, n_harm)}
    if merged is not None:
        out["merge"] = quadratic_forms(merged, n_harm)
    if note:
        out["note"] = note
    return out


_FORMS_NOTE = ("refusal_gain = mean over harmful samples of g_iᵀx (first-order change of the refusal log-likelihood; "
               "for x = the whole adapter it is twice the first-order effect of its ΔW), benign_gain likewise over "
               "benign samples, harm_form = xᵀ F_harm x, benign_form = xᵀ F_benign x, at the Fisher point")


def _require_nonzero(adapter: LoraAdapter, norms: dict[str, float], role: str, what: str) -> None:
    """Before any Fisher work: an adapter whose ``ΔW`` is zero in every module gives the statistics nothing."""
    if all(n == 0.0 for n in norms.values()):
        raise FisherError(f"{adapter.name}: the {role} adapter's update ΔW is zero in every module (untrained, or "
                          f"B = 0); there is nothing to {what}")


class _SubspaceMerge(TaskArithmeticMethod):
    """Shared part of the Fisher-subspace modes: P φ from the Fisher pass, then a per-module blend."""

    needs_fisher = True
    needs_safety = True

    def estimator(self, params: Any) -> str:
        """Fisher estimator used for P φ: ``params.fisher`` unless the method forces one."""
        return params.fisher

    @abstractmethod
    def strength(self, module: str, params: Any) -> float:
        """Projection strength σ_m ∈ [0, 1]: ΔW'_m = (1 − σ_m)·ΔW_m + σ_m·ΔW_PS,m (or the same blend of the factors)."""

    def describe(self, params: Any) -> dict[str, Any]:
        return {}

    def transform(self, inputs: MergeInputs, options: MergeOptions, ctx: MergeContext) -> tuple[MergeInputs, dict]:
        from ..fisher.point import flat_phi
        from .subspace import project_safety_from_cache

        safety, params = inputs.safety, options.params
        norm_dW = _update_norms(safety)  # ‖B A‖ per module, once: zero modules and the function-level shares
        _require_nonzero(safety, norm_dW, "safety", "project")
        phi = flat_phi(safety)
        estimator = self.estimator(params)
        run, proj = project_safety_from_cache(ctx.fisher, phi, k=params.k, scope=params.scope,  # cached
                                              estimator=estimator, eps=params.damping, clamp_k=params.clamp_k,
                                              k_rule=params.k_rule, k_mass=params.k_mass)
        modules, kept = {}, {}
        G_blend = np.zeros_like(next(iter(proj.G_P.values())))
        for m, lm in safety.modules.items():
            sigma = self.strength(m, params)
            A_P, B_P = _factors(lm, proj.P_phi[m])  # the projected factors
            if params.blend == "linear":
                A, B = linear_blend(lm.A, lm.B, A_P, B_P, sigma)
            else:
                A, B = _factors(lm, layerwise_blend(phi[m], proj.P_phi[m], sigma))
                G_blend += (1.0 - sigma) * run.stats.G_phi[m] + sigma * proj.G_P[m]
            modules[m] = LoraModule(A=A, B=B, scale=lm.scale)
            norm = float(phi[m].norm())
            kept[m] = {
                "strength": sigma,
                "projection_norm_kept": float(proj.P_phi[m].norm()) / norm if norm > 0 else 0.0,
                "projected_delta_norm_kept": _function_share(A_P, B_P, norm_dW[m]),
                "delta_norm_kept": _function_share(A, B, norm_dW[m]),
            }
        projected = LoraAdapter(modules=modules, full_tensors=safety.full_tensors, config=safety.config,
                                path=safety.path, files=safety.files)
        phi_all = torch.cat([phi[m] for m in sorted(phi)])
        P_all = torch.cat([proj.P_phi[m] for m in sorted(phi)])
        n_harm = run.stats.n_harm
        G_direct = sum(run.stats.G_phi[m] for m in safety.modules)
        G_proj = sum(proj.G_P[m] for m in safety.modules)
        if params.blend == "linear":
            predicted = _predicted(n_harm, G_direct, None, _FORMS_NOTE + "; a linear blend adds the weight updates "
                                   "(1-σ)ΔW_S + σΔW_PS, which no single factor vector represents: the forms are given "
                                   "for its two ends, the adapter (direct) and its projection (projected)")
        else:
            predicted = _predicted(n_harm, G_direct, G_blend, _FORMS_NOTE)
        predicted["projected"] = quadratic_forms(G_proj, n_harm)
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
            "predicted_effect": predicted,
            "per_module": kept,
            "fisher": run.meta,
            **self.describe(params),
        }
        if params.k == "auto":
            report.update(k_rule=params.k_rule, k_mass=params.k_mass)
        return inputs.replace(safety=projected), report


@register_method
class ResidualMerge(_SubspaceMerge):
    """Residual: ΔW'_S = r·ΔW_S + (1 − r)·ΔW_PS, the safety update blended with its top-k projection."""

    name = "residual"
    Params = ResidualParams

    def strength(self, module: str, params: Any) -> float:
        return 1.0 - params.residual_ratio

    def describe(self, params: Any) -> dict[str, Any]:
        return {"residual_ratio": params.residual_ratio}


@register_method
class LayerwiseMerge(_SubspaceMerge):
    """Layerwise: ΔW'_m = (1 − σ_t)·ΔW_m + σ_t·ΔW_PS,m, σ_t by module type from a preset or YAML table."""

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




# --------------------------------------------------------------------------------------- decomposition modes
class _DecompositionParams(MethodParams):
    scope: Literal["global", "per_module"] = Field(
        "global", description="one eigenbasis over all modules, or one per module (block-diagonal Fisher)")
    damping: float = Field(1e-3, gt=0, description="relative damping ε: δ = ε · tr(F_benign) / D")


class ComplementParams(_DecompositionParams):
    threshold: float = Field(
        1.0, description="remove the directions whose λ (safety per unit of utility cost, "
        "vᵀF_harm v / vᵀ(F_benign+δI)v) is below this; 1 = break-even. Must lie within each scope's spectrum")
    bottom_k: int | None = Field(
        None, ge=0, description="instead of the threshold, remove the bottom k directions of each scope's spectrum "
        "(0: none, the merge is direct)")
    clamp_k: bool = Field(False, description="if bottom_k exceeds a scope's rank, remove all its directions (recorded) "
                          "instead of failing")


class ProtectParams(_DecompositionParams, AutoKParams):
    k: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto", description="remove the top k directions (largest λ: where a utility update moves refusals most per "
        "unit of benign effect) from each utility adapter; 0: none; auto: per scope from the spectrum")
    clamp_k: bool = Field(False, description="if k exceeds the positive eigenvalues of a scope, use them all (recorded)")


def _decompose_report(removal, kept: dict, norms_before: torch.Tensor, norms_removed: torch.Tensor,
                      n_harm: int, G_direct: np.ndarray, G_after: np.ndarray, run) -> dict[str, Any]:
    scopes = removal.scopes
    total = {key: sum(sc[key] for sc in scopes.values())
             for key in ("predicted_safety_before", "predicted_safety_after",
                         "predicted_utility_cost_before", "predicted_utility_cost_after")}
    return {
        **total,
        "removed_directions": {name: len(sc["removed"]) for name, sc in scopes.items()},
        "factor_norm_removed_share": float(norms_removed / norms_before) if norms_before > 0 else 0.0,
        "delta_norm_kept_median": float(torch.tensor([e["delta_norm_kept"] for e in kept.values()]).median()),
        "delta_norm_kept_min": min(e["delta_norm_kept"] for e in kept.values()),
        "predicted_effect": _predicted(n_harm, G_direct, G_after, _FORMS_NOTE),
        "scopes": scopes,
        "per_module": kept,
        "fisher": run.meta,
    }


def _remove_from(adapter: LoraAdapter, norm_dW: dict[str, float], run,
                 removal) -> tuple[LoraAdapter, dict, np.ndarray, np.ndarray, float, float]:
    """``φ' = φ − removed`` per module of ``adapter`` (the adapter the Fisher run differentiated; ``norm_dW`` its
    ``‖B A‖`` per module)."""
    from ..fisher.point import flat_phi

    phi = flat_phi(adapter)
    modules, kept = {}, {}
    G_direct = sum(run.stats.G_phi[m] for m in phi)
    G_after = G_direct - sum(removal.G_removed[m] for m in phi)
    sq_before = sq_removed = 0.0
    for m, lm in adapter.modules.items():
        new = phi[m] - removal.removed[m]
        A, B = _factors(lm, new)
        modules[m] = LoraModule(A=A, B=B, scale=lm.scale) if removal.removed[m].any() else lm
        sq_before += float(phi[m].square().sum())
        sq_removed += float(removal.removed[m].square().sum())
        kept[m] = {"delta_norm_kept": _function_share(modules[m].A, modules[m].B, norm_dW[m]),
                   "factor_norm_removed": float(removal.removed[m].norm() / phi[m].norm()) if phi[m].any() else 0.0}
    new_adapter = LoraAdapter(modules=modules, full_tensors=adapter.full_tensors, config=adapter.config,
                              path=adapter.path, files=[] if any(removal.removed[m].any() for m in phi) else adapter.files)
    return new_adapter, kept, G_direct, G_after, sq_before ** 0.5, sq_removed ** 0.5


@register_method
class ComplementMerge(TaskArithmeticMethod):
    """Tax removal: the safety adapter without its components along the directions of lowest λ (safety per utility)."""

    name = "complement"
    Params = ComplementParams
    needs_fisher = True
    needs_safety = True

    def transform(self, inputs: MergeInputs, options: MergeOptions, ctx: MergeContext) -> tuple[MergeInputs, dict]:
        from .subspace import remove_directions, with_fisher

        params = options.params
        norm_dW = _update_norms(inputs.safety)
        _require_nonzero(inputs.safety, norm_dW, "safety", "decompose")

        def select(basis, scope_name: str) -> np.ndarray:
            lam = basis.eigenvalues
            mask = np.zeros(lam.size, dtype=bool)
            if params.bottom_k is not None:
                k = params.bottom_k
                if k > lam.size and not params.clamp_k:
                    raise FisherError(f"complement, scope {scope_name}: bottom_k={k} but the gradient span has only "
                                      f"{lam.size} directions; use bottom_k <= {lam.size} or --clamp-k")
                mask[lam.size - min(k, lam.size):] = True
                return mask
            lo, hi = float(lam.min()), float(lam.max())
            if not lo < params.threshold <= hi:
                raise FisherError(
                    f"complement, scope {scope_name}: threshold {params.threshold:g} lies outside the spectrum "
                    f"[{lo:.4g}, {hi:.4g}] and would remove {'no' if params.threshold <= lo else 'every'} direction; "
                    "choose a threshold inside it (`sst-merge fisher` prints the spectrum) or use --bottom-k")
            return lam < params.threshold

        run, removal = with_fisher(ctx.fisher, lambda run: remove_directions(run, scope=params.scope,
                                                                             eps=params.damping, select=select))
        safety, kept, G_direct, G_after, norm, removed = _remove_from(inputs.safety, norm_dW, run, removal)
        report = {"scope": params.scope, "damping_eps": params.damping,
                  **({"bottom_k": params.bottom_k} if params.bottom_k is not None else {"threshold": params.threshold}),
                  **_decompose_report(removal, kept, norm, removed, run.stats.n_harm, G_direct, G_after, run)}
        return inputs.replace(safety=safety), report


@register_method
class ProtectMerge(TaskArithmeticMethod):
    """Utility protection: each utility adapter without its top-k directions where harm Fisher dominates benign."""

    name = "protect"
    Params = ProtectParams
    needs_fisher = True
    needs_safety = True

    def validate(self, inputs: MergeInputs, options: MergeOptions) -> list[str]:
        if not inputs.utility:
            raise ConfigError("protect transforms the utility adapters: pass at least one --utility adapter")
        targets = set(inputs.safety.specs)
        for u in inputs.utility:
            if u.full_shapes:
                raise UnsupportedAdapterError(
                    f"{u.name}: protect differentiates the utility adapter's LoRA factors and does not handle its "
                    f"modules_to_save tensors ({sorted(u.full_shapes)}); use an adapter without modules_to_save")
            if set(u.specs) != targets:
                only_u, only_s = sorted(set(u.specs) - targets), sorted(targets - set(u.specs))
                raise AdapterMismatchError(
                    f"{u.name}: protect compares each utility update with the safety adapter module by module, but "
                    f"their target modules differ (only in the utility adapter: {only_u[:3]}{'...' if len(only_u) > 3 else ''}; "
                    f"only in the safety adapter: {only_s[:3]}{'...' if len(only_s) > 3 else ''}); train both on the "
                    "same target_modules, or use complement or direct")
        return []

    def transform(self, inputs: MergeInputs, options: MergeOptions, ctx: MergeContext) -> tuple[MergeInputs, dict]:
        from ..fisher.point import fisher_target
        from .subspace import remove_directions, with_fisher

        params = options.params

        def select(basis, scope_name: str) -> np.ndarray:
            where = f"protect, scope {scope_name}"
            k = choose_k(basis.eigenvalues, params.k_rule, params.k_mass, where) if params.k == "auto" else params.k
            if k > basis.positive and not params.clamp_k:
                raise FisherError(f"{where}: k={k} but only {basis.positive} generalized eigenvalues are positive; "
                                  f"use k <= {basis.positive}, more harmful samples, or --clamp-k")
            mask = np.zeros(basis.rank, dtype=bool)
            mask[: min(k, basis.positive)] = True
            return mask

        utility, coefficients, reports = list(inputs.utility), list(inputs.coefficients), {}
        for j, (adapter, c) in enumerate(zip(inputs.utility, inputs.coefficients)):
            if c == 0.0:
                reports[adapter.name] = {"skipped": "coefficient 0: the adapter does not enter the merge"}
                continue
            target = fisher_target(adapter, c)  # c_j ΔW_Uj, c_j folded into B
            norm_dW = _update_norms(target)
            _require_nonzero(target, norm_dW, "utility", "decompose")
            run, removal = with_fisher(lambda j=j: ctx.fisher(j), lambda run: remove_directions(
                run, scope=params.scope, eps=params.damping, select=select))
            new, kept, G_direct, G_after, norm, removed = _remove_from(target, norm_dW, run, removal)
            if removed > 0.0:  # else the adapter (and its coefficient) stays exactly as given
                utility[j], coefficients[j] = new, 1.0
            reports[adapter.name] = {"coefficient": c, **_decompose_report(removal, kept, norm, removed,
                                                                           run.stats.n_harm, G_direct, G_after, run)}
        report = {"scope": params.scope, "damping_eps": params.damping, "k_requested": params.k,
                  **({"k_rule": params.k_rule, "k_mass": params.k_mass} if params.k == "auto" else {}),
                  "utility": reports}
        return inputs.replace(utility=tuple(utility), coefficients=tuple(coefficients)), report
