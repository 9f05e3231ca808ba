"""``Graph.verify``: the IR's invariants, each checked by one small function.

Each check raises :class:`~archir.errors.IRError` with the invariant's name and the junction or
edge that breaks it, so a pass manager can say which pass broke what.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import networkx as nx
from archir.errors import IRError
from .graph import Input, JunctionRef, ObjectMeta, Operand, TensorMeta, _flatten

if TYPE_CHECKING:
    from .graph import Graph


def _fail(invariant: str, detail: str) -> None:
    raise IRError(f"invariant '{invariant}' broken: {detail}")


def check_indices(g: "Graph") -> None:
    """Adjacency indices, edge endpoints and junction records agree."""
    for eid, e in g.edges.items():
        if e.id != eid:
            _fail("consistent ids", f"edge stored as {eid} calls itself {e.id}")
        for end in (e.src, e.dst):
            if end not in g.junctions:
                _fail("edge endpoints exist", f"edge {eid} names missing junction {end}")
        if eid not in g._out[e.src] or eid not in g._in[e.dst]:
            _fail("consistent adjacency", f"edge {eid} is missing from the index of {e.src} or {e.dst}")
    for jid, j in g.junctions.items():
        if j.id != jid:
            _fail("consistent ids", f"junction stored as {jid} calls itself {j.id}")
        for eid in g._in[jid] + g._out[jid]:
            if eid not in g.edges:
                _fail("consistent adjacency", f"junction {jid} lists missing edge {eid}")
    for jid in g.inputs:
        if jid not in g.junctions or not g.junctions[jid].is_input:
            _fail("inputs are input junctions", f"{jid}")


def check_arity(g: "Graph") -> None:
    """Inputs have no incoming edge; plain junctions exactly one; joins one per operand, in order."""
    for jid, j in g.junctions.items():
        ins = g.in_edges(jid)
        if j.is_input:
            if ins:
                _fail("inputs have no incoming edge", f"input {jid} has {[e.id for e in ins]}")
            continue
        if j.combine is None:
            if len(ins) != 1:
                _fail("one incoming edge per plain junction", f"{jid} has {len(ins)}")
            continue
        if [e.dst_index for e in ins] != list(range(len(ins))):
            _fail("join operands numbered 0..n-1", f"{jid} has {[e.dst_index for e in ins]}")
        if j.combine.op is not None and len(ins) != j.combine.arity:
            _fail("join arity", f"{jid} emits its traced call with {j.combine.arity} operands but has {len(ins)}")
        if j.combine.op is None and len(ins) < 2 and j.combine.kind != "other":
            _fail("joins have two or more operands", f"{jid} ({j.combine.kind}) has {len(ins)}")
        if j.combine.op is None and j.combine.kind == "other":
            _fail("'other' joins keep their call", f"{jid}")


def check_acyclic(g: "Graph") -> None:
    dg = g.dependency_graph()
    if not nx.is_directed_acyclic_graph(dg):
        cycle = nx.find_cycle(dg)
        _fail("acyclic", f"cycle through {[a for a, _ in cycle]}")


def check_refs(g: "Graph") -> None:
    """Templates only use references that make sense where they stand; targets exist in root."""
    targets = _root_targets(g)
    for e in g.edges.values():
        for op in e.ops:
            for r in op.refs():
                if isinstance(r, Operand):
                    _fail("edge ops have no join operands", f"edge {e.id} op {op.render()}")
                if isinstance(r, JunctionRef) and r.id not in g.junctions:
                    _fail("size reads name existing junctions", f"edge {e.id} reads {r.id}")
            _check_targets(op, targets, f"edge {e.id}")
    for j in g.junctions.values():
        if j.combine is None or j.combine.op is None:
            continue
        n = len(g.in_edges(j.id))
        for r in j.combine.op.refs():
            if isinstance(r, Input):
                _fail("join calls read operands, not a chain input", f"junction {j.id}")
            if isinstance(r, Operand) and not 0 <= r.index < n:
                _fail("join operands exist", f"junction {j.id} reads ${r.index} of {n}")
        _check_targets(j.combine.op, targets, f"junction {j.id}")
    for r in _flatten(g.output):
        if isinstance(r, JunctionRef) and r.id not in g.junctions:
            _fail("outputs name existing junctions", r.id)


def _root_targets(g: "Graph") -> set[str]:
    names = {n for n, _ in g.root.named_modules(remove_duplicate=False)}
    names |= {n for n, _ in g.root.named_parameters(remove_duplicate=False)}
    names |= {n for n, _ in g.root.named_buffers(remove_duplicate=False)}
    return names


def _check_targets(op, targets: set[str], where: str) -> None:
    for t in op.attr_targets():
        if t not in targets:
            _fail("targets exist in the root module", f"{where} uses '{t}'")


def check_shapes(g: "Graph") -> None:
    """Edges start with their source's value; sum joins' operands broadcast to the junction."""
    for e in g.edges.values():
        src = g.junctions[e.src]
        if not e.ops and e.out_meta != src.meta and not isinstance(src.meta, (tuple, ObjectMeta)):
            _fail("empty edges carry their source's value", f"edge {e.id}: {e.out_meta} vs {src.meta}")
        if e.in_meta is not None and src.meta is not None and e.in_meta != src.meta:
            _fail("edge input matches its source", f"edge {e.id}: {e.in_meta} vs {src.meta} of {src.id}")
        dst = g.junctions[e.dst]
        if dst.combine is None and not dst.is_input and e.out_meta is not None and dst.meta is not None \
                and e.out_meta != dst.meta:
            _fail("edge output matches its destination", f"edge {e.id}: {e.out_meta} vs {dst.meta} of {dst.id}")
    for j in g.junctions.values():
        if j.combine is None or j.combine.kind != "sum" or not isinstance(j.meta, TensorMeta):
            continue
        shapes = [e.out_meta.shape for e in g.in_edges(j.id) if isinstance(e.out_meta, TensorMeta)]
        if broadcast_shape(shapes) != j.meta.shape:
            _fail("shapes agree at sum joins", f"junction {j.id} sums {shapes} into {list(j.meta.shape)}")


def broadcast_shape(shapes: list[tuple[int, ...]]) -> tuple[int, ...] | None:
    """numpy broadcasting of ``shapes``; None when they do not broadcast.

    (``torch.broadcast_shapes`` would do, but it imports sympy: a second per verify.)"""
    if not shapes:
        return None
    ndim = max(len(s) for s in shapes)
    out = []
    for dims in zip(*[(1,) * (ndim - len(s)) + tuple(s) for s in shapes]):
        sizes = {d for d in dims if d != 1}
        if len(sizes) > 1:
            return None
        out.append(sizes.pop() if sizes else 1)
    return tuple(out)


def check_reachability(g: "Graph") -> None:
    """Every output is reachable from an input; every junction feeds an output (no dead code)."""
    dg = g.dependency_graph()
    outs = g.output_junctions()
    if not outs:
        _fail("the graph has an output", g.name)
    from_inputs = set(g.inputs)
    for i in g.inputs:
        from_inputs |= nx.descendants(dg, i)
    for o in outs:
        if o not in from_inputs:
            _fail("outputs reachable from an input", f"output {o}")
    live = set(outs)
    for o in outs:
        live |= nx.ancestors(dg, o)
    dead = [j for j in g.junctions if j not in live and j not in g.inputs]
    if dead:
        _fail("no dead junctions", f"{dead} reach no output")


CHECKS: list[Callable[["Graph"], None]] = [
    check_indices, check_acyclic, check_arity, check_refs, check_shapes, check_reachability,
]


def verify_graph(g: "Graph") -> None:
    for check in CHECKS:
        check(g)
