"""Experiment configs: the YAML model (recipes, variants, grid, evaluation), name rules, grid expansion.

One YAML file (``configs/default.yaml``; the ``quick:`` section holds the ``--quick`` overrides) says which
adapters to train (recipes), which utility adapters form each *variant* (each variant is merged with the
safety adapter), which merge methods and option sweeps to run on which variants, and how to evaluate.
Every merge's options are resolved when the config is loaded, so a bad option fails before any work.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from ..errors import ConfigError
from ..merge.config import format_validation_error
from ..registry import did_you_mean
from ..train.sft import TrainOptions

if TYPE_CHECKING:
    from ..eval.suites import EvalSettings

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]{0,99}$")

def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        raise ValueError(f"{what} {name!r} is not a simple name: use letters, digits and '.', '_', '+', '=', '-' "
                         "(no '/', no '..', at most 100 characters); names become folder names under --out")
    return name

class AdapterRecipe(_Strict):
    """One adapter to train: data files (concatenated) and LoRA training options."""

    data: list[str] = Field(min_length=1, description="training JSONL specs ('bundled:NAME' or paths); a file "
                            "listed N times is used N times (N x its weight in the mix)")
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
    options: dict[str, Any] = Field(default_factory=dict, description="flat option keys of this entry's method (strict)")
    sweep: dict[str, list[Any]] = Field(default_factory=dict, description="flat option key -> values")

class EvalConfig(_Strict):
    """Suites and their settings; the first judge is the one the results table uses."""

    suites: list[str] = Field(default_factory=lambda: ["jailbreak", "rephrased", "overrefusal", "mcq", "qa", "arithmetic"])
    limit: dict[str, int] = Field(default_factory=dict, description="suite -> at most N items")
    max_new_tokens: dict[str, int] = Field(default_factory=dict, description="suite -> generation length")
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="rows per generation batch; auto: the device's default (64 on a CPU, from free memory on a GPU)")
    engine: Literal["cached", "transformers"] = Field(
        "cached", description="HF generation: cached (common prompt prefix once, finished rows dropped) or transformers "
        "(model.generate, the reference)")
    templates_per_prompt: int | None = Field(1, ge=1, description="jailbreak templates per prompt (None: all)")
    judges: list[str] = Field(default_factory=lambda: ["keyword"], min_length=1)
    device: str = "auto"
    stop_when_decided: bool = Field(True, description="jailbreak/overrefusal: stop an answer once the keyword judge's "
                                    "verdict cannot change (exact)")
    decision_tokens: dict[str, int] = Field(default_factory=dict, description="suite -> stop a refusal-suite answer "
                                            "after N new tokens at most (approximate: refusals come first)")

    def settings(self, suite: str) -> EvalSettings:
        """The :class:`~sstmerge.eval.suites.EvalSettings` this config gives ``suite`` (what the grid evaluates with;
        ``batch_size: auto`` becomes None, the device's default)."""
        from ..eval.suites import REFUSAL_SUITES, EvalSettings

        refusal = suite in REFUSAL_SUITES
        return EvalSettings(max_new_tokens=self.max_new_tokens.get(suite, 64),
                            batch_size=None if self.batch_size == "auto" else self.batch_size, engine=self.engine,
                            limit=self.limit.get(suite), judges=tuple(self.judges),
                            templates_per_prompt=self.templates_per_prompt if suite == "jailbreak" else None,
                            stop_when_decided=self.stop_when_decided and refusal,
                            decision_tokens=self.decision_tokens.get(suite) if refusal else None)


class ExperimentConfig(_Strict):
    base: str = "smollm2"
    seed: int = Field(0, description="seed of every recipe's training and every merge, unless they set their own")
    seeds: list[int] | None = Field(None, min_length=1, description="run the whole grid once per seed (adapters "
                                    "trained, merged and evaluated per seed; results show mean ± sd across seeds); "
                                    "replaces `seed`")
    cache_dir: str | None = None
    adapters: dict[str, AdapterRecipe]
    safety: str = Field(description="name of the safety adapter among `adapters`")
    variants: dict[str, list[str]] = Field(description="variant name -> utility adapter names (merged with `safety`)")
    merge_defaults: dict[str, Any] = Field(default_factory=dict, description="flat option keys for every merge (each method takes those it has)")
    grid: list[GridEntry] = Field(default_factory=list)
    references: bool | list[str] = Field(True, description="also evaluate the base model and each adapter alone "
                                         "(true), none of them (false), or those named (`base` and adapter names)")
    threads: int | None = Field(None, ge=1, description="torch threads for the whole run (default: the CPUs this "
                                "process may use); one heavy job at a time")
    eval: EvalConfig = Field(default_factory=EvalConfig)

    _pinned_seeds: dict[str, Any] = PrivateAttr(default_factory=dict)  # seeds the YAML set itself (kept per seed)

    @model_validator(mode="after")
    def _apply_seed(self) -> ExperimentConfig:
        if self.seeds is not None:
            if "seed" in self.model_fields_set:
                raise ValueError("give either `seed` (one run) or `seeds` (one run per seed), not both")
            if len(set(self.seeds)) != len(self.seeds):
                raise ValueError(f"seeds {self.seeds}: each seed once")
            self.seed = self.seeds[0]
        self._pinned_seeds = {"adapters": {n for n, r in self.adapters.items() if "seed" in r.train.model_fields_set},
                              "merge": "seed" in self.merge_defaults}
        return self._with_seed(self.seed)

    def _with_seed(self, seed: int) -> ExperimentConfig:
        for name, recipe in self.adapters.items():
            if name not in self._pinned_seeds["adapters"]:
                recipe.train = recipe.train.model_copy(update={"seed": seed})
        if not self._pinned_seeds["merge"]:
            self.merge_defaults["seed"] = seed
        return self

    def seed_list(self) -> list[int]:
        """The seeds the grid runs with (``seeds``, or the one ``seed``)."""
        return list(self.seeds) if self.seeds is not None else [self.seed]

    def for_seed(self, seed: int) -> ExperimentConfig:
        """This config with one seed: every recipe's training and every merge use ``seed`` (except seeds the YAML
        pinned on a recipe or in ``merge_defaults``)."""
        cfg = self.model_copy(deep=True)
        cfg._pinned_seeds = self._pinned_seeds
        cfg.seed = seed
        return cfg._with_seed(seed)

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
        from .results import table_columns

        columns = [c.name for c in table_columns()]  # every suite's: a task's suite may be left out of eval.suites
        for name, recipe in self.adapters.items():
            if recipe.task is not None and recipe.task not in columns:
                raise ValueError(f"adapter {name!r}: task {recipe.task!r} is not a results column."
                                 f"{did_you_mean(recipe.task, columns)} Columns: {', '.join(columns)}")
        if isinstance(self.references, list):
            for r in self.references:
                if r != "base" and r not in self.adapters:
                    raise ValueError(f"references: unknown model {r!r} (base or an adapter name)."
                                     f"{did_you_mean(r, ['base', *names])}")
        return self

    def reference_models(self) -> tuple[bool, list[str]]:
        """``(evaluate the base model, adapters to evaluate alone)`` from ``references``."""
        if isinstance(self.references, bool):
            return self.references, list(self.adapters) if self.references else []
        return "base" in self.references, [a for a in self.adapters if a in self.references]

def _deep_update(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out

def _with_layer(raw: dict, over: dict) -> dict:
    """``over`` applied on ``raw``; a layer that sets ``seed`` or ``seeds`` replaces the other one below it."""
    for key, other in (("seed", "seeds"), ("seeds", "seed")):
        if key in over and other not in over:
            raw = {k: v for k, v in raw.items() if k != other}
    return _deep_update(raw, over)


def _config_path(spec: str | Path) -> Path:
    path = Path(spec)
    if not path.exists() and (CONFIG_DIR / f"{spec}.yaml").is_file():
        path = CONFIG_DIR / f"{spec}.yaml"
    if not path.is_file():
        bundled = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"experiment config {spec} not found; give a YAML path or one of {bundled}")
    return path


def _read_raw(spec: str | Path, chain: tuple[Path, ...] = ()) -> tuple[Path, dict]:
    """The YAML mapping of a config, with ``extends: NAME`` resolved: the named config (a bundled name, or a path
    relative to this file) underneath, this file's keys on top (mappings merged, lists and values replaced)."""
    path = _config_path(spec).resolve()
    if path in chain:
        raise ConfigError(f"{path}: `extends` loops back to it ({' -> '.join(str(p) for p in chain + (path,))})")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping of keys to values")
    parent = raw.pop("extends", None)
    if parent is not None:
        if not isinstance(parent, str):
            raise ConfigError(f"{path}: `extends` names one config (e.g. 'extends: default'), got {parent!r}")
        local = path.parent / parent
        _, base = _read_raw(local if local.is_file() else parent, chain + (path,))
        raw = _with_layer(base, raw)
    return path, raw


def load_experiment_config(spec: str | Path, *, quick: bool = False, overrides: dict | None = None) -> ExperimentConfig:
    """Read a YAML experiment config (a path, or the name of a bundled one: ``default``, ``sweeps``), resolve its
    ``extends:``, apply its ``quick:`` section when ``quick``, then ``overrides``; validate (unknown keys are errors)."""
    path, raw = _read_raw(spec)
    quick_section = raw.pop("quick", None) or {}
    if quick:
        if not quick_section:
            raise ConfigError(f"{path}: --quick needs a 'quick:' section of overrides in the config")
        raw = _with_layer(raw, quick_section)
    raw = _with_layer(raw, overrides or {})
    try:
        cfg = ExperimentConfig(**raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path), fields=[])) from None
    expand_grid(cfg, source=str(path))  # validates every merge's options now, not halfway through a run
    return cfg


def short_hash(obj: Any, n: int = 8) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]

class Experiment(BaseModel):
    """One merge of the grid."""

    name: str  # "<variant>/<entry>[-key=value...]"
    family: str
    variant: str
    options: dict[str, Any]  # flat option keys as given (defaults, entry options, sweep point, mode)

def _defaults_for(defaults: dict[str, Any], mode: str, source: str) -> dict[str, Any]:
    """The grid's ``merge_defaults`` that method ``mode`` takes (they apply to every merge, so a key of another
    method is skipped here); a key that no method takes is an error with a did-you-mean."""
    from ..merge.config import keys_for, known_keys

    unknown = [k for k in defaults if k not in known_keys()]
    if unknown:
        raise ConfigError(f"{source}: merge_defaults: unknown key(s) {unknown}.{did_you_mean(unknown[0], known_keys())}")
    takes = keys_for(mode)
    return {k: v for k, v in defaults.items() if k in takes}

def expand_grid(cfg: ExperimentConfig, source: str = "grid") -> list[Experiment]:
    """Every (entry, variant, sweep point) as an :class:`Experiment`; duplicates (same variant and
    resolved options, defaults filled in) are kept once, under the first name. Options are resolved now
    (:class:`ConfigError` naming the experiment; an entry's option that its method does not take is an error)."""
    from ..merge.config import resolve_options

    out: list[Experiment] = []
    seen: dict[str, str] = {}
    for entry in cfg.grid:
        keys = list(entry.sweep)
        points = list(itertools.product(*(entry.sweep[k] for k in keys))) if keys else [()]
        for variant in entry.variants or list(cfg.variants):
            for point in points:
                suffix = "".join(f"-{k}={v}" for k, v in zip(keys, point))
                where = f"{source}: {variant}/{entry.name}{suffix}"
                opts = {**_defaults_for(cfg.merge_defaults, entry.mode, where), **entry.options,
                        **dict(zip(keys, point)), "mode": entry.mode}
                resolved = resolve_options(dict(opts), source=where)
                key = short_hash([variant, resolved.model_dump(mode="json")], 16)
                if key in seen:
                    log.debug("grid: %s%s duplicates %s", entry.name, suffix, seen[key])
                    continue
                name = f"{variant}/{entry.name}{suffix}"
                if name in seen.values():
                    raise ConfigError(f"{where}: two grid entries named {entry.name!r} merge {variant} differently; "
                                      "every grid entry needs its own name (its results row and merge folder)")
                seen[key] = name
                out.append(Experiment(name=name, family=entry.name, variant=variant, options=opts))
    return out
