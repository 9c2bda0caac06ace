"""One progress bar for a whole experiment run, with an ETA for all of it (not per stage or per batch).

The run's tasks (each adapter trained, each merge, each model evaluated, per seed) are known up front, each
with a *prior*: its expected seconds on the reference machine (SmolLM2, 2 CPU cores; the constants below,
measured there). As tasks finish, each kind's priors are rescaled by what that kind actually took in this
run (``measured / prior`` over the tasks of the kind that ran), and kinds not yet seen by the ratio over every
task that ran, so the ETA adapts to the machine and the model within the first task of each kind:

    ETA = Σ_remaining prior_t · rate(kind_t),   rate(k) = Σ_ran,k seconds / Σ_ran,k prior   (or the overall ratio)

Tasks found on disk (a trained adapter, a merge, cached evaluations) finish at once and are left out of the
rates.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from tqdm.auto import tqdm

from .._logging import quiet

log = logging.getLogger(__name__)

#: seconds per training token slot (steps · batch_size · max_length): here 2.3e-3 (A7), 2.9e-3 (A5), 3.1e-3 (A6)
TRAIN_SECONDS_PER_TOKEN = 2.6e-3
#: seconds per merge (quick run here: residual with its Fisher pass 40 s, TIES over dense updates 41 s, direct
#: and complement 2 s); a variant's Fisher statistics are shared by its merges, so the first one pays for them
MERGE_SECONDS = {"fisher": 30.0, "dense": 40.0, "plain": 2.0}
#: seconds per evaluation item (bench_eval, cached engine: 0.19 on the whole default sets, 0.25 at the quick limits)
EVAL_SECONDS_PER_ITEM = 0.2


@dataclass
class Task:
    kind: str  # train | merge | eval
    name: str
    prior: float  # expected seconds on the reference machine
    seconds: float | None = None  # measured; None while pending, 0 for reused work
    reused: bool = False


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class RunProgress:
    """``plan(kind, name, prior)`` every task first, then ``with progress.task(kind, name) as t: ...`` around
    each (``t.reused = True`` when it was found on disk). The bar's length is the sum of the priors."""

    def __init__(self, desc: str = "experiment run") -> None:
        self.tasks: dict[tuple[str, str], Task] = {}
        self.desc = desc
        self.bar = None

    def plan(self, kind: str, name: str, prior: float) -> None:
        self.tasks[(kind, name)] = Task(kind, name, max(float(prior), 1e-3))

    def rate(self, kind: str) -> float:
        """Measured seconds per prior second for ``kind`` (all kinds while it has none; 1 before any)."""
        ran = [t for t in self.tasks.values() if t.seconds is not None and not t.reused]
        own = [t for t in ran if t.kind == kind] or ran
        return sum(t.seconds for t in own) / sum(t.prior for t in own) if own else 1.0

    def eta(self) -> float:
        return sum(t.prior * self.rate(t.kind) for t in self.tasks.values() if t.seconds is None)

    def _open(self) -> None:
        if self.bar is None:
            total = sum(t.prior for t in self.tasks.values())
            self.bar = tqdm(total=total, desc=self.desc, disable=quiet(),  # "..|███  | 03:40, 2/17 tasks, train A7, ETA 0:18:36"
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}{postfix}")

    def _show(self, current: str) -> None:
        done = sum(t.prior for t in self.tasks.values() if t.seconds is not None)
        n_done = sum(t.seconds is not None for t in self.tasks.values())
        self.bar.n = done
        self.bar.set_postfix_str(f"{n_done}/{len(self.tasks)} tasks, {current}, ETA {_clock(self.eta())}", refresh=True)

    def task(self, kind: str, name: str) -> _Running:
        self._open()
        if (kind, name) not in self.tasks:  # unplanned work still counts (prior: the kind's mean)
            same = [t.prior for t in self.tasks.values() if t.kind == kind]
            self.plan(kind, name, sum(same) / len(same) if same else 1.0)
        return _Running(self, self.tasks[(kind, name)])

    def close(self) -> None:
        if self.bar is not None:
            self._show("done")
            self.bar.close()
        ran = [t for t in self.tasks.values() if t.seconds is not None and not t.reused]
        if ran:
            log.info("run: %d tasks ran in %s (%d reused)", len(ran), _clock(sum(t.seconds for t in ran)),
                     sum(t.reused for t in self.tasks.values()))


class _Running:
    def __init__(self, progress: RunProgress, task: Task) -> None:
        self.progress, self.task = progress, task
        self.reused = False

    def __enter__(self) -> _Running:
        self.t0 = time.perf_counter()
        self.progress._show(f"{self.task.kind} {self.task.name}")
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            return
        self.task.reused = self.reused
        self.task.seconds = 0.0 if self.reused else time.perf_counter() - self.t0
        self.progress._show(f"{self.task.kind} {self.task.name}")
