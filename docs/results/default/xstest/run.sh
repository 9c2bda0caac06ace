#!/bin/bash
# The default grid's A5+A6+A7 merges, A7 alone and the base model on XSTest v2 (a public set nobody here wrote),
# every seed, with the grid's evaluation settings. Measures; chooses nothing.
#   XSTEST=/path/to/xstest_prompts.csv RUNS=runs bash docs/results/default/xstest/run.sh
set -euo pipefail
XSTEST=${XSTEST:?path to XSTest v2 xstest_prompts.csv}
RUNS=${RUNS:-runs}
OUT=${OUT:-docs/results/default/xstest}
ev() {  # ev OUTFILE [ADAPTER]
  local out=$1; shift
  [ -s "$out" ] && { echo "have $out"; return; }
  mkdir -p "$(dirname "$out")"
  sst-merge eval ${1:+--adapter "$1"} --settings-from default --suite jailbreak --suite overrefusal \
    --data jailbreak="$XSTEST" --data overrefusal="$XSTEST" --out "$out"
}
ev "$OUT/base.json"
for s in 0 1 2; do
  ev "$OUT/seed$s/A7 alone.json" "$(ls -d "$RUNS/seed$s/adapters/"A7-*)"
  for m in direct protect complement residual ties dare_ties safe_lora safemerge; do
    ev "$OUT/seed$s/A5+A6+A7__$m.json" "$(ls -d "$RUNS/seed$s/merges/A5+A6+A7__$m-"*)"
  done
done
