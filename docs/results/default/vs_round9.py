"""One seed of this default's grid against the same seed of the round-9 default's grid, model by model: each column's
rate in both and the paired test on the same items, as the grid computes it (:func:`sstmerge.pipeline.aggregate.compare`:
exact McNemar for 0/1 outcomes, else paired bootstrap).

    python docs/results/default/vs_round9.py docs/results/default/seed0/item_outcomes.json \
        docs/results/default-a7-round9/seed0/item_outcomes.json

prints the Markdown table kept (under a header) in seed0/vs-round9-seed0.md.

**bold**: p < 0.05 (no multiple-comparison correction)."""
import json
import sys

from sstmerge.pipeline.aggregate import compare
from sstmerge.pipeline.results import table_columns

new = json.load(open(sys.argv[1]))
old = json.load(open(sys.argv[2]))
SHOWN = ["jailbreak_plain", "jailbreak_templated", "jailbreak_rephrased", "overrefusal", "qa_f1", "arithmetic_accuracy"]
columns = [c for c in table_columns() if c.name in SHOWN]
print("| model | " + " | ".join(SHOWN) + " |")
print("|---|" + "---|" * len(SHOWN))
for model in (m for m in new if m in old):
    tests = compare(new[model], old[model], columns)
    cells = []
    for c in SHOWN:
        if c not in tests:
            cells.append("n/a")
            continue
        a, b, p = new[model][c], old[model][c], tests[c]["p_value"]
        mark = "**" if p < 0.05 else ""
        cells.append(f"{mark}{100 * sum(a.values()) / len(a):.1f} vs {100 * sum(b.values()) / len(b):.1f} (p {p:.2f}){mark}")
    print(f"| {model} | " + " | ".join(cells) + " |")
