"""Fisher statistics from per-sample gradients, module by module and column chunk by column chunk.

Per module m (G_m: N × D_m, rows 0..n_harm-1 harmful)::

    gram[m]        = G_m G_mᵀ                       (N × N)   the empirical Fisher of any union of modules is a
                                                              function of Σ_m gram[m] (linalg.eigen), so one pass
                                                              serves the ``global`` and ``per_module`` scopes
    G_phi[m]       = G_m φ_m                        (N,)      inner products with the safety adapter (projection)
    diag_harm[m]   = Σ_{i harm} g_i,m ∘ g_i,m / N_h  (D_m,)    the diagonal Fisher; diag_benign likewise
    gram_total     = Σ_m gram[m]                     (N × N)   the global scope's Gram

Each sum over the D_m columns is taken chunk by chunk: ``G_m = [C_1 … C_J]`` gives ``G_m G_mᵀ = Σ_j C_j C_jᵀ``,
so memory is one chunk (N × ≤ MAX_CHUNK_COLS) whatever D is. Chunk products are float32 (what the gradients
are), accumulated across chunks in float64; a chunk has at most ``MAX_CHUNK_COLS`` columns so each float32
dot product sums few terms.

Storage (a folder): ``gram.npy`` (M, N, N) and ``diag_harm.npy`` / ``diag_benign.npy`` (D,) float64 are written
one module at a time with positioned writes (several processes can fill disjoint modules) and read back one
module at a time; ``summary.safetensors`` holds ``gram_total``, ``G_phi`` (M, N), the layout and a CRC-32 of
every module's gram/diag block (read back from disk) and is written last: its presence marks the statistics
complete. Every lazy read of a block checks its CRC, and loading checks that the summary is finite, so a
damaged file raises :class:`~sstmerge.errors.CacheCorruptError` instead of feeding the eigen-solver.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .._logging import quiet
from ..errors import CacheCorruptError
from ..io.integrity import crc32
from .store import DEFAULT_CHUNK_ELEMS, GradientSource

MAX_CHUNK_COLS = 4096
SUMMARY_NAME = "summary.safetensors"


@dataclass
class ModuleStats:
    gram: np.ndarray  # (N, N) float64
    G_phi: np.ndarray  # (N,) float64
    diag_harm: np.ndarray  # (D_m,) float64
    diag_benign: np.ndarray  # (D_m,) float64


def module_statistics(chunks: Iterable[tuple[int, int, torch.Tensor]], phi_m: torch.Tensor, n_harm: int) -> ModuleStats:
    """``G_m G_mᵀ``, ``G_m φ_m`` and the diagonal Fisher of one module from its column chunks
    ``(lo, hi, C = G_m[:, lo:hi])``; ``phi_m`` is φ_m (D_m,)."""
    gram = diag_h = diag_b = G_phi = None
    parts_h, parts_b = [], []
    for lo, hi, C in chunks:
        C = C.float()  # (N, c)
        N = C.shape[0]
        if gram is None:
            gram, G_phi = torch.zeros(N, N, dtype=torch.float64), torch.zeros(N, dtype=torch.float64)
        gram += (C @ C.T).double()
        G_phi += (C @ phi_m[lo:hi].to(C)).double()
        sq = C.square()
        parts_h.append(sq[:n_harm].sum(0, dtype=torch.float64) / n_harm)
        parts_b.append(sq[n_harm:].sum(0, dtype=torch.float64) / (N - n_harm))
    diag_h, diag_b = torch.cat(parts_h), torch.cat(parts_b)
    return ModuleStats(gram.numpy(), G_phi.numpy(), diag_h.numpy(), diag_b.numpy())


def _capped(source: GradientSource, module: str, max_elems: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """The source's chunks, split further to at most MAX_CHUNK_COLS columns."""
    for lo, hi, C in source.iter_column_chunks(module, max_elems):
        for a in range(0, hi - lo, MAX_CHUNK_COLS):
            b = min(a + MAX_CHUNK_COLS, hi - lo)
            yield lo + a, lo + b, C[:, a:b]


def _npy_create(path: Path, shape: tuple[int, ...]) -> None:
    """An all-zero float64 ``.npy`` of ``shape`` (sparse on disk until written)."""
    np.lib.format.open_memmap(path, mode="w+", dtype=np.float64, shape=shape).flush()


def _npy_data_offset(path: Path) -> int:
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        read_header(fh)
        return fh.tell()


class _NpyModules(Mapping):
    """Read-only ``{module: array}`` view of a float64 ``.npy``: module j is ``count`` values at ``start``;
    with ``crcs``, each block read is checked against its CRC-32."""

    def __init__(self, path: Path, spans: dict[str, tuple[int, int, tuple[int, ...]]],
                 crcs: dict[str, int] | None = None) -> None:
        try:
            self.path, self.spans, self._off = path, spans, _npy_data_offset(path)
        except (OSError, ValueError) as exc:
            raise CacheCorruptError(f"{path}: unreadable statistics file ({exc})") from None
        self.crcs = crcs

    def __getitem__(self, module: str) -> np.ndarray:
        start, count, shape = self.spans[module]
        block = np.fromfile(self.path, dtype=np.float64, count=count, offset=self._off + 8 * start)
        if block.size != count or (self.crcs is not None and crc32(block) != self.crcs[module]):
            raise CacheCorruptError(f"{self.path}: the block of module {module} fails its checksum (damaged)")
        return block.reshape(shape)

    def __iter__(self):
        return iter(self.spans)

    def __len__(self) -> int:
        return len(self.spans)


def _spans(layout: Sequence[tuple[str, int, int]], n: int) -> tuple[dict, dict]:
    gram, diag, off = {}, {}, 0
    for j, (m, na, nb) in enumerate(layout):
        gram[m] = (j * n * n, n * n, (n, n))
        diag[m] = (off, na + nb, (na + nb,))
        off += na + nb
    return gram, diag


class StatsWriter:
    """Fills a statistics folder module by module (any process may write any module, each module once).
    ``with_gram=False``: no ``gram.npy`` (the sketch store computes the per-module Grams when read)."""

    def __init__(self, folder: Path, n_rows: int, layout: Sequence[tuple[str, int, int]], *, create: bool,
                 with_gram: bool = True) -> None:
        self.folder, self.n, self.layout = Path(folder), n_rows, [tuple(x) for x in layout]
        self.index = {m: j for j, (m, _, _) in enumerate(self.layout)}
        self.gram_spans, self.diag_spans = _spans(self.layout, n_rows)
        dim = sum(na + nb for _, na, nb in self.layout)
        paths = {"diag_harm": self.folder / "diag_harm.npy", "diag_benign": self.folder / "diag_benign.npy"}
        if with_gram:
            paths["gram"] = self.folder / "gram.npy"
        if create:
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / SUMMARY_NAME).unlink(missing_ok=True)
            (self.folder / "gram.npy").unlink(missing_ok=True)
            if with_gram:
                _npy_create(paths["gram"], (len(self.layout), n_rows, n_rows))
            _npy_create(paths["diag_harm"], (dim,))
            _npy_create(paths["diag_benign"], (dim,))
        self.paths = paths
        self.offsets = {k: _npy_data_offset(p) for k, p in paths.items()}

    def write(self, module: str, s: ModuleStats) -> None:
        self._write(module, (("gram", s.gram, self.gram_spans), ("diag_harm", s.diag_harm, self.diag_spans),
                             ("diag_benign", s.diag_benign, self.diag_spans)))

    def write_diag(self, module: str, diag_harm: np.ndarray, diag_benign: np.ndarray) -> None:
        """The diagonal Fisher of one module only (a folder without ``gram.npy``)."""
        self._write(module, (("diag_harm", diag_harm, self.diag_spans), ("diag_benign", diag_benign, self.diag_spans)))

    def _write(self, module: str, parts) -> None:
        for kind, array, spans in parts:
            start, count, _ = spans[module]
            assert array.size == count, (module, kind, array.shape)
            fd = os.open(self.paths[kind], os.O_WRONLY)
            try:
                os.pwrite(fd, np.ascontiguousarray(array, dtype=np.float64).tobytes(), self.offsets[kind] + 8 * start)
                os.fsync(fd)
            finally:
                os.close(fd)

    def block_crcs(self) -> dict[str, dict[str, int]]:
        """CRC-32 of every module's blocks as they are on disk now: ``{kind: {module: crc}}``."""
        out: dict[str, dict[str, int]] = {}
        for kind, spans in (("gram", self.gram_spans), ("diag_harm", self.diag_spans), ("diag_benign", self.diag_spans)):
            if kind not in self.paths:
                continue
            view = _NpyModules(self.paths[kind], spans)
            out[kind] = {m: crc32(view[m]) for m in view}
        return out

    def finish(self, n_harm: int, gram_total: np.ndarray, G_phi: np.ndarray) -> None:
        """Write the summary (gram_total, G_phi (M, N), layout, block CRCs) last, atomically."""
        tmp = self.folder / f".tmp-{SUMMARY_NAME}"
        save_file({"gram_total": torch.from_numpy(np.ascontiguousarray(gram_total)),
                   "G_phi": torch.from_numpy(np.ascontiguousarray(G_phi))}, str(tmp),
                  metadata={"n_harm": str(n_harm), "n_benign": str(self.n - n_harm), "layout": json.dumps(self.layout),
                            "crc32": json.dumps(self.block_crcs())})
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        tmp.replace(self.folder / SUMMARY_NAME)


@dataclass
class FisherStats:
    """Statistics of one Fisher pass. ``gram`` and ``diag_*`` map module → array and may be lazy views of the
    files (read one module at a time); ``gram_total`` and ``G_phi`` are in RAM."""

    n_harm: int
    n_benign: int
    layout: list[tuple[str, int, int]]
    gram: Mapping[str, np.ndarray]  # (N, N) float64
    G_phi: dict[str, np.ndarray]  # (N,) float64
    diag_harm: Mapping[str, np.ndarray]  # (D_m,) float64
    diag_benign: Mapping[str, np.ndarray]  # (D_m,)
    gram_total: np.ndarray | None = None  # (N, N) = Σ_m gram[m]

    def __post_init__(self) -> None:
        if self.gram_total is None:
            self.gram_total = sum(self.gram[m] for m in self.modules)

    @property
    def modules(self) -> list[str]:
        return [m for m, _, _ in self.layout]

    def dim(self, module: str | None = None) -> int:
        sizes = {m: a + b for m, a, b in self.layout}
        return sizes[module] if module is not None else sum(sizes.values())

    @staticmethod
    def is_complete(folder: Path) -> bool:
        return (Path(folder) / SUMMARY_NAME).is_file()

    @classmethod
    def load(cls, folder: Path, gram: Mapping[str, np.ndarray] | None = None) -> FisherStats:
        """Open a finished statistics folder (:class:`CacheCorruptError` when any part is damaged). ``gram``:
        the per-module Grams when the folder has none (a sketch store's, computed when read)."""
        folder = Path(folder)
        try:
            with safe_open(str(folder / SUMMARY_NAME), framework="pt") as fh:
                meta = fh.metadata()
                gram_total = fh.get_tensor("gram_total").numpy()
                G_phi_all = fh.get_tensor("G_phi").numpy()
            layout = [tuple(x) for x in json.loads(meta["layout"])]
            crcs = json.loads(meta["crc32"])
            n_harm, n_benign = int(meta["n_harm"]), int(meta["n_benign"])
        except Exception as exc:  # safetensors raises several types for a damaged header
            raise CacheCorruptError(f"{folder / SUMMARY_NAME}: unreadable statistics summary ({exc})") from None
        n = gram_total.shape[0]
        if gram_total.shape != (n_harm + n_benign,) * 2 or G_phi_all.shape != (len(layout), n):
            raise CacheCorruptError(f"{folder / SUMMARY_NAME}: shapes do not match its layout")
        if not (np.isfinite(gram_total).all() and np.isfinite(G_phi_all).all()):
            raise CacheCorruptError(f"{folder / SUMMARY_NAME}: non-finite statistics")
        gram_spans, diag_spans = _spans(layout, n)
        if gram is None:
            if "gram" not in crcs:
                raise CacheCorruptError(f"{folder}: statistics without per-module Grams (a sketch store's); open them "
                                        "through sstmerge.fisher.run")
            gram = _NpyModules(folder / "gram.npy", gram_spans, crcs["gram"])
        return cls(n_harm, n_benign, layout,
                   gram=gram,
                   G_phi={m: G_phi_all[j] for j, (m, _, _) in enumerate(layout)},
                   diag_harm=_NpyModules(folder / "diag_harm.npy", diag_spans, crcs.get("diag_harm")),
                   diag_benign=_NpyModules(folder / "diag_benign.npy", diag_spans, crcs.get("diag_benign")),
                   gram_total=gram_total)


def compute_stats(
    source: GradientSource, phi: dict[str, torch.Tensor], folder: Path | None = None, *,
    modules: Sequence[str] | None = None, max_elems: int = DEFAULT_CHUNK_ELEMS, create: bool = True,
) -> tuple[np.ndarray, np.ndarray, dict[str, ModuleStats]]:
    """Statistics of ``modules`` (default: all) of ``source``, one module block at a time.

    With ``folder``, each module's gram/diag is written there as it is done (not kept); without, it is
    returned in the dict. Returns ``(Σ_m gram[m], G_phi (M, N), kept)`` summed/filled over ``modules`` only
    (zeros for the others, so partial results from several processes add up). Finish a folder with
    :meth:`StatsWriter.finish`, or build in-memory stats with :func:`stats_in_memory`.
    """
    layout = [tuple(x) for x in source.layout]
    n = source.n_rows
    todo = set(modules) if modules is not None else {m for m, _, _ in layout}
    writer = StatsWriter(folder, n, layout, create=create) if folder is not None else None
    gram_total = np.zeros((n, n))
    G_phi = np.zeros((len(layout), n))
    kept: dict[str, ModuleStats] = {}
    index = {m: j for j, (m, _, _) in enumerate(layout)}
    names = [m for m in index if m in todo]
    for module in tqdm(names, desc="Fisher statistics", unit="module", disable=quiet(), leave=False):
        s = module_statistics(_capped(source, module, max_elems), phi[module], source.n_harm)
        gram_total += s.gram
        G_phi[index[module]] = s.G_phi
        if writer is not None:
            writer.write(module, s)
        else:
            kept[module] = s
    return gram_total, G_phi, kept


def stats_in_memory(source: GradientSource, phi: dict[str, torch.Tensor], max_elems: int = DEFAULT_CHUNK_ELEMS) -> FisherStats:
    """All statistics in RAM (small problems, tests)."""
    gram_total, G_phi, kept = compute_stats(source, phi, None, max_elems=max_elems)
    layout = [tuple(x) for x in source.layout]
    return FisherStats(source.n_harm, source.n_rows - source.n_harm, layout,
                       gram={m: s.gram for m, s in kept.items()},
                       G_phi={m: G_phi[j] for j, (m, _, _) in enumerate(layout)},
                       diag_harm={m: s.diag_harm for m, s in kept.items()},
                       diag_benign={m: s.diag_benign for m, s in kept.items()}, gram_total=gram_total)
