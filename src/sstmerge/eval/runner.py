"""Run evaluation suites on a base model (+ optional adapter) with caching and provenance.

Results are cached per suite under ``<cache>/eval/<fingerprint>.json``; the fingerprint covers the model
weights (SHA-256 of the files), the adapter files, the data (file hash, or generator parameters), the
generation settings, the judges, the suite's prompt format and the chat template -- never a name alone.
Each entry is written atomically with a checksum and verified when read: a truncated, emptied or edited
entry is reported, discarded and recomputed (never reported as is). One process computes a given entry at
a time (a lock per key); a concurrent run of the same evaluation waits, then reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ..errors import CacheCorruptError, ConfigError
from ..io.atomic import remove_stale_temps
from ..io.hashing import model_files, sha256_files
from ..io.integrity import read_checked_json, write_checked_json
from ..io.locking import PathLock
from ..io.models import default_cache_dir, load_base_info, load_causal_lm, resolve_base, resolve_device
from ..provenance import now_iso, versions
from .suites import SUITES, EvalSettings, SuiteContext

log = logging.getLogger(__name__)

EVAL_FORMAT = 3  # 2: model-based judges run with the adapter disabled; 3: checksummed cache entries
EVAL_RESULT_VERSION = 1  # the "sstmerge_eval_version" of a results file (eval --out)


class _OnBaseModel:
    """Run a judge with the evaluated adapter out of the way (``base_only()``: PEFT's ``disable_adapter`` or a
    folded adapter's ``unfolded``), so that a model-based judge (log-prob) is the same fixed classifier
    whatever adapter is being evaluated."""

    def __init__(self, inner, base_only) -> None:
        self.inner, self.base_only, self.name = inner, base_only, inner.name

    def judge(self, prompts: list[str], answers: list[str]) -> list[bool]:
        with self.base_only():
            return list(self.inner.judge(prompts, answers))


def _generation_config_holder(base_path: Path):
    """An object with the base model's ``generation_config`` (for its end-of-turn ids) without loading weights."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    try:
        return SimpleNamespace(generation_config=GenerationConfig.from_pretrained(str(base_path)))
    except OSError:  # no generation_config.json: the tokenizer's eos only
        return SimpleNamespace(generation_config=None)


def evaluate(
    base: str,
    suites: list[str],
    *,
    adapter: str | None = None,
    data: dict[str, str] | None = None,
    templates: str | None = None,
    settings: EvalSettings | dict[str, EvalSettings] | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    device: str = "auto",
    fold: bool = True,
) -> dict[str, Any]:
    """Evaluate ``base`` (+ ``adapter``) on ``suites``; returns the full result (metrics + records + provenance).

    ``fold``: the adapter's ΔW is added into the base weights (:mod:`.fold`; the base model is loaded once per
    process and restored exactly afterwards), so decoding runs the plain model; ``fold=False`` runs it
    through PEFT's LoRA layers (the reference path; same outputs up to float rounding).
    """
    with ExitStack() as scope:  # a folded adapter leaves the shared base model exactly as it came, whatever happens
        return _evaluate(base, suites, adapter=adapter, data=data, templates=templates, settings=settings,
                         cache_dir=cache_dir, use_cache=use_cache, device=device, fold=fold, scope=scope)


def _evaluate(base, suites, *, adapter, data, templates, settings, cache_dir, use_cache, device, fold,
              scope: ExitStack) -> dict[str, Any]:
    per_suite = settings if isinstance(settings, dict) else {s: settings or EvalSettings() for s in suites}
    missing = [s for s in suites if s not in per_suite]
    if missing:
        raise ConfigError(f"no EvalSettings given for suite(s) {missing}")
    data = data or {}
    if not suites:
        raise ConfigError("no suite given: pass --suite jailbreak|rephrased|overrefusal|mcq|qa|arithmetic (several allowed)")
    for s in suites:
        SUITES.get(s)
    unknown = set(data) - set(suites)
    if unknown:
        raise ConfigError(f"--data given for suite(s) {sorted(unknown)} that are not being run ({suites})")
    from .judges import JUDGES

    backends = {per_suite[s].backend for s in suites}
    for s in suites:
        for j in per_suite[s].judges:
            JUDGES.get(j)
    if backends - {"hf", "vllm"} or len(backends) > 1:
        raise ConfigError(f"backend {sorted(backends)}: use one of 'hf' (transformers) or 'vllm' for all suites")
    backend = backends.pop()
    if backend == "vllm":
        from .vllm_backend import require_vllm

        require_vllm()
    loaded = {s: SUITES.get(s).load_data(data.get(s), templates, per_suite[s]) for s in suites}  # validate all data first

    base_path = resolve_base(base, cache_dir)
    device = resolve_device(device)
    if any(per_suite[s].batch_size is None for s in suites):  # the device's default batch, resolved before keying
        from dataclasses import replace

        from transformers import AutoConfig

        from .generate import default_batch_size

        rows = default_batch_size(device, AutoConfig.from_pretrained(str(base_path)) if device != "cpu" else None)
        per_suite = {s: replace(v, batch_size=rows) if v.batch_size is None else v for s, v in per_suite.items()}
    model_digest = sha256_files(model_files(base_path))
    adapter_digest, adapter_obj = None, None
    if adapter is not None:
        from ..io.adapter import read_adapter
        from ..io.validate import validate_against_base

        adapter_obj = read_adapter(adapter)  # also validates the adapter's files and values
        validate_against_base(adapter_obj, load_base_info(base_path))  # every module exists with its shape
        adapter_digest = sha256_files(adapter_obj.files)
    root = (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / "eval"

    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(base_path))
    except Exception as exc:
        raise ConfigError(f"{base_path}: evaluation needs the model's tokenizer, which could not be loaded: {exc}") from exc
    chat_template = getattr(tokenizer, "chat_template", None)
    model = folded = None
    generator = None
    results: dict[str, Any] = {}
    t_all = time.perf_counter()
    for suite in suites:
        items, digest = loaded[suite]
        settings = per_suite[suite]
        key_parts = {"format": EVAL_FORMAT, "suite": suite, "model": model_digest, "adapter": adapter_digest,
                     "data": digest, "settings": settings.as_dict(),
                     "prompt_format": hashlib.sha256(SUITES.get(suite).prompt_format.encode()).hexdigest(),
                     "chat_template": hashlib.sha256((chat_template or "").encode()).hexdigest()}
        key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()
        cache_file = root / f"{key[:32]}.json"
        with PathLock(root / f".{cache_file.name}.sstmerge-lock", what=f"evaluation cache entry {cache_file}",
                      timeout=None):
            remove_stale_temps(root, cache_file.name)
            cached = _read_cache(cache_file) if use_cache else None
            if cached is not None:
                log.info("suite %s: cached result %s", suite, cache_file)
                results[suite] = cached | {"cache_hit": True}
                continue
            needs_hf = backend == "hf" or suite == "mcq" or any(j != "keyword" for j in settings.judges)
            if model is None and needs_hf:  # with vLLM, the HF model is loaded only for log-likelihoods / model judges
                if fold:
                    from .fold import FoldedAdapter, base_model

                    model, _ = base_model(base_path, device=device)  # loaded once per process
                    if adapter_obj is not None:
                        folded = scope.enter_context(FoldedAdapter(model, adapter_obj))
                else:
                    model, _ = load_causal_lm(str(base_path), device=device)
                    if adapter is not None:
                        from peft import PeftModel

                        model = PeftModel.from_pretrained(model, str(adapter)).eval()
            judges = {}
            for j in settings.judges:
                judges[j] = JUDGES.get(j)(model, tokenizer)
                if adapter is not None and hasattr(judges[j], "model"):  # model-based judges see the base model,
                    judges[j] = _OnBaseModel(judges[j], folded.unfolded if folded is not None  # the same judge
                                             else model.disable_adapter)                 # for every adapter
            if backend == "vllm" and generator is None:
                from .generate import end_of_turn_ids
                from .vllm_backend import VLLMGenerator

                generator = VLLMGenerator(base_path, tokenizer, adapter_obj,
                                          eos_ids=end_of_turn_ids(_generation_config_holder(base_path), tokenizer))
            ctx = SuiteContext(model=model, tokenizer=tokenizer, settings=settings, judges=judges, generator=generator)
            t0 = time.perf_counter()
            log.info("running suite %s", suite)
            out = SUITES.get(suite).run(ctx, *items)
            out.update({"data": digest, "seconds": time.perf_counter() - t0, "fingerprint": key})
            write_checked_json(cache_file, out)
            results[suite] = json.loads(json.dumps(out, default=str)) | {"cache_hit": False}
    for suite, result in results.items():  # every rate with its 95 % interval over items
        result["intervals"] = column_intervals(suite, result, per_suite[suite].judges)
        result["rate_intervals"] = rate_intervals(suite, result)
    return {
        "sstmerge_eval_version": EVAL_RESULT_VERSION,
        "created": now_iso(),
        "provenance": {"base": base, "base_path": str(base_path), "base_sha256": model_digest, "adapter": adapter,
                       "adapter_sha256": adapter_digest,
                       "settings": {s: per_suite[s].as_dict() for s in suites}, "versions": versions(),
                       "device": device, "adapter_applied": "folded into the base weights" if fold else "PEFT LoRA layers",
                       "judge_model": "the base model with the adapter disabled (model-based judges)"},
        "suites": results,
        "seconds": time.perf_counter() - t_all,
    }


def _read_cache(path: Path) -> dict[str, Any] | None:
    """A verified cache entry, or None when there is none; a damaged one is reported and removed."""
    if not path.is_file():
        return None
    try:
        entry = read_checked_json(path)
        if not isinstance(entry, dict) or not isinstance(entry.get("metrics"), dict):
            raise CacheCorruptError(f"{path}: not an evaluation result")
        return entry
    except CacheCorruptError as exc:
        log.warning("discarding a damaged evaluation cache entry (%s); recomputing it", exc)
        path.unlink(missing_ok=True)
        return None


def column_intervals(suite: str, result: dict[str, Any], judges) -> dict[str, dict[str, dict]]:
    """``{column: {judge: interval}}``: each headline column's value with its 95 % interval over items (Wilson for
    0/1 outcomes, else the bootstrap; :mod:`.stats`), per judge for the refusal columns."""
    from .stats import item_interval

    out: dict[str, dict[str, dict]] = {}
    for column in SUITES.get(suite).columns:
        for judge in judges:
            items = column.item_outcomes(result, judge)
            if items:
                out.setdefault(column.name, {})[judge] = item_interval([v for _, v in items]).as_dict()
    return out


def rate_intervals(suite: str, result: dict[str, Any]) -> dict[str, dict]:
    """``{rate: interval}`` for every rate the suite reports (:attr:`Suite.rates`), overall and per group."""
    from .stats import item_interval

    rates = SUITES.get(suite).rates
    return {name: item_interval(v).as_dict() for name, v in (rates(result) if rates else {}).items() if v}


def _with_interval(ci: dict[str, Any]) -> str:
    return f"{ci['value']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}] n={ci['n']}"


def summary_rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(suite, metric, value) rows: the headline columns, then every rate of the suite (overall and per group), each
    with its 95 % interval over items; then the suite's counts and the judges' disagreement."""
    rows = []
    for suite, r in result["suites"].items():
        for column, per_judge in (r.get("intervals") or {}).items():
            for judge, ci in per_judge.items():
                rows.append((suite, column + (f" [{judge}]" if len(per_judge) > 1 else ""), _with_interval(ci)))
        for name, ci in (r.get("rate_intervals") or {}).items():
            rows.append((suite, name, _with_interval(ci)))
        for k in ("n", "n_unanswerable", "shots", "chance"):
            v = r["metrics"].get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                rows.append((suite, k, f"{v:.3f}" if isinstance(v, float) else str(v)))
        for k, v in r["metrics"].items():
            if k.startswith("agreement[") and isinstance(v, dict) and v.get("disagreement_rate") is not None:
                rows.append((suite, "disagreement" + k[len("agreement"):], f"{v['disagreement_rate']:.3f}"))
    return rows
