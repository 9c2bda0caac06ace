"""Validate adapters against the base model (and each other) before any compute."""

from __future__ import annotations

import difflib
import logging
from pathlib import Path

from ..errors import AdapterMismatchError
from .adapter import LoraAdapter
from .models import ALIAS_EQUIVALENTS, BaseModelInfo

log = logging.getLogger(__name__)


def _same_base(recorded: str, base: BaseModelInfo) -> bool:
    """Whether an adapter's recorded ``base_model_name_or_path`` names ``base``: its spec, folder, folder name or
    hub id, an alias on either side counting as the names it stands for (an adapter trained with ``--base
    smollm2`` records the alias; a merge may name the converted folder)."""
    rec = recorded.rstrip("/").lower()
    recs = {rec} | ALIAS_EQUIVALENTS.get(rec, set())
    names = {base.spec.rstrip("/").lower(), str(base.path).rstrip("/").lower(), base.path.name.lower()}
    names |= ALIAS_EQUIVALENTS.get(base.spec.lower(), set())
    hub = str(base.config.get("_name_or_path") or base.config.get("name_or_path") or "").lower()
    if hub:
        names.add(hub)
    leaves = {Path(n).name for n in names if n}
    return any(r in names or Path(r).name in leaves for r in recs)


def validate_against_base(adapter: LoraAdapter, base: BaseModelInfo) -> list[str]:
    """Check every module/full tensor of ``adapter`` exists in ``base`` with matching shapes.

    Raises :class:`AdapterMismatchError` naming the adapter, module and shapes. Returns warnings (e.g. the
    adapter records a different ``base_model_name_or_path``), which are also logged.
    """
    warnings: list[str] = []
    for module, spec in adapter.specs.items():  # header facts only: a lazy adapter is not read here
        if module not in base.linear_shapes:
            close = difflib.get_close_matches(module, list(base.linear_shapes), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise AdapterMismatchError(
                f"{adapter.name}: module {module!r} does not exist as a Linear layer in base {base.spec!r}.{hint} "
                "Was the adapter trained on another model?"
            )
        expected = base.linear_shapes[module]
        if spec.shape != expected:
            raise AdapterMismatchError(
                f"{adapter.name}: module {module!r} updates a {spec.shape[0]}x{spec.shape[1]} weight "
                f"(lora_B {spec.b_shape}, lora_A {spec.a_shape}) but base {base.spec!r} has "
                f"{expected[0]}x{expected[1]}; the adapter belongs to another model size"
            )
    for key, shape in adapter.full_shapes.items():
        if key not in base.param_shapes:
            raise AdapterMismatchError(f"{adapter.name}: full tensor {key!r} (modules_to_save) is not a parameter of base {base.spec!r}")
        if shape != base.param_shapes[key]:
            raise AdapterMismatchError(
                f"{adapter.name}: full tensor {key!r} has shape {shape}, base has {base.param_shapes[key]}"
            )
    recorded = adapter.base_model_name_or_path
    if recorded and not _same_base(recorded, base):
        msg = (
            f"{adapter.name} records base_model_name_or_path={recorded!r} but the base is {base.spec!r}; "
            "shapes match, so merging proceeds, but check that this is the model it was trained on"
        )
        log.warning(msg)
        warnings.append(msg)
    return warnings


def validate_consistent(adapters: list[LoraAdapter]) -> None:
    """Without a base: a module present in several adapters must update the same weight shape in all of them."""
    seen: dict[str, tuple[tuple[int, int], str]] = {}
    for adapter in adapters:
        for module, spec in adapter.specs.items():
            if module in seen and seen[module][0] != spec.shape:
                raise AdapterMismatchError(
                    f"module {module!r} is {seen[module][0]} in {seen[module][1]} but {spec.shape} in {adapter.name}; "
                    "the adapters were trained on different models"
                )
            seen.setdefault(module, (spec.shape, adapter.name))
