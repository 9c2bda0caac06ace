"""Join experiment folders that ran the same grid with different seeds into one result.

One seed of the default grid takes hours on a CPU, so its seeds are often run apart: in separate jobs or on
separate machines (``sst-merge demo --seed 1 --out runs/seed1``). :func:`combine_runs` reads each folder's
``results.json`` and per-item outcomes (``item_outcomes.json`` for a one-seed run, ``item_outcomes_per_seed.json``
for a run of several) and writes what one run over all those seeds writes: the same rows, means, standard
deviations across seeds, intervals over the seed-averaged items, paired tests and Pareto fronts (the same code
computes them: :func:`~.stages.model_row`, :func:`~.stages.assemble_result`), each part's provenance kept.

What must agree, else :class:`~sstmerge.errors.ConfigError` names the folder and the difference: the grid (its
config apart from the seeds, the threads and the cache folder), the rows, and the evaluation fingerprints of the
base model (same weights, data and settings); no seed may appear twice. The base model is evaluated in every
part: whether those evaluations agree item for item is reported (``base_reproduced``; None when the grid has no
base row), as are differing package versions.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

from ..errors import ConfigError

log = logging.getLogger(__name__)

_NOT_COMPARED = ("seed", "seeds", "threads", "cache_dir")  # may differ between the parts of one experiment


def read_run(folder: str | Path) -> dict[str, Any]:
    """A finished grid folder's ``results.json`` plus ``items``: model -> seed -> column -> item -> outcome."""
    folder = Path(folder)
    result = _read_json(folder / "results.json",
                        "the grid has not finished there: run it again with the same --out (finished stages are reused)")
    seeds = [int(s) for s in result.get("seeds") or [result["config"]["seed"]]]
    if len(seeds) == 1:
        raw = _read_json(folder / "item_outcomes.json", "it is written with results.json: run the grid again")
        items = {name: {seeds[0]: cols} for name, cols in raw.items()}
    else:
        raw = _read_json(folder / "item_outcomes_per_seed.json",
                         "a run of several seeds holds its per-seed outcomes there (its item_outcomes.json averages "
                         "them); run the grid again with the same --out to write it (finished stages are reused)")
        items = {name: {int(s): cols for s, cols in per_seed.items()} for name, per_seed in raw.items()}
    path = folder / ("item_outcomes.json" if len(seeds) == 1 else "item_outcomes_per_seed.json")
    for row in result["rows"]:
        have = sorted(items.get(row["name"], {}))
        if not have:
            raise ConfigError(f"{path}: the item outcomes have no model {row['name']!r}, a row of its results.json; "
                              "run the grid (or sst-merge combine) again with the same --out to rewrite them")
        if have != seeds:
            raise ConfigError(f"{path}: the item outcomes of {row['name']!r} cover seeds {have}, the run has {seeds}; "
                              "run the grid (or sst-merge combine) again with the same --out to rewrite them")
    _check_outcomes(path, items)
    return {**result, "seeds": seeds, "folder": str(folder), "items": items}


def _check_outcomes(path: Path, items: dict[str, dict[int, Any]]) -> None:
    """Raise :class:`ConfigError` naming ``path``, the model, seed, column and item unless every model and seed holds
    the same columns over the same items, each outcome a number in [0, 1] (a refusal, a correct answer, an F1).

    The paired tests pair two models' outcomes item by item, and the summary scores average the columns a model has:
    a column or item missing from one model would silently change what is compared. A column whose items come in
    another order is put in the first model's order, in place."""
    fix = ("the file was changed or damaged since it was written: run the grid (or sst-merge combine) again with the "
           "same --out to rewrite it")
    reference: tuple[str, int, dict[str, dict]] | None = None
    for name, per_seed in items.items():
        for seed, columns in per_seed.items():
            where = f"{path}: {name!r}, seed {seed}"
            if not isinstance(columns, dict) or not all(isinstance(c, dict) for c in columns.values()):
                raise ConfigError(f"{where}: expected column -> item -> outcome objects; {fix}")
            for column, outcomes in columns.items():
                for item, value in outcomes.items():
                    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                        raise ConfigError(f"{where}, column {column!r}, item {item!r}: outcome {value!r} is not a "
                                          f"number in [0, 1]; {fix}")
            if reference is None:
                reference = (name, seed, columns)
                continue
            ref_name, ref_seed, ref_columns = reference
            if set(columns) != set(ref_columns):
                raise ConfigError(f"{where} has the columns {sorted(columns)}, {ref_name!r} seed {ref_seed} has "
                                  f"{sorted(ref_columns)}; {fix}")
            for column, ref_items in ref_columns.items():
                if columns[column].keys() != ref_items.keys():
                    lacks = [k for k in ref_items if k not in columns[column]]
                    extra = [k for k in columns[column] if k not in ref_items]
                    raise ConfigError(f"{where}, column {column!r}: {len(lacks)} item(s) of {ref_name!r} seed "
                                      f"{ref_seed} missing {lacks[:3]}, {len(extra)} item(s) it does not have "
                                      f"{extra[:3]}; {fix}")
                if list(columns[column]) != list(ref_items):
                    columns[column] = {k: columns[column][k] for k in ref_items}


def _read_json(path: Path, fix: str) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path} is missing: {fix}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{path} cannot be read as JSON ({exc}): run the grid again to rewrite it") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def grid_identity(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a results.json config that defines the experiment: everything but the seeds (of the grid, of
    each recipe's training and of the merges), the thread count and the cache folder."""
    c = copy.deepcopy(config)
    for key in _NOT_COMPARED:
        c.pop(key, None)
    for recipe in (c.get("adapters") or {}).values():
        (recipe.get("train") or {}).pop("seed", None)
    (c.get("merge_defaults") or {}).pop("seed", None)
    return c


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Dotted paths where two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in (_differences(a.get(k), b.get(k), f"{path}.{k}" if path else str(k)) if k in a and k in b
                          else [f"{path}.{k}" if path else str(k)])]
    return [] if a == b else [path or "(top level)"]


def _seed_record(row: dict[str, Any], seed: int, columns: list[str]) -> dict[str, Any]:
    """One seed's record of a row, as :func:`~.stages._run_experiments` keeps it (``row["per_seed"]`` for a run of
    several seeds; rebuilt from the row of a one-seed run)."""
    if row.get("per_seed"):
        return row["per_seed"][str(seed)]
    return {**{c: row.get(c) for c in columns}, "safety": row.get("safety"), "utility": row.get("utility"),
            "adapter": row.get("adapter"), "merge_facts": row.get("merge_facts"),
            "eval_fingerprints": row.get("eval_fingerprints"), "eval_cache_hit": row.get("eval_cache_hit")}


def check_parts(parts: list[dict[str, Any]]) -> None:
    """Raise :class:`ConfigError` unless the parts ran one experiment: distinct seeds, the same grid, the same rows
    and the same evaluation of the base model."""
    if len(parts) < 2:
        raise ConfigError("combine needs at least two experiment folders (one per seed, or per group of seeds)")
    first, seen = parts[0], {}
    for part in parts:
        for s in part["seeds"]:
            if s in seen:
                raise ConfigError(f"seed {s} is in both {seen[s]} and {part['folder']}: give each seed once")
            seen[s] = part["folder"]
    for part in parts[1:]:
        diff = _differences(grid_identity(first["config"]), grid_identity(part["config"]))
        if diff:
            raise ConfigError(f"{part['folder']} ran another grid than {first['folder']}: its config differs at "
                              f"{', '.join(diff[:8])}{' …' if len(diff) > 8 else ''}; combine runs of one config that "
                              "differ only in their seeds")
        names, other = [r["name"] for r in first["rows"]], [r["name"] for r in part["rows"]]
        if names != other:
            raise ConfigError(f"{part['folder']} has rows {other}, {first['folder']} has {names}: not the same grid")
        base = [next((r.get("eval_fingerprints") for r in p["rows"] if r["name"] == "base"), None)
                for p in (first, part)]
        if base[0] != base[1]:
            raise ConfigError(f"{part['folder']} and {first['folder']} evaluated the base model differently (its "
                              "evaluation fingerprints differ: other weights, data or generation settings)")


def combine_runs(folders: list[str | Path], out: str | Path) -> dict[str, Any]:
    """Combine finished grid folders of one experiment run with different seeds into ``out`` (results.json, .csv,
    .md, the plot, item outcomes), as one run over all their seeds would have written it; returns the result."""
    from .aggregate import average_seeds
    from .config import ExperimentConfig
    from .results import table_columns, write_results
    from .stages import assemble_result, check_run_folder, claim_run_folder, model_row

    parts = sorted((read_run(f) for f in folders), key=lambda p: p["seeds"][0])
    check_parts(parts)
    check_run_folder(out, [Path(p["folder"]) for p in parts])  # a refused --out fails before the tables are computed
    first = parts[0]
    seeds = sorted(s for p in parts for s in p["seeds"])
    part_of = {s: p for p in parts for s in p["seeds"]}
    config = {k: v for k, v in first["config"].items() if k != "seed"} | {"seeds": seeds}
    try:
        cfg = ExperimentConfig(**config)
    except Exception as exc:  # a results.json of another sstmerge release
        raise ConfigError(f"{first['folder']}/results.json: its config does not validate ({exc})") from None
    all_columns = [c.name for c in table_columns()]
    columns = table_columns(cfg.eval.suites)

    rows, items, outcomes = [], {}, {}  # items: model -> seed -> column -> item -> outcome; outcomes: seed-averaged
    for k, row in enumerate(first["rows"]):
        name = row["name"]
        model = {key: row[key] for key in ("name", "family", "variant", "options") if key in row}
        per_seed = {s: _seed_record(part_of[s]["rows"][k], s, all_columns) for s in seeds}
        items[name] = {s: part_of[s]["items"][name][s] for s in seeds}
        outcomes[name] = average_seeds(list(items[name].values()))
        rows.append(model_row(model, per_seed, outcomes[name], columns))

    base_items = [json.dumps(p["items"]["base"][p["seeds"][0]], sort_keys=True) for p in parts if "base" in p["items"]]
    base_reproduced = len(set(base_items)) == 1 if base_items else None  # None: the grid evaluates no base model
    if base_reproduced is False:
        log.warning("the base model's item outcomes differ between the parts (generation is not reproducible "
                    "across their machines or versions); each part's own evaluation is used for its seeds")
    versions = [p.get("versions") or {} for p in parts]
    differing = sorted({k for v in versions for k in v if any(w.get(k) != v.get(k) for w in versions)})
    if differing:  # e.g. only "platform" when the seeds ran on machines with other kernels
        log.warning("the parts ran with different versions of %s: %s", ", ".join(differing),
                    {p["folder"]: {k: v.get(k) for k in differing} for p, v in zip(parts, versions)})
    timings = {}  # each part's stage timings, keyed as one run over all seeds keys them ("train:A5@seed1")
    for p in parts:  # a one-seed part's keys carry no seed; a several-seed part's do, except its seed-shared ones
        tag = f"@seed{p['seeds'][0]}" if len(p["seeds"]) == 1 else "@seeds" + "+".join(map(str, p["seeds"]))
        timings |= {key if "@seed" in key else f"{key}{tag}": v for key, v in (p.get("timings") or {}).items()}
    adapters_per_seed = {s: part_of[s]["adapters_per_seed"][str(s)] for s in seeds}
    result = assemble_result(
        cfg, rows, outcomes, columns, adapters_per_seed=adapters_per_seed, versions=versions[0], timings=timings,
        seconds=sum(p.get("seconds") or 0.0 for p in parts),
        items=items,
        config_source="combined: " + "; ".join(f"{p['folder']} ({p.get('config_source') or '?'}, seeds "
                                               f"{p['seeds']})" for p in parts),
        combined_from=[{"folder": p["folder"], "seeds": p["seeds"], "created": p.get("created"),
                        "config_source": p.get("config_source"), "versions": p.get("versions"),
                        "seconds": p.get("seconds")} for p in parts],
        base_reproduced=base_reproduced)
    with claim_run_folder(out, [Path(p["folder"]) for p in parts]) as out_path:
        write_results(result, out_path, outcomes, items)
    return result
