"""Minimal LoRA supervised fine-tuning on CPU (PEFT), used to build the demo utility / safety adapters.

This is deliberately small and deterministic: AdamW (constant learning rate, or linear / cosine decay to 0
after a linear warm-up: ``lr_schedule``, ``warmup_ratio``), a fixed number of optimizer steps, mini-batches
drawn from a seeded permutation of the examples (reshuffled every epoch), and the loss is the mean
cross-entropy over the *answer* tokens only (labels from :func:`sstmerge.data.chat.encode_example`), plus, with
``refusal_unlikelihood`` > 0, an unlikelihood term that lowers the probability of a refusal's first token on
the prompts whose answers do not refuse (:func:`refusal_unlikelihood_loss`).

The caller's model is **not** left modified: :func:`train_lora` injects LoRA layers with
``peft.get_peft_model``, trains, saves the adapter, then ``unload()``\\ s the PEFT wrapper (which puts the
original ``nn.Linear`` modules back, without merging) and restores every parameter's ``requires_grad``
flag and the train/eval mode. The same model object can therefore be used to train several adapters in a
row (e.g. utility, then safety) or be evaluated afterwards.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

from .._logging import quiet
from ..data.chat import IGNORE_INDEX, collate, encode_example, pad_id
from ..data.examples import Example
from ..errors import DataError, ModelError
from ..io.atomic import atomic_output_dir

__all__ = ["TrainOptions", "train_lora", "train_from_files"]

logger = logging.getLogger(__name__)

DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TrainOptions(BaseModel):
    """Options of :func:`train_lora` (unknown keys are rejected)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    r: int = Field(8, gt=0, description="LoRA rank")
    lora_alpha: float = Field(16, gt=0, description="LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with rsLoRA)")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGET_MODULES), min_length=1)
    steps: int = Field(60, gt=0, description="number of optimizer steps")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate")
    batch_size: int = Field(8, gt=0)
    max_length: int = Field(256, ge=2, description="max tokens per example (prompt truncated from the left)")
    seed: int = 0
    weight_decay: float = Field(0.0, ge=0.0)
    use_rslora: bool = False
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="learning rate after the warm-up: constant, or linear / cosine decay to 0 at the "
        "last step (transformers.get_scheduler)")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of the steps (rounded up) of linear "
                                "warm-up from 0 to lr")
    refusal_unlikelihood: float = Field(
        0.0, ge=0.0, description="weight of the refusal-opener unlikelihood term on the answers that do not refuse "
        "(refusal_unlikelihood_loss; the reported losses include it); 0 = plain cross-entropy")

    @property
    def warmup_steps(self) -> int:
        return math.ceil(self.warmup_ratio * self.steps)  # as transformers.TrainingArguments.get_warmup_steps

    @model_serializer(mode="wrap")
    def _omit_new_option_defaults(self, handler):
        # the schedule and unlikelihood options came after the first recipes: left out of dumps at their
        # defaults, so the cache keys (hashes of the dump) of recipes that do not use them are the ones they had
        data = handler(self)
        for key in ("lr_schedule", "warmup_ratio", "refusal_unlikelihood"):
            if key in data and data[key] == type(self).model_fields[key].default:
                del data[key]
        return data

    @field_validator("target_modules")
    @classmethod
    def _non_empty_names(cls, v: list[str]) -> list[str]:
        if any(not m.strip() for m in v):
            raise ValueError("target_modules must not contain empty names")
        return v


def _mean(xs: list[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


def train_lora(
    model,
    tokenizer,
    examples: list[Example],
    out_dir: str | os.PathLike,
    options: TrainOptions,
    *,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
    provenance: dict | None = None,
    inputs: list | None = None,
) -> Path:
    """Train a LoRA adapter on ``examples`` and save it (PEFT format) to ``out_dir``.

    ``model`` is an already-loaded HF causal LM (float32 recommended on CPU). It is wrapped with
    ``peft.get_peft_model`` for training and **restored afterwards** (LoRA layers unloaded, ``requires_grad``
    flags and train/eval mode restored), also when training fails. The global torch RNG state is not
    changed (training runs under ``torch.random.fork_rng``).

    The output folder is written atomically: it holds ``adapter_config.json``,
    ``adapter_model.safetensors`` and ``train_report.json`` or does not exist. ``base_model_name_or_path``,
    when given, is recorded in ``adapter_config.json``.

    ``inputs``: paths the run reads (data files, base folder), which ``out_dir`` may never be or hold; with
    ``overwrite`` only an earlier sstmerge output is replaced (:class:`~sstmerge.io.atomic.OutputClaim`).

    Raises :class:`DataError` if ``examples`` is empty, :class:`OutputExistsError` if ``out_dir`` exists
    and not ``overwrite``, :class:`UnsafeOutputError` if it may not be written, :class:`ModelError` if the model cannot take the LoRA layers or the loss
    becomes non-finite.
    """
    import peft
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model
    from tqdm.auto import tqdm

    from ..io.adapter import read_adapter
    from ..io.hashing import sha256_file

    if not isinstance(options, TrainOptions):
        options = TrainOptions.model_validate(options)
    examples = list(examples)
    if not examples:
        raise DataError("train_lora got no examples; give at least one prompt/response example")
    if isinstance(model, PeftModel) or hasattr(model, "peft_config"):
        raise ModelError("train_lora needs a plain base model, got a model that already carries PEFT adapters")

    encoded = [encode_example(tokenizer, ex, max_length=options.max_length) for ex in examples]
    pad = pad_id(tokenizer)
    n = len(encoded)
    n_answer_tokens = sum(sum(1 for t in e["labels"] if t != -100) for e in encoded)
    openers, discouraged = refusal_openers(examples, encoded) if options.refusal_unlikelihood > 0 else ([], [])

    params = dict(model.named_parameters())
    dtypes = {p.dtype for p in params.values()}
    if dtypes - {torch.float32}:
        logger.warning("training LoRA on a model with parameter dtypes %s; float32 is recommended on CPU", dtypes)
    requires_grad = {name: p.requires_grad for name, p in params.items()}
    was_training = model.training

    lora_config = LoraConfig(
        r=options.r,
        lora_alpha=options.lora_alpha,
        lora_dropout=options.lora_dropout,
        target_modules=list(options.target_modules),
        use_rslora=options.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )

    with atomic_output_dir(out_dir, overwrite=overwrite, inputs=inputs or [], kind="train") as tmp, \
            torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        try:
            peft_model = get_peft_model(model, lora_config)
        except ValueError as exc:
            raise ModelError(
                f"could not add LoRA layers to {type(model).__name__}: {exc}; "
                f"check target_modules={list(options.target_modules)}"
            ) from exc
        try:
            losses, seconds = _train_loop(peft_model, encoded, pad, options, tqdm, openers, discouraged)
            if base_model_name_or_path is not None:
                for cfg in peft_model.peft_config.values():
                    cfg.base_model_name_or_path = base_model_name_or_path
            # save_embedding_layers=False: we never resize the vocabulary, and "auto" would query the Hub
            # for base_model_name_or_path's config.json (slow / failing offline).
            peft_model.save_pretrained(str(tmp), save_embedding_layers=False)
            read_adapter(tmp)  # the written adapter reads back, every tensor finite (NonFiniteError otherwise)
            k = min(5, max(1, len(losses) // 2))  # first/last 5 steps; windows never overlap for < 10 steps
            report = {
                "options": options.model_dump(mode="json"),
                "n_examples": n,
                "n_answer_tokens": n_answer_tokens,
                **({"refusal_openers": tokenizer.convert_ids_to_tokens(openers),
                    "n_unlikelihood_examples": sum(discouraged)} if openers else {}),
                "initial_loss": _mean(losses[:k]),
                "final_loss": _mean(losses[-k:]),
                "losses": losses,
                "seconds": round(seconds, 3),
                "base_model_name_or_path": base_model_name_or_path,
                **(provenance or {}),
                "output": {"sha256": {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}},
                "versions": {
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "peft": peft.__version__,
                },
            }
            (tmp / "train_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        finally:
            _restore(peft_model, model, requires_grad, was_training)

    dest = Path(out_dir).expanduser().resolve()
    logger.info(
        "saved LoRA adapter to %s (loss %.4f -> %.4f over %d steps, %.1fs)",
        dest, report["initial_loss"], report["final_loss"], options.steps, seconds,
    )
    return dest


def refusal_openers(examples: list[Example], encoded: list[dict]) -> tuple[list[int], list[bool]]:
    """The first answer tokens of the examples whose answer is a refusal (keyword judge), and, per example,
    whether its answer does not refuse and does not itself start with one of them (the examples the refusal
    unlikelihood applies to).

    Raises :class:`DataError` when the data has no refusing or no non-refusing answer (nothing to contrast).
    """
    from ..eval.judges import KeywordRefusalJudge

    judge = KeywordRefusalJudge()
    refuses = [judge.is_refusal(ex.answer()) for ex in examples]
    first = [next((t for t in e["labels"] if t != IGNORE_INDEX), None) for e in encoded]
    openers = sorted({t for t, r in zip(first, refuses) if r and t is not None})
    if not openers or all(refuses):
        raise DataError(
            f"refusal_unlikelihood needs answers that refuse and answers that do not; the data has "
            f"{sum(refuses)} refusing of {len(examples)} (keyword judge). Add both, or set refusal_unlikelihood: 0"
        )
    discouraged = [not r and t is not None and t not in openers for t, r in zip(first, refuses)]
    return openers, discouraged


def _answer_logits(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions where some row predicts an answer token, and what they predict.

    Returns ``logits`` (rows, positions, vocab) in float32 and ``target`` (rows, positions), -100 where the
    row has no answer token there.
    """
    target = batch["labels"][:, 1:]  # (rows, width - 1): what position t predicts
    keep = (target != IGNORE_INDEX).any(0).nonzero().squeeze(1)  # (positions,) with an answer token in any row
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                logits_to_keep=keep)
    return out.logits.float(), target[:, keep]


def refusal_unlikelihood_loss(logits: torch.Tensor, target: torch.Tensor, openers: list[int],
                              discouraged: torch.Tensor) -> torch.Tensor:
    """Mean over the ``discouraged`` rows of −log(1 − P(first answer token ∈ openers)): unlikelihood
    training (Welleck et al., 2020) of the refusal openers at the one position where an answer decides to refuse.

    Greedy decoding refuses whenever the single most likely first token opens a refusal; with every refusal
    starting alike and helpful answers starting in many ways, that happens at a refusal probability well
    under one half. Cross-entropy on a helpful answer raises its own first token; this term lowers the
    refusal openers' total probability on the same prompt directly.

    ``logits`` (rows, positions, vocab), ``target`` (rows, positions; -100 = no answer token), ``discouraged``
    (rows,) bool. Zero when no row is discouraged.
    """
    rows = discouraged.nonzero().squeeze(1)
    if rows.numel() == 0:
        return logits.new_zeros(())
    answer = target[rows] != IGNORE_INDEX  # (k, positions)
    first = answer.float().argmax(1)  # (k,) the first answer position of each discouraged row
    logp = torch.log_softmax(logits[rows, first], dim=-1)  # (k, vocab)
    log_p_open = torch.logsumexp(logp[:, openers], dim=-1)  # (k,) log P(opener)
    # −log(1 − p) = −log(−expm1(log p)), stable near p = 0; p is kept below 1 so the loss stays finite
    return -torch.log(-torch.expm1(log_p_open.clamp(max=math.log1p(-1e-6)))).mean()


def answer_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens (labels != -100), token t+1 predicted at position t: the value
    of ``model(**batch).loss``, with the LM head (49,152 × 576 on SmolLM2, a fifth of its weights) applied only
    at the positions where some row predicts an answer token instead of at every prompt token.

    ``batch``: ``input_ids``, ``attention_mask``, ``labels``, each (rows, width).
    """
    return _answer_cross_entropy(*_answer_logits(model, batch))


def _answer_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` (rows, positions, vocab) against ``target`` (rows, positions; -100 ignored)."""
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX)


def _lr_scheduler(optimizer, options: TrainOptions):
    """The learning-rate schedule of ``options`` (``transformers.get_scheduler``), or None for a constant rate
    without warm-up. With warmup = ⌈warmup_ratio · steps⌉, step t (0-based) trains at lr · t / warmup while
    t < warmup, then at lr (constant),
    lr · (steps - t) / (steps - warmup) (linear) or lr · ½ (1 + cos(π (t - warmup) / (steps - warmup))) (cosine)."""
    if options.lr_schedule == "constant" and options.warmup_steps == 0:
        return None
    from transformers import get_scheduler

    name = "constant_with_warmup" if options.lr_schedule == "constant" else options.lr_schedule
    return get_scheduler(name, optimizer, num_warmup_steps=options.warmup_steps, num_training_steps=options.steps)


def _train_loop(peft_model, encoded: list[dict], pad: int, options: TrainOptions, tqdm, openers: list[int] = (),
                discouraged: list[bool] = ()) -> tuple[list[float], float]:
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=options.lr, weight_decay=options.weight_decay)
    scheduler = _lr_scheduler(optimizer, options)
    gen = torch.Generator().manual_seed(options.seed)
    n = len(encoded)
    bs = min(options.batch_size, n)

    def batches():
        while True:  # one permutation per epoch, cycled until enough steps are done
            order = torch.randperm(n, generator=gen).tolist()
            for i in range(0, n, bs):
                yield order[i:i + bs]

    opener_ids = list(openers)  # a list: a tuple would index several dimensions
    discouraged_rows = torch.tensor(list(discouraged), dtype=torch.bool)  # (examples,)
    peft_model.train()
    losses: list[float] = []
    start = time.perf_counter()
    it = batches()
    with tqdm(total=options.steps, desc="LoRA SFT", unit="step", disable=quiet()) as bar:
        for step in range(options.steps):
            rows = next(it)
            batch = collate([encoded[j] for j in rows], pad, padding_side="right")
            optimizer.zero_grad(set_to_none=True)
            logits, target = _answer_logits(peft_model, batch)  # (rows, positions, vocab), (rows, positions)
            loss = _answer_cross_entropy(logits, target)
            if options.refusal_unlikelihood > 0:
                loss = loss + options.refusal_unlikelihood * refusal_unlikelihood_loss(
                    logits, target, opener_ids, discouraged_rows[rows])
            value = float(loss.detach())
            if not math.isfinite(value):
                raise ModelError(
                    f"training loss became non-finite ({value}) at step {step}; lower lr (now {options.lr})"
                )
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            losses.append(value)
            if step == 0:
                logger.info("LoRA SFT: step 1/%d loss %.4f", options.steps, value)
            bar.set_postfix(loss=f"{value:.4f}")
            bar.update(1)
    seconds = time.perf_counter() - start
    logger.info("LoRA SFT: step %d/%d loss %.4f", options.steps, options.steps, losses[-1])
    return losses, seconds


def _restore(peft_model, model, requires_grad: dict[str, bool], was_training: bool) -> None:
    """Remove the LoRA layers from ``model`` and restore its parameter flags and mode."""
    base = peft_model.unload()  # LoraModel.unload(): original Linear modules back, nothing merged
    if base is not model:  # pragma: no cover - PEFT injects in place, so this should not happen
        logger.warning("peft unload returned a different object than the model passed in")
    if hasattr(model, "peft_config"):
        del model.peft_config
    for name, p in model.named_parameters():
        if name in requires_grad:
            p.requires_grad_(requires_grad[name])
    model.train(was_training)


def train_from_files(
    base: str,
    data: list[str],
    out_dir: str | os.PathLike,
    options: TrainOptions,
    *,
    max_samples: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    model_and_tokenizer=None,
) -> Path:
    """Train a LoRA adapter on ``base`` from JSONL files (``bundled:NAME`` or paths), concatenated in order.

    ``max_samples`` caps each file (seeded by ``options.seed``). The data files' SHA-256 are recorded in
    ``train_report.json``. ``model_and_tokenizer`` lets a pipeline reuse an already-loaded base model.
    """
    from ..data.jsonl import load_examples, resolve_data
    from ..io.hashing import sha256_file
    from ..io.models import load_causal_lm, require_tokenizer, resolve_base

    from ..io.atomic import check_output_target
    from ..io.models import default_cache_dir

    if not data:
        raise DataError("no training data: pass --data FILE.jsonl (repeatable; 'bundled:NAME' for bundled files)")
    inputs = [resolve_data(spec) for spec in data] + [base, cache_dir or default_cache_dir()]
    check_output_target(out_dir, overwrite=overwrite, inputs=inputs)  # before the model loads
    examples, sources = [], []
    for spec in data:
        path = resolve_data(spec)
        rows = load_examples(path, max_samples=max_samples, seed=options.seed)  # validates before the model loads
        examples += rows
        sources.append({"spec": str(spec), "path": str(path), "sha256": sha256_file(path), "n": len(rows)})
    if model_and_tokenizer is None:
        model_and_tokenizer = load_causal_lm(base, cache_dir)
    model, tokenizer = model_and_tokenizer
    require_tokenizer(tokenizer, base, "training")
    base_name = str(base) if str(base) == "smollm2" else str(resolve_base(base, cache_dir))
    return train_lora(model, tokenizer, examples, out_dir, options, base_model_name_or_path=base_name,
                      overwrite=overwrite, provenance={"data": sources, "base": str(base)}, inputs=inputs)
