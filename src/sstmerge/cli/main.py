"""``sst-merge`` command line. Merge flags are generated from :class:`sstmerge.merge.options.MergeConfig`,
so the CLI, the YAML config and the Python API share one set of names."""

from __future__ import annotations

import errno
import json
import logging
import sys
import typing
from pathlib import Path

import click
from pydantic import ValidationError

from .._logging import setup_logging
from ..errors import ConfigError, SSTMergeError

log = logging.getLogger("sstmerge.cli")

#: options that take several values after one flag (``--utility U1 U2``)
GREEDY = ("--utility", "--utility-weights", "--target-modules")


def expand_greedy(argv: list[str]) -> list[str]:
    """Rewrite ``--utility a b --x`` as ``--utility a --utility b --x`` (click options take one value each).

    A value is any token not starting with ``--`` other than ``-q``/``-v``; ``-1`` (a negative weight) is a value.
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok in GREEDY:
            j = i + 1
            while j < len(argv) and not argv[j].startswith("--") and argv[j] not in ("-q", "-v", "-h"):
                out += [tok, argv[j]]
                j += 1
            if j == i + 1:
                out.append(tok)  # let click report the missing value
            i = j
            continue
        out.append(tok)
        i += 1
    return out


class _IntOrChoice(click.ParamType):
    """An integer or one of some words (e.g. ``--k 16`` or ``--k auto``)."""

    name = "integer|choice"

    def __init__(self, words: list[str]) -> None:
        self.words = words
        self.name = "INTEGER|" + "|".join(words)

    def convert(self, value, param, ctx):
        if isinstance(value, int) or value in self.words:
            return value
        try:
            return int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is neither an integer nor one of {', '.join(self.words)}", param, ctx)


def _click_type(annotation):
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _click_type(typing.get_args(annotation)[0])
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    literals = [a for a in args if typing.get_origin(a) is typing.Literal]
    plain = [typing.get_args(a)[0] if typing.get_origin(a) is typing.Annotated else a for a in args]
    if literals and int in plain and len(literals) + 1 == len(args):
        return _IntOrChoice([str(w) for lit in literals for w in typing.get_args(lit)]), False
    if origin is typing.Literal:
        return click.Choice([str(a) for a in typing.get_args(annotation)]), False
    if origin in (list, tuple):
        inner, _ = _click_type(args[0])
        return inner, True
    if origin is typing.Union or str(origin) == "types.UnionType" or (origin is not None and len(args) == 1):
        return _click_type(args[0])
    return {int: click.INT, float: click.FLOAT, bool: click.BOOL}.get(annotation, click.STRING), False


def options_from_model(model) -> list[click.Option]:
    """One click option per pydantic field; defaults are ``None`` so only flags given on the command line
    override the YAML config (precedence: CLI > --config file > field default)."""
    return _options_from_fields([(k, f, "") for k, f in model.model_fields.items()])


def _fail(message: str) -> typing.NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free space (or choose another --out / --cache-dir) and run again",
    errno.EFBIG: "a file outgrew the file-size limit (ulimit -f): raise the limit and run again",
    errno.EDQUOT: "the disk quota is exhausted: free space and run again",
    errno.EACCES: "permission denied: check the folder's permissions or choose another path",
    errno.EPERM: "operation not permitted: check the folder's permissions or choose another path",
    errno.EROFS: "the file system is read-only: choose a writable --out / --cache-dir",
    errno.ENOENT: "no such file or folder: check the path",
}


def describe_failure(exc: BaseException) -> str | None:
    """The one-line ``error:`` message for an expected failure, or None for a bug (which keeps its traceback).

    Expected: every :class:`SSTMergeError`, operating-system errors (disk full, file-size limit, permissions:
    outputs are atomic, so nothing half-written is left), and refused unpickling."""
    import pickle

    if isinstance(exc, SSTMergeError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno is not None:
        where = f" {exc.filename}" if exc.filename else ""
        hint = _OS_HINTS.get(exc.errno, "check the path and the disk")
        return f"{exc.strerror or exc}{':' if where else ''}{where}. {hint}; no output was left half-written"
    if isinstance(exc, pickle.UnpicklingError):
        return (f"refused to unpickle a file ({exc}); sstmerge reads pickled checkpoints only with weights_only=True. "
                "Convert the file to safetensors (e.g. model.save_pretrained(..., safe_serialization=True))")
    return None


class _Group(click.Group):
    """The ``sst-merge`` group: one error handler for every command (``error: ...`` and exit 2 for expected
    failures, exit 130 on Ctrl-C, 128 + N on SIGTERM/SIGHUP after clean-up)."""

    def get_command(self, ctx: click.Context, name: str):
        if name in _LAZY_COMMANDS:  # built now, so it sees every registered method's parameters
            return _LAZY_COMMANDS[name]()
        return super().get_command(ctx, name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(_LAZY_COMMANDS))

    def invoke(self, ctx: click.Context):
        from ..io.atomic import Terminated

        try:
            return super().invoke(ctx)
        except Terminated as exc:
            click.echo(f"error: terminated by signal {exc.code - 128}; temporary files were removed", err=True)
            raise
        except KeyboardInterrupt:
            click.echo("error: interrupted; temporary files were removed", err=True)
            sys.exit(130)
        except Exception as exc:
            message = describe_failure(exc)
            if message is None:
                raise
            log.debug("details", exc_info=True)
            _fail(message)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-q", "--quiet", is_flag=True, help="only warnings and errors; no progress bars")
@click.option("-v", "--verbose", count=True, help="debug logging")
@click.version_option(package_name="sstmerge")
def cli(quiet: bool, verbose: int) -> None:
    """SST-Merge: merge utility and safety LoRA adapters through the Fisher safety subspace."""
    setup_logging(verbose, quiet)


def _flag_fields() -> list[tuple[str, typing.Any, str]]:
    """``(key, pydantic field, help prefix)`` of every merge flag: inputs/outputs, common options, the Fisher
    settings (flat names) and the union of every registered method's parameters (help names the methods)."""
    from ..fisher.run import FisherSettings
    from ..merge.config import param_owners
    from ..merge.method import all_methods
    from ..merge.options import FISHER_KEYS, CommonOptions, MergeIO

    out = [(k, f, "") for k, f in MergeIO.model_fields.items()]
    out += [(k, f, "") for k, f in CommonOptions.model_fields.items()]
    fisher_methods = ", ".join(n for n, c in all_methods().items() if c.needs_fisher)
    out += [(flat, FisherSettings.model_fields[field], f"[Fisher pass: {fisher_methods}] ")
            for flat, field in FISHER_KEYS.items()]
    methods = all_methods()
    for key, owners in sorted(param_owners().items()):
        field = methods[owners[0]].Params.model_fields[key]
        out.append((key, field, f"[{', '.join(sorted(owners))}] "))
    return out


def _options_from_fields(fields) -> list[click.Option]:
    """Click options from ``(key, pydantic field, help prefix)``; every default is None (unset)."""
    opts = []
    for name, field, prefix in fields:
        flag = "--" + name.replace("_", "-")
        help_text = f"{prefix}{field.description or ''} [default: {field.get_default(call_default_factory=True)!r}]"
        if field.annotation is bool:
            opts.append(click.Option([f"{flag}/--no-{name.replace('_', '-')}", name], default=None, help=help_text))
            continue
        ctype, multiple = _click_type(field.annotation)
        opts.append(click.Option([flag, name], type=ctype, multiple=multiple, default=None, help=help_text))
    return opts


def _merge_command() -> click.Command:
    """Built when invoked (not at import), so methods registered by plugins or tests get their flags too."""

    def run(config: str | None, **flags) -> None:
        from ..merge.config import build_config, load_config_file
        from ..merge.merger import SSTMerger, summary_text

        values = load_config_file(config) if config else {}
        for key, value in flags.items():
            if value is None or (isinstance(value, tuple) and not value):
                continue
            values[key] = list(value) if isinstance(value, tuple) else value
        cfg = build_config(values, source=config or "command line")
        io = cfg.io
        if not io.out:
            raise ConfigError("no output folder: pass --out DIR (or 'out:' in the config file)")
        if io.safety is None and not io.utility:
            raise ConfigError("nothing to merge: pass --utility U1 [U2 ...] and/or --safety S")
        merger = SSTMerger(io.base, options=cfg.options, allow_pickle=io.allow_pickle, cache_dir=io.cache_dir)
        # stream: module by module straight into --out (bounded memory); else in memory, then written
        result = merger.merge_to(list(io.utility), io.safety, io.out, overwrite=io.overwrite, config=cfg,
                                 stream=io.stream)
        click.echo(summary_text(result.report), err=True, nl=False)
        click.echo(str(result.path))

    params = [click.Option(["--config"], type=click.Path(dir_okay=False), default=None,
                           help="YAML file with the same keys as the flags")]
    params += _options_from_fields(_flag_fields())
    return click.Command(
        "merge",
        callback=run,
        params=params,
        help="Merge utility adapter(s) and a safety adapter into one PEFT adapter folder (--out), with "
        "merge_report.json. Each method takes the common options and its own parameters (`sst-merge methods`); "
        "a parameter of another method is an error.",
    )


def _fisher_command() -> click.Command:
    from ..fisher.run import FisherSettings
    from ..merge.methods import SubspaceParams
    from ..merge.options import FISHER_KEYS, CommonOptions, MergeIO

    fields = [(k, MergeIO.model_fields[k], "") for k in ("base", "utility", "safety", "cache_dir", "allow_pickle",
                                                          "overwrite")]
    fields += [(k, CommonOptions.model_fields[k], "") for k in ("utility_coefficients", "utility_weights", "seed")]
    fields += [(flat, FisherSettings.model_fields[f], "") for flat, f in FISHER_KEYS.items()]
    fields += [("damping", SubspaceParams.model_fields["damping"], "")]

    def run(**flags) -> None:
        from ..fisher.distributed import init_from_env, shutdown
        from ..fisher.run import compute_fisher
        from ..io.adapter import read_adapter
        from ..io.atomic import atomic_output_dir, check_output_target
        from ..linalg.eigen import safety_subspace_from_gram
        from ..merge.compose import utility_coefficients
        from ..merge.config import build_config
        from ..merge.report import plot_spectrum
        from ..provenance import versions
        from ..io.models import load_base_info

        values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in flags.items()
                  if v is not None and not (isinstance(v, tuple) and not v) and k != "out"}
        cfg = build_config({**values, "mode": "residual"}, "command line")  # a Fisher method: takes these keys
        io, opts = cfg.io, cfg.options
        if io.safety is None:
            raise ConfigError("the Fisher is taken over the safety adapter's factors: pass --safety")
        if flags.get("out"):  # check --out before the (long) pass; claimed again when the report is written
            check_output_target(flags["out"], overwrite=io.overwrite, inputs=fisher_inputs(cfg))
        base = load_base_info(io.base, io.cache_dir)
        utility = [read_adapter(u, allow_pickle=io.allow_pickle) for u in io.utility]
        safety = read_adapter(io.safety, allow_pickle=io.allow_pickle)
        coefs = utility_coefficients(len(utility), opts.utility_coefficients, opts.utility_weights)
        dist = init_from_env(opts.fisher.device)  # torchrun: one process per GPU / CPU worker
        try:
            run_ = compute_fisher(base, utility, coefs, safety, opts.fisher, io.cache_dir, dist=dist)
        finally:
            shutdown()
        if not dist.is_main:
            return
        stats, eps = run_.stats, opts.params.damping
        sub = safety_subspace_from_gram(stats.gram_total, stats.n_harm, 1, dim=stats.dim(), eps=eps, clamp_k=True)
        spectrum = {"global": sub.eigenvalues.tolist()}
        report = {"fisher": run_.meta, "damping_eps": eps, "damping_delta": sub.damping,
                  "available_rank": sub.available_rank, "eigenvalues": spectrum, "versions": versions()}
        click.echo(f"Fisher statistics: {run_.folder} (cache hit: {run_.meta.get('cache_hit')})")
        click.echo(f"samples: {stats.n_harm} harmful, {stats.n_benign} benign; D = {stats.dim()}; "
                   f"positive eigenvalues: {sub.available_rank}")
        store = run_.meta.get("store", {})
        if store.get("kind") == "sketch":
            click.echo(f"store: sketch, m = {store['sketch_dim']} per module ({store['columns']:,} columns, "
                       f"{store['dtype']}, seed {store['sketch_seed']}), {store['disk_bytes'] / 2**20:.1f} MiB; "
                       f"estimated Gram error {100 * store['gram_rel_error_estimate']:.2f} %")
        elif store:
            click.echo(f"store: full ({store['dtype']}), {store['disk_bytes'] / 2**20:.1f} MiB")
        click.echo("top λ: " + ", ".join(f"{x:.4g}" for x in sub.eigenvalues[:10]))
        if flags.get("out"):
            with atomic_output_dir(flags["out"], io.overwrite, inputs=fisher_inputs(cfg), kind="fisher") as tmp:
                (tmp / "fisher_report.json").write_text(json.dumps(report, indent=2, default=str))
                plot_spectrum(spectrum, tmp / "spectrum.png", title="global empirical Fisher")
            click.echo(str(Path(flags["out"]).resolve()))

    def fisher_inputs(cfg) -> list:
        from ..io.models import default_cache_dir

        io, fs = cfg.io, cfg.options.fisher
        return [*io.utility, io.safety, io.base, io.cache_dir or default_cache_dir(),
                *(d for d in (fs.harmful_data, fs.benign_data) if not d.startswith("bundled:"))]

    out_option = click.Option(["--out"], default=None, help="optional folder for fisher_report.json + spectrum.png")
    return click.Command(
        "fisher", callback=run, params=_options_from_fields(fields) + [out_option],
        help="Compute (or load from the cache) the Fisher statistics of a safety adapter and show the spectrum. "
        "Later merges with the same base/adapters/data reuse them for any k, mode, preset or weights. "
        "Multi-process / multi-GPU: torchrun --nproc-per-node N sst-merge fisher ... (examples and modules are "
        "sharded, statistics all-reduced; NCCL on GPUs, gloo on CPU).",
    )


cli.add_command(_fisher_command())
_LAZY_COMMANDS = {"merge": _merge_command}


@cli.command()
@click.argument("adapter", type=click.Path())
@click.option("--allow-pickle", is_flag=True, help="read a legacy pickled .pt/.bin (weights_only=True)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def inspect(adapter: str, allow_pickle: bool, as_json: bool) -> None:
    """Show an adapter's ranks, scales, target modules and norms."""
    from ..io.inspect import describe_adapter, render_table

    info = describe_adapter(adapter, allow_pickle=allow_pickle)
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        render_table(info)


_EVAL_SETTING_FLAGS = ("max_new_tokens", "batch_size", "engine", "limit", "shots", "judges", "backend",
                       "templates_per_prompt", "stop_when_decided", "decision_tokens")


def _settings_from_config(spec: str, flag_settings: dict, ctx: click.Context) -> dict:
    """Each suite's :class:`EvalSettings` as the experiment config ``spec`` gives them to its grid
    (:meth:`EvalConfig.settings`), with the settings flags the user gave explicitly on top."""
    import dataclasses

    from click.core import ParameterSource

    from ..pipeline.config import load_experiment_config

    cfg = load_experiment_config(spec)
    given = [f for f in _EVAL_SETTING_FLAGS if ctx.get_parameter_source(f) is not ParameterSource.DEFAULT]
    out = {}
    for suite, flagged in flag_settings.items():
        out[suite] = dataclasses.replace(cfg.eval.settings(suite), **{f: getattr(flagged, f) for f in given})
        log.info("%s: settings from %s%s", suite, spec, f" (overridden: {', '.join(given)})" if given else "")
    return out


@cli.command("eval")
@click.option("--base", default="smollm2", show_default=True, help="base model: alias or local HF folder")
@click.option("--adapter", default=None, help="LoRA adapter folder to evaluate on top of the base")
@click.option("--suite", "suites", multiple=True, required=True, help="jailbreak | rephrased | overrefusal | mcq | qa | arithmetic (repeatable)")
@click.option("--data", "data", multiple=True, help="data file: FILE (one suite) or SUITE=FILE; default: bundled data")
@click.option("--templates", default=None, help="jailbreak templates (JSONL or text blocks with {prompt})")
@click.option("--limit", type=int, default=None, help="at most N items per suite")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--batch-size", type=int, default=None,
              help="rows per generation batch [default: the device's: 64 on a CPU, from free memory on a GPU]")
@click.option("--engine", type=click.Choice(["cached", "transformers"]), default="cached", show_default=True,
              help="HF generation: cached (a batch's common prompt prefix computed once, finished rows dropped) or "
              "transformers (model.generate; the reference, same answers up to float rounding)")
@click.option("--shots", type=int, default=0, show_default=True, help="mcq: few-shot exemplars")
@click.option("--judge", "judges", multiple=True, default=("keyword",), show_default=True,
              help="refusal judges (repeatable): keyword, logprob")
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False))
@click.option("--no-cache", is_flag=True, help="recompute even if a cached result exists")
@click.option("--device", default="auto", show_default=True, help="auto (a CUDA GPU when present), cpu or cuda")
@click.option("--backend", type=click.Choice(["hf", "vllm"]), default="hf", show_default=True,
              help="generation backend: hf (transformers, batched) or vllm (GPU; the adapter as a LoRA request)")
@click.option("--templates-per-prompt", type=int, default=None,
              help="jailbreak: wrap each prompt in N templates (rotating) instead of all of them")
@click.option("--stop-when-decided/--full-answers", default=True, show_default=True,
              help="jailbreak/overrefusal with the keyword judge: stop an answer once its verdict cannot change")
@click.option("--decision-tokens", type=int, default=None,
              help="jailbreak/overrefusal: stop an answer after N new tokens at most (approximate: refusals come first)")
@click.option("--no-fold", is_flag=True, help="run the adapter through PEFT's LoRA layers instead of adding it into "
              "the base weights (the reference path; slower)")
@click.option("--settings-from", default=None, metavar="CONFIG",
              help="each suite's settings (new tokens, limit, templates per prompt, decision tokens, judges, batch "
              "size) from an experiment config's eval block, a bundled name (default) or a YAML file: the numbers "
              "its grid reports; the settings flags given explicitly override it")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="results JSON (written atomically)")
@click.option("--overwrite", is_flag=True, help="replace --out if it is an earlier sstmerge results file")
def eval_command(base, adapter, suites, data, templates, limit, max_new_tokens, batch_size, engine, shots, judges, cache_dir,
                 no_cache, device, backend, templates_per_prompt, stop_when_decided, decision_tokens, no_fold,
                 settings_from, out, overwrite) -> None:
    """Evaluate a base model (+ adapter): jailbreak resistance, over-refusal, multiple choice, reading comprehension.

    To score an adapter the way an experiment's grid does (e.g. a safety adapter alone on the held-out sets), give
    ``--settings-from default``."""
    from rich.console import Console
    from rich.table import Table

    from ..eval.runner import evaluate, summary_rows
    from ..eval.suites import REFUSAL_SUITES, SUITES, EvalSettings
    from ..io.atomic import atomic_output_file, check_output_target

    data_map: dict[str, str] = {}
    for d in data:
        named = d.split("=", 1)[0] if "=" in d else None
        if named in suites:
            k, v = d.split("=", 1)
        elif named in SUITES.names() and not Path(d).exists():
            raise ConfigError(f"--data {d!r} is for suite {named!r}, which this run does not evaluate (--suite "
                              f"{' '.join(suites)}): add --suite {named}, or drop that --data")
        elif len(suites) == 1:
            k, v = suites[0], d
        else:
            raise ConfigError(f"--data {d!r}: with several suites write SUITE=FILE (suites: {', '.join(suites)})")
        if k in data_map:
            raise ConfigError(f"--data gives suite {k!r} two files ({data_map[k]!r} and {v!r}); give one per suite")
        data_map[k] = v
    inputs = [base, adapter, templates, *data_map.values()]
    check_output_target(out, overwrite=overwrite, inputs=inputs, is_file=True)  # before the (long) evaluation
    settings = {s: EvalSettings(max_new_tokens=max_new_tokens, batch_size=batch_size, engine=engine, limit=limit, shots=shots,
                                judges=tuple(judges), backend=backend, templates_per_prompt=templates_per_prompt,
                                stop_when_decided=stop_when_decided and s in REFUSAL_SUITES,
                                decision_tokens=decision_tokens if s in REFUSAL_SUITES else None) for s in suites}
    if settings_from:
        settings = _settings_from_config(settings_from, settings, click.get_current_context())
    result = evaluate(base, list(suites), adapter=adapter, data=data_map, templates=templates, settings=settings,
                      cache_dir=cache_dir, use_cache=not no_cache, device=device, fold=not no_fold)
    atomic_output_file(out, json.dumps(result, indent=2, default=str) + "\n", overwrite=overwrite, inputs=inputs)
    from rich.markup import escape

    table = Table("suite", "metric", "value", title=escape(f"{base}{' + ' + adapter if adapter else ''}"))
    for row in summary_rows(result):
        table.add_row(*(escape(x) for x in row))
    Console().print(table)
    click.echo(str(Path(out).resolve()))


def _train_command() -> click.Command:
    from ..train.sft import TrainOptions

    def callback(base, data, out, max_samples, overwrite, cache_dir, **flags) -> None:
        from ..train.sft import train_from_files

        values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in flags.items()
                  if v is not None and not (isinstance(v, tuple) and not v)}
        try:
            options = TrainOptions(**values)
        except ValidationError as exc:
            raise ConfigError("; ".join(f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']} "
                                        f"(got {e.get('input')!r})" for e in exc.errors())) from None
        path = train_from_files(base, list(data), out, options, max_samples=max_samples, cache_dir=cache_dir,
                                overwrite=overwrite)
        report = json.loads((path / "train_report.json").read_text())
        click.echo(f"loss {report['initial_loss']:.4f} -> {report['final_loss']:.4f} "
                   f"({report['n_examples']} examples, {options.steps} steps, {report['seconds']:.0f} s)", err=True)
        click.echo(str(path))

    params = [
        click.Option(["--base"], default="smollm2", show_default=True, help="base model: alias or local HF folder"),
        click.Option(["--data"], multiple=True, required=True,
                     help="training JSONL (prompt/response or messages; 'bundled:NAME'); repeatable, concatenated"),
        click.Option(["--out"], required=True, type=click.Path(file_okay=False), help="adapter folder (atomic)"),
        click.Option(["--max-samples"], type=int, default=None, help="at most N examples per data file (seeded)"),
        click.Option(["--overwrite"], is_flag=True, help="replace --out if it is an earlier sstmerge output"),
        click.Option(["--cache-dir"], default=None, type=click.Path(file_okay=False)),
    ] + options_from_model(TrainOptions)
    return click.Command(
        "train", callback=callback, params=params,
        help="Train a PEFT LoRA adapter on JSONL data (loss on the response tokens only), written atomically "
        "with train_report.json.",
    )


cli.add_command(_train_command())


@cli.command()
@click.argument("name", required=False)
def methods(name: str | None) -> None:
    """List the merge methods and their parameters (NAME: one method)."""
    from ..merge.method import all_methods, method_class

    chosen = {name: method_class(name)} if name else all_methods()
    for mname, cls in chosen.items():
        needs = [w for w, flag in (("safety adapter", cls.needs_safety), ("Fisher pass", cls.needs_fisher),
                                   ("dense updates", cls.dense)) if flag]
        click.echo(f"{mname:12s} {cls.summary()}" + (f"  [needs: {', '.join(needs)}]" if needs else ""))
        for key, field in cls.Params.model_fields.items():
            default = field.get_default(call_default_factory=True)
            click.echo(f"    --{key.replace('_', '-'):24s} {field.description or ''} [default: {default!r}]")
    if not name:
        click.echo("\ncommon options (every method): --safety-weight, --utility-coefficients, --utility-weights, "
                   "--layer-weights, --recompress-rank, --dtype, --seed; the Fisher methods also take --harmful-data, "
                   "--benign-data, --max-samples, --max-length, --fisher-batch-size, --fisher-device, --fisher-dtype, "
                   "--fisher-store, --sketch-dim, --sketch-seed, --fisher-store-dtype")


@cli.command("prepare-base")
@click.argument("spec", default="smollm2")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None)
def prepare_base(spec: str, cache_dir: str | None) -> None:
    """Resolve a base model (converting the bundled SmolLM2 once) and print its folder."""
    from ..io.models import resolve_base

    click.echo(str(resolve_base(spec, cache_dir)))


@cli.command("tiny-model")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True)
def tiny_model(out: str, seed: int) -> None:
    """Write a tiny random Llama (for experiments and tests) to OUT."""
    from ..io.atomic import atomic_output_dir
    from ..io.models import build_tiny_llama

    with atomic_output_dir(out, kind="tiny-model") as tmp:
        build_tiny_llama(tmp, seed=seed)
    click.echo(str(Path(out).resolve()))


def _run_grid(config: str, quick: bool, out: str, base: str | None, cache_dir: str | None,
              seeds: tuple[int, ...] = ()) -> None:
    from ..pipeline.experiments import load_experiment_config, run_experiments, summary_table

    overrides = {k: v for k, v in (("base", base), ("cache_dir", cache_dir)) if v is not None}
    if seeds:  # one --seed replaces the config's seeds with that one; several run the grid once per seed
        overrides |= {"seed": seeds[0]} if len(seeds) == 1 else {"seeds": list(seeds)}
    cfg = load_experiment_config(config, quick=quick, overrides=overrides)
    result = run_experiments(cfg, out, config_source=f"{config}{' --quick' if quick else ''}")
    click.echo(summary_table(result))
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    for name, g in result["adapter_task_gain"].items():
        click.echo(f"{name} on {g['task']}: base {pct(g['base'])} -> adapter {pct(g['adapter'])}"
                   f"{'' if g['improved'] else '  (NOT improved)'}")
    click.echo(f"results: {Path(out) / 'results.md'}, {Path(out) / 'results.csv'}, "
               f"{Path(out) / 'safety_vs_utility.png'} ({result['seconds']:.0f} s)")


@cli.command()
@click.option("--config", default="default", show_default=True,
              help="experiment YAML (a path, or a bundled one: 'default', 'sweeps')")
@click.option("--quick", is_flag=True, help="apply the config's quick: overrides (fewer steps, samples, experiments)")
@click.option("--out", default="results", show_default=True, type=click.Path(file_okay=False))
@click.option("--base", default=None, help="override the config's base model")
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False))
@click.option("--seed", "seeds", type=int, multiple=True,
              help="override the config's seeds (training and merges); repeat for one run per seed: --seed 0 --seed 1")
def experiments(config: str, quick: bool, out: str, base: str | None, cache_dir: str | None,
                seeds: tuple[int, ...]) -> None:
    """Run the experiment grid: train adapters, merge every way (SST-Merge modes + baselines), evaluate all, once
    per seed; write results.md / results.csv / results.json (95 % intervals, sd across seeds, paired tests
    against direct), item_outcomes.json and safety_vs_utility.png. Resumable: finished pieces in OUT are reused."""
    _run_grid(config, quick, out, base, cache_dir, seeds)


@cli.command()
@click.option("--quick", is_flag=True, help="the quick profile (under 10 minutes on 2 CPU cores)")
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--base", default=None, help="override the base model (default: the bundled SmolLM2)")
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False))
@click.option("--seed", "seeds", type=int, multiple=True,
              help="run only these seeds (default: the config's three); run the others elsewhere and join the "
                   "folders with `sst-merge combine`")
def demo(quick: bool, out: str, base: str | None, cache_dir: str | None, seeds: tuple[int, ...]) -> None:
    """The main job on the embedded default: `experiments --config default` (SmolLM2 + bundled data)."""
    _run_grid("default", quick, out, base, cache_dir, seeds)


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="folder for the combined results")
def combine(runs: tuple[str, ...], out: str) -> None:
    """Join finished experiment folders RUNS that ran one grid with different seeds (e.g. `sst-merge demo --seed 1
    --out runs/seed1` on another machine) into one result: mean ± sd across seeds, intervals over the
    seed-averaged items, paired tests, table and plot, as one run over all the seeds would write them."""
    from ..pipeline.combine import combine_runs
    from ..pipeline.experiments import summary_table

    result = combine_runs(list(runs), out)
    click.echo(summary_table(result))
    if result["base_reproduced"] is False:
        click.echo("note: the base model's evaluation differs between the folders (see the log)")
    click.echo(f"seeds {result['seeds']}: {Path(out) / 'results.md'}, {Path(out) / 'results.csv'}, "
               f"{Path(out) / 'safety_vs_utility.png'}")


@cli.command("compare")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.argument("model_a")
@click.argument("model_b")
@click.option("--json", "as_json", is_flag=True, help="print the tests as JSON instead of lines")
def compare_cmd(run: str, model_a: str, model_b: str, as_json: bool) -> None:
    """Paired tests of MODEL_A against MODEL_B (rows of the results table, e.g. 'A5+A6+A7/protect' and
    'A5+A6+A7/dare_ties') in a finished grid RUN (an `experiments`/`demo` --out or a `combine` output): on every
    column and summary score, the difference A − B, the paired test on the seed-averaged items and each seed's
    own test. Reads the run's item outcomes; evaluates nothing."""
    from ..pipeline.compare import compare_models, comparison_lines

    comparison = compare_models(run, model_a, model_b)
    click.echo(json.dumps(comparison, indent=2) if as_json else "\n".join(comparison_lines(comparison)))


def main(argv: list[str] | None = None) -> None:
    from ..io.atomic import install_signal_handlers

    install_signal_handlers()  # SIGTERM / SIGHUP clean up temp folders like Ctrl-C does
    args = expand_greedy(list(sys.argv[1:] if argv is None else argv))
    cli.main(args=args, prog_name="sst-merge")


if __name__ == "__main__":
    main()
