"""Fisher pass vs plain training forward+backward over the same batches (SmolLM2-135M by default).

Three ways over the same examples and batches (bundled harmful + benign training data, chat template,
answer-token loss), at the same Fisher point (base + safety LoRA on all seven projections):

- ``train``:   plain batched training step without the optimizer: mean NLL, ``loss.backward()`` into the
               LoRA weights (the cost users know from fine-tuning);
- ``fisher``:  the Fisher pass as ``compute_fisher`` runs it: batched per-sample gradients
               (:func:`sstmerge.fisher.gradients.batched_per_sample_gradients`) written to a gradient store;
- ``looped``:  one backward per example (the previous implementation), on a subset, scaled per example.

    python benchmarks/bench_fisher_pass.py [--base smollm2] [--n 64] [--batch-size 8] [--rank 16] [--device cpu]

Prints seconds and examples/s per way, then the ratios last. ``--safety PATH`` uses a real adapter;
by default a random non-zero rank-``--rank`` adapter is created (speed depends on shapes, not values).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from sstmerge.data.chat import collate, encode_example
from sstmerge.data.jsonl import bundled_path, load_examples
from sstmerge.fisher.gradients import answer_log_likelihood, iter_batched_gradients, looped_per_sample_gradients
from sstmerge.fisher.point import load_fisher_point, module_layout
from sstmerge.fisher.store import GradientStore
from sstmerge.io.adapter import read_adapter
from sstmerge.io.models import load_base_info, load_causal_lm

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_adapter(base_spec: str, out: Path, rank: int) -> Path:
    from peft import LoraConfig, get_peft_model

    model, _ = load_causal_lm(base_spec)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(str(out))
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="smollm2")
    ap.add_argument("--safety", default=None)
    ap.add_argument("--n", type=int, default=64, help="examples (half harmful, half benign)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--looped-n", type=int, default=16, help="examples for the looped reference (spread over the lengths)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    base = load_base_info(args.base)
    with tempfile.TemporaryDirectory(prefix="sstmerge-bench-fisher-") as tmp:
        safety_path = Path(args.safety) if args.safety else random_adapter(args.base, Path(tmp) / "safety", args.rank)
        safety = read_adapter(safety_path)
        model, tok, layers = load_fisher_point(base, [], [], safety, device=args.device)
        examples = (load_examples(bundled_path("harmful_train"), max_samples=args.n // 2, seed=0)
                    + load_examples(bundled_path("benign_train"), max_samples=args.n - args.n // 2, seed=0))
        encoded = [encode_example(tok, e, args.max_length) for e in examples]
        n = len(encoded)
        tokens = sum(len(e["input_ids"]) for e in encoded)
        D = sum(a + b for _, a, b in module_layout(safety))
        order = sorted(range(n), key=lambda i: (-len(encoded[i]["input_ids"]), i))
        batches = [order[s : s + args.batch_size] for s in range(0, n, args.batch_size)]  # the Fisher pass's batches
        print(f"model {args.base}, safety LoRA on {len(layers)} modules, D = {D:,}; {n} examples, {tokens} tokens, "
              f"batch size {args.batch_size}, device {args.device}, {torch.get_num_threads()} threads")

        def train_pass() -> None:
            for rows in batches:
                b = collate([encoded[i] for i in rows], 0)  # right padding, as the Fisher pass pads
                ids, mask, labels = (b[k].to(args.device) for k in ("input_ids", "attention_mask", "labels"))
                logits = model(input_ids=ids, attention_mask=mask).logits
                n_tok = (labels[:, 1:] != -100).sum()
                loss = -answer_log_likelihood(logits, labels).sum() / n_tok
                loss.backward()
                model.zero_grad(set_to_none=True)

        store = GradientStore.open(Path(tmp) / "store", n, n // 2, module_layout(safety))

        def fisher_pass() -> None:
            for rows, grads in iter_batched_gradients(model, layers, encoded, range(n), args.batch_size):
                store.write_rows(rows, grads)
                store.mark_done(rows)

        def looped_pass() -> None:
            for _ in looped_per_sample_gradients(model, layers, [encoded[i] for i in order[:: max(1, n // args.looped_n)][: args.looped_n]]):
                pass

        warm = collate([encoded[i] for i in batches[0]], 0)  # warm-up (allocator, kernels)
        model(input_ids=warm["input_ids"].to(args.device), attention_mask=warm["attention_mask"].to(args.device))
        results = {}
        for name, fn in (("train", train_pass), ("fisher", fisher_pass), ("train (again)", train_pass),
                         ("fisher (again)", fisher_pass), ("looped", looped_pass)):
            sync(args.device)
            t0 = time.perf_counter()
            fn()
            sync(args.device)
            dt = time.perf_counter() - t0
            count = args.looped_n if name == "looped" else n
            results[name] = dt / count  # seconds per example
            print(f"{name:>15}: {dt:8.2f} s for {count} examples = {count / dt:7.2f} examples/s")
        train = min(results["train"], results["train (again)"])
        fisher = min(results["fisher"], results["fisher (again)"])
        print(f"RATIO fisher pass / training fwd+bwd (same batches) = {fisher / train:.2f}")
        print(f"RATIO looped per-example backward / batched fisher pass = {results['looped'] / fisher:.2f}")


if __name__ == "__main__":
    main()
