"""The ``archir`` command. It parses options and calls the Python API; it holds no logic of its own.

Errors the user can fix (a missing file, a model that fails, a bad option) print one line on
stderr and exit with code 2; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .errors import ArchirError, UserInputError

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
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ArchirError as exc:
            _fail(exc, EXIT_USER_ERROR)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            click.echo("archir: interrupted; outputs written so far are kept.", err=True)
            sys.exit(130)
        except Exception as exc:  # noqa: BLE001 - one line unless --debug
            _fail(exc, 1)


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
def inspect(model_file: Path, input_shape, granularity, dot_path, svg_path, json_path, text_path) -> None:
    """Trace MODEL_FILE and print a summary and its IR table."""
    from . import trace
    from .drawing import GRAPHVIZ_HINT, write_svg
    from .fileio import write_text
    from .model_file import load_model_file
    from .summary import format_summary, format_table, graph_json

    spec = load_model_file(model_file, input_shape)
    graph = trace(spec.model, spec.example_inputs, granularity)
    graph.verify()
    click.echo(format_summary(graph, str(model_file)))
    click.echo()
    click.echo(format_table(graph))
    if dot_path:
        write_text(dot_path, graph.to_dot())
        click.echo(f"\nwrote {dot_path}")
    if svg_path:
        how = write_svg(graph, svg_path)
        click.echo(f"wrote {svg_path}")
        if how == "matplotlib":
            click.echo(f"note: {GRAPHVIZ_HINT}", err=True)
    if json_path:
        write_text(json_path, json.dumps(graph_json(graph), indent=2, default=str))
        click.echo(f"wrote {json_path}")
    if text_path:
        write_text(text_path, str(graph) + "\n")
        click.echo(f"wrote {text_path}")


@main.command()
@click.argument("model_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--method", type=click.Choice(["dnat"]), default="dnat", show_default=True,
              help="dnat: every edge chooses none / identity / its original operations.")
@click.option("--share", type=click.Choice(["cell", "full"]), default="cell", show_default=True,
              help="cell: repeated blocks share architecture weights; full: one per edge.")
@click.option("--granularity", type=click.Choice(["layer", "block"]), default="layer", show_default=True)
@click.option("--data", default="digits", show_default=True,
              help="digits (bundled, offline), cifar10 (from --data-dir), or an image-folder path.")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Where cifar10 lives "
              "(default ~/.cache/archir-data or $ARCHIR_DATA_DIR).")
@click.option("--subset", type=int, help="Use only this many training images (stratified).")
@click.option("--epochs", type=int, default=10, show_default=True, help="Total epochs (both stages).")
@click.option("--arch-epochs", type=int, default=5, show_default=True, help="Epochs of the architecture stage.")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--lr", type=float, default=0.1, show_default=True, help="SGD learning rate of the weights (cosine).")
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--weight-decay", type=float, default=5e-4, show_default=True)
@click.option("--arch-lr", type=float, default=0.05, show_default=True, help="Adam learning rate of θ.")
@click.option("--arch-update", type=click.Choice(["alternate", "split", "joint"]), default="alternate",
              show_default=True, help="alternate: ω then θ on each batch; split: θ on a held-out part; "
              "joint: one backward pass for both.")
@click.option("--no-augment", is_flag=True, help="No random crop/flip of training batches.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--from-weights", type=click.Path(dir_okay=False), help="Start from these trained weights "
              "(a state_dict of the model).")
@click.option("--input-shape", help="Example input shape (default: MODEL.py's example_input()).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("archir-out"),
              show_default=True, help="Output directory (must be empty unless --force).")
@click.option("--force", is_flag=True, help="Overwrite files in a non-empty output directory.")
@click.option("--no-onnx", is_flag=True, help="Do not write model.onnx.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def transform(model_file: Path, input_shape, no_augment, no_onnx, quiet, out, **options) -> None:
    """Transform MODEL_FILE: search, train, derive, and write the slim model to --out."""
    from .model_file import load_model_file
    from .printer import human
    from .pipeline import transform as run_transform

    from .training import seed_everything

    seed_everything(options["seed"])  # the model file's random initialisation follows --seed too
    spec = load_model_file(model_file, input_shape)
    train_data = val_data = None
    if spec.data is not None:
        datasets = spec.data()
        if not (isinstance(datasets, tuple) and len(datasets) == 2):
            raise UserInputError(f"{model_file}: data() must return (train_dataset, val_dataset)")
        train_data, val_data = datasets
    method = options.pop("method")
    res = run_transform(spec.model, spec.example_inputs, method, train_data, val_data, out,
                        augment=not no_augment, onnx=not no_onnx, progress=not quiet, **options)
    o, t = res.report["original"], res.report["transformed"]
    changed = [d for d in res.report["decisions"] if d["decision"] != "same"]
    acc = f"{100 * t['val_accuracy']:.2f}%" if t["val_accuracy"] is not None else "not trained"
    shown = ", ".join(f"{d['edge']}→{d['decision']}" for d in changed[:8]) + (" …" if len(changed) > 8 else "")
    click.echo(f"{res.graph.name}: {len(changed)} of {len(res.report['decisions'])} edges changed"
               + (f" ({shown})" if changed else ""))
    click.echo(f"  parameters {o['parameters']:,} -> {t['parameters']:,}; FLOPs {human(o['flops_per_example'])} -> "
               f"{human(t['flops_per_example'])}; validation accuracy {acc}")
    click.echo(f"  wrote {', '.join(Path(f).name for f in res.files)} to {res.out}")


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
    from .export_cmd import export_output_dir, summary_line
    from .model_file import parse_shape

    shape = parse_shape(input_shape) if input_shape else None
    report = export_output_dir(directory, onnx_path, opset=opset, rtol=rtol, atol=atol,
                               dynamic_batch=not no_dynamic_batch, input_shape=shape)
    click.echo(summary_line(report))


if __name__ == "__main__":  # pragma: no cover
    main()
