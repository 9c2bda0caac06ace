"""Orchestration: one path for every method. Claim the output, read and validate the inputs, let the method
produce its modules (:meth:`~sstmerge.merge.method.MergeMethod.merge`), and let the one composer
(:func:`~sstmerge.merge.compose.compose`) write them, streamed into the output folder (the default everywhere)
or collected in memory, with the provenance report.
"""

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

from ..data.jsonl import BUNDLED_PREFIX, load_examples, resolve_data
from ..errors import AdapterMismatchError, ConfigError, UnsupportedAdapterError
from ..fisher.point import fisher_target
from ..fisher.run import compute_fisher
from ..io.adapter import AdapterStreamWriter, LoraAdapter, read_adapter, write_adapter
from ..io.atomic import OutputClaim
from ..io.hashing import model_files, sha256_file, sha256_files
from ..io.models import BaseModelInfo, default_cache_dir, load_base_info
from ..io.validate import validate_against_base, validate_consistent
from .compose import MemorySink, StreamSink, compose, utility_coefficients
from .config import flat_config, resolve_options
from .method import MergeContext, MergeInputs, MergeMethod, method_class
from .methods import safety_weights
from .options import MergeConfig, MergeIO, MergeOptions
from ..provenance import now_iso, versions
from .report import plot_spectrum, summary_text, write_report_files
from .tables import WEIGHT_TABLES, load_table, module_type

log = logging.getLogger(__name__)

VLLM_DEFAULT_MAX_LORA_RANK = 16  # vLLM's LoRAConfig.max_lora_rank default

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class MergeResult:
    """A merged adapter plus its report. From :meth:`SSTMerger.merge` the adapter is in memory (full precision;
    write it with :func:`save_merged_adapter`); from :meth:`SSTMerger.merge_to` it is the written folder,
    opened lazily. ``path`` is the written folder (None until written)."""

    adapter: LoraAdapter
    report: dict[str, Any]
    base: BaseModelInfo | None = None
    config: MergeConfig | None = None
    timings: dict[str, float] = field(default_factory=dict)
    path: Path | None = None


@dataclass
class _Prepared:
    """Validated inputs of one merge (see :meth:`SSTMerger._prepare`)."""

    options: MergeOptions
    method: MergeMethod
    inputs: MergeInputs
    layer_table: dict | None
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


def _repeated_inputs(utility: Sequence[LoraAdapter], safety: LoraAdapter | None) -> list[str]:
    """Warnings (also logged) for an adapter given twice: the same file or folder, or the same in-memory object.

    Legal, and almost always a slip in a script: a utility adapter listed twice adds its update twice (what
    ``--utility-weights`` says explicitly), and the safety adapter listed as a utility adapter too counts as
    both."""
    seen: dict[Any, str] = {}
    out: list[str] = []
    roles = [("a utility adapter", a) for a in utility]
    roles += [("the safety adapter", safety)] if safety is not None else []
    for role, adapter in roles:
        key = adapter.path.resolve() if adapter.path is not None else id(adapter)
        if key in seen:
            if role == seen[key]:
                twice = ("given twice as a utility adapter: its update is added twice (--utility-weights says that "
                         "explicitly)")
            else:
                twice = "both a utility adapter and the safety adapter: its update counts as both"
            out.append(f"{adapter.path or 'an in-memory adapter'} is {twice}; check the inputs if that is not meant")
            log.warning(out[-1])
        seen.setdefault(key, role)
    return out


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

    >>> merger = SSTMerger(base="smollm2", mode="residual", residual_ratio=0.5)     # doctest: +SKIP
    >>> result = merger.merge_to(["runs/utility"], "runs/safety", "runs/merged")    # doctest: +SKIP

    Options are flat keys (``mode`` and the method's parameters, the common options, the Fisher settings;
    `sst-merge methods` lists them), resolved once into :attr:`options`; or pass a resolved ``options``.
    """

    def __init__(
        self,
        base: str | Path | BaseModelInfo | None = "smollm2",
        *,
        options: MergeOptions | None = None,
        allow_pickle: bool = False,
        cache_dir: str | Path | None = None,
        **flat_options: Any,
    ) -> None:
        if options is not None and flat_options:
            raise ConfigError(f"give either options= or option keys, not both ({sorted(flat_options)})")
        self.options = options if options is not None else resolve_options(flat_options, "SSTMerger")
        self.base_spec = base
        self.allow_pickle = allow_pickle
        self.cache_dir = cache_dir
        self._base: BaseModelInfo | None = base if isinstance(base, BaseModelInfo) else None

    @property
    def mode(self) -> str:
        return self.options.mode

    def base_info(self) -> BaseModelInfo | None:
        if self._base is None and self.base_spec is not None:
            self._base = load_base_info(self.base_spec, self.cache_dir)
        return self._base

    # ---------------------------------------------------------------------------------------- preparation
    def _prepare(self, utility, safety, timer: _Timer, *, lazy: bool) -> _Prepared:
        """Check the options, read the adapters (headers only with ``lazy``) and validate them; nothing heavy."""
        opts = self.options
        if isinstance(utility, (str, Path, LoraAdapter)):
            utility = [utility]
        if not utility and safety is None:
            raise ConfigError("nothing to merge: give at least one --utility adapter or a --safety adapter")
        if opts.utility_weights is not None and len(opts.utility_weights) != len(utility):
            raise ConfigError(
                f"utility_weights has {len(opts.utility_weights)} values for {len(utility)} utility adapters; give one per adapter"
            )
        method = method_class(opts.mode)()
        if method.needs_safety and safety is None:
            raise ConfigError(f"mode {opts.mode!r} compares or projects against the safety adapter: pass --safety S")
        warnings: list[str] = []
        with timer.stage("load_inputs"):
            base = self.base_info()
            utility_adapters = [_as_adapter(u, self.allow_pickle, lazy) for u in utility]
            safety_adapter = _as_adapter(safety, self.allow_pickle, lazy) if safety is not None else None
        with timer.stage("validate"):
            everything = utility_adapters + ([safety_adapter] if safety_adapter is not None else [])
            warnings += _repeated_inputs(utility_adapters, safety_adapter)
            if base is not None:
                for adapter in everything:
                    warnings += validate_against_base(adapter, base)
            else:
                log.warning("no base model given: shapes are only checked between the adapters")
                validate_consistent(everything)
            types = {module_type(m) for a in everything for m in list(a.specs) + list(a.full_shapes)}
            if method.needs_fisher:
                self._validate_fisher_inputs(opts, base, safety_adapter)
            if opts.layer_weights is not None:
                load_table(opts.layer_weights, WEIGHT_TABLES, known_types=types)
            if method.dense:
                self._refuse_full_tensors(opts, everything)
            full_rank = max((min(spec.shape) for a in everything for spec in a.specs.values()), default=None)
            if isinstance(opts.recompress_rank, int) and full_rank is not None and opts.recompress_rank > full_rank:
                warnings.append(f"recompress_rank {opts.recompress_rank} exceeds the full rank of every module "
                                f"(largest min(d_out, d_in) = {full_rank}); using {full_rank}")
                log.warning(warnings[-1])
                opts = opts.model_copy(update={"recompress_rank": full_rank})
        if method.needs_fisher and safety_adapter is not None:
            # the Fisher pass and the projection read the safety adapter many times: one adapter, held in memory
            with timer.stage("load_inputs"):
                safety_adapter = safety_adapter.materialize()
        coefficients = utility_coefficients(len(utility_adapters), opts.utility_coefficients, opts.utility_weights)
        weights, table = safety_weights(safety_adapter, opts)
        inputs = MergeInputs(utility=tuple(utility_adapters), coefficients=tuple(coefficients), safety=safety_adapter,
                             safety_weights=weights, base=base)
        with timer.stage("validate"):
            warnings += method.validate(inputs, opts)
        return _Prepared(opts, method, inputs, table, warnings)

    @staticmethod
    def _validate_fisher_inputs(opts: MergeOptions, base: BaseModelInfo | None, safety: LoraAdapter | None) -> None:
        """Everything a Fisher-based method needs, checked before any model runs."""
        if safety is None:
            raise ConfigError(f"mode {opts.mode!r} projects the safety adapter: pass --safety")
        if base is None:
            raise ConfigError(f"mode {opts.mode!r} runs the base model for the Fisher: pass --base")
        if not safety.specs:
            raise AdapterMismatchError(f"{safety.name}: the safety adapter has no LoRA modules to project")
        load_examples(resolve_data(opts.fisher.harmful_data), max_samples=opts.fisher.max_samples, seed=opts.seed)
        load_examples(resolve_data(opts.fisher.benign_data), max_samples=opts.fisher.max_samples, seed=opts.seed)

    @staticmethod
    def _refuse_full_tensors(opts: MergeOptions, adapters: Sequence[LoraAdapter]) -> None:
        """Dense methods merge LoRA modules only; a modules_to_save copy would be dropped or misread otherwise."""
        for adapter in adapters:
            if adapter.full_shapes:
                raise UnsupportedAdapterError(
                    f"{adapter.name}: mode {opts.mode!r} merges the LoRA modules' dense updates and does not handle "
                    f"modules_to_save tensors ({sorted(adapter.full_shapes)}); use mode 'direct' (it merges them as "
                    "differences from the base weight) or an adapter trained without modules_to_save"
                )

    def _context(self, prep: _Prepared, timer: _Timer) -> MergeContext:
        inp = prep.inputs

        def fisher(wrt: int | None = None):
            """The Fisher run w.r.t. the safety adapter's factors (``wrt=None``) or utility adapter ``wrt``'s,
            always at the point base + Σ c_i ΔW_Ui + ΔW_S."""
            with timer.stage("fisher"):
                if wrt is None:
                    return compute_fisher(inp.base, list(inp.utility), list(inp.coefficients), inp.safety,
                                          prep.options.fisher, self.cache_dir)
                others = [u for i, u in enumerate(inp.utility) if i != wrt] + [inp.safety]
                coefficients = [c for i, c in enumerate(inp.coefficients) if i != wrt] + [1.0]
                target = fisher_target(inp.utility[wrt], inp.coefficients[wrt])
                return compute_fisher(inp.base, others, coefficients, target, prep.options.fisher, self.cache_dir)

        return MergeContext(fisher=fisher if prep.method.needs_fisher else None)

    # ---------------------------------------------------------------------------------------- merging
    def merge(
        self,
        utility: Sequence[LoraAdapter | str | Path],
        safety: LoraAdapter | str | Path | None,
        *,
        config: MergeConfig | None = None,
    ) -> MergeResult:
        """Validate everything, then compute the merged adapter in memory at full precision (nothing is written
        here; see :func:`save_merged_adapter`, or :meth:`merge_to`)."""
        timer = _Timer()
        prep = self._prepare(utility, safety, timer, lazy=False)
        with timer.stage("method"):
            output = prep.method.merge(prep.inputs, prep.options, self._context(prep, timer))
        sink = MemorySink(output.plan)
        module_report = compose(output, sink, desc=prep.options.mode, timer=timer)
        merged = sink.adapter()
        base = prep.inputs.base
        merged.config["base_model_name_or_path"] = str(base.spec) if base is not None else None
        report = self._report(prep, config, timer, module_report=module_report,
                              method_report=output.report(module_report), rank_out=output.plan.rank,
                              n_modules=len(output.plan.shapes), full_keys=list(output.plan.full_shapes), stream=False)
        return MergeResult(adapter=merged, report=report, base=base, config=config, timings=timer.timings)

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
        """Merge into the PEFT folder ``out`` (atomically): by default streamed, one module at a time; with
        ``stream=False`` built in memory first (:meth:`merge`, then :func:`save_merged_adapter`). The files are
        byte-identical either way; the report files differ in ``config.stream``, ``created`` and ``timings``.

        Streaming reads the inputs lazily (headers now, each module when it is composed) and declares the
        safetensors header from the method's plan (the common rank R, every key's shape), so memory stays at
        a few modules' tensors plus what the method itself needs (the Fisher methods hold the safety adapter
        and the base model). The output folder is claimed before any work
        (:class:`~sstmerge.io.atomic.OutputClaim`: never an input or the current directory; ``overwrite``
        replaces only an earlier sstmerge output; a concurrent writer of the same folder fails at once).

        Returns the report and, as ``adapter``, the written adapter opened lazily (tensors in the output dtype)
        when streamed, the in-memory adapter otherwise.
        """
        if isinstance(utility, (str, Path, LoraAdapter)):
            utility = [utility]
        with OutputClaim(out, overwrite=overwrite, inputs=self.input_paths(utility, safety), kind="merge") as claim:
            if not stream:
                result = self.merge(utility, safety, config=config)
                save_merged_adapter(result, claim.dest, claim=claim)
                return result
            timer = _Timer()
            prep = self._prepare(utility, safety, timer, lazy=True)
            with timer.stage("method"):
                output = prep.method.merge(prep.inputs, prep.options, self._context(prep, timer))
            plan, base = output.plan, prep.inputs.base
            with claim.write() as tmp:
                with timer.stage("write"):
                    writer = AdapterStreamWriter(
                        tmp, plan.shapes, plan.rank, plan.full_shapes, dtype=_DTYPES[prep.options.dtype],
                        base_model_name_or_path=str(base.spec) if base is not None else None,
                        all_linear_names=list(base.linear_shapes) if base is not None else None,
                    )
                with writer:
                    module_report = compose(output, StreamSink(plan, writer), desc=f"{prep.options.mode} (streaming)",
                                            timer=timer)
                report = self._report(prep, config, timer, module_report=module_report,
                                      method_report=output.report(module_report), rank_out=plan.rank,
                                      n_modules=len(plan.shapes), full_keys=list(plan.full_shapes), stream=True)
                _finish_folder(tmp, report, claim.dest)
        log.info("wrote merged adapter to %s (rank %s)", claim.dest, report["output"]["rank"])
        return MergeResult(adapter=read_adapter(claim.dest, lazy=True), report=report, base=base, config=config,
                           timings=timer.timings, path=claim.dest)

    def input_paths(self, utility, safety) -> list[Path]:
        """Every file or folder this merge reads (an output may never be or hold one of them)."""
        items = list(utility if isinstance(utility, (list, tuple)) else [utility]) + [safety]
        paths = [i.path if isinstance(i, LoraAdapter) else i for i in items if i is not None]
        if isinstance(self.base_spec, BaseModelInfo):
            paths.append(self.base_spec.path)
        elif self.base_spec is not None:
            paths.append(self.base_spec)  # an alias (smollm2) is no path and is skipped by the claim
        opts = self.options
        if method_class(opts.mode).needs_fisher:
            paths += [d for d in (opts.fisher.harmful_data, opts.fisher.benign_data)
                      if not str(d).startswith(BUNDLED_PREFIX)]
        paths += [t for t in (getattr(opts.params, "preset", None), opts.layer_weights) if t is not None]
        paths.append(self.cache_dir if self.cache_dir is not None else default_cache_dir())
        return [Path(str(p)) for p in paths if p is not None]

    # ---------------------------------------------------------------------------------------- report
    def _report(
        self,
        prep: _Prepared,
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
        opts, inp, warnings = prep.options, prep.inputs, list(prep.warnings)
        base = inp.base
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
        io = config.io if config is not None else MergeIO()
        resolved = flat_config(MergeConfig(io=io, options=opts))  # the resolved options (e.g. a capped rank)
        resolved.update({"base": _abs(base.spec) if base is not None else None,
                         "utility": [_abs(a.path) for a in inp.utility],
                         "safety": _abs(inp.safety.path) if inp.safety is not None else None,
                         "layer_weights": _abs(opts.layer_weights) if opts.layer_weights is not None else None,
                         "cache_dir": _abs(self.cache_dir) if self.cache_dir is not None else None,
                         "stream": stream})
        for key in ("harmful_data", "benign_data", "preset"):
            if key in resolved:
                resolved[key] = _abs(resolved[key])
        if prep.layer_table is not None:
            method_report = {**method_report, "layer_weights": prep.layer_table}
        return {
            "sstmerge_report_version": 2,
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
    stream: bool = True,
    **options: Any,
) -> MergeResult:
    """One call: merge ``utility`` adapters with ``safety`` on ``base``; write to ``out`` if given.

    ``options`` are flat option keys (``mode``, the method's parameters such as ``k`` or ``density``, the common
    options, the Fisher settings; ``sst-merge methods`` lists them) plus ``allow_pickle`` and ``cache_dir``.
    Without ``out`` the merged adapter is built in memory at full precision (``result.adapter``). With ``out``
    it is written module by module (:meth:`SSTMerger.merge_to`; memory bounded by a few modules) and
    ``result.adapter`` reads the written adapter lazily, in the output dtype; ``stream=False`` builds it in
    memory first (same files, ``result.adapter`` at full precision). Streaming is the default everywhere.
    """
    allow_pickle = options.pop("allow_pickle", False)
    cache_dir = options.pop("cache_dir", None)
    merger = SSTMerger(base, allow_pickle=allow_pickle, cache_dir=cache_dir, **options)
    if out is None:
        return merger.merge(utility, safety)
    return merger.merge_to(utility, safety, out, overwrite=overwrite, stream=stream)


__all__ = ["MergeResult", "SSTMerger", "merge_utility_safety", "save_merged_adapter", "summary_text"]
