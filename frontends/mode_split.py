"""One graph for a model whose own ``forward`` computes something else in training mode.

A torchvision detector returns its losses in training mode and its detections in eval mode: its
own code reads ``self.training``, which a symbolic trace fixes at the traced mode. Traced in both
modes (with :mod:`.value_trace`), the two graphs share everything up to the point where the mode
decides, the backbone included; only their ends differ (the losses dict; the post-processing
that scales boxes back to each image's size). :func:`merge_modes` keeps the shared nodes once and
moves each mode's own nodes into a small graph of their own, called through :class:`ByMode`, which
runs the one of the current mode::

    shared nodes (searchable)  ->  ByMode(train=losses graph, eval=post-processing graph)

A node is shared when it has the same operation and target as a node of the other trace and
reads the same shared values (common-subexpression matching, in graph order). Each mode's own
nodes read only shared values and their own mode's, so they form two tails that end at the output.

A run-time guard (:mod:`archir.ir.guards`) returns its input, so matching reads through it: a
detector checks its targets' boxes in training mode only, and the transform that reads them is
still one call. The training trace's guards that shared nodes read, and what their conditions
are computed from, join the shared part: those checks run in both modes.
"""
from __future__ import annotations

from typing import Any

import torch.fx as fx
from torch import nn

from archir.ir import fetch_attr
from archir.ir.guards import guard

from .opaque_methods import MethodCall


class ByMode(nn.Module):
    """``train_tail(*values)`` in training mode, ``eval_tail(*values)`` in eval mode: the ends of a
    model's forward where its own code branches on ``self.training``."""

    def __init__(self, train_tail: fx.GraphModule, eval_tail: fx.GraphModule):
        super().__init__()
        self.train_tail, self.eval_tail = train_tail, eval_tail

    def forward(self, *values):
        return (self.train_tail if self.training else self.eval_tail)(*values)


def _key(node: fx.Node, mapped: dict[fx.Node, fx.Node]) -> str | None:
    """What makes two nodes the same computation: op, target and arguments (nodes through
    ``mapped``); None when an argument is not mapped (the node is not shared)."""
    missing = False

    def arg(a):
        nonlocal missing
        while a.op == "call_function" and a.target is guard:
            a = a.args[0]  # guard(x, ...) is x (see the module docstring)
        if a not in mapped:
            missing = True
            return None
        return mapped[a].name

    args = fx.node.map_arg((node.args, node.kwargs), arg)
    return None if missing else repr((node.op, node.target, args))


def merge_modes(root: nn.Module, train: fx.Graph, eval_: fx.Graph, name: str = "archir_by_mode") -> fx.Graph:
    """One graph over ``root`` computing ``train`` in training mode and ``eval_`` in eval mode (both
    traced from ``root`` on the same inputs); the tails become ``root.<name>``, a :class:`ByMode`.
    Raises ValueError where the traces do not fit that shape (different inputs, a tail that calls
    a submodule or reads a parameter)."""
    t_nodes, e_nodes = list(train.nodes), list(eval_.nodes)
    t_ph = [n for n in t_nodes if n.op == "placeholder"]
    e_ph = [n for n in e_nodes if n.op == "placeholder"]
    if [n.name for n in t_ph] != [n.name for n in e_ph]:
        raise ValueError("the two modes' traces take different inputs")
    # train-graph node for each shared eval-graph node, by structural key in graph order
    t_mapped = {n: n for n in t_ph}
    by_key: dict[str, list[fx.Node]] = {}
    for n in t_nodes:
        if n.op not in ("placeholder", "output"):
            t_mapped[n] = n
            by_key.setdefault(_key(n, t_mapped), []).append(n)
    shared = dict(zip(e_ph, t_ph))  # eval node -> train node
    for n in e_nodes:
        if n.op not in ("placeholder", "output") and (k := _key(n, shared)) is not None and by_key.get(k):
            shared[n] = by_key[k].pop(0)  # the k-th such node of one trace is the k-th of the other
    shared_train = set(shared.values())
    stack = list(shared_train)  # with what they read through guards
    while stack:
        for a in stack.pop().all_input_nodes:
            if a not in shared_train:
                shared_train.add(a)
                stack.append(a)
    tails = {"train": [n for n in t_nodes if n not in shared_train and n.op != "output"],
             "eval": [n for n in e_nodes if n not in shared and n.op != "output"]}
    for mode, nodes in tails.items():
        odd = [n for n in nodes
               if n.op in ("call_module", "get_attr", "placeholder") and not _tail_may_hold(root, n)]
        if odd:
            verb = {"call_module": "calls the module", "get_attr": "reads the parameter"}.get(odd[0].op, "takes")
            raise ValueError(f"the {mode}-mode end of the forward {verb} {odd[0].target}, which the other mode "
                             "does not use there")

    merged = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in t_nodes:  # the shared nodes, in the training trace's order
        if n in shared_train:
            env[n] = merged.node_copy(n, env.__getitem__)
    outputs = {"train": next(n for n in t_nodes if n.op == "output"),
               "eval": next(n for n in e_nodes if n.op == "output")}
    to_train = {**shared, **{n: n for n in shared_train}}  # either trace's shared node -> train node
    # what each tail reads from the shared part, in merged-graph order
    read = {to_train[a] for mode, nodes in tails.items() for n in nodes + [outputs[mode]]
            for a in n.all_input_nodes if a in to_train}
    values = [n for n in t_nodes if n in read]
    tail_modules = {mode: _tail(root, nodes, outputs[mode], values, to_train) for mode, nodes in tails.items()}
    if hasattr(root, name):
        raise ValueError(f"the model already has an attribute {name!r}")
    root.add_module(name, ByMode(tail_modules["train"], tail_modules["eval"]))
    out = merged.call_module(name, tuple(env[v] for v in values))
    merged.output(out)
    return merged


def _tail_may_hold(root: nn.Module, n: fx.Node) -> bool:
    """A method kept opaque and a constant tensor may be in a tail; other modules and parameters
    stay in the shared part, where passes see them."""
    if n.op == "call_module":
        return isinstance(root.get_submodule(n.target), MethodCall)
    return n.op == "get_attr" and not isinstance(fetch_attr(root, n.target), nn.Parameter)


def _tail(root: nn.Module, nodes: list[fx.Node], output: fx.Node, values: list[fx.Node],
          to_train: dict[fx.Node, fx.Node]) -> fx.GraphModule:
    """A GraphModule taking ``values`` (the shared nodes, as placeholders) and computing ``nodes``
    and ``output``'s value from them."""
    g = fx.Graph()
    env: dict[fx.Node, Any] = {}
    slots = {v: g.placeholder(f"v{i}") for i, v in enumerate(values)}

    def look(a: fx.Node):
        return env[a] if a in env else slots[to_train[a]]

    for n in nodes:
        env[n] = g.node_copy(n, look)
    g.output(fx.node.map_arg(output.args[0], look))
    return fx.GraphModule(root, g)


