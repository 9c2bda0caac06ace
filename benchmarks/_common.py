"""Small helpers shared by the benchmark scripts: measure a command in a fresh process, print ratios last.

Benchmarks print measurements, never assert on them (timings are noisy); tests check correctness only.

- :func:`measure_subprocess` runs a command in a fresh child process and returns its wall time and its own
  peak resident set size (``ru_maxrss`` of that child from ``os.wait4``; ``getrusage(RUSAGE_CHILDREN)`` would
  be the maximum over every child waited for so far, so a second measurement could report the first's peak).
- :func:`rss_bytes` / :func:`peak_rss_bytes` are for the child itself (e.g. the RSS right after its imports,
  the "constant" a peak is compared against).
- :func:`print_ratios` prints ``name = X.XX`` lines, the last lines of a benchmark's output.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence

_RU_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux


def measure_subprocess(cmd: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | None = None,
                       check: bool = True) -> dict:
    """Run ``cmd`` in a fresh process; return ``{"seconds", "peak_rss_bytes", "stdout", "stderr", "returncode"}``.

    ``seconds`` is the wall time from start to exit (interpreter start and imports included);
    ``peak_rss_bytes`` is the child's peak RSS (its ``ru_maxrss``, which counts file pages it had mapped too).
    With ``check`` a non-zero exit raises ``RuntimeError`` with the end of the child's stderr.
    """
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=err, env=None if env is None else dict(env),
                                cwd=cwd)
        stdout = proc.stdout.read()
        proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        err.seek(0)
        stderr = err.read().decode("utf-8", errors="replace")
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited with {proc.returncode}:\n{stderr[-4000:]}")
    return {
        "seconds": seconds,
        "peak_rss_bytes": usage.ru_maxrss * _RU_MAXRSS_UNIT,
        "stdout": stdout.decode("utf-8", errors="replace"),
        "stderr": stderr,
        "returncode": proc.returncode,
    }


def _proc_status(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """This process's current resident set size (VmRSS; falls back to the peak where /proc is missing)."""
    now = _proc_status("VmRSS")
    return now if now is not None else peak_rss_bytes()


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (VmHWM, or ru_maxrss)."""
    hwm = _proc_status("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * _RU_MAXRSS_UNIT


def fmt_bytes(n: float) -> str:
    """``1.23 GiB`` style."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def print_ratios(ratios: Mapping[str, float]) -> None:
    """Print ``name = X.XX`` per ratio (call last: these lines are what gets compared between runs)."""
    for name, value in ratios.items():
        print(f"{name} = {value:.2f}", flush=True)
