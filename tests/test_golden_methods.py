"""Every merge method reproduces the output it gave before the merge-pipeline refactor (issue #12).

The golden inputs and outputs under ``tests/golden/`` were written once by ``tests/golden/make_golden.py``
from the earlier code. Methods that do not run the model and apply no LAPACK factorisation to the update
(direct, ties, dare_*, magnitude, safemerge) must give the same bytes. Two kinds are compared to float
tolerance (rtol 1e-5): the Fisher-subspace modes (residual, layerwise, fisher_mask) run the model's
forward/backward, whose float32 summation order may differ between library versions; safe_lora projects the
utility update onto a basis of ΔW_S's column space from a LAPACK factorisation, whose float32 rounding differs
between CPUs (3e-8 relative, measured on another machine of this workplace than the one that wrote the
golden).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sstmerge import merge_utility_safety

GOLDEN = Path(__file__).resolve().parent / "golden"
METHODS = sorted(p.name for p in (GOLDEN / "outputs").iterdir() if p.is_dir())
FISHER_MODES = {"residual", "layerwise", "fisher_mask"}
TOLERANT = FISHER_MODES | {"safe_lora"}  # compared to float tolerance (module docstring)


def test_golden_covers_the_methods_of_the_time():
    assert set(METHODS) >= {"direct", "residual", "layerwise", "fisher_mask", "ties", "dare_linear", "dare_ties",
                            "magnitude", "safe_lora", "safemerge"}


def _config(path: Path) -> dict:
    config = json.loads(path.read_text())
    config.pop("base_model_name_or_path", None)  # an absolute path of the machine that wrote it
    return config


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("stream", [True, False])
def test_method_reproduces_its_golden_output(method, stream, tmp_path):
    inputs, golden = GOLDEN / "inputs", GOLDEN / "outputs" / method
    options = json.loads((golden / "options.json").read_text())
    out = tmp_path / "m"
    merge_utility_safety(inputs / "base", [inputs / "U1", inputs / "U2"], inputs / "S", out, cache_dir=tmp_path / "c",
                         stream=stream, **options)
    assert _config(out / "adapter_config.json") == _config(golden / "adapter_config.json")
    if method not in TOLERANT:
        assert (out / "adapter_model.safetensors").read_bytes() == (golden / "adapter_model.safetensors").read_bytes()
        return
    got, want = load_file(out / "adapter_model.safetensors"), load_file(golden / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-7)
