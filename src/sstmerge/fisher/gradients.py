"""Per-sample gradients ``g_i = ∇_φ log p(y_i | x_i)`` (answer tokens only) of the safety LoRA factors."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


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


def per_sample_gradients(
    model, params: dict[str, tuple[torch.Tensor, torch.Tensor]], encoded: Sequence[dict], start: int = 0
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Yield ``(i, {module: g_i,m})`` for i = start..N-1, ``g_i,m = [vec(∂/∂A_m); vec(∂/∂B_m)] log p(y_i|x_i)``
    (float32, D_m,). One example per backward pass: the gradient of each example, not of a batch mean."""
    flat = [p for pair in params.values() for p in pair]
    for i in range(start, len(encoded)):
        ids = torch.tensor([encoded[i]["input_ids"]])
        labels = torch.tensor([encoded[i]["labels"]])
        logits = model(input_ids=ids).logits  # (1, T, V)
        loglik = answer_log_likelihood(logits, labels)[0]
        grads = torch.autograd.grad(loglik, flat)
        out, j = {}, 0
        for module in params:
            gA, gB = grads[j], grads[j + 1]
            j += 2
            out[module] = torch.cat([gA.reshape(-1), gB.reshape(-1)]).float()
        yield i, out
