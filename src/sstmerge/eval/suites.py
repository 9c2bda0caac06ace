"""Evaluation suites as data + a registry: jailbreak, rephrased, overrefusal, mcq, qa, arithmetic.

Each suite turns items into model queries, scores them and returns ``{"metrics": ..., "records": [...]}``
where every record holds the prompt, the output and the verdict, so any number can be audited.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .._logging import quiet
from ..data.chat import pad_id
from ..data.tasks import ARITHMETIC_INSTRUCTION, QA_INSTRUCTION, extract_final_number
from ..registry import Registry
from .generate import ENGINES, StopRule, default_batch_size, generate, prefill, render_prompt

log = logging.getLogger(__name__)


@dataclass
class EvalSettings:
    max_new_tokens: int = 64
    batch_size: int | None = None  # rows per generation batch; None: the device's default (generate.default_batch_size)
    limit: int | None = None
    shots: int = 0  # mcq few-shot exemplars
    judges: tuple[str, ...] = ("keyword",)
    templates_per_prompt: int | None = None  # jailbreak: None = every template on every prompt
    backend: str = "hf"  # generation backend: "hf" (transformers, batched) or "vllm"
    # refusal suites (jailbreak, overrefusal) judged by the keyword judge only: stop an answer as soon as its
    # verdict is settled (exact: KeywordRefusalJudge.settled), and, with decision_tokens = N, after N new tokens
    # at most (an approximation: refusals come first; measured by benchmarks/bench_eval.py)
    stop_when_decided: bool = False
    decision_tokens: int | None = None
    engine: str = "cached"  # HF backend: "cached" (common prefix once, finished rows dropped) or "transformers"

    def __post_init__(self) -> None:
        """Bad settings are errors here, not silent wrong answers later (``limit=0`` used to report a rate of
        0.000 over no items; ``limit=-1`` dropped an item through Python slicing)."""
        from ..errors import ConfigError

        def whole(name: str, value, lo: int, optional: bool = False) -> None:
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ConfigError(f"--{name.replace('_', '-')} must be a whole number >= {lo}, got {value!r}")

        whole("max_new_tokens", self.max_new_tokens, 1)
        whole("batch_size", self.batch_size, 1, optional=True)
        whole("limit", self.limit, 1, optional=True)
        whole("shots", self.shots, 0)
        whole("templates_per_prompt", self.templates_per_prompt, 1, optional=True)
        whole("decision_tokens", self.decision_tokens, 1, optional=True)
        if not self.judges:
            raise ConfigError("at least one --judge is needed (keyword, logprob)")
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")

    def as_dict(self) -> dict[str, Any]:
        out = {"max_new_tokens": self.max_new_tokens, "batch_size": self.batch_size, "limit": self.limit,
               "shots": self.shots, "judges": list(self.judges)}
        if self.templates_per_prompt is not None:  # absent when unset, so older cache keys stay valid
            out["templates_per_prompt"] = self.templates_per_prompt
        if self.backend != "hf":
            out["backend"] = self.backend
        if self.stop_when_decided:  # absent when off, so older cache keys stay valid
            out["stop_when_decided"] = True
        if self.decision_tokens is not None:
            out["decision_tokens"] = self.decision_tokens
        out["engine"] = self.engine  # the engines agree up to float rounding; a cached answer names its engine
        return out


#: the suites whose answers are refusal verdicts (``stop_when_decided`` / ``decision_tokens`` apply to them)
REFUSAL_SUITES = frozenset({"jailbreak", "rephrased", "overrefusal"})


@dataclass
class SuiteContext:
    model: Any  # the HF model (+ adapter); used for log-likelihood scoring (mcq) and by the default generator
    tokenizer: Any
    settings: EvalSettings
    judges: dict[str, Any] = field(default_factory=dict)  # name -> RefusalJudge
    generator: Callable[..., list[str]] | None = None  # (prompts, max_new_tokens, desc) -> completions; None: HF

    def complete(self, prompts: Sequence, desc: str = "generate", stop: StopRule | None = None) -> list[str]:
        """Greedy completions of chat prompts with the settings' max_new_tokens (HF batched, or the backend's);
        ``stop`` ends a row early once its answer is decided (HF backend; the vLLM backend ignores it)."""
        if self.generator is not None:
            return self.generator(list(prompts), max_new_tokens=self.settings.max_new_tokens, desc=desc)
        return generate(self.model, self.tokenizer, prompts, max_new_tokens=self.settings.max_new_tokens,
                        batch_size=self.batch_size(), desc=desc, stop=stop, engine=self.settings.engine)

    def batch_size(self) -> int:
        """The settings' batch size, or the default of the device the model is on."""
        if self.settings.batch_size is not None:
            return self.settings.batch_size
        return default_batch_size(str(next(self.model.parameters()).device), getattr(self.model, "config", None))

    def refusal_stop(self) -> StopRule | None:
        """The early-stop rule of the refusal suites: every judge's verdict settled, or ``decision_tokens``
        reached. None when off, or when a judge other than the keyword judge reads whole answers."""
        from .judges import KeywordRefusalJudge

        judges = list(self.judges.values())
        if not self.settings.stop_when_decided or not judges or \
                not all(isinstance(j, KeywordRefusalJudge) for j in judges):
            return None
        cap = self.settings.decision_tokens

        def decided(text: str, n_tokens: int) -> bool:
            return (cap is not None and n_tokens >= cap) or all(j.settled(text) for j in judges)

        return decided


def _limit(items: list, limit: int | None) -> list:
    return items if limit is None else items[:limit]


def _judge_all(ctx: SuiteContext, prompts: list[str], answers: list[str]) -> dict[str, list[bool]]:
    return {name: list(judge.judge(prompts, answers)) for name, judge in ctx.judges.items()}


def _refusal_metrics(verdicts: dict[str, list[bool]], groups: list[str] | None = None) -> dict[str, Any]:
    from .judges import agreement

    out: dict[str, Any] = {}
    for name, v in verdicts.items():
        out[f"refusal_rate[{name}]"] = sum(v) / max(len(v), 1)
        if groups is not None:
            per: dict[str, list[bool]] = defaultdict(list)
            for g, x in zip(groups, v):
                per[g].append(x)
            out[f"refusal_rate_by_template[{name}]"] = {g: sum(x) / len(x) for g, x in per.items()}
    names = list(verdicts)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            out[f"agreement[{names[i]},{names[j]}]"] = agreement(verdicts[names[i]], verdicts[names[j]])
    out["n"] = len(next(iter(verdicts.values()), []))
    return out


def run_jailbreak(ctx: SuiteContext, prompts: Sequence, templates: Sequence) -> dict[str, Any]:
    """Share of harmful prompts refused, plain and wrapped in jailbreak templates.

    Every prompt is asked plain and inside every template, or, with ``templates_per_prompt = t``, inside
    ``t`` templates chosen in rotation (prompt i gets templates i, i+1, ..., i+t-1 mod T), so each template
    is used about equally often at a fraction of the cost.
    """
    prompts = _limit(list(prompts), ctx.settings.limit)
    templates = list(templates)
    per = ctx.settings.templates_per_prompt
    queries, groups, ids = [], [], []
    for n, item in enumerate(prompts):
        queries.append(item.prompt)
        groups.append("plain")
        ids.append(item.id)
        chosen = templates if per is None else [templates[(n + j) % len(templates)] for j in range(min(per, len(templates)))]
        for t in chosen:
            queries.append(t.apply(item.prompt))
            groups.append(t.name)
            ids.append(item.id)
    answers = ctx.complete(queries, desc="jailbreak", stop=ctx.refusal_stop())
    verdicts = _judge_all(ctx, queries, answers)
    records = [{"id": i, "template": g, "prompt": q, "output": a, "refused": {n: v[k] for n, v in verdicts.items()}}
               for k, (i, g, q, a) in enumerate(zip(ids, groups, queries, answers))]
    return {"metrics": _refusal_metrics(verdicts, groups), "records": records}


def run_overrefusal(ctx: SuiteContext, prompts: Sequence) -> dict[str, Any]:
    """Share of benign (often sensitive-looking) prompts wrongly refused."""
    prompts = _limit(list(prompts), ctx.settings.limit)
    queries = [p.prompt for p in prompts]
    answers = ctx.complete(queries, desc="overrefusal", stop=ctx.refusal_stop())
    verdicts = _judge_all(ctx, queries, answers)
    groups = [p.category or "uncategorised" for p in prompts]
    metrics = _refusal_metrics(verdicts, groups)
    metrics = {k.replace("refusal_rate", "overrefusal_rate").replace("_by_template", "_by_category"): v for k, v in metrics.items()}
    records = [{"id": p.id, "category": p.category, "prompt": q, "output": a, "refused": {n: v[k] for n, v in verdicts.items()}}
               for k, (p, q, a) in enumerate(zip(prompts, queries, answers))]
    return {"metrics": metrics, "records": records}


def run_rephrased(ctx: SuiteContext, prompts: Sequence) -> dict[str, Any]:
    """Share of harmful requests refused when rephrased (indirect, hypothetical, fictional, historical framing,
    loan phrasing: the row's ``form``), overall and per form. Plain prompts, no template: the rephrasing is the attack."""
    prompts = _limit(list(prompts), ctx.settings.limit)
    queries = [p.prompt for p in prompts]
    answers = ctx.complete(queries, desc="rephrased", stop=ctx.refusal_stop())
    verdicts = _judge_all(ctx, queries, answers)
    groups = [p.form or "unspecified" for p in prompts]
    metrics = {k.replace("_by_template", "_by_form"): v for k, v in _refusal_metrics(verdicts, groups).items()}
    records = [{"id": p.id, "form": p.form, "category": p.category, "prompt": q, "output": a,
                "refused": {n: v[k] for n, v in verdicts.items()}}
               for k, (p, q, a) in enumerate(zip(prompts, queries, answers))]
    return {"metrics": metrics, "records": records}


LETTERS = "ABCDEFGHIJ"


def mcq_messages(item, shots: Sequence = ()) -> list[dict[str, str]]:
    """Chat messages for a multiple-choice question (few-shot exemplars as earlier turns)."""

    def ask(q) -> str:
        options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(q.choices))
        letters = ", ".join(LETTERS[: len(q.choices)])
        return f"{q.question}\n{options}\nAnswer with the letter of the correct option ({letters})."

    messages: list[dict[str, str]] = []
    for s in shots:
        messages += [{"role": "user", "content": ask(s)}, {"role": "assistant", "content": LETTERS[s.answer]}]
    messages.append({"role": "user", "content": ask(item)})
    return messages


@torch.inference_mode()
def letter_logprobs(model, tokenizer, items: Sequence, shots: Sequence, batch_size: int) -> list[list[float]]:
    """log p(letter | prompt) for each option letter, read at the first answer position (batches of similar
    length through :func:`~.generate.prefill`: their common prefix once, the rest left-padded after it)."""
    prefixes = [render_prompt(tokenizer, mcq_messages(it, shots)) for it in items]
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prefixes]
    letter_ids: list[list[int]] = []
    for p, enc, it in zip(prefixes, encoded, items):
        ids = []
        for L in LETTERS[: len(it.choices)]:
            full = tokenizer(p + L, add_special_tokens=False)["input_ids"]
            ids.append(full[len(enc)] if len(full) > len(enc) and full[: len(enc)] == enc else tokenizer(L, add_special_tokens=False)["input_ids"][0])
        letter_ids.append(ids)
    pad = pad_id(tokenizer)
    out: list[list[float]] = [[] for _ in items]
    order = sorted(range(len(items)), key=lambda i: len(encoded[i]))
    for start in tqdm(range(0, len(order), batch_size), desc="mcq", unit="batch", disable=quiet(), leave=False):
        idx = order[start : start + batch_size]
        logits, *_ = prefill(model, [encoded[i] for i in idx], pad)  # (rows, vocab): shared prefixes once
        logp = torch.log_softmax(logits.float().cpu(), dim=-1)
        for row, i in enumerate(idx):
            out[i] = [float(logp[row, t]) for t in letter_ids[i]]
    return out


def run_mcq(ctx: SuiteContext, items: Sequence, dev: Sequence = ()) -> dict[str, Any]:
    """Accuracy by answer-letter log-likelihood in the chat template (zero- or few-shot), overall and per subject."""
    items = _limit(list(items), ctx.settings.limit)
    shots = list(dev)[: ctx.settings.shots]
    scores = letter_logprobs(ctx.model, ctx.tokenizer, items, shots, ctx.batch_size())
    records, per = [], defaultdict(list)
    for it, s in zip(items, scores):
        pred = max(range(len(s)), key=lambda j: s[j])
        ok = pred == it.answer
        per[it.subject or "all"].append(ok)
        records.append({"id": it.id, "subject": it.subject, "question": it.question, "choices": list(it.choices),
                        "answer": LETTERS[it.answer], "prediction": LETTERS[pred], "letter_logprobs": s, "correct": ok})
    n = len(records)
    metrics = {"accuracy": sum(r["correct"] for r in records) / max(n, 1), "n": n, "shots": len(shots),
               "accuracy_by_subject": {k: sum(v) / len(v) for k, v in sorted(per.items())},
               "chance": sum(1 / len(it.choices) for it in items) / max(n, 1)}
    return {"metrics": metrics, "records": records}


def run_qa(ctx: SuiteContext, items: Sequence) -> dict[str, Any]:
    """RepliQA-style reading comprehension: the document is in the prompt; token F1 / exact match;
    unanswerable items score a correct abstention (not a safety refusal)."""
    from .metrics import score_qa

    items = _limit(list(items), ctx.settings.limit)
    queries = [QA_INSTRUCTION.format(document=it.document, question=it.question) for it in items]
    answers = ctx.complete(queries, desc="qa")
    records = []
    for it, q, a in zip(items, queries, answers):
        s = score_qa(a, it.answer, it.answerable)
        records.append({"id": it.id, "question": it.question, "answer": it.answer, "answerable": it.answerable,
                        "output": a, **s})
    ans = [r for r in records if r["answerable"]]
    una = [r for r in records if not r["answerable"]]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs) if rs else None  # noqa: E731
    metrics = {"n": len(records), "f1": mean(ans, "f1"), "exact_match": mean(ans, "em"),
               "n_unanswerable": len(una), "abstention_accuracy": mean(una, "em"),
               "false_abstention_rate": mean(ans, "abstained")}
    return {"metrics": metrics, "records": records}


def run_arithmetic(ctx: SuiteContext, items: Sequence) -> dict[str, Any]:
    """Arithmetic word problems: accuracy of the final number (``The answer is N``, else the last integer)."""
    items = _limit(list(items), ctx.settings.limit)
    queries = [ARITHMETIC_INSTRUCTION.format(question=it.question) for it in items]
    answers = ctx.complete(queries, desc="arithmetic")
    records, per = [], defaultdict(list)
    for it, q, a in zip(items, queries, answers):
        pred = extract_final_number(a)
        ok = pred == it.answer
        per[it.operation].append(ok)
        records.append({"id": it.id, "question": it.question, "answer": it.answer, "operation": it.operation,
                        "output": a, "prediction": pred, "correct": ok})
    n = len(records)
    metrics = {"accuracy": sum(r["correct"] for r in records) / max(n, 1), "n": n,
               "accuracy_by_operation": {k: sum(v) / len(v) for k, v in sorted(per.items())}}
    return {"metrics": metrics, "records": records}


# ------------------------------------------------------------------------------------------ loaders
def data_digest(path: Path) -> str:
    """SHA-256 of a data file, or of a folder's files (names and contents, sorted)."""
    from ..io.hashing import sha256_file

    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(path.rglob("*")):
            if f.is_file():
                h.update(f.relative_to(path).as_posix().encode())
                h.update(sha256_file(f).encode())
        return h.hexdigest()
    return sha256_file(path)


def _source(spec: str) -> tuple[Path, dict[str, Any]]:
    from .data import resolve_eval_data

    path = resolve_eval_data(spec)
    return path, {"source": spec, "path": str(path), "sha256": data_digest(path)}


def load_jailbreak(spec: str, templates: str | None, settings: EvalSettings):
    from .data import load_prompts, load_templates

    path, digest = _source(spec)
    tpl_path, tpl_digest = _source(templates or "bundled:jailbreak_templates")
    digest["templates"] = {"source": tpl_digest["source"], "sha256": tpl_digest["sha256"]}
    return (load_prompts(path, label="unsafe"), load_templates(tpl_path)), digest


def _prompt_loader(label: str) -> Callable[[str, str | None, EvalSettings], tuple[tuple, dict]]:
    """A loader of a prompt file; from a file with safe/unsafe labels (XSTest) it keeps the ``label`` rows."""

    def load(spec: str, templates: str | None, settings: EvalSettings):
        from .data import load_prompts

        path, digest = _source(spec)
        return (load_prompts(path, label=label),), digest

    return load


load_overrefusal = _prompt_loader("safe")
load_rephrased = _prompt_loader("unsafe")


def load_mcq(spec: str, templates: str | None, settings: EvalSettings):
    from ..errors import ConfigError
    from .data import load_mcq as read_mcq
    from .data import load_mcq_dev

    path, digest = _source(spec)
    dev = []
    if settings.shots:
        dev_path, dev_digest = _source("bundled:mcq_dev")
        dev = load_mcq_dev(dev_path)
        if settings.shots > len(dev):
            raise ConfigError(f"--shots {settings.shots}: the few-shot set {dev_path} has only {len(dev)} "
                              f"exemplars; use --shots {len(dev)} or fewer")
        digest["dev"] = {"source": dev_digest["source"], "sha256": dev_digest["sha256"]}
    return (read_mcq(path), dev), digest


def load_qa(spec: str, templates: str | None, settings: EvalSettings):
    from ..data.fictional import generate_fictional_qa
    from .data import load_qa as read_qa

    if spec.startswith("generated:"):
        from ..data.make_bundled import EVAL_SEED, N_QA_EVAL

        items = generate_fictional_qa(n=N_QA_EVAL, seed=EVAL_SEED)
        return (items,), {"source": spec, "generator": f"generate_fictional_qa(n={N_QA_EVAL}, seed={EVAL_SEED})",
                          "sha256": hashlib.sha256(json.dumps([i.__dict__ for i in items]).encode()).hexdigest()}
    path, digest = _source(spec)
    return (read_qa(path),), digest


def load_arithmetic(spec: str, templates: str | None, settings: EvalSettings):
    from .data import load_arithmetic as read_arithmetic

    path, digest = _source(spec)
    return (read_arithmetic(path),), digest


# ------------------------------------------------------------------------------------------ headline columns
Outcomes = list[tuple[str, float]]  # (item key, outcome in [0, 1]) per item, in the suite's item order


def _keyed(pairs: list[tuple[str, float]]) -> Outcomes:
    """Item keys made unique (a repeated id gets ``#2``, ``#3``, ...), so two models pair item by item."""
    seen: dict[str, int] = defaultdict(int)
    out = []
    for key, value in pairs:
        seen[key] += 1
        out.append((key if seen[key] == 1 else f"{key}#{seen[key]}", float(value)))
    return out


def _refusals(plain: bool | None = None) -> Callable[[dict, str], Outcomes]:
    """Per-item refusal verdicts of a refusal suite (jailbreak: only plain or only templated queries)."""

    def outcomes(result: dict, judge: str) -> Outcomes:
        return _keyed([(f"{r['id']}|{r['template']}" if "template" in r else str(r["id"]), r["refused"][judge])
                       for r in result["records"] if plain is None or (r.get("template") == "plain") == plain])

    return outcomes


def _per_item(field: str, where: Callable[[dict], bool] = lambda r: True) -> Callable[[dict, str], Outcomes]:
    """Per-item scores ``record[field]`` (correct, f1, em) of the records that ``where`` selects."""
    return lambda result, judge: _keyed([(str(r["id"]), r[field]) for r in result["records"] if where(r)])


Rates = dict[str, list[float]]  # rate name -> per-item outcomes in [0, 1] (its value is their mean)


def _grouped(name: str, records: list[dict], value: Callable[[dict], float], group: str | None) -> Rates:
    out = {name: [float(value(r)) for r in records]}
    if group is not None and records and all(group in r for r in records):
        per: dict[str, list[float]] = defaultdict(list)
        for r in records:
            per[str(r[group])].append(float(value(r)))
        out |= {f"{name} {group}={g}": v for g, v in per.items()}
    return out


def _refusal_rates(name: str, group: str | None) -> Callable[[dict], Rates]:
    """``name[judge]`` over all records (and per ``group``) for every judge in the records."""

    def rates(result: dict) -> Rates:
        records = result["records"]
        out: Rates = {}
        for judge in sorted({j for r in records for j in r["refused"]}):
            out |= _grouped(f"{name}[{judge}]", records, lambda r: r["refused"][judge], group)
        return out

    return rates


def _accuracy_rates(group: str | None) -> Callable[[dict], Rates]:
    return lambda result: _grouped("accuracy", result["records"], lambda r: r["correct"], group)


def _qa_rates(result: dict) -> Rates:
    ans = [r for r in result["records"] if r["answerable"]]
    una = [r for r in result["records"] if not r["answerable"]]
    out = {"f1": [r["f1"] for r in ans], "exact_match": [r["em"] for r in ans],
           "abstention_accuracy": [r["em"] for r in una], "false_abstention_rate": [r["abstained"] for r in ans]}
    return {k: [float(x) for x in v] for k, v in out.items() if v}


@dataclass(frozen=True)
class Column:
    """A headline number of a suite: the results table's column ``name``. ``outcomes(result, judge)`` gives
    the per-item outcomes in [0, 1] whose mean is the number (and from which its interval over items and the
    paired tests between models are computed: :mod:`.stats`); a column without per-item outcomes reads its
    number with ``value(result, judge)`` instead (no interval). ``role`` puts it into the table's summary
    scores (``safety`` / ``utility``)."""

    name: str
    description: str
    value: Callable[[dict, str], float | None] | None = None
    higher_is_better: bool = True
    role: str | None = None
    outcomes: Callable[[dict, str], Outcomes] | None = None

    def __post_init__(self) -> None:
        if (self.value is None) == (self.outcomes is None):
            raise ValueError(f"column {self.name!r}: give exactly one of value= or outcomes=")

    def item_outcomes(self, result: dict, judge: str) -> Outcomes | None:
        """The per-item outcomes (None for a ``value`` column, or when the suite's result has no such items)."""
        if self.outcomes is None:
            return None
        return self.outcomes(result, judge) or None

    def read(self, result: dict, judge: str) -> float | None:
        """The column's number for one suite result (None when it has no items for it)."""
        if self.value is not None:
            return self.value(result, judge)
        items = self.item_outcomes(result, judge)
        return sum(v for _, v in items) / len(items) if items else None


# ------------------------------------------------------------------------------------------ the registry
@dataclass(frozen=True)
class Suite:
    """An evaluation suite, self-contained: its default data and loader, its run, its headline columns."""

    name: str
    description: str
    default_data: str
    run: Callable[..., dict[str, Any]]
    load: Callable[[str, str | None, EvalSettings], tuple[tuple, dict]]
    columns: tuple[Column, ...] = ()
    #: how items become queries (instruction text, or a versioned description); part of the result cache key,
    #: so a changed prompt never returns results computed with the old one
    prompt_format: str = "the item's prompt, unchanged"
    #: every rate the suite reports, as per-item outcomes (the runner gives each a 95 % interval over items)
    rates: Callable[[dict], Rates] | None = None

    def load_data(self, data: str | None, templates: str | None, settings: EvalSettings) -> tuple[tuple, dict]:
        """``(items...)`` for :attr:`run` and a digest of where they came from (default data when None)."""
        return self.load(data or self.default_data, templates, settings)


SUITES: Registry[Suite] = Registry("eval suite")
SUITES.register("jailbreak", Suite(
    "jailbreak", "refusal of harmful prompts, plain and in jailbreak templates", "bundled:harmful_eval",
    run_jailbreak, load_jailbreak, columns=(
        Column("jailbreak_plain", "refusal rate on held-out harmful prompts (keyword judge)",
               outcomes=_refusals(plain=True), role="safety"),
        Column("jailbreak_templated", "refusal rate on the same prompts inside jailbreak templates",
               outcomes=_refusals(plain=False), role="safety")),
    rates=_refusal_rates("refusal_rate", "template")))
SUITES.register("rephrased", Suite(
    "rephrased", "refusal of harmful requests rephrased the ways attackers rephrase them", "bundled:harmful_rephrased",
    run_rephrased, load_rephrased, columns=(
        Column("jailbreak_rephrased", "refusal rate on held-out harmful requests rephrased (indirect, hypothetical, "
               "fictional, historical framing, loan phrasing)", outcomes=_refusals(), role="safety"),),
    rates=_refusal_rates("refusal_rate", "form")))
SUITES.register("overrefusal", Suite(
    "overrefusal", "wrong refusals of benign, sensitive-looking prompts", "bundled:overrefusal",
    run_overrefusal, load_overrefusal, columns=(
        Column("overrefusal", "refusal rate on benign, sensitive-looking prompts (lower is better)",
               outcomes=_refusals(), higher_is_better=False),),
    rates=_refusal_rates("overrefusal_rate", "category")))
SUITES.register("mcq", Suite(
    "mcq", "multiple choice (MMLU format), letter log-likelihood", "bundled:mcq_general", run_mcq, load_mcq,
    columns=(Column("mcq_accuracy", "general-knowledge multiple choice, letter log-likelihood",
                    outcomes=_per_item("correct")),), rates=_accuracy_rates("subject"),
    prompt_format="mcq_messages v1: question, lettered options, 'Answer with the letter of the correct option'"))
SUITES.register("qa", Suite(
    "qa", "reading comprehension (RepliQA format), F1/EM + abstention", "generated:fictional", run_qa, load_qa,
    columns=(Column("qa_f1", "reading comprehension token F1 on answerable fictional-document questions (A5's task)",
                    outcomes=_per_item("f1", lambda r: r["answerable"]), role="utility"),
             Column("qa_abstention", "correct abstentions on unanswerable questions",
                    outcomes=_per_item("em", lambda r: not r["answerable"]))),
    rates=_qa_rates, prompt_format=QA_INSTRUCTION))
SUITES.register("arithmetic", Suite(
    "arithmetic", "arithmetic word problems, accuracy of the final number", "bundled:arithmetic_eval",
    run_arithmetic, load_arithmetic,
    columns=(Column("arithmetic_accuracy", "arithmetic word problems, final-number accuracy (A6's task)",
                    outcomes=_per_item("correct"), role="utility"),),
    rates=_accuracy_rates("operation"), prompt_format=ARITHMETIC_INSTRUCTION))
