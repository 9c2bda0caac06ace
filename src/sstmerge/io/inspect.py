"""``sst-merge inspect``: a readable description of an adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .adapter import read_adapter
from .hashing import sha256_files


def describe_adapter(path: str | Path, *, allow_pickle: bool = False) -> dict[str, Any]:
    """Ranks, scales, targets and per-module norms (‖A‖_F, ‖B‖_F, ‖ΔW‖_F) of an adapter."""
    adapter = read_adapter(path, allow_pickle=allow_pickle)
    cfg = adapter.config
    modules = {}
    for name, lm in adapter.modules.items():
        modules[name] = {
            "rank": lm.rank,
            "shape": list(lm.shape),
            "scale": lm.scale,
            "norm_A": float(lm.A.double().norm()),
            "norm_B": float(lm.B.double().norm()),
            "norm_delta": float(lm.delta().norm()),
        }
    return {
        "path": str(adapter.path),
        "sha256": sha256_files(adapter.files),
        "peft_type": cfg.get("peft_type", "LORA"),
        "r": cfg.get("r"),
        "lora_alpha": cfg.get("lora_alpha"),
        "use_rslora": bool(cfg.get("use_rslora", False)),
        "rank_pattern": cfg.get("rank_pattern") or {},
        "alpha_pattern": cfg.get("alpha_pattern") or {},
        "target_modules": cfg.get("target_modules"),
        "base_model_name_or_path": adapter.base_model_name_or_path,
        "n_modules": len(modules),
        "total_norm_delta": sum(m["norm_delta"] ** 2 for m in modules.values()) ** 0.5,
        "modules_to_save": {k: list(v.shape) for k, v in adapter.full_tensors.items()},
        "modules": modules,
    }


def render_table(info: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{info['path']}[/bold]")
    console.print(
        f"peft_type {info['peft_type']}  r {info['r']}  lora_alpha {info['lora_alpha']}  rsLoRA {info['use_rslora']}  "
        f"modules {info['n_modules']}  ‖ΔW‖_F total {info['total_norm_delta']:.4g}"
    )
    console.print(f"targets: {info['target_modules']}   base: {info['base_model_name_or_path']}")
    if info["rank_pattern"] or info["alpha_pattern"]:
        console.print(f"rank_pattern {info['rank_pattern']}  alpha_pattern {info['alpha_pattern']}")
    if info["modules_to_save"]:
        console.print(f"full tensors (modules_to_save): {info['modules_to_save']}")
    table = Table("module", "rank", "shape", "scale", "‖A‖", "‖B‖", "‖ΔW‖")
    for name, m in info["modules"].items():
        table.add_row(name, str(m["rank"]), "x".join(map(str, m["shape"])), f"{m['scale']:.4g}",
                      f"{m['norm_A']:.4g}", f"{m['norm_B']:.4g}", f"{m['norm_delta']:.4g}")
    console.print(table)
