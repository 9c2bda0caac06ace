"""The default grid's models on XSTest v2, three seeds: each model's seed-averaged rates and, for every merge, the
paired test against A5+A6+A7/direct, seed-averaged and seed by seed, as the grid computes them
(:mod:`sstmerge.pipeline.aggregate`: exact McNemar for 0/1 outcomes, else paired bootstrap).

    python docs/results/default/xstest/summarize.py docs/results/default/xstest > docs/results/default/xstest/results.md
"""
import json
import sys
from pathlib import Path

import numpy as np

from sstmerge.eval import stats
from sstmerge.pipeline.aggregate import add_per_seed_tests, average_seeds, column_outcomes, compare
from sstmerge.pipeline.results import gap_text, table_columns

root = Path(sys.argv[1])
SEEDS = [0, 1, 2]
SHOWN = ["jailbreak_plain", "jailbreak_templated", "overrefusal"]
columns = [c for c in table_columns() if c.name in SHOWN]


def outcomes(path: Path) -> dict:
    return column_outcomes(json.loads(path.read_text())["suites"], "keyword")


base = outcomes(root / "base.json")
models = ["A7 alone"] + [f"A5+A6+A7__{m}" for m in
                         ("direct", "protect", "complement", "residual", "ties", "dare_ties", "safe_lora", "safemerge")]
per_seed = {m: {s: outcomes(root / f"seed{s}" / f"{m}.json") for s in SEEDS} for m in models}
avg = {m: average_seeds([per_seed[m][s] for s in SEEDS]) for m in models}


def rate(o: dict) -> str:
    v = list(o.values())
    iv = stats.wilson_interval(int(round(sum(v))), len(v)) if stats.is_binary(v) else None
    return f"{100 * np.mean(v):.1f}" + (f" [{100 * iv.low:.0f}–{100 * iv.high:.0f}]" if iv else "")


def cell(m: str, c: str) -> str:
    seeds = [100 * np.mean(list(per_seed[m][s][c].values())) for s in SEEDS]
    return f"{100 * np.mean(list(avg[m][c].values())):.1f} ±{np.std(seeds, ddof=1):.1f} ({' / '.join(f'{x:.1f}' for x in seeds)})"


def pair(m: str, ref: str) -> str:
    tests = add_per_seed_tests(compare(avg[m], avg[ref], columns), per_seed[m], per_seed[ref], columns)
    return "; ".join(f"{key} {gap_text(tests[key])}" for key in SHOWN + ["safety"])

print("| model | " + " | ".join(SHOWN) + " |")
print("|---|" + "---:|" * len(SHOWN))
print("| base | " + " | ".join(rate(base[c]) for c in SHOWN) + " |")
for m in models:
    print(f"| {m.replace('__', '/')} | " + " | ".join(cell(m, c) for c in SHOWN) + " |")
print()
print("safety = mean of the two refusal columns. Against A5+A6+A7/direct (difference in points; seed-averaged "
      "paired test; each seed's own difference, * where its own test is significant; 'holds in every seed' where "
      "all three are significant with the same sign):")
print()


for m in models[2:]:
    print(f"- {m.replace('__', '/')}: " + pair(m, "A5+A6+A7__direct"))
print()
print("`protect` against the baselines that keep refusals, and against A7 alone (the same tests, protect − other):")
print()
for ref in ("A5+A6+A7__ties", "A5+A6+A7__dare_ties", "A5+A6+A7__safe_lora", "A7 alone"):
    print(f"- protect vs {ref.replace('A5+A6+A7__', '')}: " + pair("A5+A6+A7__protect", ref))
