"""Batched vs one-by-one greedy generation on SmolLM2-135M-Instruct (CPU): wall time and generated tokens/s.

The evaluation suites generate with :func:`sstmerge.eval.generate.generate` (prompts sorted by length,
left-padded per batch, greedy, stopping at the end-of-turn ids). This script loads the model once, takes
prompts from the bundled evaluation data (harmful_eval and benign_eval, alternating: short refusals and
longer answers), and runs the same generation at batch size 1 (one by one) and at larger batch sizes, one
after the other in one process, with torch's default thread count. With ``--repeat R`` the batch sizes
are run in R interleaved rounds and each keeps its fastest round (other jobs on a shared machine make single
timings noisy).

    python benchmarks/bench_generation.py                    # 64 prompts, 64 new tokens, batch 1,8,16,32
                                                             # (~8 min on 2 cores; --repeat 2: twice that)
    python benchmarks/bench_generation.py --n-prompts 16 --max-new-tokens 32 --batch-sizes 1,8   # a quick look

Generated tokens are counted per prompt up to and including its first end-of-turn id (the padding that
finished rows carry while the rest of their batch runs is not counted). Greedy outputs are compared with
batch 1: left padding changes the shapes of the matrix products, and float rounding can flip a greedy
choice now and then, so the share of identical completions is reported as measured. Ratios come last.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time

os.environ.setdefault("SSTMERGE_QUIET", "1")  # no progress bars between the table rows

import torch  # noqa: E402
import transformers  # noqa: E402

from sstmerge.eval.data import load_prompts, resolve_eval_data  # noqa: E402
from sstmerge.eval.generate import generate_ids, render_prompt  # noqa: E402
from sstmerge.io.models import load_causal_lm  # noqa: E402


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def bundled_prompts(n: int) -> list[str]:
    """``n`` prompts alternating harmful_eval / benign_eval (48 + 48 bundled)."""
    harmful = [p.prompt for p in load_prompts(resolve_eval_data("bundled:harmful_eval"))]
    benign = [p.prompt for p in load_prompts(resolve_eval_data("bundled:benign_eval"))]
    mixed = [p for pair in zip(harmful, benign) for p in pair]
    if n > len(mixed):
        raise SystemExit(f"--n-prompts {n}: the bundled harmful_eval + benign_eval hold {len(mixed)} prompts")
    return mixed[:n]


def row_utilisation(tokenizer, prompts: list[str], ids: list[list[int]], batch_size: int) -> float:
    """Real generated tokens / row-steps computed, with the batches ``generate`` forms (sorted by prompt length):
    a batch runs until its longest completion ends, and its finished rows keep being computed until then."""
    lengths = [len(tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    slots = 0
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        slots += len(idx) * max(len(ids[i]) for i in idx)
    return sum(len(x) for x in ids) / slots


def first_difference(a: list[int], b: list[int]) -> int:
    for k, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return k
    return min(len(a), len(b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="smollm2", help="alias or local HF folder (default: smollm2)")
    ap.add_argument("--n-prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", default="1,8,16,32", help="comma-separated; 1 (one by one) is always run first")
    ap.add_argument("--engine", choices=["cached", "transformers"], default="cached",
                    help="generation engine (the table in docs/performance.md: transformers, before cached existed)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds over all batch sizes; the fastest round of each counts")
    ap.add_argument("--cache-dir", default=None, help="sstmerge cache (default: $SSTMERGE_CACHE or ~/.cache/sstmerge)")
    args = ap.parse_args()
    sizes = sorted({1, *(int(x) for x in args.batch_sizes.split(",") if x.strip())})

    t0 = time.perf_counter()
    model, tok = load_causal_lm(args.base, cache_dir=args.cache_dir)
    load_s = time.perf_counter() - t0
    prompts = bundled_prompts(args.n_prompts)
    print(f"machine: {cpu_name()}, {os.cpu_count()} logical CPUs, load average {os.getloadavg()[0]:.2f} at start")
    print(f"python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"transformers {transformers.__version__}")
    print(f"model: {args.base} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
          f"{next(model.parameters()).dtype}, {next(model.parameters()).device}), loaded in {load_s:.1f} s")
    print(f"prompts: {len(prompts)} (bundled harmful_eval + benign_eval, alternating), "
          f"max_new_tokens {args.max_new_tokens}, greedy\n")

    generate_ids(model, tok, prompts[:2], max_new_tokens=4, batch_size=2, engine=args.engine)  # warm-up: first-call allocations

    runs: dict[int, dict] = {}
    for rnd in range(args.repeat):  # round-robin: a burst of load from other jobs hits a round, not a batch size
        for bs in sizes:
            gc.collect()
            t0 = time.perf_counter()
            ids = generate_ids(model, tok, prompts, max_new_tokens=args.max_new_tokens, batch_size=bs, engine=args.engine)
            texts = [tok.decode(x, skip_special_tokens=True).strip() for x in ids]  # what generate() returns
            wall = time.perf_counter() - t0
            n_tok = sum(len(x) for x in ids)
            print(f"  round {rnd + 1}, batch {bs:>3}: {wall:7.1f} s, {n_tok} tokens, {n_tok / wall:6.1f} tokens/s",
                  flush=True)
            if bs in runs and ids != runs[bs]["ids"]:
                print(f"  note: batch {bs} gave different tokens in round {rnd + 1} than before")
            if bs not in runs or wall < runs[bs]["wall"]:
                runs[bs] = {"wall": wall, "tokens": n_tok, "ids": ids, "texts": texts,
                            "util": row_utilisation(tok, prompts, ids, bs)}

    ref = runs[1]
    n = len(prompts)
    print(f"\n{'batch':>5} | {'wall s':>7} | {'gen tokens':>10} | {'tokens/s':>8} | {'prompts/s':>9} | "
          f"{'row use':>7} | {'same text as b1':>15} | {'same ids as b1':>14}")
    print("-" * 98)
    for bs, r in runs.items():
        same_text = sum(a == b for a, b in zip(r["texts"], ref["texts"]))
        same_ids = sum(a == b for a, b in zip(r["ids"], ref["ids"]))
        print(f"{bs:>5} | {r['wall']:7.1f} | {r['tokens']:>10} | {r['tokens'] / r['wall']:8.1f} | "
              f"{n / r['wall']:9.2f} | {r['util']:7.0%} | {f'{same_text}/{n} ({same_text / n:.0%})':>15} | "
              f"{f'{same_ids}/{n} ({same_ids / n:.0%})':>14}")
    print("row use: generated tokens / (rows x steps) computed; a batch runs until its longest completion ends")

    for bs, r in runs.items():
        diff = [first_difference(a, b) for a, b in zip(r["ids"], ref["ids"]) if a != b]
        if diff:
            print(f"batch {bs}: {len(diff)} completion(s) differ from batch 1, first differing generated token at "
                  f"position {sorted(diff)} (median {statistics.median(diff):.0f})")
    print(f"load average {os.getloadavg()[0]:.2f} at the end (other jobs on the machine make timings noisy)\n")

    base_tps = ref["tokens"] / ref["wall"]
    for bs, r in runs.items():
        if bs != 1:
            print(f"throughput batch {bs} / batch 1 = {r['tokens'] / r['wall'] / base_tps:.1f}x "
                  f"(wall time batch 1 / batch {bs} = {ref['wall'] / r['wall']:.1f}x)")


if __name__ == "__main__":
    main()
