"""Merge methods: one small interface + an explicit registry.

A method decides the *projected safety adapter* S' and the per-module safety weight w^m; composition
(``ΔW^m = Σ_i c_i ΔW_Ui^m + w^m ΔW_S'^m``, exact by rank concatenation) is shared and lives in
:mod:`sstmerge.merge.compose`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ..io.adapter import LoraAdapter
from ..registry import Registry

if TYPE_CHECKING:
    from .options import MergeOptions


@dataclass
class SafetyPlan:
    """What a method hands to composition: S', the weight per module, and facts for the report."""

    safety: LoraAdapter
    weights: dict[str, float]  # module or full-tensor key -> w^m
    report: dict[str, Any] = field(default_factory=dict)


class MergeMethod(ABC):
    """Interface of a merge method."""

    name: ClassVar[str]
    needs_fisher: ClassVar[bool] = False

    @abstractmethod
    def plan_safety(self, safety: LoraAdapter, options: MergeOptions, context: dict[str, Any]) -> SafetyPlan:
        """Return S' and w^m for every module / full tensor of ``safety``."""


class DirectMerge(MergeMethod):
    """Task arithmetic: ``S' = S``, ``w^m = safety_weight`` for every module. No Fisher needed."""

    name = "direct"

    def plan_safety(self, safety: LoraAdapter, options: MergeOptions, context: dict[str, Any]) -> SafetyPlan:
        keys = list(safety.modules) + list(safety.full_tensors)
        return SafetyPlan(safety=safety, weights={k: options.safety_weight for k in keys})


METHODS: Registry[type[MergeMethod]] = Registry("merge mode")
METHODS.register("direct", DirectMerge)
