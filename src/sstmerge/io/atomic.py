"""Atomic output folders: write into a temp sibling, then rename into place.

A crash, Ctrl-C or error while writing leaves no folder at the destination (only a ``.tmp-*`` sibling
that is removed on the error path), so a half-written adapter never looks complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import OutputExistsError


@contextlib.contextmanager
def atomic_output_dir(dest: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``dest``; on success rename it to ``dest``.

    If ``dest`` exists: raise :class:`OutputExistsError` unless ``overwrite``; with ``overwrite`` the old
    folder is replaced only after the new one is complete (old moved aside, new renamed in, old removed).
    """
    dest = Path(dest).expanduser().resolve()
    if dest.exists() and not overwrite:
        raise OutputExistsError(f"output folder {dest} already exists; choose another --out or pass --overwrite")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            old = dest.with_name(f".old-{dest.name}-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (temp file in the same folder + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
