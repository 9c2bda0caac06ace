"""Inter-process locks on a path (``flock`` on a lock file), for output folders and cache entries.

An advisory ``flock`` is released by the kernel when its holder dies, ``kill -9`` included, so a lock never
outlives a crashed run (no stale-lock timeouts to guess). The lock file is removed on release so that no
``.lock`` files pile up next to users' outputs; the classic race of removing a lock file (a waiter locks the
removed inode while a newcomer creates and locks a new file) is closed by re-checking, after every acquire,
that the path still names the inode that was locked, and retrying otherwise.

``filelock`` (a dependency of huggingface_hub) does not remove its files and has no such check, hence this
small class. POSIX only (Linux, macOS), like the rest of the tool's file handling.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
from pathlib import Path

from ..errors import OutputBusyError

log = logging.getLogger(__name__)


class PathLock:
    """An exclusive lock named by ``path`` (the lock file itself, created on demand).

    >>> with PathLock(folder.with_name(folder.name + ".lock"), what=f"output folder {folder}"):  # doctest: +SKIP
    ...     ...

    ``timeout``: ``0`` fails at once with :class:`OutputBusyError` when another process holds the lock;
    ``None`` waits as long as it takes (logging once that it waits); a number of seconds waits that long.
    Re-entrant within one object only (a second ``acquire`` on a held lock is an error).
    """

    def __init__(self, path: str | os.PathLike, *, what: str = "", timeout: float | None = 0.0) -> None:
        self.path = Path(path)
        self.what = what or str(self.path)
        self.timeout = timeout
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> PathLock:
        if self._fd is not None:
            raise RuntimeError(f"lock {self.path} is already held by this object")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        told = False
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if deadline is not None and time.monotonic() >= deadline:
                    holder = self._holder()
                    raise OutputBusyError(
                        f"{self.what} is being written by another sstmerge process{holder}; wait for it to finish "
                        f"or use another folder (lock: {self.path})"
                    ) from None
                if not told:
                    log.info("waiting for another sstmerge process to finish %s", self.what)
                    told = True
                time.sleep(0.05)
                continue
            try:  # the file we locked must still be the one the path names (see the module docstring)
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self._fd = fd
            return self

    def _holder(self) -> str:
        try:
            pid = self.path.read_text().strip()
        except OSError:
            return ""
        return f" (pid {pid})" if pid.isdigit() else ""

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked: nobody can hold the old inode after this
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> PathLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:  # pragma: no cover - best effort (the kernel drops flocks of dead processes)
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass

