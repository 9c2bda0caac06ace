"""Read and write LoRA adapters (PEFT folders; legacy ``.pt`` state dicts behind an explicit opt-in).

In memory an adapter is a :class:`LoraAdapter`: per target module ``m`` (named as in the base model, e.g.
``model.layers.3.self_attn.q_proj``) the factors ``A`` (r × d_in), ``B`` (d_out × r) and the scale
``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA), so ``ΔW = s · B @ A``; plus full-tensor
entries (``modules_to_save``) keyed by parameter name (``model.embed_tokens.weight``).

Reading validates everything that can be checked without the base model: config fields, supported
variant (plain LoRA only: DoRA, LoRA biases, Conv1D fan-in/fan-out, embedding LoRA and other PEFT types are
refused), matching A/B pairs, ranks vs ``rank_pattern``, and NaN/Inf. Checks against the base model live in
:mod:`sstmerge.io.validate`.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import (
    AdapterFormatError,
    NonFiniteError,
    PickleRefusedError,
    UnsupportedAdapterError,
)

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAMES = ("adapter_model.bin", "adapter_model.pt")
PEFT_PREFIX = "base_model.model."

# ``<module>.lora_A.weight`` or, in raw (unsaved) PEFT state dicts, ``<module>.lora_A.<adapter_name>.weight``.
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")


@dataclass
class LoraModule:
    """One module's LoRA factors. ``ΔW = scale · B @ A``; A: (r, d_in), B: (d_out, r)."""

    A: torch.Tensor  # (r, d_in)
    B: torch.Tensor  # (d_out, r)
    scale: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of the weight this module updates: (d_out, d_in)."""
        return int(self.B.shape[0]), int(self.A.shape[1])

    def delta(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Dense weight update ``ΔW = scale · B @ A`` (d_out, d_in)."""
        return self.scale * (self.B.to(dtype) @ self.A.to(dtype))


@dataclass
class LoraAdapter:
    """A LoRA adapter: per-module factors + full-tensor entries + the raw PEFT config."""

    modules: dict[str, LoraModule]
    full_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    path: Path | None = None
    files: list[Path] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name if self.path is not None else "<in-memory adapter>"

    @property
    def base_model_name_or_path(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def __repr__(self) -> str:  # short: tensors are big
        ranks = sorted({m.rank for m in self.modules.values()})
        return f"LoraAdapter({self.name!r}, modules={len(self.modules)}, ranks={ranks}, full={list(self.full_tensors)})"


# --------------------------------------------------------------------------------------------- reading
def _pattern_value(pattern: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: key matches if ``re.match(rf"(.*\\.)?({key})$", module)``."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


_REFUSED_FLAGS = {
    "use_dora": "DoRA adapters (use_dora=true) carry a magnitude vector; their update is not B@A and cannot be "
    "merged by addition. Merge the DoRA adapter into the base first, or retrain as plain LoRA.",
    "lora_bias": "adapters with trained LoRA biases (lora_bias=true) are not supported; retrain with lora_bias=false.",
    "fan_in_fan_out": "fan_in_fan_out=true (Conv1D / GPT-2 style layers) is not supported; sstmerge targets "
    "nn.Linear layers (Llama/Mistral/Qwen).",
    "use_qalora": "QA-LoRA adapters are not supported.",
    "target_parameters": "LoRA on raw parameters (target_parameters) is not supported.",
    "layer_replication": "layer_replication changes the base architecture; not supported.",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported.",
    "trainable_token_indices": "trainable-token adapters are not supported.",
}


def parse_adapter_config(config: dict, source: Path) -> dict:
    """Check an ``adapter_config.json`` dict; raise a clear error for unsupported variants."""
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{source}: adapter config must be a JSON object, got {type(config).__name__}")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise UnsupportedAdapterError(
            f"{source}: peft_type={peft_type!r} is not supported; sstmerge merges LoRA adapters (peft_type 'LORA')."
        )
    for key, why in _REFUSED_FLAGS.items():
        if config.get(key):
            raise UnsupportedAdapterError(f"{source}: {key}={config[key]!r}: {why}")
    if config.get("bias", "none") != "none":
        raise UnsupportedAdapterError(
            f"{source}: bias={config['bias']!r}: adapters that train biases are not supported; use bias='none'."
        )
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise AdapterFormatError(f"{source}: key {key!r} must be a positive number, got {value!r}")
    return config


def _read_config(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise AdapterFormatError(f"cannot read {path}: {exc}") from exc
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AdapterFormatError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); the file is corrupt or truncated: "
            "re-export the adapter with PEFT's save_pretrained"
        ) from exc
    return parse_adapter_config(config, path)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                tensors[key] = fh.get_tensor(key)
        return tensors
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise AdapterFormatError(
            f"{path} is truncated or not a valid safetensors file ({exc}); re-export the adapter"
        ) from exc


def _read_pickle(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if not allow_pickle:
        raise PickleRefusedError(
            f"{path} is a pickled PyTorch checkpoint; pickles can execute code when loaded. If you trust it, pass "
            "--allow-pickle (allow_pickle=True): it is then read with torch.load(weights_only=True), which only "
            "accepts tensors. Better: convert it to adapter_model.safetensors."
        )
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise AdapterFormatError(
            f"{path} could not be read with torch.load(weights_only=True): {exc}. It is corrupt, truncated, or "
            "holds non-tensor objects; save only the adapter's state dict of tensors"
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterFormatError(f"{path} does not hold a flat dict of tensors (a LoRA state dict)")
    return state


def _strip(key: str) -> str:
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def adapter_from_state_dict(
    state: dict[str, torch.Tensor], config: dict, source: Path | None = None, files: list[Path] | None = None
) -> LoraAdapter:
    """Build a :class:`LoraAdapter` from a PEFT state dict and its config (validated as in :func:`read_adapter`)."""
    src = source or Path("<state dict>")
    config = parse_adapter_config(dict(config), src)
    use_rslora = bool(config.get("use_rslora", False))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    modules_to_save = list(config.get("modules_to_save") or [])

    factors: dict[str, dict[str, torch.Tensor]] = {}
    full: dict[str, torch.Tensor] = {}
    for raw_key, tensor in state.items():
        key = _strip(raw_key)
        if not torch.is_floating_point(tensor):
            raise AdapterFormatError(f"{src}: tensor {raw_key!r} has non-float dtype {tensor.dtype}")
        if not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise NonFiniteError(
                f"{src}: tensor {raw_key!r} (shape {tuple(tensor.shape)}) has {bad} NaN/Inf values; the adapter "
                "diverged in training or the file is damaged: use an earlier checkpoint"
            )
        if "lora_magnitude_vector" in key:
            raise UnsupportedAdapterError(f"{src}: key {raw_key!r} is a DoRA magnitude vector; {_REFUSED_FLAGS['use_dora']}")
        if "lora_embedding_" in key:
            raise UnsupportedAdapterError(
                f"{src}: key {raw_key!r} is LoRA on an embedding layer, which sstmerge does not merge yet; "
                "train with target_modules excluding embed_tokens, or use modules_to_save=['embed_tokens']"
            )
        match = _LORA_KEY.match(key)
        if match:
            factors.setdefault(match["module"], {})[match["factor"]] = tensor
            continue
        if key.endswith(".base_layer.weight") or key.endswith(".base_layer.bias"):
            log.debug("%s: ignoring %s (a copy of the base weight that PEFT saves for tied layers)", src, raw_key)
            continue
        owner = key.rsplit(".", 1)[0]
        if any(owner == m or owner.endswith("." + m) for m in modules_to_save):
            full[key] = tensor
            continue
        raise AdapterFormatError(
            f"{src}: unexpected tensor key {raw_key!r}: neither a LoRA factor (<module>.lora_A/lora_B.weight) nor "
            f"an entry of modules_to_save={modules_to_save}"
        )

    modules: dict[str, LoraModule] = {}
    for module, pair in sorted(factors.items()):
        if set(pair) != {"A", "B"}:
            missing = ({"A", "B"} - set(pair)).pop()
            raise AdapterFormatError(f"{src}: module {module!r} has no lora_{missing} tensor (file truncated or edited?)")
        A, B = pair["A"], pair["B"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise AdapterFormatError(
                f"{src}: module {module!r}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} are not a LoRA pair "
                "(need A: (r, d_in), B: (d_out, r)); conv LoRA is not supported"
            )
        r_cfg = _pattern_value(rank_pattern, module, config["r"])
        if int(r_cfg) != A.shape[0]:
            raise AdapterFormatError(
                f"{src}: module {module!r}: config gives rank {r_cfg} (r/rank_pattern) but lora_A has shape "
                f"{tuple(A.shape)}; the config does not belong to these weights"
            )
        alpha = float(_pattern_value(alpha_pattern, module, config["lora_alpha"]))
        r = A.shape[0]
        scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        modules[module] = LoraModule(A=A, B=B, scale=scale)
    if not modules and not full:
        raise AdapterFormatError(f"{src}: the adapter holds no LoRA tensors")
    return LoraAdapter(modules=modules, full_tensors=full, config=config, path=source, files=list(files or []))


def read_adapter(path: str | Path, *, allow_pickle: bool = False) -> LoraAdapter:
    """Read a PEFT adapter folder, or a legacy ``.pt``/``.bin`` state dict (needs ``allow_pickle=True``).

    A folder must hold ``adapter_config.json`` and ``adapter_model.safetensors`` (or, with
    ``allow_pickle``, ``adapter_model.bin``). A single legacy file needs an ``adapter_config.json`` beside it,
    because rank and alpha (hence the scale) cannot be recovered from the tensors.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise AdapterFormatError(f"adapter {path} does not exist")
    if path.is_dir():
        config_path = path / CONFIG_NAME
        if not config_path.is_file():
            raise AdapterFormatError(
                f"{path} has no {CONFIG_NAME}; a PEFT adapter folder holds {CONFIG_NAME} + {WEIGHTS_NAME} "
                "(written by PeftModel.save_pretrained)"
            )
        config = _read_config(config_path)
        weights = path / WEIGHTS_NAME
        if weights.is_file():
            state = _read_safetensors(weights)
        else:
            legacy = next((path / n for n in LEGACY_WEIGHTS_NAMES if (path / n).is_file()), None)
            if legacy is None:
                raise AdapterFormatError(f"{path} has {CONFIG_NAME} but no {WEIGHTS_NAME}; the adapter is incomplete")
            weights = legacy
            state = _read_pickle(legacy, allow_pickle)
        return adapter_from_state_dict(state, config, source=path, files=[config_path, weights])
    # a single file
    if path.suffix == ".safetensors":
        state = _read_safetensors(path)
    elif path.suffix in (".pt", ".pth", ".bin"):
        state = _read_pickle(path, allow_pickle)
    else:
        raise AdapterFormatError(f"{path}: expected a PEFT adapter folder, a .safetensors or a legacy .pt file")
    config_path = path.parent / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterFormatError(
            f"{path}: no {CONFIG_NAME} beside it; rank and lora_alpha (the LoRA scale) cannot be inferred from "
            "tensors. Put the training run's adapter_config.json in the same folder."
        )
    config = _read_config(config_path)
    return adapter_from_state_dict(state, config, source=path, files=[config_path, path])


# --------------------------------------------------------------------------------------------- writing
def adapter_state_dict(adapter: LoraAdapter, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """PEFT-format state dict (``base_model.model.<module>.lora_A.weight`` ...), contiguous tensors."""
    out: dict[str, torch.Tensor] = {}
    for module, lm in adapter.modules.items():
        out[f"{PEFT_PREFIX}{module}.lora_A.weight"] = lm.A.to(dtype or lm.A.dtype).contiguous()
        out[f"{PEFT_PREFIX}{module}.lora_B.weight"] = lm.B.to(dtype or lm.B.dtype).contiguous()
    for key, tensor in adapter.full_tensors.items():
        out[f"{PEFT_PREFIX}{key}"] = tensor.to(dtype or tensor.dtype).contiguous()
    return out


def target_modules_for(module_names: list[str], all_linear_names: list[str] | None = None) -> list[str]:
    """PEFT ``target_modules`` for exactly these modules.

    Leaf names (``q_proj``) when every base module with that leaf is present (the usual case, and what vLLM
    expects); otherwise the full module names, so PEFT creates LoRA layers only where the adapter has weights.
    """
    leaves = sorted({n.rsplit(".", 1)[-1] for n in module_names})
    if all_linear_names is None:
        return leaves
    present = set(module_names)
    for leaf in leaves:
        with_leaf = {n for n in all_linear_names if n.rsplit(".", 1)[-1] == leaf}
        if not with_leaf <= present:
            return sorted(present)
    return leaves


def write_adapter(
    adapter: LoraAdapter,
    folder: str | Path,
    *,
    dtype: torch.dtype | None = None,
    base_model_name_or_path: str | None = None,
    all_linear_names: list[str] | None = None,
    task_type: str | None = "CAUSAL_LM",
) -> None:
    """Write ``adapter`` as a standard PEFT folder into an existing (temporary) ``folder``.

    All modules must share one rank and scale 1 (what :func:`sstmerge.merge.compose.compose_adapters`
    produces): the config is then ``r = lora_alpha = rank``, no rank/alpha patterns, which PEFT and vLLM
    load unchanged. Use :func:`sstmerge.io.atomic.atomic_output_dir` around this call.
    """
    from peft import LoraConfig

    folder = Path(folder)
    ranks = {m.rank for m in adapter.modules.values()}
    scales = {round(m.scale, 12) for m in adapter.modules.values()}
    if len(ranks) > 1 or scales - {1.0}:
        raise ValueError(f"write_adapter needs one rank and scale 1.0 for all modules, got ranks={ranks} scales={scales}")
    rank = ranks.pop() if ranks else 1
    modules_to_save = sorted({k.rsplit(".", 1)[0].rsplit(".", 1)[-1] for k in adapter.full_tensors}) or None
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=target_modules_for(list(adapter.modules), all_linear_names) if adapter.modules else [],
        modules_to_save=modules_to_save,
        bias="none",
        lora_dropout=0.0,
        task_type=task_type,
        base_model_name_or_path=base_model_name_or_path,
        inference_mode=True,
    )
    config.save_pretrained(str(folder))
    save_file(adapter_state_dict(adapter, dtype), str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
