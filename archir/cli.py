"""The ``archir`` command. It parses options and calls the Python API; it holds no logic of its own.

Errors the user can fix (a missing file, a model that fails, a bad option) print one line on
stderr and exit with code 2; ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .errors import ArchirError

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


if __name__ == "__main__":  # pragma: no cover
    main()
