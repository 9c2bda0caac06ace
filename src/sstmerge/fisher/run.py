"""Fisher pass orchestration: fingerprint → cache folder → per-sample gradients (resumable) → statistics.

A sweep over k, residual_ratio, presets and weights reuses one pass: the key covers only what the
gradients depend on (base, utility adapters and coefficients, safety adapter, data, sampling, max_length).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from .._logging import quiet
from ..data.chat import encode_example
from ..data.jsonl import load_examples, resolve_data
from ..io.adapter import LoraAdapter
from ..io.atomic import atomic_write_text
from ..io.hashing import model_files, sha256_file
from ..io.models import BaseModelInfo, default_cache_dir
from .gradients import per_sample_gradients
from .point import flat_phi, load_fisher_point, module_layout
from .stats import FisherStats, compute_stats
from .store import GradientStore

log = logging.getLogger(__name__)

FISHER_FORMAT = 1


class FisherSettings(BaseModel):
    """What the Fisher pass computes on (CLI: ``sst-merge fisher``, and the merge flags of the same names)."""

    model_config = ConfigDict(extra="forbid")

    harmful_data: str = Field("bundled:harmful_train", description="JSONL of harmful prompts with refusal responses")
    benign_data: str = Field("bundled:benign_train", description="JSONL of benign task examples")
    max_samples: int | None = Field(64, ge=1, description="at most this many examples per data file (seeded sample)")
    seed: int = Field(0, description="sampling seed")
    max_length: int = Field(256, ge=2, description="max tokens per example (prompt cut from the left)")
    checkpoint_every: int = Field(16, ge=1, description="flush the gradient store every N examples (resume point)")


@dataclass
class FisherRun:
    """A finished (or cached) Fisher pass: statistics in RAM, per-sample gradients on disk."""

    stats: FisherStats
    store: GradientStore
    folder: Path
    meta: dict = field(default_factory=dict)


def _adapter_digest(adapter: LoraAdapter) -> str:
    if adapter.files:
        return ",".join(sha256_file(f) for f in adapter.files)
    h = hashlib.sha256()
    for m, lm in sorted(adapter.modules.items()):
        h.update(m.encode())
        h.update(lm.A.float().numpy().tobytes())
        h.update(lm.B.float().numpy().tobytes())
        h.update(repr(lm.scale).encode())
    return h.hexdigest()


def fisher_fingerprint(
    base: BaseModelInfo, utility: Sequence[LoraAdapter], coefficients: Sequence[float], safety: LoraAdapter,
    settings: FisherSettings,
) -> str:
    parts = {
        "format": FISHER_FORMAT,
        "base": [sha256_file(f) for f in model_files(base.path)],
        "utility": [[_adapter_digest(a), c] for a, c in zip(utility, coefficients)],
        "safety": _adapter_digest(safety),
        "harmful": sha256_file(resolve_data(settings.harmful_data)),
        "benign": sha256_file(resolve_data(settings.benign_data)),
        "settings": settings.model_dump(exclude={"checkpoint_every", "harmful_data", "benign_data"}),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def compute_fisher(
    base: BaseModelInfo,
    utility: Sequence[LoraAdapter],
    coefficients: Sequence[float],
    safety: LoraAdapter,
    settings: FisherSettings,
    cache_dir: str | Path | None = None,
) -> FisherRun:
    """Return the Fisher statistics for this setting, from the cache when present, resuming a partial pass."""
    t0 = time.perf_counter()
    key = fisher_fingerprint(base, utility, coefficients, safety, settings)
    folder = (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / "fisher" / key[:24]
    stats_path = folder / "stats.safetensors"
    layout = module_layout(safety)
    if stats_path.is_file() and (folder / "fisher_meta.json").is_file():
        meta = json.loads((folder / "fisher_meta.json").read_text())
        stats = FisherStats.load(stats_path)
        store = GradientStore.open(folder, meta["n_harm"] + meta["n_benign"], meta["n_harm"], layout)
        meta.update(cache_hit=True, load_seconds=time.perf_counter() - t0)
        log.info("Fisher statistics reused from cache %s", folder)
        return FisherRun(stats, store, folder, meta)

    harmful = load_examples(resolve_data(settings.harmful_data), max_samples=settings.max_samples, seed=settings.seed)
    benign = load_examples(resolve_data(settings.benign_data), max_samples=settings.max_samples, seed=settings.seed)
    t_load = time.perf_counter()
    model, tokenizer, params = load_fisher_point(base, utility, coefficients, safety)
    encoded = [encode_example(tokenizer, e, settings.max_length) for e in harmful + benign]
    store = GradientStore.open(folder, len(encoded), len(harmful), layout)
    start = store.done
    if start:
        log.info("resuming the Fisher pass at example %d of %d (%s)", start, len(encoded), folder)
    t_grad = time.perf_counter()
    bar = tqdm(total=len(encoded), initial=start, desc="per-sample gradients", unit="ex", disable=quiet())
    for i, grads in per_sample_gradients(model, params, encoded, start=start):
        store.write_row(i, grads)
        bar.update(1)
        if (i + 1) % settings.checkpoint_every == 0:
            store.checkpoint(i + 1)
    bar.close()
    store.checkpoint(len(encoded))
    t_stats = time.perf_counter()
    stats = compute_stats(store, flat_phi(safety))
    tmp = stats_path.with_name(".tmp-stats.safetensors")
    stats.save(tmp)
    tmp.replace(stats_path)
    meta = {
        "fingerprint": key,
        "folder": str(folder),
        "point": "base + Σ c_i ΔW_Ui (merged into the weights) + safety adapter (LoRA layers, its own scale)",
        "utility_coefficients": list(coefficients),
        "n_harm": len(harmful),
        "n_benign": len(benign),
        "harmful_data": str(resolve_data(settings.harmful_data)),
        "benign_data": str(resolve_data(settings.benign_data)),
        "settings": settings.model_dump(),
        "dim": store.dim,
        "resumed_from": start,
        "timings": {
            "load_model": t_grad - t_load,
            "gradients": t_stats - t_grad,
            "statistics": time.perf_counter() - t_stats,
        },
    }
    atomic_write_text(folder / "fisher_meta.json", json.dumps(meta, indent=2))
    meta.update(cache_hit=False)
    return FisherRun(stats, store, folder, meta)
