"""One seed of this default's grid against the same seed of the round-9 default's grid, model by model: each column's
rate in both and the paired test on the same items (exact McNemar for 0/1 outcomes, else paired bootstrap).

    python docs/results/default/vs_round9.py docs/results/default/seed0/item_outcomes.json \
        docs/results/default-a7-round9/seed0/item_outcomes.json

prints the Markdown table kept (under a header) in seed0/vs-round9-seed0.md.

**bold**: p < 0.05 (no multiple-comparison correction)."""
import json
import sys

from sstmerge.eval.stats import paired_test

new = json.load(open(sys.argv[1]))
old = json.load(open(sys.argv[2]))
cols = ["jailbreak_plain", "jailbreak_templated", "jailbreak_rephrased", "overrefusal", "qa_f1", "arithmetic_accuracy"]
print("| model | " + " | ".join(cols) + " |")
print("|---|" + "---|" * len(cols))
for model in new:
    if model not in old:
        continue
    cells = []
    for c in cols:
        a, b = new[model].get(c), old[model].get(c)
        if not a or not b:
            cells.append("n/a"); continue
        keys = sorted(a)
        assert keys == sorted(b), (model, c)
        t = paired_test([a[k] for k in keys], [b[k] for k in keys])
        mark = "**" if t.p_value < 0.05 else ""
        cells.append(f"{mark}{100*sum(a.values())/len(a):.1f} vs {100*sum(b.values())/len(b):.1f} (p {t.p_value:.2f}){mark}")
    print(f"| {model} | " + " | ".join(cells) + " |")
