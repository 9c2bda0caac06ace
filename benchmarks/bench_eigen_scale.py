"""Eigenproblem at 8B scale: Fisher statistics → safety subspace → projection, D = 42M, N_h = N_b = 1000.

Synthetic per-sample gradients of Llama-3.1-8B rank-16 LoRA shapes (32 layers × q,k,v,o,gate,up,down;
D = 41,943,040) run through the same code as a real pass: :func:`sstmerge.fisher.stats.compute_stats`
(column chunks → per-module Gram, G φ, diagonal Fisher, written to disk module by module),
:func:`sstmerge.linalg.eigen.safety_subspace_from_gram` (the N × N reduced problem) and the projection
``P φ_m = G_mᵀ β`` (a second pass over the column chunks). The N × D gradient matrix (336 GB in float32)
is never held: module m's block is ``G_m = L_m R_m`` with L_m (N × 64) fixed per module and R_m generated
chunk by chunk from a seed (cheap to regenerate for the second pass; rank ≤ 64 per module, full rank N
overall; harmful rows carry extra variance in a few directions). A dense D × D solve at small D checks the
eigenvalues.

    python benchmarks/bench_eigen_scale.py                 # 8B shapes, N_h = N_b = 1000 (~40 min on 2 cores)
    python benchmarks/bench_eigen_scale.py --layers 1 --n-harm 100 --n-benign 100    # a quick look

Prints time per stage and peak resident memory (VmHWM), then the ratios last.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sstmerge.fisher.stats import compute_stats
from sstmerge.linalg.eigen import generalized_eigh_dense, safety_subspace_from_gram
from sstmerge.linalg.projection import project_block, span_coefficients

LLAMA31_8B = {"hidden": 4096, "intermediate": 14336, "kv": 1024}
INNER = 64  # rank of each module's synthetic gradient block


def llama_layout(layers: int, rank: int, hidden: int, intermediate: int, kv: int) -> list[tuple[str, int, int]]:
    """(module, numel(A), numel(B)) for LoRA rank ``rank`` on the seven projections, sorted like φ."""
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, kv), "self_attn.v_proj": (hidden, kv),
              "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (hidden, intermediate),
              "mlp.up_proj": (hidden, intermediate), "mlp.down_proj": (intermediate, hidden)}
    out = []
    for i in range(layers):
        for name, (d_in, d_out) in shapes.items():
            out.append((f"model.layers.{i}.{name}", rank * d_in, d_out * rank))
    return sorted(out)


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & ((1 << 63) - 1)


class SyntheticGradients:
    """A gradient source (``iter_column_chunks``) regenerating the same G_m = L_m R_m on every pass."""

    def __init__(self, layout, n_harm: int, n_benign: int, seed: int = 0) -> None:
        self.layout, self.n_harm, self.n_rows, self.seed = layout, n_harm, n_harm + n_benign, seed

    def _left(self, module: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(_seed(self.seed, module, "L"))
        L = torch.empty(self.n_rows, INNER).uniform_(-1, 1, generator=g)  # (N, 64)
        L[: self.n_harm, :8] *= 4.0  # harmful samples: more gradient mass in a few directions
        return L / INNER**0.5

    def iter_column_chunks(self, module: str, max_elems: int = 1 << 24):
        width = dict((m, a + b) for m, a, b in self.layout)[module]
        L = self._left(module)
        step = 4096
        for lo in range(0, width, step):
            hi = min(lo + step, width)
            g = torch.Generator().manual_seed(_seed(self.seed, module, lo))
            R = torch.empty(INNER, hi - lo).uniform_(-1, 1, generator=g)  # (64, c)
            yield lo, hi, L @ R  # (N, c)


def peak_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def dense_check(seed: int = 0) -> float:
    """Max relative difference of the top eigenvalues: reduced (Gram) solver vs a dense D × D solve."""
    layout = [("m0", 300, 200), ("m1", 250, 250)]  # D = 1000
    src = SyntheticGradients(layout, 40, 40, seed)
    phi = {m: torch.zeros(a + b, dtype=torch.float64) for m, a, b in layout}
    K, _, kept = compute_stats(src, phi, None)
    G = torch.cat([torch.cat([c for _, _, c in src.iter_column_chunks(m)], 1) for m, _, _ in layout], 1).double()
    n_h = src.n_harm
    F_h = (G[:n_h].T @ G[:n_h] / n_h).numpy()
    F_b = (G[n_h:].T @ G[n_h:] / (G.shape[0] - n_h)).numpy()
    dense, _ = generalized_eigh_dense(F_h, F_b, eps=1e-3)
    sub = safety_subspace_from_gram(K, n_h, 10, dim=G.shape[1], eps=1e-3)
    top = min(20, len(sub.eigenvalues))
    return float(np.max(np.abs(sub.eigenvalues[:top] - dense[:top]) / np.abs(dense[:top])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--n-harm", type=int, default=1000)
    ap.add_argument("--n-benign", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--workdir", default=None, help="where the statistics folder goes (default: a temp dir)")
    args = ap.parse_args()
    torch.manual_seed(0)
    base_rss = rss_gib()

    rel = dense_check()
    print(f"dense check (D = 1000, N = 80): max relative difference of the top eigenvalues = {rel:.2e}")

    layout = llama_layout(args.layers, args.rank, **LLAMA31_8B)
    D = sum(a + b for _, a, b in layout)
    N = args.n_harm + args.n_benign
    print(f"layout: {len(layout)} modules, D = {D:,}; N_h = {args.n_harm}, N_b = {args.n_benign}; "
          f"the gradient matrix would be {N * D * 4 / 2**30:.1f} GiB in float32")
    src = SyntheticGradients(layout, args.n_harm, args.n_benign)
    gen = torch.Generator().manual_seed(1)
    phi = {m: torch.empty(a + b, dtype=torch.float64).uniform_(-1, 1, generator=gen) for m, a, b in layout}
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="sstmerge-bench-eigen-") as tmp:
        t0 = time.perf_counter()
        K, G_phi, _ = compute_stats(src, phi, Path(tmp) / "stats")
        t_stats = time.perf_counter() - t0
        rss_stats = peak_rss_gib()
        print(f"statistics (Gram, G φ, diagonal; {len(layout)} modules to disk): {t_stats:.1f} s, peak RSS {rss_stats:.2f} GiB")
        t0 = time.perf_counter()
        sub = safety_subspace_from_gram(K, args.n_harm, args.k, dim=D, eps=1e-3)
        t_eig = time.perf_counter() - t0
        print(f"reduced eigenproblem (N = {N}): {t_eig:.2f} s; top λ: " + ", ".join(f"{x:.4g}" for x in sub.eigenvalues[:5]))
        t0 = time.perf_counter()
        beta = span_coefficients(sub.basis_coef, G_phi.sum(0))
        kept_sq = phi_sq = 0.0
        for m, _, _ in layout:
            P = torch.cat([project_block(C, beta) for _, _, C in src.iter_column_chunks(m)])
            kept_sq += float(P.square().sum())
            phi_sq += float(phi[m].square().sum())
        t_proj = time.perf_counter() - t0
        print(f"projection P φ = Gᵀ β (second pass): {t_proj:.1f} s; ‖Pφ‖/‖φ‖ = {(kept_sq / phi_sq) ** 0.5:.3e}")
        disk = sum(f.stat().st_size for f in (Path(tmp) / "stats").iterdir()) / 2**30
    peak = peak_rss_gib()
    total = t_stats + t_eig + t_proj
    print(f"statistics folder on disk: {disk:.2f} GiB; RSS after imports {base_rss:.2f} GiB")
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"total: {total:.1f} s ({total / 60:.1f} min); peak RSS {peak:.2f} GiB")
    print(f"RATIO peak RSS / 8 GiB budget = {peak / 8:.3f}")
    print(f"RATIO reduced vs dense eigenvalues max relative difference = {rel:.2e}")


if __name__ == "__main__":
    main()
