"""Integrity of cache files: every entry carries a checksum that is verified when it is read.

- JSON entries (evaluation results, Fisher meta): :func:`write_checked_json` stores
  ``{"sha256": H(payload), "payload": payload}`` with ``H`` over the canonical JSON of the payload, so a
  truncated, emptied or hand-edited file is detected by :func:`read_checked_json`.
- Binary files read in blocks (gradient rows, statistics blocks): a CRC-32 per block (:func:`crc32`),
  stored beside the data and compared on every read (``zlib.crc32`` runs at memory speed).
- Whole small files: :func:`file_digest` (size + SHA-256) recorded in a manifest, checked by
  :func:`verify_file`.

A failed check raises :class:`~sstmerge.errors.CacheCorruptError` naming the file; the cache owners
(:mod:`sstmerge.fisher.run`, :mod:`sstmerge.eval.runner`) discard the entry and recompute.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CacheCorruptError
from .atomic import atomic_write_text
from .hashing import sha256_file


def _canonical(payload: Any) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()


def write_checked_json(path: str | os.PathLike, payload: Any) -> None:
    """Write ``payload`` with its SHA-256, atomically."""
    body = json.loads(_canonical(payload))  # what will be read back (str() for non-JSON values)
    atomic_write_text(path, json.dumps({"sha256": hashlib.sha256(_canonical(body)).hexdigest(), "payload": body}))


def read_checked_json(path: str | os.PathLike) -> Any:
    """The payload of a :func:`write_checked_json` file; :class:`CacheCorruptError` if it is unreadable,
    truncated, not in that format, or its content does not match the checksum."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CacheCorruptError(f"{path}: unreadable or truncated cache file ({exc})") from None
    if not isinstance(data, dict) or set(data) != {"sha256", "payload"}:
        raise CacheCorruptError(f"{path}: not a checksummed cache entry (older format or edited)")
    if hashlib.sha256(_canonical(data["payload"])).hexdigest() != data["sha256"]:
        raise CacheCorruptError(f"{path}: content does not match its checksum (edited or damaged)")
    return data["payload"]


def crc32(array: np.ndarray | bytes, value: int = 0) -> int:
    """CRC-32 of an array's bytes (C order), continuing from ``value`` (so blocks can be fed in order)."""
    data = array if isinstance(array, (bytes, bytearray, memoryview)) else np.ascontiguousarray(array).data
    return zlib.crc32(data, value) & 0xFFFFFFFF


def file_digest(path: str | os.PathLike) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of a file (the SHA-256 of :func:`sstmerge.io.hashing.sha256_file`, cached
    per path, size and modification time within a process)."""
    return {"size": os.stat(path).st_size, "sha256": sha256_file(path)}


def verify_file(path: str | os.PathLike, expected: dict[str, Any]) -> None:
    """:class:`CacheCorruptError` unless ``path`` has the recorded size and SHA-256."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError:
        raise CacheCorruptError(f"{path}: missing") from None
    if size != expected.get("size"):
        raise CacheCorruptError(f"{path}: {size} bytes, {expected.get('size')} recorded (truncated or replaced)")
    if sha256_file(path) != expected.get("sha256"):
        raise CacheCorruptError(f"{path}: SHA-256 differs from the recorded one (damaged or edited)")
