import shutil, sys, time, logging
from pathlib import Path
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
from sstmerge.pipeline.config import load_experiment_config
from sstmerge.pipeline.experiments import run_experiments
from sstmerge.pipeline.stages import short_hash  # noqa
over = {"references": [], "grid": [{"name": "direct", "mode": "direct", "variants": ["A5+A6+A7"]}], "seeds": [0]}
cfg = load_experiment_config("default", overrides=over)
c0 = cfg.for_seed(0)
r = c0.adapters["A7"]
out = Path("/work/preview/seed0")
dst = out / "adapters" / f"A7-{short_hash([c0.base, r.model_dump(mode='json')])}"
if not dst.exists():
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree("/work/heldout/A7-seed0", dst)
print("A7 at", dst)
t = time.time()
res = run_experiments(cfg, out)
print("done in", time.time() - t)
for row in res["rows"]:
    print(row["name"], {k: row.get(k) for k in ("jailbreak_plain", "jailbreak_templated", "jailbreak_rephrased", "overrefusal", "qa_f1", "arithmetic_accuracy", "safety", "utility")})
