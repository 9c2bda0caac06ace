"""Experiment stages, all resumable (a finished piece is found on disk, verified and reused):

1. ``adapters/<name>-<hash>/``: each recipe trained once (hash of the recipe in the name);
2. ``merges/<experiment>-<hash>/``: each merge (hash of the inputs, the resolved options and the sstmerge
   version); the Fisher statistics of a variant are cached by fingerprint, so all sweeps of a variant share one
   Fisher pass;
3. evaluation of every model (base, each adapter alone, every merge) on every suite, cached by the evaluation
   runner's fingerprints;
4. results (:mod:`.results`), each file written atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .._logging import quiet
from ..io.atomic import atomic_write_text, ensure_within
from .config import Experiment, ExperimentConfig, expand_grid, short_hash
from .results import headline, merge_facts, summary_scores, table_columns, task_gains, write_results

log = logging.getLogger(__name__)

def _train_adapters(cfg: ExperimentConfig, out: Path, timings: dict) -> dict[str, Path]:
    from ..io.models import load_causal_lm
    from ..train.sft import train_from_files

    folders: dict[str, Path] = {}
    model = None
    for name, recipe in cfg.adapters.items():
        folder = ensure_within(out / "adapters" / f"{name}-{short_hash([cfg.base, recipe.model_dump(mode='json')])}",
                               out, f"adapter {name!r}")
        folders[name] = folder
        if reusable_stage(folder, "train_report.json"):
            log.info("adapter %s: reusing %s", name, folder)
            continue
        if model is None:
            model = load_causal_lm(cfg.base, cfg.cache_dir)
        log.info("adapter %s: training on %s (%d steps)", name, recipe.data, recipe.train.steps)
        t0 = time.perf_counter()
        train_from_files(cfg.base, recipe.data, folder, recipe.train, max_samples=recipe.max_samples,
                         cache_dir=cfg.cache_dir, model_and_tokenizer=model, overwrite=folder.exists())
        timings[f"train:{name}"] = time.perf_counter() - t0
    return folders

def _benign_data_file(cfg: ExperimentConfig, variant: str, out: Path) -> str:
    """F_benign's data for a variant: the training data of its utility adapters, concatenated (one file)."""
    from ..data.jsonl import resolve_data

    parts = [resolve_data(spec) for u in cfg.variants[variant] for spec in cfg.adapters[u].data]
    text = "".join(p.read_text(encoding="utf-8").rstrip("\n") + "\n" for p in parts)
    path = ensure_within(out / "data" / f"benign-{variant}-{hashlib.sha256(text.encode()).hexdigest()[:8]}.jsonl",
                         out, f"variant {variant!r}")
    if not path.is_file() or path.read_text(encoding="utf-8") != text:  # missing or damaged: (re)write
        atomic_write_text(path, text)
    return str(path)

def reusable_stage(folder: Path, report_name: str) -> bool:
    """A finished stage folder to reuse: its report is there and the adapter files match the SHA-256 the report
    recorded (merges) / the adapter reads back (trained adapters). A damaged one is reported and redone."""
    from ..io.adapter import read_adapter
    from ..io.hashing import sha256_file

    report_file = folder / report_name
    if not report_file.is_file():
        return False
    try:
        report = json.loads(report_file.read_text())
        recorded = (report.get("output") or {}).get("sha256") or {}
        for name, digest in recorded.items():
            if sha256_file(folder / name) != digest:
                raise ValueError(f"{name} differs from the SHA-256 in {report_name}")
        read_adapter(folder, lazy=True)  # config + header checks
        return True
    except Exception as exc:  # any damage: redo this stage (the folder is sstmerge's own, so it may be replaced)
        log.warning("%s is damaged (%s): computing it again", folder, exc)
        return False

def _merge_all(cfg: ExperimentConfig, experiments: list[Experiment], adapters: dict[str, Path], out: Path,
               timings: dict) -> dict[str, Path]:
    """Each merge into ``merges/<name>-<hash>``; the hash covers the inputs, the *resolved* options (defaults
    filled in) and the sstmerge version, so a changed default or release never reuses a stale merge."""
    from .. import __version__
    from ..merge.config import resolve_options
    from ..merge.method import method_class
    from ..merge.merger import SSTMerger

    folders: dict[str, Path] = {}
    fisher_variants = {e.variant for e in experiments if method_class(e.options["mode"]).needs_fisher}
    benign = {v: _benign_data_file(cfg, v, out) for v in fisher_variants}  # one file per variant
    for i, exp in enumerate(experiments, 1):
        opts = dict(exp.options)
        if method_class(opts["mode"]).needs_fisher:
            opts.setdefault("benign_data", benign[exp.variant])
        resolved = resolve_options(opts, source=f"grid: {exp.name}")
        utility = [str(adapters[u]) for u in cfg.variants[exp.variant]]
        inputs = [utility, str(adapters[cfg.safety]), cfg.base, resolved.model_dump(mode="json"), __version__]
        folder = ensure_within(out / "merges" / f"{exp.name.replace('/', '__')}-{short_hash(inputs)}", out,
                               f"merge {exp.name!r}")
        folders[exp.name] = folder
        if reusable_stage(folder, "merge_report.json"):
            continue
        log.info("[%d/%d] merging %s", i, len(experiments), exp.name)
        t0 = time.perf_counter()
        SSTMerger(cfg.base, options=resolved, cache_dir=cfg.cache_dir).merge_to(
            utility, str(adapters[cfg.safety]), folder, overwrite=folder.exists())
        timings[f"merge:{exp.name}"] = time.perf_counter() - t0
    return folders

def _evaluate_model(cfg: ExperimentConfig, adapter: Path | None) -> dict[str, Any]:
    from ..eval.runner import evaluate
    from ..eval.suites import REFUSAL_SUITES, EvalSettings

    ev = cfg.eval
    settings = {suite: EvalSettings(max_new_tokens=ev.max_new_tokens.get(suite, 64), batch_size=ev.batch_size,
                                    limit=ev.limit.get(suite), judges=tuple(ev.judges),
                                    templates_per_prompt=ev.templates_per_prompt if suite == "jailbreak" else None,
                                    stop_when_decided=ev.stop_when_decided and suite in REFUSAL_SUITES,
                                    decision_tokens=ev.decision_tokens.get(suite) if suite in REFUSAL_SUITES else None)
                for suite in ev.suites}
    result = evaluate(cfg.base, list(ev.suites), adapter=str(adapter) if adapter else None, settings=settings,
                      cache_dir=cfg.cache_dir, device=ev.device)  # one model load for all suites
    return result["suites"]

def run_experiments(cfg: ExperimentConfig, out: str | Path, *, config_source: str = "") -> dict[str, Any]:
    """Run (or resume) the whole grid into ``out``; returns the results dict also written to results.json."""
    with claim_run_folder(out, _config_inputs(cfg)) as out:
        return _run_experiments(cfg, out, config_source)

def _config_inputs(cfg: ExperimentConfig) -> list[Path]:
    """Files and folders the grid reads (its --out may never be or hold one). The cache is not among them: a
    grid only adds to its folder, so keeping the cache inside it (``--cache-dir OUT/cache``) is fine."""
    from ..data.jsonl import BUNDLED_PREFIX, resolve_data

    paths = [Path(cfg.base)]
    for recipe in cfg.adapters.values():
        paths += [resolve_data(d) for d in recipe.data if not d.startswith(BUNDLED_PREFIX)]
    return paths

RUN_MARKER = {"kind": "experiments"}

@contextlib.contextmanager
def claim_run_folder(out: str | Path, inputs: list[Path]):
    """Claim an experiment folder for this run: new, empty, or one an earlier grid wrote (its marker, or
    results.json / adapters / merges from before the marker); never the current directory, a folder holding
    it, or one holding an input. Locked for the whole run: a second grid on the same folder fails at once."""
    from ..errors import UnsafeOutputError
    from ..io.atomic import MARKER_NAME, check_location, lock_path
    from ..io.locking import PathLock

    out_path = check_location(out, inputs=inputs)
    if out_path.exists():
        entries = [p.name for p in out_path.iterdir()] if out_path.is_dir() else None
        if entries is None:
            raise UnsafeOutputError(f"--out {out}: {out_path} is a file, not an experiment folder")
        marker = out_path / MARKER_NAME
        ours = (marker.is_file() and _read_json(marker).get("kind") == RUN_MARKER["kind"]) or \
            any(n in entries for n in ("results.json", "adapters", "merges"))
        if entries and not ours:
            raise UnsafeOutputError(
                f"--out {out}: {out_path} exists and is not an experiment folder written by sstmerge (no {MARKER_NAME}); "
                "choose a new or empty folder")
    out_path.mkdir(parents=True, exist_ok=True)
    with PathLock(lock_path(out_path), what=f"experiment folder {out_path}", timeout=0):
        if not (out_path / MARKER_NAME).is_file():
            atomic_write_text(out_path / MARKER_NAME, json.dumps(RUN_MARKER) + "\n")
        yield out_path

def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}

def _run_experiments(cfg: ExperimentConfig, out: Path, config_source: str) -> dict[str, Any]:
    from ..provenance import now_iso, versions

    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    threads = cfg.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)  # explicit: one heavy job, on the cores it was given
    experiments = expand_grid(cfg)
    log.info("torch threads: %d", threads)
    log.info("experiment grid: %d adapters, %d merges, %d variants", len(cfg.adapters), len(experiments), len(cfg.variants))
    adapters = _train_adapters(cfg, out, timings)
    merges = _merge_all(cfg, experiments, adapters, out, timings)

    models: list[dict[str, Any]] = []
    if cfg.references:
        models.append({"name": "base", "family": "reference", "variant": None, "adapter": None})
        for name, folder in adapters.items():
            models.append({"name": f"{name} alone", "family": "reference", "variant": None, "adapter": folder})
    for exp in experiments:
        models.append({"name": exp.name, "family": exp.family, "variant": exp.variant, "adapter": merges[exp.name],
                       "options": exp.options})
    rows = []
    bar = tqdm(total=len(models), desc="evaluating models", unit="model", disable=quiet())  # ETA of the whole stage
    for i, m in enumerate(models, 1):
        log.info("[%d/%d] evaluating %s", i, len(models), m["name"])
        bar.set_postfix_str(m["name"], refresh=True)
        t0 = time.perf_counter()
        suites = _evaluate_model(cfg, m["adapter"])
        timings[f"eval:{m['name']}"] = time.perf_counter() - t0
        row = headline(suites, judge=cfg.eval.judges[0])
        safety, utility = summary_scores(row)
        rows.append({**{k: v for k, v in m.items() if k != "adapter"}, "adapter": str(m["adapter"]) if m["adapter"] else None,
                     **row, "safety": safety, "utility": utility, "merge_facts": merge_facts(m["adapter"]),
                     "eval_fingerprints": {s: r.get("fingerprint") for s, r in suites.items()},
                     "eval_cache_hit": all(r.get("cache_hit") for r in suites.values())})
        bar.update(1)
    bar.close()
    result = {
        "created": now_iso(),
        "config": cfg.model_dump(mode="json"),
        "config_source": config_source,
        "adapters": {n: str(p) for n, p in adapters.items()},
        "adapter_task_gain": task_gains(cfg, rows),
        "rows": rows,
        "columns": {c.name: c.description for c in table_columns()},
        "column_info": {c.name: {"higher_is_better": c.higher_is_better, "role": c.role} for c in table_columns()},
        "versions": versions(),
        "timings": timings,
        "seconds": time.perf_counter() - t_all,
    }
    write_results(result, out)
    return result
