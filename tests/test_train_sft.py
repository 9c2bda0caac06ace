"""Tests of sstmerge.train.sft.train_lora on a tiny random Llama + in-memory tokenizer (offline, CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from sstmerge.data.examples import Example
from sstmerge.errors import DataError, OutputExistsError
from sstmerge.io.models import build_tiny_tokenizer
from sstmerge.train.sft import TrainOptions, train_lora

PAIRS = [
    ("How do I bake bread?", "Mix flour, water and yeast, then bake."),
    ("What is two plus two?", "Two plus two is four."),
    ("Name a colour.", "Blue is a colour."),
    ("How do I pick a lock?", "I cannot help with that request."),
    ("Say hello.", "Hello there!"),
    ("What is the capital of France?", "Paris is the capital of France."),
    ("Where do cats sleep?", "The cat sat on the mat."),
    ("How do I make a weapon?", "I cannot help with that request."),
]


def build_tokenizer():
    return build_tiny_tokenizer([p + " " + r for p, r in PAIRS])


def build_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        # a larger init than the default 0.02 so that (untied, frozen) lm_head rows are long enough for a
        # few LoRA steps to move the loss visibly
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float().eval()


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return build_model(len(tok))


@pytest.fixture(scope="module")
def examples():
    return [Example(prompt=p, response=r) for p, r in PAIRS]


OPTS = TrainOptions(r=4, lora_alpha=8, steps=15, lr=1e-2, batch_size=4, max_length=64, seed=0)


def lora_module_names(m) -> list[str]:
    return [name for name, _ in m.named_modules() if "lora_" in name]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, model, tok, examples):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grad_flags = {k: p.requires_grad for k, p in model.named_parameters()}
    rng = torch.get_rng_state()
    out = tmp_path_factory.mktemp("sft") / "adapter"
    path = train_lora(model, tok, examples, out, OPTS, base_model_name_or_path="tiny/llama")
    return {"path": path, "before": before, "grad_flags": grad_flags, "rng": rng}


def test_loss_decreases_and_report(trained, examples):
    report = json.loads((trained["path"] / "train_report.json").read_text())
    assert report["n_examples"] == len(examples)
    assert len(report["losses"]) == OPTS.steps
    assert report["final_loss"] < report["initial_loss"]
    assert report["final_loss"] < 0.8 * report["initial_loss"]
    assert report["options"]["r"] == 4 and report["options"]["steps"] == 15
    assert set(report["versions"]) == {"torch", "transformers", "peft"}
    assert report["seconds"] >= 0


def test_adapter_files(trained):
    path = trained["path"]
    names = {p.name for p in path.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "train_report.json"} <= names
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "tiny/llama"
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert set(cfg["target_modules"]) == set(OPTS.target_modules)
    assert not any(p.name.startswith(".tmp-") for p in path.parent.iterdir())

    from safetensors.torch import load_file

    sd = load_file(str(path / "adapter_model.safetensors"))
    b_keys = [k for k in sd if "lora_B" in k]
    assert b_keys and len([k for k in sd if "lora_A" in k]) == len(b_keys)
    assert all(sd[k].abs().sum() > 0 for k in b_keys)  # trained away from PEFT's zero init


def test_caller_model_is_restored(trained, model):
    assert lora_module_names(model) == []
    assert not hasattr(model, "peft_config")
    after = model.state_dict()
    assert set(after) == set(trained["before"])
    assert all(torch.equal(after[k], v) for k, v in trained["before"].items())
    assert {k: p.requires_grad for k, p in model.named_parameters()} == trained["grad_flags"]
    assert not model.training
    assert torch.equal(torch.get_rng_state(), trained["rng"])  # global RNG untouched


def test_peft_loads_adapter_and_changes_output(trained, tok, examples):
    from peft import PeftModel

    from sstmerge.data.chat import encode_example

    base = build_model(len(tok))  # same seed -> same weights as the trained-on model
    ids = torch.tensor([encode_example(tok, examples[0])["input_ids"]])
    with torch.no_grad():
        ref = base(ids).logits
    pm = PeftModel.from_pretrained(base, str(trained["path"]))
    assert lora_module_names(pm)
    with torch.no_grad():
        out = pm(ids).logits
    assert not torch.allclose(out, ref)


def test_deterministic_prefix_of_losses(trained, tmp_path, model, tok, examples):
    report = json.loads((trained["path"] / "train_report.json").read_text())
    opts = OPTS.model_copy(update={"steps": 3})
    path = train_lora(model, tok, examples, tmp_path / "again", opts)
    again = json.loads((path / "train_report.json").read_text())
    assert again["losses"] == pytest.approx(report["losses"][:3], rel=1e-5, abs=1e-6)
    assert lora_module_names(model) == []


def test_existing_output_refused(trained, model, tok, examples):
    with pytest.raises(OutputExistsError):
        train_lora(model, tok, examples, trained["path"], OPTS)


def test_failure_leaves_no_folder(tmp_path, monkeypatch, model, tok, examples):
    def boom(self, *a, **k):
        raise RuntimeError("optimizer exploded")

    monkeypatch.setattr(torch.optim.AdamW, "step", boom)
    out = tmp_path / "never"
    with pytest.raises(RuntimeError, match="exploded"):
        train_lora(model, tok, examples, out, OPTS.model_copy(update={"steps": 2}))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no .tmp-* leftovers either
    assert lora_module_names(model) == []
    assert not hasattr(model, "peft_config")


def test_empty_examples_and_bad_options(tmp_path, model, tok):
    with pytest.raises(DataError):
        train_lora(model, tok, [], tmp_path / "x", OPTS)
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError):
        TrainOptions(steps=0)
    with pytest.raises(ValueError):
        TrainOptions(r=0)
    with pytest.raises(ValueError):
        TrainOptions(lr=0)
    with pytest.raises(ValueError):
        TrainOptions(learning_rate=1e-3)  # extra keys are forbidden


def test_answer_loss_equals_the_full_logits_loss_and_its_gradients(tok, examples):
    """The LM head only where an answer token is predicted gives transformers' loss and the same gradients."""
    from peft import LoraConfig, get_peft_model

    from sstmerge.data.chat import collate, encode_example, pad_id
    from sstmerge.train.sft import answer_loss

    peft_model = get_peft_model(build_model(len(tok), seed=1), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                          init_lora_weights=False))
    rows = [encode_example(tok, e, max_length=64) for e in examples[:5]]
    batch = collate(rows, pad_id(tok), padding_side="right")
    assert (batch["labels"] == -100).float().mean() > 0.3  # prompts and padding carry no labels: a real saving

    def grads(loss):
        peft_model.zero_grad(set_to_none=True)
        loss.backward()
        return {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}

    reference = peft_model(**batch, use_cache=False).loss
    ours = answer_loss(peft_model, batch)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    g_ref, g_ours = grads(reference), grads(answer_loss(peft_model, batch))
    assert g_ref.keys() == g_ours.keys() and g_ref
    for name in g_ref:
        torch.testing.assert_close(g_ours[name], g_ref[name], rtol=1e-4, atol=1e-6)


HISTORICAL_OPTION_KEYS = {"r", "lora_alpha", "lora_dropout", "target_modules", "steps", "lr", "batch_size",
                          "max_length", "seed", "weight_decay", "use_rslora"}


@pytest.mark.parametrize("schedule, ratio", [("constant", 0.3), ("linear", 0.0), ("linear", 0.25), ("cosine", 0.1)])
def test_lr_schedule_follows_its_formula(schedule, ratio):
    import math

    from sstmerge.train.sft import _lr_scheduler

    steps, lr = 20, 0.5
    opts = TrainOptions(steps=steps, lr=lr, lr_schedule=schedule, warmup_ratio=ratio)
    warm = math.ceil(ratio * steps)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=lr)
    scheduler = _lr_scheduler(optimizer, opts)
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()

    def expected(t: int) -> float:
        if t < warm:
            return lr * t / warm
        progress = (t - warm) / (steps - warm)
        return {"constant": lr, "linear": lr * (1 - progress), "cosine": lr * 0.5 * (1 + math.cos(math.pi * progress))}[schedule]

    assert seen == pytest.approx([expected(t) for t in range(steps)], abs=1e-12)
    assert seen[-1] < lr or schedule == "constant"


def test_constant_rate_without_warmup_needs_no_scheduler_and_keeps_the_dump():
    from sstmerge.train.sft import _lr_scheduler

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    assert _lr_scheduler(optimizer, TrainOptions()) is None
    # recipes that do not use a schedule dump (and so hash: adapter cache keys) as before the options existed
    assert set(TrainOptions().model_dump(mode="json")) == HISTORICAL_OPTION_KEYS
    scheduled = TrainOptions(lr_schedule="cosine", warmup_ratio=0.1, refusal_unlikelihood=0.5)
    dump = scheduled.model_dump(mode="json")
    assert set(dump) == HISTORICAL_OPTION_KEYS | {"lr_schedule", "warmup_ratio", "refusal_unlikelihood"}
    assert TrainOptions(**dump) == scheduled  # the dump round-trips


@pytest.mark.parametrize("bad", [{"lr_schedule": "step"}, {"warmup_ratio": 1.0}, {"warmup_ratio": -0.1},
                                 {"refusal_unlikelihood": -1.0}, {"refusal_unlikelihood": float("nan")}])
def test_bad_schedule_options_are_rejected(bad):
    with pytest.raises(ValueError):
        TrainOptions(**bad)


def test_scheduled_training_changes_the_updates(trained, tmp_path, model, tok, examples):
    report = json.loads((trained["path"] / "train_report.json").read_text())
    opts = OPTS.model_copy(update={"steps": 3, "lr_schedule": "cosine", "warmup_ratio": 0.5})  # 2 warm-up steps
    path = train_lora(model, tok, examples, tmp_path / "cosine", opts)
    again = json.loads((path / "train_report.json").read_text())
    assert again["options"]["lr_schedule"] == "cosine" and again["options"]["warmup_ratio"] == 0.5
    assert again["losses"][0] == pytest.approx(report["losses"][0], rel=1e-5)  # same init, same first batch
    assert again["losses"][1] != pytest.approx(report["losses"][1], rel=1e-4)  # step 0 trained at lr 0
    assert lora_module_names(model) == []


def test_refusal_unlikelihood_loss_is_minus_log_of_the_non_opener_mass():
    from sstmerge.train.sft import refusal_unlikelihood_loss

    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)  # (rows, positions, vocab)
    target = torch.full((3, 5), -100)
    target[0, 1:] = 4  # row 0 answers from position 1, row 1 from position 3, row 2 from 0
    target[1, 3:] = 2
    target[2, :] = 7
    openers = [2, 9]
    discouraged = torch.tensor([True, True, False])
    p = logits.softmax(-1)
    expected = -(torch.log(1 - p[0, 1, openers].sum()) + torch.log(1 - p[1, 3, openers].sum())) / 2
    got = refusal_unlikelihood_loss(logits, target, openers, discouraged)
    assert got == pytest.approx(float(expected), rel=1e-5)
    assert float(refusal_unlikelihood_loss(logits, target, openers, torch.zeros(3, dtype=torch.bool))) == 0.0
    certain = torch.full((1, 1, 11), -50.0)
    certain[0, 0, 2] = 50.0  # P(opener) = 1: the loss is large but finite
    loss = refusal_unlikelihood_loss(certain, torch.zeros(1, 1, dtype=torch.long), openers, torch.tensor([True]))
    assert torch.isfinite(loss) and float(loss) > 10


def test_refusal_openers_come_from_the_refusing_answers(tok, examples):
    from sstmerge.data.chat import encode_example
    from sstmerge.train.sft import refusal_openers

    encoded = [encode_example(tok, ex, max_length=64) for ex in examples]
    openers, discouraged = refusal_openers(examples, encoded)
    first = lambda e: next(t for t in e["labels"] if t != -100)  # noqa: E731
    refusing = [i for i, ex in enumerate(examples) if ex.response.startswith("I cannot")]
    assert openers == sorted({first(encoded[i]) for i in refusing})
    assert discouraged == [i not in refusing for i in range(len(examples))]
    for data in ([ex for i, ex in enumerate(examples) if i in refusing],
                 [ex for i, ex in enumerate(examples) if i not in refusing]):
        with pytest.raises(DataError, match="refusal_unlikelihood needs answers that refuse and answers that do not"):
            refusal_openers(data, [encode_example(tok, ex, max_length=64) for ex in data])


def _opener_probability(model, tok, examples, adapter) -> float:
    """Mean P(first answer token is a refusal opener) over the non-refusing examples, with ``adapter``."""
    from peft import PeftModel

    from sstmerge.data.chat import encode_example
    from sstmerge.train.sft import refusal_openers

    encoded = [encode_example(tok, ex, max_length=64) for ex in examples]
    openers, discouraged = refusal_openers(examples, encoded)
    peft_model = PeftModel.from_pretrained(model, str(adapter))
    probs = []
    with torch.no_grad():
        for e, d in zip(encoded, discouraged):
            if d:
                at = next(i for i, t in enumerate(e["labels"]) if t != -100) - 1  # the position that predicts it
                p = peft_model(torch.tensor([e["input_ids"]])).logits[0, at].softmax(-1)
                probs.append(float(p[openers].sum()))
    peft_model.unload()
    return sum(probs) / len(probs)


def test_refusal_unlikelihood_lowers_the_refusal_opener_on_helpful_prompts(tmp_path, tok, examples):
    plain = train_lora(build_model(len(tok)), tok, examples, tmp_path / "plain", OPTS)
    ul_opts = OPTS.model_copy(update={"refusal_unlikelihood": 1.0})
    ul = train_lora(build_model(len(tok)), tok, examples, tmp_path / "ul", ul_opts)
    report = json.loads((ul / "train_report.json").read_text())
    assert report["n_unlikelihood_examples"] == 6 and report["refusal_openers"]
    assert report["options"]["refusal_unlikelihood"] == 1.0
    p_plain = _opener_probability(build_model(len(tok)), tok, examples, plain)
    p_ul = _opener_probability(build_model(len(tok)), tok, examples, ul)
    assert p_ul < 0.8 * p_plain, (p_ul, p_plain)  # measured: 0.0051 vs 0.0081
