"""Full vs sketch Fisher store on the real SmolLM2 (issue #16): the same subspace?

One Fisher pass per store over the same point (SmolLM2 + utility adapters merged + the safety adapter as
LoRA) and the same data (the merge default: 64 harmful + 64 benign training examples), each in its own cache
folder: the exact float32 store, the bfloat16 store, and sketch stores of several m. For each, printed side
by side against the exact store: time of the pass (and of the weighted backward pass that maps β back),
disk, the Gram's true relative error and the store's own estimate, the top-k eigenvalues, the principal
angles between the top-k safety subspaces (measured in parameter space with the exact Gram), the best
Rayleigh quotients each subspace reaches under the exact Fisher (over the exact λ), and the relative
difference of the projected update ``P φ`` (what ``residual``/``layerwise`` blend in).

    python benchmarks/bench_fisher_store.py --utility runs/A5 --utility runs/A6 --safety runs/A7
    python benchmarks/bench_fisher_store.py ... --sketch-dims 512,2048,8192 --k 10

Adapters default to the newest ``A5-*``, ``A6-*``, ``A7-*`` of a demo run's ``adapters/`` (``--run``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sstmerge import read_adapter
from sstmerge.fisher.point import flat_phi
from sstmerge.fisher.run import FisherSettings, compute_fisher
from sstmerge.io.models import load_base_info
from sstmerge.merge.subspace import project_safety

from bench_eigen_scale import exact_ritz_values, principal_angles_deg  # noqa: E402  (benchmarks/ is the script's folder)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def newest(run: Path, prefix: str) -> Path:
    found = sorted((run / "adapters").glob(f"{prefix}-*"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no {prefix}-* adapter under {run / 'adapters'}: pass --utility/--safety")
    return found[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="smollm2")
    ap.add_argument("--utility", action="append", default=None)
    ap.add_argument("--safety", default=None)
    ap.add_argument("--run", default="runs/demo", help="a demo run folder to take the adapters from")
    ap.add_argument("--sketch-dims", default="256,2048,8192")
    ap.add_argument("--max-samples", type=int, default=64)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--eps", type=float, default=1e-3, help="relative damping ε (the merge default)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--cache-dir", default=None, help="where the Fisher entries go (default: a temp dir)")
    args = ap.parse_args()
    torch.manual_seed(0)
    run = Path(args.run)
    utility = [read_adapter(p) for p in (args.utility or [newest(run, "A5"), newest(run, "A6")])]
    safety = read_adapter(args.safety or newest(run, "A7"))
    base = load_base_info(args.base)
    phi = flat_phi(safety)
    configs = [("full float32", dict(store="full", store_dtype="float32")),
               ("full bfloat16", dict(store="full", store_dtype="bfloat16"))]
    configs += [(f"sketch m={m}", dict(store="sketch", sketch_dim=int(m))) for m in args.sketch_dims.split(",")]
    print(f"base {args.base}; {len(utility)} utility adapter(s); D = {sum(v.numel() for v in phi.values()):,} "
          f"({len(phi)} modules); k = {args.k}, ε = {args.eps}; torch threads {torch.get_num_threads()}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="sstmerge-bench-store-") as tmp:
        cache = Path(args.cache_dir or tmp)
        ref = None
        for name, extra in configs:
            settings = FisherSettings(max_samples=args.max_samples, batch_size=args.batch_size, **extra)
            t0 = time.perf_counter()
            fr = compute_fisher(base, utility, [1.0] * len(utility), safety, settings, cache)
            t_pass = time.perf_counter() - t0
            t0 = time.perf_counter()
            proj = project_safety(fr, phi, k=args.k, scope="global", estimator="empirical", eps=args.eps, clamp_k=True)
            t_proj = time.perf_counter() - t0
            K = fr.stats.gram_total
            lam = np.asarray(proj.spectra["global"][: args.k])
            P = torch.cat([proj.P_phi[m] for m in sorted(proj.P_phi)])
            store = fr.meta["store"]
            r = {"name": name, "t_pass": t_pass if not fr.meta.get("cache_hit") else float("nan"), "t_proj": t_proj,
                 "disk": folder_bytes(fr.folder), "store_bytes": store["disk_bytes"],
                 "estimate": store.get("gram_rel_error_estimate"), "lam": lam, "K": K,
                 "B": proj.basis_coef["global"], "P": P}
            if ref is None:
                ref = r
            r["gram_err"] = float(np.linalg.norm(K - ref["K"]) / np.linalg.norm(ref["K"]))
            r["lam_err"] = float(np.max(np.abs(r["lam"] - ref["lam"]) / np.abs(ref["lam"])))
            r["angles"] = principal_angles_deg(ref["K"], ref["B"], r["B"])
            r["ritz"] = exact_ritz_values(ref["K"], fr.stats.n_harm, r["B"], fr.stats.dim(), args.eps) / ref["lam"][: r["B"].shape[1]]
            r["P_err"] = float((P - ref["P"]).norm() / ref["P"].norm())
            rows.append(r)
            print(f"[{name:14s}] pass {r['t_pass']:.1f} s, projection {t_proj:.1f} s, entry {r['disk'] / 2**20:.1f} MiB "
                  f"(store {r['store_bytes'] / 2**20:.1f} MiB); Gram error {r['gram_err']:.2e} (estimate "
                  f"{r['estimate'] if r['estimate'] is None else format(r['estimate'], '.2e')}); top-{args.k} λ "
                  f"max rel diff {r['lam_err']:.2e}; largest principal angle {r['angles'].max():.2f}°; "
                  f"P φ rel diff {r['P_err']:.2e}")
            if r is ref and len(proj.spectra["global"]) > args.k:
                ev = proj.spectra["global"]
                gap = (ev[args.k - 1] - ev[args.k]) / ev[args.k - 1]
                print(f"exact spectrum: relative gap after λ_{args.k}: {gap:.2e} (subspaces move by about error / gap)")
            print(f"[{name:14s}] top λ: " + ", ".join(f"{x:.4g}" for x in r["lam"][:5]) +
                  "; angles: " + ", ".join(f"{a:.2f}" for a in r["angles"]) +
                  "; under the exact Fisher, Ritz value / exact λ: " + ", ".join(f"{x:.3g}" for x in r["ritz"][:5]))
    for r in rows[1:]:
        print(f"RATIO store disk full float32 / {r['name']} = {ref['store_bytes'] / r['store_bytes']:.1f}")
    for r in rows[1:]:
        print(f"RATIO projection time {r['name']} / full float32 = {r['t_proj'] / ref['t_proj']:.2f}")


if __name__ == "__main__":
    main()
