"""Fault injection for the reliability tests: run ``sst-merge`` commands in child processes that are killed,
terminated, paused or size-limited at chosen points.

Usage: ``python tests/fault_runner.py PLAN.json RESULTS.json``. The plan is a list of *steps*; a step is a
list of *runs* started together (concurrent writers) and waited for before the next step. A run is::

    {"argv": [...sst-merge arguments...], "cwd": "...",
     "fault": {"target": "sstmerge.io.adapter:AdapterStreamWriter.write_module", "after": 3,
               "action": "KILL" | "TERM" | "SLEEP:2.0"},          # optional
     "fsize_limit": 8192,                                         # optional: RLIMIT_FSIZE in bytes
     "delay": 0.5}                                                # optional: start this run later (s)

The runner imports sstmerge (torch, transformers, peft) once and forks one child per run, so a scenario
costs milliseconds instead of a fresh interpreter's import time. The parent does no torch work before
forking (no thread pools exist yet), and each child sets one torch thread. ``after: n`` fires the action
at the n-th call of the target (1-based), *before* the call runs. Results: per run, the exit code (or
``-signal``), stdout and stderr.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import select
import signal
import sys
import time


def _patch(target: str, after: int, action: str) -> None:
    module_name, attr_path = target.split(":")
    owner = importlib.import_module(module_name)
    *parents, name = attr_path.split(".")
    for p in parents:
        owner = getattr(owner, p)
    original = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == after:
            if action == "KILL":
                os.kill(os.getpid(), signal.SIGKILL)
            elif action == "TERM":
                os.kill(os.getpid(), signal.SIGTERM)  # the handler raises at the next bytecode
            elif action.startswith("SLEEP:"):
                time.sleep(float(action.split(":", 1)[1]))
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def _child(run: dict, out_w: int, err_w: int) -> None:
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    code = 1
    try:
        import torch

        torch.set_num_threads(1)
        if run.get("cwd"):
            os.chdir(run["cwd"])
        if run.get("fault"):
            f = run["fault"]
            _patch(f["target"], int(f["after"]), f["action"])
        if run.get("fsize_limit"):
            resource.setrlimit(resource.RLIMIT_FSIZE, (int(run["fsize_limit"]),) * 2)
        from sstmerge.cli.main import main

        try:
            main(list(run["argv"]))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - report anything, never return into the parent's code
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _start(run: dict) -> dict:
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(out_r)
        os.close(err_r)
        _child(run, out_w, err_w)
    os.close(out_w)
    os.close(err_w)
    return {"pid": pid, "fds": {out_r: "stdout", err_r: "stderr"}, "buf": {"stdout": b"", "stderr": b""}}


def run_step(runs: list[dict]) -> list[dict]:
    t0 = time.monotonic()
    started: list[dict | None] = [None] * len(runs)
    while any(s is None for s in started):
        for i, run in enumerate(runs):
            if started[i] is None and time.monotonic() - t0 >= float(run.get("delay", 0)):
                started[i] = _start(run)
        time.sleep(0.01)
    open_fds = {fd: s for s in started for fd in s["fds"]}
    while open_fds:  # drain the pipes while the children run (no child blocks on a full pipe)
        ready, _, _ = select.select(list(open_fds), [], [], 1.0)
        for fd in ready:
            chunk = os.read(fd, 65536)
            s = open_fds[fd]
            if chunk:
                s["buf"][s["fds"][fd]] += chunk
            else:
                os.close(fd)
                del open_fds[fd]
    results = []
    for s in started:
        _, status = os.waitpid(s["pid"], 0)
        code = os.waitstatus_to_exitcode(status)
        results.append({"code": code, "stdout": s["buf"]["stdout"].decode(errors="replace"),
                        "stderr": s["buf"]["stderr"].decode(errors="replace")})
    return results


def main() -> None:
    plan = json.loads(open(sys.argv[1]).read())
    import sstmerge.cli.main  # noqa: F401 - import everything once, before forking
    import sstmerge.eval.runner  # noqa: F401
    import sstmerge.fisher.run  # noqa: F401
    import peft  # noqa: F401

    results = [run_step(step) for step in plan]
    with open(sys.argv[2], "w") as fh:
        json.dump(results, fh)


if __name__ == "__main__":
    main()
