"""The ``archir`` command. It parses options and calls the Python API; it holds no logic of its own.

Errors the user can fix (a missing file, a model that fails, a bad option) print one line on
stderr and exit with code 2; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import click

from .errors import ArchirError, RunInterrupted, TraceError, UserInputError

EXIT_USER_ERROR = 2


class _State:
    debug = False


def _fail(exc: BaseException, code: int) -> None:
    if _State.debug:
        raise exc
    click.echo(f"archir: error: {exc}", err=True)
    if code != EXIT_USER_ERROR:
        click.echo("archir: this looks like a bug in archir; run again with --debug for the traceback "
                   "and report it.", err=True)
    sys.exit(code)


class _Group(click.Group):
    def list_commands(self, ctx):
        return sorted([*super().list_commands(ctx), "transform"])

    def get_command(self, ctx, name):
        # built on demand, so that every registered method's options are flags
        return transform_command() if name == "transform" else super().get_command(ctx, name)

    def invoke(self, ctx):
        previous = signal.signal(signal.SIGTERM, _terminated)  # SIGTERM: the same clean exit as Ctrl-C
        try:
            return super().invoke(ctx)
        except RunInterrupted as exc:
            if os.environ.get("RANK", "0") not in ("0", ""):  # several processes: rank 0 says it once
                sys.exit(exc.exit_code)
            click.echo(f"archir: {exc}", err=True)
            if exc.checkpoint is not None:
                click.echo(f"archir: to continue, run the same command with --resume: {_resume_command()}", err=True)
            sys.exit(exc.exit_code)
        except ArchirError as exc:
            _fail(exc, EXIT_USER_ERROR)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort, SystemExit):
            raise
        except KeyboardInterrupt as exc:
            code = 143 if isinstance(exc, _Terminated) else 130
            click.echo(f"archir: interrupted ({'SIGTERM' if code == 143 else 'Ctrl-C'}); earlier outputs are kept "
                       "as they were.", err=True)
            sys.exit(code)
        except Exception as exc:  # noqa: BLE001 - one line unless --debug
            _fail(exc, 1)
        finally:
            signal.signal(signal.SIGTERM, previous)


class _Terminated(KeyboardInterrupt):
    """SIGTERM outside training (where the trainer's own handler checkpoints first)."""


def _terminated(signum, frame):
    raise _Terminated()


def _resume_command() -> str:
    """The command line that was run, with ``--resume`` added (and quoted for a POSIX shell)."""
    import shlex

    launched_as = os.environ.get("ARCHIR_COMMAND")  # set by --nproc for the processes it starts
    args = shlex.split(launched_as) if launched_as else sys.argv[1:]
    args = [a for a in args if a != "--resume"]
    return " ".join(shlex.quote(a) for a in ["archir", *args, "--resume"])


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="archir")
def main(debug: bool) -> None:
    """archir: trace a PyTorch model into a graph IR, transform it, and emit the result."""
    _State.debug = debug


@main.command()
@click.argument("model_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--input-shape", help="Example input shape, e.g. 1,3,32,32 (default: MODEL.py's "
              "example_input(), else 1,3,32,32).")
@click.option("--granularity", type=click.Choice(["layer", "block"]), default="layer", show_default=True,
              help="layer: also cut chains after each activation that follows a conv/linear.")
@click.option("--dot", "dot_path", type=click.Path(dir_okay=False, path_type=Path), help="Write Graphviz DOT.")
@click.option("--svg", "svg_path", type=click.Path(dir_okay=False, path_type=Path), help="Write an SVG picture.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the IR as JSON.")
@click.option("--text", "text_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the IR's full text form.")
@click.option("--method", default="dnat", show_default=True,
              help="Say what this method could change (see `archir transform --help` for the methods).")
@click.option("--submodule", help="Trace only this part of the model (a dotted path, e.g. backbone), on "
              "the tensors it receives when the whole model runs on the example input.")
@click.option("--leaf-module", "leaf_modules", multiple=True, metavar="PATH",
              help="Keep this submodule whole (one opaque operation) when tracing; repeatable.")
@click.option("--auto-submodule/--no-auto-submodule", default=True, show_default=True,
              help="Where the model's own forward cannot be traced and no --submodule is given, show its "
              "largest child that can be (what archir transform searches).")
@click.option("--groups", "show_groups", is_flag=True,
              help="Also list the cell-sharing groups (edges that share one θ with --share cell).")
def inspect(model_file: Path, input_shape, granularity, dot_path, svg_path, json_path, text_path, method,
            show_groups, submodule, leaf_modules, auto_submodule) -> None:
    """Trace MODEL_FILE and print a summary and its IR table."""
    from . import methods, trace
    from .drawing import GRAPHVIZ_HINT, write_svg
    from .fileio import write_text
    from .model_file import load_model_file
    from .summary import format_groups, format_summary, format_table, graph_json

    chosen = methods.create(method)
    spec = load_model_file(model_file, input_shape)
    model, inputs = spec.model, spec.example_inputs
    from .search_space import inside_part, largest_part_that_traces, submodule_and_inputs, untraceable_reason

    def trace_part(path: str | None, leaves, groups):
        part, part_inputs = submodule_and_inputs(model, path, inputs) if path else (model, inputs)
        return trace(part, part_inputs, granularity, groups=groups, leaf_modules=leaves)

    try:  # an explicit --submodule's leaves and groups are given relative to it
        graph = trace_part(submodule, leaf_modules, spec.groups)
    except TraceError as failure:  # as archir transform does: the largest child that traces
        found = None if submodule or not auto_submodule else largest_part_that_traces(
            model, lambda p: trace_part(p, *inside_part(p, leaf_modules, spec.groups)))
        if found is None:
            raise
        path, graph, share = found
        click.echo(f"archir: warning: {untraceable_reason(model, failure)}; showing its largest part that does, "
                   f"{path!r} ({share}), which archir transform searches (--submodule PATH chooses another)",
                   err=True)
    graph.verify()
    click.echo(format_summary(graph, str(model_file), chosen))
    click.echo()
    click.echo(format_table(graph, searchable=chosen.searchable(graph) or None))
    if show_groups:
        click.echo()
        click.echo(format_groups(graph))
    if dot_path:
        write_text(dot_path, graph.to_dot())
        click.echo(f"\nwrote {dot_path}")
    if svg_path:
        how = write_svg(graph, svg_path)
        click.echo(f"wrote {svg_path}")
        if how == "matplotlib":
            click.echo(f"note: {GRAPHVIZ_HINT}", err=True)
    if json_path:
        write_text(json_path, json.dumps(graph_json(graph, chosen), indent=2, default=str))
        click.echo(f"wrote {json_path}")
    if text_path:
        write_text(text_path, str(graph) + "\n")
        click.echo(f"wrote {text_path}")


def _run_transform(model_file: Path, method: str, input_shape, out, quiet, leaf_modules, **flags) -> None:
    """Transform MODEL_FILE: search, train, derive, and write the slim model to --out."""
    from . import methods
    from .model_file import load_model_file
    from .options import fields_of, given_on_command_line
    from .pipeline import TransformOptions, transform as run_transform
    from .training import seed_everything

    ctx = click.get_current_context()
    given = given_on_command_line(ctx, flags)
    own = fields_of(methods.get(method).Options)
    common = fields_of(TransformOptions)
    for name in given:
        if name not in own and name not in common:
            owners = sorted(n for n, cls in methods.available().items() if name in fields_of(cls.Options))
            flag = next(p.opts[0] for p in ctx.command.params if p.name == name)
            raise UserInputError(f"{flag} is an option of {', '.join(owners)}, not of --method {method}")
    options = dict(given)
    from . import distributed

    if options.get("nproc", 1) > 1 and not distributed.launched():  # start the processes; each runs this again
        import shlex

        os.environ["ARCHIR_COMMAND"] = shlex.join(sys.argv[1:])
        sys.exit(distributed.launch(options["nproc"], _without_nproc(sys.argv[1:])))
    options.pop("nproc", None)
    seed_everything(options.get("seed", TransformOptions.seed))  # the model file's initialisation follows --seed
    spec = load_model_file(model_file, input_shape)
    train_data = val_data = None
    if spec.data is not None:
        from .model_file import _call

        datasets = _call(spec.data, "data()", spec.path)
        if not (isinstance(datasets, (tuple, list)) and len(datasets) == 2):
            raise UserInputError(f"{model_file}: data() must return (train_dataset, val_dataset)")
        train_data, val_data = datasets
    try:
        res = run_transform(spec.model, spec.example_inputs, method, train_data, val_data, out, task=spec.task,
                            groups=spec.groups, leaf_modules=leaf_modules, collate=spec.collate,
                            progress=not quiet, **options)
    finally:
        distributed.teardown()
    world_rank = int(os.environ.get("RANK", "0") or 0)
    if world_rank == 0:  # one summary for a run of several processes
        click.echo(transform_summary(res))


def _without_nproc(argv: list[str]) -> list[str]:
    """``argv`` less ``--nproc N`` / ``--nproc=N`` (the launched processes must not launch again)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def transform_summary(res) -> str:
    """What ``archir transform`` prints at the end: what changed, the metric, the baseline."""
    from .ir.printer import human

    r = res.report
    o, t, metric = r["original"], r["transformed"], r["metric"]
    from .output_dir import decision_changed

    changed = [d for d in r["decisions"] if decision_changed(d)]
    shown = ", ".join(f"{d['edge']}→{d['decision']}" for d in changed[:8]) + (" …" if len(changed) > 8 else "")
    sub = r.get("submodule")
    where = f" (inside {sub['path']} of {sub['model']})" if sub else ""
    lines = [f"{res.graph.name}{where}: {len(changed)} of {len(r['decisions'])} edges changed"
             + (f" ({shown})" if changed else "")]

    def fmt(v):
        if v is None:
            return "not trained"
        return f"{100 * v:.2f}%" if metric == "accuracy" else f"{v:.4g}"

    lines.append(f"  parameters {o['parameters']:,} -> {t['parameters']:,}; FLOPs {human(o['flops_per_example'])} -> "
                 f"{human(t['flops_per_example'])}; validation {metric} {fmt(t['val_' + metric])}")
    if "baseline" in r:
        row = r["baseline"]["rows"]["val_" + metric]
        diff = row["difference"]
        d = "" if diff is None else (f" ({100 * diff:+.2f} points)" if metric == "accuracy" else f" ({diff:+.4g})")
        lines.append(f"  baseline: the original trained alone reached {fmt(row['original'])}{d}")
    else:
        lines.append("  the original was not trained on this data (--baseline compares the two)")
    if res.out is not None:
        lines.append(f"  wrote {', '.join(Path(f).name for f in res.files)} to {res.out}")
    onnx = r.get("onnx") or {}
    if onnx and not onnx.get("passed"):
        lines.append(f"  warning: the ONNX model did not verify against ONNX Runtime, kept as "
                     f"{Path(onnx['path']).name} (report.md says where it differs)")
    return "\n".join(lines)


def transform_command() -> click.Command:
    """``archir transform``, built from the options dataclasses of the pipeline and of every
    registered method: a method adds flags without CLI code."""
    from . import methods
    from .options import click_params, fields_of
    from .pipeline import DEFAULT_OUT, TransformOptions

    registered = methods.available()
    common = fields_of(TransformOptions)
    for name, cls in registered.items():
        clash = set(fields_of(cls.Options)) & set(common)
        if clash:
            raise TypeError(f"method {name}'s options {sorted(clash)} clash with archir transform's own")
    method_help = "; ".join(f"{n}: {cls.summary}" for n, cls in registered.items())
    params = [
        click.Argument(["model_file"], type=click.Path(dir_okay=False, path_type=Path)),
        click.Option(["--method"], type=click.Choice(list(registered)), default="dnat", show_default=True,
                     help=method_help),
        *click_params([TransformOptions]),
        *click_params([cls.Options for cls in registered.values()],
                      {cls.Options: n for n, cls in registered.items()}),
        click.Option(["--input-shape"], help="Example input shape (default: MODEL.py's example_input())."),
        click.Option(["--out"], type=click.Path(file_okay=False, path_type=Path), default=Path(DEFAULT_OUT),
                     show_default=True, help="Output directory (must be empty unless --force)."),
        click.Option(["--leaf-module", "leaf_modules"], multiple=True, metavar="PATH",
                     help="Keep this submodule whole (one opaque operation) when tracing; repeatable. "
                          "model.py must be able to rebuild it (torch.nn modules, plain ones of yours)."),
        click.Option(["--quiet"], is_flag=True, help="No progress bars or per-epoch lines."),
    ]
    return click.Command("transform", callback=_run_transform, params=params, help=_run_transform.__doc__,
                         context_settings={"help_option_names": ["-h", "--help"]})


@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False, path_type=Path),
              help="ONNX file to write (default: DIRECTORY/model.onnx).")
@click.option("--opset", type=int, help="ONNX opset (default: the exporter's).")
@click.option("--rtol", type=float, default=1e-4, show_default=True,
              help="Relative tolerance of the ONNX Runtime check.")
@click.option("--atol", type=float, default=1e-5, show_default=True,
              help="Absolute tolerance of the ONNX Runtime check.")
@click.option("--no-dynamic-batch", is_flag=True, help="Fix the batch size to the example's.")
@click.option("--input-shape", help="Example input shape, e.g. 1,3,32,32 (default: report.json's example_inputs).")
def export(directory: Path, onnx_path, opset, rtol, atol, no_dynamic_batch, input_shape) -> None:
    """Export the model in DIRECTORY (a transform's --out) to ONNX and check it against ONNX Runtime."""
    from .reexport import export_output_dir, summary_line
    from .model_file import parse_shape

    shape = parse_shape(input_shape) if input_shape else None
    report = export_output_dir(directory, onnx_path, opset=opset, rtol=rtol, atol=atol,
                               dynamic_batch=not no_dynamic_batch, input_shape=shape)
    click.echo(summary_line(report))


@main.command()
@click.argument("directories", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the tables as Markdown to this file.")
@click.option("--format", "fmt", type=click.Choice(["text", "markdown"]), default="text", show_default=True,
              help="How to print the tables.")
@click.option("--no-latency", is_flag=True, help="Do not time the runs' model.onnx with ONNX Runtime.")
@click.option("--batch", type=int, help="Batch size of the latency measurement (default: each run's example's).")
def compare(directories, markdown_path, fmt, no_latency, batch) -> None:
    """Finished runs (their --out directories) side by side; mean ± std over seeds of equal settings."""
    from .fileio import write_text
    from .run_compare import compare_runs, render

    _, tables = compare_runs(list(directories), latency=not no_latency, batch=batch)
    click.echo(render(tables, fmt), nl=False)
    if markdown_path is not None:
        write_text(markdown_path, render(tables, "markdown"))


if __name__ == "__main__":  # pragma: no cover
    main()
