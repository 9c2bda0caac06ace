"""Per-sample gradients as a source of column chunks: on disk (the Fisher pass) or in memory.

:class:`GradientStore` keeps the N × D float32 matrix (one row per example, rows ``0..n_harm-1`` harmful,
modules concatenated in φ's layout) in one file of the Fisher cache folder, written and read with positioned
I/O (``pwrite``/``pread``), never memory-mapped: resident memory stays at one batch of rows while writing
and one column chunk (N × cols) while reading, whatever N × D is (8B-shaped: N = 2000, D = 42M is 336 GB
on disk and < 100 MB in RAM). ``done.u8`` holds one byte per row, set after the row is synced, so an
interrupted pass resumes with the missing rows only — whichever process, and however many processes,
wrote them (:mod:`sstmerge.fisher.distributed`).

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

from ..errors import FisherError
from ..io.atomic import atomic_write_text

DEFAULT_CHUNK_ELEMS = 1 << 24  # 16M float32 = 64 MiB per chunk


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
    """The on-disk N × D float32 gradient matrix of one Fisher pass (see the module docstring)."""

    def __init__(self, folder: Path, n_rows: int, n_harm: int, layout: list[tuple[str, int, int]]) -> None:
        self.folder = Path(folder)
        self.n_rows, self.n_harm = n_rows, n_harm
        self.layout = [tuple(x) for x in layout]
        self.offsets: dict[str, tuple[int, int]] = {}
        off = 0
        for module, na, nb in self.layout:
            self.offsets[module] = (off, off + na + nb)
            off += na + nb
        self.dim = off
        self.path = self.folder / "grads.f32"
        self.done_path = self.folder / "done.u8"
        self.meta_path = self.folder / "store.json"
        self._fd: int | None = None
        self._done_fd: int | None = None

    def _meta(self) -> dict:
        return {"n_rows": self.n_rows, "n_harm": self.n_harm, "layout": [list(x) for x in self.layout],
                "dim": self.dim, "dtype": "float32", "order": "row-major (example, φ)"}

    @classmethod
    def open(cls, folder: Path, n_rows: int, n_harm: int, layout: list[tuple[str, int, int]], *,
             create: bool = True) -> GradientStore:
        """Open the store in ``folder``; with ``create`` (one process only), (re)create it when missing or
        made for a different problem. The data file is sparse until rows are written."""
        store = cls(folder, n_rows, n_harm, layout)
        if create:
            folder.mkdir(parents=True, exist_ok=True)
            fresh = not (store.meta_path.is_file() and store.path.is_file() and store.done_path.is_file())
            if not fresh and json.loads(store.meta_path.read_text()) != store._meta():
                fresh = True  # a different problem under the same key: start over
            if fresh:
                for p in (store.path, store.done_path):
                    p.unlink(missing_ok=True)
                with open(store.path, "wb") as fh:
                    fh.truncate(n_rows * store.dim * 4)
                with open(store.done_path, "wb") as fh:
                    fh.write(bytes(n_rows))
                atomic_write_text(store.meta_path, json.dumps(store._meta()))
        elif not store.meta_path.is_file() or json.loads(store.meta_path.read_text()) != store._meta():
            raise FisherError(f"{folder}: no gradient store for this problem (store.json missing or different)")
        store._fd = os.open(store.path, os.O_RDWR)
        store._done_fd = os.open(store.done_path, os.O_RDWR)
        return store

    def close(self) -> None:
        for fd in (self._fd, self._done_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._done_fd = None

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    # --- writing -----------------------------------------------------------------------------------------
    def write_rows(self, rows: list[int], grads: dict[str, torch.Tensor]) -> None:
        """Write ``grads[module]`` (len(rows) × D_m) as rows ``rows`` (not yet marked done)."""
        block = np.concatenate([grads[m].detach().to("cpu", torch.float32).numpy() for m, _, _ in self.layout], axis=1)
        if block.shape != (len(rows), self.dim):
            raise FisherError(f"gradient rows of shape {block.shape}, expected {(len(rows), self.dim)}")
        for b, i in enumerate(rows):
            os.pwrite(self._fd, np.ascontiguousarray(block[b]).tobytes(), i * self.dim * 4)

    def mark_done(self, rows: list[int]) -> None:
        """Make the written rows durable, then record them as complete (the resume point)."""
        os.fsync(self._fd)
        for i in rows:
            os.pwrite(self._done_fd, b"\x01", i)
        os.fsync(self._done_fd)

    def done_mask(self) -> np.ndarray:
        """(N,) bool: rows written and synced."""
        return np.frombuffer(os.pread(self._done_fd, self.n_rows, 0), dtype=np.uint8).astype(bool)

    @property
    def done(self) -> int:
        return int(self.done_mask().sum())

    # --- reading -----------------------------------------------------------------------------------------
    def iter_column_chunks(self, module: str, max_elems: int = DEFAULT_CHUNK_ELEMS):
        lo_m, hi_m = self.offsets[module]
        step = _chunk_cols(self.n_rows, hi_m - lo_m, max_elems)
        for lo in range(lo_m, hi_m, step):
            hi = min(lo + step, hi_m)
            yield lo - lo_m, hi - lo_m, self._read_columns(lo, hi)

    def _read_columns(self, lo: int, hi: int) -> torch.Tensor:
        out = np.empty((self.n_rows, hi - lo), dtype=np.float32)
        nbytes = (hi - lo) * 4
        for i in range(self.n_rows):
            buf = os.pread(self._fd, nbytes, (i * self.dim + lo) * 4)
            if len(buf) != nbytes:
                raise FisherError(f"{self.path}: short read at row {i} (file truncated?); delete {self.folder} to recompute")
            out[i] = np.frombuffer(buf, dtype=np.float32)
        return torch.from_numpy(out)

    def block(self, module: str) -> torch.Tensor:
        """Per-sample gradients of one module: G_m (N × D_m), float32, in RAM (small problems and tests)."""
        lo, hi = self.offsets[module]
        return self._read_columns(lo, hi)
