"""On-disk store of per-sample gradients (one float32 row per example), with checkpoint/resume.

The N × D matrix lives in a memory-mapped file in the Fisher cache folder; RAM holds one row while it is
written and one module block (N × D_m) while statistics are computed. Rows ``0..n_harm-1`` are the harmful
examples, the rest benign. ``progress.json`` records how many rows are complete (written after a flush), so
an interrupted pass resumes from there.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..io.atomic import atomic_write_text


class GradientStore:
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
        self.progress_path = self.folder / "progress.json"
        self._mm: np.memmap | None = None

    @classmethod
    def open(cls, folder: Path, n_rows: int, n_harm: int, layout: list[tuple[str, int, int]]) -> GradientStore:
        store = cls(folder, n_rows, n_harm, layout)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"n_rows": n_rows, "n_harm": n_harm, "layout": store.layout, "dim": store.dim, "dtype": "float32"}
        meta_path = folder / "store.json"
        if meta_path.is_file() and store.path.is_file():
            old = json.loads(meta_path.read_text())
            old["layout"] = [tuple(x) for x in old["layout"]]
            if old != meta:  # a different problem under the same key: start over
                store.path.unlink()
                store.progress_path.unlink(missing_ok=True)
        if not store.path.is_file():
            atomic_write_text(meta_path, json.dumps(meta))
            np.memmap(store.path, dtype=np.float32, mode="w+", shape=(n_rows, store.dim)).flush()
            atomic_write_text(store.progress_path, json.dumps({"done": 0}))
        store._mm = np.memmap(store.path, dtype=np.float32, mode="r+", shape=(n_rows, store.dim))
        return store

    @property
    def done(self) -> int:
        if not self.progress_path.is_file():
            return 0
        return int(json.loads(self.progress_path.read_text())["done"])

    def write_row(self, i: int, grads: dict[str, torch.Tensor]) -> None:
        row = self._mm[i]
        for module, (lo, hi) in self.offsets.items():
            row[lo:hi] = grads[module].numpy()

    def checkpoint(self, done: int) -> None:
        """Flush rows to disk, then record that rows ``< done`` are complete."""
        self._mm.flush()
        atomic_write_text(self.progress_path, json.dumps({"done": done}))

    def block(self, module: str) -> torch.Tensor:
        """Per-sample gradients of one module: G_m (N × D_m), float32 (a copy in RAM)."""
        lo, hi = self.offsets[module]
        return torch.from_numpy(np.ascontiguousarray(self._mm[:, lo:hi]))
