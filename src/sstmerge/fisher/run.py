"""Fisher pass orchestration: fingerprint → cache folder → per-sample gradients (batched, resumable,
sharded over ``torchrun`` processes) → statistics (sharded over modules) → summary.

Two stores (``FisherSettings.store``, CLI ``--fisher-store``):

- ``full``: every per-sample gradient on disk (N × D, float32 or bfloat16), read back for the statistics and
  for the projection ``Gᵀβ``. Exact; N·D·4 bytes (336 GB for an 8B model's rank-16 adapter and 2,000 samples).
- ``sketch``: only count sketches of them (N × m per module, :func:`~sstmerge.linalg.sketch.sketch_module`),
  the exact ``G φ`` per sample and the diagonal Fisher as running sums (:mod:`.accumulate`). The Gram is
  estimated from the sketches (error estimated from two independent halves, reported); ``Gᵀβ`` is computed
  exactly by a second, β-weighted backward pass over the same data (:meth:`FisherRun.combine`), resumable
  and cached per β. ``auto`` (the default) takes ``full`` while that store would be at most
  :data:`AUTO_FULL_MAX_BYTES`, ``sketch`` above.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .._logging import quiet
from ..errors import CacheCorruptError, ConfigError, FisherError
from ..data.chat import encode_example
from ..data.jsonl import load_examples, resolve_data
from ..io.adapter import LoraAdapter
from ..io.hashing import model_files, sha256_file
from ..io.integrity import crc32, file_digest, read_checked_json, verify_file, write_checked_json
from ..io.locking import PathLock
from ..io.models import BaseModelInfo, default_cache_dir
from ..linalg.projection import project_block
from ..linalg.sketch import gram_error_from_halves, module_sketch_width, sketch_halves, sketch_module
from .accumulate import RowAccumulator
from .distributed import Dist, init_from_env
from .gradients import iter_batched_gradients, iter_weighted_gradient_sums
from .point import flat_phi, load_fisher_point, module_layout
from .stats import FisherStats, StatsWriter, compute_stats
from .store import GradientStore

log = logging.getLogger(__name__)

FISHER_FORMAT = 3  # 2: batched pass, done-bitmap store, statistics folder; 3: checksums everywhere
META_NAME = "fisher_meta.json"
#: attempts at a damaged entry (rows, then statistics, then meta) before giving up with an error
MAX_REPAIRS = 3
#: ``store: auto`` keeps every per-sample gradient while that takes at most this many bytes (float32)
AUTO_FULL_MAX_BYTES = 8 * 2**30
#: a sketched Gram whose estimated relative error is above this is reported with a warning
SKETCH_ERROR_WARN = 0.02


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
    store: Literal["auto", "full", "sketch"] = Field(
        "auto", description="full: keep every per-sample gradient on disk (N × D; exact); sketch: keep count "
        "sketches of them (N × m per module; the Gram is estimated, with its error reported, and the projection "
        "takes a second, weighted pass over the data); auto: full up to 8 GiB of gradients, else sketch")
    sketch_dim: int = Field(2048, ge=2, description="sketch store: columns per module (m); a module with at most m "
                            "coordinates is kept exactly. The Gram's error falls as 1/sqrt(m × modules)")
    sketch_seed: int = Field(0, description="sketch store: seed of the hash functions")
    store_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="element type of the store on disk; auto: float32 for the full store (exact), "
        "bfloat16 for the sketch store (half the disk, so twice the columns for the same bytes; its rounding is "
        "far below the sketch's own error). bfloat16 halves the full store too, at a small measured cost "
        "(docs/performance.md)")


NOT_IN_KEY = {"checkpoint_every", "batch_size", "device", "harmful_data", "benign_data"}
#: store settings enter the key only as resolved and when they change the result (old entries keep their key)
STORE_FIELDS = {"store", "sketch_dim", "sketch_seed", "store_dtype"}


def resolve_store(settings: FisherSettings, n_rows: int, dim: int) -> str:
    """The store a pass uses: ``settings.store``, or for ``auto`` ``full`` while N × D float32 fits
    :data:`AUTO_FULL_MAX_BYTES` and ``sketch`` above."""
    if settings.store != "auto":
        return settings.store
    return "full" if n_rows * dim * 4 <= AUTO_FULL_MAX_BYTES else "sketch"


def store_dtype(settings: FisherSettings, kind: str) -> str:
    """The element type the store of ``kind`` holds (``auto``: float32 full, bfloat16 sketch)."""
    if settings.store_dtype != "auto":
        return settings.store_dtype
    return "bfloat16" if kind == "sketch" else "float32"


def store_key(settings: FisherSettings, kind: str) -> dict:
    """What of the store settings changes the statistics (part of the cache key)."""
    dtype = store_dtype(settings, kind)
    if kind == "sketch":
        return {"store": "sketch", "sketch_dim": settings.sketch_dim, "sketch_seed": settings.sketch_seed,
                "store_dtype": dtype}
    return {"store_dtype": dtype} if dtype != "float32" else {}


def sketch_layout(layout: Sequence[tuple[str, int, int]], m: int) -> list[tuple[str, int, int]]:
    """Column layout of the sketch store: ``(module, width, 0)`` per module."""
    return [(name, module_sketch_width(na + nb, m), 0) for name, na, nb in layout]


@dataclass
class FisherRun:
    """A finished (or cached) Fisher pass: statistics (summary in RAM, blocks read lazily) and the store on disk:
    the per-sample gradients (``kind == "full"``) or their sketches (``"sketch"``, with ``backward`` the second,
    β-weighted pass)."""

    stats: FisherStats
    store: GradientStore
    folder: Path
    meta: dict = field(default_factory=dict)
    kind: str = "full"
    sketch_dim: int = 0
    sketch_seed: int = 0
    backward: Callable[[Mapping[str, np.ndarray]], dict[str, torch.Tensor]] | None = None

    def combine(self, betas: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """``{m: G_mᵀ β_m}`` (D_m,) float64 for the modules in ``betas`` (each β_m (N,)): from the store's column
        chunks (full), or by the weighted backward pass (sketch; exact, no gradient kept)."""
        if self.kind == "sketch":
            if self.backward is None:
                raise FisherError("this sketched Fisher run has no model attached for the weighted pass")
            return self.backward(betas)
        return {m: torch.cat([project_block(C, beta) for _, _, C in self.store.iter_column_chunks(m)])
                for m, beta in betas.items()}

    def G_times(self, module: str, x: torch.Tensor) -> np.ndarray:
        """``G_m x`` (N,) for a vector x of module m's parameters: exact from the full store; from the sketches
        ``(G_m Sᵀ)(S x)`` (unbiased, the Gram's error) in the sketch store."""
        if self.kind == "sketch":
            Sx = sketch_module(x.reshape(1, -1).float(), module, self.sketch_dim, self.sketch_seed)  # (1, w)
            return self.store.block(module).double().matmul(Sx[0].double()).numpy()
        out = np.zeros(self.stats.n_harm + self.stats.n_benign)
        for lo, hi, C in self.store.iter_column_chunks(module):
            out += (C.double() @ x[lo:hi].double()).numpy()
        return out

    def gram_times(self, module: str, beta: np.ndarray) -> np.ndarray:
        """``G_m G_mᵀ β`` (N,): the module's Gram (exact, or sketched: ``(G_m Sᵀ)((G_m Sᵀ)ᵀ β)``, no N × N formed)."""
        if self.kind == "sketch":
            SG = self.store.block(module).double()  # (N, w), CRC-checked
            return (SG @ (SG.T @ torch.as_tensor(beta, dtype=torch.float64))).numpy()
        return self.stats.gram[module] @ beta

    def close(self) -> None:
        self.store.close()


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
    settings: FisherSettings, kind: str = "full",
) -> str:
    """The cache key: what the statistics depend on (``kind``: the resolved store, :func:`resolve_store`)."""
    parts = {
        "format": FISHER_FORMAT,
        "base": [sha256_file(f) for f in model_files(base.path)],
        "utility": [[_adapter_digest(a), c] for a, c in zip(utility, coefficients)],
        "safety": _adapter_digest(safety),
        "harmful": sha256_file(resolve_data(settings.harmful_data)),
        "benign": sha256_file(resolve_data(settings.benign_data)),
        "settings": {**settings.model_dump(exclude=NOT_IN_KEY | STORE_FIELDS), **store_key(settings, kind)},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def fisher_cache_folder(key: str, cache_dir: str | Path | None) -> Path:
    return (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / "fisher" / key[:24]


def discard_damaged(folder: Path, exc: CacheCorruptError, layout: list[tuple[str, int, int]] | None = None) -> None:
    """Make a damaged cache entry recompute what it must: damaged store rows (of the gradient or the sketch
    store) are marked not done (only they are recomputed), and the statistics and meta are removed (recomputed
    from the store). ``layout`` is unused (each store describes itself in its ``store.json``)."""
    folder = Path(folder)
    for sub in (folder, folder / "sketch"):
        if not exc.rows or not (sub / "store.json").is_file():
            continue
        try:
            described = json.loads((sub / "store.json").read_text())
            store = GradientStore.open(sub, described["n_rows"], described["n_harm"], described["layout"],
                                       create=False, dtype=described.get("dtype", "float32"))
            store.forget_rows([r for r in exc.rows if r < described["n_rows"]])
            store.close()
        except (CacheCorruptError, FisherError, OSError, ValueError, KeyError, TypeError):
            pass  # the store itself is damaged: it is rebuilt by the next open(create=True)
    (folder / "stats" / "summary.safetensors").unlink(missing_ok=True)
    (folder / META_NAME).unlink(missing_ok=True)


class SketchGrams(Mapping):
    """``{module: (G_m Sᵀ)(G_m Sᵀ)ᵀ}`` (N, N) float64, computed from the sketch store when read (checksummed)."""

    def __init__(self, store: GradientStore, modules: Sequence[str]) -> None:
        self.store, self.modules = store, list(modules)

    def __getitem__(self, module: str) -> np.ndarray:
        if module not in self.modules:
            raise KeyError(module)
        SG = self.store.block(module).double()  # (N, w), CRC-checked
        return (SG @ SG.T).numpy()

    def __iter__(self):
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)


def _open_store(folder: Path, kind: str, settings: FisherSettings, n_rows: int, n_harm: int, layout, *,
                create: bool) -> GradientStore:
    if kind == "sketch":
        return GradientStore.open(folder / "sketch", n_rows, n_harm, sketch_layout(layout, settings.sketch_dim),
                                  create=create, dtype=store_dtype(settings, kind))
    return GradientStore.open(folder, n_rows, n_harm, layout, create=create, dtype=store_dtype(settings, kind))


def _load_stats(folder: Path, kind: str, store: GradientStore, layout) -> FisherStats:
    gram = SketchGrams(store, [m for m, _, _ in layout]) if kind == "sketch" else None
    return FisherStats.load(folder / "stats", gram=gram)


def _load_cached(folder: Path, layout, kind: str = "full", settings: FisherSettings | None = None) -> FisherRun | None:
    """The finished entry in ``folder``, verified; None when there is none; CacheCorruptError when damaged."""
    if not (folder / META_NAME).is_file():
        return None
    settings = settings or FisherSettings()
    meta = read_checked_json(folder / META_NAME)
    try:
        verify_file(folder / "stats" / "summary.safetensors", meta["summary_digest"])
        n_rows, n_harm = meta["n_harm"] + meta["n_benign"], meta["n_harm"]
    except (KeyError, TypeError) as exc:
        raise CacheCorruptError(f"{folder / META_NAME}: incomplete meta ({exc!r})") from None
    store = _open_store(folder, kind, settings, n_rows, n_harm, layout, create=False)
    return FisherRun(_load_stats(folder, kind, store, layout), store, folder, meta, kind=kind,
                     sketch_dim=settings.sketch_dim, sketch_seed=settings.sketch_seed)


def _remove_stale_temps(folder: Path) -> None:
    """Temp files of killed runs inside the entry (call with the entry's lock held)."""
    for p in folder.rglob(".tmp-*") if folder.is_dir() else ():
        p.unlink(missing_ok=True)
        log.warning("removed %s, left by an interrupted Fisher run", p)


def _data_digests(settings: FisherSettings) -> dict[str, str]:
    return {"harmful_data": sha256_file(resolve_data(settings.harmful_data)),
            "benign_data": sha256_file(resolve_data(settings.benign_data))}


def _examples(settings: FisherSettings) -> tuple[list, list]:
    harmful = load_examples(resolve_data(settings.harmful_data), max_samples=settings.max_samples, seed=settings.seed)
    benign = load_examples(resolve_data(settings.benign_data), max_samples=settings.max_samples, seed=settings.seed)
    return harmful, benign


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
    layout = module_layout(safety)
    harmful, benign = _examples(settings)
    kind = resolve_store(settings, len(harmful) + len(benign), sum(a + b for _, a, b in layout))
    key = fisher_fingerprint(base, utility, coefficients, safety, settings, kind)
    folder = fisher_cache_folder(key, cache_dir)
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
                run = _compute_or_load(base, utility, coefficients, safety, settings, key, folder, layout, dist, t0,
                                       kind)
                break
            except CacheCorruptError as exc:
                if dist.active or attempt > MAX_REPAIRS:
                    raise CacheCorruptError(f"{exc}. The Fisher cache entry {folder} is damaged: delete that folder "
                                            "and run again") from None
                log.warning("Fisher cache %s is damaged (%s): discarding the damaged part and recomputing", folder, exc)
                discard_damaged(folder, exc, layout)
    finally:
        lock.release()
    if kind == "sketch":
        data_digests = _data_digests(settings)  # the examples the first pass saw (the key has the same digests)

        def backward(betas: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
            return weighted_pass(base, utility, coefficients, safety, settings, folder, betas, dist=dist,
                                 data_digests=data_digests)
        run.backward = backward
    return run


def _compute_or_load(base, utility, coefficients, safety, settings: FisherSettings, key: str, folder: Path, layout,
                     dist: Dist, t0: float, kind: str = "full") -> FisherRun:
    stats_dir = folder / "stats"
    cached, damaged = None, None
    if dist.is_main:
        try:
            cached = _load_cached(folder, layout, kind, settings)
        except CacheCorruptError as exc:
            damaged = exc
    # rank 0 decides for everyone (0: compute, 1: reuse, 2: damaged), so no rank waits alone in a collective
    status = dist.all_reduce_max(2 if damaged is not None else int(cached is not None))
    if status == 2:
        raise damaged or CacheCorruptError(f"{folder}: damaged (reported by rank 0)")
    if status == 1:
        if cached is None:
            cached = _load_cached(folder, layout, kind, settings)
        cached.meta.update(cache_hit=True, load_seconds=time.perf_counter() - t0)
        log.info("Fisher statistics reused from cache %s", folder)
        return cached

    harmful, benign = _examples(settings)
    t_load = time.perf_counter()
    model, tokenizer, layers = load_fisher_point(base, utility, coefficients, safety, device=dist.device,
                                                 dtype=settings.dtype)
    encoded = [encode_example(tokenizer, e, settings.max_length) for e in harmful + benign]
    n, n_harm = len(encoded), len(harmful)
    if dist.is_main:
        store = _open_store(folder, kind, settings, n, n_harm, layout, create=True)
    dist.barrier()
    if not dist.is_main:
        store = _open_store(folder, kind, settings, n, n_harm, layout, create=False)
    phi = flat_phi(safety)
    sums = RowAccumulator(folder / "sums", n, _sum_sizes(layout, n)) if kind == "sketch" else None
    done = store.done_mask() if sums is None else store.done_mask() & sums.covered
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
        if kind == "sketch":
            store.write_rows(rows, {m: sketch_module(grads[m].float(), m, settings.sketch_dim, settings.sketch_seed)
                                    for m, _, _ in layout})
            _add_sums(sums, rows, grads, phi, n_harm, layout)
        else:
            store.write_rows(rows, grads)
        pending += rows
        bar.update(len(rows))
        if len(pending) >= settings.checkpoint_every:
            store.mark_done(pending)
            if sums is not None:
                sums.checkpoint()
            pending = []
    store.mark_done(pending)
    if sums is not None:
        sums.checkpoint()
    bar.close()
    del model, layers
    gc.collect()
    dist.barrier()
    t_stats = time.perf_counter()
    extra: dict = {}
    if kind == "sketch":
        if dist.is_main:
            gram_total, G_phi, extra = _sketch_stats(store, folder, layout, n, n_harm, settings)
    else:
        if dist.is_main:
            StatsWriter(stats_dir, n, layout, create=True)
        dist.barrier()
        my_modules = [m for j, (m, _, _) in enumerate(layout) if j % dist.world_size == dist.rank]
        gram_total, G_phi, _ = compute_stats(store, phi, stats_dir, modules=my_modules, create=False)
        gram_total, G_phi = dist.all_reduce_sum(gram_total), dist.all_reduce_sum(G_phi)
    t_end = time.perf_counter()
    meta = {
        "fingerprint": key,
        "folder": str(folder),
        "point": "base + Σ c_i ΔW_Ui (merged into the weights) + safety adapter (LoRA layers, its own scale)",
        "utility_coefficients": list(coefficients),
        "n_harm": n_harm,
        "n_benign": len(benign),
        "harmful_data": str(resolve_data(settings.harmful_data)),
        "benign_data": str(resolve_data(settings.benign_data)),
        "settings": settings.model_dump(),
        "dim": sum(a + b for _, a, b in layout),
        "store": {"kind": kind, **store_key(settings, kind), "dtype": store.dtype, "columns": store.dim,
                  "disk_bytes": store.path.stat().st_size, **extra},
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
        if kind == "full":
            StatsWriter(stats_dir, n, layout, create=False).finish(n_harm, gram_total, G_phi)
        meta["summary_digest"] = file_digest(stats_dir / "summary.safetensors")
        write_checked_json(folder / META_NAME, meta)  # last: marks the entry complete
    dist.barrier()
    meta.update(cache_hit=False)
    return FisherRun(_load_stats(folder, kind, store, layout), store, folder, meta, kind=kind,
                     sketch_dim=settings.sketch_dim, sketch_seed=settings.sketch_seed)


# ---------------------------------------------------------------------------------------- the sketch store
def _sum_sizes(layout, n: int) -> dict[str, int]:
    """What the sketch pass sums over examples: the diagonal Fisher (harmful, benign; D each) and G φ (M × N,
    example i's row of module j at ``j·N + i``: exact per sample, float64, whatever the store's dtype)."""
    dim = sum(a + b for _, a, b in layout)
    return {"diag_harm": dim, "diag_benign": dim, "G_phi": len(layout) * n}


def _add_sums(sums: RowAccumulator, rows: list[int], grads: Mapping[str, torch.Tensor], phi, n_harm: int,
              layout) -> None:
    """Add the batch's rows not yet held: ``g_i ∘ g_i`` (split harmful / benign) and ``g_i,m · φ_m``."""
    keep = [b for b, i in enumerate(rows) if not sums.covered[i]]
    if not keep:
        return
    n, dim = sums.n_rows, sum(a + b for _, a, b in layout)
    harm = torch.tensor([rows[b] < n_harm for b in keep])
    diag_h, diag_b = torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dtype=torch.float64)
    G_phi = torch.zeros(len(layout), n, dtype=torch.float64)  # (M, N), non-zero at the kept rows only
    idx = torch.tensor([rows[b] for b in keep])
    off = 0
    for j, (m, na, nb) in enumerate(layout):  # one module at a time: (b, D_m) float64, never (b, D)
        g = grads[m][keep].double()
        sq = g.square()
        diag_h[off : off + na + nb] = sq[harm.to(sq.device)].sum(0).cpu()
        diag_b[off : off + na + nb] = sq[~harm.to(sq.device)].sum(0).cpu()
        G_phi[j, idx] = (g @ phi[m].to(g.device)).cpu()
        off += na + nb
    sums.add([rows[b] for b in keep], {"diag_harm": diag_h, "diag_benign": diag_b, "G_phi": G_phi.reshape(-1)})


def _sketch_stats(store: GradientStore, folder: Path, layout, n: int, n_harm: int,
                  settings: FisherSettings) -> tuple[np.ndarray, np.ndarray, dict]:
    """Write the statistics folder of a sketch store (the per-module Grams stay in the store, computed when read)
    and return ``(gram_total, G_phi (M, N), error report)``."""
    covered, sums = RowAccumulator.combined(folder / "sums", n, _sum_sizes(layout, n))
    if not covered.all():
        raise CacheCorruptError(f"{folder / 'sums'}: the diagonal Fisher and G φ miss rows "
                                f"{np.flatnonzero(~covered)[:10].tolist()}", rows=np.flatnonzero(~covered).tolist())
    diag_h = (sums["diag_harm"] / n_harm).numpy()
    diag_b = (sums["diag_benign"] / (n - n_harm)).numpy()
    writer = StatsWriter(folder / "stats", n, layout, create=True, with_gram=False)
    gram_total, K_1, K_2 = np.zeros((n, n)), np.zeros((n, n)), np.zeros((n, n))
    module_errors, exact, off = {}, 0, 0
    for m, na, nb in tqdm(layout, desc="sketched Gram", unit="module", disable=quiet(), leave=False):
        SG = store.block(m).double()  # (N, w_m), CRC-checked
        halves = sketch_halves(SG, na + nb, settings.sketch_dim)
        if halves is None:  # kept exactly
            exact += 1
            K = (SG @ SG.T).numpy()
            k1 = k2 = K
        else:  # the stored Gram is the halves' mean: SG SGᵀ = (K_1 + K_2) / 2
            k1, k2 = ((h @ h.T).numpy() for h in halves)
            K = (k1 + k2) / 2
            module_errors[m] = gram_error_from_halves(torch.from_numpy(k1), torch.from_numpy(k2))
        gram_total += K
        K_1 += k1
        K_2 += k2
        writer.write_diag(m, diag_h[off : off + na + nb], diag_b[off : off + na + nb])
        off += na + nb
    G_phi = sums["G_phi"].reshape(len(layout), n).numpy()  # (M, N)
    writer.finish(n_harm, gram_total, np.ascontiguousarray(G_phi))
    errors = sorted(module_errors.values())
    report = {
        "gram_rel_error_estimate": gram_error_from_halves(torch.from_numpy(K_1), torch.from_numpy(K_2)),
        "module_gram_rel_error_estimate": {
            "median": errors[len(errors) // 2] if errors else 0.0, "max": errors[-1] if errors else 0.0},
        "exact_modules": exact,
        "sketched_modules": len(module_errors),
        "error_estimate": "two independent half-sketches per module: ‖K_1 − K_2‖_F / (2 ‖(K_1 + K_2)/2‖_F)",
    }
    log.info("sketched Gram: %d columns for D = %d; estimated relative error %.2e (global Gram)",
             store.dim, sum(a + b for _, a, b in layout), report["gram_rel_error_estimate"])
    if report["gram_rel_error_estimate"] > SKETCH_ERROR_WARN:
        log.warning("the sketched Gram's estimated relative error is %.1f %% (above %.0f %%): the top generalized "
                    "eigenvectors can move far more than that (docs/performance.md, 'Fisher store'). Raise "
                    "--sketch-dim (now %d; the error falls as 1/sqrt(m)) or use --fisher-store full",
                    100 * report["gram_rel_error_estimate"], 100 * SKETCH_ERROR_WARN, settings.sketch_dim)
    return gram_total, G_phi, report


def _beta_digest(betas: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for m in sorted(betas):
        h.update(m.encode())
        h.update(np.ascontiguousarray(betas[m], dtype=np.float64).tobytes())
    return h.hexdigest()


def weighted_pass(
    base: BaseModelInfo, utility: Sequence[LoraAdapter], coefficients: Sequence[float], safety: LoraAdapter,
    settings: FisherSettings, folder: Path, betas: Mapping[str, np.ndarray], *, dist: Dist | None = None,
    data_digests: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """``{m: G_mᵀ β_m}`` (D_m,) float64 by one β-weighted backward pass over the Fisher pass's examples
    (:func:`~sstmerge.fisher.gradients.iter_weighted_gradient_sums`): exact, no per-sample gradient kept.

    Resumable and cached in ``folder/weighted/<digest of β>``: batch sums are checkpointed with their rows
    (:class:`~sstmerge.fisher.accumulate.RowAccumulator`), the finished result is saved and reused by any later
    merge asking the same β. Under ``torchrun`` the rows are sharded and every process gets the result.
    ``data_digests`` (``{"harmful_data": sha256, "benign_data": sha256}`` of the files the first pass read): a
    data file changed since then is an error, since the pass must run over the same examples.
    """
    dist = dist or init_from_env(settings.device)
    layout = module_layout(safety)
    cols = {m: (np.asarray(betas[m]).shape[1] if np.asarray(betas[m]).ndim == 2 else 0) for m in betas}
    sizes = {m: (na + nb) * max(cols[m], 1) for m, na, nb in layout if m in betas}  # flat: p × D_m for an (N, p) β
    digest = _beta_digest(betas)
    wdir = folder / "weighted" / digest[:24]
    result = wdir / "result.safetensors"
    if result.is_file():
        try:
            with safe_open(str(result), framework="pt") as fh:
                crcs = json.loads((fh.metadata() or {})["crc32"])
                out = {k: fh.get_tensor(k) for k in fh.keys()}
            if set(out) != set(sizes) or any(out[m].shape != (n,) or crc32(out[m].numpy()) != crcs[m]
                                             for m, n in sizes.items()):
                raise CacheCorruptError("shapes or checksums do not match")
            log.info("weighted pass G^T beta reused from %s", wdir)
            return _unflatten({m: out[m].to(torch.float64) for m in betas}, cols)
        except Exception as exc:  # a damaged result is rebuilt (from its parts where they are whole)
            log.warning("%s is damaged (%s): rebuilding the weighted pass's result", result, exc)
            result.unlink(missing_ok=True)
    if data_digests is not None:
        for name, digest in _data_digests(settings).items():
            if digest != data_digests[name]:
                raise FisherError(f"weighted pass: {name} {resolve_data(getattr(settings, name))} changed since the "
                                  "Fisher pass read it; the pass needs the same examples. Restore the file, or run "
                                  "the merge again (a new Fisher entry is computed for the new data)")
    harmful, benign = _examples(settings)
    n = len(harmful) + len(benign)
    beta_t = {m: torch.as_tensor(np.asarray(betas[m], dtype=np.float64)) for m in sizes}
    for m, b in beta_t.items():
        if b.shape[0] != n or b.ndim > 2:
            raise FisherError(f"weighted pass: β of module {m} has shape {tuple(b.shape)}, expected ({n},) or ({n}, p)")
    acc = RowAccumulator(wdir, n, sizes)
    nonzero = (torch.stack([(b != 0).reshape(n, -1).any(1) for b in beta_t.values()]).any(0).numpy() if beta_t
               else np.zeros(n, bool))
    todo = [i for i in range(n) if nonzero[i] and not acc.covered[i] and i % dist.world_size == dist.rank]
    if todo:
        model, tokenizer, layers = load_fisher_point(base, utility, coefficients, safety, device=dist.device,
                                                     dtype=settings.dtype)
        layers = {m: layers[m] for m in sizes}
        encoded = [encode_example(tokenizer, e, settings.max_length) for e in harmful + benign]
        bar = tqdm(total=len(todo), desc="weighted pass Gᵀβ", unit="ex", disable=quiet() or not dist.is_main)
        since = 0
        for rows, sums in iter_weighted_gradient_sums(model, layers, encoded, beta_t, todo, settings.batch_size):
            acc.add(rows, {m: t.reshape(-1) for m, t in sums.items()})
            since += len(rows)
            bar.update(len(rows))
            if since >= settings.checkpoint_every:
                acc.checkpoint()
                since = 0
        acc.checkpoint()
        bar.close()
        del model, layers
        gc.collect()
    dist.barrier()
    covered, total = RowAccumulator.combined(wdir, n, sizes)
    missing = np.flatnonzero(nonzero & ~covered)
    if missing.size:
        raise FisherError(f"weighted pass {wdir}: rows {missing[:10].tolist()} were not computed")
    if dist.is_main:
        tmp = wdir / ".tmp-result.safetensors"
        save_file({m: t.contiguous() for m, t in total.items()}, str(tmp),
                  metadata={"crc32": json.dumps({m: crc32(t.numpy()) for m, t in total.items()})})
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        tmp.replace(result)
    dist.barrier()
    return _unflatten({m: total[m] for m in betas}, cols)


def _unflatten(flat: Mapping[str, torch.Tensor], cols: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Weighted sums as stored (flat) → (D_m,) for a vector β, (p, D_m) for an (N, p) β."""
    return {m: t.reshape(cols[m], -1) if cols[m] else t for m, t in flat.items()}
