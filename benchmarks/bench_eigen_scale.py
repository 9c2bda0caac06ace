"""Eigenproblem at 8B scale, full store vs sketch store: statistics → safety subspace → projection,
D = 42M, N_h = N_b = 1000 (issue #16).

Synthetic per-sample gradients of Llama-3.1-8B rank-16 LoRA shapes (32 layers × q,k,v,o,gate,up,down;
D = 41,943,040). Module m's block is ``G_m = L_m R_m`` with L_m (N × 64) fixed per module and R_m generated
chunk by chunk from a seed (cheap to regenerate for a second pass; rank ≤ 64 per module, full rank N overall;
harmful rows carry extra variance in a few directions). Each store runs in its own child process (so peak
RSS is its own), over the same gradients:

- ``full``: :func:`sstmerge.fisher.stats.compute_stats` (column chunks → per-module Gram N² D_m, G φ,
  diagonal Fisher, written to disk module by module). A real pass would also write and re-read the N × D
  float32 gradient store (336 GB here, more than this disk holds); the benchmark regenerates the chunks
  instead, which flatters the full store's time, and counts the store's size as its disk.
- ``sketch``: per module the count sketch of :func:`sstmerge.linalg.sketch.sketch_module_chunks` (N × m,
  written to disk in bfloat16 like the sketch store's default), its Gram and the two halves' error estimate,
  the exact G φ and the diagonal Fisher.

Both then solve the reduced N × N eigenproblem and map β back to parameter space, ``P φ = Gᵀ β``: the full
store reads every stored column again; the sketch store has no columns, and a real run does it by the
weighted backward pass, which contracts β before any per-sample gradient is formed (one ordinary backward
over the data). Here that is ``R_mᵀ (L_mᵀ β)``; the model's own cost of that pass (about the first pass's,
measured on SmolLM2 by ``bench_fisher_store.py``) is not part of this synthetic benchmark, as the first pass
is not either. Making the synthetic chunks stands in for the model or the disk and is timed separately, so
the ratios are given with and without it. The parent prints, side by side: disk, peak RSS and time; the sketched Gram's true
relative error and its estimate; the top eigenvalues; the principal angles between the two top-k subspaces
(in parameter space, measured with the exact Gram); ‖Pφ_sketch − Pφ_full‖ / ‖Pφ_full‖; then the ratios.

    python benchmarks/bench_eigen_scale.py                  # 8B shapes, N = 2000 (~45 min on 2 cores)
    python benchmarks/bench_eigen_scale.py --layers 1 --n-harm 100 --n-benign 100     # a quick look
    python benchmarks/bench_eigen_scale.py --stores sketch --sketch-dim 2048           # one store only
    python benchmarks/bench_eigen_scale.py --save-dir runs/bench8b                      # keep each store's result
    python benchmarks/bench_eigen_scale.py --stores sketch --sketch-dim 24576 --full-from runs/bench8b

``--full-from DIR`` compares a sketch against the full store's result saved by an earlier run
(``--save-dir``) instead of recomputing it (the full store takes most of an hour at 8B shape): the errors
and angles are exact comparisons; the time and RSS ratios then come from two runs, which the output says.

Also printed: the best Rayleigh quotients the sketched top-k subspace reaches under the *exact* Fisher, over
the exact λ (``exact_ritz_values``). An earlier version also ran ``--sketch-refine p`` (Rayleigh–Ritz within
the sketched top-p directions, with exact products); its measurements and why it was removed are in
docs/performance.md ("Fisher store: full or sketch"; the script as it was: commit 3e43dcf).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sstmerge.fisher.stats import compute_stats
from sstmerge.linalg.eigen import (
    damping_from_gram,
    generalized_eigh_dense,
    rayleigh_ritz,
    safety_subspace_from_gram,
)
from sstmerge.linalg.projection import project_block, span_coefficients
from sstmerge.linalg.sketch import gram_error_from_halves, module_sketch_width, sketch_halves, sketch_module_chunks

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
        self.generation_seconds = 0.0  # time spent making the synthetic chunks (stands in for the model / disk)

    def _left(self, module: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(_seed(self.seed, module, "L"))
        L = torch.empty(self.n_rows, INNER).uniform_(-1, 1, generator=g)  # (N, 64)
        L[: self.n_harm, :8] *= 4.0  # harmful samples: more gradient mass in a few directions
        return L / INNER**0.5

    def iter_column_chunks(self, module: str, max_elems: int = 1 << 24):
        width = dict((m, a + b) for m, a, b in self.layout)[module]
        t0 = time.perf_counter()
        L = self._left(module)
        step = 4096
        for lo in range(0, width, step):
            hi = min(lo + step, width)
            g = torch.Generator().manual_seed(_seed(self.seed, module, lo))
            R = torch.empty(INNER, hi - lo).uniform_(-1, 1, generator=g)  # (64, c)
            C = L @ R  # (N, c)
            self.generation_seconds += time.perf_counter() - t0
            yield lo, hi, C
            t0 = time.perf_counter()

    def weighted_sum(self, module: str, beta: np.ndarray) -> torch.Tensor:
        """``G_mᵀ β`` (D_m,) or, for β (N, p), (D_m, p) float64, the way the weighted backward pass gets it:
        β contracted first (``R_mᵀ (L_mᵀ β)``), so no per-sample gradient is formed: the cost of p gradients,
        not of N."""
        width = dict((m, a + b) for m, a, b in self.layout)[module]
        Lb = self._left(module).double().T @ torch.as_tensor(beta, dtype=torch.float64)  # (64,) or (64, p)
        parts = []
        for lo in range(0, width, 4096):
            hi = min(lo + 4096, width)
            t0 = time.perf_counter()
            g = torch.Generator().manual_seed(_seed(self.seed, module, lo))
            R = torch.empty(INNER, hi - lo).uniform_(-1, 1, generator=g)  # (64, c)
            self.generation_seconds += time.perf_counter() - t0
            parts.append(R.double().T @ Lb)
        return torch.cat(parts)


def peak_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
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


def _phi(layout) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {m: torch.empty(a + b, dtype=torch.float64).uniform_(-1, 1, generator=gen) for m, a, b in layout}


def _sketch_statistics(src: SyntheticGradients, phi, m_dim: int, folder: Path):
    """The sketch store's statistics: per-module sketches (to disk), sketched Gram + halves, exact G φ, diagonal."""
    n = src.n_rows
    widths = [module_sketch_width(a + b, m_dim) for _, a, b in src.layout]
    # files written with plain writes (a memory map's dirty pages would count as resident memory): the
    # sketches in bfloat16 (the sketch store's default, kept as int16 bits), one block per module, and the
    # diagonal Fisher (harmful, benign) in float64
    sketch_file = open(folder / "sketch.bf16", "wb")
    diag_h_file, diag_b_file = open(folder / "diag_harm.f64", "wb"), open(folder / "diag_benign.f64", "wb")
    K, K_1, K_2 = (torch.zeros(n, n, dtype=torch.float64) for _ in range(3))
    G_phi = torch.zeros(n, dtype=torch.float64)
    for (m, a, b), w in zip(src.layout, widths):
        sq_h, sq_b = [], []

        def chunks(m=m):  # one pass over the gradients: the sketch, and on the way G φ and the diagonal
            nonlocal G_phi
            for lo, hi, C in src.iter_column_chunks(m):
                G_phi += (C @ phi[m][lo:hi].float()).double()
                sq = C.square()
                sq_h.append(sq[: src.n_harm].sum(0, dtype=torch.float64).numpy() / src.n_harm)
                sq_b.append(sq[src.n_harm :].sum(0, dtype=torch.float64).numpy() / (n - src.n_harm))
                yield lo, hi, C

        SG = sketch_module_chunks(chunks(), m, a + b, m_dim, 0).to(torch.bfloat16)  # (N, w)
        sketch_file.write(SG.view(torch.int16).numpy().tobytes())
        diag_h_file.write(np.concatenate(sq_h).tobytes())
        diag_b_file.write(np.concatenate(sq_b).tobytes())
        SG = SG.float()  # the statistics see the stored (rounded) sketch
        halves = sketch_halves(SG, a + b, m_dim)
        k1, k2 = ((h.double() @ h.double().T) for h in halves) if halves is not None else (SG.double() @ SG.double().T,) * 2
        K += (k1 + k2) / 2  # the stored sketch's Gram: SG SGᵀ = (K_1 + K_2) / 2
        K_1 += k1
        K_2 += k2
    for fh in (sketch_file, diag_h_file, diag_b_file):
        fh.close()
    return K.numpy(), G_phi.numpy(), gram_error_from_halves(K_1, K_2), sum(widths)


def child(args) -> None:
    """One store's whole path, in this process; writes its results to ``args.result`` (npz + json)."""
    torch.manual_seed(0)
    layout = llama_layout(args.layers, args.rank, **LLAMA31_8B)
    D = sum(a + b for _, a, b in layout)
    N = args.n_harm + args.n_benign
    src = SyntheticGradients(layout, args.n_harm, args.n_benign)
    phi = _phi(layout)
    out = {"store": args.child, "shape": {"layers": args.layers, "rank": args.rank, "n_harm": args.n_harm,
                                          "n_benign": args.n_benign, "D": D}}
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix=f"sstmerge-bench-{args.child}-") as tmp:
        t0 = time.perf_counter()
        if args.child == "full":
            K, G_phi_m, _ = compute_stats(src, phi, Path(tmp) / "stats")
            G_phi = G_phi_m.sum(0)
            out["gradient_store_bytes"] = N * D * 4  # what a real pass writes and reads back (not written here)
        else:
            K, G_phi, estimate, width = _sketch_statistics(src, phi, args.sketch_dim, Path(tmp))
            out.update(gram_error_estimate=estimate, sketch_columns=width, gradient_store_bytes=0)
        out["t_statistics"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        sub = safety_subspace_from_gram(K, args.n_harm, args.k, dim=D, eps=1e-3)
        out["t_eigen"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        beta = span_coefficients(sub.basis_coef, G_phi)
        if args.child == "full":  # the store's columns read back: every stored element once
            P = torch.cat([torch.cat([project_block(C, beta) for _, _, C in src.iter_column_chunks(m)])
                           for m, _, _ in layout]).float()
        else:  # the weighted pass: β contracted before any per-sample gradient exists
            P = torch.cat([src.weighted_sum(m, beta) for m, _, _ in layout]).float()
        out["t_projection"] = time.perf_counter() - t0
        out["written_bytes"] = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
    out["disk_bytes"] = out["written_bytes"] + out["gradient_store_bytes"]
    out["peak_rss_gib"] = peak_rss_gib()
    out["t_total"] = out["t_statistics"] + out["t_eigen"] + out["t_projection"]
    out["t_generation"] = src.generation_seconds  # included in t_statistics and t_projection
    out["t_store_work"] = out["t_total"] - out["t_generation"]
    arrays = dict(K=K, basis_coef=sub.basis_coef, eigenvalues=sub.eigenvalues, P=P.numpy())
    np.savez(args.result, **arrays)
    Path(args.result).with_suffix(".json").write_text(json.dumps(out))


def principal_angles_deg(K: np.ndarray, B_1: np.ndarray, B_2: np.ndarray) -> np.ndarray:
    """Principal angles (degrees) between span(Gᵀ B_1) and span(Gᵀ B_2), from the exact Gram K = G Gᵀ only:
    each basis is made orthonormal in parameter space (``Bᵀ K B = I``) and the cosines are the singular
    values of ``B_1ᵀ K B_2``."""
    def orth(B):
        C = B.T @ K @ B
        w, V = np.linalg.eigh((C + C.T) / 2)
        keep = w > w.max() * 1e-12
        return B @ V[:, keep] / np.sqrt(w[keep])
    cos = np.linalg.svd(orth(B_1).T @ K @ orth(B_2), compute_uv=False)
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def exact_ritz_values(K: np.ndarray, n_harm: int, B: np.ndarray, dim: int, eps: float = 1e-3) -> np.ndarray:
    """The best generalized Rayleigh quotients ``vᵀF_harm v / vᵀ(F_benign + δI)v`` that span(Gᵀ B) reaches under
    the *exact* Fisher (Ritz values, descending; each ≤ the exact λ_i), from the exact Gram K = G Gᵀ only:
    ``G (Gᵀ B) = K B`` and ``(Gᵀ B)ᵀ(Gᵀ B) = Bᵀ K B``. A subspace close in angle can still fall far short
    here when λ is set by the damping (directions almost orthogonal to every benign gradient)."""
    GV = K @ B
    return rayleigh_ritz(GV, B.T @ GV, n_harm, B.shape[1], damping_from_gram(K, n_harm, dim, eps))[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--n-harm", type=int, default=1000)
    ap.add_argument("--n-benign", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--sketch-dim", type=int, default=2048, help="sketch columns per module (m)")
    ap.add_argument("--stores", default="full,sketch", help="which stores to run (comma-separated)")
    ap.add_argument("--workdir", default=None, help="where the temporary files go (default: the temp dir)")
    ap.add_argument("--save-dir", default=None, help="also keep each store's result (npz + json) in this folder")
    ap.add_argument("--full-from", default=None,
                    help="a folder with full.npz/full.json from an earlier --save-dir run: compare against it")
    ap.add_argument("--child", choices=["full", "sketch"], help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    rel = dense_check()
    print(f"dense check (D = 1000, N = 80): max relative difference of the top eigenvalues = {rel:.2e}")
    layout = llama_layout(args.layers, args.rank, **LLAMA31_8B)
    D = sum(a + b for _, a, b in layout)
    N = args.n_harm + args.n_benign
    print(f"layout: {len(layout)} modules, D = {D:,}; N_h = {args.n_harm}, N_b = {args.n_benign}; "
          f"the gradient matrix would be {N * D * 4 / 2**30:.1f} GiB in float32; sketch m = {args.sketch_dim} per module")
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    res, npz = {}, {}
    shape = {"layers": args.layers, "rank": args.rank, "n_harm": args.n_harm, "n_benign": args.n_benign, "D": D}
    stores = [s for s in args.stores.split(",") if not (args.full_from and s == "full")]
    if args.full_from:
        ref = Path(args.full_from)
        res["full"] = json.loads((ref / "full.json").read_text())
        npz["full"] = dict(np.load(ref / "full.npz"))
        if res["full"].get("shape", shape) != shape:
            raise SystemExit(f"--full-from {ref}: saved for {res['full']['shape']}, this run is {shape}")
        print(f"[full  ] from {ref} (an earlier run{'' if 'shape' in res['full'] else '; its shape was not recorded'}): "
              "time and RSS ratios below compare two runs")
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="sstmerge-bench-eigen-") as tmp:
        for store in stores:
            path = Path(tmp) / f"{store}.npz"
            cmd = [sys.executable, __file__, "--child", store, "--result", str(path)]
            for flag in ("layers", "rank", "n_harm", "n_benign", "k", "sketch_dim", "workdir"):
                if getattr(args, flag) is not None:
                    cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
            subprocess.run(cmd, check=True)
            res[store] = json.loads(path.with_suffix(".json").read_text())
            npz[store] = dict(np.load(path))
            if args.save_dir:
                Path(args.save_dir).mkdir(parents=True, exist_ok=True)
                for suffix in (".npz", ".json"):
                    shutil.copyfile(path.with_suffix(suffix), Path(args.save_dir) / f"{store}{suffix}")
            r = res[store]
            print(f"[{store:6s}] statistics {r['t_statistics']:.1f} s, eigenproblem {r['t_eigen']:.2f} s, "
                  f"projection pass {r['t_projection']:.1f} s, total {r['t_total']:.1f} s (of which making the "
                  f"synthetic gradients {r['t_generation']:.1f} s, the store's own work {r['t_store_work']:.1f} s); peak RSS "
                  f"{r['peak_rss_gib']:.2f} GiB; disk {r['disk_bytes'] / 2**30:.2f} GiB "
                  f"(written {r['written_bytes'] / 2**30:.2f} GiB + gradient store {r['gradient_store_bytes'] / 2**30:.1f} GiB)"
                  + (f"; {r['sketch_columns']:,} sketch columns" if "sketch_columns" in r else ""))
            print(f"[{store:6s}] top λ: " + ", ".join(f"{x:.5g}" for x in npz[store]["eigenvalues"][:5]))
    if {"full", "sketch"} <= set(res):
        f, s = res["full"], res["sketch"]
        K = npz["full"]["K"]
        gram_err = float(np.linalg.norm(npz["sketch"]["K"] - K) / np.linalg.norm(K))
        lam_f, lam_s = npz["full"]["eigenvalues"][: args.k], npz["sketch"]["eigenvalues"][: args.k]
        lam_err = float(np.max(np.abs(lam_s - lam_f) / np.abs(lam_f)))
        angles = principal_angles_deg(K, npz["full"]["basis_coef"], npz["sketch"]["basis_coef"])
        P_f, P_s = npz["full"]["P"].astype(np.float64), npz["sketch"]["P"].astype(np.float64)
        p_err = float(np.linalg.norm(P_s - P_f) / np.linalg.norm(P_f))
        print(f"sketched Gram relative error: true {gram_err:.3e}, estimated (two halves) {s['gram_error_estimate']:.3e}")
        print(f"top-{args.k} eigenvalues: max relative difference {lam_err:.3e}")
        lam_all = npz["full"]["eigenvalues"]
        if len(lam_all) > args.k:  # Davis–Kahan: a subspace moves by about (perturbation / gap to the next λ)
            gap = (lam_all[args.k - 1] - lam_all[args.k]) / lam_all[args.k - 1]
            print(f"exact spectrum: λ_1 … λ_{args.k + 1} = " + ", ".join(f"{x:.4g}" for x in lam_all[: args.k + 1])
                  + f"; relative gap after λ_{args.k}: {gap:.2e}")
        print(f"principal angles between the top-{args.k} subspaces (degrees): "
              + ", ".join(f"{a:.3f}" for a in angles))
        ritz = exact_ritz_values(K, args.n_harm, npz["sketch"]["basis_coef"], D)
        print(f"the sketched top-{args.k} subspace under the exact Fisher: Ritz value / exact λ = "
              + ", ".join(f"{x:.3g}" for x in ritz / lam_f[: len(ritz)]))
        print(f"projected update P φ: ‖sketch − full‖ / ‖full‖ = {p_err:.3e}")
        print(f"RATIO disk full / sketch = {f['disk_bytes'] / s['disk_bytes']:.1f}")
        print(f"RATIO time full / sketch (statistics + eigen + projection) = {f['t_total'] / s['t_total']:.2f}")
        print(f"RATIO time full / sketch (statistics only) = {f['t_statistics'] / s['t_statistics']:.2f}")
        print(f"RATIO time full / sketch (the store's own work: without making the synthetic gradients) = "
              f"{f['t_store_work'] / s['t_store_work']:.2f}")
        print(f"RATIO peak RSS full / sketch = {f['peak_rss_gib'] / s['peak_rss_gib']:.2f}")
        print(f"RATIO sketched Gram relative error / 2 % target = {gram_err / 0.02:.3f}")
    print(f"RATIO reduced vs dense eigenvalues max relative difference = {rel:.2e}")


if __name__ == "__main__":
    main()
