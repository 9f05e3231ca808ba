"""Lowering: IR -> ``torch.fx.GraphModule`` computing the same function with the same parameters.

Every operation is re-emitted as the call it was traced from (same targets, same arguments), so a
traced-then-lowered model gives bit-identical outputs. Modules and parameters are the graph root's
own objects, not copies: training the lowered module trains the graph's weights.

A ``choice`` operation lowers generically: each candidate path from the same input, then a call of
its mixer module on the values of the candidates other than ``"none"`` (with its kwargs). A pass
that needs another lowering (DNAT folds a weight into a BatchNorm) names a hook in
``op.meta["lowering"]`` and registers it with :func:`register_lowering`; the core knows no method.
"""
from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.fx as fx

from archir.errors import IRError

from .graph import Input, JunctionRef, Op, Operand, fetch_attr, map_refs, path_label
from .guards import check_length

if TYPE_CHECKING:
    from .graph import Combine, Graph


def _reserved(atom: str) -> bool:
    # Names a GraphModule already uses (``meta``, ``graph``, ``code``, ``forward``...) cannot hold
    # a submodule: a user's submodule called ``meta`` is stored under ``meta_`` instead.
    return atom == "meta" or hasattr(fx.GraphModule, atom)


class Lowering:
    """Emits one graph into a ``torch.fx.Graph`` (``self.fx``); lowering hooks use its helpers."""

    def __init__(self, graph: "Graph"):
        self.ir = graph
        self.fx = fx.Graph()
        self.values: dict[str, fx.Node] = {}
        self.attrs: dict[str, Any] = {}
        self.rename: dict[str, str] = {}
        # nested ops already emitted: (op, its binding) -> node; see :meth:`nested`
        self.emitted: dict[tuple, tuple[Op, fx.Node]] = {}
        self.free: dict[int, bool] = {}  # id(op) -> reads no Input or Operand (memo)

    def safe_target(self, target: str) -> str:
        """``target`` with its first atom renamed (suffixed ``_``) where GraphModule reserves it, its
        object recorded for the GraphModule; raise IRError if ``graph.root`` has no such attribute."""
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
        """Emit ``op`` (a ``choice`` through :meth:`choice`) with :class:`Input` bound to ``inp``,
        :class:`Operand` ``i`` to ``operands[i]``, junction references to their values and nested ops
        emitted first; return its node."""
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
            return self.nested(r, inp, operands)

        args = map_refs(op.args, resolve)
        kwargs = map_refs(op.kwargs, resolve)
        target = self.safe_target(op.target) if op.kind in ("call_module", "get_attr") else op.target
        return self.fx.create_node(op.kind, target, args, kwargs, name=op.meta.get("name"))

    def nested(self, op: Op, inp: fx.Node | None, operands: list[fx.Node] | None = None) -> fx.Node:
        """A nested operation (a size computation, a parameter read), emitted once per binding.

        The frontend shares a nested Op wherever the traced node was used (a DAG), so each is one
        node here too, read by every use, rather than one copy per path to it (exponentially many
        when sizes are threaded through every block). An op that reads no chain input and no join
        operand is the same value everywhere in the graph; one that does is shared under the same
        ``inp`` and ``operands`` only."""
        key = (id(op),) if self.reads_nothing_local(op) else (id(op), inp, tuple(operands or ()))
        if key not in self.emitted:
            self.emitted[key] = (op, self.op(op, inp, operands))  # holding op keeps its id unique
        return self.emitted[key][1]

    def reads_nothing_local(self, op: Op) -> bool:
        """Whether ``op`` (nested ops included) reads neither :class:`Input` nor :class:`Operand`."""
        if id(op) not in self.free:
            self.free[id(op)] = op.kind != "choice" and not any(
                isinstance(r, (Input, Operand)) for r in op.refs())
        return self.free[id(op)]

    def kwargs_of(self, op: Op, inp: fx.Node | None, operands: list[fx.Node] | None = None) -> dict:
        """``op``'s keyword arguments lowered (nested operations emitted)."""
        return map_refs(op.kwargs, lambda r: self.nested(r, inp, operands))

    def path(self, ops, inp: fx.Node | None) -> fx.Node | None:
        """A candidate path (a tuple of operations, or ``"identity"``) applied to ``inp``."""
        v = inp
        if ops != "identity":
            for o in ops:
                v = self.op(o, v)
        return v

    def choice(self, op: Op, inp: fx.Node | None, operands: list[fx.Node] | None) -> fx.Node:
        """Candidates, then the mixer; or the lowering hook named by ``op.meta['lowering']``."""
        hook = op.meta.get("lowering")
        if hook is not None:
            if hook not in _LOWERINGS:
                raise IRError(f"lowering: {op.render()} needs the lowering hook {hook!r}, which is not "
                              "registered (import the pass that made this operation)")
            return _LOWERINGS[hook](self, op, inp, operands)
        vals = tuple(self.path(cand, inp) for cand in op.args if cand != "none")
        return self.fx.create_node("call_module", self.safe_target(op.target), vals,
                                   self.kwargs_of(op, inp, operands), name=op.meta.get("name"))

    def combine(self, c: "Combine", operands: list[fx.Node]) -> fx.Node:
        """Emit a join: its traced op, or (``c.op`` None) the canonical n-ary sum, product or concat."""
        if c.op is not None:
            return self.op(c.op, None, operands)
        if c.kind == "concat":
            return self.fx.call_function(torch.cat, (list(operands),), {"dim": c.dim})
        fn = {"sum": operator.add, "product": operator.mul}[c.kind]
        acc = operands[0]
        for o in operands[1:]:
            acc = self.fx.call_function(fn, (acc, o))
        return acc

    def _placeholders(self, g: "Graph") -> None:
        """One placeholder per argument, in the graph's input order; an input inside a list, tuple
        or dict argument (``Junction.input_path``) is read from it with ``getitem``, after a check
        that each list or tuple on the way has the example's length (:func:`check_length`)."""
        paths = {jid: g.junctions[jid].input_path or (g.junctions[jid].input_name,) for jid in g.inputs}
        reached: dict[tuple, fx.Node] = {}  # (argument, key, ...) -> its value
        length_checked: dict[tuple, fx.Node] = {}  # a list or tuple -> the same after check_length

        def checked(path: tuple, node: fx.Node) -> fx.Node:
            if path not in g.input_lengths:
                return node
            return self.fx.create_node("call_function", check_length, (node, g.input_lengths[path], path_label(path)),
                                       name="_".join(map(str, path)) + "_checked")

        for name in g.arguments:  # an argument the graph does not read is still one
            reached[(name,)] = self.fx.placeholder(name)
        for path in paths.values():
            if path[:1] not in reached:
                reached[path[:1]] = self.fx.placeholder(path[0])
        for jid, path in paths.items():
            for depth in range(2, len(path) + 1):
                if path[:depth] not in reached:  # the tensor itself keeps the input's name
                    name = g.junctions[jid].input_name if depth == len(path) else None
                    parent = path[:depth - 1]
                    if parent not in length_checked:
                        length_checked[parent] = checked(parent, reached[parent])
                    reached[path[:depth]] = self.fx.create_node(
                        "call_function", operator.getitem, (length_checked[parent], path[depth - 1]), name=name)
            self.values[jid] = reached[path]

    def run(self) -> fx.GraphModule:
        """Emit every junction in topological order and the output; return the GraphModule (same
        training mode as ``graph.root``; ``archir_renamed`` maps each renamed top-level attribute to its
        new name)."""
        g = self.ir
        self._placeholders(g)
        for jid in g.topo_order():
            j = g.junctions[jid]
            if j.is_input:
                continue
            ends = []
            for e in g.in_edges(jid):
                v = self.values[e.src]
                for op in e.ops:
                    v = self.op(op, v)
                ends.append(v)
            self.values[jid] = self.combine(j.combine, ends) if j.combine is not None else ends[0]

        def out(r):
            return self.values[r.id] if isinstance(r, JunctionRef) else self.nested(r, None)

        self.fx.output(map_refs(g.output, out))
        self.fx.lint()
        gm = fx.GraphModule(self.attrs, self.fx, class_name=_class_name(g.name))
        gm.training = g.root.training
        gm.archir_renamed = {k: v for k, v in self.rename.items() if k != v}
        return gm


def _class_name(name: str) -> str:
    cleaned = "".join(ch if ch.isalnum() else "_" for ch in name) or "Model"
    return cleaned if cleaned[0].isalpha() else "M" + cleaned


LoweringHook = Callable[["Lowering", Op, "fx.Node | None", "list[fx.Node] | None"], fx.Node]
_LOWERINGS: dict[str, LoweringHook] = {}


def register_lowering(name: str, hook: LoweringHook) -> LoweringHook:
    """Make ``hook(lowering, op, inp, operands) -> fx.Node`` the lowering of every ``choice``
    operation with ``op.meta["lowering"] == name``. The hook emits into ``lowering.fx`` with the
    helpers of :class:`Lowering` (``op``, ``path``, ``kwargs_of``, ``safe_target``)."""
    _LOWERINGS[name] = hook
    return hook


def lower(graph: "Graph") -> fx.GraphModule:
    """Emit ``graph`` as a GraphModule sharing the graph root's modules and parameters."""
    return Lowering(graph).run()
