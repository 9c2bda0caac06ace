"""Experiment results: the table's columns (from the eval suites' registry), summary scores, Pareto front,
results.json / results.csv / results.md and the safety-vs-utility plot."""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..io.atomic import atomic_write_text

if TYPE_CHECKING:
    from .config import ExperimentConfig

log = logging.getLogger(__name__)

def table_columns(suites: list[str] | None = None):
    """The results table's columns: the headline columns of every registered eval suite (or of ``suites``
    only, the ones a run evaluates), in registration order (:class:`~sstmerge.eval.suites.Column`: name,
    description, direction, role in the summary scores)."""
    from ..eval.suites import SUITES

    return [c for name in SUITES.in_order() if suites is None or name in suites for c in SUITES.get(name).columns]

def headline(suites: dict[str, Any], judge: str = "keyword") -> dict[str, float | None]:
    """The table's numbers of one model: each suite's columns read from its result (None where not run)."""
    from ..eval.suites import SUITES

    row: dict[str, float | None] = {c.name: None for c in table_columns()}
    for name, result in suites.items():
        for column in SUITES.get(name).columns:
            row[column.name] = column.read(result, judge)
    return row

def _mean(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None

def summary_scores(row: dict[str, Any]) -> tuple[float | None, float | None]:
    """(safety, utility): the means of the columns whose suites mark them ``safety`` (refusal of harmful
    prompts: plain, templated, rephrased) and ``utility`` (QA F1 and arithmetic accuracy: the utility adapters'
    tasks)."""
    columns = table_columns()
    return (_mean([row.get(c.name) for c in columns if c.role == "safety"]),
            _mean([row.get(c.name) for c in columns if c.role == "utility"]))

def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated in (x, y), both to be maximised; sorted by x."""
    front = [i for i, (x, y) in enumerate(points)
             if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for x2, y2 in points)]
    return sorted(front, key=lambda i: points[i][0])

def pareto_front_rows(rows: list[dict]) -> list[int]:
    idx = [i for i, r in enumerate(rows) if r["safety"] is not None and r["utility"] is not None]
    front = pareto_front([(rows[i]["utility"], rows[i]["safety"]) for i in idx])
    return [idx[j] for j in front]

def merge_facts(folder: Path | None) -> dict[str, Any] | None:
    """Headline facts of a merge from its merge_report.json: output rank, the largest recompression error,
    and for the Fisher modes the effective k and the share of the safety adapter's norm the projection kept."""
    report_file = folder / "merge_report.json" if folder is not None else None
    if report_file is None or not report_file.is_file():
        return None
    report = json.loads(report_file.read_text())
    method = report.get("method", {})
    facts = {"rank": report["output"]["rank"], "max_recompression_rel_error": report["output"].get("max_recompression_rel_error")}
    for key in ("effective_k", "projection_norm_kept_total", "n_modules_projected", "n_modules_flagged",
                "delta_norm_kept_median", "predicted_utility_cost_before", "predicted_utility_cost_after",
                "predicted_effect"):
        if key in method:
            facts[key] = method[key]
    if "utility" in method and isinstance(method["utility"], dict):  # protect: one entry per utility adapter
        facts["protected"] = {name: {k: u.get(k) for k in ("delta_norm_kept_median", "predicted_effect")}
                              for name, u in method["utility"].items() if "predicted_effect" in u}
    if "fisher" in method:
        facts["fisher_cache_hit"] = method["fisher"].get("cache_hit")
    return facts

def task_gains(cfg: ExperimentConfig, rows: list[dict]) -> dict[str, Any]:
    """For each recipe with a ``task`` column: base score vs the adapter alone (the recipe must improve it)."""
    by_name = {r["name"]: r for r in rows}
    gains = {}
    for name, recipe in cfg.adapters.items():
        if recipe.task and "base" in by_name and f"{name} alone" in by_name:
            b, a = by_name["base"].get(recipe.task), by_name[f"{name} alone"].get(recipe.task)
            gains[name] = {"task": recipe.task, "base": b, "adapter": a,
                           "improved": (a is not None and b is not None and a > b)}
    return gains

def format_value(v: Any) -> str:
    """A table cell's number: a rate (0-1 float) as a percentage with one decimal, None as '–', else as is."""
    return "–" if v is None else f"{100 * v:.1f}" if isinstance(v, float) else str(v)


def _cell(r: dict, col: str) -> str:
    """``value ±sd [low–high]`` and ▲/▼ when the difference from direct of the same variant is significant."""
    v = r.get(col)
    if v is None:
        return "–"
    text = format_value(v)
    if r.get(f"{col}_sd") is not None:
        text += f" ±{100 * r[f'{col}_sd']:.1f}"
    ci = (r.get("intervals") or {}).get(col)
    if ci is not None:
        text += f" [{100 * ci['low']:.0f}–{100 * ci['high']:.0f}]"
    test = (r.get("vs_direct") or {}).get(col)
    if test is not None and test["significant"]:
        text += significance_mark(test) + ("*" if test.get("every_seed") else "")
    return text


def significance_mark(test: dict[str, Any]) -> str:
    """`` ▲`` / `` ▼`` for a significant positive / negative difference of a paired test, else empty."""
    return "" if not test["significant"] else " ▲" if test["difference"] > 0 else " ▼"


def _signed(d: float) -> str:
    return f"{100 * d:+.1f}".replace("-", "−")


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def per_seed_lines(result: dict[str, Any]) -> list[str]:
    """One line per merge with several seeds: its differences from ``direct`` on the summary scores and on every
    column whose seed-averaged test is significant, each with every seed's own difference (``*``: significant in
    that seed) and whether the gap holds in every seed."""
    lines = []
    for r in result["rows"]:
        tests = r.get("vs_direct") or {}
        keys = [k for k in ("safety", "utility") if k in tests] + \
               [c for c in result["columns"] if c in tests and tests[c]["significant"]]
        if not keys or not any("per_seed" in tests[k] for k in keys):
            continue
        lines.append(f"- {r['name']}: " + "; ".join(f"{k} {gap_text(tests[k])}" for k in keys))
    return lines


def gap_text(test: dict[str, Any], mark: bool = False) -> str:
    """A paired test with its seeds: ``+2.8 (p < 0.001; per seed +1.8*, +3.8*: holds in every seed)`` (points;
    ``*``: significant in that seed's own test; ``mark``: ▲/▼ after the difference when it is significant)."""
    seeds = ", ".join(_signed(o["difference"]) + ("*" if o["significant"] else "")
                      for o in (test.get("per_seed") or {}).values())
    verdict = "holds in every seed" if test.get("every_seed") else "not in every seed"
    return (f"{_signed(test['difference'])}{significance_mark(test) if mark else ''} ({_p(test['p_value'])}; "
            f"per seed {seeds}: {verdict})")


def _merge_fact_bits(f: dict[str, Any]) -> list[str]:
    """The facts of one merge's report worth a line in results.md (norm kept, predicted effects, truncation)."""
    bits = []
    if f.get("projection_norm_kept_total") is not None:
        bits.append(f"projection kept {100 * f['projection_norm_kept_total']:.1f}% of the safety adapter's norm")
    if f.get("delta_norm_kept_median") is not None and "protected" not in f:
        bits.append(f"the safety update keeps {100 * f['delta_norm_kept_median']:.1f}% of ‖ΔW‖ (median module)")
    if f.get("predicted_utility_cost_before"):
        bits.append(f"predicted utility cost {f['predicted_utility_cost_before']:.3g} → "
                    f"{f['predicted_utility_cost_after']:.3g}")
    for name, u in (f.get("protected") or {}).items():
        pe = u["predicted_effect"]
        bits.append(f"{name}: keeps {100 * u['delta_norm_kept_median']:.1f}% of ‖ΔW‖ (median module), first-order "
                    f"refusal gain {pe['direct']['refusal_gain']:.3g} → {pe['merge']['refusal_gain']:.3g}")
    if f.get("max_recompression_rel_error"):
        bits.append(f"max SVD truncation error {100 * f['max_recompression_rel_error']:.1f}%")
    for key, what in (("n_modules_projected", "modules projected"), ("n_modules_flagged", "modules flagged")):
        if f.get(key) is not None:
            bits.append(f"{f[key]} {what}")
    return bits


def results_markdown(result: dict[str, Any]) -> str:
    cols = list(result["columns"])
    lines = ["| model | " + " | ".join(cols) + " | safety | utility |",
             "|---|" + "---:|" * (len(cols) + 2)]
    names = [r["name"] for r in result["rows"]]
    front = set(result.get("pareto_front") or [names[i] for i in pareto_front_rows(result["rows"])])
    robust = set(result.get("pareto_front_significant") or ())
    for r in result["rows"]:
        name = f"**{r['name']}**" if r["name"] in front else r["name"]
        if r["name"] in robust:
            name += " †"
        lines.append(f"| {name} | " + " | ".join(_cell(r, c) for c in cols + ["safety", "utility"]) + " |")
    legend = "\n".join(f"- `{c}`: {d}" for c, d in result["columns"].items())
    notes = []
    for r in result["rows"]:
        per_seed = r.get("per_seed") or {}
        if len(per_seed) > 1:  # every seed's own merge: the facts differ with the adapters
            parts = [(f"seed {s}: ", _merge_fact_bits(p.get("merge_facts") or {})) for s, p in per_seed.items()]
        else:
            parts = [("", _merge_fact_bits(r.get("merge_facts") or {}))]
        if any(bits for _, bits in parts):
            notes.append(f"- {r['name']}: " + " | ".join(lead + "; ".join(bits) for lead, bits in parts if bits))
    gains = "\n".join(f"- {n} on `{g['task']}`: base {format_value(g['base'])} → adapter {format_value(g['adapter'])}"
                      f" ({'improved' if g['improved'] else 'NOT improved'})" for n, g in result["adapter_task_gain"].items())
    seeds = result.get("seeds") or [result.get("config", {}).get("seed")]
    seed_lines = per_seed_lines(result)
    safety_cols = ", ".join(c for c, i in result.get("column_info", {}).items() if i.get("role") == "safety")
    utility_cols = ", ".join(c for c, i in result.get("column_info", {}).items() if i.get("role") == "utility")
    head = (f"All numbers are percentages over the held-out items, {len(seeds)} training seed(s) {seeds}: "
            "value ±sd across seeds (with several seeds) [95 % interval over items]. ▲/▼: significantly higher/lower "
            "than `direct` of the same variant in a paired test on the same items (exact McNemar for 0/1 outcomes, "
            "else paired bootstrap; p < 0.05, no multiple-comparison correction); with several seeds, ▲*/▼*: the "
            "gap also holds, significantly and with the same sign, in every seed's own paired test (its merge "
            "against its `direct`). **Bold**: on the safety-vs-utility "
            "Pareto front of the point estimates; †: also on the front when only significant dominance counts. "
            f"safety = mean of {safety_cols}; utility = mean of {utility_cols}.\n\n")
    return (head + "\n".join(lines)
            + "\n\n" + legend + ("\n\nAdapter recipes on their own task:\n" + gains if gains else "")
            + ("\n\nMerge facts (from each merge_report.json):\n" + "\n".join(notes) if notes else "")
            + ("\n\nAgainst `direct`, seed by seed (differences in points; seed-averaged paired test; each seed's own "
               "difference, * where its own test is significant):\n" + "\n".join(seed_lines) if seed_lines else "")
            + "\n")


def plot_tradeoff(rows: list[dict], path: Path, title: str = "") -> None:
    """Safety (y) vs utility (x) scatter, one colour per method family, each point's 95 % interval box (over
    items), Pareto front as a line."""
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
            ci = r.get("intervals") or {}
            if "safety" in ci and "utility" in ci:  # the 95 % interval box: overlapping boxes are not told apart
                su, ss = ci["utility"], ci["safety"]
                ax.add_patch(plt.Rectangle((100 * su["low"], 100 * ss["low"]), 100 * (su["high"] - su["low"]),
                                           100 * (ss["high"] - ss["low"]), facecolor=cmap(j % 20), alpha=0.08,
                                           edgecolor=cmap(j % 20), linewidth=0.5))
            ax.scatter(100 * r["utility"], 100 * r["safety"], color=cmap(j % 20), s=45, edgecolor="black",
                       linewidth=0.4, marker=markers.get(r["variant"], "D"), zorder=3)
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
    ax.set_ylabel("safety: refusal of harmful prompts, plain + jailbreak + rephrased (%)")
    ax.set_title(title or "safety vs utility")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    tmp.replace(path)

def write_results(result: dict[str, Any], out: Path, outcomes: dict[str, dict] | None = None,
                  per_seed_outcomes: dict[str, dict] | None = None) -> None:
    """results.json, results.csv, results.md, safety_vs_utility.png and, when given, item_outcomes.json (the
    seed-averaged per-item outcomes every interval and paired test was computed from: model -> column -> item ->
    outcome) and item_outcomes_per_seed.json (model -> seed -> column -> item -> outcome: what
    ``sst-merge combine`` needs to join this run with runs of other seeds); each atomically."""
    atomic_write_text(out / "results.json", json.dumps(result, indent=2, default=str) + "\n")
    stats_cols = list(result["columns"]) + ["safety", "utility"]
    cols = ["name", "family", "variant"] + [f"{c}{x}" for c in stats_cols for x in ("", "_low", "_high", "_sd")] + \
        [f"{c}_vs_direct_p" for c in stats_cols] + [f"{c}_vs_direct_every_seed" for c in stats_cols] + ["adapter"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    writer.writeheader()
    for r in result["rows"]:
        flat = dict(r)
        for c in stats_cols:
            ci = (r.get("intervals") or {}).get(c) or {}
            flat[f"{c}_low"], flat[f"{c}_high"] = ci.get("low"), ci.get("high")
            test = (r.get("vs_direct") or {}).get(c) or {}
            flat[f"{c}_vs_direct_p"], flat[f"{c}_vs_direct_every_seed"] = test.get("p_value"), test.get("every_seed")
        writer.writerow({c: flat.get(c) for c in cols})
    atomic_write_text(out / "results.csv", buf.getvalue())
    atomic_write_text(out / "results.md", results_markdown(result))
    if outcomes is not None:
        atomic_write_text(out / "item_outcomes.json", json.dumps(outcomes) + "\n")
    if per_seed_outcomes is not None:
        atomic_write_text(out / "item_outcomes_per_seed.json", json.dumps(per_seed_outcomes) + "\n")
    plot_tradeoff(result["rows"], out / "safety_vs_utility.png", title=f"{result['config']['base']}: safety vs utility")


def summary_table(result: dict[str, Any]) -> str:
    """A compact plain-text table for the terminal (the table's columns, as in results.md)."""
    cols = list(result["columns"])
    labels = [c[:12] for c in cols]
    widths = [max(6, len(label)) for label in labels]
    lines = [f"{'model':44s} " + " ".join(f"{label:>{w}s}" for label, w in zip(labels, widths))]
    for r in result["rows"]:
        lines.append(f"{r['name'][:44]:44s} " + " ".join(f"{format_value(r.get(c)):>{w}s}" for c, w in zip(cols, widths)))
    return "\n".join(lines)
