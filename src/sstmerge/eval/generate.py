"""Batched greedy generation with left padding, in the model's chat template.

A row may stop before its end-of-turn token when a caller's rule says its answer is decided
(``stop(text, n_tokens)``, e.g. the keyword judge's verdict can no longer change): the row is then
finished (transformers pads it while the rest of the batch continues) and its answer is the text up to
that step. The batch ends when every row has ended or stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .._logging import quiet
from ..data.chat import collate, pad_id

log = logging.getLogger(__name__)

#: prompts longer than this many tokens keep their last MAX_PROMPT_TOKENS (HF and vLLM backends alike)
MAX_PROMPT_TOKENS = 1024


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


def _trim(tokens: list[int], eos_ids: set[int]) -> list[int]:
    """Generated ids up to and including the first end-of-turn id; drops the padding ``generate`` appends
    to rows that finished before the rest of their batch."""
    for k, tok in enumerate(tokens):
        if tok in eos_ids:
            return tokens[: k + 1]
    return tokens


#: ``stop(text_so_far, n_new_tokens) -> bool``: True once a row's answer is decided
StopRule = Callable[[str, int], bool]


def _row_stopper(tokenizer, width: int, rule: StopRule, eos_ids: set[int], stopped: dict[int, int]):
    """A transformers ``StoppingCriteria`` that finishes rows (one bool per row) as soon as ``rule`` holds on
    their decoded new text; ``stopped[row]`` records how many new tokens a stopped row kept."""
    from transformers import StoppingCriteria

    class RowStopper(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            for row, toks in enumerate(input_ids[:, width:].tolist()):
                if row in stopped or any(t in eos_ids for t in toks):
                    done[row] = row in stopped  # an ended row is finished by transformers itself
                    continue
                if rule(tokenizer.decode(toks, skip_special_tokens=True).strip(), len(toks)):
                    stopped[row] = len(toks)
                    done[row] = True
            return done

    return RowStopper()


@torch.inference_mode()
def generate_ids(
    model,
    tokenizer,
    prompts: Sequence[str | list[dict[str, str]]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    max_prompt_tokens: int = MAX_PROMPT_TOKENS,
    desc: str = "generate",
    stop: StopRule | None = None,
) -> list[list[int]]:
    """Greedy generated token ids, one list per prompt (order kept), each ending at its first end-of-turn id
    (kept), where ``stop`` said the answer is decided, or after ``max_new_tokens`` ids; no padding.
    :func:`generate` decodes these.

    Prompts are rendered with the chat template, sorted by token length (so a batch holds prompts of
    similar length and little padding) and left-padded per batch; ``model.generate`` runs with the KV cache
    and stops a batch as soon as every row has produced an end-of-turn id.
    """
    texts = [render_prompt(tokenizer, p) for p in prompts]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"][-max_prompt_tokens:] for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    pad = pad_id(tokenizer)
    eos_ids = end_of_turn_ids(model, tokenizer)
    eos_set = set(eos_ids)
    device = next(model.parameters()).device
    outputs: list[list[int]] = [[] for _ in texts]
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=quiet(), leave=False):
        idx = order[start : start + batch_size]
        batch = collate([{"input_ids": encoded[i]} for i in idx], pad, padding_side="left")
        ids, mask = batch["input_ids"], batch["attention_mask"]  # (rows, width), left-padded
        width = ids.shape[1]
        stopped: dict[int, int] = {}
        extra = {}
        if stop is not None:
            from transformers import StoppingCriteriaList

            extra["stopping_criteria"] = StoppingCriteriaList([_row_stopper(tokenizer, width, stop, eos_set, stopped)])
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=pad, eos_token_id=eos_ids, temperature=None, top_p=None, top_k=None, **extra,
        )
        new = out[:, width:].cpu().tolist()  # (rows, steps): rows that ended early are padded after their eos
        for row, i in enumerate(idx):
            outputs[i] = new[row][: stopped[row]] if row in stopped else _trim(new[row], eos_set)
    return outputs


def generate(
    model,
    tokenizer,
    prompts: Sequence[str | list[dict[str, str]]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    max_prompt_tokens: int = MAX_PROMPT_TOKENS,
    desc: str = "generate",
    stop: StopRule | None = None,
) -> list[str]:
    """Greedy completions, one per prompt (order kept), decoded without special tokens and stripped.

    Prompts are sorted by length and left-padded per batch (see :func:`generate_ids`).
    """
    ids = generate_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       max_prompt_tokens=max_prompt_tokens, desc=desc, stop=stop)
    return [tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids]
