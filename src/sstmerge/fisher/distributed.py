"""Multi-process Fisher on torch's own distributed runtime (``torchrun``), and no-ops for one process.

``torchrun --nproc-per-node N sst-merge fisher ...`` starts N processes with ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK`` set; :func:`init_from_env` joins the process group (NCCL when CUDA is available, one GPU per
process = ``cuda:LOCAL_RANK``; gloo on CPU). The pass then splits as follows (see :mod:`sstmerge.fisher.run`):

1. examples are sharded round-robin (row i goes to rank ``i mod N``); each rank writes its rows of the
   shared gradient store (positioned writes to disjoint rows);
2. barrier; modules are sharded round-robin; each rank computes its modules' statistics from all rows;
3. ``all_reduce(SUM)`` of the partial ``Σ_m gram[m]`` and ``G_phi`` (each rank contributes its modules,
   zeros elsewhere), and rank 0 writes the summary.

All ranks must see the same cache folder: one machine, or a shared filesystem across machines.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def all_reduce_sum(self, array: np.ndarray) -> np.ndarray:
        """Element-wise sum of ``array`` over ranks (float64), on the process group's device."""
        if not self.active:
            return array
        t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64)).to(self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
        return t.cpu().numpy()

    def all_reduce_max(self, value: int) -> int:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())


def init_from_env(device: str = "auto") -> Dist:
    """Join the ``torchrun`` process group if ``WORLD_SIZE`` > 1 (idempotent), else a single-process Dist.

    ``device``: ``auto`` (cuda:LOCAL_RANK when CUDA is available, else cpu), ``cpu`` or ``cuda``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = f"cuda:{local_rank}" if use_cuda else "cpu"
    if world <= 1:
        return Dist(0, 1, dev if use_cuda else "cpu")
    if not torch.distributed.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group(backend=backend)
        log.info("joined process group: rank %d of %d (%s, %s)", torch.distributed.get_rank(), world, backend, dev)
    return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(), dev)


def shutdown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
