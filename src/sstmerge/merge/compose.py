"""Composition: the merged modules, one at a time, and the one composer that writes them.

The work is per module: :func:`iter_compose` (exact rank concatenation) and :func:`iter_dense` (a dense
method's ΔW factored back by truncated SVD) produce one merged module at a time, and :func:`plan_compose` /
:func:`plan_dense` give the output layout (shapes, ranks, the common rank) from the inputs' headers before
anything is read. :func:`compose` drains a method's output into a sink: :class:`MemorySink` (a
:class:`~sstmerge.io.adapter.LoraAdapter` in memory) or :class:`StreamSink` (straight into the output folder,
memory bounded by a few modules). Both pad every module to the plan's common rank, so their files are
byte-identical.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from .._logging import quiet
from ..errors import AdapterMismatchError
from ..io.adapter import LoraAdapter, LoraModule
from ..io.models import BaseModelInfo
from ..linalg.lowrank import concat_lora, dense_to_lora, full_rank_lora, pad_rank, truncate_lora

if TYPE_CHECKING:
    from ..io.adapter import AdapterStreamWriter
    from .method import DenseMethod, MethodOutput

log = logging.getLogger(__name__)


def utility_coefficients(n: int, scheme: str, weights: Sequence[float] | None) -> list[float]:
    """``c_i``: 1 (``sum``) or 1/n (``average``), times the per-adapter weight if given."""
    if weights is not None and len(weights) != n:
        raise AdapterMismatchError(
            f"utility_weights has {len(weights)} values but {n} utility adapters were given; pass one weight per adapter"
        )
    base = 1.0 if scheme == "sum" else 1.0 / max(n, 1)
    return [base * (weights[i] if weights is not None else 1.0) for i in range(n)]


Source = tuple[str, LoraAdapter, "float | None"]  # (label, adapter, c_i; None for the safety adapter)


def _sources(utility: Sequence[LoraAdapter], coefficients: Sequence[float], safety: LoraAdapter | None) -> list[Source]:
    sources: list[Source] = [(f"utility[{i}]", a, c) for i, (a, c) in enumerate(zip(utility, coefficients))]
    if safety is not None:
        sources.append(("safety", safety, None))
    return sources


@dataclass
class ComposePlan:
    """The merged adapter's layout, known from the inputs' headers before any tensor is read.

    ``shapes``: module -> (d_out, d_in), sorted by name (the order modules are produced in); ``ranks``: each
    module's rank before padding (Σ of the ranks of the terms with non-zero weight, or the recompression
    rank); ``rank``: the common output rank R = max of ``ranks`` (0 without modules); ``full_shapes``: the
    full-tensor (``modules_to_save``) keys and shapes. A streaming writer declares its header from this.
    """

    shapes: dict[str, tuple[int, int]]
    ranks: dict[str, int]
    rank: int
    full_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass
class ComposedModule:
    """One module of the merged adapter as it is produced: ``ΔW^m = B @ A`` (scale 1), not yet padded to the
    common rank; ``entry`` is its report entry."""

    name: str
    A: torch.Tensor  # (r_m, d_in)
    B: torch.Tensor  # (d_out, r_m)
    entry: dict


def _weight(coef: float | None, module: str, safety_weights: dict[str, float]) -> float:
    return safety_weights.get(module, 0.0) if coef is None else coef


def _module_names(sources) -> list[str]:
    return sorted({m for _, a, *_ in sources for m in a.modules})


def _first_shapes(sources, names: list[str]) -> dict[str, tuple[int, int]]:
    shapes: dict[str, tuple[int, int]] = {}
    for _, adapter, *_ in sources:
        for m, spec in adapter.specs.items():
            shapes.setdefault(m, spec.shape)
    return {m: shapes[m] for m in names}


def _full_shapes(sources, base: BaseModelInfo | None) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for _, adapter, *_ in sources:
        for key, shape in adapter.full_shapes.items():
            shapes.setdefault(key, shape)
    if shapes and base is None:
        raise AdapterMismatchError(
            f"full-tensor entries {sorted(shapes)} (modules_to_save) are merged as differences from the base weight; pass the base model"
        )
    return {k: shapes[k] for k in sorted(shapes)}


def _log_partial(report: dict[str, dict], n_modules: int) -> None:
    partial = [m for m, e in report.items() if e.get("absent_in") and not e.get("full_tensor")]
    if partial:
        log.info("%d of %d modules are missing from some adapters (they contribute zero there; see report)",
                 len(partial), n_modules)


def plan_compose(
    utility: Sequence[LoraAdapter],
    coefficients: Sequence[float],
    safety: LoraAdapter | None,
    safety_weights: dict[str, float],
    *,
    base: BaseModelInfo | None = None,
    recompress_rank: int | None = None,
) -> ComposePlan:
    """The layout :func:`iter_compose` will produce, from the adapters' specs (no tensor is read).

    Module m gets rank ``Σ_{i: w_i ≠ 0, m ∈ i} r_i`` (1 when every weight is 0: one zero term keeps the pair
    well-formed), or ``recompress_rank``. Raises if full tensors need a base that was not given.
    """
    sources = _sources(utility, coefficients, safety)
    names = _module_names(sources)
    specs = [(label, a.specs, coef) for label, a, coef in sources]  # header facts, once per adapter
    ranks: dict[str, int] = {}
    for module in names:
        if recompress_rank is not None:
            ranks[module] = recompress_rank
            continue
        r = sum(sp[module].rank for _, sp, coef in specs
                if module in sp and _weight(coef, module, safety_weights) != 0.0)
        ranks[module] = r or 1
    return ComposePlan(shapes=_first_shapes(sources, names), ranks=ranks, rank=max(ranks.values(), default=0),
                       full_shapes=_full_shapes(sources, base))


def iter_compose(
    utility: Sequence[LoraAdapter],
    coefficients: Sequence[float],
    safety: LoraAdapter | None,
    safety_weights: dict[str, float],
    *,
    recompress_rank: int | None = None,
) -> Iterator[ComposedModule]:
    """``ΔW^m = Σ_i c_i ΔW_Ui^m + w^m ΔW_S^m`` one module at a time, in sorted module order.

    Module m becomes ``A = [c_1 s_1 A_1; …; w s_S A_S]`` (Σr, d_in), ``B = [B_1 … B_S]`` (d_out, Σr), scale 1
    (terms with weight 0 are left out; an adapter missing m contributes zero and is listed under
    ``absent_in``), or its rank-``recompress_rank`` truncated SVD with ``recompression_rel_error``. Each input
    module is read once (from the file, for lazy adapters) and only this module's tensors are held.
    """
    sources = _sources(utility, coefficients, safety)
    for module in _module_names(sources):
        terms, present, absent = [], [], []
        first: LoraModule | None = None
        for label, adapter, coef in sources:
            if module not in adapter.modules:
                absent.append(label)
                continue
            lm = adapter.modules[module]  # read (and NaN/Inf-checked) now for a lazy adapter
            if first is None:
                first = lm
            weight = _weight(coef, module, safety_weights)
            present.append(label)
            if weight != 0.0:
                terms.append((weight * lm.scale, lm.A, lm.B))
        entry: dict = {"present_in": present, "absent_in": absent}
        if "safety" in present:
            entry["safety_weight"] = safety_weights.get(module, 0.0)
        if not terms:  # every contribution has weight 0: the module's update is exactly zero
            terms = [(0.0, first.A[:1], first.B[:, :1])]
        A, B = concat_lora(terms)  # (Σr, d_in), (d_out, Σr)
        entry["rank_concat"] = int(A.shape[0])
        if recompress_rank is not None:
            A, B, err = truncate_lora(A, B, recompress_rank)
            entry["recompression_rel_error"] = err
        yield ComposedModule(module, A, B, entry)


def iter_full_tensors(
    utility: Sequence[LoraAdapter],
    coefficients: Sequence[float],
    safety: LoraAdapter | None,
    safety_weights: dict[str, float],
    base: BaseModelInfo | None,
) -> Iterator[tuple[str, torch.Tensor, dict]]:
    """Full-tensor entries (``modules_to_save``) one key at a time, in sorted order, as differences from the
    base weight: ``W = W_base + Σ_i c_i (W_i − W_base) + w (W_S − W_base)`` (float64, returned as float32),
    with their report entries."""
    sources = _sources(utility, coefficients, safety)
    _full_shapes(sources, base)  # raises without a base
    keys = sorted({k for _, a, _ in sources for k in a.full_tensors})
    for key in keys:
        w_base = base.load_parameter(key).to(torch.float64)
        total = w_base.clone()
        for _, adapter, coef in sources:
            if key in adapter.full_tensors:
                weight = _weight(coef, key, safety_weights)
                total += weight * (adapter.full_tensors[key].to(torch.float64) - w_base)
        yield key, total.to(torch.float32), {"full_tensor": True, "present_in": [lbl for lbl, a, _ in sources if key in a.full_tensors]}


def plan_dense(
    utility: Sequence[LoraAdapter],
    safety: LoraAdapter | None,
    *,
    recompress_rank: int | str | None = None,
) -> ComposePlan:
    """The layout :func:`iter_dense` will produce, from the adapters' specs: module m gets rank
    ``recompress_rank``, ``min(d_out, d_in)`` for ``"full"``, or ``min(Σ ranks of the inputs present, d_out, d_in)``."""
    sources = _sources(utility, [0.0] * len(utility), safety)
    names = _module_names(sources)
    shapes = _first_shapes(sources, names)
    specs = [a.specs for _, a, _ in sources]  # header facts, once per adapter
    ranks: dict[str, int] = {}
    for module in names:
        rank_in = sum(sp[module].rank for sp in specs if module in sp)
        ranks[module] = (min(shapes[module]) if recompress_rank == "full" else recompress_rank
                         if recompress_rank is not None else min(rank_in, *shapes[module]))
    return ComposePlan(shapes=shapes, ranks=ranks, rank=max(ranks.values(), default=0))


def iter_dense(
    method: DenseMethod,
    utility: Sequence[LoraAdapter],
    coefficients: Sequence[float],
    safety: LoraAdapter | None,
    safety_weights: dict[str, float],
    params: Any,
    seed: int,
    *,
    recompress_rank: int | str | None = None,
) -> Iterator[ComposedModule]:
    """Run a dense method module by module over the union of modules (sorted), factoring each result back.

    For module m: ``ΔW_Ui^m`` and ``ΔW_S^m`` in float64 from the factors (an adapter missing m contributes
    nothing and is listed under ``absent_in``), ``ΔW^m = method.merge_module(...)``, then the best rank-R pair
    by truncated SVD with ``R = recompress_rank`` or, by default, ``min(Σ ranks of the inputs present, d_out,
    d_in)`` (the rank the exact task-arithmetic sum would have). The relative Frobenius error of that
    truncation is ``recompression_rel_error`` (≈ 0 when ΔW^m has rank ≤ R, e.g. safe_lora and safemerge;
    real for TIES/DARE/magnitude, whose pruned sums are full rank). ``recompress_rank="full"`` keeps ΔW^m
    exactly (:func:`~sstmerge.linalg.lowrank.full_rank_lora`, error 0): the method's exact dense result. Each
    input module is read once and only one module's dense matrices are held at a time."""
    sources = [(label, a) for label, a, _ in _sources(utility, coefficients, safety)]
    for module in _module_names(_sources(utility, coefficients, safety)):
        read = {label: a.modules[module] for label, a in sources if module in a.modules}  # (lazy: read now)
        entry: dict = {"present_in": list(read), "absent_in": [label for label, a in sources if module not in a.modules]}
        u_deltas, u_coefs = [], []
        for i, c in enumerate(coefficients):
            if f"utility[{i}]" in read:
                u_deltas.append(read[f"utility[{i}]"].delta(torch.float64))  # (d_out, d_in)
                u_coefs.append(c)
        s_delta = read["safety"].delta(torch.float64) if "safety" in read else None
        if s_delta is not None:
            entry["safety_weight"] = safety_weights.get(module, 0.0)
        dW, facts = method.merge_module(module, u_deltas, u_coefs, s_delta, safety_weights.get(module, 0.0), params, seed)
        rank_in = sum(lm.rank for lm in read.values())
        if recompress_rank == "full":
            (A, B), err = full_rank_lora(dW), 0.0
            rank = A.shape[0]
        else:
            rank = recompress_rank if recompress_rank is not None else min(rank_in, *dW.shape)
            A, B, err = dense_to_lora(dW, rank)
        entry.update(facts)
        entry.update({"rank_inputs": rank_in, "rank": rank, "recompression_rel_error": err})
        yield ComposedModule(module, A, B, entry)


class MemorySink:
    """Collects the merged modules in memory; :meth:`adapter` pads them to the common rank (scale 1)."""

    def __init__(self, plan: ComposePlan) -> None:
        self.plan = plan
        self.pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.full: dict[str, torch.Tensor] = {}

    def module(self, name: str, A: torch.Tensor, B: torch.Tensor) -> None:
        self.pairs[name] = (A, B)

    def full_tensor(self, key: str, tensor: torch.Tensor) -> None:
        self.full[key] = tensor

    def adapter(self) -> LoraAdapter:
        rank = self.plan.rank
        modules = {m: LoraModule(*pad_rank(A, B, rank), scale=1.0) for m, (A, B) in self.pairs.items()}
        return LoraAdapter(modules=modules, full_tensors=self.full, config={"r": rank, "lora_alpha": rank})


class StreamSink:
    """Writes each merged module, padded to the common rank, through an open
    :class:`~sstmerge.io.adapter.AdapterStreamWriter` (whose header was declared from the same plan)."""

    def __init__(self, plan: ComposePlan, writer: AdapterStreamWriter) -> None:
        self.plan, self.writer = plan, writer

    def module(self, name: str, A: torch.Tensor, B: torch.Tensor) -> None:
        self.writer.write_module(name, *pad_rank(A, B, self.plan.rank))

    def full_tensor(self, key: str, tensor: torch.Tensor) -> None:
        self.writer.write_full(key, tensor)


def compose(output: MethodOutput, sink: MemorySink | StreamSink, *, desc: str = "merge",
            timer: Any = None) -> dict[str, dict]:
    """Drain a method's output into ``sink`` (modules in plan order, then full tensors); returns the per-module
    report. A module whose rank differs from the plan is a bug in the method and raises."""
    stage = timer.stage if timer is not None else (lambda name: _nullcontext())
    report: dict[str, dict] = {}
    plan = output.plan
    with tqdm(total=len(plan.shapes), desc=desc, unit="module", disable=quiet(), leave=False) as bar:
        while True:
            with stage("compose"):
                item = next(output.modules, None)
            if item is None:
                break
            if item.A.shape[0] != plan.ranks[item.name]:
                raise RuntimeError(f"{item.name}: composed rank {item.A.shape[0]}, planned {plan.ranks[item.name]}")
            with stage("write"):
                sink.module(item.name, item.A, item.B)
            report[item.name] = item.entry
            bar.update(1)
    _log_partial(report, len(plan.shapes))
    for key, tensor, entry in output.full_tensors:
        with stage("write"):
            sink.full_tensor(key, tensor)
        report[key] = entry
    return report


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()
