"""The folders are the architecture (DEVELOPERS.md): each package imports only the layers below it.

Read from the source with ``ast`` (every ``import`` and ``from ... import``, at module level or inside a
function), so a lazy import cannot hide a dependency. A new edge is either a design change (update ``ALLOWED``
and DEVELOPERS.md together) or a mistake.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "sstmerge"

BASE = {"errors", "registry", "_logging", "provenance", "__version__"}  # leaves anything may use

# package -> the sstmerge packages it may import (besides BASE and itself)
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "registry": set(),
    "_logging": set(),
    "provenance": set(),
    "linalg": set(),  # pure tensor math
    "data": set(),
    "io": {"data"},
    "fisher": {"linalg", "io", "data"},
    "merge": {"fisher", "linalg", "io", "data"},
    "eval": {"io", "data"},
    "train": {"io", "data"},
    "pipeline": {"train", "merge", "eval", "fisher", "linalg", "io", "data"},
    "cli": {"pipeline", "train", "merge", "eval", "fisher", "linalg", "io", "data"},
    "__init__": {"io", "merge"},  # the public API re-exports
}

# (importing module, imported module) pairs that cross the layers on purpose, each with its reason
EXCEPTIONS: dict[tuple[str, str], str] = {
    ("sstmerge.train.sft", "sstmerge.eval.judges"):
        "the refusal-unlikelihood term finds the training answers that refuse with the evaluation's keyword "
        "judge, so that training and evaluation mean the same thing by a refusal",
    ("sstmerge.data.make_bundled", "sstmerge.eval.data"):
        "the generator of the bundled files reads the training-only jailbreak templates with the evaluation's "
        "template loader (one template format)",
}


def _module_name(path: Path, src: Path = SRC) -> str:
    parts = ("sstmerge",) + path.relative_to(src).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, src: Path = SRC) -> set[str]:
    """Every sstmerge module ``path`` imports, as dotted names (``from . import x`` gives ``package.x``)."""
    module = _module_name(path, src)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "sstmerge"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "sstmerge":
                continue
            for alias in node.names:  # `from pkg import mod` imports the module pkg.mod; `from mod import f`, mod
                name = f"{target}.{alias.name}"
                found.add(name if target == "sstmerge" or _is_module(name, src) else target)
    return found


def _is_module(dotted: str, src: Path) -> bool:
    """Whether ``sstmerge.a.b`` names a module or package under ``src`` (rather than a name inside one)."""
    path = src.joinpath(*dotted.split(".")[1:])
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _edges() -> list[tuple[str, str]]:
    return sorted((_module_name(f), target) for f in SRC.rglob("*.py") for target in _imports(f))


def test_every_package_has_a_layer():
    packages = {_layer(_module_name(f)) for f in SRC.rglob("*.py")}
    assert packages <= set(ALLOWED), f"add {sorted(packages - set(ALLOWED))} to ALLOWED (and DEVELOPERS.md)"


def test_packages_import_only_the_layers_below():
    wrong = [f"{src} imports {dst}" for src, dst in _edges()
             if _layer(dst) != _layer(src) and _layer(dst) not in BASE
             and _layer(dst) not in ALLOWED[_layer(src)] and (src, dst) not in EXCEPTIONS]
    assert not wrong, "imports that cross the layers:\n" + "\n".join(wrong)


def test_the_exceptions_are_still_needed():
    """An exception that no import uses any more is removed, so the list says what the code does."""
    edges = set(_edges())
    assert not [pair for pair in EXCEPTIONS if pair not in edges]


def test_the_layers_have_no_cycle():
    graph = {pkg: {d for d in deps if d in ALLOWED} for pkg, deps in ALLOWED.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        if state.get(node) == 1:
            raise AssertionError(f"cycle: {' -> '.join(path + [node])}")
        if state.get(node) == 2:
            return
        state[node] = 1
        for dep in graph[node]:
            visit(dep, path + [node])
        state[node] = 2

    for pkg in graph:
        visit(pkg, [])


@pytest.mark.parametrize("source, expected", [
    ("from ..eval.judges import KeywordRefusalJudge\n", {"sstmerge.eval.judges"}),
    ("def f():\n    from ..eval import judges\n", {"sstmerge.eval.judges"}),  # lazy, inside a function
    ("from . import lowrank\n", {"sstmerge.linalg.lowrank"}),
    ("from .eigen import solve\n", {"sstmerge.linalg.eigen"}),
    ("import sstmerge.fisher.point as p\n", {"sstmerge.fisher.point"}),
    ("from sstmerge import __version__\n", {"sstmerge.__version__"}),  # the top package's names are their own layer
    ("from ..eval import data, nothing_here\n", {"sstmerge.eval"}),  # no module: the package itself
    ("from sstmerge.io.adapter import load\n", {"sstmerge.io.adapter"}),
    ("import numpy\nfrom typing import Any\n", set()),
])
def test_the_import_reader_resolves_relative_and_lazy_imports(tmp_path, source, expected):
    """The reader itself, on a file placed as ``sstmerge/linalg/x.py``: a checker that saw nothing would pass."""
    for module in ("linalg/lowrank.py", "linalg/eigen.py", "eval/judges.py", "eval/__init__.py"):
        (tmp_path / module).parent.mkdir(exist_ok=True)
        (tmp_path / module).touch()
    file = tmp_path / "linalg" / "x.py"
    file.write_text(source)
    assert _imports(file, src=tmp_path) == expected


def test_a_crossing_import_is_reported(monkeypatch):
    """The check fails on an edge ALLOWED does not hold: io's import of data, once io may import nothing."""
    monkeypatch.setitem(ALLOWED, "io", set())
    with pytest.raises(AssertionError, match=r"sstmerge\.io\.\S+ imports sstmerge\.data"):
        test_packages_import_only_the_layers_below()
