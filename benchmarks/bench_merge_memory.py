"""Memory-bounded merging: streamed merge vs load-everything, on three Llama-3.1-8B-shaped LoRA adapters.

    python benchmarks/bench_merge_memory.py [--layers 32] [--rank 16] [--dtype bfloat16|float32] [--workdir DIR]
                                            [--threads N]

Writes three synthetic PEFT adapters with Llama-3.1-8B shapes (hidden 4096, intermediate 14336, 8 KV heads ×
128 = 1024; LoRA rank r on q, k, v, o, gate, up, down of every layer: 41.9M parameters at r = 16, 32 layers;
seeded random non-zero A and B), then merges them (direct mode: two utility adapters + one safety adapter,
output rank 3r, written in the adapters' dtype) twice, each in a fresh process:

- streamed: ``SSTMerger.merge_to`` (lazy inputs, module-by-module output; what ``sst-merge merge`` does),
- in-memory: ``SSTMerger.merge`` + ``save_merged_adapter`` (every adapter and the merged one in RAM),

and reports wall time, merge time (inside the child, imports excluded), the child's RSS right after its imports
(the constant) and its peak RSS (``ru_maxrss``), checks that both outputs are byte-identical, and prints the
ratios last. The claim checked: streamed peak ≤ 2 × the largest adapter + the constant.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fmt_bytes, measure_subprocess, peak_rss_bytes, print_ratios, rss_bytes  # noqa: E402

HIDDEN, INTERMEDIATE, KV = 4096, 14336, 8 * 128
SHAPES = {  # leaf -> (d_out, d_in) of the Linear weight
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (KV, HIDDEN),
    "self_attn.v_proj": (KV, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
    "mlp.up_proj": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}
N_ADAPTERS = 3


def module_shapes(layers: int) -> dict[str, tuple[int, int]]:
    return {f"model.layers.{i}.{leaf}": shape for i in range(layers) for leaf, shape in SHAPES.items()}


def write_synthetic_adapter(folder: Path, layers: int, rank: int, dtype_name: str, seed: int) -> None:
    """A PEFT folder with random A (r, d_in), B (d_out, r) per module, written one module at a time."""
    import torch

    from sstmerge.io.safetensors_stream import SafetensorsStreamWriter

    dtype = getattr(torch, dtype_name)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = module_shapes(layers)
    specs = {}
    for m, (d_out, d_in) in shapes.items():
        specs[f"base_model.model.{m}.lora_A.weight"] = (dtype, (rank, d_in))
        specs[f"base_model.model.{m}.lora_B.weight"] = (dtype, (d_out, rank))
    gen = torch.Generator().manual_seed(seed)
    with SafetensorsStreamWriter(folder / "adapter_model.safetensors", specs, metadata={"format": "pt"}) as w:
        for m, (d_out, d_in) in shapes.items():
            w.write(f"base_model.model.{m}.lora_A.weight", (torch.randn(rank, d_in, generator=gen) / d_in**0.5).to(dtype))
            w.write(f"base_model.model.{m}.lora_B.weight", (torch.randn(d_out, rank, generator=gen) * 0.01).to(dtype))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "meta-llama/Llama-3.1-8B",
        "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
        "target_modules": sorted({leaf.rsplit(".", 1)[-1] for leaf in SHAPES}), "rank_pattern": {}, "alpha_pattern": {},
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def prepare_adapters(workdir: Path, layers: int, rank: int, dtype_name: str) -> list[Path]:
    """Write the adapters (reused when ``workdir`` already holds them for the same settings)."""
    root = workdir / "adapters"
    spec = {"layers": layers, "rank": rank, "dtype": dtype_name, "n": N_ADAPTERS, "format": 1}
    folders = [root / f"adapter{i}" for i in range(N_ADAPTERS)]
    marker = root / "spec.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec and all(
        (f / "adapter_model.safetensors").is_file() for f in folders
    ):
        return folders
    shutil.rmtree(root, ignore_errors=True)
    for i, folder in enumerate(folders):
        write_synthetic_adapter(folder, layers, rank, dtype_name, seed=1000 + i)
    marker.write_text(json.dumps(spec))
    return folders


def child(variant: str, out: Path, dtype_name: str, adapters: list[Path]) -> None:
    """Run one merge in this (fresh) process; print a JSON line with the measurements."""
    os.environ.setdefault("SSTMERGE_QUIET", "1")
    import torch  # noqa: F401  (the constant: interpreter + torch + sstmerge)

    from sstmerge.merge.merger import SSTMerger, save_merged_adapter

    baseline = rss_bytes()
    t0 = time.perf_counter()
    merger = SSTMerger(None, mode="direct", dtype=dtype_name)
    utility, safety = [str(a) for a in adapters[:-1]], str(adapters[-1])
    if variant == "streamed":
        result = merger.merge_to(utility, safety, out)
    else:
        result = merger.merge(utility, safety)
        save_merged_adapter(result, out)
    seconds = time.perf_counter() - t0
    print(json.dumps({"baseline_rss_bytes": baseline, "merge_seconds": seconds, "hwm_bytes": peak_rss_bytes(),
                      "rank": result.report["output"]["rank"], "n_modules": result.report["output"]["n_modules"]}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--workdir", type=Path, default=None, help="keep adapters and outputs here (reused)")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP/MKL threads of the merge processes (default: inherited; 1 is steadier on a busy machine)")
    parser.add_argument("--child", choices=["streamed", "in-memory"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("adapters", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.out, args.dtype, args.adapters)
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-merge-memory-"))
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    adapters = prepare_adapters(workdir, args.layers, args.rank, args.dtype)
    sizes = [(a / "adapter_model.safetensors").stat().st_size for a in adapters]
    largest = max(sizes)
    n_params = sum(args.rank * (d_in + d_out) for d_out, d_in in module_shapes(args.layers).values())
    print(f"{N_ADAPTERS} synthetic Llama-3.1-8B-shaped LoRA adapters: {args.layers} layers, rank {args.rank}, "
          f"{args.dtype}, {len(module_shapes(args.layers))} modules, {n_params:,} parameters each "
          f"(written in {time.perf_counter() - t0:.1f} s to {workdir})")
    print(f"largest adapter: {largest:,} bytes ({fmt_bytes(largest)}); merge processes use "
          f"{args.threads or os.environ.get('OMP_NUM_THREADS', 'default')} threads")

    results = {}
    env = {**os.environ, "SSTMERGE_QUIET": "1"}
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    for variant in ("streamed", "in-memory"):
        out = workdir / f"out-{variant}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--out", str(out),
               "--dtype", args.dtype, *map(str, adapters)]
        m = measure_subprocess(cmd, env=env)
        info = json.loads(m["stdout"].strip().splitlines()[-1])
        results[variant] = {**m, **info, "out": out}

    print(f"merged adapter: rank {results['streamed']['rank']}, {results['streamed']['n_modules']} modules, "
          f"{fmt_bytes((results['streamed']['out'] / 'adapter_model.safetensors').stat().st_size)}")
    print(f"{'variant':<10} {'wall s':>8} {'merge s':>8} {'RSS after imports':>18} {'peak RSS':>12} {'peak - imports':>15}")
    for variant, r in results.items():
        print(f"{variant:<10} {r['seconds']:>8.2f} {r['merge_seconds']:>8.2f} {fmt_bytes(r['baseline_rss_bytes']):>18} "
              f"{fmt_bytes(r['peak_rss_bytes']):>12} {fmt_bytes(r['peak_rss_bytes'] - r['baseline_rss_bytes']):>15}")
    same = all(filecmp.cmp(results["streamed"]["out"] / name, results["in-memory"]["out"] / name, shallow=False)
               for name in ("adapter_config.json", "adapter_model.safetensors"))
    reports = [json.loads((r["out"] / "merge_report.json").read_text()) for r in results.values()]
    same_report = reports[0]["modules"] == reports[1]["modules"] and reports[0]["output"] == reports[1]["output"]
    print(f"outputs byte-identical: {'yes' if same else 'NO'}; report modules/output identical: "
          f"{'yes' if same_report else 'NO'}")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    if not (same and same_report):
        sys.exit("the streamed and in-memory merges differ")
    s, m = results["streamed"], results["in-memory"]
    print_ratios({
        "streamed peak / largest adapter": s["peak_rss_bytes"] / largest,
        "streamed (peak - RSS after imports) / largest adapter": (s["peak_rss_bytes"] - s["baseline_rss_bytes"]) / largest,
        "in-memory peak / streamed peak": m["peak_rss_bytes"] / s["peak_rss_bytes"],
        "time streamed / in-memory": s["merge_seconds"] / m["merge_seconds"],
    })


if __name__ == "__main__":
    main()
