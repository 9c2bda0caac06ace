"""The point at which the Fisher is taken: base + Σ c_i ΔW_Ui (merged into the weights) + the safety
adapter as trainable PEFT LoRA layers. φ = the safety adapter's LoRA factors.

The ``protect`` mode differentiates with respect to a utility adapter U_j at the same point: the other
utility adapters and the safety adapter are merged into the weights and ``c_j ΔW_Uj`` is the LoRA layer
(:func:`fisher_target`), so the Fisher machinery (cache, resume, statistics) is the same.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import AdapterMismatchError
from ..io.adapter import CONFIG_NAME, WEIGHTS_NAME, LoraAdapter, LoraModule, adapter_state_dict
from ..io.models import BaseModelInfo, load_causal_lm, require_tokenizer
from .gradients import LoraLayer

log = logging.getLogger(__name__)


def module_layout(safety: LoraAdapter) -> list[tuple[str, int, int]]:
    """``[(module, numel(A), numel(B)), ...]`` in sorted module order: the layout of φ (A then B, flattened)."""
    return [(m, safety.modules[m].A.numel(), safety.modules[m].B.numel()) for m in sorted(safety.modules)]


def fisher_target(adapter: LoraAdapter, coefficient: float) -> LoraAdapter:
    """The adapter whose factors a Fisher pass differentiates, carrying its merge coefficient: ``B ← c·B``
    (so ``ΔW = c·s·B A`` and the point is the merge's own); the adapter itself when ``c = 1``. A scaled copy
    has no ``files``, so the Fisher cache key hashes its tensors (a different c is a different entry)."""
    if coefficient == 1.0:
        return adapter.materialize()
    modules = {m: LoraModule(A=lm.A, B=lm.B * coefficient, scale=lm.scale) for m, lm in adapter.modules.items()}
    return LoraAdapter(modules=modules, full_tensors=dict(adapter.full_tensors.items()), config=adapter.config,
                       path=adapter.path, files=[])


def flat_phi(safety: LoraAdapter) -> dict[str, torch.Tensor]:
    """φ_m = [vec(A_m); vec(B_m)] per module (float64)."""
    return {m: torch.cat([lm.A.reshape(-1), lm.B.reshape(-1)]).to(torch.float64) for m, lm in sorted(safety.modules.items())}


@torch.no_grad()
def apply_utility(model, utility: Sequence[LoraAdapter], coefficients: Sequence[float], base: BaseModelInfo | None) -> None:
    """``W ← W + Σ_i c_i ΔW_Ui`` in place (exact; ΔW computed in float64); full tensors as differences."""
    for adapter, c in zip(utility, coefficients):
        for name, lm in adapter.modules.items():
            layer = model.get_submodule(name)
            layer.weight += (c * lm.delta()).to(layer.weight.dtype)
        for key, tensor in adapter.full_tensors.items():
            param = model.get_parameter(key)
            w_base = base.load_parameter(key) if base is not None else param.detach().clone()
            param += (c * (tensor.to(torch.float64) - w_base.to(torch.float64))).to(param.dtype)


def load_fisher_point(
    base: BaseModelInfo, utility: Sequence[LoraAdapter], coefficients: Sequence[float], safety: LoraAdapter,
    cache_dir: str | Path | None = None, device: str = "cpu", dtype: str = "float32",
):
    """Return ``(peft_model, tokenizer, layers)`` where ``layers[module]`` holds the safety adapter's PEFT
    ``lora_A`` / ``lora_B`` linears (in φ's module order); their weights are the only parameters with
    ``requires_grad``. ``dtype``: the model's weights (the LoRA factors are loaded in it too)."""
    from peft import PeftModel

    model, tokenizer = load_causal_lm(base.spec, cache_dir, dtype=getattr(torch, dtype))
    require_tokenizer(tokenizer, base.spec, "the Fisher pass")
    apply_utility(model, utility, coefficients, base)
    with tempfile.TemporaryDirectory(prefix="sstmerge-safety-") as tmp:
        config = dict(safety.config)
        config.pop("inference_mode", None)
        (Path(tmp) / CONFIG_NAME).write_text(json.dumps(config))
        save_file(adapter_state_dict(safety), str(Path(tmp) / WEIGHTS_NAME))
        peft_model = PeftModel.from_pretrained(model, tmp, is_trainable=True)
    peft_model.eval()  # no dropout: the Fisher is taken at the deterministic model
    layers = lora_layers(peft_model)
    if set(layers) != set(safety.modules):
        raise AdapterMismatchError(
            f"{safety.name}: PEFT created LoRA layers for {len(layers)} modules but the adapter has {len(safety.modules)}"
        )
    for m, layer in layers.items():
        A, B = layer.A.weight.detach(), layer.B.weight.detach()
        if not (torch.equal(A, safety.modules[m].A.to(A.dtype)) and torch.equal(B, safety.modules[m].B.to(B.dtype))):
            raise AdapterMismatchError(f"{safety.name}: PEFT loaded different factors for {m} than the file holds")
    peft_model.to(device)
    return peft_model, tokenizer, layers


def lora_layers(peft_model) -> dict[str, LoraLayer]:
    """``{module: LoraLayer(lora_A, lora_B)}`` of a PEFT model (sorted by module name); the LoRA weights are
    set to require gradients and every other parameter not."""
    found: dict[str, list] = {}
    for name, p in peft_model.named_parameters():
        is_factor = ".lora_A." in name or ".lora_B." in name
        p.requires_grad_(is_factor)
        if is_factor:
            module = name.removeprefix("base_model.model.").split(".lora_")[0]
            found.setdefault(module, [None, None])[0 if ".lora_A." in name else 1] = peft_model.get_submodule(
                name.removesuffix(".weight"))
    return {m: LoraLayer(A=A, B=B) for m, (A, B) in sorted(found.items())}
