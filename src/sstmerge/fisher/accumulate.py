"""Resumable sums over examples: ``Σ_{i ∈ rows} x_i`` checkpointed together with the rows they hold.

The store-free Fisher (``--fisher-store sketch``) keeps no per-sample gradient, so what it needs of them is
summed as the passes go: the diagonal Fisher ``Σ_i g_i ∘ g_i`` in the first pass, the weighted sums
``Gᵀβ = Σ_i β_i g_i`` in the second. To resume such a pass after a kill, a sum must say which examples it
already holds. A :class:`RowAccumulator` is a folder of *parts*: each process run adds its own part, a
safetensors file with the float64 sums and the rows they cover, replaced atomically (temp + fsync + rename) at
every checkpoint. Parts never overlap: a process only adds rows that no part held when it opened the folder,
and processes of one run take disjoint rows. So the total is ``Σ_parts`` and the rows still to do are the
complement of the union, whatever number of processes wrote the parts and however often they were killed.

A part that fails to load or to match its checksums is removed (its rows are then recomputed) and a warning
says so; nothing else can be half-written.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..io.integrity import crc32

log = logging.getLogger(__name__)

ROWS_KEY = "__rows__"


class RowAccumulator:
    """Float64 sums ``{key: (size,)}`` over a growing set of rows, kept in ``folder`` (see the module docstring).

    ``covered`` (N,) bool marks the rows any part held when the accumulator was opened plus those added since;
    :meth:`add` takes the sums of rows not yet covered, :meth:`checkpoint` makes them durable, :meth:`total`
    returns the sum of every part.
    """

    def __init__(self, folder: str | os.PathLike, n_rows: int, sizes: Mapping[str, int]) -> None:
        self.folder, self.n_rows = Path(folder), int(n_rows)
        self.sizes = dict(sizes)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.covered = np.zeros(self.n_rows, dtype=bool)
        self._base: dict[str, torch.Tensor] = {k: torch.zeros(n, dtype=torch.float64) for k, n in self.sizes.items()}
        for part in sorted(self.folder.glob("part-*.safetensors")):
            loaded = self._load_part(part)
            if loaded is None:
                continue
            rows, sums = loaded
            if self.covered[rows].any():  # two parts claim a row: cannot tell which is right, keep the first
                log.warning("%s overlaps another part of %s: removed, its rows are recomputed", part.name, self.folder)
                part.unlink(missing_ok=True)
                continue
            self.covered[rows] = True
            for k in self.sizes:
                self._base[k] += sums[k]
        self._mine = {k: torch.zeros(n, dtype=torch.float64) for k, n in self.sizes.items()}
        self._my_rows: list[int] = []
        self._path = self.folder / f"part-{uuid.uuid4().hex}.safetensors"

    def _load_part(self, path: Path) -> tuple[np.ndarray, dict[str, torch.Tensor]] | None:
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
            crcs = json.loads(meta["crc32"])
            rows = tensors.pop(ROWS_KEY).numpy()
            ok = (set(tensors) == set(self.sizes) and all(tensors[k].shape == (n,) for k, n in self.sizes.items())
                  and all(crc32(tensors[k].numpy()) == crcs[k] for k in tensors) and crc32(rows) == crcs[ROWS_KEY]
                  and ((rows >= 0) & (rows < self.n_rows)).all() and len(np.unique(rows)) == len(rows))
        except Exception as exc:  # safetensors raises several types for a damaged file
            ok, rows, tensors = False, None, None
            log.debug("part %s unreadable: %r", path, exc)
        if not ok:
            log.warning("%s is damaged or made for another problem: removed, its rows are recomputed", path)
            path.unlink(missing_ok=True)
            return None
        return rows, {k: t.to(torch.float64) for k, t in tensors.items()}

    def add(self, rows: list[int], sums: Mapping[str, torch.Tensor]) -> None:
        """Add ``sums[key]`` (size,), the sum over exactly ``rows`` (none of them covered yet)."""
        if self.covered[rows].any():
            raise ValueError(f"rows {[r for r in rows if self.covered[r]][:10]} are already in {self.folder}")
        for k, n in self.sizes.items():
            if tuple(sums[k].shape) != (n,):
                raise ValueError(f"accumulator {self.folder}: sum {k!r} has shape {tuple(sums[k].shape)}, expected ({n},)")
            self._mine[k] += sums[k].detach().to("cpu", torch.float64)
        self.covered[rows] = True
        self._my_rows += [int(r) for r in rows]

    def checkpoint(self) -> None:
        """Write this process's part (its sums and rows) atomically; a no-op before the first :meth:`add`."""
        if not self._my_rows:
            return
        tensors = dict(self._mine)  # saved as they are (no copy: at 8B scale the diagonal sums are 2 × 336 MB)
        tensors[ROWS_KEY] = torch.tensor(self._my_rows, dtype=torch.int64)
        crcs = {k: crc32(t.numpy()) for k, t in tensors.items()}
        tmp = self._path.with_name(f".tmp-{self._path.name}")
        save_file(tensors, str(tmp), metadata={"crc32": json.dumps(crcs)})
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        tmp.replace(self._path)

    def total(self) -> dict[str, torch.Tensor]:
        """``{key: Σ over every covered row}`` (float64): the parts found at opening plus this process's sums."""
        return {k: self._base[k] + self._mine[k] for k in self.sizes}

    @staticmethod
    def combined(folder: str | os.PathLike, n_rows: int, sizes: Mapping[str, int]) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
        """``(covered, totals)`` of every part in ``folder`` (after all processes checkpointed)."""
        acc = RowAccumulator(folder, n_rows, sizes)
        return acc.covered, acc.total()
