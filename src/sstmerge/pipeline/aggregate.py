"""From per-item outcomes to the numbers of the results table: seeds averaged, intervals over items, paired tests.

For each model and each table column the evaluation yields per-item outcomes in [0, 1] (a refusal verdict,
a correct answer, a token F1), keyed by item. With several training seeds a model has one outcome vector per
seed over the same items. This module turns them into

* the column's value: the mean over items, averaged over seeds, and the **standard deviation across seeds**
  of the per-seed values (ddof = 1; absent with one seed);
* its **95 % interval over items** (:mod:`sstmerge.eval.stats`): Wilson when the outcomes are 0/1 (one seed),
  else the bootstrap of the seed-averaged per-item outcomes (the item stays the unit of resampling);
* the summary scores ``safety`` / ``utility`` (means of the columns of that role) with a stratified bootstrap
  interval;
* for each merge, a **paired test against ``direct`` of the same variant** on the same items, per column and
  for the summary scores (exact McNemar on 0/1 outcomes, else the paired bootstrap);
* with several seeds, the same test **within each seed** (that seed's merge against that seed's ``direct``):
  the item-level tests treat the trained adapters as given, so a gap is a property of the method only when it
  keeps its sign, significantly, in every seed (``every_seed``).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ..eval import stats

log = logging.getLogger(__name__)

Outcomes = dict[str, float]  # item key -> outcome in [0, 1]


def column_outcomes(suites: dict[str, Any], judge: str) -> dict[str, Outcomes]:
    """Per-item outcomes of every table column that has them, read from one model's suite results."""
    from ..eval.suites import SUITES

    out: dict[str, Outcomes] = {}
    for name, result in suites.items():
        for column in SUITES.get(name).columns:
            items = column.item_outcomes(result, judge)
            if items:
                out[column.name] = dict(items)
    return out


def average_seeds(per_seed: list[dict[str, Outcomes]]) -> dict[str, Outcomes]:
    """Per-item outcomes averaged over seeds, for the columns every seed has on the same items."""
    out: dict[str, Outcomes] = {}
    for col in set.intersection(*(set(o) for o in per_seed)) if per_seed else ():
        keys = list(per_seed[0][col])
        if any(list(o[col]) != keys for o in per_seed[1:]):
            log.warning("column %s: the seeds were evaluated on different items; not averaged", col)
            continue
        out[col] = {k: float(np.mean([o[col][k] for o in per_seed])) for k in keys}
    return out


def column_statistics(per_seed_values: list[dict[str, float | None]], outcomes: dict[str, Outcomes],
                      columns: list) -> dict[str, Any]:
    """Value (mean over seeds), sd across seeds and the interval over items of each column, and of the summary scores
    (``per_seed_values`` holds each seed's column values and its ``safety`` / ``utility``).

    Returns ``{col: value, f"{col}_sd": sd | None, ...}`` plus ``intervals: {col: Interval dict}``."""
    row: dict[str, Any] = {}
    intervals: dict[str, Any] = {}
    for c in columns:
        values = [v.get(c.name) for v in per_seed_values]
        present = [v for v in values if v is not None]
        row[c.name] = float(np.mean(present)) if present else None
        row[f"{c.name}_sd"] = float(np.std(present, ddof=1)) if len(present) > 1 else None
        if c.name in outcomes:
            intervals[c.name] = stats.item_interval(list(outcomes[c.name].values())).as_dict()
    for role in ("safety", "utility"):
        cols = [c.name for c in columns if c.role == role]
        present = [v[role] for v in per_seed_values if v.get(role) is not None]
        row[role] = float(np.mean(present)) if present else None
        row[f"{role}_sd"] = float(np.std(present, ddof=1)) if len(present) > 1 else None
        have = [c for c in cols if row.get(c) is not None]
        if have and all(c in outcomes for c in have):  # the interval of exactly the columns the score averages
            intervals[role] = stats.mean_of_means_interval([list(outcomes[c].values()) for c in have]).as_dict()
    row["intervals"] = intervals
    return row


def compare(a: dict[str, Outcomes], b: dict[str, Outcomes], columns: list) -> dict[str, Any]:
    """Paired tests of model A against model B on their common columns (same items in the same order), and on
    the summary scores (over the columns of that role both have)."""
    out: dict[str, Any] = {}
    for c in columns:
        if c.name in a and c.name in b:
            if list(a[c.name]) != list(b[c.name]):
                log.warning("column %s: the two models were evaluated on different items; no paired test", c.name)
                continue
            out[c.name] = stats.paired_test(list(a[c.name].values()), list(b[c.name].values())).as_dict()
    for role in ("safety", "utility"):  # over the columns of that role that were evaluated (as the summary scores)
        cols = [c.name for c in columns if c.role == role and c.name in out]
        if cols:
            out[role] = stats.paired_mean_of_means(
                [(list(a[c].values()), list(b[c].values())) for c in cols]).as_dict()
    return out


def add_per_seed_tests(pooled: dict[str, Any], a_items: dict[Any, dict[str, Outcomes]],
                       b_items: dict[Any, dict[str, Outcomes]], columns: list) -> dict[str, Any]:
    """Add each seed's own paired test to the seed-averaged tests ``pooled`` (from :func:`compare`) of model A
    against model B: ``pooled[key]["per_seed"] = {seed: {difference, p_value, significant}}`` and
    ``pooled[key]["every_seed"]``: True when every seed's test is significant with the sign of the seed-averaged
    difference (False when a seed lacks the test). ``a_items`` / ``b_items``: seed -> column -> item -> outcome,
    the same seeds for both. Returns ``pooled``, changed in place."""
    seeds = [s for s in a_items if s in b_items]
    own = {s: compare(a_items[s], b_items[s], columns) for s in seeds}
    for key, test in pooled.items():
        per_seed = {str(s): {k: own[s][key][k] for k in ("difference", "p_value", "significant")}
                    for s in seeds if key in own[s]}
        sign = np.sign(test["difference"])
        test["per_seed"] = per_seed
        test["every_seed"] = bool(sign != 0 and len(per_seed) == len(a_items) == len(b_items) and all(
            t["significant"] and np.sign(t["difference"]) == sign for t in per_seed.values()))
    return pooled


def significant_pareto_front(rows: list[dict], tests: dict[tuple[int, int], dict[str, Any]]) -> list[int]:
    """Rows not dominated *significantly*: row i leaves the front only when some row j is at least as good on both
    summary scores with at least one strictly better, and each such difference is significant in the paired test
    ``tests[(j, i)]`` (j − i; computed by the caller for the dominating pairs only)."""
    idx = [i for i, r in enumerate(rows) if r.get("safety") is not None and r.get("utility") is not None]
    front = []
    for i in idx:
        dominated = False
        for j in idx:
            if j == i or (j, i) not in tests:
                continue
            t = tests[(j, i)]
            better = [k for k in ("safety", "utility") if rows[j][k] > rows[i][k]]
            if better and all(rows[j][k] >= rows[i][k] for k in ("safety", "utility")) and \
                    all(k in t and t[k]["significant"] for k in better):
                dominated = True
                break
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: rows[i]["utility"])


def dominating_pairs(rows: list[dict]) -> list[tuple[int, int]]:
    """(j, i) for every row j that dominates row i on the point estimates (candidates for a paired test)."""
    idx = [i for i, r in enumerate(rows) if r.get("safety") is not None and r.get("utility") is not None]
    pairs = []
    for i in idx:
        for j in idx:
            if j != i:
                a, b = rows[j], rows[i]
                if a["safety"] >= b["safety"] and a["utility"] >= b["utility"] and \
                        (a["safety"] > b["safety"] or a["utility"] > b["utility"]):
                    pairs.append((j, i))
    return pairs

