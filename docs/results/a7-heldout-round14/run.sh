#!/bin/bash
# Train the adopted default A7 (R14a) per seed exactly as the default run does, then score it alone on the held-out sets.
set -e
cd /work/main && . .venv/bin/activate
for s in 0 1 2; do
  d=/work/heldout/A7-seed$s
  if [ ! -f $d/train_report.json ]; then
    python - <<PY
import logging, time
logging.basicConfig(level=logging.INFO)
from sstmerge.pipeline.config import load_experiment_config
from sstmerge.train.sft import train_from_files
cfg = load_experiment_config("default").for_seed($s)
r = cfg.adapters[cfg.safety]
print("train", r.train)
t=time.time()
train_from_files(cfg.base, r.data, "$d", r.train, max_samples=r.max_samples, cache_dir=cfg.cache_dir)
print("trained in", time.time()-t)
PY
  fi
  if [ ! -f /work/heldout/eval-seed$s.json ]; then
    /usr/bin/time -v sst-merge eval --adapter $d --settings-from default --suite jailbreak --suite rephrased --suite overrefusal --suite qa --suite arithmetic --out /work/heldout/eval-seed$s.json 2>&1 | grep -v "^\s" || true
  fi
  date
done
