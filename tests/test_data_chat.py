"""Tests of sstmerge.data.chat: answer-only label masking, truncation and collation (offline, tiny tokenizer)."""

from __future__ import annotations

import pytest
import torch

from sstmerge.data.chat import IGNORE_INDEX, collate, encode_example, pad_id
from sstmerge.data.examples import Example
from sstmerge.errors import ConfigError, DataError
from sstmerge.io.models import CHATML_TEMPLATE, build_tiny_tokenizer

CHATML = CHATML_TEMPLATE

SENTENCES = [
    "the cat sat on the mat",
    "hello world, how are you today?",
    "I cannot help with that request.",
    "Paris is the capital of France.",
    "You are a helpful assistant.",
]


def build_tokenizer(chat_template: str | None = CHATML, pad: bool = True):
    """A byte-level BPE tokenizer trained in memory (exact decode round-trip), ChatML special tokens."""
    return build_tiny_tokenizer(SENTENCES, chat_template=chat_template, pad=pad)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def supervised_text(tokenizer, enc) -> str:
    return tokenizer.decode([i for i, lab in zip(enc["input_ids"], enc["labels"]) if lab != IGNORE_INDEX])


def check_labels(enc):
    assert len(enc["input_ids"]) == len(enc["labels"])
    first = next(k for k, lab in enumerate(enc["labels"]) if lab != IGNORE_INDEX)
    # contiguous: -100 ... -100, then answer tokens equal to input_ids
    assert all(lab == IGNORE_INDEX for lab in enc["labels"][:first])
    assert enc["labels"][first:] == enc["input_ids"][first:]
    return first


def test_prompt_is_masked_answer_supervised(tok):
    ex = Example(prompt="hello world, how are you?", response="the cat sat on the mat")
    enc = encode_example(tok, ex)
    first = check_labels(enc)
    assert supervised_text(tok, enc) == "the cat sat on the mat<|im_end|>"
    assert tok.decode(enc["input_ids"][:first]) == tok.apply_chat_template(
        ex.context(), add_generation_prompt=True, tokenize=False
    )
    assert enc["input_ids"][-1] == tok.eos_token_id


def test_system_and_multi_turn(tok):
    ex = Example(
        messages=(
            ("system", "You are a helpful assistant."),
            ("user", "hello"),
            ("assistant", "hello world"),
            ("user", "where is Paris?"),
            ("assistant", "Paris is the capital of France."),
        )
    )
    enc = encode_example(tok, ex)
    first = check_labels(enc)
    assert supervised_text(tok, enc) == "Paris is the capital of France.<|im_end|>"
    prefix = tok.decode(enc["input_ids"][:first])
    assert prefix.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert "hello world<|im_end|>" in prefix  # earlier assistant turn is context, not target
    assert prefix.endswith("<|im_start|>assistant\n")


def test_injected_system_prompt_template():
    # like SmolLM2: a default system prompt is injected when the conversation has none
    tmpl = (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}" + CHATML[len("{% for message in messages %}"):]
    )
    t = build_tokenizer(tmpl)
    enc = encode_example(t, Example(prompt="hello", response="the cat"))
    first = check_labels(enc)
    assert t.decode(enc["input_ids"][:first]).startswith("<|im_start|>system\nYou are a helpful assistant.")
    assert supervised_text(t, enc) == "the cat<|im_end|>"


def test_scaffolding_before_answer_is_masked():
    # a template that inserts an (empty) think block before the final answer only
    tmpl = (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
        "{% if loop.last and message['role'] == 'assistant' %}{{ '<think></think>' }}{% endif %}"
        "{{ message['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    t = build_tokenizer(tmpl)
    enc = encode_example(t, Example(prompt="hello", response="think"))
    check_labels(enc)
    assert supervised_text(t, enc) == "think<|im_end|>"


def test_no_chat_template_fallback():
    t = build_tokenizer(chat_template=None)
    enc = encode_example(t, Example(prompt="hello", response="the cat"))
    first = check_labels(enc)
    assert t.decode(enc["input_ids"][:first]) == "User: hello\nAssistant: "
    assert supervised_text(t, enc) == "the cat<|im_end|>"


def test_truncation_cuts_prompt_from_left(tok):
    long_prompt = " ".join(["the cat sat on the mat"] * 40)
    ex = Example(prompt=long_prompt, response="Paris is the capital of France.")
    full = encode_example(tok, ex, max_length=10_000)
    enc = encode_example(tok, ex, max_length=48)
    assert len(enc["input_ids"]) == 48
    check_labels(enc)
    assert supervised_text(tok, enc) == "Paris is the capital of France.<|im_end|>"
    assert enc["input_ids"] == full["input_ids"][-48:]  # the left part of the prompt was dropped
    assert tok.decode(enc["input_ids"]).endswith("<|im_start|>assistant\nParis is the capital of France.<|im_end|>")


def test_truncation_of_overlong_answer_keeps_head(tok):
    answer = " ".join(["hello world"] * 50)
    enc = encode_example(tok, Example(prompt="hello", response=answer), max_length=16)
    assert len(enc["input_ids"]) == 16
    first = check_labels(enc)
    assert first == 1  # one prompt token kept so the first answer token is predicted
    assert answer.startswith(supervised_text(tok, enc))


def test_empty_answer_raises(tok):
    with pytest.raises(DataError, match="empty answer"):
        encode_example(tok, Example(prompt="hello", response=""))
    with pytest.raises(DataError):
        encode_example(tok, Example(prompt="hello", response="   "))
    with pytest.raises(DataError, match="assistant"):
        encode_example(tok, Example(messages=(("user", "hi"), ("user", "hello"))))
    with pytest.raises(ConfigError):
        encode_example(tok, Example(prompt="a", response="b"), max_length=1)


def test_pad_id_falls_back_to_eos():
    assert pad_id(build_tokenizer()) == build_tokenizer().convert_tokens_to_ids("<pad>")
    t = build_tokenizer(pad=False)
    assert t.pad_token_id is None
    assert pad_id(t) == t.eos_token_id


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_padding(side):
    batch = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8, 9, 10, 11, 12], "labels": [-100, -100, -100, 11, 12]},
        {"input_ids": [13], "labels": [13]},
    ]
    out = collate(batch, pad_token_id=0, padding_side=side)
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    for v in out.values():
        assert v.shape == (3, 5) and v.dtype == torch.long
    assert out["attention_mask"].sum(1).tolist() == [3, 5, 1]
    for i, item in enumerate(batch):
        k = len(item["input_ids"])
        real = slice(0, k) if side == "right" else slice(5 - k, 5)
        pad = slice(k, 5) if side == "right" else slice(0, 5 - k)
        assert out["input_ids"][i, real].tolist() == item["input_ids"]
        assert out["labels"][i, real].tolist() == item["labels"]
        assert (out["input_ids"][i, pad] == 0).all()
        assert (out["labels"][i, pad] == IGNORE_INDEX).all()
        assert (out["attention_mask"][i, pad] == 0).all()
    with pytest.raises(ConfigError):
        collate(batch, 0, padding_side="middle")
    with pytest.raises(DataError):
        collate([], 0)


def test_encoded_examples_collate_and_shift(tok):
    encs = [
        encode_example(tok, Example(prompt="hello", response="the cat")),
        encode_example(tok, Example(prompt="how are you today?", response="I cannot help with that request.")),
    ]
    out = collate(encs, pad_id(tok), padding_side="left")
    # the last real token of every row (left padding) is the end-of-turn, and it is supervised
    assert (out["input_ids"][:, -1] == tok.eos_token_id).all()
    assert (out["labels"][:, -1] == tok.eos_token_id).all()
