"""The experiment grid: train the adapters, merge them every way, evaluate everything, tabulate and plot.

One YAML file (``configs/default.yaml``; the ``quick:`` section holds the ``--quick`` overrides) says
which adapters to train (recipes), which utility adapters form each *variant* (each variant is merged
with the safety adapter), which merge methods and option sweeps to run on which variants, and how to
evaluate. Stages, all resumable (a finished piece is found on disk and reused):

1. ``adapters/<name>-<hash>/``: each recipe trained once (folder written atomically, hash of the recipe
   in the name, so a changed recipe never reuses a stale adapter).
2. ``merges/<experiment>-<hash>/``: each merge written atomically with its merge_report.json; the Fisher
   statistics of a variant are cached by fingerprint, so all sweeps over k, r, presets and weights of a
   variant share one Fisher pass.
3. evaluation: every model (base, each adapter alone, every merge) on every suite, cached by the
   evaluation runner's fingerprints (model, adapter files, data, settings, chat template).
4. ``results.json`` (everything, with provenance), ``results.csv``, ``results.md`` and
   ``safety_vs_utility.png`` (scatter + Pareto front), each written atomically.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import itertools
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import ConfigError
from ..io.atomic import atomic_write_text, ensure_within
from ..merge.options import format_validation_error
from ..registry import did_you_mean
from ..train.sft import TrainOptions

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
#: Headline columns of results.csv / results.md: (column, description)
COLUMNS: tuple[tuple[str, str], ...] = (
    ("jailbreak_plain", "refusal rate on held-out harmful prompts (keyword judge)"),
    ("jailbreak_templated", "refusal rate on the same prompts inside jailbreak templates"),
    ("overrefusal", "refusal rate on benign, sensitive-looking prompts (lower is better)"),
    ("mcq_accuracy", "general-knowledge multiple choice, letter log-likelihood"),
    ("qa_f1", "reading comprehension token F1 on answerable fictional-document questions (A5's task)"),
    ("qa_abstention", "correct abstentions on unanswerable questions"),
    ("arithmetic_accuracy", "arithmetic word problems, final-number accuracy (A6's task)"),
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


#: names from a config become folder names under --out: simple names only (no '/', no '..', not hidden)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]{0,99}$")


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        raise ValueError(f"{what} {name!r} is not a simple name: use letters, digits and '.', '_', '+', '=', '-' "
                         "(no '/', no '..', at most 100 characters); names become folder names under --out")
    return name


class AdapterRecipe(_Strict):
    """One adapter to train: data files (concatenated) and LoRA training options."""

    data: list[str] = Field(min_length=1, description="training JSONL specs ('bundled:NAME' or paths)")
    max_samples: int | None = Field(None, ge=1, description="at most N rows per data file (seeded)")
    train: TrainOptions = Field(default_factory=TrainOptions)
    task: str | None = Field(None, description="the results column this adapter should improve (checked in the report)")


class GridEntry(_Strict):
    """A merge method run on some variants, with fixed options and an optional sweep (cartesian product)."""

    name: str
    mode: str

    @field_validator("name")
    @classmethod
    def _simple_name(cls, v: str) -> str:
        return _check_name(v, "grid entry name")
    variants: list[str] | None = Field(None, description="variant names; default: every variant")
    options: dict[str, Any] = Field(default_factory=dict, description="MergeOptions fields")
    sweep: dict[str, list[Any]] = Field(default_factory=dict, description="MergeOptions field -> values")


class EvalConfig(_Strict):
    """Suites and their settings; the first judge is the one the results table uses."""

    suites: list[str] = Field(default_factory=lambda: ["jailbreak", "overrefusal", "mcq", "qa", "arithmetic"])
    limit: dict[str, int] = Field(default_factory=dict, description="suite -> at most N items")
    max_new_tokens: dict[str, int] = Field(default_factory=dict, description="suite -> generation length")
    batch_size: int = Field(16, ge=1)
    templates_per_prompt: int | None = Field(1, ge=1, description="jailbreak templates per prompt (None: all)")
    judges: list[str] = Field(default_factory=lambda: ["keyword"], min_length=1)
    device: str = "auto"


class ExperimentConfig(_Strict):
    base: str = "smollm2"
    seed: int = Field(0, description="seed of every recipe's training and every merge, unless they set their own")
    cache_dir: str | None = None
    adapters: dict[str, AdapterRecipe]
    safety: str = Field(description="name of the safety adapter among `adapters`")
    variants: dict[str, list[str]] = Field(description="variant name -> utility adapter names (merged with `safety`)")
    merge_defaults: dict[str, Any] = Field(default_factory=dict, description="MergeOptions fields for every merge")
    grid: list[GridEntry] = Field(default_factory=list)
    references: bool = Field(True, description="also evaluate the base model and each adapter alone")
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _apply_seed(self) -> ExperimentConfig:
        for recipe in self.adapters.values():
            if "seed" not in recipe.train.model_fields_set:
                recipe.train = recipe.train.model_copy(update={"seed": self.seed})
        self.merge_defaults.setdefault("seed", self.seed)
        return self

    @model_validator(mode="after")
    def _names_exist(self) -> ExperimentConfig:
        for name in self.adapters:
            _check_name(name, "adapter name")
        for name in self.variants:
            _check_name(name, "variant name")
        names = list(self.adapters)
        if self.safety not in self.adapters:
            raise ValueError(f"safety adapter {self.safety!r} is not among adapters.{did_you_mean(self.safety, names)}")
        for v, members in self.variants.items():
            for m in members:
                if m not in self.adapters:
                    raise ValueError(f"variant {v!r}: unknown adapter {m!r}.{did_you_mean(m, names)}")
        for e in self.grid:
            for v in e.variants or []:
                if v not in self.variants:
                    raise ValueError(f"grid entry {e.name!r}: unknown variant {v!r}.{did_you_mean(v, list(self.variants))}")
        return self


def _deep_update(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_experiment_config(spec: str | Path, *, quick: bool = False, overrides: dict | None = None) -> ExperimentConfig:
    """Read a YAML experiment config (a path, or the name of a bundled one: ``default``), apply its
    ``quick:`` section when ``quick``, then ``overrides``; validate (unknown keys are errors)."""
    path = Path(spec)
    if not path.exists() and (CONFIG_DIR / f"{spec}.yaml").is_file():
        path = CONFIG_DIR / f"{spec}.yaml"
    if not path.is_file():
        bundled = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"experiment config {spec} not found; give a YAML path or one of {bundled}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping of keys to values")
    quick_section = raw.pop("quick", None) or {}
    if quick:
        if not quick_section:
            raise ConfigError(f"{path}: --quick needs a 'quick:' section of overrides in the config")
        raw = _deep_update(raw, quick_section)
    raw = _deep_update(raw, overrides or {})
    try:
        cfg = ExperimentConfig(**raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path), fields=[])) from None
    expand_grid(cfg, source=str(path))  # validates every merge's options now, not halfway through a run
    return cfg


def _short_hash(obj: Any, n: int = 8) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


class Experiment(BaseModel):
    """One merge of the grid."""

    name: str  # "<variant>/<entry>[-key=value...]"
    family: str
    variant: str
    options: dict[str, Any]  # MergeOptions fields (resolved)


def expand_grid(cfg: ExperimentConfig, source: str = "grid") -> list[Experiment]:
    """Every (entry, variant, sweep point) as an :class:`Experiment`; duplicates (same variant and
    resolved options, defaults filled in) are kept once, under the first name. Options are validated
    (:class:`ConfigError` naming the experiment)."""
    from ..merge.options import build_config

    out: list[Experiment] = []
    seen: dict[str, str] = {}
    for entry in cfg.grid:
        keys = list(entry.sweep)
        points = list(itertools.product(*(entry.sweep[k] for k in keys))) if keys else [()]
        for variant in entry.variants or list(cfg.variants):
            for point in points:
                opts = {**cfg.merge_defaults, **entry.options, **dict(zip(keys, point)), "mode": entry.mode}
                suffix = "".join(f"-{k}={v}" for k, v in zip(keys, point))
                resolved = build_config(dict(opts), source=f"{source}: {variant}/{entry.name}{suffix}").options()
                key = _short_hash([variant, resolved.model_dump(mode="json")], 16)
                if key in seen:
                    log.debug("grid: %s%s duplicates %s", entry.name, suffix, seen[key])
                    continue
                name = f"{variant}/{entry.name}{suffix}"
                seen[key] = name
                out.append(Experiment(name=name, family=entry.name, variant=variant, options=opts))
    return out


# ------------------------------------------------------------------------------------------ stages


def _train_adapters(cfg: ExperimentConfig, out: Path, timings: dict) -> dict[str, Path]:
    from ..io.models import load_causal_lm
    from ..train.sft import train_from_files

    folders: dict[str, Path] = {}
    model = None
    for name, recipe in cfg.adapters.items():
        folder = ensure_within(out / "adapters" / f"{name}-{_short_hash([cfg.base, recipe.model_dump(mode='json')])}",
                               out, f"adapter {name!r}")
        folders[name] = folder
        if _reusable(folder, "train_report.json"):
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


def _reusable(folder: Path, report_name: str) -> bool:
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
    from ..merge.merger import merge_utility_safety

    folders: dict[str, Path] = {}
    benign = {v: _benign_data_file(cfg, v, out) for v in {e.variant for e in experiments}}  # one file per variant
    for i, exp in enumerate(experiments, 1):
        opts = dict(exp.options)
        opts.setdefault("benign_data", benign[exp.variant])
        utility = [str(adapters[u]) for u in cfg.variants[exp.variant]]
        inputs = [utility, str(adapters[cfg.safety]), opts, cfg.base]
        folder = ensure_within(out / "merges" / f"{exp.name.replace('/', '__')}-{_short_hash(inputs)}", out,
                               f"merge {exp.name!r}")
        folders[exp.name] = folder
        if _reusable(folder, "merge_report.json"):
            continue
        log.info("[%d/%d] merging %s", i, len(experiments), exp.name)
        t0 = time.perf_counter()
        merge_utility_safety(cfg.base, utility, str(adapters[cfg.safety]), folder, cache_dir=cfg.cache_dir,
                             overwrite=folder.exists(), **opts)
        timings[f"merge:{exp.name}"] = time.perf_counter() - t0
    return folders


def _evaluate_model(cfg: ExperimentConfig, adapter: Path | None) -> dict[str, Any]:
    from ..eval.runner import evaluate
    from ..eval.suites import EvalSettings

    ev = cfg.eval
    settings = {suite: EvalSettings(max_new_tokens=ev.max_new_tokens.get(suite, 64), batch_size=ev.batch_size,
                                    limit=ev.limit.get(suite), judges=tuple(ev.judges),
                                    templates_per_prompt=ev.templates_per_prompt if suite == "jailbreak" else None)
                for suite in ev.suites}
    result = evaluate(cfg.base, list(ev.suites), adapter=str(adapter) if adapter else None, settings=settings,
                      cache_dir=cfg.cache_dir, device=ev.device)  # one model load for all suites
    return result["suites"]


def headline(suites: dict[str, Any], judge: str = "keyword") -> dict[str, float | None]:
    """The :data:`COLUMNS` numbers of one model's suite results."""
    row: dict[str, float | None] = {c: None for c, _ in COLUMNS}
    if "jailbreak" in suites:
        recs = suites["jailbreak"]["records"]
        plain = [r["refused"][judge] for r in recs if r["template"] == "plain"]
        wrapped = [r["refused"][judge] for r in recs if r["template"] != "plain"]
        row["jailbreak_plain"] = sum(plain) / len(plain) if plain else None
        row["jailbreak_templated"] = sum(wrapped) / len(wrapped) if wrapped else None
    if "overrefusal" in suites:
        row["overrefusal"] = suites["overrefusal"]["metrics"].get(f"overrefusal_rate[{judge}]")
    if "mcq" in suites:
        row["mcq_accuracy"] = suites["mcq"]["metrics"]["accuracy"]
    if "qa" in suites:
        row["qa_f1"] = suites["qa"]["metrics"]["f1"]
        row["qa_abstention"] = suites["qa"]["metrics"]["abstention_accuracy"]
    if "arithmetic" in suites:
        row["arithmetic_accuracy"] = suites["arithmetic"]["metrics"]["accuracy"]
    return row


def _mean(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summary_scores(row: dict[str, Any]) -> tuple[float | None, float | None]:
    """(safety, utility): safety = mean refusal on harmful prompts (plain, templated);
    utility = mean of QA F1 and arithmetic accuracy (the utility adapters' tasks)."""
    return (_mean([row.get("jailbreak_plain"), row.get("jailbreak_templated")]),
            _mean([row.get("qa_f1"), row.get("arithmetic_accuracy")]))


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated in (x, y), both to be maximised; sorted by x."""
    front = [i for i, (x, y) in enumerate(points)
             if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for x2, y2 in points)]
    return sorted(front, key=lambda i: points[i][0])


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
    from ..merge.report import now_iso, versions

    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    experiments = expand_grid(cfg)
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
    for i, m in enumerate(models, 1):
        log.info("[%d/%d] evaluating %s", i, len(models), m["name"])
        t0 = time.perf_counter()
        suites = _evaluate_model(cfg, m["adapter"])
        timings[f"eval:{m['name']}"] = time.perf_counter() - t0
        row = headline(suites, judge=cfg.eval.judges[0])
        safety, utility = summary_scores(row)
        rows.append({**{k: v for k, v in m.items() if k != "adapter"}, "adapter": str(m["adapter"]) if m["adapter"] else None,
                     **row, "safety": safety, "utility": utility, "merge_facts": merge_facts(m["adapter"]),
                     "eval_fingerprints": {s: r.get("fingerprint") for s, r in suites.items()},
                     "eval_cache_hit": all(r.get("cache_hit") for r in suites.values())})
    result = {
        "created": now_iso(),
        "config": cfg.model_dump(mode="json"),
        "config_source": config_source,
        "adapters": {n: str(p) for n, p in adapters.items()},
        "adapter_task_gain": _task_gains(cfg, rows),
        "rows": rows,
        "columns": dict(COLUMNS),
        "versions": versions(),
        "timings": timings,
        "seconds": time.perf_counter() - t_all,
    }
    write_results(result, out)
    return result


def merge_facts(folder: Path | None) -> dict[str, Any] | None:
    """Headline facts of a merge from its merge_report.json: output rank, the largest recompression error,
    and for the Fisher modes the effective k and the share of the safety adapter's norm the projection kept."""
    report_file = folder / "merge_report.json" if folder is not None else None
    if report_file is None or not report_file.is_file():
        return None
    report = json.loads(report_file.read_text())
    method = report.get("method", {})
    facts = {"rank": report["output"]["rank"], "max_recompression_rel_error": report["output"].get("max_recompression_rel_error")}
    for key in ("effective_k", "projection_norm_kept_total", "n_modules_projected", "n_modules_flagged"):
        if key in method:
            facts[key] = method[key]
    if "fisher" in method:
        facts["fisher_cache_hit"] = method["fisher"].get("cache_hit")
    return facts


def _task_gains(cfg: ExperimentConfig, rows: list[dict]) -> dict[str, Any]:
    """For each recipe with a ``task`` column: base score vs the adapter alone (the recipe must improve it)."""
    by_name = {r["name"]: r for r in rows}
    gains = {}
    for name, recipe in cfg.adapters.items():
        if recipe.task and "base" in by_name and f"{name} alone" in by_name:
            b, a = by_name["base"].get(recipe.task), by_name[f"{name} alone"].get(recipe.task)
            gains[name] = {"task": recipe.task, "base": b, "adapter": a,
                           "improved": (a is not None and b is not None and a > b)}
    return gains


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{100 * v:.1f}" if isinstance(v, float) else str(v)


def results_markdown(result: dict[str, Any]) -> str:
    cols = [c for c, _ in COLUMNS]
    lines = ["| model | " + " | ".join(cols) + " | safety | utility |",
             "|---|" + "---:|" * (len(cols) + 2)]
    front = set(pareto_front_rows(result["rows"]))
    for i, r in enumerate(result["rows"]):
        name = f"**{r['name']}**" if i in front else r["name"]
        lines.append(f"| {name} | " + " | ".join(_fmt(r.get(c)) for c in cols)
                     + f" | {_fmt(r['safety'])} | {_fmt(r['utility'])} |")
    legend = "\n".join(f"- `{c}`: {d}" for c, d in COLUMNS)
    notes = []
    for r in result["rows"]:
        f = r.get("merge_facts") or {}
        bits = []
        if f.get("projection_norm_kept_total") is not None:
            bits.append(f"projection kept {100 * f['projection_norm_kept_total']:.1f}% of the safety adapter's norm")
        if f.get("max_recompression_rel_error"):
            bits.append(f"max SVD truncation error {100 * f['max_recompression_rel_error']:.1f}%")
        for key, what in (("n_modules_projected", "modules projected"), ("n_modules_flagged", "modules flagged")):
            if f.get(key) is not None:
                bits.append(f"{f[key]} {what}")
        if bits:
            notes.append(f"- {r['name']}: " + "; ".join(bits))
    gains = "\n".join(f"- {n} on `{g['task']}`: base {_fmt(g['base'])} → adapter {_fmt(g['adapter'])}"
                      f" ({'improved' if g['improved'] else 'NOT improved'})" for n, g in result["adapter_task_gain"].items())
    return ("All numbers are percentages. **Bold**: on the safety-vs-utility Pareto front. safety = mean of the two "
            "jailbreak columns; utility = mean of qa_f1 and arithmetic_accuracy.\n\n" + "\n".join(lines)
            + "\n\n" + legend + ("\n\nAdapter recipes on their own task:\n" + gains if gains else "")
            + ("\n\nMerge facts (from each merge_report.json):\n" + "\n".join(notes) if notes else "") + "\n")


def pareto_front_rows(rows: list[dict]) -> list[int]:
    idx = [i for i, r in enumerate(rows) if r["safety"] is not None and r["utility"] is not None]
    front = pareto_front([(rows[i]["utility"], rows[i]["safety"]) for i in idx])
    return [idx[j] for j in front]


def plot_tradeoff(rows: list[dict], path: Path, title: str = "") -> None:
    """Safety (y) vs utility (x) scatter, one colour per method family, Pareto front as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6.5))
    families = sorted({r["family"] for r in rows})
    variants = sorted({r["variant"] for r in rows if r["variant"]})
    markers = dict(zip(variants, "os^vPXD*"))
    cmap = plt.get_cmap("tab20")
    for j, fam in enumerate(families):
        pts = [r for r in rows if r["family"] == fam and r["safety"] is not None and r["utility"] is not None]
        for r in pts:
            ax.scatter(100 * r["utility"], 100 * r["safety"], color=cmap(j % 20), s=45, edgecolor="black",
                       linewidth=0.4, marker=markers.get(r["variant"], "D"))
            if fam == "reference":
                ax.annotate(r["name"].replace(" alone", ""), (100 * r["utility"], 100 * r["safety"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        ax.scatter([], [], color=cmap(j % 20), edgecolor="black", linewidth=0.4, label=fam)  # legend entry
    for v, mk in markers.items():
        ax.scatter([], [], color="white", edgecolor="black", marker=mk, label=f"variant {v}")
    front = pareto_front_rows(rows)
    if front:
        ax.plot([100 * rows[i]["utility"] for i in front], [100 * rows[i]["safety"] for i in front], "k--", lw=1,
                label="Pareto front")
    ax.set_xlabel("utility: mean of QA F1 and arithmetic accuracy (%)")
    ax.set_ylabel("safety: refusal of harmful prompts, plain + jailbreak (%)")
    ax.set_title(title or "safety vs utility")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    tmp.replace(path)


def write_results(result: dict[str, Any], out: Path) -> None:
    """results.json, results.csv, results.md, safety_vs_utility.png (each atomically)."""
    atomic_write_text(out / "results.json", json.dumps(result, indent=2, default=str) + "\n")
    cols = ["name", "family", "variant"] + [c for c, _ in COLUMNS] + ["safety", "utility", "adapter"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    writer.writeheader()
    for r in result["rows"]:
        writer.writerow({c: r.get(c) for c in cols})
    atomic_write_text(out / "results.csv", buf.getvalue())
    atomic_write_text(out / "results.md", results_markdown(result))
    plot_tradeoff(result["rows"], out / "safety_vs_utility.png", title=f"{result['config']['base']}: safety vs utility")


def summary_table(result: dict[str, Any]) -> str:
    """A compact plain-text table for the terminal."""
    lines = [f"{'model':44s} {'jb plain':>8s} {'jb tmpl':>8s} {'overref':>8s} {'mcq':>6s} {'qa f1':>6s} {'arith':>6s}"]
    for r in result["rows"]:
        lines.append(f"{r['name'][:44]:44s} " + " ".join(
            f"{_fmt(r.get(c)):>{w}s}" for c, w in (("jailbreak_plain", 8), ("jailbreak_templated", 8),
                                                    ("overrefusal", 8), ("mcq_accuracy", 6), ("qa_f1", 6),
                                                    ("arithmetic_accuracy", 6))))
    return "\n".join(lines)
