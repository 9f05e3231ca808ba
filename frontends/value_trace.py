"""Symbolic tracing that carries the example's values: the third tracer, for a model whose own
``forward`` is Python glue around opaque parts (a torchvision detector).

torch.fx stops at the first ``len(proxy)`` or ``a, b = proxy``: it knows no values. torch.export
knows them, but has to follow every opaque part too, and stops at their data-dependent code (the
RPN's top-k over a data-dependent number of boxes, non-maximum suppression). Here every node's
value on the example inputs is computed as the node is created (the fx graph is run as it is
built), so the glue can ask for the *structure* of a value, never for its data:

- ``len``/iteration of a list or tuple value (``boxes.unbind(1)``: 4 coordinates) and of a size
  (``img.shape[-2:]``) use the example's length, which tensor ranks and the model's structure fix;
- the output of an opaque (leaf) module is handed back as the Python containers it returns,
  holding a proxy for each item (``images, targets = self.transform(images)``; the postprocess
  writes ``result[i]["boxes"] = boxes`` into them);
- a Python condition on a value (``if x.sum() > 0``, ``if boxes.numel() == 0``) and iterating a
  tensor stay errors: their answers depend on the data, and the graph would silently keep the
  example's.

The graph still computes sizes symbolically (``original_image_sizes`` follow the input's size);
only lengths of lists and tuples are fixed, as they are in the traced code's own structure.
Tracing holds every value of one forward until it ends: the memory of all its activations.
"""
from __future__ import annotations

import contextlib
import operator
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn


class _ValueProxy(fx.Proxy):
    """A proxy that can give its value's structure (see the module docstring)."""

    def __getattr__(self, name):
        return _ValueAttribute(self, name)

    def __len__(self):
        return len(self.tracer.sequence_value(self, "len()"))

    def __iter__(self):
        value = self.tracer.sequence_value(self, "iteration")
        return iter([self[i] for i in range(len(value))])

    def keys(self):
        return self.tracer.dict_value(self).keys()

    def values(self):
        return [self[k] for k in self.keys()]

    def items(self):
        return [(k, self[k]) for k in self.keys()]


class _ValueAttribute(_ValueProxy, fx.proxy.Attribute):
    pass


class ValueTracer(fx.Tracer):
    """``fx.Tracer`` over ``root`` whose nodes carry their values on ``example_inputs`` (flat, in
    placeholder order); ``is_leaf(path, module)`` says which modules stay opaque calls."""

    def __init__(self, is_leaf, example_inputs: Sequence[torch.Tensor]):
        super().__init__()
        self._is_leaf = is_leaf
        self.values: dict[fx.Node, Any] = {}
        self._placeholder_values = iter(example_inputs)
        self._evaluating = 0

    # -- fx hooks --------------------------------------------------------------------------
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return self._is_leaf(qualname, m)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ValueProxy(node, self)

    def iter(self, obj):
        return _ValueProxy.__iter__(obj)

    def keys(self, obj):
        return _ValueProxy.keys(obj)

    def call_module(self, m, forward, args, kwargs):
        if self._evaluating:  # computing a value: run the module itself
            return forward(*args, **kwargs)
        out = super().call_module(m, forward, args, kwargs)
        if isinstance(out, fx.Proxy) and self.is_leaf_module(m, self.path_of_module(m)):
            return self._as_containers(out, self.values[out.node])
        return out

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._evaluating:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if kind not in ("placeholder", "output") and self.values.get(proxy.node, 0) is None:
            return None  # a None result is a constant (``if targets is None`` must see it)
        return proxy

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind == "placeholder":
            # the example tensors come first (signature order); then the defaults that the call
            # leaves out, specialised (fx passes the default as the placeholder's argument)
            self.values[node] = next(self._placeholder_values, args[0] if args else None)
        elif kind != "output":
            self.values[node] = self._evaluate(node)
        return node

    # -- values ----------------------------------------------------------------------------
    def _evaluate(self, node: fx.Node) -> Any:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: self.values[n])
        with self._running():
            if node.op == "call_function":
                return node.target(*args, **kwargs)
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            if node.op == "call_module":
                return self.root.get_submodule(node.target)(*args, **kwargs)
            return operator.attrgetter(node.target)(self.root)  # get_attr

    @contextlib.contextmanager
    def _running(self):
        self._evaluating += 1
        try:
            with torch.no_grad():
                yield
        finally:
            self._evaluating -= 1

    def sequence_value(self, proxy: fx.Proxy, what: str):
        value = self.values[proxy.node]
        if isinstance(value, torch.Tensor) or not isinstance(value, (list, tuple)):
            raise fx.proxy.TraceError(f"{what} of {proxy.node.name} ({type(value).__name__}) depends on the "
                                      "data; only the length of a list, a tuple or a size is known")
        return value

    def dict_value(self, proxy: fx.Proxy) -> dict:
        value = self.values[proxy.node]
        if not isinstance(value, dict):
            raise fx.proxy.TraceError(f"keys() of {proxy.node.name}, a {type(value).__name__}")
        return value

    def _as_containers(self, proxy: fx.Proxy, value: Any) -> Any:
        """``proxy`` (a leaf's output) as the lists, tuples and dicts ``value`` is made of."""
        if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size) and not hasattr(value, "_fields"):
            items = [self._as_containers(proxy[i], v) if v is not None else None for i, v in enumerate(value)]
            return items if isinstance(value, list) else tuple(items)
        if type(value) is dict:
            return {k: self._as_containers(proxy[k], v) if v is not None else None for k, v in value.items()}
        return proxy


def value_trace(root: nn.Module, is_leaf, concrete_args: dict, flat_inputs: Iterable[torch.Tensor]) -> fx.Graph:
    """Trace ``root`` with :class:`ValueTracer` (``concrete_args``: fx's, for container arguments
    and specialised defaults; ``flat_inputs``: the example tensors in placeholder order)."""
    tracer = ValueTracer(is_leaf, list(flat_inputs))
    tracer.root = root
    try:
        return tracer.trace(root, concrete_args=concrete_args or None)
    finally:
        tracer.values.clear()  # every value of one forward: release them now, not with the tracer
