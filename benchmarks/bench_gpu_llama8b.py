"""GPU figures on a randomly initialised Llama-3.1-8B-shaped model in bf16 (no download needed).

Measures, with a rank-16 LoRA on all seven projections (D = 42M):
- Fisher pass throughput: batched per-sample gradients (the code ``sst-merge fisher`` runs) vs a plain
  training forward+backward over the same batches (examples/s, tokens/s, ratio);
- evaluation throughput: batched greedy generation tokens/s vs one prompt at a time.
(Merge time and memory do not use the GPU: ``benchmarks/bench_merge_memory.py``.)

    python benchmarks/bench_gpu_llama8b.py                      # on a CUDA GPU (bf16, ~17 GB of weights)
    python benchmarks/bench_gpu_llama8b.py --device cpu --layers 2 --hidden 256 --intermediate 512 --vocab 1024
                                                                # the same code path, scaled down, on a CPU

Prints the figures, then the ratios last. Random weights: speed depends on shapes, not values.
"""

from __future__ import annotations

import argparse
import time

import torch

from sstmerge.data.chat import collate
from sstmerge.fisher.gradients import answer_log_likelihood, batched_per_sample_gradients
from sstmerge.fisher.point import lora_layers

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(args):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                      max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256, help="tokens per example (the answer is the second half)")
    ap.add_argument("--gen-prompts", type=int, default=32)
    ap.add_argument("--gen-batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run on a GPU machine, or scale down with --device cpu --layers 2 ...")

    model = build(args)
    layers = lora_layers(model)
    D = sum(l.A.weight.numel() + l.B.weight.numel() for l in layers.values())
    gen = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(args.batch_size * args.batches):
        ids = torch.randint(0, args.vocab, (args.seq,), generator=gen).tolist()
        labels = [-100] * (args.seq // 2) + ids[args.seq // 2:]
        examples.append({"input_ids": ids, "labels": labels})
    batches = [examples[i : i + args.batch_size] for i in range(0, len(examples), args.batch_size)]
    print(f"Llama-shaped model: {args.layers} layers, hidden {args.hidden}, {args.dtype} on {args.device}; "
          f"LoRA rank {args.rank} on {len(layers)} modules, D = {D:,}")

    def train_pass():
        for batch in batches:
            b = collate(batch, 0)  # right padding, as the Fisher pass pads
            ids, mask, labels = (b[k].to(args.device) for k in ("input_ids", "attention_mask", "labels"))
            logits = model(input_ids=ids, attention_mask=mask).logits
            loss = -answer_log_likelihood(logits, labels).sum() / (labels[:, 1:] != -100).sum()
            loss.backward()
            model.zero_grad(set_to_none=True)

    def fisher_pass():
        for batch in batches:
            grads = batched_per_sample_gradients(model, layers, batch)
            for g in grads.values():
                g.to("cpu", non_blocking=True)  # the pass moves rows to the host for the gradient store

    batched_per_sample_gradients(model, layers, batches[0])  # warm-up
    timings = {}
    for name, fn in (("train", train_pass), ("fisher", fisher_pass), ("train", train_pass), ("fisher", fisher_pass)):
        sync(args.device)
        t0 = time.perf_counter()
        fn()
        sync(args.device)
        timings[name] = min(timings.get(name, float("inf")), time.perf_counter() - t0)
    n_ex, n_tok = len(examples), len(examples) * args.seq
    for name, dt in timings.items():
        print(f"{name:>7}: {n_ex / dt:8.2f} examples/s, {n_tok / dt:10.0f} tokens/s")
    if args.device.startswith("cuda"):
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")

    # evaluation: greedy generation, batched vs one at a time (random prompts of 64-192 tokens, no EOS stop)
    prompts = [torch.randint(0, args.vocab, (64 + 8 * (i % 17),), generator=gen) for i in range(args.gen_prompts)]

    @torch.inference_mode()
    def generate(batch_size: int) -> float:
        produced, t0 = 0, time.perf_counter()
        for s in range(0, len(prompts), batch_size):
            chunk = prompts[s : s + batch_size]
            T = max(len(p) for p in chunk)
            ids = torch.zeros(len(chunk), T, dtype=torch.long)
            mask = torch.zeros(len(chunk), T, dtype=torch.long)
            for b, p in enumerate(chunk):  # left padding
                ids[b, T - len(p):], mask[b, T - len(p):] = p, 1
            out = model.generate(input_ids=ids.to(args.device), attention_mask=mask.to(args.device), do_sample=False,
                                 max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens, pad_token_id=0)
            produced += (out.shape[1] - T) * len(chunk)
        sync(args.device)
        return produced / (time.perf_counter() - t0)

    one = generate(1)
    many = generate(args.gen_batch)
    print(f"generation: batch 1 {one:.0f} tokens/s, batch {args.gen_batch} {many:.0f} tokens/s")
    print(f"RATIO fisher pass / training fwd+bwd = {timings['fisher'] / timings['train']:.2f}")
    print(f"RATIO generation throughput batch {args.gen_batch} / batch 1 = {many / one:.2f}")


if __name__ == "__main__":
    main()
