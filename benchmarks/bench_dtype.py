"""float32 vs bfloat16 weights for evaluation on this machine: the prompt pass and a decoding step, side by side.

Evaluation loads models in float32. bf16 halves the bytes each decoding step streams, but on a CPU without
bf16 matrix units (AVX-512 BF16 / AMX) the products are converted and run slower. Printed: the CPU's bf16
flags, the time of a prompt pass (``--rows`` × ``--prompt-tokens``, last-position logits only) and of a
decoding step with the KV cache, for each dtype (best of ``--repeat``), and whether the greedy next tokens of
the prompt pass agree. Ratios come last (> 1: bf16 faster).

    python benchmarks/bench_dtype.py                       # SmolLM2, 16 rows × 66 tokens (a jailbreak batch)
    python benchmarks/bench_dtype.py --rows 64 --threads 2
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("SSTMERGE_QUIET", "1")

import torch  # noqa: E402

from _common import print_ratios  # noqa: E402


def cpu_bf16_flags() -> list[str]:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if "bf16" in f or f.startswith("amx"))


@torch.inference_mode()
def measure(model, ids: torch.Tensor, repeat: int) -> tuple[float, float, torch.Tensor]:
    """Best-of-``repeat`` seconds of a prompt pass and of one decoding step; the prompt pass's greedy tokens."""
    prefill, step, tokens = float("inf"), float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = model(ids, use_cache=True, logits_to_keep=1)
        prefill = min(prefill, time.perf_counter() - t0)
        tokens = out.logits[:, -1].argmax(-1)
        t0 = time.perf_counter()
        model(tokens[:, None], past_key_values=out.past_key_values, use_cache=True)
        step = min(step, time.perf_counter() - t0)
    return prefill, step, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="smollm2")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=66)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from sstmerge.io.models import load_causal_lm

    model, _ = load_causal_lm(args.base)
    ids = torch.randint(100, model.config.vocab_size - 1, (args.rows, args.prompt_tokens),
                        generator=torch.Generator().manual_seed(0))
    print(f"base {args.base}; {args.rows} rows × {args.prompt_tokens} prompt tokens; threads {args.threads}; "
          f"CPU bf16 flags: {cpu_bf16_flags() or 'none'}")
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        measure(model, ids, 1)  # warm-up
        results[dtype] = measure(model, ids, args.repeat)
        prefill, step, _ = results[dtype]
        print(f"{str(dtype):15s} prompt pass {prefill:7.3f} s ({args.rows * args.prompt_tokens / prefill:6.0f} tokens/s)"
              f"   decoding step {1000 * step:7.1f} ms")
    same = int((results[torch.float32][2] == results[torch.bfloat16][2]).sum())
    print(f"greedy next tokens equal in float32 and bfloat16: {same}/{args.rows}")
    print_ratios({"prompt_pass_bf16_speedup": results[torch.float32][0] / results[torch.bfloat16][0],
                  "decoding_step_bf16_speedup": results[torch.float32][1] / results[torch.bfloat16][1]})


if __name__ == "__main__":
    main()
