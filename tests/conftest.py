"""Shared fixtures: a tiny random Llama on disk and non-zero random PEFT LoRA adapters for it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sstmerge.io.models import build_tiny_llama

TINY_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny random LlamaForCausalLM saved as an HF folder (2 layers, hidden 32)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "base", seed=0)


def load_tiny(base: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()


def make_adapter(
    base: Path,
    out: Path,
    *,
    seed: int,
    targets=("q_proj", "v_proj"),
    r: int = 4,
    alpha: float = 8,
    use_rslora: bool = False,
    rank_pattern: dict | None = None,
    alpha_pattern: dict | None = None,
    layers_to_transform: list[int] | None = None,
    modules_to_save: list[str] | None = None,
    base_name: str | None = None,
    scale: float = 0.1,
) -> Path:
    """Save a PEFT LoRA adapter whose A and B are random (non-zero) for the tiny base."""
    from peft import LoraConfig, get_peft_model

    model = load_tiny(base)
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(targets),
        use_rslora=use_rslora,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
        layers_to_transform=layers_to_transform,
        modules_to_save=modules_to_save,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(p + scale * torch.randn(p.shape, generator=gen) if "modules_to_save" in name else scale * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(str(out))
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_name if base_name is not None else str(base)
    config_path.write_text(json.dumps(config, indent=2))
    return out


@pytest.fixture
def adapter_factory(tiny_base, tmp_path):
    counter = {"n": 0}

    def factory(**kwargs) -> Path:
        counter["n"] += 1
        kwargs.setdefault("seed", counter["n"])
        return make_adapter(tiny_base, tmp_path / f"adapter{counter['n']}", **kwargs)

    return factory


# Hypothesis: derandomized on CI (reproducible), random exploration locally.
import os as _os

from hypothesis import settings as _hsettings

_hsettings.register_profile("ci", derandomize=True, deadline=None)
if _os.environ.get("CI"):
    _hsettings.load_profile("ci")
