"""Per-module-type tables: layerwise projection strengths (presets) and per-module safety weights (V3).

Module type = the last component of the module name (``q_proj``, ``down_proj``, ``lm_head``). A table
maps types to values; ``default`` covers types the table does not name.
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml

from ..errors import ConfigError
from ..registry import Registry, did_you_mean

_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _table(values: tuple[float, ...], default: float) -> dict[str, float]:
    return dict(zip(_TYPES, values)) | {"default": default}


#: projection strength σ per module type: φ'_m = (1 − σ) φ_m + σ P φ_m (σ = 1: full projection).
#: safety_first / balanced / utility_first are the seed's tables; ``minimal`` (named but never defined by
#: the seed) is defined here as the lightest projection, σ = 0.1 everywhere (90 % of the raw safety
#: adapter kept). ``default`` (types outside the table, e.g. lm_head) is the table's v_proj value.
PRESETS: Registry[dict[str, float]] = Registry("layerwise preset")
PRESETS.register("safety_first", _table((0.3, 0.3, 0.5, 0.7, 0.8, 0.8, 0.8), 0.5))
PRESETS.register("balanced", _table((0.4, 0.4, 0.6, 0.7, 0.7, 0.7, 0.7), 0.6))
PRESETS.register("utility_first", _table((0.6, 0.6, 0.8, 0.9, 0.9, 0.9, 0.9), 0.8))
PRESETS.register("minimal", _table((0.1,) * 7, 0.1))

#: per-module safety weights w^m (the seed's V3 table): lm_head 3.0, attention 1.0, MLP 0.3, default 1.0.
WEIGHT_TABLES: Registry[dict[str, float]] = Registry("layer-weight table")
WEIGHT_TABLES.register("v3", {"lm_head": 3.0, "q_proj": 1.0, "k_proj": 1.0, "v_proj": 1.0, "o_proj": 1.0,
                              "gate_proj": 0.3, "up_proj": 0.3, "down_proj": 0.3, "default": 1.0})


def module_type(name: str) -> str:
    """``model.layers.3.mlp.down_proj`` → ``down_proj``; ``model.embed_tokens.weight`` → ``embed_tokens``."""
    parts = name.split(".")
    if parts[-1] in ("weight", "bias") and len(parts) > 1:
        parts = parts[:-1]
    return parts[-1]


def load_table(spec: str, registry: Registry[dict[str, float]], *, lo: float | None = None, hi: float | None = None,
               known_types: set[str] | None = None) -> dict[str, float]:
    """A registered table by name, or a YAML file ``{type: value, ..., default: value}``.

    Values must be finite numbers (in ``[lo, hi]`` when given); with ``known_types`` (the module types of the
    adapters being merged) a file key that names no such type is an error with a did-you-mean, so a typo
    (``q_prj``) never silently falls back to ``default``."""
    if spec in registry:
        return dict(registry.get(spec))
    path = Path(spec).expanduser()
    if not path.suffix.lower() in (".yaml", ".yml", ".json") and not path.exists():
        registry.get(spec)  # raises the did-you-mean error for a mistyped name
    if not path.is_file():
        raise ConfigError(f"{registry.kind} {spec!r} is neither a known name ({', '.join(registry.names())}) nor an existing YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{path}: a {registry.kind} is a mapping of module type to value, e.g. 'q_proj: 0.5'")
    table = {}
    for key, value in data.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{path}: value of {key!r} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{path}: value of {key!r} must be a finite number, got {value!r}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ConfigError(f"{path}: value of {key!r} must lie in [{lo}, {hi}], got {value}")
        key = str(key)
        if known_types is not None and key != "default" and key not in known_types:
            raise ConfigError(
                f"{path}: module type {key!r} is not in the adapters being merged.{did_you_mean(key, sorted(known_types))} "
                f"Keys are the last part of a module name ({', '.join(sorted(known_types))}) or 'default'")
        table[key] = float(value)
    return table


def lookup(table: dict[str, float], name: str, what: str) -> float:
    t = module_type(name)
    if t in table:
        return table[t]
    if "default" in table:
        return table["default"]
    raise ConfigError(
        f"{what} has no value for module type {t!r} (module {name}) and no 'default'.{did_you_mean(t, list(table))} "
        "Add the type or a 'default' entry."
    )
