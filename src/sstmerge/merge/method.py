"""The merge-method interface and its registry (mergekit's ``merge_methods/`` is the model).

A method is one class::

    @register_method
    class ScaledSafety(TaskArithmeticMethod):
        '''Task arithmetic with the safety adapter scaled by ``factor``.'''   # first line: `sst-merge methods`

        name = "scaled_safety"
        needs_safety = True

        class Params(MethodParams):
            factor: float = Field(0.5, gt=0, description="scale of the safety update")

        def transform(self, inputs, options, ctx):
            w = {m: options.params.factor * x for m, x in inputs.safety_weights.items()}
            return inputs.replace(safety_weights=w), {"factor": options.params.factor}

It declares its ``name``, its own parameter model ``Params`` (CLI flags, YAML keys and ``sst-merge methods``
come from it; keys of other methods are refused), what it needs (``needs_safety``, ``needs_fisher``,
``dense``: it merges dense updates and so refuses ``modules_to_save``), an optional :meth:`MergeMethod.validate`
hook (cheap checks before any heavy work), and one entry point, :meth:`MergeMethod.merge`, that may transform
*any* input adapter (utility or safety) and returns a :class:`MethodOutput`: the output layout, known before
any tensor is read, and the composed modules one at a time. One composer (:mod:`sstmerge.merge.compose`)
writes them into memory or streams them into the output folder.

Two helper bases cover the usual shapes:

- :class:`TaskArithmeticMethod`: transform the inputs (:meth:`~TaskArithmeticMethod.transform`), then compose
  ``ΔW^m = Σ_i c_i ΔW_Ui^m + w^m ΔW_S^m`` exactly by rank concatenation (direct, the Fisher-subspace modes);
- :class:`DenseMethod`: merge the dense per-module updates (:meth:`~DenseMethod.merge_module`), each result
  factored back into LoRA by truncated SVD (TIES, DARE, magnitude, Safe LoRA, SafeMERGE).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..io.adapter import LoraAdapter
from ..registry import Registry
from .options import MethodParams

if TYPE_CHECKING:
    from ..fisher.run import FisherRun
    from ..io.models import BaseModelInfo
    from .compose import ComposedModule, ComposePlan
    from .options import MergeOptions


@dataclass(frozen=True)
class MergeInputs:
    """The validated inputs of one merge: utility adapters with their coefficients ``c_i``, the safety adapter
    (or None) with its weight per module / full tensor ``w^m`` (``safety_weight × layer_weights``), the base."""

    utility: tuple[LoraAdapter, ...]
    coefficients: tuple[float, ...]
    safety: LoraAdapter | None
    safety_weights: dict[str, float]
    base: BaseModelInfo | None

    def replace(self, **changes: Any) -> MergeInputs:
        """A copy with some fields changed (a method's transform returns new inputs, never mutates them)."""
        return dataclasses.replace(self, **changes)


@dataclass
class MergeContext:
    """What a method may ask for while merging: ``fisher()`` computes or loads the Fisher statistics of these
    inputs with respect to the safety adapter's factors, ``fisher(j)`` with respect to utility adapter j's
    (scaled by its coefficient, :func:`~sstmerge.fisher.point.fisher_target`), both at the point
    base + Σ c_i ΔW_Ui + ΔW_S (cached; only for methods with ``needs_fisher``)."""

    fisher: Callable[..., FisherRun] | None = None


def _no_report(module_report: dict[str, dict]) -> dict[str, Any]:
    return {}


@dataclass
class MethodOutput:
    """A method's result, produced lazily: ``plan`` (the output layout, for a streaming writer's header),
    ``modules`` (one :class:`~sstmerge.merge.compose.ComposedModule` at a time, in ``plan.shapes`` order),
    ``full_tensors`` (``(key, tensor, report entry)`` of modules_to_save) and ``report(module_report)``, the
    method's part of merge_report.json, called once every module is produced."""

    plan: ComposePlan
    modules: Iterator[ComposedModule]
    full_tensors: Iterator[tuple[str, torch.Tensor, dict]] = field(default_factory=lambda: iter(()))
    report: Callable[[dict[str, dict]], dict[str, Any]] = field(default_factory=lambda: _no_report)


class MergeMethod(ABC):
    """Interface of a merge method (see the module docstring)."""

    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = MethodParams
    needs_safety: ClassVar[bool] = False
    needs_fisher: ClassVar[bool] = False
    dense: ClassVar[bool] = False

    def validate(self, inputs: MergeInputs, options: MergeOptions) -> list[str]:
        """Cheap checks before any heavy work (raise :class:`~sstmerge.errors.SSTMergeError`); returns warnings."""
        return []

    @abstractmethod
    def merge(self, inputs: MergeInputs, options: MergeOptions, ctx: MergeContext) -> MethodOutput:
        """The merged adapter as a :class:`MethodOutput` (modules produced lazily)."""

    @classmethod
    def summary(cls) -> str:
        return ((cls.__doc__ or "").strip().splitlines() or [""])[0]


class TaskArithmeticMethod(MergeMethod):
    """Transform the inputs, then compose them exactly: ``ΔW^m = Σ_i c_i ΔW_Ui^m + w^m ΔW_S^m``."""

    def transform(self, inputs: MergeInputs, options: MergeOptions, ctx: MergeContext) -> tuple[MergeInputs, dict]:
        """New inputs (any adapter or weight may change) and facts for the report; default: unchanged."""
        return inputs, {}

    def merge(self, inputs: MergeInputs, options: MergeOptions, ctx: MergeContext) -> MethodOutput:
        from .compose import iter_compose, iter_full_tensors, plan_compose

        new, report = self.transform(inputs, options, ctx)
        args = (new.utility, new.coefficients, new.safety, new.safety_weights)
        rank = None if options.recompress_rank == "full" else options.recompress_rank  # the exact sum is full
        return MethodOutput(
            plan=plan_compose(*args, base=new.base, recompress_rank=rank),
            modules=iter_compose(*args, recompress_rank=rank),
            full_tensors=iter_full_tensors(*args, new.base),
            report=lambda module_report: report,
        )


class DenseMethod(MergeMethod):
    """Merge the dense per-module updates; each result is factored back into LoRA by truncated SVD."""

    dense = True

    @abstractmethod
    def merge_module(
        self,
        name: str,
        utility_deltas: Sequence[torch.Tensor],
        coefficients: Sequence[float],
        safety_delta: torch.Tensor | None,
        safety_weight: float,
        params: Any,
        seed: int,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Merged ``ΔW`` (d_out, d_in) of module ``name`` and its report entry. ``utility_deltas``: the
        ``ΔW_Ui`` present in this module with their ``coefficients``; ``safety_delta``: ``ΔW_S`` or None."""

    def describe(self, options: MergeOptions) -> dict[str, Any]:
        """The parameters this method used (report["method"]); default: its Params."""
        return options.params.model_dump(mode="json")

    def summarize(self, module_report: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Method-level facts gathered from the per-module report entries."""
        return {}

    def merge(self, inputs: MergeInputs, options: MergeOptions, ctx: MergeContext) -> MethodOutput:
        from .compose import iter_dense, plan_dense

        return MethodOutput(
            plan=plan_dense(inputs.utility, inputs.safety, recompress_rank=options.recompress_rank),
            modules=iter_dense(self, inputs.utility, inputs.coefficients, inputs.safety, inputs.safety_weights,
                               options.params, options.seed, recompress_rank=options.recompress_rank),
            report=lambda module_report: {**self.describe(options), **self.summarize(module_report)},
        )


METHODS: Registry[type[MergeMethod]] = Registry("merge method")


def register_method(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator: add a method to :data:`METHODS` under ``cls.name`` (names must be unique)."""
    if not (isinstance(cls, type) and issubclass(cls, MergeMethod)) or not getattr(cls, "name", None):
        raise TypeError(f"{cls!r}: a merge method subclasses MergeMethod and sets a name")
    if not (isinstance(cls.Params, type) and issubclass(cls.Params, MethodParams)):
        raise TypeError(f"{cls.name}: Params must subclass sstmerge.merge.options.MethodParams")
    METHODS.register(cls.name, cls)
    return cls


def method_class(name: str) -> type[MergeMethod]:
    """The registered method ``name`` (ConfigError with a did-you-mean otherwise); loads the built-in ones."""
    from . import methods  # noqa: F401 - registers the built-in methods

    return METHODS.get(name)


def all_methods() -> dict[str, type[MergeMethod]]:
    from . import methods  # noqa: F401

    return {n: METHODS.get(n) for n in METHODS.names()}
