"""Evaluate an adapter by folding it into the base weights: ``W ← W + s·B A`` once, then decode the plain model.

Generating through PEFT runs, at every decoding step and for every target module, the LoRA pair
``s·B(A x)`` next to ``W x`` plus PEFT's Python dispatch; folded, each step is the plain model. The base
model is loaded once per process (:func:`base_model`) and reused across evaluations: :class:`FoldedAdapter`
keeps a copy of every weight it changes and puts the copies back when it is removed, so the base weights
are restored exactly (bit for bit), not by subtracting ΔW again.

Full-tensor entries (``modules_to_save``) replace the base tensor, as PEFT does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import AdapterMismatchError
from ..io.adapter import LoraAdapter

log = logging.getLogger(__name__)

_BASE: dict[tuple, tuple] = {}  # (path, device, dtype) -> (model, tokenizer); one entry: the last base used


def base_model(path: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` of the base at ``path``, loaded once per process and reused (the last one only,
    so a process that moves on to another base frees the previous one). Callers must leave its weights as
    they found them (:class:`FoldedAdapter` does)."""
    from ..io.models import load_causal_lm

    key = (str(Path(path).resolve()), device, str(dtype))
    if key not in _BASE:
        _BASE.clear()
        _BASE[key] = load_causal_lm(str(path), device=device, dtype=dtype)
    return _BASE[key]


def forget_base_models() -> None:
    """Drop the process's cached base model (tests; a caller that changed the weights on purpose)."""
    _BASE.clear()


class FoldedAdapter:
    """An adapter added into a model's weights; :meth:`remove` restores the saved originals exactly.

    ``with FoldedAdapter(model, adapter):`` folds on entry and restores on exit (also on errors);
    :meth:`unfolded` temporarily restores the base weights (for judges that must see the base model).
    """

    def __init__(self, model, adapter: LoraAdapter) -> None:
        self.model, self.adapter = model, adapter
        self._saved: dict[str, torch.Tensor] = {}  # parameter name -> the base value (one copy, on its device)
        self.active = False

    def _param(self, name: str) -> torch.nn.Parameter:
        try:
            return self.model.get_parameter(name)
        except AttributeError:
            raise AdapterMismatchError(f"{self.adapter.name}: the model has no parameter {name}") from None

    @torch.no_grad()
    def apply(self) -> FoldedAdapter:
        """``W_m ← W_m + s_m·B_m A_m`` (ΔW in float32, added in float32, stored in the weight's dtype) for every
        LoRA module, and ``W ← W_adapter`` for every full tensor."""
        if self.active:
            return self
        try:
            self._fold()
        except BaseException:
            self.remove()  # a half-folded model is never left behind (the base is shared by the process)
            raise
        self.active = True
        return self

    def _fold(self) -> None:
        for module, lm in self.adapter.modules.items():
            name = f"{module}.weight"
            weight = self._param(name)
            if tuple(weight.shape) != lm.shape:
                raise AdapterMismatchError(f"{self.adapter.name}: {module} updates a {lm.shape} weight, the "
                                           f"model's is {tuple(weight.shape)}")
            original = self._saved.setdefault(name, weight.detach().clone())
            delta = lm.delta(torch.float32).to(weight.device)  # (d_out, d_in)
            weight.copy_((original.float() + delta).to(weight.dtype))
        for key, tensor in self.adapter.full_tensors.items():
            param = self._param(key)
            self._saved.setdefault(key, param.detach().clone())
            param.copy_(tensor.to(device=param.device, dtype=param.dtype))

    @torch.no_grad()
    def remove(self) -> None:
        """Put every changed weight back from its saved copy (exact)."""
        for name, original in self._saved.items():
            self._param(name).copy_(original)
        self.active = False

    @contextmanager
    def unfolded(self) -> Iterator[None]:
        """The base weights inside the block, the folded ones again after it."""
        was = self.active
        self.remove()
        try:
            yield
        finally:
            if was:
                self.apply()

    def __enter__(self) -> FoldedAdapter:
        return self.apply()

    def __exit__(self, *exc) -> None:
        self.remove()
