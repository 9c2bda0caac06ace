"""Orchestration: load + validate inputs, let the method plan S', compose, write with provenance.

Two paths with the same result: :meth:`SSTMerger.merge` composes in memory (then :func:`save_merged_adapter`);
:meth:`SSTMerger.merge_to` reads the inputs lazily and writes each merged module as it is composed (memory
bounded by a few modules; the default of ``sst-merge merge``, and :func:`merge_utility_safety` with ``stream=True``).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .._logging import quiet
from ..errors import AdapterMismatchError, ConfigError, UnsupportedAdapterError
from ..io.adapter import AdapterStreamWriter, LoraAdapter, read_adapter, write_adapter
from ..io.atomic import OutputClaim
from ..io.hashing import model_files, sha256_file, sha256_files
from ..io.models import BaseModelInfo, default_cache_dir, load_base_info
from ..io.validate import validate_against_base, validate_consistent
from ..data.jsonl import load_examples, resolve_data
from ..fisher.run import compute_fisher
from .baselines import DeltaMergeMethod
from ..linalg.lowrank import pad_rank
from .compose import (
    _log_partial,
    compose_adapters,
    compose_dense,
    iter_compose,
    iter_dense,
    iter_full_tensors,
    plan_compose,
    plan_dense,
    utility_coefficients,
)
from .tables import PRESETS, WEIGHT_TABLES, load_table, module_type
from .methods import METHODS, safety_weights
from .options import MergeConfig, MergeOptions, build_config
from .report import now_iso, plot_spectrum, summary_text, versions, write_report_files

log = logging.getLogger(__name__)

VLLM_DEFAULT_MAX_LORA_RANK = 16  # vLLM's LoRAConfig.max_lora_rank default

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class MergeResult:
    """A merged adapter plus its report. From :meth:`SSTMerger.merge` the adapter is in memory (write it with
    :func:`save_merged_adapter`); from :meth:`SSTMerger.merge_to` it is the written folder, opened lazily.
    ``path`` is the written folder (None until written)."""

    adapter: LoraAdapter
    report: dict[str, Any]
    base: BaseModelInfo | None = None
    config: MergeConfig | None = None
    timings: dict[str, float] = field(default_factory=dict)
    path: Path | None = None


@dataclass
class _Inputs:
    """Validated inputs of one merge (see :meth:`SSTMerger._prepare`)."""

    opts: MergeOptions
    method: Any
    dense: bool
    base: BaseModelInfo | None
    utility: list[LoraAdapter]
    safety: LoraAdapter | None
    coefficients: list[float]
    warnings: list[str]


class _Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0


def _abs(spec: str | Path | None) -> str | None:
    """A path given relative to the working directory, made absolute (so merge_config.yaml can be re-run from
    anywhere); names that are not existing paths (aliases, ``bundled:…``, preset names) are kept as they are."""
    if spec is None:
        return None
    text = str(spec)
    p = Path(text).expanduser()
    return str(p.resolve()) if not text.startswith("bundled:") and p.exists() else text


def _as_adapter(item: LoraAdapter | str | Path, allow_pickle: bool, lazy: bool = False) -> LoraAdapter:
    return item if isinstance(item, LoraAdapter) else read_adapter(item, allow_pickle=allow_pickle, lazy=lazy)


def _describe(adapter: LoraAdapter) -> dict[str, Any]:
    return {
        "path": str(adapter.path) if adapter.path else None,
        "sha256": sha256_files(adapter.files) if adapter.files else None,
        "n_modules": len(adapter.modules),
        "ranks": sorted({s.rank for s in adapter.specs.values()}),
        "lora_alpha": adapter.config.get("lora_alpha"),
        "use_rslora": bool(adapter.config.get("use_rslora", False)),
        "modules_to_save": sorted(adapter.full_tensors),
        "base_model_name_or_path": adapter.base_model_name_or_path,
    }


class SSTMerger:
    """Merge utility LoRA adapters with a safety adapter.

    >>> merger = SSTMerger(base="smollm2", mode="direct", safety_weight=1.0)       # doctest: +SKIP
    >>> result = merger.merge(["runs/utility"], "runs/safety")                     # doctest: +SKIP
    >>> save_merged_adapter(result, "runs/merged")                                  # doctest: +SKIP

    ``k`` and ``residual_ratio`` configure the Fisher-subspace modes; ``mode`` picks the method
    (``sst-merge methods`` lists them).
    """

    def __init__(
        self,
        base: str | Path | BaseModelInfo | None = "smollm2",
        *,
        mode: str = "direct",
        k: int = 10,
        residual_ratio: float = 0.7,
        safety_weight: float = 1.0,
        allow_pickle: bool = False,
        cache_dir: str | Path | None = None,
        **options: Any,
    ) -> None:
        self.options = build_config(
            dict(mode=mode, k=k, residual_ratio=residual_ratio, safety_weight=safety_weight, **options), "SSTMerger"
        ).options()
        self.base_spec = base
        self.allow_pickle = allow_pickle
        self.cache_dir = cache_dir
        self._base: BaseModelInfo | None = base if isinstance(base, BaseModelInfo) else None

    @property
    def mode(self) -> str:
        return self.options.mode

    @property
    def k(self) -> int:
        return self.options.k

    @property
    def residual_ratio(self) -> float:
        return self.options.residual_ratio

    def base_info(self) -> BaseModelInfo | None:
        if self._base is None and self.base_spec is not None:
            self._base = load_base_info(self.base_spec, self.cache_dir)
        return self._base

    @staticmethod
    def _validate_fisher_inputs(opts: MergeOptions, base: BaseModelInfo | None, safety: LoraAdapter | None,
                                types: set[str]) -> None:
        """Everything a Fisher-based mode needs, checked before any model runs."""
        if safety is None:
            raise ConfigError(f"mode {opts.mode!r} projects the safety adapter: pass --safety")
        if base is None:
            raise ConfigError(f"mode {opts.mode!r} runs the base model for the Fisher: pass --base")
        if not safety.modules:
            raise AdapterMismatchError(f"{safety.name}: the safety adapter has no LoRA modules to project")
        load_examples(resolve_data(opts.harmful_data), max_samples=opts.max_samples, seed=opts.seed)
        load_examples(resolve_data(opts.benign_data), max_samples=opts.max_samples, seed=opts.seed)
        if opts.mode == "layerwise":
            load_table(opts.preset, PRESETS, lo=0.0, hi=1.0, known_types=types)

    @staticmethod
    def _refuse_full_tensors(opts: MergeOptions, adapters: Sequence[LoraAdapter]) -> None:
        """Dense modes merge LoRA modules only; a modules_to_save copy would be dropped or misread otherwise."""
        for adapter in adapters:
            if adapter.full_tensors:
                raise UnsupportedAdapterError(
                    f"{adapter.name}: mode {opts.mode!r} merges the LoRA modules' dense updates and does not handle "
                    f"modules_to_save tensors ({sorted(adapter.full_tensors)}); use mode 'direct' (it merges them as "
                    "differences from the base weight) or an adapter trained without modules_to_save"
                )

    def _prepare(self, utility, safety, timer: _Timer, *, lazy: bool) -> _Inputs:
        """Check the options, read the adapters (headers only with ``lazy``) and validate them; nothing heavy."""
        opts: MergeOptions = self.options
        if isinstance(utility, (str, Path, LoraAdapter)):
            utility = [utility]
        if not utility and safety is None:
            raise ConfigError("nothing to merge: give at least one --utility adapter or a --safety adapter")
        if opts.utility_weights is not None and len(opts.utility_weights) != len(utility):
            raise ConfigError(
                f"utility_weights has {len(opts.utility_weights)} values for {len(utility)} utility adapters; give one per adapter"
            )
        method = METHODS.get(opts.mode)()
        dense = isinstance(method, DeltaMergeMethod)
        if method.needs_safety and safety is None:
            raise ConfigError(f"mode {opts.mode!r} compares or projects against the safety adapter: pass --safety S")
        warnings: list[str] = []
        with timer.stage("load_inputs"):
            base = self.base_info()
            utility_adapters = [_as_adapter(u, self.allow_pickle, lazy) for u in utility]
            safety_adapter = _as_adapter(safety, self.allow_pickle, lazy) if safety is not None else None
        with timer.stage("validate"):
            everything = utility_adapters + ([safety_adapter] if safety_adapter is not None else [])
            if base is not None:
                for adapter in everything:
                    warnings += validate_against_base(adapter, base)
            else:
                log.warning("no base model given: shapes are only checked between the adapters")
                validate_consistent(everything)
            types = {module_type(m) for a in everything for m in list(a.specs) + list(a.full_shapes)}
            if method.needs_fisher:
                self._validate_fisher_inputs(opts, base, safety_adapter, types)
            if opts.layer_weights is not None:
                load_table(opts.layer_weights, WEIGHT_TABLES, known_types=types)
            if dense:
                self._refuse_full_tensors(opts, everything)
        if method.needs_fisher and safety_adapter is not None:
            # the Fisher pass and the projection read the safety adapter many times: one adapter, held in memory
            with timer.stage("load_inputs"):
                safety_adapter = safety_adapter.materialize()
        full_rank = max((min(spec.shape) for a in everything for spec in a.specs.values()), default=None)
        if opts.recompress_rank is not None and full_rank is not None and opts.recompress_rank > full_rank:
            warnings.append(f"recompress_rank {opts.recompress_rank} exceeds the full rank of every module "
                            f"(largest min(d_out, d_in) = {full_rank}); using {full_rank}")
            log.warning(warnings[-1])
            opts = opts.model_copy(update={"recompress_rank": full_rank})
        coefficients = utility_coefficients(len(utility_adapters), opts.utility_coefficients, opts.utility_weights)
        return _Inputs(opts, method, dense, base, utility_adapters, safety_adapter, coefficients, warnings)

    def _plan_safety(self, inp: _Inputs, timer: _Timer) -> tuple[LoraAdapter | None, dict[str, float], dict[str, Any]]:
        """S', w^m and the method's report (task-arithmetic modes; may run the Fisher pass)."""

        def fisher_provider():
            with timer.stage("fisher"):
                return compute_fisher(inp.base, inp.utility, inp.coefficients, inp.safety, inp.opts.fisher_settings(),
                                      self.cache_dir)

        with timer.stage("plan_safety"):
            if inp.safety is None:
                return None, {}, {}
            context = {"base": inp.base, "utility": inp.utility, "fisher": fisher_provider}
            plan = inp.method.plan_safety(inp.safety, inp.opts, context)
            return plan.safety, plan.weights, plan.report

    def _dense_weights(self, inp: _Inputs) -> tuple[dict[str, float], dict | None]:
        return safety_weights(inp.safety, inp.opts) if inp.safety is not None else ({}, None)

    def _report(
        self,
        inp: _Inputs,
        config: MergeConfig | None,
        timer: _Timer,
        *,
        module_report: dict[str, dict],
        method_report: dict[str, Any],
        rank_out: int,
        n_modules: int,
        full_keys: list[str],
        stream: bool,
    ) -> dict[str, Any]:
        """The merge report (merge_report.json), identical for the in-memory and the streaming path except
        ``config.stream``, ``created`` and ``timings``."""
        opts, base, warnings = inp.opts, inp.base, list(inp.warnings)
        if full_keys:
            warnings.append("the merged adapter carries modules_to_save tensors "
                            f"({sorted(full_keys)}): PEFT loads it, vLLM refuses adapters with modules_to_save")
        if rank_out > VLLM_DEFAULT_MAX_LORA_RANK:
            warnings.append(f"merged rank {rank_out} (rank concatenation adds ranks) exceeds vLLM's default "
                            f"max_lora_rank={VLLM_DEFAULT_MAX_LORA_RANK}: serve with --max-lora-rank >= {rank_out} "
                            "or merge with --recompress-rank")
        for w in warnings[-2:]:
            if "vLLM" in w:
                log.warning(w)
        errors = [e["recompression_rel_error"] for e in module_report.values() if "recompression_rel_error" in e]
        resolved = (config or MergeConfig(**opts.model_dump())).model_dump()
        resolved.update(opts.model_dump())  # values resolved during validation (e.g. a capped recompress_rank)
        resolved.update({"base": _abs(base.spec) if base is not None else None,
                         "utility": [_abs(a.path) for a in inp.utility],
                         "safety": _abs(inp.safety.path) if inp.safety is not None else None,
                         "harmful_data": _abs(opts.harmful_data), "benign_data": _abs(opts.benign_data),
                         "preset": _abs(opts.preset),
                         "layer_weights": _abs(opts.layer_weights) if opts.layer_weights is not None else None,
                         "cache_dir": _abs(self.cache_dir) if self.cache_dir is not None else None,
                         "stream": stream})
        return {
            "sstmerge_report_version": 1,
            "created": now_iso(),
            "command": sys.argv if Path(sys.argv[0]).name == "sst-merge" else None,
            "config": resolved,
            "inputs": {
                "base": {
                    "spec": str(base.spec) if base else None,
                    "path": str(base.path) if base else None,
                    "sha256": sha256_files(model_files(base.path)) if base else None,
                },
                "utility": [dict(_describe(a), coefficient=c) for a, c in zip(inp.utility, inp.coefficients)],
                "safety": _describe(inp.safety) if inp.safety is not None else None,
            },
            "method": {"name": opts.mode, **method_report},
            "output": {
                "rank": rank_out,
                "n_modules": n_modules,
                "n_partial_modules": sum(1 for e in module_report.values() if e.get("absent_in")),
                "max_recompression_rel_error": max(errors) if errors else None,
                "dtype": opts.dtype,
            },
            "modules": module_report,
            "versions": versions(),
            "warnings": warnings,
            "timings": timer.timings,
        }

    def merge(
        self,
        utility: Sequence[LoraAdapter | str | Path],
        safety: LoraAdapter | str | Path | None,
        *,
        config: MergeConfig | None = None,
    ) -> MergeResult:
        """Validate everything, then compute the merged adapter in memory (nothing is written here; see
        :func:`save_merged_adapter`, or :meth:`merge_to` to merge straight to disk in bounded memory)."""
        timer = _Timer()
        inp = self._prepare(utility, safety, timer, lazy=False)
        if inp.dense:
            with timer.stage("compose"):
                weights, table = self._dense_weights(inp)
                merged, module_report = compose_dense(inp.method, inp.utility, inp.coefficients, inp.safety, weights,
                                                      inp.opts, recompress_rank=inp.opts.recompress_rank)
            method_report = {**inp.method.describe(inp.opts), **inp.method.summarize(module_report),
                             **({"layer_weights": table} if table else {})}
        else:
            safety_used, weights, method_report = self._plan_safety(inp, timer)
            with timer.stage("compose"):
                merged, module_report = compose_adapters(
                    inp.utility, inp.coefficients, safety_used, weights, base=inp.base,
                    recompress_rank=inp.opts.recompress_rank,
                )
        merged.config["base_model_name_or_path"] = str(inp.base.spec) if inp.base is not None else None
        report = self._report(inp, config, timer, module_report=module_report, method_report=method_report,
                              rank_out=max((m.rank for m in merged.modules.values()), default=0),
                              n_modules=len(merged.modules), full_keys=list(merged.full_tensors), stream=False)
        return MergeResult(adapter=merged, report=report, base=inp.base, config=config, timings=timer.timings)

    def merge_to(
        self,
        utility: Sequence[LoraAdapter | str | Path],
        safety: LoraAdapter | str | Path | None,
        out: str | Path,
        *,
        overwrite: bool = False,
        config: MergeConfig | None = None,
        stream: bool = True,
    ) -> MergeResult:
        """Merge straight into the PEFT folder ``out`` (atomically), one module at a time (``stream=False``:
        :meth:`merge` in memory, then :func:`save_merged_adapter`; same files).

        The inputs are read lazily (headers now, each module when it is composed), the output layout (the
        common rank R, every key's shape) comes from :func:`~sstmerge.merge.compose.plan_compose` /
        :func:`~sstmerge.merge.compose.plan_dense`, so the safetensors header is written first and each merged
        module (zero-padded to R, cast to the output dtype) is appended as it is produced. Memory: a few
        modules' tensors, independent of the adapters' size, plus what the method itself needs (the Fisher
        modes hold the safety adapter and the base model). The adapter files are byte-identical to what
        :meth:`merge` followed by :func:`save_merged_adapter` writes, and the report files (merge_report.json/.txt,
        merge_config.yaml) have the same content except ``config.stream``, ``created`` and ``timings``.

        Returns the report and, as ``adapter``, the written adapter opened lazily (tensors in the output dtype).
        The output folder is claimed before any work (:class:`~sstmerge.io.atomic.OutputClaim`: never an input or
        the current directory; ``overwrite`` replaces only an earlier sstmerge output; a concurrent writer of the
        same folder fails at once).
        """
        if isinstance(utility, (str, Path, LoraAdapter)):
            utility = [utility]
        with OutputClaim(out, overwrite=overwrite, inputs=self.input_paths(utility, safety), kind="merge") as claim:
            if stream:
                return self._merge_to(utility, safety, claim, config)
            result = self.merge(utility, safety, config=config)
            save_merged_adapter(result, claim.dest, claim=claim)
            return result

    def _merge_to(self, utility, safety, claim: OutputClaim, config: MergeConfig | None) -> MergeResult:
        timer = _Timer()
        inp = self._prepare(utility, safety, timer, lazy=True)
        opts = inp.opts
        if inp.dense:
            weights, table = self._dense_weights(inp)
            plan = plan_dense(inp.utility, inp.safety, recompress_rank=opts.recompress_rank)
            modules = iter_dense(inp.method, inp.utility, inp.coefficients, inp.safety, weights, opts,
                                 recompress_rank=opts.recompress_rank)
            fulls: Iterator = iter(())
        else:
            safety_used, weights, method_report = self._plan_safety(inp, timer)
            plan = plan_compose(inp.utility, inp.coefficients, safety_used, weights, base=inp.base,
                                recompress_rank=opts.recompress_rank)
            modules = iter_compose(inp.utility, inp.coefficients, safety_used, weights,
                                   recompress_rank=opts.recompress_rank)
            fulls = iter_full_tensors(inp.utility, inp.coefficients, safety_used, weights, inp.base)
        base, dtype = inp.base, _DTYPES[opts.dtype]
        module_report: dict[str, dict] = {}
        with claim.write() as tmp:
            with timer.stage("write"):
                writer = AdapterStreamWriter(
                    tmp, plan.shapes, plan.rank, plan.full_shapes, dtype=dtype,
                    base_model_name_or_path=str(base.spec) if base is not None else None,
                    all_linear_names=list(base.linear_shapes) if base is not None else None,
                )
            bar = tqdm(total=len(plan.shapes), desc=f"{opts.mode} (streaming)", unit="module", disable=quiet(),
                       leave=False)
            with writer, bar:
                while True:
                    with timer.stage("compose"):
                        item = next(modules, None)
                    if item is None:
                        break
                    if item.A.shape[0] != plan.ranks[item.name]:  # the plan and the composition disagree: a bug
                        raise RuntimeError(f"{item.name}: composed rank {item.A.shape[0]}, planned {plan.ranks[item.name]}")
                    with timer.stage("write"):
                        writer.write_module(item.name, *pad_rank(item.A, item.B, plan.rank))
                    module_report[item.name] = item.entry
                    bar.update(1)
                _log_partial(module_report, len(plan.shapes))
                for key, tensor, entry in fulls:
                    with timer.stage("write"):
                        writer.write_full(key, tensor)
                    module_report[key] = entry
            if inp.dense:
                method_report = {**inp.method.describe(opts), **inp.method.summarize(module_report),
                                 **({"layer_weights": table} if table else {})}
            report = self._report(inp, config, timer, module_report=module_report, method_report=method_report,
                                  rank_out=plan.rank, n_modules=len(plan.shapes), full_keys=list(plan.full_shapes),
                                  stream=True)
            _finish_folder(tmp, report, claim.dest)
        final = claim.dest
        log.info("wrote merged adapter to %s (rank %s)", final, report["output"]["rank"])
        return MergeResult(adapter=read_adapter(final, lazy=True), report=report, base=base, config=config,
                           timings=timer.timings, path=final)

    def input_paths(self, utility, safety) -> list[Path]:
        """Every file or folder this merge reads (an output may never be or hold one of them)."""
        from ..data.jsonl import BUNDLED_PREFIX

        items = list(utility if isinstance(utility, (list, tuple)) else [utility]) + [safety]
        paths = [i.path if isinstance(i, LoraAdapter) else i for i in items if i is not None]
        if isinstance(self.base_spec, BaseModelInfo):
            paths.append(self.base_spec.path)
        elif self.base_spec is not None:
            paths.append(self.base_spec)  # an alias (smollm2) is no path and is skipped by the claim
        opts = self.options
        paths += [d for d in (opts.harmful_data, opts.benign_data) if not str(d).startswith(BUNDLED_PREFIX)]
        paths += [t for t in (opts.preset, opts.layer_weights) if t is not None]
        paths.append(self.cache_dir if self.cache_dir is not None else default_cache_dir())
        return [Path(str(p)) for p in paths if p is not None]


def _finish_folder(tmp: Path, report: dict[str, Any], out: str | Path) -> None:
    """Hashes of the written adapter files, the resolved output path, the report files and the spectrum plot."""
    report["output"]["sha256"] = {
        name: sha256_file(tmp / name) for name in ("adapter_config.json", "adapter_model.safetensors")
    }
    report["config"]["out"] = str(Path(out).expanduser().resolve())
    write_report_files(tmp, report)
    if report["method"].get("eigenvalues"):
        plot_spectrum(report["method"]["eigenvalues"], tmp / "spectrum.png",
                      title=f"{report['method']['estimator']} Fisher, k={report['method']['k_requested']}")


def save_merged_adapter(result: MergeResult, out: str | Path, *, overwrite: bool = False,
                        claim: OutputClaim | None = None) -> Path:
    """Write the merged adapter (PEFT folder) + merge_report.json/.txt + merge_config.yaml, atomically.

    Every tensor is checked finite in the output dtype before the folder is committed. ``out`` is claimed
    under the rules of :class:`~sstmerge.io.atomic.OutputClaim` (inputs named in the report are protected),
    or pass the ``claim`` already held."""
    t0 = time.perf_counter()
    dtype = _DTYPES[result.report["output"]["dtype"]]
    base = result.base
    if claim is None:
        cfg = result.report.get("config", {})
        inputs = [*cfg.get("utility", []), cfg.get("safety"), base.path if base is not None else None]
        with OutputClaim(out, overwrite=overwrite, inputs=inputs, kind="merge") as claim:
            return save_merged_adapter(result, claim.dest, claim=claim)
    with claim.write() as tmp:
        write_adapter(
            result.adapter,
            tmp,
            dtype=dtype,
            base_model_name_or_path=result.adapter.config.get("base_model_name_or_path"),
            all_linear_names=list(base.linear_shapes) if base is not None else None,
        )
        result.report["timings"]["write"] = time.perf_counter() - t0
        _finish_folder(tmp, result.report, claim.dest)
    final = claim.dest
    result.path = final
    log.info("wrote merged adapter to %s (rank %s)", final, result.report["output"]["rank"])
    return final


def merge_utility_safety(
    base: str | Path | None,
    utility: Sequence[str | Path | LoraAdapter] | str | Path,
    safety: str | Path | LoraAdapter | None,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    stream: bool = False,
    **options: Any,
) -> MergeResult:
    """One call: merge ``utility`` adapters with ``safety`` on ``base``; write to ``out`` if given.

    ``options`` are :class:`~sstmerge.merge.options.MergeOptions` fields (mode, safety_weight, k, ...) plus
    ``allow_pickle`` and ``cache_dir``. By default the merged adapter is built in memory and ``result.adapter``
    holds it at full precision (float32, float64 for dense modes), then it is written. With ``out`` and
    ``stream=True`` it is written module by module instead (:meth:`SSTMerger.merge_to`: memory bounded by a
    few modules, the same files; the default of ``sst-merge merge``) and ``result.adapter`` reads the written
    adapter lazily, in the output dtype.
    """
    allow_pickle = options.pop("allow_pickle", False)
    cache_dir = options.pop("cache_dir", None)
    merger = SSTMerger(base, allow_pickle=allow_pickle, cache_dir=cache_dir, **options)
    if out is None:
        return merger.merge(utility, safety)
    return merger.merge_to(utility, safety, out, overwrite=overwrite, stream=stream)


__all__ = ["MergeResult", "SSTMerger", "merge_utility_safety", "save_merged_adapter", "summary_text"]
