"""One options path: flat keys (CLI flags, YAML, Python keyword arguments, grid entries) → resolved, frozen
:class:`~sstmerge.merge.options.MergeOptions` / :class:`~sstmerge.merge.options.MergeConfig`.

Every key goes to exactly one place: an input/output key (:class:`~sstmerge.merge.options.MergeIO`), a common
option, a Fisher setting (methods with ``needs_fisher`` only) or a parameter of the chosen method. A key that
belongs to another method is an error that names the methods taking it; an unknown key gets a did-you-mean.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import ConfigError
from ..fisher.run import FisherSettings
from ..registry import did_you_mean
from .method import all_methods, method_class
from .options import FISHER_KEYS, CommonOptions, MergeConfig, MergeIO, MergeOptions

IO_KEYS = tuple(MergeIO.model_fields)
COMMON_KEYS = tuple(CommonOptions.model_fields)


def param_owners() -> dict[str, list[str]]:
    """Method parameter key → the methods that take it (``{"k": ["fisher_mask", "layerwise", "residual"], ...}``)."""
    owners: dict[str, list[str]] = {}
    for name, cls in all_methods().items():
        for key in cls.Params.model_fields:
            owners.setdefault(key, []).append(name)
    return owners


def known_keys() -> list[str]:
    return sorted(set(IO_KEYS) | set(COMMON_KEYS) | set(FISHER_KEYS) | set(param_owners()))


def keys_for(mode: str) -> set[str]:
    """The option keys (not input/output keys) that method ``mode`` takes."""
    cls = method_class(mode)
    return set(COMMON_KEYS) | set(cls.Params.model_fields) | (set(FISHER_KEYS) if cls.needs_fisher else set())


def format_validation_error(exc: ValidationError, source: str, fields: list[str] | None = None,
                            names: dict[str, str] | None = None) -> str:
    """One readable line per problem; unknown keys get a did-you-mean among ``fields`` (``[]``: none);
    ``names`` renames fields to the keys the user wrote (``batch_size`` → ``fisher_batch_size``)."""
    lines = []
    fields = known_keys() if fields is None else fields
    names = names or {}
    for err in exc.errors():
        loc = ".".join(names.get(str(p), str(p)) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            hint = did_you_mean(loc, fields) if fields else ""
            lines.append(f"unknown key {loc!r}.{hint}")
        else:
            lines.append(f"{loc}: {err['msg']} (got {err.get('input')!r})")
    return f"{source}: " + "; ".join(lines)


def _validated(model: type[BaseModel], values: dict, source: str) -> Any:
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def resolve_options(values: dict[str, Any], source: str = "options") -> MergeOptions:
    """Flat option keys → :class:`MergeOptions` for ``values["mode"]`` (default ``direct``).

    A key that the chosen method does not take is an error naming the methods that take it (the grid filters
    its ``merge_defaults``, which apply to every method, with :func:`keys_for` first).
    """
    values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items()}
    mode = values.get("mode", "direct")
    if not isinstance(mode, str):
        raise ConfigError(f"{source}: mode must be a method name, got {mode!r}")
    try:
        cls = method_class(mode)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    takes = keys_for(mode)
    owners = param_owners()
    problems = []
    for key in list(values):
        if key in takes:
            continue
        if key in owners:
            problems.append(f"option {key!r} belongs to method(s) {', '.join(sorted(owners[key]))}, not {mode!r}")
        elif key in FISHER_KEYS:
            fisher_methods = sorted(n for n, c in all_methods().items() if c.needs_fisher)
            problems.append(f"option {key!r} configures the Fisher pass of {', '.join(fisher_methods)}; "
                            f"method {mode!r} does not run it")
        else:
            problems.append(f"unknown key {key!r}.{did_you_mean(key, known_keys())}")
    if problems:
        raise ConfigError(f"{source}: " + "; ".join(problems))
    common = _validated(CommonOptions, {k: v for k, v in values.items() if k in COMMON_KEYS}, source)
    fisher_values = {field: values[flat] for flat, field in FISHER_KEYS.items() if flat in values}
    try:
        fisher = FisherSettings.model_validate({**fisher_values, "seed": common.seed})
    except ValidationError as exc:  # name the flat keys the user wrote (fisher_batch_size, not batch_size)
        flat_names = {field: flat for flat, field in FISHER_KEYS.items()}
        raise ConfigError(format_validation_error(exc, source, names=flat_names)) from None
    params = _validated(cls.Params, {k: v for k, v in values.items() if k in cls.Params.model_fields},
                        f"{source}: method {mode!r}")
    return MergeOptions(**common.model_dump(), fisher=fisher, params=params)


def build_config(values: dict[str, Any], source: str = "options") -> MergeConfig:
    """Flat keys (inputs/outputs + options) → :class:`MergeConfig`, raising :class:`ConfigError`."""
    io_values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items() if k in IO_KEYS}
    if isinstance(io_values.get("utility"), str):
        io_values["utility"] = (io_values["utility"],)
    io = _validated(MergeIO, io_values, source)
    options = resolve_options({k: v for k, v in values.items() if k not in IO_KEYS}, source)
    return MergeConfig(io=io, options=options)


def load_config_file(path: str | Path) -> dict:
    """Read a YAML merge config into a dict of flat keys (validated later, merged with CLI flags)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of keys to values, got {type(data).__name__}")
    if isinstance(data.get("utility"), str):
        data["utility"] = [data["utility"]]
    return data


def flat_config(config: MergeConfig) -> dict[str, Any]:
    """The flat keys of a config (merge_config.yaml): inputs, common options, the Fisher settings only for
    methods that run the pass, and the method's parameters; re-running them gives the same merge."""
    needs_fisher = method_class(config.options.mode).needs_fisher
    io = config.io.model_dump(mode="json")
    io["utility"] = list(io["utility"])
    return {**io, **config.options.flat(fisher=needs_fisher)}
