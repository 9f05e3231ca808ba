"""Rewrites on the traced fx graph before it becomes IR. Each keeps the function bit for bit.

* :func:`functionalize`: in-place operations (``x += y``, ``relu(inplace=True)``, ``x.relu_()``,
  ``x[i] = v``) become their out-of-place twins, and later uses of the mutated value read the new
  one. The IR may then give a value to several consumers (a fork gains an identity path, say)
  without one of them overwriting it for the others.

(Functional dropout that reads ``self.training``, which tracing fixes at the traced mode, is made
to follow ``.train()``/``.eval()`` by :mod:`.mode_dropout`.)
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

from archir.errors import TraceError

INPLACE_OPERATORS = {
    operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
    operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv,
    operator.imatmul: operator.matmul, operator.ior: operator.or_, operator.iand: operator.and_,
}


def functional_setitem(x: torch.Tensor, index, value) -> torch.Tensor:
    """Out-of-place ``x[index] = value``: a copy of ``x`` with the slice replaced."""
    out = x.clone()
    out[index] = value
    return out


def _functional_aten(target):
    """aten.relu_.default -> aten.relu.default (None when there is no such twin)."""
    packet = getattr(target, "overloadpacket", None)
    name = getattr(packet, "__name__", "")
    if not name.endswith("_") or name.startswith("_"):
        return None
    twin = getattr(torch.ops.aten, name[:-1], None)
    return getattr(twin, target._overloadname, None) if twin is not None else None


class UnsafeMutation(Exception):
    """An in-place update of a view (or of a tensor a view was taken of): rewiring later uses is
    not enough to keep the function; the export frontend functionalizes such code properly."""


_VIEW_NAMES = {"getitem", "view", "view_as", "reshape", "flatten", "unflatten", "transpose", "permute",
               "select", "narrow", "expand", "expand_as", "squeeze", "unsqueeze", "t", "T", "split",
               "chunk", "unbind", "as_strided", "diagonal", "detach", "alias", "contiguous", "slice",
               "movedim", "swapaxes", "mT"}


def _is_view(node: fx.Node) -> bool:
    if node.op not in ("call_function", "call_method"):
        return False
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if name == "getitem" and isinstance(node.args[0], fx.Node):
        # an item of an ATen op's tuple result (batch norm's output, say) is a view only when the
        # op's schema says its results alias an input (split, unbind)
        schema = getattr(node.args[0].target, "_schema", None)
        if node.args[0].op == "call_function" and schema is not None:
            return any(r.alias_info is not None for r in schema.returns)
    return name in _VIEW_NAMES


def _alias_read_later(mutated: fx.Node, node: fx.Node, position: dict, *, taken_before: bool = False) -> bool:
    """Does a value that shares memory with ``mutated`` (its bases and their views, through
    view operations) get read after the in-place ``node``? Then the update is visible through it,
    and making ``node`` out of place would change what that read sees. (``flatten(x).dropout_()``
    where nothing reads ``x`` again is safe.) ``taken_before``: only views taken before ``node``
    count (the caller redirects later views of ``mutated`` to the updated value)."""
    base = mutated
    while _is_view(base) and base.args and isinstance(base.args[0], fx.Node):
        base = base.args[0]
    aliases, stack = set(), [base]
    while stack:
        a = stack.pop()
        if a in aliases:
            continue
        aliases.add(a)
        stack.extend(u for u in a.users if _is_view(u) and u.args and u.args[0] is a)
    aliases.discard(mutated)
    if taken_before:
        aliases = {a for a in aliases if position.get(a, -1) < position[node]}
    return any(position.get(u, -1) > position[node] for a in aliases for u in a.users if u is not node)


def functionalize(graph: fx.Graph, root: nn.Module) -> int:
    """Make in-place operations out of place; return how many were rewritten.

    Raises :class:`UnsafeMutation` when a mutated value aliases another one through a view.
    """
    position = {n: i for i, n in enumerate(graph.nodes)}
    count = 0
    for node in list(graph.nodes):
        mutated = None
        if node.op == "call_function":
            if node.target in INPLACE_OPERATORS:
                node.target = INPLACE_OPERATORS[node.target]
                mutated = node.args[0]
            elif node.target is operator.setitem:
                node.target = functional_setitem
                mutated = node.args[0]
            elif node.kwargs.get("inplace") is True:
                node.kwargs = {**node.kwargs, "inplace": False}
                mutated = node.args[0]
            elif (twin := _functional_aten(node.target)) is not None:
                node.target = twin
                mutated = node.args[0]
        elif node.op == "call_method":
            name = node.target
            if name.endswith("_") and not name.startswith("_") and hasattr(torch.Tensor, name[:-1]):
                node.target = name[:-1]
                mutated = node.args[0]
        elif node.op == "call_module":
            mod = root.get_submodule(node.target)
            if getattr(mod, "inplace", False) is True:
                mod.inplace = False
                mutated = node.args[0]
        if not isinstance(mutated, fx.Node):
            continue
        count += 1
        if mutated.op == "get_attr":
            continue  # a buffer update: the functional graph keeps no state changes
        if _alias_read_later(mutated, node, position):
            err = UnsafeMutation(f"in-place '{node.name}' updates a view")
            err.modules = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values() if path][::-1]
            err.methods = node.meta.get("archir_methods", [])  # the methods it ran in (value tracing)
            raise err
        for user in list(mutated.users):
            if user is not node and position.get(user, -1) > position[node]:
                user.replace_input_with(mutated, node)
    return count


def isolate_mutating_calls(graph: fx.Graph, mutated: dict, metas: dict) -> int:
    """Give each called function that changes a tensor argument in place a copy of it; return how
    many arguments were copied.

    ``mutated`` maps a call to ``[(argument, returned), ...]``: the arguments whose version
    counter moved when the graph was run, and whether the call returned that same tensor
    (torchvision's MViT ``_add_shortcut(x, q)`` adds ``q`` into ``x`` in place and returns ``x``,
    and the caller reads ``x`` on). The call gets ``x.clone()`` instead and later reads of ``x``
    read its result, as :func:`functionalize` does for in-place operations, so the update
    happens where the IR can see it and whichever order consumers of ``x`` run in. Raises
    TraceError where that would change the function: ``x`` is read later but the call returned
    something else, or the update shows through a view that is read later."""
    position = {n: i for i, n in enumerate(graph.nodes)}
    count = 0
    for node, args in mutated.items():
        for arg, returned in args:
            if arg.op == "get_attr":
                continue  # a buffer update: the functional graph keeps no state changes
            later = [u for u in arg.users if u is not node and position.get(u, -1) > position[node]]
            if (later and not returned) or _alias_read_later(arg, node, position, taken_before=True):
                raise TraceError(f"'{node.name}' changes its argument '{arg.name}' in place, and the "
                                 "change is read later in a way archir cannot rewrite")
            with graph.inserting_before(node):
                copy = graph.call_method("clone", (arg,))
            copy.meta = dict(node.meta)  # module stack of the call that needs the copy
            metas[copy] = metas.get(arg)
            node.replace_input_with(arg, copy)
            for user in later:
                user.replace_input_with(arg, node)
            count += 1
    return count
