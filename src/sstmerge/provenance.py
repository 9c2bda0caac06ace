"""Provenance helpers shared by every output (merge reports, evaluation results, experiment results)."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as md
import platform
import sys

PACKAGES = ("sstmerge", "torch", "transformers", "peft", "safetensors", "numpy", "scipy", "pydantic")


def versions() -> dict[str, str]:
    """Python, platform and the versions of the packages that shape a result."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def now_iso() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
