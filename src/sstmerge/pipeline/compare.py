"""Any two models of a finished grid, compared item by item (``sst-merge compare RUN A B``).

The results table tests every merge against ``direct`` of its own variant. A reader choosing between two other
rows (``protect`` or DARE-TIES? a merge or the safety adapter alone?) needs the same evidence for that pair: on
every column the two models share, the paired test on the seed-averaged items (exact McNemar where the outcomes
are 0/1, else the paired bootstrap; the summary scores by the paired bootstrap over the columns they average)
and each seed's own paired test, with whether the gap keeps its sign and significance in every seed. Nothing is
re-evaluated: everything is read from the run's ``results.json`` and item outcomes (a grid's ``--out`` or a
``sst-merge combine`` output).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..registry import did_you_mean
from .aggregate import add_per_seed_tests, average_seeds, compare
from .combine import read_run
from .results import format_value, gap_text, table_columns

SUMMARY_SCORES = ("safety", "utility")


def compare_models(folder: str | Path, model_a: str, model_b: str) -> dict[str, Any]:
    """Paired tests of ``model_a`` against ``model_b`` (differences are A − B) in the finished grid ``folder``.

    Returns ``{"folder", "seeds", "a", "b", "values": {model: {key: value}}, "tests": {key: test}}`` where ``key``
    runs over the table columns both models have and the summary scores, and each test is
    :func:`~.aggregate.compare`'s (``difference``, ``p_value``, ``significant``, ...) with ``per_seed`` and
    ``every_seed`` added (:func:`~.aggregate.add_per_seed_tests`). Raises :class:`ConfigError` naming the folder
    for a model the run does not have (with the closest name) or for a model compared with itself.
    """
    run = read_run(folder)
    names = [r["name"] for r in run["rows"]]
    for model in (model_a, model_b):
        if model not in names:  # "A7" is close to nothing by edit distance, but names the row "A7 alone"
            hint = did_you_mean(model, names) or next(
                (f" Did you mean {n!r}?" for n in names if n.startswith(f"{model} ")), "")
            raise ConfigError(f"{folder}: the run has no model {model!r}.{hint} Its models: {', '.join(names)}")
    if model_a == model_b:
        raise ConfigError(f"compare {model_a!r} with another model of {folder}, not with itself")
    columns = table_columns((run["config"].get("eval") or {}).get("suites"))
    a_items, b_items = run["items"][model_a], run["items"][model_b]  # seed -> column -> item -> outcome
    tests = compare(average_seeds(list(a_items.values())), average_seeds(list(b_items.values())), columns)
    add_per_seed_tests(tests, a_items, b_items, columns)
    rows = {r["name"]: r for r in run["rows"]}
    keys = [c.name for c in columns if c.name in tests] + [k for k in SUMMARY_SCORES if k in tests]
    return {"folder": str(folder), "seeds": run["seeds"], "a": model_a, "b": model_b,
            "values": {m: {k: rows[m].get(k) for k in keys} for m in (model_a, model_b)},
            "tests": {k: tests[k] for k in keys}}


def comparison_lines(comparison: dict[str, Any]) -> list[str]:
    """The comparison as Markdown lines: one per column and summary score, ``A value vs B value: difference (p;
    per seed ...: holds in every seed | not in every seed)``; ``*`` marks a seed whose own test is significant."""
    a, b, seeds = comparison["a"], comparison["b"], comparison["seeds"]
    lines = [f"{a} − {b}, {len(seeds)} seed(s) {seeds} ({comparison['folder']}): percentages, differences in points; "
             "paired test on the seed-averaged items (exact McNemar for 0/1 outcomes, else paired bootstrap; "
             "p < 0.05 is significant, no multiple-comparison correction); each seed's own difference, * where "
             "its own test is significant", ""]
    values = comparison["values"]
    for key, test in comparison["tests"].items():
        lines.append(f"- {key}: {format_value(values[a][key])} vs {format_value(values[b][key])}: "
                     f"{gap_text(test, mark=True)}")
    return lines
