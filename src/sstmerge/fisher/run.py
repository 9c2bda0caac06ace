"""Fisher pass orchestration: fingerprint → cache folder → per-sample gradients (batched, resumable,
sharded over ``torchrun`` processes) → statistics (sharded over modules) → summary.

A sweep over k, residual_ratio, presets and weights reuses one pass: the key covers only what the
gradients depend on (base, utility adapters and coefficients, safety adapter, data, sampling, max_length);
batch size, device and process count change only floating-point rounding and are not part of it.

Reliability: one process at a time computes a cache entry (a lock per key; others wait and then reuse it);
``fisher_meta.json`` is written last with a checksum and the size + SHA-256 of the statistics summary, and
every block read is CRC-checked (:mod:`.store`, :mod:`.stats`). A damaged entry is reported, the damaged
part discarded (gradient rows, or the statistics) and recomputed: :func:`discard_damaged`.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from .._logging import quiet
from ..errors import CacheCorruptError, ConfigError
from ..data.chat import encode_example
from ..data.jsonl import load_examples, resolve_data
from ..io.adapter import LoraAdapter
from ..io.hashing import model_files, sha256_file
from ..io.integrity import file_digest, read_checked_json, verify_file, write_checked_json
from ..io.locking import PathLock
from ..io.models import BaseModelInfo, default_cache_dir
from .distributed import Dist, init_from_env
from .gradients import iter_batched_gradients
from .point import flat_phi, load_fisher_point, module_layout
from .stats import FisherStats, StatsWriter, compute_stats
from .store import GradientStore

log = logging.getLogger(__name__)

FISHER_FORMAT = 3  # 2: batched pass, done-bitmap store, statistics folder; 3: checksums everywhere
META_NAME = "fisher_meta.json"
#: attempts at a damaged entry (rows, then statistics, then meta) before giving up with an error
MAX_REPAIRS = 3


class FisherSettings(BaseModel):
    """What the Fisher pass computes on (CLI: ``sst-merge fisher``; merge options nest it as ``options.fisher``,
    flat keys in :data:`sstmerge.merge.options.FISHER_KEYS`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    harmful_data: str = Field("bundled:harmful_train", description="JSONL of harmful prompts with refusal responses")
    benign_data: str = Field("bundled:benign_train", description="JSONL of benign task examples")
    max_samples: int | None = Field(64, ge=1, description="at most this many examples per data file (seeded sample)")
    seed: int = Field(0, description="sampling seed")
    max_length: int = Field(256, ge=2, description="max tokens per example (prompt cut from the left)")
    checkpoint_every: int = Field(16, ge=1, description="sync the gradient store every N examples (resume point)")
    batch_size: int = Field(8, ge=1, description="examples per forward/backward (per-sample gradients of a whole batch)")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the model runs (auto: cuda:LOCAL_RANK when CUDA is available)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="model weights' dtype during the pass (bfloat16 halves GPU memory for 8B models; "
        "gradients and statistics stay float32/float64)")


NOT_IN_KEY = {"checkpoint_every", "batch_size", "device", "harmful_data", "benign_data"}


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
        "settings": settings.model_dump(exclude=NOT_IN_KEY),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def fisher_cache_folder(key: str, cache_dir: str | Path | None) -> Path:
    return (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / "fisher" / key[:24]


def discard_damaged(folder: Path, exc: CacheCorruptError, layout: list[tuple[str, int, int]] | None = None) -> None:
    """Make a damaged cache entry recompute what it must: damaged gradient rows are marked not done (only they
    are recomputed), and the statistics and meta are removed (recomputed from the store)."""
    folder = Path(folder)
    if exc.rows and layout is not None:
        try:
            described = json.loads((folder / "store.json").read_text())
            store = GradientStore.open(folder, described["n_rows"], described["n_harm"], layout, create=False)
            store.forget_rows(exc.rows)
            store.close()
        except (CacheCorruptError, OSError, ValueError, KeyError):
            pass  # the store itself is damaged: it is rebuilt by the next open(create=True)
    (folder / "stats" / "summary.safetensors").unlink(missing_ok=True)
    (folder / META_NAME).unlink(missing_ok=True)


def _load_cached(folder: Path, layout) -> FisherRun | None:
    """The finished entry in ``folder``, verified; None when there is none; CacheCorruptError when damaged."""
    if not (folder / META_NAME).is_file():
        return None
    meta = read_checked_json(folder / META_NAME)
    try:
        verify_file(folder / "stats" / "summary.safetensors", meta["summary_digest"])
        n_rows, n_harm = meta["n_harm"] + meta["n_benign"], meta["n_harm"]
    except (KeyError, TypeError) as exc:
        raise CacheCorruptError(f"{folder / META_NAME}: incomplete meta ({exc!r})") from None
    stats = FisherStats.load(folder / "stats")
    store = GradientStore.open(folder, n_rows, n_harm, layout, create=False)
    return FisherRun(stats, store, folder, meta)


def _remove_stale_temps(folder: Path) -> None:
    """Temp files of killed runs inside the entry (call with the entry's lock held)."""
    for sub in (folder, folder / "stats"):
        for p in sub.glob(".tmp-*") if sub.is_dir() else ():
            p.unlink(missing_ok=True)
            log.warning("removed %s, left by an interrupted Fisher run", p)


def compute_fisher(
    base: BaseModelInfo,
    utility: Sequence[LoraAdapter],
    coefficients: Sequence[float],
    safety: LoraAdapter,
    settings: FisherSettings,
    cache_dir: str | Path | None = None,
    dist: Dist | None = None,
) -> FisherRun:
    """Return the Fisher statistics for this setting, from the cache when present, resuming a partial pass.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process calls this with the same arguments and the ``dist``
    of :func:`~sstmerge.fisher.distributed.init_from_env`; the work is sharded (examples for the gradients,
    modules for the statistics) and every process returns the result. One process (rank 0) holds the
    entry's lock; a concurrent run with the same key waits for it and then reuses the entry.
    """
    t0 = time.perf_counter()
    if dist is None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError(
                "this command runs in one process; for the multi-process Fisher pass run "
                "`torchrun --nproc-per-node N sst-merge fisher ...` first, then merge in one process (it reuses the cache)"
            )
        dist = init_from_env(settings.device)
    key = fisher_fingerprint(base, utility, coefficients, safety, settings)
    folder = fisher_cache_folder(key, cache_dir)
    layout = module_layout(safety)
    lock = PathLock(folder.with_name(f".{folder.name}.sstmerge-lock"), what=f"Fisher cache entry {folder}",
                    timeout=None)
    if dist.is_main:
        lock.acquire()
    try:
        if dist.is_main:
            _remove_stale_temps(folder)
        dist.barrier()
        for attempt in range(1, MAX_REPAIRS + 2):
            try:
                return _compute_or_load(base, utility, coefficients, safety, settings, key, folder, layout, dist, t0)
            except CacheCorruptError as exc:
                if dist.active or attempt > MAX_REPAIRS:
                    raise CacheCorruptError(f"{exc}. The Fisher cache entry {folder} is damaged: delete that folder "
                                            "and run again") from None
                log.warning("Fisher cache %s is damaged (%s): discarding the damaged part and recomputing", folder, exc)
                discard_damaged(folder, exc, layout)
        raise AssertionError("unreachable")
    finally:
        lock.release()


def _compute_or_load(base, utility, coefficients, safety, settings: FisherSettings, key: str, folder: Path, layout,
                     dist: Dist, t0: float) -> FisherRun:
    stats_dir = folder / "stats"
    cached, damaged = None, None
    if dist.is_main:
        try:
            cached = _load_cached(folder, layout)
        except CacheCorruptError as exc:
            damaged = exc
    # rank 0 decides for everyone (0: compute, 1: reuse, 2: damaged), so no rank waits alone in a collective
    status = dist.all_reduce_max(2 if damaged is not None else int(cached is not None))
    if status == 2:
        raise damaged or CacheCorruptError(f"{folder}: damaged (reported by rank 0)")
    if status == 1:
        if cached is None:
            cached = _load_cached(folder, layout)
        cached.meta.update(cache_hit=True, load_seconds=time.perf_counter() - t0)
        log.info("Fisher statistics reused from cache %s", folder)
        return cached

    harmful = load_examples(resolve_data(settings.harmful_data), max_samples=settings.max_samples, seed=settings.seed)
    benign = load_examples(resolve_data(settings.benign_data), max_samples=settings.max_samples, seed=settings.seed)
    t_load = time.perf_counter()
    model, tokenizer, layers = load_fisher_point(base, utility, coefficients, safety, device=dist.device,
                                                 dtype=settings.dtype)
    encoded = [encode_example(tokenizer, e, settings.max_length) for e in harmful + benign]
    n = len(encoded)
    if dist.is_main:
        store = GradientStore.open(folder, n, len(harmful), layout, create=True)
    dist.barrier()
    if not dist.is_main:
        store = GradientStore.open(folder, n, len(harmful), layout, create=False)
    done = store.done_mask()
    resumed_from = int(done.sum())
    mine = [i for i in range(n) if i % dist.world_size == dist.rank and not done[i]]
    if resumed_from:
        log.info("resuming the Fisher pass: %d of %d examples already done (%s)", resumed_from, n, folder)
    t_grad = time.perf_counter()
    n_tokens = sum(len(encoded[i]["input_ids"]) for i in mine)
    bar = tqdm(total=len(mine), desc="per-sample gradients" + (f" [rank {dist.rank}]" if dist.active else ""),
               unit="ex", disable=quiet() or not dist.is_main)
    pending: list[int] = []
    for rows, grads in iter_batched_gradients(model, layers, encoded, mine, settings.batch_size):
        store.write_rows(rows, grads)
        pending += rows
        bar.update(len(rows))
        if len(pending) >= settings.checkpoint_every:
            store.mark_done(pending)
            pending = []
    store.mark_done(pending)
    bar.close()
    del model, layers
    gc.collect()
    dist.barrier()
    t_stats = time.perf_counter()
    if dist.is_main:
        StatsWriter(stats_dir, n, layout, create=True)
    dist.barrier()
    my_modules = [m for j, (m, _, _) in enumerate(layout) if j % dist.world_size == dist.rank]
    gram_total, G_phi, _ = compute_stats(store, flat_phi(safety), stats_dir, modules=my_modules, create=False)
    gram_total, G_phi = dist.all_reduce_sum(gram_total), dist.all_reduce_sum(G_phi)
    t_end = time.perf_counter()
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
        "resumed_from": resumed_from,
        "world_size": dist.world_size,
        "device": dist.device,
        "timings": {
            "load_model": t_grad - t_load,
            "gradients": t_stats - t_grad,
            "statistics": t_end - t_stats,
        },
        "gradient_tokens_rank0": n_tokens,
    }
    if dist.is_main:
        StatsWriter(stats_dir, n, layout, create=False).finish(len(harmful), gram_total, G_phi)
        meta["summary_digest"] = file_digest(stats_dir / "summary.safetensors")
        write_checked_json(folder / META_NAME, meta)  # last: marks the entry complete
    dist.barrier()
    meta.update(cache_hit=False)
    return FisherRun(FisherStats.load(stats_dir), store, folder, meta)
