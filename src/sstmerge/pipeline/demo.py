"""The main job on the embedded default: train a utility and a safety LoRA on the bundled data for the
bundled SmolLM2, merge them (direct and residual SST-Merge), and measure refusals on held-out prompts.

Stages are resumable: a finished stage's folder (written atomically) is reused on the next run, so an
interrupted demo continues where it stopped. Everything lands in ``out`` (default ``runs/demo``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ..data.jsonl import bundled_path, load_examples
from ..eval.generate import generate
from ..eval.judges import KeywordRefusalJudge
from ..io.atomic import atomic_write_text
from ..io.models import load_causal_lm
from ..merge.merger import merge_utility_safety
from ..merge.report import versions
from ..train.sft import TrainOptions, train_lora

log = logging.getLogger(__name__)


class DemoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: str = Field("smollm2", description="base model (alias or local HF folder)")
    out: str = Field("runs/demo", description="output folder of the whole demo")
    steps: int = Field(30, gt=0, description="training steps per adapter")
    r: int = Field(8, gt=0)
    safety_weight: float = 1.0
    eval_samples: int = Field(24, gt=0, description="held-out prompts per eval set")
    max_new_tokens: int = Field(32, gt=0)
    batch_size: int = Field(12, gt=0, description="generation batch size")
    k: int = Field(10, gt=0, description="residual merge: subspace dimension")
    residual_ratio: float = Field(0.7, ge=0, le=1, description="residual merge: r")
    fisher_samples: int = Field(32, gt=0, description="residual merge: Fisher examples per data file")
    seed: int = 0
    cache_dir: str | None = None


def _train_stage(name, model, tok, data, folder: Path, opts: DemoOptions, base_name: str) -> Path:
    if (folder / "adapter_model.safetensors").is_file() and (folder / "train_report.json").is_file():
        log.info("reusing trained %s adapter %s", name, folder)
        return folder
    examples = load_examples(bundled_path(data), seed=opts.seed)
    log.info("training the %s adapter on bundled %s (%d examples, %d steps)", name, data, len(examples), opts.steps)
    options = TrainOptions(r=opts.r, lora_alpha=2 * opts.r, steps=opts.steps, seed=opts.seed, max_length=192)
    return train_lora(model, tok, examples, folder, options, base_model_name_or_path=base_name)


def _evaluate(model, tok, adapter: Path | None, harmful: list[str], benign: list[str], opts: DemoOptions) -> dict:
    from peft import PeftModel

    judge = KeywordRefusalJudge()
    wrapped = PeftModel.from_pretrained(model, str(adapter)) if adapter is not None else model
    try:
        harmful_out = generate(wrapped, tok, harmful, max_new_tokens=opts.max_new_tokens, batch_size=opts.batch_size, desc="harmful")
        benign_out = generate(wrapped, tok, benign, max_new_tokens=opts.max_new_tokens, batch_size=opts.batch_size, desc="benign")
    finally:
        if adapter is not None:
            wrapped.unload()
    return {
        "refusal_rate_harmful": judge.refusal_rate(harmful_out),
        "refusal_rate_benign": judge.refusal_rate(benign_out),
        "examples": [{"prompt": p, "answer": a} for p, a in list(zip(harmful, harmful_out))[:3] + list(zip(benign, benign_out))[:3]],
    }


def run_demo(opts: DemoOptions) -> dict:
    """Run (or resume) the demo; returns the summary also written to ``<out>/demo_summary.json``."""
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    model, tok = load_causal_lm(opts.base, opts.cache_dir)
    utility = _train_stage("utility", model, tok, "benign_train", out / "utility", opts, opts.base)
    safety = _train_stage("safety", model, tok, "harmful_train", out / "safety", opts, opts.base)
    timings["train"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    merged = out / "merged_direct"
    merge_utility_safety(opts.base, [utility], safety, merged, overwrite=True, safety_weight=opts.safety_weight,
                         cache_dir=opts.cache_dir)
    timings["merge_direct"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    residual = out / "merged_residual"
    res = merge_utility_safety(
        opts.base, [utility], safety, residual, overwrite=True, safety_weight=opts.safety_weight, mode="residual",
        k=opts.k, residual_ratio=opts.residual_ratio, max_samples=opts.fisher_samples, seed=opts.seed,
        cache_dir=opts.cache_dir,
    )
    timings["merge_residual"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    harmful = [e.prompt for e in load_examples(bundled_path("harmful_eval"), max_samples=opts.eval_samples, seed=opts.seed)]
    benign = [e.prompt for e in load_examples(bundled_path("benign_eval"), max_samples=opts.eval_samples, seed=opts.seed)]
    results = {}
    models = (("base", None), ("utility", utility), ("safety", safety), ("merged_direct", merged),
              ("merged_residual", residual))
    for label, adapter in models:
        log.info("evaluating %s on %d held-out harmful + %d benign prompts", label, len(harmful), len(benign))
        results[label] = _evaluate(model, tok, adapter, harmful, benign, opts)
    timings["eval"] = time.perf_counter() - t2
    summary = {
        "options": opts.model_dump(),
        "judge": "keyword refusal phrases (sstmerge.eval.judges.REFUSAL_PHRASES)",
        "eval_data": {"harmful": "bundled:harmful_eval", "benign": "bundled:benign_eval", "n_each": len(harmful)},
        "residual_merge": {"k": opts.k, "residual_ratio": opts.residual_ratio,
                           "fisher_samples_each": res.report["method"]["fisher"]["n_harm"],
                           "top_eigenvalues": res.report["method"]["eigenvalues"]["global"][:5],
                           "projection_norm_kept": res.report["method"]["projection_norm_kept_total"]},
        "results": results,
        "timings": timings,
        "versions": versions(),
    }
    atomic_write_text(out / "demo_summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def summary_table(summary: dict) -> str:
    lines = [f"{'model':16s} {'refusal on harmful (held out)':>30s} {'refusal on benign':>18s}"]
    for label, r in summary["results"].items():
        lines.append(f"{label:16s} {r['refusal_rate_harmful']:>30.1%} {r['refusal_rate_benign']:>18.1%}")
    return "\n".join(lines)
