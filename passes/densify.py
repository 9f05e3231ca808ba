"""Densify: DSO-NAS's completely connected block (Zhang et al., DSO-NAS, Eq. (3)).

In Eq. (3) every operation of a block reads a λ-weighted sum of *all* earlier nodes of the block
and the block input, h_(b,i,j) = O_(b,i,j)(Σ_{m<i} Σ_n λ^(i,j)_(b,m,n) h_(b,m,n) + λ^(i,j)_(b,0,0) O_(b−1)),
and the search prunes that complete graph down. On a traced network the nodes that can take more
inputs are its sum junctions; a *stage* is a run of junctions of one shape (same tensor shape
and dtype: the blocks between two reductions). :class:`Densify` adds, for every sum junction d
and every junction s before it in topological order with the same shape and no edge to d yet, a
candidate edge s → d that is

* ``"identity"``: the value of s itself, or
* ``"conv1x1"``: a fresh 1×1 convolution C → C without bias (4-D values only; identity otherwise),

labelled ``dense`` (and ``from``, ``to``) so that :class:`~archir.passes.edge_scale.EdgeScale` gives it a λ of its own
initialised to **0**: the sum becomes o_0 + o_1 + … + 0·c_1 + 0·c_2, and since x + 0·c = x for
every finite c, the function is unchanged at initialisation (equal outputs, tested). A sum's
traced call is replaced by the canonical n-ary sum over its operands in the same order (so
(o_0 + o_1) + 0 + … : the original first). Sums whose traced call is not a plain two-operand add
are left alone. Adding s → d with s before d in a topological order keeps the graph acyclic.
"""
from __future__ import annotations

import operator

import torch
from torch import nn

from archir.errors import UserInputError
from archir.ir import IN, Edge, Graph, Op, Operand, TensorMeta

from .base import Pass, PassResult

DENSE_ROOT = "archir_dense"
MODES = ("identity", "conv1x1")


def _plain_sum(graph: Graph, jid: str) -> bool:
    j = graph.junctions[jid]
    if j.combine is None or j.combine.kind != "sum" or not isinstance(j.meta, TensorMeta):
        return False
    op = j.combine.op
    return op is None or (op.kind == "call_function" and op.target in (operator.add, torch.add)
                          and tuple(op.args) == (Operand(0), Operand(1)) and not op.kwargs)


class Densify(Pass):
    """Add λ-candidate edges inside every stage (see the module docstring); ``mode`` is
    ``"identity"`` or ``"conv1x1"``."""

    def __init__(self, mode: str = "identity"):
        if mode not in MODES:
            raise UserInputError(f"densify must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode = mode

    def run(self, graph: Graph) -> PassResult:
        """Add the candidate edges (labels ``dense``, ``dense_kind``); 1×1 convolutions live in
        ``graph.root.archir_dense``. Unmodified when no sum has a same-shaped earlier junction
        without an edge to it."""
        order = graph.topo_order()
        convs = nn.ModuleDict()
        first = next(iter(graph.root.parameters()), None)
        added = 0
        for pos, d in enumerate(order):
            if not _plain_sum(graph, d):
                continue
            dst = graph.junctions[d]
            linked = {e.src for e in graph.in_edges(d)}
            sources = [s for s in order[:pos] if s not in linked and graph.junctions[s].meta == dst.meta]
            for s in sources:
                eid = graph.new_id("e")
                meta = graph.junctions[s].meta
                ops, kind = [], "identity"
                if self.mode == "conv1x1" and len(meta.shape) == 4:
                    c = meta.shape[1]
                    conv = nn.Conv2d(c, c, 1, bias=False)
                    if first is not None:
                        conv = conv.to(device=first.device, dtype=meta.dtype)
                    convs[eid] = conv
                    flops = c * c * meta.shape[2] * meta.shape[3]
                    ops = [Op("call_module", f"{DENSE_ROOT}.{eid}", (IN,),
                              meta={"out": meta, "flops": flops, "name": f"dense_{eid}"})]
                    kind = "conv1x1"
                n = len(graph.in_edges(d))
                graph.add_edge(Edge(eid, s, d, ops, dst_index=n, in_meta=meta, out_meta=meta,
                                    group=f"dense/{eid}", labels={"dense": True, "dense_kind": kind, "from": s, "to": d}))
                added += 1
            if sources:
                dst.combine.op = None  # the canonical n-ary sum, original operands first
                dst.combine.arity = len(graph.in_edges(d))
        if not added:
            return PassResult(graph, False)
        if len(convs):
            graph.root.add_module(DENSE_ROOT, convs)
        return PassResult(graph, True)
