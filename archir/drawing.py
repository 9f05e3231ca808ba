"""Pictures of a graph: Graphviz when ``dot`` is installed, matplotlib otherwise."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from .fileio import atomic_path, write_bytes

if TYPE_CHECKING:
    from .ir import Graph

GRAPHVIZ_HINT = ("Graphviz's 'dot' is not installed, so the picture was drawn with matplotlib; for a "
                 "better layout install Graphviz (apt-get install graphviz, brew install graphviz or "
                 "conda install graphviz) or render the --dot file elsewhere.")


def have_graphviz() -> bool:
    return shutil.which("dot") is not None


def write_svg(graph: "Graph", path: str | Path, *, force_matplotlib: bool = False) -> str:
    """Write an SVG picture; return ``"graphviz"`` or ``"matplotlib"`` (what drew it)."""
    if have_graphviz() and not force_matplotlib:
        svg = subprocess.run(["dot", "-Tsvg"], input=graph.to_dot().encode(), capture_output=True,
                             check=True, timeout=120).stdout
        write_bytes(path, svg)
        return "graphviz"
    _draw_matplotlib(graph, path)
    return "matplotlib"


def _draw_matplotlib(graph: "Graph", path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import networkx as nx

    dg = graph.dependency_graph()
    layers = list(nx.topological_generations(dg))
    pos = {}
    for depth, layer in enumerate(layers):
        for k, jid in enumerate(sorted(layer, key=list(graph.junctions).index)):
            pos[jid] = (k - (len(layer) - 1) / 2, -depth)
    width = max(4, 1.8 * max(len(layer) for layer in layers))
    fig, ax = plt.subplots(figsize=(width, max(4, 0.9 * len(layers))))
    for e in graph.edges.values():
        (x0, y0), (x1, y1) = pos[e.src], pos[e.dst]
        changed = bool(e.labels.get("changed"))
        color = "red" if changed else "#555555"
        style = "--" if e.labels.get("decision") == "none" else "-"
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops=dict(arrowstyle="->", color=color, linestyle=style, lw=2 if changed else 1,
                                    connectionstyle="arc3,rad=0.08"))
        text = (e.labels.get("decision", "") + " " if changed else "") + (
            e.ops[0].render() if len(e.ops) == 1 else f"{len(e.ops)} ops" if e.ops else "")
        ax.text((x0 + x1) / 2, (y0 + y1) / 2, f"{e.id} {text}".strip(), fontsize=6, color=color,
                ha="center", va="center", bbox=dict(fc="white", ec="none", alpha=0.7, pad=0.5))
    for jid, (x, y) in pos.items():
        j = graph.junctions[jid]
        kind = j.combine.kind if j.combine else ("in" if j.is_input else "")
        ax.scatter([x], [y], s=120, color="#d8e8ff" if j.is_input or kind else "#eeeeee",
                   edgecolors="#333333", zorder=3)
        ax.text(x + 0.08, y + 0.1, f"{jid} {kind}".strip(), fontsize=6)
    ax.set_axis_off()
    ax.set_title(f"{graph.name} ({len(graph.edges)} edges)")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="svg", bbox_inches="tight")
    plt.close(fig)
