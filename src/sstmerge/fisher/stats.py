"""Fisher statistics from the per-sample gradients, module by module.

Per module m (G_m: N × D_m, rows 0..n_harm-1 harmful):
- ``gram[m] = G_m G_mᵀ`` (N × N): the empirical Fisher of any union of modules is a function of Σ_m gram[m]
  (:mod:`sstmerge.linalg.eigen`), so one pass serves the ``global`` and ``per_module`` scopes;
- ``G_phi[m] = G_m φ_m`` (N,): inner products with the safety adapter, for the projection;
- ``diag_harm[m] = Σ_{i harm} g_i,m²`` / N_h and ``diag_benign[m]`` likewise: the diagonal Fisher.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .._logging import quiet
from .store import GradientStore


@dataclass
class FisherStats:
    n_harm: int
    n_benign: int
    layout: list[tuple[str, int, int]]
    gram: dict[str, np.ndarray]  # (N, N) float64
    G_phi: dict[str, np.ndarray]  # (N,) float64
    diag_harm: dict[str, np.ndarray]  # (D_m,) float64
    diag_benign: dict[str, np.ndarray]  # (D_m,)

    @property
    def modules(self) -> list[str]:
        return [m for m, _, _ in self.layout]

    def dim(self, module: str | None = None) -> int:
        sizes = {m: a + b for m, a, b in self.layout}
        return sizes[module] if module is not None else sum(sizes.values())

    def save(self, path: Path) -> None:
        tensors = {}
        for m in self.modules:
            tensors[f"gram/{m}"] = torch.from_numpy(self.gram[m])
            tensors[f"G_phi/{m}"] = torch.from_numpy(self.G_phi[m])
            tensors[f"diag_harm/{m}"] = torch.from_numpy(self.diag_harm[m])
            tensors[f"diag_benign/{m}"] = torch.from_numpy(self.diag_benign[m])
        import json

        save_file(tensors, str(path), metadata={"n_harm": str(self.n_harm), "n_benign": str(self.n_benign),
                                                "layout": json.dumps(self.layout)})

    @classmethod
    def load(cls, path: Path) -> FisherStats:
        import json

        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata()
        t = load_file(str(path))
        layout = [tuple(x) for x in json.loads(meta["layout"])]
        get = lambda kind: {m: t[f"{kind}/{m}"].numpy() for m, _, _ in layout}  # noqa: E731
        return cls(int(meta["n_harm"]), int(meta["n_benign"]), layout, get("gram"), get("G_phi"),
                   get("diag_harm"), get("diag_benign"))


def compute_stats(store: GradientStore, phi: dict[str, torch.Tensor]) -> FisherStats:
    """Gram, G φ and diagonal statistics, one module block (N × D_m) in memory at a time."""
    gram, G_phi, d_h, d_b = {}, {}, {}, {}
    n_h = store.n_harm
    n_b = store.n_rows - n_h
    for module, _, _ in tqdm(store.layout, desc="Fisher statistics", unit="module", disable=quiet(), leave=False):
        G = store.block(module).to(torch.float64)  # (N, D_m)
        gram[module] = (G @ G.T).numpy()
        G_phi[module] = (G @ phi[module]).numpy()
        sq = G**2
        d_h[module] = (sq[:n_h].sum(0) / n_h).numpy()
        d_b[module] = (sq[n_h:].sum(0) / n_b).numpy()
    return FisherStats(n_h, n_b, store.layout, gram, G_phi, d_h, d_b)
