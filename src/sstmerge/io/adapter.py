"""Read and write LoRA adapters (PEFT folders; legacy ``.pt`` state dicts behind an explicit opt-in).

In memory an adapter is a :class:`LoraAdapter`: per target module ``m`` (named as in the base model, e.g.
``model.layers.3.self_attn.q_proj``) the factors ``A`` (r × d_in), ``B`` (d_out × r) and the scale
``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA), so ``ΔW = s · B @ A``; plus full-tensor
entries (``modules_to_save``) keyed by parameter name (``model.embed_tokens.weight``).

Reading validates everything that can be checked without the base model: config fields, supported
variant (plain LoRA only: DoRA, LoRA biases, Conv1D fan-in/fan-out, embedding LoRA and other PEFT types are
refused), matching A/B pairs, ranks vs ``rank_pattern``, and NaN/Inf. Checks against the base model live in
:mod:`sstmerge.io.validate`.

``read_adapter(path, lazy=True)`` reads only the safetensors header: ``adapter.modules`` is then a
:class:`LazyModules` mapping that reads one module's ``A`` and ``B`` from the file on each ``modules[m]``
(the file is opened and closed per access, so no page of it stays resident), and the per-module facts
(rank, shapes, scale) are in ``adapter.specs`` without touching tensor data. Everything checkable from the
header (config, keys, A/B pairing, ranks, dtypes) is checked at once; values (NaN/Inf) when a module is read.
:class:`AdapterStreamWriter` writes a merged adapter module by module with the header declared up front
(:mod:`sstmerge.io.safetensors_stream`). Together they merge adapters in memory bounded by a few modules.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterator, Mapping
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
from .safetensors_stream import DTYPE_NAMES, SafetensorsStreamWriter

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAMES = ("adapter_model.bin", "adapter_model.pt")
PEFT_PREFIX = "base_model.model."

# ``<module>.lora_A.weight`` or, in raw (unsaved) PEFT state dicts, ``<module>.lora_A.<adapter_name>.weight``.
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")


@dataclass(frozen=True)
class ModuleSpec:
    """A LoRA module's facts without its tensors (what a safetensors header gives): the rank ``r``, the shape
    ``(d_out, d_in)`` of the weight it updates, the scale ``s`` and the factors' dtype.
    ``A``: (r, d_in), ``B``: (d_out, r)."""

    rank: int
    shape: tuple[int, int]  # (d_out, d_in)
    scale: float
    dtype: torch.dtype | None = None

    @property
    def a_shape(self) -> tuple[int, int]:
        return self.rank, self.shape[1]

    @property
    def b_shape(self) -> tuple[int, int]:
        return self.shape[0], self.rank


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

    @property
    def spec(self) -> ModuleSpec:
        return ModuleSpec(rank=self.rank, shape=self.shape, scale=self.scale, dtype=self.A.dtype)

    def delta(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Dense weight update ``ΔW = scale · B @ A`` (d_out, d_in)."""
        return self.scale * (self.B.to(dtype) @ self.A.to(dtype))


@dataclass
class LoraAdapter:
    """A LoRA adapter: per-module factors + full-tensor entries + the raw PEFT config.

    ``modules`` and ``full_tensors`` are dicts, or (``read_adapter(..., lazy=True)``) :class:`LazyModules` /
    :class:`LazyTensors` mappings that read from the file on access; code that only needs ranks and shapes
    uses :attr:`specs` and :attr:`full_shapes`, which never read tensor data.
    """

    modules: Mapping[str, LoraModule]
    full_tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    path: Path | None = None
    files: list[Path] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name if self.path is not None else "<in-memory adapter>"

    @property
    def base_model_name_or_path(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def lazy(self) -> bool:
        """True when modules / full tensors are read from the file on access."""
        return isinstance(self.modules, LazyModules) or isinstance(self.full_tensors, LazyTensors)

    @property
    def specs(self) -> dict[str, ModuleSpec]:
        """Rank, shape, scale and dtype of every module (from the header for lazy adapters)."""
        if isinstance(self.modules, LazyModules):
            return dict(self.modules.specs)
        return {m: lm.spec for m, lm in self.modules.items()}

    @property
    def full_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every full-tensor entry (from the header for lazy adapters)."""
        if isinstance(self.full_tensors, LazyTensors):
            return dict(self.full_tensors.shapes)
        return {k: tuple(t.shape) for k, t in self.full_tensors.items()}

    def materialize(self) -> LoraAdapter:
        """This adapter with every tensor in memory (itself if it is not lazy)."""
        if not self.lazy:
            return self
        return LoraAdapter(modules=dict(self.modules.items()), full_tensors=dict(self.full_tensors.items()),
                           config=self.config, path=self.path, files=list(self.files))

    def __repr__(self) -> str:  # short: tensors are big
        ranks = sorted({s.rank for s in self.specs.values()})
        lazy = ", lazy" if self.lazy else ""
        return f"LoraAdapter({self.name!r}, modules={len(self.modules)}, ranks={ranks}, full={list(self.full_tensors)}{lazy})"


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
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or not math.isfinite(value):
            raise AdapterFormatError(f"{source}: key {key!r} must be a positive finite number, got {value!r}")
    if float(config["r"]) != int(config["r"]):
        raise AdapterFormatError(f"{source}: key 'r' (the LoRA rank) must be a whole number, got {config['r']!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise AdapterFormatError(f"{source}: {key} must be a mapping of module patterns to numbers")
        for name, value in (config.get(key) or {}).items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or not math.isfinite(value):
                raise AdapterFormatError(f"{source}: {key}[{name!r}] must be a positive finite number, got {value!r}")
            if key == "rank_pattern" and float(value) != int(value):
                raise AdapterFormatError(f"{source}: rank_pattern[{name!r}] must be a whole number, got {value!r}")
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


def _read_safetensors_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{key: (shape, safetensors dtype name)}`` from the header only (no tensor data is read).

    ``safe_open`` also checks that the data offsets tile the rest of the file, so a truncated file fails here.
    """
    try:
        entries: dict[str, tuple[tuple[int, ...], str]] = {}
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                sl = fh.get_slice(key)
                entries[key] = (tuple(int(d) for d in sl.get_shape()), str(sl.get_dtype()))
        return entries
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


_TORCH_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


def _check_float(raw_key: str, is_float: bool, dtype, src: Path) -> None:
    if not is_float:
        raise AdapterFormatError(f"{src}: tensor {raw_key!r} has non-float dtype {dtype}")


def _check_finite(raw_key: str, tensor: torch.Tensor, src: Path) -> None:
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise NonFiniteError(
            f"{src}: tensor {raw_key!r} (shape {tuple(tensor.shape)}) has {bad} NaN/Inf values; the adapter "
            "diverged in training or the file is damaged: use an earlier checkpoint"
        )


def output_tensor(key: str, tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``tensor`` cast to the output ``dtype``, contiguous, after checking that every value is finite before
    and after the cast (a merge must never write NaN/Inf: PEFT would load it without complaint).

    Raises :class:`NonFiniteError` naming the key, the number of bad values and the fix (for an overflow of a
    half-precision dtype: its largest value and a wider ``--dtype``)."""
    out = tensor.to(dtype or tensor.dtype).contiguous()
    if bool(torch.isfinite(out).all()):
        return out
    src_finite = bool(torch.isfinite(tensor).all())
    bad = int((~torch.isfinite(out)).sum())
    if src_finite:
        limit = torch.finfo(out.dtype).max
        peak = float(tensor.detach().abs().max())
        raise NonFiniteError(
            f"merged tensor {key!r} (shape {tuple(tensor.shape)}): {bad} value(s) overflow the output dtype "
            f"{str(out.dtype).replace('torch.', '')} (largest |value| {peak:.4g} > {limit:.4g}); nothing was written. "
            "Write it with --dtype float32 or bfloat16, or lower the weights"
        )
    raise NonFiniteError(
        f"merged tensor {key!r} (shape {tuple(tensor.shape)}) has {bad} NaN/Inf value(s); nothing was written. "
        "The weights or tables given overflow (e.g. a utility/safety weight of 1e39) or an input is damaged: "
        "use finite, moderate weights"
    )


def check_update_range(module: str, A: torch.Tensor, B: torch.Tensor, scale: float = 1.0) -> None:
    """The update ``ΔW = scale · B @ A`` that PEFT will compute (in the factors' dtype) must be finite too:
    finite factors can still multiply out of range (a dense merge factored by SVD splits a 1e39 update into
    two ~3e19 factors). Cheap bound first, ``|ΔW_ij| ≤ |scale| · ‖B_i,:‖ · ‖A_:,j‖``; the exact product only
    when the bound exceeds the dtype's range. A: (r, d_in), B: (d_out, r)."""
    if A.numel() == 0 or B.numel() == 0:
        return
    limit = torch.finfo(A.dtype).max
    bound = abs(scale) * float(B.double().norm(dim=1).max()) * float(A.double().norm(dim=0).max())
    if bound <= limit:
        return
    peak = abs(scale) * float((B.double() @ A.double()).abs().max())
    if not peak <= limit:
        raise NonFiniteError(
            f"merged module {module!r}: its update ΔW = B·A reaches {peak:.4g}, beyond the range of "
            f"{str(A.dtype).replace('torch.', '')} ({limit:.4g}), so PEFT would compute Inf from it; nothing was "
            "written. Use finite, moderate weights (and --dtype float32)")


@dataclass(frozen=True)
class _Pair:
    """Where a module's factors live in the state dict / file, and its spec."""

    a_key: str
    b_key: str
    spec: ModuleSpec


def _layout(
    entries: Mapping[str, tuple[tuple[int, ...], torch.dtype | None]], config: dict, src: Path
) -> tuple[dict[str, _Pair], dict[str, str]]:
    """Interpret raw state-dict keys ``{raw_key: (shape, dtype)}`` of a parsed config, from names and shapes only.

    Returns ``({module: _Pair}, {full-tensor key: raw_key})``, modules sorted. Raises for DoRA / embedding
    LoRA keys, keys that are neither LoRA factors nor ``modules_to_save`` entries, unpaired or mis-shaped
    factors (A: (r, d_in), B: (d_out, r)) and ranks that disagree with ``r`` / ``rank_pattern``.
    """
    use_rslora = bool(config.get("use_rslora", False))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    modules_to_save = list(config.get("modules_to_save") or [])

    factors: dict[str, dict[str, str]] = {}
    full: dict[str, str] = {}
    for raw_key in entries:
        key = _strip(raw_key)
        if "lora_magnitude_vector" in key:
            raise UnsupportedAdapterError(f"{src}: key {raw_key!r} is a DoRA magnitude vector; {_REFUSED_FLAGS['use_dora']}")
        if "lora_embedding_" in key:
            raise UnsupportedAdapterError(
                f"{src}: key {raw_key!r} is LoRA on an embedding layer, which sstmerge does not merge yet; "
                "train with target_modules excluding embed_tokens, or use modules_to_save=['embed_tokens']"
            )
        match = _LORA_KEY.match(key)
        if match:
            factors.setdefault(match["module"], {})[match["factor"]] = raw_key
            continue
        if key.endswith(".base_layer.weight") or key.endswith(".base_layer.bias"):
            log.debug("%s: ignoring %s (a copy of the base weight that PEFT saves for tied layers)", src, raw_key)
            continue
        owner = key.rsplit(".", 1)[0]
        if any(owner == m or owner.endswith("." + m) for m in modules_to_save):
            full[key] = raw_key
            continue
        raise AdapterFormatError(
            f"{src}: unexpected tensor key {raw_key!r}: neither a LoRA factor (<module>.lora_A/lora_B.weight) nor "
            f"an entry of modules_to_save={modules_to_save}"
        )

    pairs: dict[str, _Pair] = {}
    for module, keys in sorted(factors.items()):
        if set(keys) != {"A", "B"}:
            missing = ({"A", "B"} - set(keys)).pop()
            raise AdapterFormatError(f"{src}: module {module!r} has no lora_{missing} tensor (file truncated or edited?)")
        (a_shape, a_dtype), (b_shape, _) = entries[keys["A"]], entries[keys["B"]]
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise AdapterFormatError(
                f"{src}: module {module!r}: lora_A {tuple(a_shape)} and lora_B {tuple(b_shape)} are not a LoRA pair "
                "(need A: (r, d_in), B: (d_out, r)); conv LoRA is not supported"
            )
        r_cfg = _pattern_value(rank_pattern, module, config["r"])
        if int(r_cfg) != a_shape[0]:
            raise AdapterFormatError(
                f"{src}: module {module!r}: config gives rank {r_cfg} (r/rank_pattern) but lora_A has shape "
                f"{tuple(a_shape)}; the config does not belong to these weights"
            )
        alpha = float(_pattern_value(alpha_pattern, module, config["lora_alpha"]))
        r = a_shape[0]
        scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        spec = ModuleSpec(rank=r, shape=(b_shape[0], a_shape[1]), scale=scale, dtype=a_dtype)
        pairs[module] = _Pair(keys["A"], keys["B"], spec)
    if not pairs and not full:
        raise AdapterFormatError(f"{src}: the adapter holds no LoRA tensors")
    return pairs, full


def adapter_from_state_dict(
    state: dict[str, torch.Tensor], config: dict, source: Path | None = None, files: list[Path] | None = None
) -> LoraAdapter:
    """Build a :class:`LoraAdapter` from a PEFT state dict and its config (validated as in :func:`read_adapter`)."""
    src = source or Path("<state dict>")
    config = parse_adapter_config(dict(config), src)
    for raw_key, tensor in state.items():
        _check_float(raw_key, torch.is_floating_point(tensor), tensor.dtype, src)
        _check_finite(raw_key, tensor, src)
    pairs, full_keys = _layout({k: (tuple(t.shape), t.dtype) for k, t in state.items()}, config, src)
    modules = {m: LoraModule(A=state[p.a_key], B=state[p.b_key], scale=p.spec.scale) for m, p in pairs.items()}
    full = {key: state[raw] for key, raw in full_keys.items()}
    return LoraAdapter(modules=modules, full_tensors=full, config=config, path=source, files=list(files or []))


def _read_tensors(path: Path, keys: list[str], shapes: list[tuple[int, ...]], src: Path) -> list[torch.Tensor]:
    """Read ``keys`` from a safetensors file, copied out of the file mapping (which is released on close),
    and check each has the shape the header declared when the adapter was opened and finite values."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            tensors = [fh.get_tensor(k).clone() for k in keys]
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise AdapterFormatError(
            f"{path}: cannot read tensor(s) {keys} ({exc}); the file was truncated or replaced after the adapter "
            "was opened: re-export the adapter and merge again"
        ) from exc
    for key, tensor, shape in zip(keys, tensors, shapes):
        if tuple(tensor.shape) != tuple(shape):
            raise AdapterFormatError(
                f"{path}: tensor {key!r} has shape {tuple(tensor.shape)} but had {tuple(shape)} when the adapter "
                "was opened; the file changed while merging"
            )
        _check_finite(key, tensor, src)
    return tensors


class LazyModules(Mapping[str, LoraModule]):
    """The LoRA modules of a safetensors adapter file, read on access.

    ``modules[m]`` opens the file, reads ``lora_A``/``lora_B`` of ``m`` (copies), closes it, checks the shapes
    against the header and the values for NaN/Inf, and returns a :class:`LoraModule`; nothing is cached, so
    only the modules a caller holds are in memory. ``in``, ``len``, iteration and :attr:`specs` use the header.
    """

    def __init__(self, path: Path, pairs: dict[str, _Pair], source: Path) -> None:
        self.path = path
        self.source = source
        self._pairs = pairs
        self.specs: dict[str, ModuleSpec] = {m: p.spec for m, p in pairs.items()}

    def __getitem__(self, module: str) -> LoraModule:
        pair = self._pairs[module]  # KeyError for an unknown module, as for a dict
        A, B = _read_tensors(self.path, [pair.a_key, pair.b_key], [pair.spec.a_shape, pair.spec.b_shape], self.source)
        return LoraModule(A=A, B=B, scale=pair.spec.scale)

    def __contains__(self, module: object) -> bool:
        return module in self._pairs

    def __iter__(self) -> Iterator[str]:
        return iter(self._pairs)

    def __len__(self) -> int:
        return len(self._pairs)

    def __repr__(self) -> str:
        return f"LazyModules({str(self.path)!r}, {len(self)} modules)"


class LazyTensors(Mapping[str, torch.Tensor]):
    """Full-tensor entries (``modules_to_save``) of a safetensors adapter file, read on access (like
    :class:`LazyModules`); :attr:`shapes` comes from the header."""

    def __init__(self, path: Path, keys: dict[str, str], shapes: dict[str, tuple[int, ...]], source: Path) -> None:
        self.path = path
        self.source = source
        self._keys = keys  # key -> raw key in the file
        self.shapes = shapes

    def __getitem__(self, key: str) -> torch.Tensor:
        return _read_tensors(self.path, [self._keys[key]], [self.shapes[key]], self.source)[0]

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"LazyTensors({str(self.path)!r}, {len(self)} tensors)"


def lazy_adapter_from_file(
    weights: Path, config: dict, source: Path | None = None, files: list[Path] | None = None
) -> LoraAdapter:
    """A :class:`LoraAdapter` over a safetensors file that reads tensors on access (see :class:`LazyModules`).

    Validated like :func:`adapter_from_state_dict` from the header (dtypes, keys, pairs, ranks); values are
    checked for NaN/Inf when each module is read.
    """
    src = source or weights
    config = parse_adapter_config(dict(config), src)
    header = _read_safetensors_header(weights)
    entries: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {}
    for raw_key, (shape, dname) in header.items():
        dtype = _TORCH_DTYPES.get(dname)
        _check_float(raw_key, dname.startswith(("F", "BF")), dtype or dname, src)
        entries[raw_key] = (shape, dtype)
    pairs, full_keys = _layout(entries, config, src)
    modules = LazyModules(weights, pairs, src)
    full = LazyTensors(weights, full_keys, {k: entries[raw][0] for k, raw in full_keys.items()}, src)
    return LoraAdapter(modules=modules, full_tensors=full, config=config, path=source, files=list(files or []))


def read_adapter(path: str | Path, *, allow_pickle: bool = False, lazy: bool = False) -> LoraAdapter:
    """Read a PEFT adapter folder, or a legacy ``.pt``/``.bin`` state dict (needs ``allow_pickle=True``).

    A folder must hold ``adapter_config.json`` and ``adapter_model.safetensors`` (or, with
    ``allow_pickle``, ``adapter_model.bin``). A single legacy file needs an ``adapter_config.json`` beside it,
    because rank and alpha (hence the scale) cannot be recovered from the tensors.

    ``lazy=True`` reads only the safetensors header now and each module when it is accessed (see
    :class:`LazyModules`); a legacy pickle cannot be read in parts and is loaded whole.
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
            if lazy:
                return lazy_adapter_from_file(weights, config, source=path, files=[config_path, weights])
            state = _read_safetensors(weights)
        else:
            legacy = next((path / n for n in LEGACY_WEIGHTS_NAMES if (path / n).is_file()), None)
            if legacy is None:
                raise AdapterFormatError(f"{path} has {CONFIG_NAME} but no {WEIGHTS_NAME}; the adapter is incomplete")
            weights = legacy
            state = _read_pickle(legacy, allow_pickle)
            if lazy:
                log.info("%s: a pickled state dict cannot be read module by module; loaded whole", legacy)
        return adapter_from_state_dict(state, config, source=path, files=[config_path, weights])
    # a single file
    header: dict | None = None
    if path.suffix == ".safetensors":
        if lazy:
            header = _read_safetensors_header(path)  # fails early on a truncated file, as the eager read does
        else:
            state = _read_safetensors(path)
    elif path.suffix in (".pt", ".pth", ".bin"):
        state = _read_pickle(path, allow_pickle)
        if lazy:
            log.info("%s: a pickled state dict cannot be read module by module; loaded whole", path)
    else:
        raise AdapterFormatError(f"{path}: expected a PEFT adapter folder, a .safetensors or a legacy .pt file")
    config_path = path.parent / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterFormatError(
            f"{path}: no {CONFIG_NAME} beside it; rank and lora_alpha (the LoRA scale) cannot be inferred from "
            "tensors. Put the training run's adapter_config.json in the same folder."
        )
    config = _read_config(config_path)
    if header is not None:
        return lazy_adapter_from_file(path, config, source=path, files=[config_path, path])
    return adapter_from_state_dict(state, config, source=path, files=[config_path, path])


# --------------------------------------------------------------------------------------------- writing
def adapter_state_dict(adapter: LoraAdapter, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """PEFT-format state dict (``base_model.model.<module>.lora_A.weight`` ...), contiguous tensors."""
    out: dict[str, torch.Tensor] = {}
    for module, lm in adapter.modules.items():
        for factor, tensor in (("A", lm.A), ("B", lm.B)):
            key = f"{PEFT_PREFIX}{module}.lora_{factor}.weight"
            out[key] = output_tensor(key, tensor, dtype)
        check_update_range(module, out[f"{PEFT_PREFIX}{module}.lora_A.weight"],
                           out[f"{PEFT_PREFIX}{module}.lora_B.weight"], lm.scale)
    for key, tensor in adapter.full_tensors.items():
        out[f"{PEFT_PREFIX}{key}"] = output_tensor(f"{PEFT_PREFIX}{key}", tensor, dtype)
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


def _merged_config(
    module_names: list[str],
    full_keys: list[str],
    rank: int,
    base_model_name_or_path: str | None,
    all_linear_names: list[str] | None,
    task_type: str | None,
):
    """The PEFT ``LoraConfig`` of a merged adapter: ``r = lora_alpha = rank`` (scale 1), no rank/alpha patterns.

    PEFT keeps ``target_modules`` as a set, which ``save_pretrained`` writes in the process's string-hash order;
    set-valued fields are replaced by sorted lists so the written adapter_config.json is reproducible.
    """
    from peft import LoraConfig

    modules_to_save = sorted({k.rsplit(".", 1)[0].rsplit(".", 1)[-1] for k in full_keys}) or None
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=target_modules_for(module_names, all_linear_names) if module_names else [],
        modules_to_save=modules_to_save,
        bias="none",
        lora_dropout=0.0,
        task_type=task_type,
        base_model_name_or_path=base_model_name_or_path,
        inference_mode=True,
    )
    for name, value in vars(config).items():
        if isinstance(value, (set, frozenset)):
            setattr(config, name, sorted(value))
    return config


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

    All modules must share one rank and scale 1 (what :class:`sstmerge.merge.compose.MemorySink`
    produces): the config is then ``r = lora_alpha = rank``, no rank/alpha patterns, which PEFT and vLLM
    load unchanged. Use :func:`sstmerge.io.atomic.atomic_output_dir` around this call. The whole state dict
    is built in memory; :class:`AdapterStreamWriter` writes the same bytes module by module.
    """
    folder = Path(folder)
    ranks = {m.rank for m in adapter.modules.values()}
    scales = {round(m.scale, 12) for m in adapter.modules.values()}
    if len(ranks) > 1 or scales - {1.0}:
        raise ValueError(f"write_adapter needs one rank and scale 1.0 for all modules, got ranks={ranks} scales={scales}")
    rank = ranks.pop() if ranks else 1
    config = _merged_config(list(adapter.modules), list(adapter.full_tensors), rank, base_model_name_or_path,
                            all_linear_names, task_type)
    config.save_pretrained(str(folder))
    save_file(adapter_state_dict(adapter, dtype), str(folder / WEIGHTS_NAME), metadata={"format": "pt"})


class AdapterStreamWriter:
    """Write a merged adapter (one rank ``R``, scale 1) into an existing (temporary) folder, module by module.

    ``adapter_config.json`` is written at once (as :func:`write_adapter` writes it), then
    ``adapter_model.safetensors`` by :class:`~sstmerge.io.safetensors_stream.SafetensorsStreamWriter` with
    every key declared up front: per module ``m`` of shape (d_out, d_in),
    ``base_model.model.<m>.lora_A.weight`` (R, d_in) and ``base_model.model.<m>.lora_B.weight`` (d_out, R);
    per full tensor ``base_model.model.<key>``; all in ``dtype``. Given the same tensors the files are
    byte-identical to :func:`write_adapter`'s, but only the tensors passed to one call are in memory.

    >>> with AdapterStreamWriter(tmp, {"model.layers.0.self_attn.q_proj": (64, 64)}, rank=8) as w:  # doctest: +SKIP
    ...     w.write_module("model.layers.0.self_attn.q_proj", A, B)  # A (8, 64), B (64, 8)

    Every declared module and full tensor must be written exactly once before the block ends.
    """

    def __init__(
        self,
        folder: str | Path,
        module_shapes: Mapping[str, tuple[int, int]],
        rank: int,
        full_shapes: Mapping[str, tuple[int, ...]] | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        base_model_name_or_path: str | None = None,
        all_linear_names: list[str] | None = None,
        task_type: str | None = "CAUSAL_LM",
    ) -> None:
        folder = Path(folder)
        full_shapes = dict(full_shapes or {})
        if module_shapes and rank < 1:
            raise ValueError(f"merged rank must be positive, got {rank}")
        self.rank, self.dtype = rank, dtype
        config = _merged_config(list(module_shapes), list(full_shapes), rank if module_shapes else 1,
                                base_model_name_or_path, all_linear_names, task_type)
        config.save_pretrained(str(folder))
        specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for module, (d_out, d_in) in module_shapes.items():
            specs[f"{PEFT_PREFIX}{module}.lora_A.weight"] = (dtype, (rank, d_in))
            specs[f"{PEFT_PREFIX}{module}.lora_B.weight"] = (dtype, (d_out, rank))
        for key, shape in full_shapes.items():
            specs[f"{PEFT_PREFIX}{key}"] = (dtype, tuple(shape))
        self.path = folder / WEIGHTS_NAME
        self._file = SafetensorsStreamWriter(self.path, specs, metadata={"format": "pt"})

    def write_module(self, module: str, A: torch.Tensor, B: torch.Tensor) -> None:
        """Write one module's factors, A (R, d_in) and B (d_out, R), cast to the output dtype (checked finite,
        and their product too: :func:`check_update_range`)."""
        A_out = output_tensor(f"{PEFT_PREFIX}{module}.lora_A.weight", A, self.dtype)
        B_out = output_tensor(f"{PEFT_PREFIX}{module}.lora_B.weight", B, self.dtype)
        check_update_range(module, A_out, B_out)
        self._file.write(f"{PEFT_PREFIX}{module}.lora_A.weight", A_out)
        self._file.write(f"{PEFT_PREFIX}{module}.lora_B.weight", B_out)

    def write_full(self, key: str, tensor: torch.Tensor) -> None:
        """Write one full-tensor entry (``modules_to_save``), cast to the output dtype (checked finite)."""
        self._file.write(f"{PEFT_PREFIX}{key}", output_tensor(f"{PEFT_PREFIX}{key}", tensor, self.dtype))

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> AdapterStreamWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._file.__exit__(exc_type, exc, tb)
