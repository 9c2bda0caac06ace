"""One merged adapter evaluated on the default suites the old way and the new way, in one process.

- old: the adapter through PEFT's LoRA layers, the model loaded for the evaluation, ``model.generate`` in
  batches of 16 (the earlier default), every answer generated to its end-of-turn id or ``max_new_tokens``;
- new: the adapter folded into the base weights (:mod:`sstmerge.eval.fold`), the cached engine
  (:func:`sstmerge.eval.generate.generate_ids`: a batch's common prompt prefix computed once, finished rows
  dropped) in the device's default batch, and the refusal suites' answers stopped once the keyword judge's
  verdict is settled (exact), and after ``--decision-tokens`` new tokens at most (approximate).

Both use the default experiment config's eval section (suites, limits, max_new_tokens), no evaluation cache, torch's thread count as set (``--threads``). The new way is timed twice: cold (its base
model is loaded in the call, as the old way's is) and warm (base already loaded: the per-model cost inside a
grid, where the base is loaded once per process). Printed: wall time per way, items/s, and the share of
verdicts/answers that differ (refusal verdicts, MCQ predictions, QA and arithmetic correctness), with the
differences listed. Ratios come last.

    python benchmarks/bench_eval.py --adapter runs/demo/merges/A5+A6+A7__direct-XXXXXXXX
    python benchmarks/bench_eval.py --adapter DIR --decision-tokens 12 --quick   # the quick profile's limits
    python benchmarks/bench_eval.py --adapter DIR --batch-sizes 16,32,64,96      # the new way per batch size
    python benchmarks/bench_eval.py --adapter DIR --quick --prefill-chunks 512,1024,2048

``--batch-sizes`` / ``--prefill-chunks``: the new way (warm) once per batch size × prefill piece size
instead, with the time of each and whether its outcomes equal the first setting's.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("SSTMERGE_QUIET", "1")

import torch  # noqa: E402

from sstmerge.eval.fold import forget_base_models  # noqa: E402
from sstmerge.eval.runner import evaluate  # noqa: E402
from sstmerge.eval.suites import REFUSAL_SUITES, EvalSettings  # noqa: E402
from sstmerge.pipeline.config import load_experiment_config  # noqa: E402


OLD_BATCH_SIZE = 16  # the default before the cached engine


def settings_for(ev, *, new: bool, decision_tokens: int | None, batch_size: int | None = None) -> dict[str, EvalSettings]:
    return {s: EvalSettings(max_new_tokens=ev.max_new_tokens.get(s, 64),
                            batch_size=batch_size if new else OLD_BATCH_SIZE, engine="cached" if new else "transformers",
                            limit=ev.limit.get(s), judges=tuple(ev.judges),
                            templates_per_prompt=ev.templates_per_prompt if s == "jailbreak" else None,
                            stop_when_decided=new and s in REFUSAL_SUITES,
                            decision_tokens=decision_tokens if new and s in REFUSAL_SUITES else None)
            for s in ev.suites}


def outcomes(result: dict) -> dict[tuple[str, int], tuple[str, object]]:
    """(suite, record index) -> (what, the verdict or answer that the suite's metric uses)."""
    out = {}
    for suite, r in result["suites"].items():
        for k, rec in enumerate(r["records"]):
            if "refused" in rec:
                out[(suite, k)] = ("refused", rec["refused"]["keyword"])
            elif "prediction" in rec and "letter_logprobs" in rec:
                out[(suite, k)] = ("prediction", rec["prediction"])
            elif "f1" in rec:
                out[(suite, k)] = ("f1 / abstained", (round(rec["f1"], 6), rec.get("abstained")))
            elif "correct" in rec:
                out[(suite, k)] = ("correct", rec["correct"])
    return out


def headline(result: dict, suite: str):
    metrics = result["suites"][suite]["metrics"]
    for key in ("refusal_rate[keyword]", "overrefusal_rate[keyword]", "accuracy", "f1"):
        if key in metrics:
            return round(metrics[key], 4)
    return None


def n_items(result: dict) -> int:
    return sum(len(r["records"]) for r in result["suites"].values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", required=True, help="a merged adapter folder (e.g. from `sst-merge demo`)")
    ap.add_argument("--base", default=None, help="base model (default: the config's, SmolLM2)")
    ap.add_argument("--config", default="default")
    ap.add_argument("--quick", action="store_true", help="the config's quick-profile eval limits")
    ap.add_argument("--decision-tokens", type=int, default=None,
                    help="refusal suites, new way: at most N new tokens (default: the config's decision_tokens)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-sizes", default=None, help="comma-separated: time the new way at each batch size instead")
    ap.add_argument("--prefill-chunks", default=None, help="comma-separated prompt-token budgets per prefill piece: "
                    "time the new way at each (with --batch-sizes: every pair)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_experiment_config(args.config, quick=args.quick)
    ev, base = cfg.eval, args.base or cfg.base
    n_tokens = {s: args.decision_tokens if args.decision_tokens is not None else ev.decision_tokens.get(s)
                for s in REFUSAL_SUITES}
    cap = n_tokens.get("jailbreak")
    if args.batch_sizes or args.prefill_chunks:
        return compare_settings(args, ev, base, cap)
    print(f"adapter {args.adapter}; base {base}; suites {ev.suites}; limits {ev.limit}; threads {args.threads}; "
          f"old: PEFT, model.generate, batch {OLD_BATCH_SIZE}, full answers; new: folded weights, cached engine, "
          f"the device's batch, stop when decided, decision_tokens {cap}")
    runs = {}  # the default cache holds the converted base; results are recomputed (use_cache=False)
    for name, new in (("old (PEFT, full answers)", False), ("new, cold (folded, decided)", True),
                      ("new, warm (base loaded)", True)):
        if name.startswith("new, cold"):
            forget_base_models()
        t0 = time.perf_counter()
        result = evaluate(base, list(ev.suites), adapter=args.adapter, settings=settings_for(
            ev, new=new, decision_tokens=cap), use_cache=False, device="cpu", fold=new)
        runs[name] = (time.perf_counter() - t0, result)
        per_suite = ", ".join(f"{s} {r['seconds']:.1f}s" for s, r in result["suites"].items())
        print(f"{name:30s} {runs[name][0]:7.1f} s  {n_items(result) / runs[name][0]:6.2f} items/s  ({per_suite})")
    (t_old, old), (t_cold, new), (t_warm, _) = runs.values()
    a, b = outcomes(old), outcomes(new)
    differ = [k for k in a if a[k] != b.get(k)]
    for suite, k in differ:
        rec_old, rec_new = old["suites"][suite]["records"][k], new["suites"][suite]["records"][k]
        print(f"  differs: {suite}#{k} {a[(suite, k)][0]}: {a[(suite, k)][1]} -> {b.get((suite, k), ('', None))[1]}"
              f" | old {rec_old.get('output', '')[:70]!r} | new {rec_new.get('output', '')[:70]!r}")
    by_suite = {}
    for (suite, _), _v in a.items():
        by_suite.setdefault(suite, [0, 0])[0] += 1
    for suite, k in differ:
        by_suite[suite][1] += 1
    for suite, (n, d) in by_suite.items():
        print(f"  {suite}: {n - d}/{n} agree")
    for s in old["suites"]:
        print(f"  {s}: headline old {headline(old, s)} new {headline(new, s)}; time old/new "
              f"{old['suites'][s]['seconds'] / new['suites'][s]['seconds']:.2f}")
    print(f"wall_time_ratio_old_over_new_cold = {t_old / t_cold:.2f}")
    print(f"wall_time_ratio_old_over_new_warm = {t_old / t_warm:.2f}")
    print(f"items_per_s_old = {n_items(old) / t_old:.2f}")
    print(f"items_per_s_new_warm = {n_items(new) / t_warm:.2f}")
    print(f"verdict_agreement = {1 - len(differ) / max(len(a), 1):.4f}")


def compare_settings(args, ev, base: str, cap: int | None) -> None:
    """The new way (base loaded once, warm) at each batch size × prefill piece size: time, items/s, and whether
    its outcomes equal the first setting's."""
    from sstmerge.eval import generate

    first = None
    batch_sizes = [int(x) for x in args.batch_sizes.split(",")] if args.batch_sizes else [None]
    chunks = [int(x) for x in args.prefill_chunks.split(",")] if args.prefill_chunks else [generate.PREFILL_CHUNK_TOKENS]
    evaluate(base, ["mcq"], settings={"mcq": EvalSettings(limit=1)}, use_cache=False, device="cpu")  # load the base
    for bs in batch_sizes:
        for chunk in chunks:
            generate.PREFILL_CHUNK_TOKENS = chunk
            t0 = time.perf_counter()
            result = evaluate(base, list(ev.suites), adapter=args.adapter, use_cache=False, device="cpu",
                              settings=settings_for(ev, new=True, decision_tokens=cap, batch_size=bs))
            seconds = time.perf_counter() - t0
            got = outcomes(result)
            first = first or got
            same = sum(got[k] == first.get(k) for k in got)
            per_suite = ", ".join(f"{s} {r['seconds']:.1f}s" for s, r in result["suites"].items())
            print(f"batch {bs or 'auto'}, prefill pieces of {chunk} tokens: {seconds:7.1f} s  "
                  f"{n_items(result) / seconds:6.2f} items/s  outcomes equal to the first setting's "
                  f"{same}/{len(got)}  ({per_suite})", flush=True)


if __name__ == "__main__":
    main()
