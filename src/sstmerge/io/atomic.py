"""Safe outputs: claim a destination, write into a temp sibling, commit by one rename.

What every output folder (and the eval results file) gets, whoever writes it (merge, train, fisher
reports, experiment grids, converted models):

- **Claim rules** (:func:`check_output_target`): the destination is never the current directory, a folder
  holding it, the filesystem root or the home directory, and never equals or holds any *input* of the run
  (adapters, base model, data files, cache). An existing destination is replaced only with ``overwrite``
  and only when an earlier sstmerge run wrote it: its ``.sstmerge-output.json`` marker lists the files it
  wrote and the folder holds nothing else (folders from before the marker existed are recognised by their
  report and known file names). Anything else is refused with an error that says why and what to do.
- **Exclusive claim** (:class:`OutputClaim`): a lock next to the destination (:class:`~.locking.PathLock`)
  is held from the claim to the commit, so two concurrent writers of one destination cannot both succeed:
  the second fails at once with :class:`~sstmerge.errors.OutputBusyError`. The commit re-checks the
  destination under the lock and renames with ``RENAME_NOREPLACE`` (or swaps old and new atomically with
  ``RENAME_EXCHANGE`` when replacing), so nothing written meanwhile is clobbered.
- **Temp folders** are named ``.tmp-<name>-sstmerge-XXXXXXXX`` next to the destination and removed on every
  error path, ``Ctrl-C`` and (with :func:`install_signal_handlers`, which the CLI calls) ``SIGTERM``/``SIGHUP``.
  A run killed with ``SIGKILL`` leaves its temp folder behind; the next claim of the same destination
  (which holds the lock, so no live writer owns them) removes such leftovers and says so.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import logging
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path

from ..errors import OutputExistsError, UnsafeOutputError
from .locking import PathLock

log = logging.getLogger(__name__)

MARKER_NAME = ".sstmerge-output.json"
#: file names sstmerge wrote before output folders carried a marker (a folder of only these may be replaced)
LEGACY_FILES = frozenset({
    "adapter_config.json", "adapter_model.safetensors", "README.md", "merge_report.json", "merge_report.txt",
    "merge_config.yaml", "spectrum.png", "train_report.json", "fisher_report.json",
})
LEGACY_REPORTS = ("merge_report.json", "train_report.json", "fisher_report.json")
TMP_TAG = "-sstmerge-"

#: temp folders/files of this process that are not committed yet (removed on SIGTERM / SIGHUP)
_LIVE_TEMPS: set[Path] = set()


# ------------------------------------------------------------------------------------------ naming
def temp_prefix(name: str) -> str:
    return f".tmp-{name}{TMP_TAG}"


def _stale_pattern(name: str) -> re.Pattern:
    return re.compile(rf"^\.(tmp|old)-{re.escape(name)}{TMP_TAG}[A-Za-z0-9_]{{8}}$")


def lock_path(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.sstmerge-lock")


def remove_stale_temps(folder: Path, name: str) -> list[Path]:
    """Remove ``.tmp-<name>-sstmerge-*`` (and ``.old-…``) entries in ``folder`` left by killed runs.

    Call only while holding the lock of ``folder / name``: then no live process owns them."""
    pattern = _stale_pattern(name)
    removed = []
    try:
        entries = list(folder.iterdir())
    except FileNotFoundError:
        return removed
    for entry in entries:
        if pattern.match(entry.name) and entry not in _LIVE_TEMPS:
            _rmtree_or_unlink(entry)
            removed.append(entry)
    if removed:
        log.warning("removed %d temporary item(s) left by an interrupted run: %s", len(removed),
                    ", ".join(p.name for p in removed))
    return removed


# ------------------------------------------------------------------------------------------ claim rules
def _resolve(p: str | os.PathLike) -> Path:
    return Path(p).expanduser().resolve()


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def ensure_within(path: str | os.PathLike, root: str | os.PathLike, what: str = "path") -> Path:
    """``path`` resolved; :class:`UnsafeOutputError` unless it lies inside ``root`` (after resolving
    ``..`` and links), e.g. a folder built from a name in a config file."""
    p, r = _resolve(path), _resolve(root)
    if not _within(p, r) or p == r:
        raise UnsafeOutputError(f"{what} {path} resolves to {p}, outside {r}; names in configs must be simple "
                                "names (letters, digits, '.', '_', '+', '-'), not paths")
    return p


def _marker(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), list) else None


def _files_in(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir() or p.is_symlink())


def written_by_sstmerge(folder: Path) -> tuple[bool, str]:
    """(True, kind) when ``folder`` holds only what an sstmerge run wrote there; (False, why) otherwise."""
    files = _files_in(folder)
    if not files:
        return True, "empty folder"
    marker = _marker(folder)
    if marker is not None:
        extra = sorted(set(files) - set(marker["files"]) - {MARKER_NAME})
        if extra:
            return False, (f"it holds files that sstmerge did not write there ({', '.join(extra[:5])}"
                           f"{', ...' if len(extra) > 5 else ''})")
        return True, str(marker.get("kind", "output"))
    if (folder / "sstmerge_source.json").is_file():  # the converted-model cache, from before the marker existed
        return True, "converted model"
    if any((folder / r).is_file() for r in LEGACY_REPORTS):
        extra = sorted(set(files) - LEGACY_FILES)
        if extra:
            return False, f"it holds files that sstmerge does not write ({', '.join(extra[:5])})"
        return True, "legacy output"
    return False, f"it has no {MARKER_NAME} marker, so sstmerge did not write it"


def check_location(dest: str | os.PathLike, *, inputs: Iterable[str | os.PathLike | None] = (),
                   is_file: bool = False) -> Path:
    """The location rules alone (whether or not ``dest`` exists): never the filesystem root, the home
    directory, the current directory or a folder holding it, nor a path that is or holds an input."""
    raw = dest
    dest = _resolve(dest)
    cwd = Path.cwd().resolve()
    if dest == Path(dest.anchor) or dest == Path.home().resolve():
        raise UnsafeOutputError(f"--out {raw}: refusing to write to {dest}; choose a dedicated output folder")
    if not is_file and _within(cwd, dest):
        raise UnsafeOutputError(
            f"--out {raw} is the current directory{' or a folder holding it' if cwd != dest else ''} ({dest}); "
            "choose a new folder, e.g. --out runs/merged")
    for item in inputs:
        if item is None or str(item) == "":
            continue
        p = Path(str(item)).expanduser()
        if not p.exists():
            continue
        p = p.resolve()
        if _within(p, dest):
            what = "is" if p == dest else "holds"
            raise UnsafeOutputError(f"--out {raw} {what} an input of this run ({p}); writing there could destroy "
                                    "it. Choose another output path")
    return dest


def check_output_target(
    dest: str | os.PathLike, *, overwrite: bool, inputs: Iterable[str | os.PathLike | None] = (), is_file: bool = False,
) -> Path:
    """Validate an output destination before any work (see the module docstring); returns it resolved.

    ``inputs``: every path the run reads (None entries and non-paths such as aliases are skipped).
    ``is_file``: the output is one file (``eval --out``) rather than a folder.
    """
    raw = dest
    if Path(raw).expanduser().is_symlink():
        raise UnsafeOutputError(f"--out {raw} is a symbolic link; pass the real path or a new folder")
    dest = check_location(dest, inputs=inputs, is_file=is_file)
    if not dest.exists():
        return dest
    if not overwrite:
        raise OutputExistsError(f"output {'file' if is_file else 'folder'} {dest} already exists; choose another "
                                "--out or pass --overwrite")
    if is_file:
        if not dest.is_file() or not _is_sstmerge_result_file(dest):
            raise UnsafeOutputError(f"--out {raw} exists and is not a results file written by sstmerge; "
                                    "--overwrite replaces only sstmerge's own results. Choose another path")
        return dest
    if not dest.is_dir():
        raise UnsafeOutputError(f"--out {raw} exists and is a file, not a folder; choose another path")
    ok, why = written_by_sstmerge(dest)
    if not ok:
        raise UnsafeOutputError(f"--overwrite would delete {dest}, but {why}. --overwrite replaces only folders "
                                "that sstmerge wrote; move your files away or choose another --out")
    return dest


def _is_sstmerge_result_file(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and ("sstmerge_eval_version" in data or {"provenance", "suites"} <= set(data))


# ------------------------------------------------------------------------------------------ renames
_libc = None


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux ``renameat2``; False when the kernel, libc or filesystem does not offer it."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _libc.renameat2  # noqa: B018
        except (OSError, AttributeError):
            _libc = False
    if _libc is False:
        return False
    AT_FDCWD = -100
    rc = _libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), ctypes.c_uint(flags))
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def _commit_new(tmp: Path, dest: Path) -> None:
    """Rename ``tmp`` to a ``dest`` that must not exist (fails rather than replace anything)."""
    try:
        if _renameat2(tmp, dest, RENAME_NOREPLACE):
            return
    except FileExistsError:
        raise OutputExistsError(f"output {dest} appeared while this run was writing; nothing was replaced "
                                "(the new result was discarded)") from None
    if dest.exists():
        raise OutputExistsError(f"output {dest} appeared while this run was writing; nothing was replaced")
    os.replace(tmp, dest)


def _commit_replace(tmp: Path, dest: Path) -> None:
    """Put ``tmp`` at ``dest`` and remove the old ``dest``: an atomic swap where the kernel offers one."""
    if _renameat2(tmp, dest, RENAME_EXCHANGE):  # tmp now holds the old output
        _rmtree_or_unlink(tmp)
        return
    old = dest.with_name(f".old-{dest.name}{TMP_TAG}{os.urandom(4).hex()}")
    os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except BaseException:
        os.replace(old, dest)  # put the old output back
        raise
    _rmtree_or_unlink(old)


def _rmtree_or_unlink(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ claims
class OutputClaim:
    """An exclusive, checked claim on an output folder, held from before the work until the commit.

    >>> with OutputClaim("runs/merged", inputs=[utility, safety], kind="merge") as claim:  # doctest: +SKIP
    ...     result = expensive_work()                       # a second writer of runs/merged fails at once
    ...     with claim.write() as tmp:                      # temp sibling; committed by one rename
    ...         save(result, tmp)
    """

    def __init__(self, dest: str | os.PathLike, *, overwrite: bool = False,
                 inputs: Iterable[str | os.PathLike | None] = (), kind: str = "output",
                 lock_timeout: float | None = 0.0) -> None:
        self.inputs = [i for i in inputs if i is not None]
        self.overwrite, self.kind = overwrite, kind
        self.dest = check_output_target(dest, overwrite=overwrite, inputs=self.inputs)
        # 0: a concurrent writer is an error (user outputs); None: wait for it (shared caches)
        self._lock = PathLock(lock_path(self.dest), what=f"output folder {self.dest}", timeout=lock_timeout)

    def __enter__(self) -> OutputClaim:
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        try:
            remove_stale_temps(self.dest.parent, self.dest.name)
            # re-check under the lock: the destination may have appeared since the first check
            check_output_target(self.dest, overwrite=self.overwrite, inputs=self.inputs)
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()

    @contextlib.contextmanager
    def write(self) -> Iterator[Path]:
        """A fresh temp folder next to the destination; on success the marker is added and it becomes the
        destination (the old one, with ``overwrite``, is replaced in the same step)."""
        if not self._lock.held:
            raise RuntimeError("OutputClaim.write() outside `with OutputClaim(...)`")
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(self.dest.name), dir=self.dest.parent))
        _LIVE_TEMPS.add(tmp)
        try:
            yield tmp
            _write_marker(tmp, self.kind)
            check_output_target(self.dest, overwrite=self.overwrite, inputs=self.inputs)
            if self.dest.exists():
                _commit_replace(tmp, self.dest)
            else:
                _commit_new(tmp, self.dest)
        except BaseException:
            _rmtree_or_unlink(tmp)
            raise
        finally:
            _LIVE_TEMPS.discard(tmp)


def _write_marker(folder: Path, kind: str) -> None:
    from .. import __version__

    files = _files_in(folder)
    marker = {"kind": kind, "sstmerge_version": __version__, "files": files,
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    (folder / MARKER_NAME).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")


@contextlib.contextmanager
def atomic_output_dir(
    dest: str | os.PathLike, overwrite: bool = False, *, inputs: Iterable[str | os.PathLike | None] = (),
    kind: str = "output",
) -> Iterator[Path]:
    """Claim ``dest`` (rules in the module docstring), yield a fresh temp folder next to it, and on success
    make it ``dest`` in one rename. On any error, ``Ctrl-C`` or ``SIGTERM`` nothing appears at ``dest`` (an
    old one is kept) and the temp folder is removed."""
    with OutputClaim(dest, overwrite=overwrite, inputs=inputs, kind=kind) as claim, claim.write() as tmp:
        yield tmp


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (temp file in the same folder, flushed to disk, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), dir=path.parent)
    _LIVE_TEMPS.add(Path(tmp))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        _LIVE_TEMPS.discard(Path(tmp))


def atomic_output_file(
    dest: str | os.PathLike, text: str, *, overwrite: bool = False, inputs: Iterable[str | os.PathLike | None] = (),
) -> Path:
    """Write one results file under the claim rules (``eval --out``): refuses inputs and files sstmerge did
    not write, locks against a concurrent writer, writes atomically."""
    dest = check_output_target(dest, overwrite=overwrite, inputs=inputs, is_file=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with PathLock(lock_path(dest), what=f"output file {dest}", timeout=0):
        remove_stale_temps(dest.parent, dest.name)
        check_output_target(dest, overwrite=overwrite, inputs=inputs, is_file=True)
        atomic_write_text(dest, text)
    return dest


# ------------------------------------------------------------------------------------------ signals
class Terminated(SystemExit):
    """Raised in the main thread by SIGTERM / SIGHUP (see :func:`install_signal_handlers`)."""


def _on_signal(signum, frame) -> None:  # noqa: ARG001
    raise Terminated(128 + signum)


def install_signal_handlers() -> None:
    """Turn SIGTERM and SIGHUP (what ``timeout``, job schedulers and closed terminals send) into an exception
    in the main thread, so every ``finally`` / ``except BaseException`` runs: temp folders are removed,
    locks released, the Fisher store stays at its last checkpoint. The CLI calls this; Python API users
    may call it too (it replaces the default handlers, which end the process without any clean-up)."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError, OSError):  # not the main thread, or no such signal
            signal.signal(sig, _on_signal)

