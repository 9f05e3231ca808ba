"""The files of a transform's output directory (each written atomically).

model.py + weights.pt (standalone slim module), model.onnx (checked against ONNX Runtime),
graph.svg (the original graph, changed edges in colour), arch.png (the architecture weights of
every searchable edge per epoch), report.md. report.json is written by
:func:`archir.pipeline.transform` last, with the total time.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .drawing import write_svg
from .errors import UserInputError
from .fileio import atomic_path, recover_directory, remove_stale_temporaries, replace_directory, write_text
from .ir.printer import human

if TYPE_CHECKING:
    from .pipeline import Result


#: What ``archir transform`` writes into ``--out`` (``archir export`` may add more ``*.onnx``).
OUTPUT_FILES = ("model.py", "weights.pt", "model.onnx", "model.onnx.data", "report.json", "report.md",
                "graph.svg", "arch.png", "checkpoint.pt")
CHECKPOINT = "checkpoint.pt"


@dataclass
class RunDir:
    """Where a run writes. ``staging`` (``.<name>.archir-partial`` beside ``final``) receives the
    checkpoints and every output; :func:`commit_run_dir` puts it in place of ``final`` only when
    the run has succeeded, so ``final`` holds one run's complete set of files, old or new, never a
    mix. ``resume_from``: the checkpoint a ``--resume`` continues from."""

    final: Path
    staging: Path
    resume_from: Path | None = None


def staging_dir(out: Path) -> Path:
    """The staging directory of output directory ``out``."""
    return out.parent / f".{out.name}.archir-partial"


def _is_ours(p: Path) -> bool:
    name = p.name
    return p.is_file() and (name in OUTPUT_FILES or name.endswith((".onnx", ".onnx.data"))
                            or (name.startswith(".") and name.endswith(".tmp")))


def prepare_run_dir(out: str | Path, *, force: bool = False, resume: bool = False) -> RunDir:
    """Check ``out`` and make its staging directory (nothing in ``out`` is changed here).

    - ``out`` must be a directory or not exist; a non-empty one needs ``force`` (or ``resume``),
      and with ``force`` it may hold only files archir writes: the whole set is replaced when the
      run succeeds, so a directory of other files is refused rather than emptied.
    - A staging directory left by an interrupted run (its ``checkpoint.pt``) is continued with
      ``resume``, discarded with ``force``, and otherwise refused with a line saying both; one
      without a checkpoint (a run killed before its first epoch ended) is simply discarded, as are
      the temporary files of killed atomic writes.
    - ``resume`` without such a checkpoint is an error.
    """
    out = Path(out).expanduser()
    if out.is_symlink():  # replace the folder it points to, not the link
        out = out.resolve()
    recover_directory(out)  # a crash between the two renames of a commit
    if out.exists() and not out.is_dir():
        raise UserInputError(f"output path {out} exists and is not a directory")
    staging = staging_dir(out)
    checkpoint = staging / CHECKPOINT
    if resume:
        if not checkpoint.is_file():
            done = " (the run there finished: nothing to resume)" if (out / "report.json").is_file() else ""
            raise UserInputError(f"--resume: no checkpoint of an interrupted run for --out {out} (looked for "
                                 f"{checkpoint}){done}; run without --resume to start")
        remove_stale_temporaries(staging)
        return RunDir(out, staging, checkpoint)
    if checkpoint.is_file() and not force:
        raise UserInputError(f"an interrupted run for --out {out} left a checkpoint in {staging}: add --resume to "
                             "continue it, or --force to start over")
    remove_stale_temporaries(out)  # half-written files of a killed run are no outputs
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UserInputError(f"output directory {out} is not empty; choose another --out or pass --force "
                                 "to overwrite its files")
        foreign = sorted(p.name for p in out.iterdir() if not _is_ours(p))
        if foreign:
            raise UserInputError(f"--force would replace {out} as a whole, but it holds files archir did not "
                                 f"write ({', '.join(foreign[:5])}{' …' if len(foreign) > 5 else ''}); "
                                 "choose another --out")
    if staging.exists():
        shutil.rmtree(staging)
    return RunDir(out, staging)


def commit_run_dir(run: RunDir) -> None:
    """Put the finished run's staging directory in place of ``run.final`` (see
    :func:`archir.fileio.replace_directory`)."""
    remove_stale_temporaries(run.staging)
    run.final.parent.mkdir(parents=True, exist_ok=True)
    replace_directory(run.staging, run.final)


def emit_model(module: nn.Module, out: Path, inputs: tuple, *, onnx: bool, class_name: str, header: str
               ) -> tuple[dict[str, str], Any, tuple[str, ...]]:
    """model.py + weights.pt (checked in a fresh namespace against ``module``) and, with ``onnx``,
    model.onnx (checked against ONNX Runtime). Returns (files, the ONNX report or None, the
    packages model.py imports besides torch: ``("torchvision",)`` for a detector's opaque parts)."""
    from archir.backends.standalone import emit_standalone

    emitted = emit_standalone(module, out, class_name=class_name, example_inputs=inputs, header=header)
    files = {"model.py": str(emitted.model_py), "weights.pt": str(emitted.weights)}
    onnx_report = None
    if onnx:
        from archir.backends.onnx_export import OnnxVerificationError, export_onnx

        try:
            onnx_report = export_onnx(module, inputs, out / "model.onnx")
            files["model.onnx"] = str(out / "model.onnx")
        except OnnxVerificationError as exc:
            # the trained network, model.py and the report are still the run's result: keep them,
            # with the model that did not verify under its own name, and say so (report, summary)
            if exc.report is None:
                raise
            onnx_report = exc.report
            onnx_report.notes.append(str(exc))
            files[Path(onnx_report.path).name] = onnx_report.path
    return files, onnx_report, emitted.packages


def write_outputs(res: "Result", inputs: tuple, onnx: bool = True) -> dict[str, str]:
    """Write model.py, weights.pt, model.onnx (with ``onnx``), graph.svg, arch.png (if any edge was
    searchable) and report.md into ``res.out``, adding ``onnx`` and ``graph_svg_drawn_with`` to
    ``res.report``. Returns ``{file name: path}``, report.json included (written later by the caller)."""
    out, report = res.out, res.report
    header = (f"Emitted by archir {report['versions']['archir']} ({report['method']}, "
              f"{_options_text(report['method_options'])}seed={report['seed']}) from {res.graph.name}.")
    if (report.get("options") or {}).get("progress"):
        from .progress import say

        say("writing model.py and weights.pt (checked in a fresh namespace)"
            + (", exporting model.onnx and checking it against ONNX Runtime" if onnx else ""))
    files, onnx_report, packages = emit_model(res.module, out, inputs, onnx=onnx,
                                              class_name=f"Slim{res.graph.name}", header=header)
    report["model_py_needs"] = ["torch", *packages]
    if onnx_report is not None:
        report["onnx"] = onnx_report.to_dict()
    if res.whole is not None:
        files["whole_weights.pt"] = str(_save_whole_weights(res.whole, report["submodule"]["path"],
                                                            Path(files["weights.pt"]), out / "whole_weights.pt"))
    report["graph_svg_drawn_with"] = write_svg(res.original_graph, out / "graph.svg")
    files["graph.svg"] = str(out / "graph.svg")
    if plot_arch_weights(report, out / "arch.png"):
        files["arch.png"] = str(out / "arch.png")
    write_text(out / "report.md", report_markdown(report))
    files["report.md"] = str(out / "report.md")
    files["report.json"] = str(out / "report.json")
    return files


def _save_whole_weights(whole: nn.Module, path: str, part_weights: Path, dest: Path) -> Path:
    """The whole model's state dict with the part at ``path`` as model.py names it (its
    ``weights.pt``, whose names differ from the derived module's): what ``load_state_dict`` wants
    once ``model.set_submodule(path, load_model())`` put the emitted part in place. The rest of
    the model needs the user's code, so only its weights are written."""
    from .fileio import save_torch

    prefix = path + "."
    state = {k: v for k, v in whole.state_dict().items() if not k.startswith(prefix)}
    state.update({prefix + k: v for k, v in torch.load(part_weights, weights_only=True).items()})
    return save_torch(state, dest)


def _options_text(options: dict[str, Any]) -> str:
    return "".join(f"{k}={v}, " for k, v in options.items())


def plot_arch_weights(report: dict[str, Any], path: Path) -> bool:
    """One panel per choice name (DNAT: none / identity / same): the weight of that choice on each
    architecture parameter's first edge, per epoch of the architecture stage. False (nothing
    written) when the method has no searchable edge."""
    points = [(0, report.get("initial_weights") or {})]
    points += [(h["epoch"] + 1, h["weights"] or {}) for h in report["arch_history"] if h["stage"] == "arch"]
    params: dict[str, str] = {}
    for d in report["decisions"]:
        if d.get("param") and d["param"] not in params:
            params[d["param"]] = d["edge"]
    choices: list[str] = []
    for _, weights in points:
        for w in weights.values():
            choices += [c for c in w if c not in choices]
    if not params or not choices:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one panel (DSO-NAS: λ per edge) needs room for the title too
    fig, axes = plt.subplots(1, len(choices), figsize=(max(4 * len(choices), 6.5), 3.4), sharey=True,
                             squeeze=False)
    axes = axes[0]
    colors = plt.get_cmap("tab20")
    for ax, choice in zip(axes, choices):
        for i, (name, edge) in enumerate(params.items()):  # one colour per parameter in every panel
            xs = [x for x, w in points if edge in w and choice in w[edge]]
            ys = [w[edge][choice] for x, w in points if edge in w and choice in w[edge]]
            if xs:
                ax.plot(xs, ys, marker="o", markersize=2, linewidth=1, color=colors(i % 20),
                        label=f"{name} ({edge})")
        ax.set_title(f"weight of '{choice}'")
        ax.set_xlabel("epoch")
    axes[0].set_ylabel("weight")
    if 0 < len(params) <= 20:
        axes[-1].legend(fontsize=6, loc="lower left")
    fig.suptitle(f"{report['method']}: architecture weights during the architecture stage")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return True


def format_metric(metric: str, value) -> str:
    """``accuracy`` in percent (``85.20%``), any other metric with 4 significant digits, None as ``–``."""
    if value is None:
        return "–"
    return f"{100 * value:.2f}%" if metric == "accuracy" else f"{value:.4g}"


def decision_changed(d: dict[str, Any]) -> bool:
    """Whether a report.json decision changed its edge (a report from before ``changed``
    existed: whether the decision is anything but "same")."""
    return bool(d["changed"]) if d.get("changed") is not None else d["decision"] != "same"


def _last_batch_sentence(report: dict[str, Any]) -> str:
    """report.md's word on samples each epoch left out (a model that takes lists of exactly one
    batch, :func:`archir.pipeline.lists_sized_by_batch`); empty when none were."""
    left_out = report.get("last_batch_left_out")
    if not left_out:
        return ""
    what = ", ".join(f"{k} {part}" for part, k in left_out["samples_left_out"].items())
    inputs = ", ".join(f"`{name}`" for name in left_out["inputs"])
    return (f" The model takes {inputs} as exactly {report['options']['batch_size']} items (as traced), so each "
            f"epoch left out its last, smaller batch ({what} samples).")


def report_markdown(report: dict[str, Any]) -> str:
    """report.md's text: the original-vs-transformed table (or the baseline comparison), the run's
    settings, the decisions of every searchable edge, the training history and the files."""
    from .comparison import comparison_markdown

    o, t, opts, metric = report["original"], report["transformed"], report["options"], report["metric"]
    changed = [d for d in report["decisions"] if decision_changed(d)]
    lines = [
        f"# archir transform: {report['method']} ({_options_text(report['method_options']).rstrip(', ')})",
        "",
    ]
    sub = report.get("submodule")
    if sub:
        whole = sub["whole_parameters"]
        lines += [f"Searched inside `{sub['path']}` of {sub['model']} only"
                  + (f" (chosen automatically: {sub['automatic']})" if sub.get("automatic") else "")
                  + f"; the figures below are that part's. The whole model: {whole['original']:,} → "
                  f"{whole['transformed']:,} parameters.", ""]
    if "baseline" in report:
        lines += comparison_markdown(report["baseline"])
    else:
        lines += [
            "| | original | transformed |",
            "|---|---|---|",
            f"| parameters | {o['parameters']:,} | {t['parameters']:,} |",
            f"| FLOPs (multiply-adds per example) | {human(o['flops_per_example'])} | "
            f"{human(t['flops_per_example'])} |",
            f"| edges | {o['edges']} | {t['edges']} |",
            f"| validation {metric} | not trained (run with `--baseline` to compare) | "
            f"{format_metric(metric, t['val_' + metric])} |",
        ]
    lines += [
        "",
        f"Data: `{opts['data']}`; {opts['epochs']} epochs, of which {report['effective']['arch_epochs']} "
        f"architecture epochs ({opts['arch_update']} updates, architecture learning rate {opts['arch_lr']}); "
        f"seed {opts['seed']}; device {report['device']}.{_last_batch_sentence(report)}",
        "",
        "![graph](graph.svg)",
        "",
        "The original graph; edges whose choice changed are drawn in red (dashed: removed).",
        "",
        f"## Decisions ({len(changed)} of {len(report['decisions'])} edges changed)",
        "",
        "| edge | operations | choices | decision | final weights |",
        "|---|---|---|---|---|",
    ]
    for d in report["decisions"]:
        if d["choices"] == ["same"]:
            continue
        weights = ", ".join(f"{k} {v:.3f}" for k, v in (d["final_weights"] or {}).items())
        ops = " · ".join(d["ops"]) or "(direct)"
        lines.append(f"| {d['edge']} | {ops} | {', '.join(d['choices'])} | **{d['decision']}** | {weights} |")
    lines += ["", "![architecture weights](arch.png)", "", "## Training", ""]
    recipe = report.get("recipe")
    if recipe:
        supplied = ", ".join(f"{k} {v}" for k, v in recipe["applied"].items()) or "nothing"
        lines += [f"Recipe `{recipe['name']}`: it set {supplied}; the other options were given explicitly "
                  "or left at their defaults.", ""]
    lines += ["Changed: searchable edges whose leading choice is no longer the original, after each "
              "architecture epoch; warm-up epochs train the weights only.", "",
              f"| epoch | stage | train loss | train {metric} | val {metric} | changed | seconds |",
              "|---|---|---|---|---|---|---|"]
    for h in report["history"]:
        stage = f"{h['stage']} (warm-up)" if h.get("warmup") else h["stage"]
        changed = ("" if h.get("changed_edges") is None else
                   f"{len(h['changed_edges'])}/{h.get('searchable_edges')}")
        lines.append(f"| {h['epoch'] + 1} | {stage} | {h['train_loss']:.4f} | "
                     f"{format_metric(metric, h.get('train_metric'))} | {format_metric(metric, h.get('val_metric'))} "
                     f"| {changed} | {h['seconds']:.1f} |")
    if "onnx" in report and not report["onnx"].get("passed"):
        lines += ["", f"ONNX: the exported model did not verify against ONNX Runtime and is kept as "
                      f"`{Path(report['onnx']['path']).name}`: {report['onnx']['notes'][-1]}"]
    elif "onnx" in report:
        lines += ["", f"ONNX: `model.onnx` verified against ONNX Runtime: {report['onnx'].get('passed')}."]
    needs = " and ".join(report.get("model_py_needs") or ["torch"])
    needs = "only torch" if needs == "torch" else needs
    lines += ["", f"Files: `model.py` + `weights.pt` (standalone slim module, needs {needs}), `model.onnx`, "
              "`report.json` (everything above, architecture weights per epoch, timings, versions)."]
    if sub:
        lines += ["", f"`model.py`, `weights.pt` and `model.onnx` hold the slim `{sub['path']}`; "
                  "`whole_weights.pt` is the state dict of the whole trained model with it in place. "
                  "To rebuild that model (its other parts need your own code):", "", "```python",
                  "import torch", "from model import load_model  # this directory's model.py",
                  "model = build_model()  # your MODEL.py's model",
                  f"model.set_submodule({sub['path']!r}, load_model())",
                  "model.load_state_dict(torch.load('whole_weights.pt'))", "```"]
    lines.append("")
    return "\n".join(lines)
