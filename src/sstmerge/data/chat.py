"""Turn :class:`~sstmerge.data.examples.Example` records into token ids + answer-only labels.

Shared by training (``sstmerge.train.sft``), the Fisher estimate and evaluation, so that all of them
supervise exactly the same tokens: the final assistant answer plus the end-of-turn marker the chat
template emits after it (e.g. ``<|im_end|>``). Everything before the answer (system prompt, user turns,
earlier assistant turns, template scaffolding such as ``<|im_start|>assistant\\n``) gets label ``-100``.

How the split is found
----------------------
1. ``prefix = apply_chat_template(example.context(), add_generation_prompt=True, tokenize=False)``
2. ``full = apply_chat_template(example.chat(), tokenize=False)``
3. ``full`` must start with ``prefix``; the rest is ``[scaffolding] answer [end-of-turn] [whitespace]``.
   Scaffolding the template puts between the generation prompt and the answer (if any) is masked too;
   whitespace the template emits *after* the end-of-turn marker (ChatML's trailing ``"\\n"``) is dropped,
   so the sequence ends on the end-of-turn token. If the template emits nothing after the answer the
   tokenizer's EOS token is appended so the model still learns to stop.
4. If ``full`` does not start with ``prefix`` (templates that render the last turn differently), we fall
   back to ``prefix + answer + eos`` and log a warning once.

Tokenizers without a chat template use this plain fallback format (documented, stable)::

    System: {system content}\\n        (one line per context message, role capitalised)
    User: {user content}\\n
    Assistant: {answer}{eos_token}

Text is tokenised with ``add_special_tokens=False`` (chat templates already contain BOS where the model
wants it). ``apply_chat_template`` is always called with ``tokenize=False`` and the strings are tokenised
with ``tokenizer(...)``, which behaves the same in transformers 4.x and 5.x.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import ConfigError, DataError, ModelError
from .examples import Example

__all__ = ["IGNORE_INDEX", "encode_example", "collate", "pad_id", "has_chat_template"]

logger = logging.getLogger(__name__)

#: Label value ignored by ``torch.nn.CrossEntropyLoss`` / HF causal-LM losses.
IGNORE_INDEX = -100

_warned: set[str] = set()


def _warn_once(key: str, msg: str, *args: Any) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(msg, *args)


def pad_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS token.

    (Padded positions are masked out of attention and labels, so reusing EOS is harmless.)
    """
    pid = getattr(tokenizer, "pad_token_id", None)
    if pid is None:
        pid = getattr(tokenizer, "eos_token_id", None)
    if isinstance(pid, (list, tuple)):  # some tokenizers/configs list several EOS ids
        pid = pid[0] if pid else None
    if pid is None:
        raise ModelError(
            f"tokenizer {type(tokenizer).__name__} has neither a pad token nor an eos token; "
            "set tokenizer.pad_token (e.g. tokenizer.pad_token = tokenizer.eos_token) before encoding"
        )
    return int(pid)


def has_chat_template(tokenizer) -> bool:
    """Whether ``tokenizer`` carries a chat template (otherwise the plain fallback format is used)."""
    return bool(getattr(tokenizer, "chat_template", None))


def _fallback_render(context: list[dict[str, str]]) -> str:
    lines = [f"{m['role'].strip().capitalize()}: {m['content']}\n" for m in context]
    return "".join(lines) + "Assistant: "


def _ids(tokenizer, text: str) -> list[int]:
    if not text:
        return []
    enc = tokenizer(text, add_special_tokens=False)
    ids = enc["input_ids"]
    return [int(i) for i in ids]


def _split_text(tokenizer, example: Example) -> tuple[str, str]:
    """Return ``(masked_text, target_text)``: what the model is conditioned on, what it must produce."""
    chat = example.chat()
    context = chat[:-1]
    answer = chat[-1]["content"]
    eos = getattr(tokenizer, "eos_token", None) or ""

    if not has_chat_template(tokenizer):
        _warn_once(
            "no-template",
            "tokenizer has no chat template; using the plain 'User: ...\\nAssistant: ' fallback format",
        )
        return _fallback_render(context), answer + eos

    try:
        prefix = tokenizer.apply_chat_template(context, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(chat, tokenize=False)
    except Exception as exc:  # jinja errors, templates that reject a role order, ...
        raise DataError(
            f"the tokenizer's chat template could not render example {_describe(example)}: {exc}; "
            "check the roles/order of its messages"
        ) from exc
    if not isinstance(prefix, str) or not isinstance(full, str):
        raise ModelError("apply_chat_template(..., tokenize=False) did not return a string")

    if not full.startswith(prefix):
        _warn_once(
            "prefix-mismatch",
            "the chat template renders the conversation differently with and without the final answer; "
            "falling back to prefix + answer + eos for the labels",
        )
        return prefix, answer + eos

    rest = full[len(prefix):]
    located = _locate_answer(tokenizer, chat, prefix, rest)
    if located is None:
        _warn_once(
            "answer-missing",
            "the chat template does not render the assistant answer verbatim (it rewrites it); "
            "falling back to prefix + answer + eos for the labels",
        )
        return prefix, answer + eos
    scaffold, answer, suffix = located
    suffix = suffix.rstrip()  # drop the newline ChatML & co. emit after the end-of-turn marker
    if not suffix:
        suffix = eos  # the template emits no end-of-turn: append EOS so the model learns to stop
    return prefix + scaffold, answer + suffix


_SENTINEL = "SSTMERGEANSWERSENTINEL"


def _locate_answer(tokenizer, chat: list[dict[str, str]], prefix: str, rest: str) -> tuple[str, str, str] | None:
    """Split ``rest`` (the rendering after the generation prompt) into ``(scaffold, answer, suffix)``."""
    answer = chat[-1]["content"]
    for cand in dict.fromkeys((answer, answer.strip())):
        if cand and rest.startswith(cand):
            return "", cand, rest[len(cand):]
    # Scaffolding between the generation prompt and the answer (e.g. an empty think block): render the
    # conversation with a sentinel answer to find where the answer starts.
    try:
        probe = tokenizer.apply_chat_template(
            chat[:-1] + [{"role": chat[-1]["role"], "content": _SENTINEL}], tokenize=False
        )
    except Exception:  # pragma: no cover - the real rendering just worked
        return None
    if not isinstance(probe, str) or not probe.startswith(prefix) or _SENTINEL not in probe:
        return None
    scaffold = probe[len(prefix):].split(_SENTINEL, 1)[0]
    if not rest.startswith(scaffold):
        return None
    body = rest[len(scaffold):]
    for cand in dict.fromkeys((answer, answer.strip())):
        if cand and body.startswith(cand):
            return scaffold, cand, body[len(cand):]
    return None


def _describe(example: Example) -> str:
    text = example.answer()
    return repr(text[:40] + ("..." if len(text) > 40 else ""))


def encode_example(tokenizer, example: Example, max_length: int = 512) -> dict[str, list[int]]:
    """Tokenise ``example`` with the tokenizer's chat template; supervise only the final answer.

    Returns ``{"input_ids": [...], "labels": [...]}`` of equal length, ``labels[i] == IGNORE_INDEX``
    (-100) on every prompt/scaffolding token and ``labels[i] == input_ids[i]`` on the answer tokens and
    the end-of-turn token(s) that follow it.

    Truncation to ``max_length``: the prompt is cut from the *left* (its end, next to the answer, is
    kept); the answer is never cut unless it alone does not fit, in which case its tail is cut and one
    prompt token is kept so that at least one answer token is actually predicted.

    Raises :class:`DataError` for an empty answer or a conversation whose last turn is not the
    assistant's, :class:`ConfigError` for ``max_length < 2``.
    """
    if max_length < 2:
        raise ConfigError(f"max_length must be >= 2 (got {max_length})")
    chat = example.chat()
    if not chat:
        raise DataError("example has no messages; give prompt/response or a non-empty messages list")
    if chat[-1]["role"] != "assistant":
        raise DataError(
            f"the last message of an example must be the assistant answer, got role {chat[-1]['role']!r}"
        )
    if not example.answer().strip():
        raise DataError(
            f"example with prompt {(chat[0]['content'] or '')[:40]!r} has an empty answer; "
            "every example needs a non-empty assistant response"
        )

    masked_text, target_text = _split_text(tokenizer, example)

    ctx_ids = _ids(tokenizer, masked_text)
    full_ids = _ids(tokenizer, masked_text + target_text)
    if full_ids[: len(ctx_ids)] == ctx_ids and len(full_ids) > len(ctx_ids):
        ans_ids = full_ids[len(ctx_ids):]
    else:
        # the tokenizer merged across the boundary: tokenise the two parts separately
        ans_ids = _ids(tokenizer, target_text)
    if not ans_ids:
        raise DataError(f"the answer of example {_describe(example)} tokenises to nothing")

    if len(ctx_ids) + len(ans_ids) > max_length:
        n_ans = min(len(ans_ids), max_length - min(len(ctx_ids), 1))
        n_ctx = min(len(ctx_ids), max_length - n_ans)
        _warn_once(
            "truncated",
            "some examples exceed max_length=%d tokens; truncating their prompt from the left "
            "(and the answer's tail only when the answer alone is too long)",
            max_length,
        )
        ctx_ids = ctx_ids[len(ctx_ids) - n_ctx:] if n_ctx else []
        ans_ids = ans_ids[:n_ans]

    return {
        "input_ids": ctx_ids + ans_ids,
        "labels": [IGNORE_INDEX] * len(ctx_ids) + list(ans_ids),
    }


def collate(
    batch: Sequence[dict[str, Sequence[int]]], pad_token_id: int, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad encoded examples into ``input_ids`` / ``attention_mask`` / ``labels`` LongTensors.

    ``input_ids`` are padded with ``pad_token_id``, ``labels`` with -100, ``attention_mask`` is 1 on real
    tokens. ``padding_side`` is ``"right"`` (training) or ``"left"`` (batched generation).
    """
    if padding_side not in ("left", "right"):
        raise ConfigError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not batch:
        raise DataError("cannot collate an empty batch")
    if pad_token_id is None:
        raise ConfigError("pad_token_id is None; use sstmerge.data.chat.pad_id(tokenizer)")
    width = max(len(item["input_ids"]) for item in batch)
    n = len(batch)
    input_ids = torch.full((n, width), int(pad_token_id), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    for i, item in enumerate(batch):
        ids = list(item["input_ids"])
        lab = list(item.get("labels", ids))
        if len(lab) != len(ids):
            raise DataError(f"batch item {i}: {len(ids)} input_ids but {len(lab)} labels")
        k = len(ids)
        if k == 0:
            continue
        sl = slice(0, k) if padding_side == "right" else slice(width - k, width)
        input_ids[i, sl] = torch.tensor(ids, dtype=torch.long)
        labels[i, sl] = torch.tensor(lab, dtype=torch.long)
        attention[i, sl] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
