"""Write the golden merge outputs that ``tests/test_golden_methods.py`` compares against.

Run once, from the repository root, with the code whose outputs are the reference::

    python tests/golden/make_golden.py

It builds the inputs (a tiny random Llama with its tokenizer, two utility adapters, one safety adapter)
into ``tests/golden/inputs/`` and merges them with every registered method into ``tests/golden/outputs/
<method>/`` (adapter files only, plus ``options.json``). The inputs are committed too, so the comparison does
not depend on how a later transformers or PEFT version initialises a model. Generated on 2026-11-30 from
the code before the merge-pipeline refactor (issue #12), torch 2.13.0 CPU.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests.conftest

#: options per method (beyond the common ones): every method's own parameters away from their defaults
#: where that exercises more code
METHOD_OPTIONS: dict[str, dict] = {
    "direct": {"safety_weight": 0.8, "utility_weights": [1.0, 0.5]},
    # the Fisher modes were written with the factor blend of the code of the time (blend: factors since #13)
    "residual": {"residual_ratio": 0.6, "k": 3, "blend": "factors"},
    "layerwise": {"preset": "balanced", "k": 3, "blend": "factors"},
    "fisher_mask": {"residual_ratio": 0.5, "k": 50, "blend": "factors"},
    "ties": {"density": 0.6},
    "dare_linear": {"density": 0.7, "seed": 3},
    "dare_ties": {"density": 0.7, "seed": 3},
    "magnitude": {"density": 0.5},
    "safe_lora": {"similarity_threshold": 0.9},
    "safemerge": {"similarity_threshold": 0.9, "safemerge_alpha": 0.4},
}
#: the Fisher settings of the subspace modes (small: the tiny model, a few examples)
FISHER = {"max_samples": 4, "fisher_batch_size": 4}


def build_inputs(root: Path) -> None:
    from sstmerge.io.models import build_tiny_llama
    from tests.conftest import TINY_TARGETS, make_adapter

    if root.exists():
        shutil.rmtree(root)
    base = build_tiny_llama(root / "base", seed=0)
    make_adapter(base, root / "U1", seed=101, targets=TINY_TARGETS, r=4, alpha=8)
    make_adapter(base, root / "U2", seed=102, targets=("q_proj", "v_proj", "down_proj"), r=2, alpha=4)
    make_adapter(base, root / "S", seed=103, targets=TINY_TARGETS, r=4, alpha=8)
    for name in ("U1", "U2", "S"):  # record a relative base name: the folder moves with the repository
        cfg_path = root / name / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = "base"
        cfg_path.write_text(json.dumps(cfg, indent=2))


def merge_all(inputs: Path, outputs: Path, cache: Path) -> None:
    from sstmerge import merge_utility_safety
    from sstmerge.merge.methods import METHODS

    missing = set(METHODS.names()) - set(METHOD_OPTIONS)
    assert not missing, f"add golden options for {sorted(missing)}"
    if outputs.exists():
        shutil.rmtree(outputs)
    outputs.mkdir(parents=True)
    for method, extra in METHOD_OPTIONS.items():
        fisher = FISHER if method in ("residual", "layerwise", "fisher_mask") else {}  # the Fisher methods only
        options = {"mode": method, **fisher, **extra}
        tmp = cache / "out" / method
        merge_utility_safety(inputs / "base", [inputs / "U1", inputs / "U2"], inputs / "S", tmp, cache_dir=cache,
                             stream=True, **options)
        (outputs / method).mkdir()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy(tmp / name, outputs / method / name)
        (outputs / method / "options.json").write_text(json.dumps(options, indent=1, sort_keys=True) + "\n")
        print(f"{method}: {(outputs / method / 'adapter_model.safetensors').stat().st_size} bytes")


if __name__ == "__main__":
    import tempfile

    import torch

    torch.set_num_threads(2)
    build_inputs(HERE / "inputs")
    with tempfile.TemporaryDirectory() as tmp:
        merge_all(HERE / "inputs", HERE / "outputs", Path(tmp))
