"""Batched greedy generation with left padding, in the model's chat template."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from .._logging import quiet
from ..data.chat import pad_id

log = logging.getLogger(__name__)


def render_prompt(tokenizer, prompt: str | list[dict[str, str]]) -> str:
    """A user prompt (or a chat list) rendered with the chat template and the assistant turn opened."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant: "


def end_of_turn_ids(model, tokenizer) -> list[int]:
    """Token ids that end an assistant turn: the tokenizer's eos plus the model's generation_config eos."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    cfg = getattr(model, "generation_config", None)
    extra = getattr(cfg, "eos_token_id", None) if cfg is not None else None
    for e in extra if isinstance(extra, (list, tuple)) else [extra]:
        if e is not None:
            ids.add(int(e))
    return sorted(ids)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str | list[dict[str, str]]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    max_prompt_tokens: int = 1024,
    desc: str = "generate",
) -> list[str]:
    """Greedy completions, one per prompt (order kept). Prompts are sorted by length and left-padded per batch."""
    texts = [render_prompt(tokenizer, p) for p in prompts]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"][-max_prompt_tokens:] for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    pad = pad_id(tokenizer)
    eos_ids = end_of_turn_ids(model, tokenizer)
    outputs: list[str] = [""] * len(texts)
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=quiet(), leave=False):
        idx = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            seq = encoded[i]
            ids[row, width - len(seq):] = torch.tensor(seq)
            mask[row, width - len(seq):] = 1
        device = next(model.parameters()).device
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=pad, eos_token_id=eos_ids, temperature=None, top_p=None, top_k=None,
        )
        for row, i in enumerate(idx):
            outputs[i] = tokenizer.decode(out[row, width:].cpu(), skip_special_tokens=True).strip()
    return outputs
