"""Symbolic tracing that carries the example's values: the third tracer, for a model whose own
``forward`` is Python glue around opaque parts (a torchvision detector).

torch.fx stops at the first ``len(proxy)`` or ``a, b = proxy``: it knows no values. torch.export
knows them, but has to follow every opaque part too, and stops at their data-dependent code (the
RPN's top-k over a data-dependent number of boxes, non-maximum suppression). Here every node's
value on the example inputs is computed as the node is created (the fx graph is run as it is
built), so the glue can ask for the *structure* of a value, never for its data:

- ``len``/iteration of a list or tuple value (``boxes.unbind(1)``: 4 coordinates) and of a size
  (``img.shape[-2:]``) use the example's length, which tensor ranks and the model's structure fix;
- the output of an opaque (leaf) module, or of a method kept opaque (:mod:`.opaque_methods`), is
  handed back as the Python containers it returns, holding a proxy for each item (``images,
  targets = self.transform(images)``; the postprocess writes ``result[i]["boxes"] = boxes`` into
  them); the graph reads as many items as the example's lists hold, and a guard checks each
  list's length at run time;
- a check on a value (``torch._assert(boxes.shape[-1] == 4, ...)``; ``if degenerate_boxes.any():``
  where that branch raises) takes the example's answer and leaves a run-time guard in the graph
  (:mod:`archir.ir.guards`): a run whose answer differs is refused, never silently computed
  along the example's branch. So does a branch on sizes or types alone (``if boxes.numel() ==
  0``, ``t.is_floating_point()``), as torch.export guards its shapes. Tracing logs each guard.
  Any other condition on a value stays an error (``if x.sum() > 0: return x``: both branches
  compute, the answer is the data's), so that the submodule or method it is in is kept opaque,
  exact for every input; so does iterating a tensor (the number of iterations is its data);
- ``isinstance(x, torch.Tensor)`` is true of a value that is a tensor; ``x[i] = v`` is recorded,
  and made out of place before the graph becomes IR.

The graph still computes sizes symbolically (``original_image_sizes`` follow the input's size);
only lengths of lists and tuples are fixed, as they are in the traced code's own structure.
Tracing holds every value of one forward until it ends: the memory of all its activations.
"""
from __future__ import annotations

import contextlib
import dis
import inspect
import logging
import operator
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from archir.ir.guards import guard

from .build import mutable
from .normalize import INPLACE_OPERATORS
from .opaque_methods import MethodCall, calls_through, methods_on_stack, parametrised_calls

log = logging.getLogger("archir")


class _ValueProxy(fx.Proxy):
    """A proxy that can give its value's structure (see the module docstring)."""

    @property
    def __class__(self):
        # the model's ``isinstance(boxes, torch.Tensor)`` sees what the value is; fx itself tests
        # for proxies first (ValueTracer.create_arg), and type() is unchanged
        node = vars(self).get("node") or vars(self).get("_node")  # an attribute's: only once made
        value = self.tracer.values.get(node) if node is not None else None
        return torch.Tensor if isinstance(value, torch.Tensor) else type(self)

    def __getattr__(self, name):
        return _ValueAttribute(self, name)

    def __len__(self):
        return len(self.tracer.sequence_value(self, "len()"))

    def __iter__(self):
        value = self.tracer.sequence_value(self, "iteration")
        return iter([self[i] for i in range(len(value))])

    def __setitem__(self, key, value):
        # recorded as fx's ``setitem``, made out of place afterwards (normalize.functionalize)
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})

    def keys(self):
        return self.tracer.dict_value(self).keys()

    # a dict's methods, or an attribute of that name (``quality.max(0).values``)
    @property
    def values(self):
        if not isinstance(self.tracer.values.get(self.node), dict):
            return _ValueAttribute(self, "values")
        return lambda: [self[k] for k in self.keys()]

    @property
    def items(self):
        if not isinstance(self.tracer.values.get(self.node), dict):
            return _ValueAttribute(self, "items")
        return lambda: [(k, self[k]) for k in self.keys()]


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
        # (condition node, the example's answer, what a failure means, the last node before the check)
        self.guards: list[tuple[fx.Node, bool, str, fx.Node]] = []

    # -- fx hooks --------------------------------------------------------------------------
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return self._is_leaf(qualname, m)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ValueProxy(node, self)

    def iter(self, obj):
        return _ValueProxy.__iter__(obj)

    def create_arg(self, a):
        if isinstance(a, fx.Proxy):  # before fx's own tests, which a proxy of a tensor would pass
            return a.node
        return super().create_arg(a)

    def to_bool(self, obj: fx.Proxy) -> bool:
        """A Python condition on a traced value: the example's answer, checked at run time where
        the condition is a check or reads only sizes (see the module docstring)."""
        value = self.values[obj.node]
        if isinstance(value, torch.Tensor) and value.numel() != 1:
            raise fx.proxy.TraceError(f"a condition on {obj.node.name}, a tensor of {value.numel()} elements "
                                      "(its truth is ambiguous)")
        message = _other_branch_raises(answer := bool(value))
        if message is not None:
            self._add_guard(obj.node, answer, _own_check(message))
        elif self._reads_metadata_only(obj.node):
            self._add_guard(obj.node, answer, "this input takes another branch at {} than the traced example: "
                            "the branch depends on sizes or types, and the graph holds the example's")
        else:
            raise fx.proxy.TraceError(f"a condition on {obj.node.name}: its answer depends on the data")
        return answer

    def _reads_metadata_only(self, node: fx.Node) -> bool:
        """Whether ``node`` reads tensors only through their sizes and types (``boxes.numel() == 0``)."""
        seen, stack = set(), [node]
        while stack:
            n = stack.pop()
            if n in seen or _reads_metadata(n):
                continue
            seen.add(n)
            if n.op in ("placeholder", "get_attr") or isinstance(self.values.get(n), torch.Tensor):
                return False
            stack.extend(n.all_input_nodes)
        return True

    def keys(self, obj):
        return _ValueProxy.keys(obj)

    def call_module(self, m, forward, args, kwargs):
        if self._evaluating:  # computing a value: run the module itself
            return forward(*args, **kwargs)
        out = super().call_module(m, forward, args, kwargs)
        if isinstance(out, fx.Proxy) and self.is_leaf_module(m, self.path_of_module(m)):
            name = m.extra_repr() if isinstance(m, MethodCall) else self.path_of_module(m)
            return self._as_containers(out, self.values[out.node], name)
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
            if _writes_into_a_view(node, self.values):  # raised here, where the model's code is
                raise fx.proxy.TraceError(f"{node.name} writes in place into a view of a tensor, which the graph "
                                          "cannot make out of place")
            self.values[node] = self._evaluate(node)
            if _writes_in_place(node):  # where functionalize may refuse it, which methods to keep opaque
                node.meta["archir_methods"] = methods_on_stack(self.root)
            if target is torch._assert and args and isinstance(args[0], fx.Node):
                message = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
                self._add_guard(args[0], True, _own_check(message))  # the check stays, the dead call goes
        return node

    def _add_guard(self, condition: fx.Node, answer: bool, what: str) -> None:
        """Guard ``condition`` at ``answer``; ``what`` says what a failure means, ``{}`` where the
        model's code is."""
        from .capture import caller_location

        what = what.replace("{}", caller_location() or "the model's code", 1)
        self.guards.append((condition, answer, what, next(iter(reversed(self.graph.nodes)))))

    # -- values ----------------------------------------------------------------------------
    def _evaluate(self, node: fx.Node) -> Any:
        # fresh plain containers, as the generated code makes: the callee may write into them
        args, kwargs = mutable(fx.node.map_arg((node.args, node.kwargs), lambda n: self.values[n]))
        with self._running():
            if node.op == "call_function":
                return node.target(*args, **kwargs)
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            if node.op == "call_module":
                module = self.root.get_submodule(node.target)
                if not isinstance(module, MethodCall):
                    return module(*args, **kwargs)
                with parametrised_calls() as ran:
                    out = module(*args, **kwargs)
                if ran:  # its parameters would be hidden in one opaque call
                    raise fx.proxy.TraceError(f"{module.extra_repr()} runs {type(ran[0]).__name__}, which "
                                              "has parameters: the method cannot be kept opaque")
                return out
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

    def _as_containers(self, proxy: fx.Proxy, value: Any, name: str) -> Any:
        """``proxy`` (the output of opaque ``name``) as the lists, tuples and dicts ``value`` is
        made of. The graph reads as many items as the example's lists hold: a guard checks
        each list's length at run time (a post-process returns one item per image)."""
        if isinstance(value, list):
            same = self.create_proxy("call_function", operator.eq,
                                     (self.create_proxy("call_function", len, (proxy,), {}), len(value)), {})
            self._add_guard(same.node, True, f"{name}, called at {{}}, returns a list of another length than "
                            f"on the traced example ({len(value)}), whose items the graph reads")
        if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size) and not hasattr(value, "_fields"):
            items = [self._as_containers(proxy[i], v, name) if v is not None else None for i, v in enumerate(value)]
            return items if isinstance(value, list) else tuple(items)
        if type(value) is dict:
            return {k: self._as_containers(proxy[k], v, name) if v is not None else None for k, v in value.items()}
        return proxy


def _writes_in_place(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in (*INPLACE_OPERATORS, operator.setitem)) or (
        node.op == "call_method" and node.target.endswith("_") and not node.target.endswith("__"))


def _writes_into_a_view(node: fx.Node, values: dict) -> bool:
    """Whether ``node`` changes its first argument in place, a view of another tensor (which
    :func:`.normalize.functionalize` refuses)."""
    first = values.get(node.args[0]) if _writes_in_place(node) and isinstance(node.args[0], fx.Node) else None
    return isinstance(first, torch.Tensor) and first._base is not None


def _own_check(message: str) -> str:
    """What a failed guard of the model's own check says (``{}``: where the check is)."""
    return "the model's own check at {}" + (f" [{message}]" if message else "") + \
        " fails on this input; the original model stops there too"


_METADATA_METHODS = {"size", "numel", "dim", "nelement", "is_floating_point", "is_complex", "element_size"}
_METADATA_ATTRIBUTES = {"shape", "ndim", "dtype", "device", "is_cuda"}


def _reads_metadata(n: fx.Node) -> bool:
    """Whether ``n`` reads a tensor's sizes or type, not its values."""
    return (n.op == "call_method" and n.target in _METADATA_METHODS) or (
        n.op == "call_function" and n.target is getattr and len(n.args) > 1 and n.args[1] in _METADATA_ATTRIBUTES)


def _other_branch_raises(answer: bool) -> str | None:
    """Whether the ``if`` that is asking for a proxy's truth (``__bool__`` called from the model's
    code) is a check: the branch the example does not take raises (``raise``, ``assert``,
    ``torch._assert(False, ...)``) before it jumps or returns. Read from the calling frame's
    bytecode, as fx's own ``Proxy.__bool__`` finds ``assert`` statements; any other shape of code
    counts as a real branch. Returns None for a real branch, else the check's message (its first
    string constant) or ``""``."""
    frame = inspect.currentframe()
    while frame is not None and frame.f_code is not fx.Proxy.__bool__.__code__:
        frame = frame.f_back
    if frame is None or frame.f_back is None:
        return None
    code, lasti = frame.f_back.f_code, frame.f_back.f_lasti
    ins = [i for i in dis.get_instructions(code) if i.opname != "CACHE"]
    k = next((n for n, i in enumerate(ins) if i.offset >= lasti), None)
    while k is not None and k < len(ins) and ins[k].opname in ("TO_BOOL", "UNARY_NOT"):
        answer ^= ins[k].opname == "UNARY_NOT"
        k += 1
    if k is None or k + 1 >= len(ins) or not ins[k].opname.startswith("POP_JUMP") \
            or not ins[k].opname.endswith(("IF_TRUE", "IF_FALSE")):
        return None
    jumps = ins[k].opname.endswith("IF_TRUE") == answer
    start = k + 1 if jumps else next((n for n, i in enumerate(ins) if i.offset == ins[k].argval), len(ins))
    message = ""
    for n in range(start, min(start + 400, len(ins))):
        op = ins[n]
        if op.opname == "LOAD_CONST" and isinstance(op.argval, str) and not message:
            message = op.argval.strip()
        if op.opname == "RAISE_VARARGS" or (op.argval == "_assert" and n + 1 < len(ins)
                                            and ins[n + 1].opname == "LOAD_CONST" and ins[n + 1].argval is False):
            if op.opname != "RAISE_VARARGS":
                message = next((i.argval.strip() for i in ins[n + 2:n + 4] if i.opname == "LOAD_CONST"
                                and isinstance(i.argval, str)), message)
            return message
        if "JUMP" in op.opname or op.opname.startswith("RETURN"):
            return None
    return None


def value_trace(root: nn.Module, is_leaf, concrete_args: dict, flat_inputs: Iterable[torch.Tensor],
                methods: Iterable[str] = ()) -> fx.Graph:
    """Trace ``root`` with :class:`ValueTracer` (``concrete_args``: fx's, for container arguments
    and specialised defaults; ``flat_inputs``: the example tensors in placeholder order;
    ``methods``: methods kept opaque, ``"path:name"``, see :mod:`.opaque_methods`)."""
    tracer = ValueTracer(lambda path, m: isinstance(m, MethodCall) or is_leaf(path, m), list(flat_inputs))
    tracer.root = root
    try:
        with calls_through(root, methods):
            graph = tracer.trace(root, concrete_args=concrete_args or None)
        for condition, answer, what, after in tracer.guards:
            _insert_guard(graph, tracer.values, condition, answer, what, after)
            log.info("checked at run time (a failure would mean: %s)", what)
        return graph
    finally:
        tracer.values.clear()  # every value of one forward: release them now, not with the tracer


def _insert_guard(graph: fx.Graph, values: dict, condition: fx.Node, answer: bool, what: str,
                  after: fx.Node) -> None:
    """Put ``guard(x, condition, answer, what)`` after node ``after`` (see :mod:`archir.ir.guards`),
    ``x`` the nearest tensor that ``condition`` was computed from and that a later node reads:
    those later reads go through the guard. Where no such tensor exists, ``x`` is the first
    tensor of the graph's output."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    later = lambda n: [u for u in n.users if order[u] > order[after]]  # noqa: E731
    seen, frontier, x = {condition}, [condition], None
    while frontier and x is None:
        x = next((n for n in frontier if n.op != "get_attr" and isinstance(values.get(n), torch.Tensor)
                  and later(n)), None)
        frontier = [a for n in frontier for a in n.all_input_nodes if a not in seen and not seen.add(a)]
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    if x is None:
        x = next((n for n in pytree.tree_leaves(output.args) if isinstance(n, fx.Node)
                  and isinstance(values.get(n), torch.Tensor)), None)
        if x is None:
            raise fx.proxy.TraceError(f"a condition guards no tensor of the output: {what}")
        after = output.prev
    readers = later(x)
    with graph.inserting_after(after):
        checked = graph.call_function(guard, (x, condition, answer, what))
    values[checked] = values[x]  # a later guard may guard it in turn
    for user in readers:
        user.replace_input_with(x, checked)
