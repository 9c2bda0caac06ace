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

from ..io.atomic import atomic_write_text, ensure_within
from .config import Experiment, ExperimentConfig, expand_grid, short_hash
from .progress import EVAL_SECONDS_PER_ITEM, MERGE_SECONDS, TRAIN_SECONDS_PER_TOKEN, RunProgress
from .results import headline, merge_facts, summary_scores, table_columns, task_gains, write_results

log = logging.getLogger(__name__)

def _train_adapters(cfg: ExperimentConfig, out: Path, timings: dict, tag: str,
                    progress: RunProgress) -> dict[str, Path]:
    from ..io.models import load_causal_lm
    from ..train.sft import train_from_files

    folders: dict[str, Path] = {}
    model = None
    for name, recipe in cfg.adapters.items():
        folder = ensure_within(out / "adapters" / f"{name}-{short_hash([cfg.base, recipe.model_dump(mode='json')])}",
                               out, f"adapter {name!r}")
        folders[name] = folder
        with progress.task("train", f"{name}{tag}") as task:
            if reusable_stage(folder, "train_report.json"):
                log.info("adapter %s: reusing %s", name, folder)
                task.reused = True
                continue
            if model is None:
                model = load_causal_lm(cfg.base, cfg.cache_dir)
            log.info("adapter %s: training on %s (%d steps)", name, recipe.data, recipe.train.steps)
            t0 = time.perf_counter()
            train_from_files(cfg.base, recipe.data, folder, recipe.train, max_samples=recipe.max_samples,
                             cache_dir=cfg.cache_dir, model_and_tokenizer=model, overwrite=folder.exists())
            timings[f"train:{name}{tag}"] = time.perf_counter() - t0
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
               timings: dict, tag: str, progress: RunProgress) -> dict[str, Path]:
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
        with progress.task("merge", f"{exp.name}{tag}") as task:
            if reusable_stage(folder, "merge_report.json"):
                task.reused = True
                continue
            log.info("[%d/%d] merging %s%s", i, len(experiments), exp.name, tag)
            t0 = time.perf_counter()
            SSTMerger(cfg.base, options=resolved, cache_dir=cfg.cache_dir).merge_to(
                utility, str(adapters[cfg.safety]), folder, overwrite=folder.exists())
            timings[f"merge:{exp.name}{tag}"] = time.perf_counter() - t0
    return folders

def _plan_run(cfg: ExperimentConfig, runs: dict[int, ExperimentConfig], experiments: dict[int, list[Experiment]],
              tag) -> RunProgress:
    """Every task of the run with its prior (:mod:`.progress`): the whole run's bar and ETA."""
    from ..merge.method import method_class

    progress = RunProgress()
    for s, run in runs.items():
        for name, recipe in run.adapters.items():
            t = recipe.train
            progress.plan("train", f"{name}{tag(s)}", t.steps * t.batch_size * t.max_length * TRAIN_SECONDS_PER_TOKEN)
        for exp in experiments[s]:
            method = method_class(exp.options["mode"])
            kind = "fisher" if method.needs_fisher else "dense" if method.dense else "plain"
            progress.plan("merge", f"{exp.name}{tag(s)}", MERGE_SECONDS[kind])
    per_model = _queries_per_model(cfg) * EVAL_SECONDS_PER_ITEM
    with_base, alone = cfg.reference_models()
    if with_base:
        progress.plan("eval", "base", per_model)
    for s in runs:
        names = [f"{n} alone" for n in alone] + [e.name for e in experiments[s]]
        for name in names:
            progress.plan("eval", f"{name}{tag(s)}", per_model)
    return progress


def _queries_per_model(cfg: ExperimentConfig) -> int:
    """Items one model's evaluation asks (every suite's data within its limit; jailbreak: plain + templated)."""
    from ..eval.suites import SUITES

    n = 0
    for suite in cfg.eval.suites:
        settings = cfg.eval.settings(suite)  # what the evaluation itself runs with
        items, _ = SUITES.get(suite).load_data(None, None, settings)
        first = items[0][: settings.limit]
        per = 1
        if suite == "jailbreak":
            per += len(items[1]) if settings.templates_per_prompt is None else \
                min(settings.templates_per_prompt, len(items[1]))
        n += len(first) * per
    return n


def _evaluate_model(cfg: ExperimentConfig, adapter: Path | None) -> dict[str, Any]:
    from ..eval.runner import evaluate

    ev = cfg.eval
    settings = {suite: ev.settings(suite) for suite in ev.suites}
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


def check_run_folder(out: str | Path, inputs: list[Path]) -> Path:
    """``out`` as a resolved path if an experiment may write there: new, empty, or one an earlier grid wrote (its
    marker, or results.json / adapters / merges from before the marker); never the current directory, a folder
    holding it, or one holding an input. Raises :class:`UnsafeOutputError` naming the folder; writes nothing, so
    a command can call it before its work and fail at once."""
    from ..errors import UnsafeOutputError
    from ..io.atomic import MARKER_NAME, check_location

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
    return out_path


@contextlib.contextmanager
def claim_run_folder(out: str | Path, inputs: list[Path]):
    """Claim an experiment folder for this run (:func:`check_run_folder`'s rules), created if new and marked as
    ours. Locked for the whole run: a second grid on the same folder fails at once."""
    from ..io.atomic import MARKER_NAME, lock_path
    from ..io.locking import PathLock

    out_path = check_run_folder(out, inputs)
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
    from ..provenance import versions
    from .aggregate import average_seeds, column_outcomes

    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    threads = cfg.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)  # explicit: one heavy job, on the cores it was given
    seeds = cfg.seed_list()
    runs = {s: cfg.for_seed(s) for s in seeds}  # the grid once per seed: adapters trained, merged, evaluated per seed
    tag = (lambda s: f"@seed{s}") if len(seeds) > 1 else (lambda s: "")
    experiments = {s: expand_grid(runs[s]) for s in seeds}
    log.info("torch threads: %d", threads)
    log.info("experiment grid: %d adapters, %d merges, %d variants, seeds %s", len(cfg.adapters),
             len(experiments[seeds[0]]), len(cfg.variants), seeds)
    progress = _plan_run(cfg, runs, experiments, tag)
    adapters = {s: _train_adapters(runs[s], out, timings, tag(s), progress) for s in seeds}
    merges = {s: _merge_all(runs[s], experiments[s], adapters[s], out, timings, tag(s), progress) for s in seeds}

    models: list[dict[str, Any]] = []  # one entry per model; "adapter": seed -> folder (None: the base model)
    with_base, alone = cfg.reference_models()
    if with_base:
        models.append({"name": "base", "family": "reference", "variant": None, "adapter": dict.fromkeys(seeds)})
    for name in alone:
        models.append({"name": f"{name} alone", "family": "reference", "variant": None,
                       "adapter": {s: adapters[s][name] for s in seeds}})
    for k, exp in enumerate(experiments[seeds[0]]):
        models.append({"name": exp.name, "family": exp.family, "variant": exp.variant, "options": exp.options,
                       "adapter": {s: merges[s][experiments[s][k].name] for s in seeds}})
    judge = cfg.eval.judges[0]
    columns = table_columns(cfg.eval.suites)  # a suite the run leaves out has no column
    rows, items, outcomes = [], {}, {}  # items: model -> seed -> column -> item -> outcome; outcomes: seed-averaged
    for i, m in enumerate(models, 1):
        items[m["name"]], per_seed, evaluated = {}, {}, {}
        for s in seeds:
            adapter = m["adapter"][s]
            if str(adapter) not in evaluated:  # the base model is the same for every seed: evaluated once
                name = f"{m['name']}{tag(s) if adapter else ''}"
                log.info("[%d/%d] evaluating %s", i, len(models), name)
                with progress.task("eval", name) as task:
                    t0 = time.perf_counter()
                    evaluated[str(adapter)] = _evaluate_model(runs[s], adapter)
                    timings[f"eval:{name}"] = time.perf_counter() - t0
                    task.reused = all(r.get("cache_hit") for r in evaluated[str(adapter)].values())
            suites = evaluated[str(adapter)]
            values = headline(suites, judge=judge)
            values["safety"], values["utility"] = summary_scores(values)
            items[m["name"]][s] = column_outcomes(suites, judge)
            per_seed[s] = {**values, "adapter": str(adapter) if adapter else None,
                           "merge_facts": merge_facts(adapter),
                           "eval_fingerprints": {name: r.get("fingerprint") for name, r in suites.items()},
                           "eval_cache_hit": all(r.get("cache_hit") for r in suites.values())}
        outcomes[m["name"]] = average_seeds(list(items[m["name"]].values()))
        rows.append(model_row(m, per_seed, outcomes[m["name"]], columns))
    progress.close()
    result = assemble_result(cfg, rows, outcomes, columns, config_source=config_source,
                             adapters_per_seed={s: {n: str(p) for n, p in adapters[s].items()} for s in seeds},
                             versions=versions(), timings=timings, seconds=time.perf_counter() - t_all,
                             items=items if len(seeds) > 1 else None)
    write_results(result, out, outcomes, items if len(seeds) > 1 else None)
    return result


def model_row(model: dict[str, Any], per_seed: dict[int, dict[str, Any]], outcomes: dict[str, dict],
              columns: list) -> dict[str, Any]:
    """One row of the results table: the model's identity (name, family, variant, options), each seed's record
    (``per_seed``: column values, safety/utility, adapter, merge facts, eval fingerprints) and the statistics of
    :func:`~.aggregate.column_statistics` over the seed-averaged item outcomes (column -> item -> outcome)."""
    from .aggregate import column_statistics

    seeds = list(per_seed)
    first = per_seed[seeds[0]]
    return {**{k: v for k, v in model.items() if k not in ("adapter", "per_seed", "seeds")},
            "adapter": first["adapter"], "seeds": seeds,
            **column_statistics([per_seed[s] for s in seeds], outcomes, columns),
            "merge_facts": first["merge_facts"], "eval_fingerprints": first["eval_fingerprints"],
            "eval_cache_hit": all(p["eval_cache_hit"] for p in per_seed.values()),
            "per_seed": {str(s): p for s, p in per_seed.items()} if len(seeds) > 1 else None}


def assemble_result(cfg: ExperimentConfig, rows: list[dict], outcomes: dict[str, dict], columns: list, *,
                    config_source: str, adapters_per_seed: dict[int, dict[str, str]], versions: dict,
                    timings: dict, seconds: float, items: dict[str, dict] | None = None,
                    **extra: Any) -> dict[str, Any]:
    """The results dict of a grid (written to results.json): the rows (:func:`model_row`) with their paired tests
    against ``direct`` of their variant and the Pareto fronts, computed from ``outcomes`` (model -> column -> item
    -> seed-averaged outcome; ``items``: the same per seed, for each seed's own test), the columns and the
    provenance (``extra`` adds keys)."""
    from ..provenance import now_iso

    seeds = cfg.seed_list()
    comparisons = compare_rows(rows, outcomes, columns, items)
    return {
        "created": now_iso(),
        "config": cfg.model_dump(mode="json"),
        "config_source": config_source,
        "seeds": seeds,
        "adapters": adapters_per_seed[seeds[0]],
        "adapters_per_seed": {str(s): adapters_per_seed[s] for s in seeds},
        "adapter_task_gain": task_gains(cfg, rows),
        "rows": rows,
        **comparisons,
        "columns": {c.name: c.description for c in columns},
        "column_info": {c.name: {"higher_is_better": c.higher_is_better, "role": c.role} for c in columns},
        "statistics": STATISTICS_NOTE,
        "versions": versions,
        "timings": timings,
        "seconds": seconds,
        **extra,
    }


STATISTICS_NOTE = {
    "interval": "95 % over items: Wilson for 0/1 outcomes of one seed, else percentile bootstrap (2000 resamples, "
                "seed 0) of the seed-averaged per-item outcomes; safety/utility: stratified bootstrap over their columns",
    "sd": "standard deviation across training seeds of the per-seed values (ddof = 1)",
    "paired_test": "each merge against direct of the same variant on the same items: exact McNemar for 0/1 outcomes "
                   "(one seed), else paired bootstrap of the mean difference; significant when p < 0.05 "
                   "(no correction for the number of comparisons)",
    "paired_test_per_seed": "with several seeds, the same test within each seed (its merge against its direct); "
                            "every_seed: each seed's test is significant with the sign of the seed-averaged difference",
    "pareto_front_significant": "a model leaves this front only when another is better on safety and utility "
                                "with every strict improvement significant in the paired test",
}


def compare_rows(rows: list[dict], outcomes: dict[str, dict], columns: list,
                 items: dict[str, dict] | None = None) -> dict[str, Any]:
    """Each merge against ``direct`` of its variant (``row["vs_direct"]``; with ``items`` of several seeds,
    model -> seed -> column -> item -> outcome, also each seed's own test and whether the gap holds in every
    seed), and the Pareto fronts: on the point estimates and keeping only significant dominance."""
    from .aggregate import add_per_seed_tests, compare, dominating_pairs, significant_pareto_front
    from .results import pareto_front_rows

    by_name = {r["name"]: r for r in rows}
    for r in rows:
        direct = by_name.get(f"{r['variant']}/direct") if r.get("variant") else None
        r["vs_direct"] = (compare(outcomes[r["name"]], outcomes[direct["name"]], columns)
                          if direct is not None and direct is not r else None)
        if r["vs_direct"] and items and len(items.get(r["name"], {})) > 1:
            add_per_seed_tests(r["vs_direct"], items[r["name"]], items[direct["name"]], columns)
    tests = {(j, i): compare(outcomes[rows[j]["name"]], outcomes[rows[i]["name"]], columns)
             for j, i in dominating_pairs(rows)}
    return {"pareto_front": [rows[i]["name"] for i in pareto_front_rows(rows)],
            "pareto_front_significant": [rows[i]["name"] for i in significant_pareto_front(rows, tests)]}
