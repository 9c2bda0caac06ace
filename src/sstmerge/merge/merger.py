"""Orchestration: load + validate inputs, let the method plan S', compose, write with provenance."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterMismatchError, ConfigError, UnsupportedAdapterError
from ..io.adapter import LoraAdapter, read_adapter, write_adapter
from ..io.atomic import atomic_output_dir
from ..io.hashing import model_files, sha256_file, sha256_files
from ..io.models import BaseModelInfo, load_base_info
from ..io.validate import validate_against_base, validate_consistent
from ..data.jsonl import load_examples, resolve_data
from ..fisher.run import compute_fisher
from .baselines import DeltaMergeMethod
from .compose import compose_adapters, compose_dense, utility_coefficients
from .tables import PRESETS, WEIGHT_TABLES, load_table
from .methods import METHODS, safety_weights
from .options import MergeConfig, MergeOptions, build_config
from .report import now_iso, plot_spectrum, summary_text, versions, write_report_files

log = logging.getLogger(__name__)

VLLM_DEFAULT_MAX_LORA_RANK = 16  # vLLM's LoRAConfig.max_lora_rank default

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class MergeResult:
    """A merged adapter in memory plus its report; write it with :func:`save_merged_adapter`."""

    adapter: LoraAdapter
    report: dict[str, Any]
    base: BaseModelInfo | None = None
    config: MergeConfig | None = None
    timings: dict[str, float] = field(default_factory=dict)


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


def _as_adapter(item: LoraAdapter | str | Path, allow_pickle: bool) -> LoraAdapter:
    return item if isinstance(item, LoraAdapter) else read_adapter(item, allow_pickle=allow_pickle)


def _describe(adapter: LoraAdapter) -> dict[str, Any]:
    return {
        "path": str(adapter.path) if adapter.path else None,
        "sha256": sha256_files(adapter.files) if adapter.files else None,
        "n_modules": len(adapter.modules),
        "ranks": sorted({m.rank for m in adapter.modules.values()}),
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
    def _validate_fisher_inputs(opts: MergeOptions, base: BaseModelInfo | None, safety: LoraAdapter | None) -> None:
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
            load_table(opts.preset, PRESETS, lo=0.0, hi=1.0)

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

    def merge(
        self,
        utility: Sequence[LoraAdapter | str | Path],
        safety: LoraAdapter | str | Path | None,
        *,
        config: MergeConfig | None = None,
    ) -> MergeResult:
        """Validate everything, then compute the merged adapter (nothing is written here)."""
        timer = _Timer()
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
            utility_adapters = [_as_adapter(u, self.allow_pickle) for u in utility]
            safety_adapter = _as_adapter(safety, self.allow_pickle) if safety is not None else None
        with timer.stage("validate"):
            everything = utility_adapters + ([safety_adapter] if safety_adapter is not None else [])
            if base is not None:
                for adapter in everything:
                    warnings += validate_against_base(adapter, base)
            else:
                log.warning("no base model given: shapes are only checked between the adapters")
                validate_consistent(everything)
            if method.needs_fisher:
                self._validate_fisher_inputs(opts, base, safety_adapter)
            if opts.layer_weights is not None:
                load_table(opts.layer_weights, WEIGHT_TABLES)
            if dense:
                self._refuse_full_tensors(opts, everything)
        coefficients = utility_coefficients(len(utility_adapters), opts.utility_coefficients, opts.utility_weights)
        method_report: dict[str, Any] = {}

        def fisher_provider():
            with timer.stage("fisher"):
                return compute_fisher(base, utility_adapters, coefficients, safety_adapter, opts.fisher_settings(),
                                      self.cache_dir)

        if dense:
            with timer.stage("compose"):
                weights, table = safety_weights(safety_adapter, opts) if safety_adapter is not None else ({}, None)
                merged, module_report = compose_dense(method, utility_adapters, coefficients, safety_adapter, weights,
                                                      opts, recompress_rank=opts.recompress_rank)
            method_report = {**method.describe(opts), **method.summarize(module_report),
                             **({"layer_weights": table} if table else {})}
        else:
            with timer.stage("plan_safety"):
                if safety_adapter is not None:
                    context = {"base": base, "utility": utility_adapters, "fisher": fisher_provider}
                    plan = method.plan_safety(safety_adapter, opts, context)
                    safety_used, weights, method_report = plan.safety, plan.weights, plan.report
                else:
                    safety_used, weights = None, {}
            with timer.stage("compose"):
                merged, module_report = compose_adapters(
                    utility_adapters, coefficients, safety_used, weights, base=base, recompress_rank=opts.recompress_rank
                )
        merged.config["base_model_name_or_path"] = str(base.spec) if base is not None else None
        rank_out = max((m.rank for m in merged.modules.values()), default=0)
        if merged.full_tensors:
            warnings.append("the merged adapter carries modules_to_save tensors "
                            f"({sorted(merged.full_tensors)}): PEFT loads it, vLLM refuses adapters with modules_to_save")
        if rank_out > VLLM_DEFAULT_MAX_LORA_RANK:
            warnings.append(f"merged rank {rank_out} (rank concatenation adds ranks) exceeds vLLM's default "
                            f"max_lora_rank={VLLM_DEFAULT_MAX_LORA_RANK}: serve with --max-lora-rank >= {rank_out} "
                            "or merge with --recompress-rank")
        for w in warnings[-2:]:
            if "vLLM" in w:
                log.warning(w)
        errors = [e["recompression_rel_error"] for e in module_report.values() if "recompression_rel_error" in e]
        resolved = (config or MergeConfig(**opts.model_dump())).model_dump()
        resolved.update({"base": str(base.spec) if base is not None else None,
                         "utility": [str(a.path) for a in utility_adapters],
                         "safety": str(safety_adapter.path) if safety_adapter is not None else None})
        report = {
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
                "utility": [dict(_describe(a), coefficient=c) for a, c in zip(utility_adapters, coefficients)],
                "safety": _describe(safety_adapter) if safety_adapter is not None else None,
            },
            "method": {"name": opts.mode, **method_report},
            "output": {
                "rank": max((m.rank for m in merged.modules.values()), default=0),
                "n_modules": len(merged.modules),
                "n_partial_modules": sum(1 for e in module_report.values() if e.get("absent_in")),
                "max_recompression_rel_error": max(errors) if errors else None,
                "dtype": opts.dtype,
            },
            "modules": module_report,
            "versions": versions(),
            "warnings": warnings,
            "timings": timer.timings,
        }
        return MergeResult(adapter=merged, report=report, base=base, config=config, timings=timer.timings)


def save_merged_adapter(result: MergeResult, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the merged adapter (PEFT folder) + merge_report.json/.txt + merge_config.yaml, atomically."""
    t0 = time.perf_counter()
    dtype = _DTYPES[result.report["output"]["dtype"]]
    base = result.base
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        write_adapter(
            result.adapter,
            tmp,
            dtype=dtype,
            base_model_name_or_path=result.adapter.config.get("base_model_name_or_path"),
            all_linear_names=list(base.linear_shapes) if base is not None else None,
        )
        result.report["timings"]["write"] = time.perf_counter() - t0
        result.report["output"]["sha256"] = {
            name: sha256_file(tmp / name) for name in ("adapter_config.json", "adapter_model.safetensors")
        }
        result.report["config"]["out"] = str(Path(out).expanduser().resolve())
        write_report_files(tmp, result.report)
        if result.report["method"].get("eigenvalues"):
            plot_spectrum(result.report["method"]["eigenvalues"], tmp / "spectrum.png",
                          title=f"{result.report['method']['estimator']} Fisher, k={result.report['method']['k_requested']}")
    final = Path(out).expanduser().resolve()
    log.info("wrote merged adapter to %s (rank %s)", final, result.report["output"]["rank"])
    return final


def merge_utility_safety(
    base: str | Path | None,
    utility: Sequence[str | Path | LoraAdapter] | str | Path,
    safety: str | Path | LoraAdapter | None,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    **options: Any,
) -> MergeResult:
    """One call: merge ``utility`` adapters with ``safety`` on ``base``; write to ``out`` if given.

    ``options`` are :class:`~sstmerge.merge.options.MergeOptions` fields (mode, safety_weight, k, ...) plus
    ``allow_pickle`` and ``cache_dir``.
    """
    allow_pickle = options.pop("allow_pickle", False)
    cache_dir = options.pop("cache_dir", None)
    merger = SSTMerger(base, allow_pickle=allow_pickle, cache_dir=cache_dir, **options)
    result = merger.merge(utility, safety)
    if out is not None:
        save_merged_adapter(result, out, overwrite=overwrite)
    return result


__all__ = ["MergeResult", "SSTMerger", "merge_utility_safety", "save_merged_adapter", "summary_text"]
