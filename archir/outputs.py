"""The files of a transform's output directory (each written atomically).

model.py + weights.pt (standalone slim module), model.onnx (checked against ONNX Runtime),
graph.svg (the original graph, changed edges in colour), theta.png (θ trajectories), report.md.
report.json is written by :func:`archir.pipeline.transform` last, with the total time.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .drawing import write_svg
from .fileio import atomic_path, write_text
from .printer import human

if TYPE_CHECKING:
    from .pipeline import Result, TransformOptions


def write_outputs(res: "Result", inputs: tuple, opts: "TransformOptions") -> dict[str, str]:
    from archir.backends.standalone import emit_standalone

    out = res.out
    files: dict[str, str] = {}
    header = (f"Emitted by archir {res.report['versions']['archir']} ({opts.method}, share={opts.share}, "
              f"seed={opts.seed}) from {res.graph.name}.")
    emitted = emit_standalone(res.module, out, class_name=f"Slim{res.graph.name}", example_inputs=inputs,
                              header=header)
    files["model.py"], files["weights.pt"] = str(emitted.model_py), str(emitted.weights)
    if opts.onnx:
        from archir.backends.onnx_export import export_onnx

        onnx_report = export_onnx(res.module, inputs, out / "model.onnx")
        res.report["onnx"] = onnx_report.to_dict()
        files["model.onnx"] = str(out / "model.onnx")
    how = write_svg(res.original_graph, out / "graph.svg")
    res.report["graph_svg_drawn_with"] = how
    files["graph.svg"] = str(out / "graph.svg")
    plot_theta(res.report, out / "theta.png")
    files["theta.png"] = str(out / "theta.png")
    write_text(out / "report.md", report_markdown(res.report))
    files["report.md"] = str(out / "report.md")
    files["report.json"] = str(out / "report.json")
    return files


def plot_theta(report: dict[str, Any], path: Path) -> None:
    """One panel per choice (none / identity / same): each θ's normalised weight per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(0, report.get("initial_weights") or {})]
    points += [(h["epoch"] + 1, h["weights"] or {}) for h in report["theta_history"] if h["stage"] == "arch"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), sharey=True)
    thetas = {}
    for d in report["decisions"]:
        if d.get("theta") and d["theta"] not in thetas:
            thetas[d["theta"]] = d["edge"]
    colors = plt.get_cmap("tab20")
    for ax, choice in zip(axes, ("none", "identity", "same")):
        for i, (name, edge) in enumerate(thetas.items()):  # one colour per θ in every panel
            xs = [x for x, w in points if edge in w and choice in w[edge]]
            ys = [w[edge][choice] for x, w in points if edge in w and choice in w[edge]]
            if xs:
                ax.plot(xs, ys, marker="o", markersize=2, linewidth=1, color=colors(i % 20),
                        label=f"{name} ({edge})")
        ax.set_title(f"weight of '{choice}'")
        ax.set_xlabel("epoch")
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("θ_k / Σθ")
    if 0 < len(thetas) <= 20:
        axes[-1].legend(fontsize=6, loc="lower left")
    fig.suptitle("architecture weights during the architecture stage")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.2f}%"


def report_markdown(report: dict[str, Any]) -> str:
    o, t, opts = report["original"], report["transformed"], report["options"]
    changed = [d for d in report["decisions"] if d["decision"] != "same"]
    lines = [
        f"# archir transform: {opts['method']} ({opts['share']} sharing)",
        "",
        "| | original | transformed |",
        "|---|---|---|",
        f"| parameters | {o['parameters']:,} | {t['parameters']:,} |",
        f"| FLOPs (multiply-adds per example) | {human(o['flops_per_example'])} | {human(t['flops_per_example'])} |",
        f"| edges | {o['edges']} | {t['edges']} |",
        f"| validation accuracy | {_pct(o['val_accuracy_before_training'])} (before training) | "
        f"{_pct(t['val_accuracy'])} |",
        "",
        f"Data: `{opts['data']}`; {opts['epochs']} epochs, of which {min(opts['arch_epochs'], opts['epochs'])} "
        f"architecture epochs ({opts['arch_update']} updates, θ learning rate {opts['arch_lr']}); seed {opts['seed']}; "
        f"device {report['device']}.",
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
    lines += ["", "![theta](theta.png)", "", "## Training", "",
              "| epoch | stage | train loss | train acc | val acc | seconds |", "|---|---|---|---|---|---|"]
    for h in report["history"]:
        lines.append(f"| {h['epoch'] + 1} | {h['stage']} | {h['train_loss']:.4f} | {_pct(h['train_acc'])} | "
                     f"{_pct(h.get('val_acc'))} | {h['seconds']:.1f} |")
    if "onnx" in report:
        lines += ["", f"ONNX: `model.onnx` verified against ONNX Runtime: {report['onnx'].get('passed')}."]
    lines += ["", "Files: `model.py` + `weights.pt` (standalone slim module, needs only torch), `model.onnx`, "
              "`report.json` (everything above, θ history, timings, versions).", ""]
    return "\n".join(lines)
