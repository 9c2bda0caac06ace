"""Run under ``torchrun`` by tests/test_fisher_sketch.py: the sketch Fisher pass and the weighted backward pass
``Gᵀβ`` sharded over the processes; rank 0 saves the result.

    torchrun --nproc-per-node 2 tests/dist_weighted_pass.py BASE UTILITY SAFETY CACHE OUT.safetensors
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from safetensors.torch import save_file

from sstmerge import read_adapter
from sstmerge.fisher.distributed import init_from_env, shutdown
from sstmerge.fisher.run import FisherSettings, compute_fisher
from sstmerge.io.models import load_base_info


def main(base: str, utility: str, safety: str, cache: str, out: str) -> None:
    torch.set_num_threads(1)
    dist = init_from_env("cpu")
    try:
        settings = FisherSettings(max_samples=5, batch_size=2, store="sketch", sketch_dim=64, checkpoint_every=2)
        run = compute_fisher(load_base_info(base), [read_adapter(utility)], [1.0], read_adapter(safety), settings,
                             cache, dist=dist)
        betas = {m: np.linspace(-1.0, 1.0, 10) * (j + 1) for j, m in enumerate(run.stats.modules)}
        result = run.combine(betas)
        if dist.is_main:
            save_file({m: t.contiguous() for m, t in result.items()}, out)
    finally:
        shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:6])
