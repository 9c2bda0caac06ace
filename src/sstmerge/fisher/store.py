"""Per-sample gradients as a source of column chunks: on disk (the Fisher pass) or in memory.

:class:`GradientStore` keeps the N × D matrix (float32, or bfloat16 to halve it: ``dtype``; one row per
example, rows ``0..n_harm-1`` harmful, modules concatenated in φ's layout) in one file of the Fisher cache
folder, written and read with positioned I/O (``pwrite``/``pread``), never memory-mapped: resident memory
stays at one batch of rows while writing and one column chunk (N × cols) while reading, whatever N × D is
(8B-shaped: N = 2000, D = 42M is 336 GB on disk and < 100 MB in RAM). The sketch store of
:mod:`sstmerge.fisher.run` is the same class over sketch columns. ``done.u8`` holds one byte per row, set
after the row is synced, so an interrupted pass resumes with the missing rows only — whichever process, and
however many processes, wrote them (:mod:`sstmerge.fisher.distributed`).

Integrity: ``crc.u32`` holds a CRC-32 per (row, module) block, written with the row. Every read of a
module's columns (the statistics, the projection ``Gᵀβ``) folds the chunks' bytes into a running CRC per
row and compares at the module's last column: damaged rows (bit rot, NaN bytes written into the file, a
row marked done that was never written) raise :class:`~sstmerge.errors.CacheCorruptError` with their row
numbers, and :meth:`GradientStore.forget_rows` makes the next pass recompute just those rows.

Anything with ``n_rows``, ``n_harm``, ``layout`` and ``iter_column_chunks`` is a gradient source for
:func:`sstmerge.fisher.stats.compute_stats` (e.g. :class:`InMemoryGradients`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..errors import CacheCorruptError, FisherError
from ..io.atomic import atomic_write_text
from ..io.integrity import crc32

DEFAULT_CHUNK_ELEMS = 1 << 24  # 16M float32 = 64 MiB per chunk
#: element types a store can hold on disk → (numpy type of the raw bytes, bytes per element, file name)
STORE_DTYPES = {"float32": (np.float32, 4, "grads.f32"), "bfloat16": (np.int16, 2, "grads.bf16")}


def _to_disk(block: torch.Tensor, dtype: str) -> np.ndarray:
    """float32 rows → the store's raw element array (bfloat16 is rounded to nearest even, kept as int16 bits)."""
    if dtype == "bfloat16":
        return block.to(torch.bfloat16).view(torch.int16).numpy()
    return block.to(torch.float32).numpy()


def _from_disk(raw: np.ndarray, dtype: str) -> torch.Tensor:
    """The store's raw element array → float32."""
    if dtype == "bfloat16":
        return torch.from_numpy(raw).view(torch.bfloat16).float()
    return torch.from_numpy(raw)


def _chunk_cols(n_rows: int, width: int, max_elems: int) -> int:
    return max(1, min(width, max_elems // max(n_rows, 1)))


class GradientSource(Protocol):
    n_rows: int
    n_harm: int
    layout: list[tuple[str, int, int]]  # (module, numel(A), numel(B)) in φ's order

    def iter_column_chunks(self, module: str, max_elems: int = DEFAULT_CHUNK_ELEMS) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Yield ``(lo, hi, G_m[:, lo:hi])`` (N × (hi − lo), float32) covering the module's D_m columns."""
        ...


class InMemoryGradients:
    """A gradient source over tensors already in RAM: ``blocks[module]`` is G_m (N × D_m)."""

    def __init__(self, blocks: dict[str, torch.Tensor], n_harm: int, layout: list[tuple[str, int, int]]) -> None:
        self.blocks, self.n_harm, self.layout = blocks, n_harm, [tuple(x) for x in layout]
        self.n_rows = int(next(iter(blocks.values())).shape[0])
        for m, na, nb in self.layout:
            if tuple(blocks[m].shape) != (self.n_rows, na + nb):
                raise FisherError(f"gradient block {m}: shape {tuple(blocks[m].shape)}, expected {(self.n_rows, na + nb)}")

    def iter_column_chunks(self, module: str, max_elems: int = DEFAULT_CHUNK_ELEMS):
        G = self.blocks[module]
        step = _chunk_cols(self.n_rows, G.shape[1], max_elems)
        for lo in range(0, G.shape[1], step):
            hi = min(lo + step, G.shape[1])
            yield lo, hi, G[:, lo:hi].float()


class GradientStore:
    """The on-disk N × D gradient matrix of one Fisher pass (see the module docstring). ``dtype`` is what the
    file holds (``float32``, or ``bfloat16``: half the disk, 8 significant bits); reads return float32."""

    def __init__(self, folder: Path, n_rows: int, n_harm: int, layout: list[tuple[str, int, int]],
                 dtype: str = "float32") -> None:
        if dtype not in STORE_DTYPES:
            raise FisherError(f"gradient store dtype {dtype!r}: choose one of {sorted(STORE_DTYPES)}")
        self.folder, self.dtype = Path(folder), dtype
        self._raw, self.itemsize, file_name = STORE_DTYPES[dtype]
        self.n_rows, self.n_harm = n_rows, n_harm
        self.layout = [tuple(x) for x in layout]
        self.offsets: dict[str, tuple[int, int]] = {}
        off = 0
        for module, na, nb in self.layout:
            self.offsets[module] = (off, off + na + nb)
            off += na + nb
        self.dim = off
        self.path = self.folder / file_name
        self.done_path = self.folder / "done.u8"
        self.crc_path = self.folder / "crc.u32"
        self.meta_path = self.folder / "store.json"
        self.module_index = {m: j for j, (m, _, _) in enumerate(self.layout)}
        self._fd: int | None = None
        self._done_fd: int | None = None
        self._crc_fd: int | None = None

    def _meta(self) -> dict:
        return {"n_rows": self.n_rows, "n_harm": self.n_harm, "layout": [list(x) for x in self.layout],
                "dim": self.dim, "dtype": self.dtype, "order": "row-major (example, φ)", "checksums": "crc32 per (row, module)"}

    def _read_meta(self) -> dict | None:
        try:
            return json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            return None

    @classmethod
    def open(cls, folder: Path, n_rows: int, n_harm: int, layout: list[tuple[str, int, int]], *,
             create: bool = True, dtype: str = "float32") -> GradientStore:
        """Open the store in ``folder``; with ``create`` (one process only), (re)create it when missing or
        made for a different problem. The data file is sparse until rows are written."""
        store = cls(folder, n_rows, n_harm, layout, dtype)
        sizes = {store.path: n_rows * store.dim * store.itemsize, store.done_path: n_rows,
                 store.crc_path: n_rows * len(store.layout) * 4}
        intact = store._read_meta() == store._meta() and all(p.is_file() and p.stat().st_size == n for p, n in sizes.items())
        if create:
            folder.mkdir(parents=True, exist_ok=True)
            if not intact:  # missing, made for a different problem under the same key, or damaged: start over
                for p in sizes:
                    p.unlink(missing_ok=True)
                with open(store.path, "wb") as fh:
                    fh.truncate(sizes[store.path])
                with open(store.done_path, "wb") as fh:
                    fh.write(bytes(n_rows))
                with open(store.crc_path, "wb") as fh:
                    fh.truncate(sizes[store.crc_path])
                atomic_write_text(store.meta_path, json.dumps(store._meta()))
        elif not intact:
            raise CacheCorruptError(f"{folder}: the gradient store is missing, damaged or made for another problem "
                                    "(store.json / file sizes)")
        store._fd = os.open(store.path, os.O_RDWR)
        store._done_fd = os.open(store.done_path, os.O_RDWR)
        store._crc_fd = os.open(store.crc_path, os.O_RDWR)
        return store

    def close(self) -> None:
        for fd in (self._fd, self._done_fd, self._crc_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._done_fd = self._crc_fd = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    # --- writing -----------------------------------------------------------------------------------------
    def write_rows(self, rows: list[int], grads: dict[str, torch.Tensor]) -> None:
        """Write ``grads[module]`` (len(rows) × D_m) as rows ``rows`` (not yet marked done)."""
        block = np.concatenate([grads[m].detach().to("cpu", torch.float32).numpy() for m, _, _ in self.layout], axis=1)  # (B, D)
        if block.shape != (len(rows), self.dim):
            raise FisherError(f"gradient rows of shape {block.shape}, expected {(len(rows), self.dim)}")
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            bad = [rows[b] for b in np.flatnonzero(~finite)]
            raise FisherError(
                f"the per-sample gradients of example(s) {bad[:10]} are not finite (NaN/Inf): the model at the Fisher "
                "point overflows on them. Check the base model and adapters (sst-merge inspect), or use "
                "--fisher-dtype float32 if a half-precision dtype was chosen")
        bounds = np.cumsum([0] + [na + nb for _, na, nb in self.layout])
        block = _to_disk(torch.from_numpy(block), self.dtype)
        for b, i in enumerate(rows):
            row = np.ascontiguousarray(block[b])
            os.pwrite(self._fd, row.tobytes(), i * self.dim * self.itemsize)
            crcs = np.array([crc32(row[bounds[j] : bounds[j + 1]]) for j in range(len(self.layout))], dtype=np.uint32)
            os.pwrite(self._crc_fd, crcs.tobytes(), i * len(self.layout) * 4)

    def mark_done(self, rows: list[int]) -> None:
        """Make the written rows (and their checksums) durable, then record them as complete (the resume point)."""
        os.fsync(self._fd)
        os.fsync(self._crc_fd)
        for i in rows:
            os.pwrite(self._done_fd, b"\x01", i)
        os.fsync(self._done_fd)

    def forget_rows(self, rows: list[int]) -> None:
        """Mark rows as not done, so that the next pass recomputes them (repair of damaged rows)."""
        for i in rows:
            os.pwrite(self._done_fd, b"\x00", int(i))
        os.fsync(self._done_fd)

    def done_mask(self) -> np.ndarray:
        """(N,) bool: rows written and synced."""
        return np.frombuffer(os.pread(self._done_fd, self.n_rows, 0), dtype=np.uint8).astype(bool)

    @property
    def done(self) -> int:
        return int(self.done_mask().sum())

    # --- reading -----------------------------------------------------------------------------------------
    def iter_column_chunks(self, module: str, max_elems: int = DEFAULT_CHUNK_ELEMS):
        """Yield the module's column chunks; after the last one, the rows' CRCs are checked
        (:class:`CacheCorruptError` naming the damaged rows, before the consumer can finish)."""
        lo_m, hi_m = self.offsets[module]
        step = _chunk_cols(self.n_rows, hi_m - lo_m, max_elems)
        running = [0] * self.n_rows
        for lo in range(lo_m, hi_m, step):
            hi = min(lo + step, hi_m)
            raw = self._read_columns(lo, hi)
            for i in range(self.n_rows):
                running[i] = crc32(raw[i], running[i])
            yield lo - lo_m, hi - lo_m, _from_disk(raw, self.dtype)
        self._check_rows(module, running)

    def _stored_crcs(self, module: str) -> np.ndarray:
        j, M = self.module_index[module], len(self.layout)
        raw = np.frombuffer(os.pread(self._crc_fd, self.n_rows * M * 4, 0), dtype=np.uint32)
        if raw.size != self.n_rows * M:
            raise CacheCorruptError(f"{self.crc_path}: truncated")
        return raw.reshape(self.n_rows, M)[:, j]

    def _check_rows(self, module: str, crcs: list[int]) -> None:
        bad = [i for i, (got, want) in enumerate(zip(crcs, self._stored_crcs(module))) if got != int(want)]
        if bad:
            raise CacheCorruptError(
                f"{self.path}: {len(bad)} row(s) of module {module} fail their checksum (rows {bad[:10]}"
                f"{' ...' if len(bad) > 10 else ''}); the damaged rows are recomputed", rows=bad)

    def _read_columns(self, lo: int, hi: int) -> np.ndarray:
        """Columns ``lo:hi`` of every row, as stored (raw elements; :func:`_from_disk` converts)."""
        out = np.empty((self.n_rows, hi - lo), dtype=self._raw)
        nbytes = (hi - lo) * self.itemsize
        for i in range(self.n_rows):
            buf = os.pread(self._fd, nbytes, (i * self.dim + lo) * self.itemsize)
            if len(buf) != nbytes:
                raise FisherError(f"{self.path}: short read at row {i} (file truncated?); delete {self.folder} to recompute")
            out[i] = np.frombuffer(buf, dtype=self._raw)
        return out

    def block(self, module: str) -> torch.Tensor:
        """Per-sample gradients of one module: G_m (N × D_m), float32, in RAM (small problems and tests)."""
        lo, hi = self.offsets[module]
        raw = self._read_columns(lo, hi)
        self._check_rows(module, [crc32(raw[i]) for i in range(self.n_rows)])
        return _from_disk(raw, self.dtype)
