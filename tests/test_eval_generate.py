"""Batched, left-padded greedy generation equals one-by-one generation token for token."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sstmerge.eval.generate import end_of_turn_ids, generate, generate_ids

PROMPTS = ["Hi", "How do I bake bread at home quickly?", "What is the capital of France?",
           "Summarise: the cat sat on the mat and looked out of the window for a long while.", "Name a colour."]
MIXED = PROMPTS + ["ok", "Tell me a long story about dragons and knights, please."]


def test_batched_equals_one_by_one_tiny(tiny_base):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    batched = generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=5)
    single = [generate(model, tok, [p], max_new_tokens=12, batch_size=1)[0] for p in PROMPTS]
    assert batched == single
    assert any(len(x) > 0 for x in batched)


def test_generate_ids_batches_with_early_stops_equal_one_by_one(tiny_base):
    """Token ids (not only decoded text) agree between one-by-one and several left-padded batches of mixed
    prompt lengths, when rows of a batch end at different steps; finished rows carry no padding."""
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    n_new = 12
    free = generate_ids(model, tok, MIXED, max_new_tokens=n_new, batch_size=1)
    # The random model rarely emits its eos: declare a token it does emit in some rows (not all, never as the
    # first token) an end-of-turn id, as generation_config.eos_token_id lists <|im_end|>-like ids.
    rows_with = Counter(t for x in free for t in set(x[1:]) - {x[0]})  # token -> rows emitting it after step 1
    stop = max((t for t, c in rows_with.items() if c < len(MIXED)), key=lambda t: (rows_with[t], -t))
    model.generation_config.eos_token_id = [tok.eos_token_id, stop]
    assert stop in end_of_turn_ids(model, tok)

    single = [generate_ids(model, tok, [p], max_new_tokens=n_new, batch_size=1)[0] for p in MIXED]
    for bs in (3, 4):  # 3 and 2 batches: several widths of left padding, rows restored to prompt order
        assert generate_ids(model, tok, MIXED, max_new_tokens=n_new, batch_size=bs) == single
    lengths = {len(x) for x in single}
    assert n_new in lengths and len(lengths - {n_new}) >= 1  # some rows stopped early, some ran to the limit
    for x in single:
        assert len(x) == n_new or x[-1] in (stop, tok.eos_token_id)  # ends at its end-of-turn id: no padding
        assert not {stop, tok.eos_token_id} & set(x[:-1])
    texts = generate(model, tok, MIXED, max_new_tokens=n_new, batch_size=3)
    assert texts == [tok.decode(x, skip_special_tokens=True).strip() for x in single]


@pytest.mark.slow
def test_batched_equals_one_by_one_smollm2():
    from sstmerge.io.models import load_causal_lm

    model, tok = load_causal_lm("smollm2")
    batched = generate(model, tok, PROMPTS, max_new_tokens=24, batch_size=5)
    single = [generate(model, tok, [p], max_new_tokens=24, batch_size=1)[0] for p in PROMPTS]
    assert batched == single
    assert all(len(x) > 0 for x in batched)
