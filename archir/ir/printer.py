"""Text and DOT forms of the IR. The text form is stable (golden tests compare it verbatim)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .graph import JunctionRef, Op, _render_value, meta_str

if TYPE_CHECKING:
    from .graph import Edge, Graph, Junction


def human(n: float) -> str:
    """1234567 -> '1.23M' (for summaries, not for golden text)."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def junction_line(g: "Graph", j: "Junction") -> str:
    if j.is_input:
        head = f"input {j.input_label}"
    elif j.combine is not None:
        operands = ", ".join(e.id for e in g.in_edges(j.id))
        head = f"{j.combine}({operands})"
    else:
        head = f"value({g.in_edges(j.id)[0].id})" if g.in_edges(j.id) else "value()"
    roles = [r for r in g.roles(j.id) if r in ("fork", "output", "multi")]
    tail = f"  [{', '.join(roles)}]" if roles else ""
    return f"%{j.id} = {head} : {meta_str(j.meta)}{tail}"


def edge_line(g: "Graph", e: "Edge") -> str:
    shapes = f"{meta_str(e.in_meta)} -> {meta_str(e.out_meta)}"
    cost = f"params={g.edge_params(e)} flops={e.flops}"
    labels = "".join(f" {k}={v}" for k, v in sorted(e.labels.items()) if isinstance(v, (str, int, float, bool)))
    return f"  {e.id}: %{e.src} -> %{e.dst}{'#' + str(e.dst_index) if g.junctions[e.dst].is_join else ''}" \
           f" | {e.render_ops()} | {shapes} | {cost}{labels}"


def output_text(g: "Graph") -> str:
    def render(v):
        if isinstance(v, JunctionRef):
            return f"%{v.id}"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k!r}: {render(x)}" for k, x in v.items()) + "}"
        if isinstance(v, (list, tuple)):
            inner = ", ".join(render(x) for x in v)
            return f"[{inner}]" if isinstance(v, list) else f"({inner}{',' if len(v) == 1 else ''})"
        if isinstance(v, Op):
            return _render_value(v)
        return repr(v)

    return f"return {render(g.output)}"


def format_graph(g: "Graph") -> str:
    """One line per junction, preceded by the lines of its incoming edges, in topological order."""
    lines = [f"graph {g.name} (granularity={g.granularity}, frontend={g.frontend}): "
             f"{len(g.junctions)} junctions, {len(g.edges)} edges, "
             f"params={g.total_params()}, flops={g.total_flops()}"]
    for jid in g.topo_order():
        for e in g.in_edges(jid):
            lines.append(edge_line(g, e))
        lines.append(junction_line(g, g.junctions[jid]))
    lines.append(output_text(g))
    return "\n".join(lines)


def _dot_escape(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')


def format_dot(g: "Graph", *, changed_color: str = "red") -> str:
    """Graphviz DOT: junctions as small nodes, operations and shapes on edge labels.

    Edges whose labels say ``changed`` are drawn in ``changed_color``; ``labels['decision']``
    (none / identity / same) is shown in the label.
    """
    out = [f'digraph "{_dot_escape(g.name)}" {{', "  rankdir=TB;",
           '  node [shape=box, style="rounded,filled", fillcolor="#f2f2f2", fontsize=10, fontname="Helvetica"];',
           '  edge [fontsize=9, fontname="Helvetica"];']
    for jid in g.topo_order():
        j = g.junctions[jid]
        roles = g.roles(jid)
        kind = j.combine.kind if j.combine is not None else ("input " + j.input_label if j.is_input else "")
        label = f"{jid} {kind}".strip() + f"\\n{meta_str(j.meta)}"
        shape = "ellipse" if j.combine is not None else "box"
        fill = "#d8e8ff" if j.is_input or "output" in roles else "#f2f2f2"
        out.append(f'  "{jid}" [label="{_dot_escape(label)}", shape={shape}, fillcolor="{fill}"];')
    for e in g.edges_in_order():
        ops = "\\n".join(_dot_escape(op.render()) for op in e.ops) or "(direct)"
        decision = e.labels.get("decision")
        label = f"{e.id}" + (f" [{decision}]" if decision else "") + f"\\n{ops}\\n{_dot_escape(meta_str(e.out_meta))}"
        attrs = f'label="{label}"'
        if e.labels.get("changed"):
            attrs += f', color="{changed_color}", fontcolor="{changed_color}", penwidth=2'
            if decision == "none":
                attrs += ", style=dashed"
        out.append(f'  "{e.src}" -> "{e.dst}" [{attrs}];')
    out.append("}")
    return "\n".join(out) + "\n"
