"""The whole run's progress bar: its ETA from priors rescaled by what each kind of task took (pipeline.progress)."""

from __future__ import annotations

import pytest

from sstmerge.pipeline import stages
from sstmerge.pipeline.experiments import load_experiment_config, run_experiments
from sstmerge.pipeline.progress import RunProgress

from .test_experiments import _tiny_overrides


def _finish(progress: RunProgress, kind: str, name: str, seconds: float, reused: bool = False) -> None:
    task = progress.tasks[(kind, name)]
    task.seconds, task.reused = (0.0 if reused else seconds), reused


def test_eta_rescales_each_kind_by_what_it_took():
    p = RunProgress()
    p.plan("train", "A", 10)
    p.plan("train", "B", 30)
    p.plan("eval", "x", 5)
    p.plan("eval", "y", 5)
    assert p.eta() == pytest.approx(50)  # nothing measured: the priors
    _finish(p, "train", "A", 20)  # training runs 2x its prior; evaluation not seen yet: the overall ratio (2x)
    assert p.eta() == pytest.approx(30 * 2 + 10 * 2)
    _finish(p, "eval", "x", 1)  # evaluation runs at 0.2x its prior
    assert p.eta() == pytest.approx(30 * 2 + 5 * 0.2)
    _finish(p, "train", "B", 0, reused=True)  # found on disk: done, and not part of any rate
    assert p.rate("train") == pytest.approx(2) and p.eta() == pytest.approx(1)
    _finish(p, "eval", "y", 1)
    assert p.eta() == 0


def test_a_failed_task_stays_pending_and_unplanned_work_still_counts():
    p = RunProgress()
    p.plan("merge", "m", 4)
    with pytest.raises(RuntimeError):
        with p.task("merge", "m"):
            raise RuntimeError("boom")
    assert p.tasks[("merge", "m")].seconds is None and p.eta() == pytest.approx(4)
    with p.task("merge", "extra") as t:  # not planned: its prior is the kind's mean
        t.reused = True
    assert p.tasks[("merge", "extra")].prior == pytest.approx(4) and p.tasks[("merge", "extra")].reused
    p.close()


def test_the_grid_plans_exactly_the_tasks_it_runs(tiny_base, tmp_path, monkeypatch):
    seen: list[RunProgress] = []

    class Recording(RunProgress):
        def __init__(self, *a, **k) -> None:
            super().__init__(*a, **k)
            seen.append(self)

    monkeypatch.setattr(stages, "RunProgress", Recording)
    grid = [{"name": "direct", "mode": "direct", "variants": ["A5+A6+A7"]},
            {"name": "residual", "mode": "residual", "variants": ["A5+A6+A7"], "options": {"residual_ratio": 0.7}}]
    over = _tiny_overrides(tiny_base, tmp_path, grid) | {"seeds": [0, 1]}
    over["eval"]["suites"] = ["jailbreak", "arithmetic"]
    cfg = load_experiment_config("default", overrides=over)
    run_experiments(cfg, tmp_path / "out")
    run = seen[-1]
    kinds = sorted(k for k, _ in run.tasks)
    # 3 adapters and 2 merges per seed; base once + 3 adapters alone + 2 merges per seed
    assert kinds.count("train") == 6 and kinds.count("merge") == 4 and kinds.count("eval") == 1 + 2 * 5
    assert all(t.seconds is not None and not t.reused for t in run.tasks.values())  # every planned task ran
    assert run.tasks[("eval", "base")].prior == pytest.approx((2 * 2 + 2) * stages.EVAL_SECONDS_PER_ITEM)
    run_experiments(cfg, tmp_path / "out")  # resumed: every task found on disk
    assert len(seen[-1].tasks) == len(run.tasks) and all(t.reused for t in seen[-1].tasks.values())
