"""Load supervised examples from JSONL files (user files or the small datasets bundled with sstmerge).

File format
-----------
UTF-8 text, one JSON object per line; blank lines are skipped. Each object is one example in either of
two formats:

* **prompt/response** (single user turn, one assistant answer)::

      {"prompt": "What is the capital of France?", "response": "Paris.", "category": "factual_qa"}

  ``prompt`` and ``response`` must be non-empty strings.

* **messages** (a chat; the *last* message is the assistant answer that is supervised)::

      {"messages": [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi!"},
                    {"role": "assistant", "content": "Hello!"}]}

  ``role`` is one of ``"system"``, ``"user"``, ``"assistant"``; ``content`` is a string; the last
  message must have role ``"assistant"`` and non-empty content. Messages are stored on the
  :class:`~sstmerge.data.examples.Example` as a tuple of ``(role, content)`` tuples.

Every other key of a row (``category``, ``id``, ...) is kept in :attr:`Example.meta`. A row may not mix
the two formats.

Bundled data
------------
:func:`bundled_path` maps the short names ``harmful_train``, ``harmful_eval``, ``benign_train``,
``benign_eval`` and ``overrefusal`` (prompt/response examples) and ``jailbreak_templates``,
``mcq_general`` and ``mcq_dev`` (evaluation files read by :mod:`sstmerge.eval.data`) to the files in
``sstmerge/data/bundled/`` (see ``DATA_CARD.md`` there), and :func:`resolve_data` turns a user spec
(``"bundled:harmful_train"`` or a filesystem path) into a path.

Every problem raises :class:`~sstmerge.errors.DataError` whose message names the file (and the 1-based
line number where there is one) and says how to fix it.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sstmerge.data.examples import Example
from sstmerge.errors import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "BUNDLED_DIR",
    "BUNDLED_NAMES",
    "BUNDLED_PREFIX",
    "EXAMPLE_BUNDLED_NAMES",
    "VALID_ROLES",
    "bundled_path",
    "load_examples",
    "resolve_data",
]

#: Folder holding the bundled JSONL files and their data card.
BUNDLED_DIR: Path = Path(__file__).resolve().parent / "bundled"
#: Short names of the bundled prompt/response example files (readable with :func:`load_examples`).
EXAMPLE_BUNDLED_NAMES: tuple[str, ...] = (
    "harmful_train",
    "harmful_eval",
    "benign_train",
    "benign_eval",
    "overrefusal",
)
#: Short names accepted by :func:`bundled_path` (the file is ``<name>.jsonl``). The files after the
#: example files hold evaluation data in other layouts, read by :mod:`sstmerge.eval.data`
#: (``jailbreak_templates``: :func:`~sstmerge.eval.data.load_templates`; ``mcq_general`` /
#: ``mcq_dev``: :func:`~sstmerge.eval.data.load_mcq`).
BUNDLED_NAMES: tuple[str, ...] = EXAMPLE_BUNDLED_NAMES + ("jailbreak_templates", "mcq_general", "mcq_dev")
#: Prefix of a data spec that names a bundled file (``"bundled:benign_eval"``).
BUNDLED_PREFIX = "bundled:"
#: Roles allowed in the ``messages`` format.
VALID_ROLES: frozenset[str] = frozenset({"system", "user", "assistant"})

_FORMAT_HINT = (
    'each line must be a JSON object, either {"prompt": "...", "response": "..."} or '
    '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'
)


def _where(path: Path, lineno: int, what: str = "line") -> str:
    return f"{path}, {what} {lineno}"


def read_text(p: Path) -> str:
    """A data file's text (UTF-8, BOM tolerated), or a :class:`DataError` naming the file."""
    try:
        return p.read_text(encoding="utf-8-sig")  # tolerate a BOM
    except UnicodeDecodeError as exc:
        raise DataError(f"{p}: not valid UTF-8 text ({exc}); save the file as UTF-8") from exc
    except OSError as exc:
        raise DataError(f"{p}: cannot read the file ({exc}); check the file permissions") from exc


def iter_jsonl(p: Path, fix: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(1-based line number, object)`` for every non-blank line of a JSONL file.

    Lines are split on ``\\n`` only (``str.splitlines`` would also split on Unicode separators that may
    occur inside JSON strings). ``fix`` is appended to the error of a line that is not a JSON object.
    """
    for lineno, line in enumerate(read_text(p).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{_where(p, lineno)}: invalid JSON ({exc.msg} at column {exc.colno}); {fix}") from exc
        if not isinstance(row, dict):
            raise DataError(f"{_where(p, lineno)}: expected a JSON object, got {type(row).__name__}; {fix}")
        yield lineno, row


def _parse_messages(value: Any, path: Path, lineno: int) -> tuple[tuple[str, str], ...]:
    where = _where(path, lineno)
    if not isinstance(value, list):
        raise DataError(
            f"{where}: 'messages' must be a list of {{\"role\": ..., \"content\": ...}} objects, "
            f"got {type(value).__name__}; {_FORMAT_HINT}"
        )
    if not value:
        raise DataError(
            f"{where}: 'messages' is empty; it must end with an assistant message. {_FORMAT_HINT}"
        )
    out: list[tuple[str, str]] = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise DataError(
                f"{where}: messages[{i}] must be an object with 'role' and 'content', "
                f"got {type(msg).__name__}"
            )
        role = msg.get("role")
        if not isinstance(role, str) or role not in VALID_ROLES:
            raise DataError(
                f"{where}: messages[{i}] has unknown role {role!r}; use one of {sorted(VALID_ROLES)}"
            )
        content = msg.get("content")
        if not isinstance(content, str):
            raise DataError(
                f"{where}: messages[{i}] 'content' must be a string, got {type(content).__name__}; "
                "write the message text as a JSON string"
            )
        out.append((role, content))
    last_role, last_content = out[-1]
    if last_role != "assistant":
        raise DataError(
            f"{where}: the last message has role {last_role!r}, but it must be 'assistant' "
            "(the answer that is supervised); append the assistant answer or drop the trailing messages"
        )
    if not last_content.strip():
        raise DataError(f"{where}: the final assistant message is empty; give it the answer text")
    return tuple(out)


def _parse_text_field(row: dict[str, Any], key: str, path: Path, lineno: int) -> str:
    where = _where(path, lineno)
    if key not in row:
        raise DataError(f"{where}: missing {key!r}; {_FORMAT_HINT}")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}; {_FORMAT_HINT}")
    if not value.strip():
        raise DataError(f"{where}: {key!r} is empty; give it non-empty text or remove the line")
    return value


def _parse_row(row: Any, path: Path, lineno: int) -> Example:
    where = _where(path, lineno)
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}; {_FORMAT_HINT}")
    if "messages" in row:
        mixed = [k for k in ("prompt", "response") if k in row]
        if mixed:
            raise DataError(
                f"{where}: row has both 'messages' and {mixed}; use either the prompt/response format "
                "or the messages format, not both"
            )
        messages = _parse_messages(row["messages"], path, lineno)
        meta = {k: v for k, v in row.items() if k != "messages"}
        return Example(messages=messages, meta=meta)
    if "prompt" not in row and "response" not in row:
        raise DataError(f"{where}: row has neither 'prompt'/'response' nor 'messages'; {_FORMAT_HINT}")
    prompt = _parse_text_field(row, "prompt", path, lineno)
    response = _parse_text_field(row, "response", path, lineno)
    meta = {k: v for k, v in row.items() if k not in ("prompt", "response")}
    return Example(prompt=prompt, response=response, meta=meta)


def load_examples(
    path: str | os.PathLike[str], *, max_samples: int | None = None, seed: int = 0
) -> list[Example]:
    """Read the examples of a JSONL file (format: see the module docstring).

    If ``max_samples`` is given and smaller than the number of rows, a deterministic
    ``random.Random(seed)`` sample of that many rows is returned, in file order.

    Raises:
        DataError: the file is missing, unreadable or empty, a line is not valid JSON or not a valid
            example, or ``max_samples`` is not a positive integer.
    """
    p = Path(path).expanduser()
    if max_samples is not None:
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples <= 0:
            raise DataError(
                f"{p}: max_samples must be a positive integer (or None for all rows), got {max_samples!r}"
            )
    if not p.exists():
        raise DataError(
            f"{p}: data file not found; check the path "
            f"(or use 'bundled:<name>' with one of {', '.join(BUNDLED_NAMES)})"
        )
    if not p.is_file():
        raise DataError(f"{p}: is not a regular file; give the path of a .jsonl file")
    examples = [_parse_row(row, p, lineno) for lineno, row in iter_jsonl(p, f"{_FORMAT_HINT}, each on a single line")]

    if not examples:
        raise DataError(f"{p}: data file is empty (no rows); add at least one JSON line. {_FORMAT_HINT}")

    n = len(examples)
    if max_samples is not None and max_samples < n:
        picked = sorted(random.Random(seed).sample(range(n), max_samples))
        examples = [examples[i] for i in picked]
        logger.debug("sampled %d of %d examples from %s (seed=%d)", max_samples, n, p, seed)
    logger.info("loaded %d examples from %s", len(examples), p)
    return examples


def bundled_path(name: str) -> Path:
    """Path of a bundled JSONL file by short name (``"harmful_train"`` or ``"harmful_train.jsonl"``).

    Raises:
        DataError: the name is unknown (with a did-you-mean suggestion), or the file is missing from the
            installation.
    """
    key = str(name).strip()
    if key.endswith(".jsonl"):
        key = key[: -len(".jsonl")]
    if key not in BUNDLED_NAMES:
        close = difflib.get_close_matches(key, BUNDLED_NAMES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise DataError(
            f"unknown bundled dataset {name!r}.{hint} Available: {', '.join(BUNDLED_NAMES)}"
        )
    p = BUNDLED_DIR / f"{key}.jsonl"
    if not p.is_file():
        raise DataError(
            f"{p}: bundled dataset {key!r} is missing from this installation; reinstall sstmerge "
            "(the package data data/bundled/*.jsonl must be included)"
        )
    return p


def resolve_data(spec: str | os.PathLike[str]) -> Path:
    """Turn a data spec into a path: ``"bundled:<name>"`` → :func:`bundled_path`, else a filesystem path.

    The path is not checked for existence here (:func:`load_examples` does that).
    """
    if isinstance(spec, os.PathLike):
        return Path(spec).expanduser()
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(
            f"empty or invalid data spec {spec!r}; give a JSONL path or 'bundled:<name>' "
            f"(one of {', '.join(BUNDLED_NAMES)})"
        )
    if spec.startswith(BUNDLED_PREFIX):
        return bundled_path(spec[len(BUNDLED_PREFIX):])
    return Path(spec).expanduser()
