"""Evaluation data loaders: prompt lists, jailbreak templates, multiple-choice questions and document QA.

Every loader takes a filesystem path or a ``bundled:<name>`` spec (see :func:`resolve_eval_data`) and
returns a list of frozen dataclasses. Every problem raises :class:`~sstmerge.errors.DataError` whose
message names the file, the 1-based line where there is one, the problem and how to fix it.

Formats
-------
**Prompts** (:func:`load_prompts` → :class:`PromptItem`):

* ``.txt``: one prompt per non-empty line;
* ``.jsonl``: one object per line with ``prompt`` (or ``goal`` / ``Behavior``), optional ``id``,
  ``category`` (or ``SemanticCategory``) and ``form`` (how a harmful request is phrased: the ``rephrased``
  suite reports its refusal rate per form); other keys (``response``, ...) are ignored, so the bundled
  ``harmful_eval`` / ``benign_eval`` / ``overrefusal`` files load too;
* ``.csv`` with a header row containing ``prompt``, ``goal`` (AdvBench ``harmful_behaviors.csv``:
  ``goal,target``) or ``Behavior`` (HarmBench: ``Behavior,FunctionalCategory,SemanticCategory,...``;
  ``BehaviorID`` becomes the id, ``SemanticCategory`` the category; XSTest ``xstest_prompts.csv``: ``prompt``,
  ``type`` as the category, and its ``label`` (safe / unsafe) picks the rows a suite wants). Column names match
  case-insensitively.

Ids default to ``<file stem>:<0-based index>``.

**Templates** (:func:`load_templates` → :class:`Template`): ``.jsonl`` rows
``{"name": ..., "template": ..., "family"?: ...}``, or a text file whose templates are separated by a
line ``---``; a block may start with ``# name: <name>``. Every template must contain ``{prompt}``
and names must be unique.

**Multiple choice** (:func:`load_mcq` / :func:`load_mcq_dev` → :class:`MCQItem`): a Hendrycks MMLU
folder or a single CSV of it (no header; columns ``question, A, B, C, D, answer-letter``; the subject is
the file name without ``_test`` / ``_dev`` / ``_val``), or JSONL rows
``{"question": ..., "choices": [...], "answer": 0-based index or letter, "subject"?: ..., "id"?: ...}``.

**Document QA** (:func:`load_qa` → :class:`QAItem`): RepliQA-style JSONL with ``document`` (or
``document_extracted``), ``question``, ``answer`` and optional ``question_id`` / ``document_id`` /
``answerable``. :func:`sstmerge.data.fictional.generate_fictional_qa` makes such items without any file.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sstmerge.data.jsonl import BUNDLED_NAMES, iter_jsonl, location, resolve_data
from sstmerge.data.jsonl import read_text as _read_text
from sstmerge.data.tasks import UNANSWERABLE, ArithmeticItem, QAItem
from sstmerge.errors import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "MCQItem",
    "PromptItem",
    "QAItem",
    "Template",
    "UNANSWERABLE",
    "load_mcq",
    "load_mcq_dev",
    "load_prompts",
    "load_qa",
    "load_templates",
    "resolve_eval_data",
]

#: RepliQA's answer marker for questions the document does not answer.
#: Placeholder that a jailbreak template replaces with the request.
PROMPT_PLACEHOLDER = "{prompt}"

_PROMPT_COLUMNS = ("prompt", "goal", "behavior")  # preference order, matched case-insensitively
_CATEGORY_COLUMNS = ("semanticcategory", "category", "type")  # type: XSTest
_ID_COLUMNS = ("id", "behaviorid")
_SPLIT_SUFFIXES = ("_test", "_dev", "_val")
_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


# ------------------------------------------------------------------------------------------ records


@dataclass(frozen=True)
class PromptItem:
    """One evaluation prompt (a harmful request, a benign request, ...)."""

    id: str
    prompt: str
    category: str | None = None
    form: str | None = None  # how a harmful request is phrased (direct, hypothetical, fictional, ...), when given


@dataclass(frozen=True)
class Template:
    """A prompt template (e.g. a jailbreak wrapper) containing the placeholder ``{prompt}``."""

    name: str
    text: str
    family: str | None = None

    def __post_init__(self) -> None:
        if PROMPT_PLACEHOLDER not in self.text:
            raise DataError(
                f"template {self.name!r} does not contain the placeholder {PROMPT_PLACEHOLDER}; "
                "add {prompt} where the request should go"
            )

    def apply(self, prompt: str) -> str:
        """The template with every ``{prompt}`` replaced by ``prompt`` (other braces are kept as-is)."""
        return self.text.replace(PROMPT_PLACEHOLDER, prompt)


@dataclass(frozen=True)
class MCQItem:
    """A multiple-choice question; ``answer`` is the 0-based index of the correct choice."""

    id: str
    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str | None = None

    @property
    def answer_letter(self) -> str:
        """The correct choice as a letter (``"A"`` for index 0)."""
        return chr(ord("A") + self.answer)


# ------------------------------------------------------------------------------------------ helpers


def resolve_eval_data(spec: str | os.PathLike[str]) -> Path:
    """Turn ``"bundled:<name>"`` into the bundled file's path (did-you-mean error for unknown names),
    anything else into a filesystem path (not checked for existence here)."""
    return resolve_data(spec)


def _existing(spec: str | os.PathLike[str], kind: str, *, allow_dir: bool = False) -> Path:
    p = resolve_eval_data(spec)
    if not p.exists():
        raise DataError(
            f"{p}: {kind} not found; check the path "
            f"(or use 'bundled:<name>' with one of {', '.join(BUNDLED_NAMES)})"
        )
    if p.is_dir() and not allow_dir:
        raise DataError(f"{p}: is a folder; give the path of a {kind}")
    if not p.is_dir() and not p.is_file():
        raise DataError(f"{p}: is not a regular file; give the path of a {kind}")
    return p


def _iter_jsonl(p: Path, hint: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(1-based line number, object)`` for every non-blank line of a JSONL file."""
    return iter_jsonl(p, f"each line must be one JSON object such as {hint}")


def _iter_csv_rows(p: Path) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(1-based line number, cells)`` for every non-empty CSV record (quoted newlines allowed)."""
    text = _read_text(p)
    reader = csv.reader(text.splitlines(keepends=True))
    try:
        start = 1
        for cells in reader:
            lineno = start
            start = reader.line_num + 1
            if not cells or all(not c.strip() for c in cells):
                continue
            yield lineno, cells
    except csv.Error as exc:
        raise DataError(
            f"{location(p, reader.line_num)}: malformed CSV ({exc}); check the quoting of that row"
        ) from exc


def _str_field(row: dict[str, Any], key: str, where: str, hint: str) -> str:
    if key not in row:
        raise DataError(f"{where}: missing {key!r}; {hint}")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}; {hint}")
    if not value.strip():
        raise DataError(f"{where}: {key!r} is empty; give it non-empty text or remove the line")
    return value


def _opt_str(row: dict[str, Any], keys: tuple[str, ...], where: str) -> str | None:
    for key in keys:
        if key in row and row[key] is not None:
            value = row[key]
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise DataError(
                    f"{where}: {key!r} must be a string, got {type(value).__name__}; write it as text"
                )
            text = str(value).strip()
            return text or None
    return None


# ------------------------------------------------------------------------------------------ prompts

_PROMPT_HINT = '{"prompt": "...", "category"?: "...", "id"?: "...", "form"?: "..."}'


def load_prompts(path: str | os.PathLike[str], *, label: str | None = None) -> list[PromptItem]:
    """Read evaluation prompts from a ``.txt``, ``.jsonl`` or ``.csv`` file (formats: module docstring).

    ``label``: keep only the rows whose ``label`` column / key equals it (case-insensitive), for files that mix
    both kinds, e.g. XSTest's ``xstest_prompts.csv`` (``label`` safe / unsafe: the over-refusal suite keeps
    ``safe``, the jailbreak suite ``unsafe``). A file without a ``label`` column is kept whole.

    Raises:
        DataError: missing or empty file, unsupported extension, bad JSON line, a JSONL row without a
            prompt key, a CSV without a ``prompt``/``goal``/``Behavior`` column, an empty prompt, a ``label``
            other than safe / unsafe (when a label is asked), or no row with the wanted label.
    """
    p = _existing(path, "prompt file")
    suffix = p.suffix.lower()
    stem = p.stem
    items: list[PromptItem] = []
    rows_read = 0  # before the label filter
    if suffix == ".txt":
        for line in _read_text(p).split("\n"):
            if line.strip():
                items.append(PromptItem(id=f"{stem}:{len(items)}", prompt=line.strip()))
    elif suffix in _JSONL_SUFFIXES:
        for lineno, row in _iter_jsonl(p, _PROMPT_HINT):
            where = location(p, lineno)
            key = next((k for k in ("prompt", "goal", "Behavior") if k in row), None)
            if key is None:
                raise DataError(
                    f"{where}: no prompt field; found keys {sorted(row)}, expected one of "
                    f"'prompt', 'goal', 'Behavior', e.g. {_PROMPT_HINT}"
                )
            prompt = _str_field(row, key, where, f"write the request as a JSON string, e.g. {_PROMPT_HINT}")
            pid = _opt_str(row, ("id",), where) or f"{stem}:{len(items)}"
            cat = _opt_str(row, ("category", "SemanticCategory"), where)
            form = _opt_str(row, ("form",), where)
            rows_read += 1
            if label is not None and _row_label(row.get("label", label), where) != label.lower():
                continue
            items.append(PromptItem(id=pid, prompt=prompt.strip(), category=cat, form=form))
    elif suffix == ".csv":
        items, rows_read = _load_prompt_csv(p, label)
    else:
        raise DataError(
            f"{p}: unsupported prompt file extension {p.suffix!r}; use .txt (one prompt per line), "
            ".jsonl (objects with 'prompt') or .csv (header with 'prompt', 'goal' or 'Behavior')"
        )
    if not items:
        if label is not None and rows_read:
            raise DataError(f"{p}: no prompt labelled {label!r} (column/key 'label'); this suite needs {label} prompts")
        raise DataError(f"{p}: prompt file is empty (no prompts); add at least one prompt")
    logger.info("loaded %d prompts from %s", len(items), p)
    return items


_LABELS = ("safe", "unsafe")  # XSTest's: the over-refusal suite keeps 'safe', the jailbreak suite 'unsafe'


def _row_label(value: Any, where: str) -> str:
    """A row's ``label``, lower-cased; a value other than safe / unsafe is an error (a row would silently drop)."""
    text = str(value).strip().lower()
    if text not in _LABELS:
        raise DataError(f"{where}: label {value!r} is neither 'safe' nor 'unsafe'; the 'label' column marks each "
                        "prompt safe (kept for over-refusal) or unsafe (kept for jailbreak): fix the value, or rename "
                        "the column if it means something else")
    return text


def _load_prompt_csv(p: Path, label: str | None = None) -> tuple[list[PromptItem], int]:
    """The CSV's prompts (those with ``label`` when it is given and the file has a label column) and the number of
    rows read before that filter."""
    rows = _iter_csv_rows(p)
    try:
        header_line, header = next(rows)
    except StopIteration:
        raise DataError(
            f"{p}: CSV file is empty; it needs a header row with a 'prompt', 'goal' or 'Behavior' column"
        ) from None
    names = [h.strip() for h in header]
    lower = [h.lower() for h in names]
    col = next((lower.index(c) for c in _PROMPT_COLUMNS if c in lower), None)
    if col is None:
        raise DataError(
            f"{p}, line {header_line}: no prompt column in the CSV header; found columns {names}, "
            "expected one of 'prompt', 'goal' (AdvBench) or 'Behavior' (HarmBench). Rename the column "
            "holding the requests, or add a header row if the file has none"
        )
    cat_col = next((lower.index(c) for c in _CATEGORY_COLUMNS if c in lower), None)
    id_col = next((lower.index(c) for c in _ID_COLUMNS if c in lower), None)
    label_col = lower.index("label") if "label" in lower and label is not None else None
    items: list[PromptItem] = []
    rows_read = 0
    for lineno, cells in rows:
        where = location(p, lineno)
        if len(cells) != len(names):
            raise DataError(
                f"{where}: row has {len(cells)} columns but the header has {len(names)} ({names}); "
                "quote cells that contain commas"
            )
        prompt = cells[col].strip()
        if not prompt:
            raise DataError(
                f"{where}: the {names[col]!r} cell is empty; fill in the request or delete the row"
            )
        rows_read += 1
        if label_col is not None and _row_label(cells[label_col], where) != label.lower():
            continue
        category = (cells[cat_col].strip() or None) if cat_col is not None else None
        pid = (cells[id_col].strip() if id_col is not None else "") or f"{p.stem}:{len(items)}"
        items.append(PromptItem(id=pid, prompt=prompt, category=category))
    return items, rows_read


# ------------------------------------------------------------------------------------------ templates

_TEMPLATE_HINT = '{"name": "...", "template": "... {prompt} ...", "family"?: "..."}'
_NAME_LINE = re.compile(r"^#\s*name\s*:\s*(.*?)\s*$", re.IGNORECASE)


def load_templates(path: str | os.PathLike[str]) -> list[Template]:
    """Read prompt templates from JSONL or a ``---``-separated text file (format: module docstring).

    Raises:
        DataError: missing or empty file, bad JSON line, a template without ``{prompt}`` (naming the
            template), or duplicate template names.
    """
    p = _existing(path, "template file")
    # (name, text, family, line)
    raw: list[tuple[str, str, str | None, int]] = []
    if p.suffix.lower() in _JSONL_SUFFIXES:
        for lineno, row in _iter_jsonl(p, _TEMPLATE_HINT):
            where = location(p, lineno)
            text = _str_field(row, "template", where, f"each row must look like {_TEMPLATE_HINT}")
            name = _opt_str(row, ("name",), where) or f"{p.stem}:{len(raw)}"
            family = _opt_str(row, ("family",), where)
            raw.append((name, text, family, lineno))
    else:
        raw = _parse_template_blocks(p)
    if not raw:
        raise DataError(f"{p}: template file is empty (no templates); add at least one template with {{prompt}}")

    seen: dict[str, int] = {}
    out: list[Template] = []
    for name, text, family, lineno in raw:
        where = location(p, lineno)
        if PROMPT_PLACEHOLDER not in text:
            raise DataError(
                f"{where}: template {name!r} does not contain the placeholder {PROMPT_PLACEHOLDER}; "
                "add {prompt} where the request should be inserted"
            )
        if name in seen:
            raise DataError(
                f"{where}: duplicate template name {name!r} (first used on line {seen[name]}); "
                "give every template a unique name"
            )
        seen[name] = lineno
        out.append(Template(name=name, text=text, family=family))
    logger.info("loaded %d templates from %s", len(out), p)
    return out


def _parse_template_blocks(p: Path) -> list[tuple[str, str, str | None, int]]:
    blocks: list[tuple[int, list[str]]] = []
    current: list[str] = []
    start = 1
    for lineno, line in enumerate(_read_text(p).split("\n"), start=1):
        if line.strip() == "---":
            blocks.append((start, current))
            current, start = [], lineno + 1
        else:
            current.append(line)
    blocks.append((start, current))

    out: list[tuple[str, str, str | None, int]] = []
    for start, lines in blocks:
        # drop surrounding blank lines, keep the line number of the first kept line
        while lines and not lines[0].strip():
            lines, start = lines[1:], start + 1
        while lines and not lines[-1].strip():
            lines = lines[:-1]
        if not lines:
            continue  # empty block (e.g. a trailing ---)
        name: str | None = None
        m = _NAME_LINE.match(lines[0])
        if m:
            name = m.group(1)
            if not name:
                raise DataError(f"{location(p, start)}: '# name:' line without a name; write '# name: <name>'")
            body = lines[1:]
            while body and not body[0].strip():
                body = body[1:]
            if not body:
                raise DataError(
                    f"{location(p, start)}: template {name!r} has a name but no text; add the template "
                    "text (with {prompt}) below the '# name:' line"
                )
            lines = body
        text = "\n".join(lines)
        out.append((name or f"{p.stem}:{len(out)}", text, None, start))
    return out


# ------------------------------------------------------------------------------------------ MCQ

_MCQ_HINT = '{"question": "...", "choices": ["...", "..."], "answer": 0 or "A", "subject"?: "..."}'


def _subject_from_stem(stem: str) -> str:
    for suffix in _SPLIT_SUFFIXES:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def _letter_range(k: int) -> str:
    return f"A-{chr(ord('A') + k - 1)}"


def _parse_answer(value: Any, n_choices: int, where: str) -> int:
    if isinstance(value, bool):
        raise DataError(f"{where}: 'answer' must be a 0-based index or a letter, got {value!r}")
    if isinstance(value, int):
        if not 0 <= value < n_choices:
            raise DataError(
                f"{where}: answer index {value} is out of range for {n_choices} choices; "
                f"use a 0-based index 0..{n_choices - 1} or a letter {_letter_range(n_choices)}"
            )
        return value
    if isinstance(value, str):
        letter = value.strip().upper()
        if len(letter) == 1 and "A" <= letter <= "Z":
            idx = ord(letter) - ord("A")
            if idx < n_choices:
                return idx
        raise DataError(
            f"{where}: answer {value!r} is not one of the choice letters {_letter_range(n_choices)} "
            f"({n_choices} choices); give the letter or 0-based index of the correct choice"
        )
    raise DataError(
        f"{where}: 'answer' must be a 0-based index or a letter, got {type(value).__name__}"
    )


def _mcq_csv(p: Path) -> list[MCQItem]:
    subject = _subject_from_stem(p.stem)
    items: list[MCQItem] = []
    expected: int | None = None
    for lineno, cells in _iter_csv_rows(p):
        where = location(p, lineno, "row")
        if expected is None:
            expected = len(cells)
            if expected < 4:
                raise DataError(
                    f"{where}: row has {expected} columns; an MMLU-style CSV (no header) needs "
                    "question, at least 2 choices and the answer letter (normally 6 columns: "
                    "question, A, B, C, D, answer)"
                )
        elif len(cells) != expected:
            raise DataError(
                f"{where}: row has {len(cells)} columns but the first row has {expected} "
                "(question, choices..., answer letter); quote cells that contain commas"
            )
        question, choices, answer = cells[0], tuple(cells[1:-1]), cells[-1]
        if not question.strip():
            raise DataError(f"{where}: the question cell is empty; fill it in or delete the row")
        try:
            idx = _parse_answer(answer, len(choices), where)
        except DataError as exc:
            if not items:
                raise DataError(f"{exc} (MMLU CSV files have no header row; remove it if present)") from None
            raise
        items.append(
            MCQItem(id=f"{p.stem}:{len(items)}", question=question, choices=choices, answer=idx, subject=subject)
        )
    return items


def _mcq_jsonl(p: Path) -> list[MCQItem]:
    items: list[MCQItem] = []
    for lineno, row in _iter_jsonl(p, _MCQ_HINT):
        where = location(p, lineno)
        question = _str_field(row, "question", where, f"each row must look like {_MCQ_HINT}")
        if "choices" not in row:
            raise DataError(f"{where}: missing 'choices'; each row must look like {_MCQ_HINT}")
        choices = row["choices"]
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{where}: 'choices' must be a list of strings; each row must look like {_MCQ_HINT}")
        if len(choices) < 2:
            raise DataError(
                f"{where}: 'choices' has {len(choices)} entr{'y' if len(choices) == 1 else 'ies'}; "
                "a multiple-choice question needs at least 2 choices"
            )
        if "answer" not in row:
            raise DataError(f"{where}: missing 'answer'; give the 0-based index or letter of the correct choice")
        idx = _parse_answer(row["answer"], len(choices), where)
        subject = _opt_str(row, ("subject",), where)
        qid = _opt_str(row, ("id",), where) or f"{p.stem}:{len(items)}"
        items.append(MCQItem(id=qid, question=question, choices=tuple(choices), answer=idx, subject=subject))
    return items


def _mcq_folder(p: Path, split: str) -> list[Path]:
    """CSV files of a Hendrycks folder for ``split`` ("test" or "dev")."""
    sub = p / split
    if sub.is_dir() and not any(p.glob("*.csv")):
        p = sub  # the top-level data/ folder with dev/ val/ test/ subfolders
    files = sorted(p.glob(f"*_{split}.csv"))
    if not files:
        files = sorted(p.glob("*.csv"))
    if not files:
        raise DataError(
            f"{p}: no CSV files in this folder; give a Hendrycks MMLU folder (<subject>_{split}.csv files), "
            "a single CSV or a JSONL file"
        )
    return files


def _load_mcq(path: str | os.PathLike[str], split: str) -> list[MCQItem]:
    p = _existing(path, "multiple-choice file or folder", allow_dir=True)
    if p.is_dir():
        items = [it for f in _mcq_folder(p, split) for it in _mcq_csv(f)]
    elif p.suffix.lower() == ".csv":
        items = _mcq_csv(p)
    elif p.suffix.lower() in _JSONL_SUFFIXES:
        items = _mcq_jsonl(p)
    else:
        raise DataError(
            f"{p}: unsupported multiple-choice file extension {p.suffix!r}; use a Hendrycks MMLU folder, "
            f"a .csv (question, A, B, C, D, answer letter; no header) or .jsonl ({_MCQ_HINT})"
        )
    if not items:
        raise DataError(f"{p}: no multiple-choice questions found (empty); add at least one question")
    logger.info("loaded %d multiple-choice questions (%s) from %s", len(items), split, p)
    return items


def load_mcq(path: str | os.PathLike[str]) -> list[MCQItem]:
    """Read multiple-choice questions to evaluate (formats: module docstring).

    For a Hendrycks folder, the ``<subject>_test.csv`` files are read (from its ``test/`` subfolder when
    given the top-level ``data/`` folder); if there are none, every ``*.csv`` in the folder.

    Raises:
        DataError: missing or empty input, wrong CSV column count (naming the row), an answer outside
            the choices, fewer than 2 choices, bad JSON.
    """
    return _load_mcq(path, "test")


def load_mcq_dev(path: str | os.PathLike[str]) -> list[MCQItem]:
    """Read few-shot exemplar questions: like :func:`load_mcq`, but a Hendrycks folder yields its
    ``<subject>_dev.csv`` files (or its ``dev/`` subfolder)."""
    return _load_mcq(path, "dev")


# ------------------------------------------------------------------------------------------ QA

_QA_HINT = '{"document": "...", "question": "...", "answer": "..." or "UNANSWERABLE"}'


def load_qa(path: str | os.PathLike[str]) -> list[QAItem]:
    """Read RepliQA-style document QA rows from JSONL.

    Each row needs ``document`` (or ``document_extracted``), ``question`` and ``answer``; ``question_id``
    (or ``id``) becomes the item id (default ``<file stem>:<index>``). A row is unanswerable when its
    answer is ``"UNANSWERABLE"`` (any case) or it has ``"answerable": false``; such a row may omit the
    answer.

    Raises:
        DataError: missing or empty file, bad JSON, missing/empty document, question or answer.
    """
    p = _existing(path, "QA file")
    items: list[QAItem] = []
    for lineno, row in _iter_jsonl(p, _QA_HINT):
        where = location(p, lineno)
        doc_key = "document" if "document" in row else "document_extracted"
        if doc_key not in row:
            raise DataError(
                f"{where}: missing 'document' (or 'document_extracted'); found keys {sorted(row)}; "
                f"each row must look like {_QA_HINT}"
            )
        document = _str_field(row, doc_key, where, f"each row must look like {_QA_HINT}")
        question = _str_field(row, "question", where, f"each row must look like {_QA_HINT}")
        flag = row.get("answerable", True)
        if not isinstance(flag, bool):
            raise DataError(f"{where}: 'answerable' must be true or false, got {flag!r}")
        if not flag and not (isinstance(row.get("answer"), str) and row["answer"].strip()):
            answer = UNANSWERABLE
        else:
            answer = _str_field(row, "answer", where, f"each row must look like {_QA_HINT}").strip()
        answerable = flag and answer.upper() != UNANSWERABLE
        qid = _opt_str(row, ("question_id", "id"), where) or f"{p.stem}:{len(items)}"
        items.append(QAItem(id=qid, document=document, question=question, answer=answer, answerable=answerable))
    if not items:
        raise DataError(f"{p}: QA file is empty (no rows); add at least one line such as {_QA_HINT}")
    logger.info(
        "loaded %d QA items (%d unanswerable) from %s", len(items), sum(not i.answerable for i in items), p
    )
    return items


def load_arithmetic(path: str | os.PathLike[str]) -> list[ArithmeticItem]:
    """Read arithmetic word problems from JSONL: ``{"question": str, "answer": int}`` per row (optional ``id``,
    ``operation``); the default file is ``bundled:arithmetic_eval`` (:mod:`sstmerge.data.make_bundled`).

    Raises:
        DataError: missing or empty file, bad JSON, missing question, an answer that is not an integer.
    """
    hint = '{"question": "Ana has 12 apples and gets 30 more. How many apples does she have?", "answer": 42}'
    p = _existing(path, "arithmetic file")
    items: list[ArithmeticItem] = []
    for lineno, row in _iter_jsonl(p, hint):
        where = location(p, lineno)
        question = _str_field(row, "question", where, f"each row must look like {hint}")
        answer = row.get("answer")
        if isinstance(answer, bool) or not isinstance(answer, int):
            raise DataError(f"{where}: 'answer' must be an integer, got {answer!r}; each row must look like {hint}")
        qid = _opt_str(row, ("id",), where) or f"{p.stem}:{len(items)}"
        op = _opt_str(row, ("operation",), where) or "all"
        items.append(ArithmeticItem(id=qid, question=question, answer=answer, work="", operation=op))
    if not items:
        raise DataError(f"{p}: arithmetic file is empty (no rows); add lines such as {hint}")
    return items
