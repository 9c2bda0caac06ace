"""Batched, left-padded greedy generation equals one-by-one generation token for token."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sstmerge.eval.generate import generate

PROMPTS = ["Hi", "How do I bake bread at home quickly?", "What is the capital of France?",
           "Summarise: the cat sat on the mat and looked out of the window for a long while.", "Name a colour."]


def test_batched_equals_one_by_one_tiny(tiny_base):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    batched = generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=5)
    single = [generate(model, tok, [p], max_new_tokens=12, batch_size=1)[0] for p in PROMPTS]
    assert batched == single
    assert any(len(x) > 0 for x in batched)


@pytest.mark.slow
def test_batched_equals_one_by_one_smollm2():
    from sstmerge.io.models import load_causal_lm

    model, tok = load_causal_lm("smollm2")
    batched = generate(model, tok, PROMPTS, max_new_tokens=24, batch_size=5)
    single = [generate(model, tok, [p], max_new_tokens=24, batch_size=1)[0] for p in PROMPTS]
    assert batched == single
    assert all(len(x) > 0 for x in batched)
