"""Batched greedy generation in the model's chat template: the cached engine and the transformers reference.

Prompts are rendered, tokenized and sorted by length; each batch of ``batch_size`` rows is

1. *prefilled* (:func:`prefill`) in pieces of about :data:`PREFILL_CHUNK_TOKENS` prompt tokens grouped by shared
   prefix, each piece's common prefix (the chat template's system turn, a jailbreak template's opening) run
   once: the prompt pass is compute-bound, so every token not recomputed is time saved;
2. *decoded* one token per step for the rows still generating: a row ends at an end-of-turn id, or where a
   caller's rule says its answer is decided (``stop(text, n_tokens)``, e.g. the keyword judge's verdict can
   no longer change), and leaves the batch at once (its KV-cache rows are dropped).

``engine="transformers"`` runs each batch through ``model.generate`` instead (left padding, whole prompts,
finished rows padded until the batch ends): the reference the cached engine is tested against token for token.
"""

from __future__ import annotations

import functools
import inspect
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


#: the generation engines: "cached" (this module's greedy loop: a batch's common prompt prefix computed once,
#: finished rows dropped from the batch) and "transformers" (``model.generate``, the reference)
ENGINES = ("cached", "transformers")


#: CPU generation batch: rows per batch. A decoding step's cost grows slowly with its rows (SmolLM2, 2 cores:
#: 182 ms at 16 rows, 294 ms at 64); on 160 jailbreak + 96 arithmetic prompts the cached engine took 63.6 s at
#: 16 rows, 58.9 s at 32, 55.2 s at 64, 58.9 s at 96 (transformers' generate at 16: 74.7 s); 128 rows measured
#: no faster (benchmarks/bench_eval.py --quick --batch-sizes 64,128)
CPU_BATCH_SIZE = 64


def default_batch_size(device: str, config=None, *, itemsize: int = 4,
                       tokens_per_row: int = MAX_PROMPT_TOKENS + 256) -> int:
    """Rows per generation batch for ``device``: :data:`CPU_BATCH_SIZE` on a CPU; on a GPU as many rows as half
    its free memory holds of KV cache for ``tokens_per_row`` tokens each (keys and values of every layer of the
    model ``config``, ``itemsize`` bytes a value: evaluation loads float32), between 16 and 256."""
    if not str(device).startswith("cuda"):
        return CPU_BATCH_SIZE
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_row = 2 * config.num_hidden_layers * heads * head_dim * itemsize * tokens_per_row
    return int(min(256, max(16, free // 2 // per_row)))


def common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix every row shares, capped so that every row keeps at least one token after it
    (its last prompt token's logits give its first new token)."""
    shortest = min(len(r) for r in rows)
    n = 0
    while n < shortest - 1 and all(r[n] == rows[0][n] for r in rows):
        n += 1
    return n


def _cache_keyword(model) -> str:
    """The forward keyword of the KV cache: ``cache`` (recent transformers) or ``past_key_values`` (older ones)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the model
    return _cache_keyword_of(type(inner))


@functools.cache
def _cache_keyword_of(model_class: type) -> str:  # once per class, not at every decoding step
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _forward(model, ids: torch.Tensor, cache, **kwargs) -> torch.Tensor:
    """Logits of the last position, (rows, vocab), filling ``cache`` with the new keys and values."""
    kwargs[_cache_keyword(model)] = cache
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **kwargs)
    return out.logits[:, -1, :]


#: prompt tokens (rows × padded width) per prefill forward. Decoding wants many rows, the prompt pass does not:
#: on 2 cores, MCQ's 60 prompts (71-116 tokens) took 13.2 s in one 60-row pass and 8.7 s in 16-row passes, and
#: the default sets' MCQ 21.0 s at 64 rows without pieces, 8.8 s with them (docs/performance.md)
PREFILL_CHUNK_TOKENS = 2048


def _kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(keys, values)``, each (rows, kv_heads, positions, head_dim), of a transformers DynamicCache."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def _chunks(rows: Sequence[Sequence[int]], budget: int) -> list[list[int]]:
    """Row indices in lexicographic token order (rows sharing a prefix, such as a jailbreak template, sit
    together), cut into pieces of at most ``budget`` tokens (rows × the piece's longest row; one row at least)."""
    order = sorted(range(len(rows)), key=lambda i: list(rows[i]))
    pieces: list[list[int]] = [[]]
    for i in order:
        piece = pieces[-1]
        if piece and (len(piece) + 1) * max(len(rows[j]) for j in [*piece, i]) > budget:
            pieces.append(piece := [])
        piece.append(i)
    return pieces


def _prefill_piece(model, rows: Sequence[Sequence[int]], pad: int):
    """One piece of :func:`prefill`: its common prefix once, the rest of each row left-padded after it."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    n = len(rows)
    cache = DynamicCache()
    P = common_prefix_length(rows)
    if P:
        _forward(model, torch.tensor([list(rows[0][:P])], device=device), cache)  # (1, P) -> cache of 1 row
        cache.batch_repeat_interleave(n)
    batch = collate([{"input_ids": r[P:]} for r in rows], pad, padding_side="left")  # every row keeps >= 1 token
    ids, suffix_mask = batch["input_ids"], batch["attention_mask"]  # (rows, width), left-padded
    mask = torch.cat([torch.ones((n, P), dtype=torch.long), suffix_mask], dim=1).to(device)  # (rows, P + width)
    positions = (P + suffix_mask.cumsum(-1) - 1).clamp_min(0).to(device)  # (rows, width): RoPE positions, pads skipped
    logits = _forward(model, ids.to(device), cache, attention_mask=mask, position_ids=positions)
    return logits, cache, mask, positions[:, -1]


def prefill(model, rows: Sequence[Sequence[int]], pad: int, *, chunk_tokens: int | None = None):
    """Run a batch of prompts (token ids); returns ``(logits, cache, mask, last)``: each row's next-token
    logits (rows, vocab), the KV cache and attention mask (rows, positions) to decode from, and the RoPE
    position of each row's last token (rows,).

    Rows are run in pieces of about ``chunk_tokens`` tokens (default: :data:`PREFILL_CHUNK_TOKENS`, read at the
    call), grouped by shared prefix (:func:`_chunks`). In a
    piece, the common prefix P (the chat template's system turn, a jailbreak template's opening) is run once
    and its keys and values copied to every row, the rest of each prompt left-padded after it: a row reads
    ``[prefix | pads | its suffix]`` with the pads masked out and positions counted without them, the same
    attention as its unpadded prompt, so the same logits up to float rounding. The pieces' caches are then
    left-padded (zeros, masked) to one length and joined in the rows' order.
    """
    from transformers import DynamicCache

    pieces = _chunks(rows, PREFILL_CHUNK_TOKENS if chunk_tokens is None else chunk_tokens)
    if len(pieces) == 1:
        return _prefill_piece(model, rows, pad)
    parts = [_prefill_piece(model, [rows[i] for i in piece], pad) for piece in pieces]
    length = max(mask.shape[1] for _, _, mask, _ in parts)

    def left_pad(t: torch.Tensor, dim: int) -> torch.Tensor:  # zeros before the positions along ``dim``
        shape = list(t.shape)
        shape[dim] = length - t.shape[dim]
        return torch.cat([t.new_zeros(shape), t], dim=dim)

    back = torch.argsort(torch.tensor([i for piece in pieces for i in piece]))  # joined order -> rows' order
    back = back.to(parts[0][0].device)
    kvs = [_kv(cache) for _, cache, _, _ in parts]
    layers = [(torch.cat([left_pad(kv[layer][0], 2) for kv in kvs])[back],  # keys (rows, kv_heads, length, head_dim)
               torch.cat([left_pad(kv[layer][1], 2) for kv in kvs])[back])  # values
              for layer in range(len(kvs[0]))]
    logits = torch.cat([p[0] for p in parts])[back]
    mask = torch.cat([left_pad(p[2], 1) for p in parts])[back]
    last = torch.cat([p[3] for p in parts])[back]
    return logits, DynamicCache(ddp_cache_data=layers), mask, last


def _decode_batch(model, tokenizer, rows: list[list[int]], *, max_new_tokens: int, eos_ids: set[int],
                  stop: StopRule | None, pad: int) -> list[list[int]]:
    """Greedy new ids of one batch of prompts (token ids), each ending at its first end-of-turn id (kept), where
    ``stop`` said its answer is decided, or after ``max_new_tokens``.

    The prompts go through :func:`prefill` (common prefix once); then one token per step for the rows still
    generating: a row that ends leaves the batch (its cache rows are dropped), so the remaining steps cost only
    what is still being generated.
    """
    device = next(model.parameters()).device
    logits, cache, mask, last = prefill(model, rows, pad)  # last: (rows,) RoPE position of each row's last token
    alive = list(range(len(rows)))  # batch row -> prompt row
    new: list[list[int]] = [[] for _ in rows]
    for step in range(max_new_tokens):
        chosen = logits.argmax(-1)  # (alive,)
        keep = []
        for j, tok in enumerate(chosen.tolist()):
            out = new[alive[j]]
            out.append(tok)
            if tok in eos_ids:
                continue
            if stop is not None and stop(tokenizer.decode(out, skip_special_tokens=True).strip(), len(out)):
                continue
            keep.append(j)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(alive):  # finished rows leave the batch
            sel = torch.tensor(keep, device=device)
            cache.batch_select_indices(sel)
            mask, last, chosen = mask[sel], last[sel], chosen[sel]
            alive = [alive[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
        last = last + 1
        logits = _forward(model, chosen[:, None], cache, attention_mask=mask, position_ids=last[:, None])
    return new


def _transformers_batch(model, tokenizer, rows: list[list[int]], *, max_new_tokens: int, eos_ids: set[int],
                        stop: StopRule | None, pad: int) -> list[list[int]]:
    """The same as :func:`_decode_batch` through ``model.generate`` (left padding, the whole prompt per row;
    finished rows stay in the batch, padded): the reference engine."""
    device = next(model.parameters()).device
    batch = collate([{"input_ids": r} for r in rows], pad, padding_side="left")
    ids, mask = batch["input_ids"], batch["attention_mask"]  # (rows, width), left-padded
    width = ids.shape[1]
    stopped: dict[int, int] = {}
    extra = {}
    if stop is not None:
        from transformers import StoppingCriteriaList

        extra["stopping_criteria"] = StoppingCriteriaList([_row_stopper(tokenizer, width, stop, eos_ids, stopped)])
    out = model.generate(
        input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=pad, eos_token_id=sorted(eos_ids), temperature=None, top_p=None, top_k=None, **extra,
    )
    new = out[:, width:].cpu().tolist()  # (rows, steps): rows that ended early are padded after their eos
    return [new[row][: stopped[row]] if row in stopped else _trim(new[row], eos_ids) for row in range(len(rows))]


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
    engine: str = "cached",
) -> list[list[int]]:
    """Greedy generated token ids, one list per prompt (order kept), each ending at its first end-of-turn id
    (kept), where ``stop`` said the answer is decided, or after ``max_new_tokens`` ids; no padding.
    :func:`generate` decodes these.

    Prompts are rendered with the chat template and sorted by token length, so a batch holds prompts of
    similar length and little padding. ``engine="cached"`` (default) decodes each batch with
    :func:`_decode_batch` (common prefix once, finished rows dropped); ``"transformers"`` with
    ``model.generate``. Both are greedy over the same logits: their ids agree up to float rounding (tests).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    texts = [render_prompt(tokenizer, p) for p in prompts]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"][-max_prompt_tokens:] for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    pad = pad_id(tokenizer)
    eos_set = set(end_of_turn_ids(model, tokenizer))
    decode_batch = _decode_batch if engine == "cached" else _transformers_batch
    outputs: list[list[int]] = [[] for _ in texts]
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=quiet(), leave=False):
        idx = order[start : start + batch_size]
        new = decode_batch(model, tokenizer, [encoded[i] for i in idx], max_new_tokens=max_new_tokens,
                           eos_ids=eos_set, stop=stop, pad=pad)
        for row, i in enumerate(idx):
            outputs[i] = new[row]
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
    engine: str = "cached",
) -> list[str]:
    """Greedy completions, one per prompt (order kept), decoded without special tokens and stripped.

    Prompts are sorted by length and left-padded per batch (see :func:`generate_ids`).
    """
    ids = generate_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       max_prompt_tokens=max_prompt_tokens, desc=desc, stop=stop, engine=engine)
    return [tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids]
