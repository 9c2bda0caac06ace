"""Per-sample gradients ``g_i = ∇_φ log p(y_i | x_i)`` (answer tokens only) of the safety LoRA factors.

Batched (the Fisher pass): one forward and one backward for a whole batch. A PEFT LoRA layer computes
``y = W x + s · B (A x)`` (dropout is the identity in eval mode). With ``x_t`` the input of ``A`` (d_in),
``h_t = A x_t`` the input of ``B`` (r) and ``o_t = B h_t`` its output (d_out) at token t, and
``ḡ_t = ∂ℓ_i/∂o_t`` the gradient of example i's log-likelihood at its own tokens (examples do not interact
in a causal LM, so one backward of ``Σ_i ℓ_i`` gives every ``ḡ`` at once)::

    ∂ℓ_i/∂B = Σ_t ḡ_t h_tᵀ              (d_out × r)      einsum("bto,btr->bor")
    ∂ℓ_i/∂A = Σ_t (Bᵀ ḡ_t) x_tᵀ         (r × d_in)       einsum("btr,bti->bri")

Only ``∂ℓ/∂o`` is asked of autograd (``torch.autograd.grad`` w.r.t. the captured outputs), so no weight
gradient is accumulated; padding positions get ``ḡ = 0`` (no answer token depends on them under
right-padding), so they contribute nothing. The looped reference (one backward per example) is kept for
tests and benchmarks.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..data.chat import collate


def answer_log_likelihood(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log p(y|x) = Σ_t log softmax(logits_{t-1})[y_t]`` over positions whose label is not -100.

    logits: (B, T, V), labels: (B, T) → (B,) summed log-likelihood of the answer tokens per sequence.
    """
    shift_logits = logits[:, :-1, :].float()  # (B, T-1, V) predicts token t from prefix < t
    shift_labels = labels[:, 1:]  # (B, T-1)
    mask = shift_labels != -100
    logp = torch.log_softmax(shift_logits, dim=-1)
    picked = logp.gather(-1, shift_labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return (picked * mask).sum(dim=-1)


@dataclass
class LoraLayer:
    """The two ``nn.Linear`` factors of one PEFT LoRA layer: ``A`` (weight r × d_in), ``B`` (d_out × r)."""

    A: torch.nn.Linear
    B: torch.nn.Linear


@contextmanager
def _capture(layers: dict[str, LoraLayer]):
    """Forward hooks that record, per module, the input x of A, the input h of B and the output o of B."""
    seen: dict[str, dict[str, torch.Tensor]] = {m: {} for m in layers}
    handles = []
    for m, layer in layers.items():
        def on_a(_mod, args, _out, m=m):
            seen[m]["x"] = args[0]

        def on_b(_mod, args, out, m=m):
            seen[m]["h"] = args[0]
            seen[m]["o"] = out

        handles += [layer.A.register_forward_hook(on_a), layer.B.register_forward_hook(on_b)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def batched_per_sample_gradients(
    model, layers: dict[str, LoraLayer], encoded: Sequence[dict], pad_id: int = 0
) -> dict[str, torch.Tensor]:
    """``{module: G_m}`` with ``G_m[b] = [vec(∂ℓ_b/∂A_m); vec(∂ℓ_b/∂B_m)]`` (B, D_m) float32, on the model's
    device, for the examples of one batch, from one forward and one backward."""
    device = next(model.parameters()).device
    batch = collate(encoded, pad_id, padding_side="right")  # right padding keeps each example's positions
    ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    with _capture(layers) as seen:
        logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
    loglik = answer_log_likelihood(logits, labels)  # (B,)
    modules = list(layers)
    outputs = [seen[m]["o"] for m in modules]
    grads_o = torch.autograd.grad(loglik.sum(), outputs)  # ∂(Σ_b ℓ_b)/∂o = per-example ∂ℓ_b/∂o_b
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for m, g_o in zip(modules, grads_o):
            x = seen[m]["x"].float()  # (B, T, d_in)
            h = seen[m]["h"].float()  # (B, T, r)
            g_o = g_o.float()  # (B, T, d_out)
            g_B = torch.einsum("bto,btr->bor", g_o, h)  # (B, d_out, r)
            g_h = g_o @ layers[m].B.weight.float()  # (B, T, r) = Bᵀ ḡ_t per token
            g_A = torch.einsum("btr,bti->bri", g_h, x)  # (B, r, d_in)
            out[m] = torch.cat([g_A.reshape(len(encoded), -1), g_B.reshape(len(encoded), -1)], dim=1)
    return out


def iter_batched_gradients(
    model, layers: dict[str, LoraLayer], encoded: Sequence[dict], indices: Sequence[int], batch_size: int,
    pad_id: int = 0,
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """Yield ``(rows, {module: G_m})`` for ``indices`` in batches of ``batch_size`` similar-length examples
    (sorted by length, longest first, so padding is small and the first batch shows the peak memory)."""
    for rows in _length_batches(encoded, indices, batch_size):
        yield rows, batched_per_sample_gradients(model, layers, [encoded[i] for i in rows], pad_id)


def _length_batches(encoded: Sequence[dict], indices: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """``indices`` in batches of ``batch_size``, longest example first (ties by index)."""
    order = sorted(indices, key=lambda i: (-len(encoded[i]["input_ids"]), i))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def weighted_gradient_sum(
    model, layers: dict[str, LoraLayer], encoded: Sequence[dict], weights: Sequence[float], batch_size: int,
    pad_id: int = 0,
) -> dict[str, torch.Tensor]:
    """``{module: Gᵀβ restricted to the module}``: ``Σ_i β_i g_i,m`` (D_m,) float32, the per-sample gradients'
    combination with coefficients ``β = weights`` (one per example of ``encoded``), without forming any g_i::

        Σ_i β_i ∇_φ ℓ_i = ∇_φ Σ_i β_i ℓ_i,      ℓ_i = log p(y_i | x_i) (answer tokens)

    one ordinary backward per batch of the β-weighted log-likelihood, asked for the LoRA factors' weights only
    (``torch.autograd.grad``: nothing accumulates in ``.grad``), in the layout of :func:`batched_per_sample_gradients`
    (``[vec(∂/∂A); vec(∂/∂B)]``). Examples with β_i = 0 are skipped.

    Reference for :func:`iter_weighted_gradient_sums` (what the weighted pass runs: one β per module, resumable
    batches), by plain autograd through the factors' weights instead of the per-sample pass's hooks.
    """
    if len(weights) != len(encoded):
        raise ValueError(f"weighted_gradient_sum: {len(weights)} weights for {len(encoded)} examples")
    device = next(model.parameters()).device
    modules = list(layers)
    flat = [p for m in modules for p in (layers[m].A.weight, layers[m].B.weight)]
    total = [torch.zeros(p.numel(), dtype=torch.float32, device=device) for p in flat]
    for rows in _length_batches(encoded, [i for i in range(len(encoded)) if weights[i] != 0], batch_size):
        batch = collate([encoded[i] for i in rows], pad_id, padding_side="right")
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        loglik = answer_log_likelihood(model(input_ids=ids, attention_mask=mask).logits, labels)  # (rows,)
        beta = torch.tensor([float(weights[i]) for i in rows], dtype=loglik.dtype, device=device)
        for acc, grad in zip(total, torch.autograd.grad((beta * loglik).sum(), flat)):
            acc += grad.reshape(-1).float()
    return {m: torch.cat([total[2 * j], total[2 * j + 1]]) for j, m in enumerate(modules)}


def iter_weighted_gradient_sums(
    model, layers: dict[str, LoraLayer], encoded: Sequence[dict], betas: Mapping[str, torch.Tensor],
    indices: Sequence[int], batch_size: int, pad_id: int = 0,
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """Yield ``(rows, {module: Σ_{i ∈ rows} β_m,i g_i,m})`` (D_m,) float32 over ``indices`` in batches: the
    per-sample gradients' combination ``G_mᵀ β_m`` with a coefficient vector per module (``betas[m]`` (N,);
    the per-module scope has one per module), without forming any g_i. ``betas[m]`` (N, p) gives p
    combinations at once, (p, D_m).

    One forward and one backward of ``Σ_b ℓ_b`` per batch gives every example's ``ḡ_t = ∂ℓ_b/∂o_t`` (as in
    :func:`batched_per_sample_gradients`); scaling it by ``β_m,b`` before the contraction over tokens and
    examples gives the sum directly::

        Σ_b β_b ∂ℓ_b/∂B = Σ_{b,t} (β_b ḡ_t) h_tᵀ          einsum("bto,btr->or")
        Σ_b β_b ∂ℓ_b/∂A = Σ_{b,t} Bᵀ(β_b ḡ_t) x_tᵀ        einsum("btr,bti->ri")

    Batches are disjoint and their sums add up, so the caller can checkpoint between them (resumable).
    """
    device = next(model.parameters()).device
    modules = list(layers)
    for rows in _length_batches(encoded, indices, batch_size):
        batch = collate([encoded[i] for i in rows], pad_id, padding_side="right")
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        with _capture(layers) as seen:
            logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        loglik = answer_log_likelihood(logits, labels)  # (B,)
        grads_o = torch.autograd.grad(loglik.sum(), [seen[m]["o"] for m in modules])
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for m, g_o in zip(modules, grads_o):
                beta = betas[m][rows].to(device=device, dtype=torch.float32)  # (B,) or (B, p)
                h, x, B_w = seen[m]["h"].float(), seen[m]["x"].float(), layers[m].B.weight.float()
                sums = []
                for col in (beta[:, None] if beta.ndim == 1 else beta).T:  # one coefficient vector at a time
                    g_w = g_o.float() * col[:, None, None]  # (B, T, d_out) β_b ḡ_t
                    g_B = torch.einsum("bto,btr->or", g_w, h)  # (d_out, r)
                    g_A = torch.einsum("btr,bti->ri", g_w @ B_w, x)  # (r, d_in)
                    sums.append(torch.cat([g_A.reshape(-1), g_B.reshape(-1)]))
                out[m] = sums[0] if beta.ndim == 1 else torch.stack(sums)  # (D_m,) or (p, D_m)
        yield rows, out


def looped_per_sample_gradients(
    model, layers: dict[str, LoraLayer], encoded: Sequence[dict]
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Reference: ``(i, {module: g_i,m})`` with one backward per example through the weights' gradients."""
    device = next(model.parameters()).device
    flat = [p for layer in layers.values() for p in (layer.A.weight, layer.B.weight)]
    for i, e in enumerate(encoded):
        ids = torch.tensor([e["input_ids"]], device=device)
        labels = torch.tensor([e["labels"]], device=device)
        loglik = answer_log_likelihood(model(input_ids=ids).logits, labels)[0]
        grads = torch.autograd.grad(loglik, flat)
        yield i, {m: torch.cat([grads[2 * j].reshape(-1), grads[2 * j + 1].reshape(-1)]).float()
                  for j, m in enumerate(layers)}
