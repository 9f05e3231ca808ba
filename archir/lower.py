"""Lowering: IR -> ``torch.fx.GraphModule`` computing the same function with the same parameters.

Every operation is re-emitted as the call it was traced from (same targets, same arguments), so a
traced-then-lowered model gives bit-identical outputs. Modules and parameters are the graph root's
own objects, not copies: training the lowered module trains the graph's weights.
"""
from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from .errors import IRError
from .ir import Input, JunctionRef, Op, Operand, fetch_attr, map_refs
from .mixing import mix_weights, scaled_batch_norm

if TYPE_CHECKING:
    from .ir import Combine, Graph


def _reserved(atom: str) -> bool:
    # Names a GraphModule already uses (``meta``, ``graph``, ``code``, ``forward``...) cannot hold
    # a submodule: a user's submodule called ``meta`` is stored under ``meta_`` instead.
    return atom == "meta" or hasattr(fx.GraphModule, atom)


class _Emitter:
    def __init__(self, graph: "Graph"):
        self.ir = graph
        self.fx = fx.Graph()
        self.values: dict[str, fx.Node] = {}
        self.attrs: dict[str, Any] = {}
        self.rename: dict[str, str] = {}

    def safe_target(self, target: str) -> str:
        head, _, rest = target.partition(".")
        if head not in self.rename:
            new = head
            while _reserved(new):
                new += "_"
            self.rename[head] = new
        safe = self.rename[head] + ("." + rest if rest else "")
        if safe not in self.attrs:
            try:
                self.attrs[safe] = fetch_attr(self.ir.root, target)
            except AttributeError as exc:
                raise IRError(f"lowering: '{target}' is not an attribute of the graph's root module") from exc
        return safe

    def op(self, op: Op, inp: fx.Node | None, operands: list[fx.Node] | None = None) -> fx.Node:
        if op.kind == "choice":
            return self.choice(op, inp, operands)

        def resolve(r):
            if isinstance(r, Input):
                if inp is None:
                    raise IRError(f"lowering: {op.render()} reads a chain input where there is none")
                return inp
            if isinstance(r, Operand):
                return operands[r.index]
            if isinstance(r, JunctionRef):
                return self.values[r.id]
            return self.op(r, inp, operands)

        args = map_refs(op.args, resolve)
        kwargs = map_refs(op.kwargs, resolve)
        target = self.safe_target(op.target) if op.kind in ("call_module", "get_attr") else op.target
        return self.fx.create_node(op.kind, target, args, kwargs, name=op.meta.get("name"))

    def choice(self, op: Op, inp: fx.Node | None, operands: list[fx.Node] | None) -> fx.Node:
        """Candidates, then the mixer. With ``meta['fold_bn'] = i`` the i-th operation of the
        original path (an affine BatchNorm) takes w_same into its γ and β (archir/mixing.py)."""
        kwargs = map_refs(op.kwargs, lambda r: self.op(r, inp, operands))
        fold = op.meta.get("fold_bn")
        if fold is not None:
            mask = self.fx.get_attr(self.safe_target(f"{op.target}.mask"))
            weights = self.fx.call_function(mix_weights, (kwargs["theta"], mask))
            w_same = self.fx.call_function(operator.getitem, (weights, 2))
            kwargs = {**kwargs, "weights": weights}
        vals = []
        for cand in op.args:
            if cand == "none":
                continue
            v = inp
            if cand != "identity":
                for i, o in enumerate(cand):
                    if i == fold:
                        bn = self.fx.get_attr(self.safe_target(o.target))
                        v = self.fx.call_function(scaled_batch_norm, (v, bn, w_same))
                    else:
                        v = self.op(o, v)
            vals.append(v)
        return self.fx.create_node("call_module", self.safe_target(op.target), tuple(vals), kwargs,
                                   name=op.meta.get("name"))

    def combine(self, c: "Combine", operands: list[fx.Node]) -> fx.Node:
        if c.op is not None:
            return self.op(c.op, None, operands)
        if c.kind == "concat":
            return self.fx.call_function(torch.cat, (list(operands),), {"dim": c.dim})
        fn = {"sum": operator.add, "product": operator.mul}[c.kind]
        acc = operands[0]
        for o in operands[1:]:
            acc = self.fx.call_function(fn, (acc, o))
        return acc

    def run(self) -> fx.GraphModule:
        g = self.ir
        for jid in g.topo_order():
            j = g.junctions[jid]
            if j.is_input:
                self.values[jid] = self.fx.placeholder(j.input_name)
                continue
            ends = []
            for e in g.in_edges(jid):
                v = self.values[e.src]
                for op in e.ops:
                    v = self.op(op, v)
                ends.append(v)
            self.values[jid] = self.combine(j.combine, ends) if j.combine is not None else ends[0]

        def out(r):
            return self.values[r.id] if isinstance(r, JunctionRef) else self.op(r, None)

        self.fx.output(map_refs(g.output, out))
        self.fx.lint()
        gm = fx.GraphModule(self.attrs, self.fx, class_name=_class_name(g.name))
        gm.training = g.root.training
        gm.archir_renamed = {k: v for k, v in self.rename.items() if k != v}
        return gm


def _class_name(name: str) -> str:
    cleaned = "".join(ch if ch.isalnum() else "_" for ch in name) or "Model"
    return cleaned if cleaned[0].isalpha() else "M" + cleaned


def lower(graph: "Graph") -> fx.GraphModule:
    """Emit ``graph`` as a GraphModule sharing the graph root's modules and parameters."""
    return _Emitter(graph).run()
