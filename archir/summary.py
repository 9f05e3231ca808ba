"""What ``archir inspect`` prints: a summary of a graph and its IR as a table (and as JSON)."""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from .ir import meta_str
from .ir.guards import graph_guards
from .ir.printer import human

if TYPE_CHECKING:
    from .methods import Method
    from .ir import Graph


def summarize(g: "Graph", method: "Method | None" = None) -> dict[str, Any]:
    """Counts that describe ``g``; with ``method``, what that method could change (its
    ``candidates`` line)."""
    roles = Counter(r for jid in g.junctions for r in g.roles(jid))
    joins = Counter(j.combine.kind for j in g.junctions.values() if j.combine is not None)
    return {
        "model": g.name, "frontend": g.frontend, "granularity": g.granularity,
        "junctions": len(g.junctions), "inputs": roles["input"], "outputs": roles["output"],
        "forks": roles["fork"], "joins": dict(sorted(joins.items())),
        "edges": len(g.edges), "direct_edges": sum(1 for e in g.edges.values() if not e.ops),
        "parameters": g.total_params(), "flops_per_example": g.total_flops(),
        "candidates": {"method": method.name, "summary": method.candidates(g)} if method is not None else None,
        "cell_groups": len({e.group for e in g.edges.values()}),
        "opaque_leaves": dict(g.leaves),
        "guards": graph_guards(g),
    }


def format_summary(g: "Graph", source: str = "", method: "Method | None" = None) -> str:
    """What ``archir inspect`` prints first: a header line (model, ``source``, tracer, granularity),
    then the :func:`summarize` counts, one indented line each (FLOPs are multiply-adds per example)."""
    s = summarize(g, method)
    joins = ", ".join(f"{n} {k}" for k, n in s["joins"].items()) or "none"
    lines = [
        f"{s['model']}{' (' + source + ')' if source else ''}: traced with "
        f"{'torch.fx' if s['frontend'] == 'fx' else 'torch.export'}, granularity={s['granularity']}",
        f"  junctions   {s['junctions']} ({s['inputs']} input, {s['outputs']} output, {s['forks']} forks; joins: {joins})",
        f"  edges       {s['edges']} ({s['direct_edges']} direct connections, {s['cell_groups']} cell-sharing groups)",
        f"  parameters  {s['parameters']:,}",
        f"  FLOPs       {human(s['flops_per_example'])} multiply-adds per example",
    ]
    if s["candidates"] is not None:
        lines.append(f"  candidates  {s['candidates']['summary']} ({s['candidates']['method']})")
    if s["opaque_leaves"]:
        lines.append(f"  opaque      {', '.join(f'{k} ({v})' for k, v in s['opaque_leaves'].items())}")
    if s["guards"]:
        lines.append(f"  guards      {len(s['guards'])} checked at run time (a failure says:)")
        lines += [f"    - {what}" for what in s["guards"]]
    return "\n".join(lines)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(g: "Graph", ops_width: int = 56, searchable: dict[str, dict] | None = None) -> str:
    """One row per edge, in topological order, with the junction each one ends at. With
    ``searchable`` (:meth:`archir.methods.Method.searchable`), a last column says which edges a
    method would search and why."""
    rows = [("edge", "from", "to", "operations", "shape in -> out", "params", "FLOPs")
            + (("searched because",) if searchable is not None else ())]
    for e in g.edges_in_order():
        dst = g.junctions[e.dst]
        to = f"{e.dst}" + (f" {dst.combine.kind}#{e.dst_index}" if dst.combine is not None else "")
        why = (searchable[e.id]["why"] if e.id in searchable else "-",) if searchable is not None else ()
        rows.append((e.id, e.src, to, _clip(e.render_ops(), ops_width),
                     f"{meta_str(e.in_meta)} -> {meta_str(e.out_meta)}", human(g.edge_params(e)), human(e.flops))
                    + why)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {5, 6}
    out = []
    for k, r in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        out.append("  ".join(cells).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def format_groups(g: "Graph", width: int | None = None) -> str:
    """What ``archir inspect --groups`` prints: the cell-sharing groups (``Edge.group``; with
    ``share="cell"`` the edges of one group share one θ per choice set), one line per group of two
    or more edges with its key, its edges and the modules they touch, then one line for the edges
    that keep a key of their own. With ``width``, longer lines are clipped."""
    members: dict[str, list] = {}
    for e in g.edges_in_order():
        members.setdefault(e.group, []).append(e)
    shared = {k: es for k, es in members.items() if len(es) >= 2}
    alone = [es[0] for es in members.values() if len(es) == 1]
    lines = [f"cell-sharing groups: {len(shared)} shared by {sum(len(es) for es in shared.values())} edges, "
             f"{len(alone)} edges alone"]
    key_width = max((len(k) for k in shared), default=0)
    for key, es in shared.items():
        modules = list(dict.fromkeys(m for e in es for m in e.modules))
        line = (f"  {key.ljust(key_width)}  {len(es)} edges: {' '.join(e.id for e in es)}"
                f"  modules: {', '.join(modules) or '-'}")
        lines.append(_clip(line, width) if width else line)
    if alone:
        line = f"  alone: {' '.join(e.id for e in alone)}"
        lines.append(_clip(line, width) if width else line)
    return "\n".join(lines)


def graph_json(g: "Graph", method: "Method | None" = None) -> dict[str, Any]:
    """The :func:`summarize` counts, every junction (in topological order), every edge (in
    ``edges_in_order``) and the output, as plain dicts and lists for ``archir inspect``'s JSON file."""
    searchable = method.searchable(g) if method is not None else {}
    return {
        "summary": summarize(g, method),
        "junctions": [{"id": j.id, "roles": g.roles(j.id), "meta": meta_str(j.meta), "name": j.name,
                       "combine": str(j.combine) if j.combine else None,
                       "operands": [e.id for e in g.in_edges(j.id)] if j.combine else None}
                      for j in (g.junctions[i] for i in g.topo_order())],
        "edges": [{"id": e.id, "src": e.src, "dst": e.dst, "dst_index": e.dst_index,
                   "ops": [op.render() for op in e.ops], "modules": e.modules,
                   "in": meta_str(e.in_meta), "out": meta_str(e.out_meta), "params": g.edge_params(e),
                   "flops": e.flops, "group": e.group, "scope": e.scope,
                   "searchable": ({"choices": list(searchable[e.id]["choices"]), "why": searchable[e.id]["why"]}
                                  if e.id in searchable else None),
                   "labels": {k: v for k, v in e.labels.items() if isinstance(v, (str, int, float, bool))}}
                  for e in g.edges_in_order()],
        "output": str(g.output) if not isinstance(g.output, (str, int)) else g.output,
    }
