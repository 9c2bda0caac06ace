"""Provenance written beside every merged adapter: merge_report.json, merge_report.txt, merge_config.yaml."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as md
import json
import platform
import sys
from pathlib import Path
from typing import Any

import yaml

PACKAGES = ("sstmerge", "torch", "transformers", "peft", "safetensors", "numpy", "scipy", "pydantic")


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def summary_text(report: dict[str, Any]) -> str:
    """A short human-readable summary of a merge report."""
    cfg = report["config"]
    lines = [
        f"sstmerge {report['versions'].get('sstmerge')} merge, {report['created']}",
        f"mode: {cfg['mode']}   safety_weight: {cfg['safety_weight']}   utility coefficients: {cfg['utility_coefficients']}",
        f"base: {report['inputs']['base']['spec']} ({report['inputs']['base']['path']})",
    ]
    for u in report["inputs"]["utility"]:
        lines.append(f"utility: {u['path']}  (c = {u['coefficient']:g}, {u['n_modules']} modules, ranks {u['ranks']})")
    s = report["inputs"].get("safety")
    if s:
        lines.append(f"safety:  {s['path']}  ({s['n_modules']} modules, ranks {s['ranks']})")
    out = report.get("output", {})
    lines.append(f"output rank: {out.get('rank')}   modules: {out.get('n_modules')}   partial modules: {out.get('n_partial_modules')}")
    if out.get("max_recompression_rel_error") is not None:
        lines.append(f"recompression to rank {cfg['recompress_rank']}: max relative Frobenius error {out['max_recompression_rel_error']:.3e}")
    lines.append("timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in report["timings"].items()))
    for w in report.get("warnings", []):
        lines.append(f"warning: {w}")
    return "\n".join(lines) + "\n"


def write_report_files(folder: Path, report: dict[str, Any]) -> None:
    (folder / "merge_report.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    (folder / "merge_report.txt").write_text(summary_text(report), encoding="utf-8")
    (folder / "merge_config.yaml").write_text(
        "# resolved config of this merge; re-run with: sst-merge merge --config merge_config.yaml --out NEW_DIR\n"
        + yaml.safe_dump({k: v for k, v in report["config"].items() if k not in ("out", "overwrite")}, sort_keys=False),
        encoding="utf-8",
    )
