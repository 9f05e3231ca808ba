"""From a traced fx graph to the edge-labelled IR.

1. **Record**: run the fx graph on the example inputs (eval mode, no grad) and keep each node's
   result meta (a tensor, a tuple of tensors, or something else).
2. **Classify**: a node is *dataflow* when it takes a dataflow value directly and returns tensors;
   placeholders are dataflow. Everything else (sizes, shapes, parameters, constant tensors) is
   inlined as a nested :class:`~archir.ir.Op` into the operations that use it.
3. **Junctions**: inputs, outputs, tuple values, joins (two or more tensor operands), and every
   value that is not used exactly once as the data input of a single consumer. With
   ``granularity="layer"`` a chain is also cut after an activation that follows a weighted op.
4. **Edges**: walking back from each junction's operands to the previous junction.
"""
from __future__ import annotations

import operator
import re
from collections import Counter
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import nn

from archir.errors import TraceError, UserInputError
from archir.ir import (CONCAT_TARGETS, IN, PRODUCT_TARGETS, SUM_TARGETS, Combine, Edge, Graph, Junction,
                       JunctionRef, ObjectMeta, Op, Operand, TensorMeta, fetch_attr)
from archir.ir.costs import ATEN_RNN, counted_by_costs, function_flops, module_flops, rnn_flops
from archir.ir.graph import SharedNames, _flatten
from archir.modes import eval_mode

from .mode_split import ByMode
from .normalize import isolate_mutating_calls

_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid,
                       nn.Tanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.PReLU, nn.Softplus,
                       nn.Hardtanh)
_ACTIVATION_NAMES = {"relu", "relu6", "gelu", "silu", "hardswish", "hardsigmoid", "sigmoid", "tanh",
                     "leaky_relu", "elu", "selu", "celu", "mish", "prelu", "softplus", "hardtanh"}
_WEIGHTED_MODULES = (nn.modules.conv._ConvNd, nn.Linear)
_WEIGHTED_NAMES = {"conv1d", "conv2d", "conv3d", "convolution", "linear", "conv_transpose2d"}
# bare containers: cell-sharing looks through them to the module that calls them
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_CONTAINER_NAMES = {"Sequential", "ModuleList", "ModuleDict"}


def _describe(value: Any, depth: int = 0):
    """A value's :data:`~archir.ir.Meta`: a tensor, a (possibly nested) tuple of tensors, or an
    opaque object holding tensors.

    Nested tuples are what recurrent layers return (``nn.LSTM``: ``(out, (h, c))``). Items that
    are not tensors are None (``nn.MultiheadAttention(..., need_weights=False)``: ``(out, None)``;
    torchvision's MViT helper ``_unsqueeze``: ``(x, ndim)``), as long as the tuple holds a tensor:
    the tuple is dataflow, and its other items are read like sizes. A dict or an object that
    holds tensors (torchvision's ``ImageList``, a detection dict) is an :class:`ObjectMeta`.
    Anything else (sizes, Python numbers) is not dataflow: None.
    """
    if isinstance(value, torch.Tensor):
        return TensorMeta.of(value)
    if depth > 8:
        return None
    if isinstance(value, (tuple, list)) and value and not isinstance(value, torch.Size):
        items = [_describe(v, depth + 1) for v in value]
        return tuple(items) if any(m is not None for m in items) else None
    if isinstance(value, dict) or (hasattr(value, "__dict__") and not isinstance(value, (nn.Module, type))):
        items = value.values() if isinstance(value, dict) else vars(value).values()
        if any(_describe(v, depth + 1) is not None for v in items):
            return ObjectMeta(type(value).__name__)
    return None


class _Recorder(fx.Interpreter):
    def __init__(self, root: nn.Module, graph: fx.Graph):
        super().__init__(root, graph=graph)
        self.metas: dict[fx.Node, Any] = {}
        # call -> [(tensor argument it changed in place, whether it returned it)]
        self.mutated: dict[fx.Node, list[tuple[fx.Node, bool]]] = {}
        self.leaf_macs: dict[fx.Node, int] = {}  # opaque leaf call -> the multiply-adds it ran

    def run_node(self, n: fx.Node) -> Any:
        # a called function (a wrapped helper, opaque to the tracer) may change an argument in
        # place: its version counter moves (views share their base's counter)
        versions = {a: self.env[a]._version for a in n.all_input_nodes
                    if n.op == "call_function" and isinstance(self.env.get(a), torch.Tensor)}
        if n.op == "call_module" and not counted_by_costs(self.fetch_attr(n.target)):
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:  # an opaque leaf: count what it runs
                result = super().run_node(n)
            self.leaf_macs[n] = counter.get_total_flops() // 2  # FLOPs of products are 2 per multiply-add
        else:
            result = super().run_node(n)
        self.metas[n] = _describe(result)
        if n.op == "call_module" and isinstance(self.fetch_attr(n.target), ByMode) and self.metas[n] is not None:
            # what it returns depends on the mode (losses or detections): one opaque value
            self.metas[n] = ObjectMeta(type(result).__name__)
        changed = [(a, result is self.env[a]) for a, v in versions.items() if self.env[a]._version != v]
        if changed:
            self.mutated[n] = changed
        return result

    def call_function(self, target, args, kwargs) -> Any:
        # fx hands list arguments over as its immutable lists; the generated code of a
        # GraphModule builds fresh ones, and a wrapped helper may mutate its argument
        # (torchvision's video Swin: ``window_size[i] = size_dhw[i]``)
        return super().call_function(target, mutable(args), mutable(kwargs))

    def call_module(self, target, args, kwargs) -> Any:
        # a method kept opaque writes into the dicts it is given (a detector's postprocess)
        return super().call_module(target, mutable(args), mutable(kwargs))


def mutable(a: Any) -> Any:
    """``a`` with fx's immutable lists and dicts (node arguments) as fresh plain ones."""
    if isinstance(a, (list, fx.immutable_collections.immutable_list)):
        return [mutable(x) for x in a]
    if type(a) is tuple:
        return tuple(mutable(x) for x in a)
    if type(a) in (dict, fx.immutable_collections.immutable_dict):
        return {k: mutable(v) for k, v in a.items()}
    return a


def record(root: nn.Module, graph: fx.Graph, inputs: Sequence[torch.Tensor]) -> tuple[dict, dict]:
    """Run ``graph`` on ``inputs`` (eval mode, no grad) and return each node's meta, and the
    multiply-adds each opaque leaf call ran (see :mod:`archir.ir.costs`); calls found changing an
    argument in place get a copy of it (:func:`isolate_mutating_calls`)."""
    with eval_mode(root), torch.no_grad():
        rec = _Recorder(root, graph)
        rec.run(*inputs)
    isolate_mutating_calls(graph, rec.mutated, rec.metas)
    return rec.metas, rec.leaf_macs


def _base_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return t
    name = getattr(t, "__name__", str(t))
    packet = getattr(t, "overloadpacket", None)
    return getattr(packet, "__name__", name)


def _combine_kind(node: fx.Node, n_operands: int) -> tuple[str, int | None]:
    target = node.target if node.op == "call_function" else node.target if node.op == "call_method" else None
    name = _base_name(node)
    plain = n_operands == 2 and len(node.args) == 2 and not node.kwargs
    if plain and (target in SUM_TARGETS or name in ("add", "iadd")):
        return "sum", None
    if plain and (target in PRODUCT_TARGETS or name in ("mul", "imul")):
        return "product", None
    if target in CONCAT_TARGETS or name in ("cat", "concat"):
        seq = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if isinstance(seq, (list, tuple)) and len(seq) == n_operands and all(isinstance(a, fx.Node) for a in seq) \
                and isinstance(dim, int):
            return "concat", dim
    return "other", None


class _Builder:
    def __init__(self, root: nn.Module, graph: fx.Graph, metas: dict, granularity: str, name: str,
                 frontend: str, out_spec=None, leaf_macs: dict | None = None):
        self.root, self.fxg, self.metas = root, graph, metas
        self.leaf_macs = leaf_macs or {}
        self.granularity, self.out_spec = granularity, out_spec
        self.ir = Graph(root, name=name, granularity=granularity, frontend=frontend)
        self.nodes = list(graph.nodes)
        self.dataflow: dict[fx.Node, bool] = {}
        self.data_occ: dict[fx.Node, list[fx.Node]] = {}
        self.jid: dict[fx.Node, str] = {}
        self.deps: dict[fx.Node, set[fx.Node]] = {}  # memo of inlined_deps
        self.inlined: dict[tuple, Op] = {}  # memo of inline: (node, how its reads resolve) -> Op
        # FLOPs are counted per example: divided by the first input's leading (batch) dimension
        first = next((metas[n] for n in self.nodes if n.op == "placeholder"), None)
        self.batch = max(1, first.shape[0]) if isinstance(first, TensorMeta) and first.shape else 1

    # -- classification ------------------------------------------------------------------------
    def classify(self) -> None:
        for n in self.nodes:
            if n.op == "placeholder":
                if not isinstance(self.metas.get(n), TensorMeta):
                    raise TraceError(f"input '{n.name}' is not a tensor; archir traces tensor inputs only")
                self.dataflow[n], self.data_occ[n] = True, []
                continue
            if n.op == "output":
                continue
            occ = [a for a in _flatten((n.args, n.kwargs)) if isinstance(a, fx.Node) and self.dataflow.get(a)]
            self.dataflow[n] = bool(occ) and self.metas.get(n) is not None and n.op != "get_attr"
            self.data_occ[n] = occ if self.dataflow[n] else []

    def inlined_deps(self, n: fx.Node, memo: dict) -> set[fx.Node]:
        """Dataflow values that non-dataflow node ``n`` reads (through sizes, in practice)."""
        if n in memo:
            return memo[n]
        deps: set[fx.Node] = set()
        for a in n.all_input_nodes:
            if self.dataflow.get(a):
                deps.add(a)
            else:
                deps |= self.inlined_deps(a, memo)
        memo[n] = deps
        return deps

    def find_junctions(self) -> set[fx.Node]:
        memo = self.deps
        out_node = self.nodes[-1]
        live = self._live(out_node)
        uses: dict[fx.Node, list[tuple[fx.Node, str]]] = {n: [] for n in self.nodes if self.dataflow.get(n)}
        for c in self.nodes:
            if c not in live or not (self.dataflow.get(c) or c.op == "output"):
                continue
            for a in c.all_input_nodes:
                if self.dataflow.get(a):
                    uses[a].extend((c, "data") for _ in range(self.data_occ[c].count(a) if c.op != "output" else 1))
                else:
                    for d in self.inlined_deps(a, memo):
                        uses[d].append((c, "shape"))
        junctions = set()
        for t, us in uses.items():
            if t not in live:
                continue
            meta = self.metas.get(t)
            consumers = {c for c, _ in us}
            n_data = sum(1 for _, k in us if k == "data")
            single = len(consumers) == 1 and n_data == 1 and next(iter(consumers)).op != "output"
            if t.op == "placeholder" or isinstance(meta, (tuple, ObjectMeta)) or len(self.data_occ[t]) >= 2 or not single:
                junctions.add(t)
        # layer granularity: cut after an activation that follows a weighted operation
        weighted: dict[fx.Node, bool] = {}
        for n in self.nodes:
            if n not in uses or n not in live or n.op == "placeholder":
                continue
            if n in junctions and len(self.data_occ[n]) >= 2:
                weighted[n] = False
                continue
            prev = self.data_occ[n][0]
            w = (weighted.get(prev, False) if prev not in junctions else False) or self._is_weighted(n)
            if self.granularity == "layer" and w and self._is_activation(n):
                junctions.add(n)
            weighted[n] = False if n in junctions else w
        self.live = live
        return junctions

    def _live(self, out_node: fx.Node) -> set[fx.Node]:
        live, stack = set(), [out_node]
        while stack:
            n = stack.pop()
            if n in live:
                continue
            live.add(n)
            stack.extend(n.all_input_nodes)
        return live

    def _module(self, n: fx.Node) -> nn.Module | None:
        return self.root.get_submodule(n.target) if n.op == "call_module" else None

    def _is_weighted(self, n: fx.Node) -> bool:
        m = self._module(n)
        if m is not None:
            return isinstance(m, _WEIGHTED_MODULES)
        return n.op == "call_function" and _base_name(n) in _WEIGHTED_NAMES

    def _is_activation(self, n: fx.Node) -> bool:
        m = self._module(n)
        if m is not None:
            return isinstance(m, _ACTIVATION_MODULES)
        return n.op in ("call_function", "call_method") and _base_name(n).rstrip("_") in _ACTIVATION_NAMES

    # -- conversion ----------------------------------------------------------------------------
    def convert(self, a: Any, resolve) -> Any:
        if isinstance(a, fx.Node):
            if self.dataflow.get(a):
                return resolve(a)
            return self.inline(a, resolve)
        if isinstance(a, tuple):
            return tuple(self.convert(x, resolve) for x in a)
        if isinstance(a, list):
            return [self.convert(x, resolve) for x in a]
        if isinstance(a, dict):
            return {k: self.convert(v, resolve) for k, v in a.items()}
        if isinstance(a, slice):
            return slice(self.convert(a.start, resolve), self.convert(a.stop, resolve), self.convert(a.step, resolve))
        return a

    def inline(self, n: fx.Node, resolve) -> Op:
        """Non-dataflow node ``n`` as a nested Op. Each node becomes one Op object per way its
        dataflow reads resolve (the chain input, a junction, a join operand), shared by every use:
        sizes threaded through many blocks (MViT's ``thw``) make a DAG, whose expansion as a tree
        grows exponentially with depth."""
        if n.op == "placeholder":
            raise TraceError(f"non-tensor input '{n.name}' is not supported")
        key = (n, frozenset((d, resolve(d)) for d in self.inlined_deps(n, self.deps)))
        if key not in self.inlined:
            self.inlined[key] = self._inline_new(n, resolve)
        return self.inlined[key]

    def _inline_new(self, n: fx.Node, resolve) -> Op:
        if n.op == "get_attr":
            return Op("get_attr", n.target, meta={"name": n.name})
        # a nested expression reads dataflow values only through their sizes
        return Op(n.op, n.target, self.convert(n.args, resolve), self.convert(n.kwargs, resolve),
                  meta={"name": n.name})

    def _junction_ref(self, where: str):
        def resolve(a: fx.Node):
            if a in self.jid:
                return JunctionRef(self.jid[a])
            raise TraceError(f"internal: {where} reads value {a.name}, which is not a junction")
        return resolve

    def chain_op(self, n: fx.Node, inp: fx.Node) -> Op:
        def resolve(a: fx.Node):
            return IN if a is inp else self._junction_ref(n.name)(a)

        op = Op(n.op, n.target, self.convert(n.args, resolve), self.convert(n.kwargs, resolve),
                meta=self.op_meta(n))
        return op

    def join_op(self, n: fx.Node) -> Op:
        counter = iter(range(len(self.data_occ[n])))
        first: dict[fx.Node, int] = {}
        for i, a in enumerate(self.data_occ[n]):
            first.setdefault(a, i)

        def resolve(a: fx.Node):  # direct operands, numbered in the order data_occ lists them
            return Operand(next(counter))

        args = []
        for a in n.args:  # top-level operands, counted in flatten order
            args.append(self._convert_join_arg(a, resolve, first))
        kwargs = {k: self._convert_join_arg(v, resolve, first) for k, v in n.kwargs.items()}
        return Op(n.op, n.target, tuple(args), kwargs, meta=self.op_meta(n))

    def _convert_join_arg(self, a, resolve, first):
        # direct dataflow operands become Operand(i) in order; reads nested in sizes use their index
        def nested(x: fx.Node):
            if x in first:
                return Operand(first[x])
            return self._junction_ref("join")(x)

        if isinstance(a, fx.Node):
            return resolve(a) if self.dataflow.get(a) else self.inline(a, nested)
        if isinstance(a, (tuple, list)):
            out = [self._convert_join_arg(x, resolve, first) for x in a]
            return tuple(out) if isinstance(a, tuple) else out
        if isinstance(a, dict):
            return {k: self._convert_join_arg(v, resolve, first) for k, v in a.items()}
        return self.convert(a, nested)

    def op_meta(self, n: fx.Node) -> dict:
        out = self.metas.get(n)
        shapes = []
        for a in _flatten((n.args, n.kwargs)):
            if isinstance(a, fx.Node):
                m = self.metas.get(a)
                if a.op == "get_attr":
                    v = fetch_attr(self.root, a.target)
                    shapes.append(tuple(v.shape) if isinstance(v, torch.Tensor) else None)
                else:
                    shapes.append(m.shape if isinstance(m, TensorMeta) else None)
        out_shape = out.shape if isinstance(out, TensorMeta) else None
        mod = self._module(n)
        if mod is not None:
            flops = module_flops(mod, shapes[0] if shapes else None, out_shape, shapes) or self.leaf_macs.get(n, 0)
        elif n.op == "call_function" and n.target in ATEN_RNN:
            flops = self._aten_rnn_flops(n)
        else:
            flops = function_flops(n.target, n.op, shapes, out_shape)
        return {"name": n.name, "out": out, "flops": int(flops) // self.batch, "scope": _stack(n)}

    def _aten_rnn_flops(self, n: fx.Node) -> int:
        """``aten.lstm.input(input, hx, params, ...)`` (and gru, rnn_*): what torch.export leaves of
        a recurrent layer it could not collapse back into a module call (see archir.ir.costs)."""
        params = n.args[2] if len(n.args) > 2 else None
        inp = self.metas.get(n.args[0]) if n.args and isinstance(n.args[0], fx.Node) else None
        if not isinstance(params, (list, tuple)) or not params or not isinstance(inp, TensorMeta):
            return 0
        shapes = []
        for p in params:
            v = fetch_attr(self.root, p.target) if isinstance(p, fx.Node) and p.op == "get_attr" else None
            shapes.append(tuple(v.shape) if isinstance(v, torch.Tensor) else None)
        if not shapes[0] or len(shapes[0]) != 2:
            return 0
        return rnn_flops(inp.shape, shapes[0][1], shapes)

    # -- assembly ------------------------------------------------------------------------------
    def build(self) -> Graph:
        self.classify()
        junctions = self.find_junctions()
        order = [n for n in self.nodes if n in junctions]
        for i, n in enumerate(order):
            self.jid[n] = f"j{i}"
        g = self.ir
        for n in order:
            combine = None
            if n.op != "placeholder" and len(self.data_occ[n]) >= 2:
                kind, dim = _combine_kind(n, len(self.data_occ[n]))
                combine = Combine(kind, self.join_op(n), len(self.data_occ[n]), dim)
            g.add_junction(Junction(self.jid[n], self.metas.get(n), combine,
                                    input_name=n.name if n.op == "placeholder" else None,
                                    name=n.name, scope=_stack(n)))
        edge_no = 0
        for n in order:
            if n.op == "placeholder":
                continue
            if len(self.data_occ[n]) >= 2:
                starts = [(i, t, []) for i, t in enumerate(self.data_occ[n])]
            else:
                starts = [(0, self.data_occ[n][0], [n])]
            for index, first, tail in starts:
                src, chain = self._walk(first, junctions)
                chain = chain + tail
                ops, prev = [], src
                for c in chain:
                    ops.append(self.chain_op(c, prev))
                    prev = c
                e = Edge(f"e{edge_no}", self.jid[src], self.jid[n], ops, dst_index=index,
                         in_meta=self.metas.get(src), out_meta=self.metas.get(prev))
                if isinstance(self.metas.get(src), tuple) and ops:
                    e.in_meta = self.metas.get(src)
                edge_no += 1
                g.add_edge(e)
        g._next_id = len(order) + edge_no
        g.output = self.output_template()
        assign_groups(g)
        return g

    def _walk(self, first: fx.Node, junctions: set) -> tuple[fx.Node, list[fx.Node]]:
        chain, u = [], first
        while u not in junctions:
            chain.append(u)
            u = self.data_occ[u][0]
        return u, chain[::-1]

    def output_template(self) -> Any:
        out_node = self.nodes[-1]
        resolve = self._junction_ref("output")
        template = self.convert(out_node.args[0], resolve)
        if self.out_spec is not None:
            from .capture import plain_unflatten

            template = plain_unflatten(list(template), self.out_spec)
        return template


def _stack(n: fx.Node) -> tuple:
    """The node's module stack as ((path, class name), ...), without the leaf module it calls."""
    stack = n.meta.get("nn_module_stack") or {}
    out = []
    for path, cls in stack.values():
        if not path:
            continue
        name = cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1].rstrip("'>")
        out.append((path, name))
    if n.op == "call_module" and out and out[-1][0] == n.target:
        out.pop()
    return tuple(out)




def assign_groups(g: Graph, groups: dict | None = None) -> None:
    """Set every edge's cell-sharing key (``Edge.group``) and the call it belongs to (``Edge.scope``).

    **Cells.** A *call* is a call of a submodule that is not a bare container (``nn.Sequential``,
    ``nn.ModuleList``, ``nn.ModuleDict``: grouping looks through them); the model itself is never
    a cell. An edge lies in a call when all of its operations do, and the join it ends at if it
    ends at one (an empty edge: its destination). A call's *signature* is its module class and
    its structure: the edges with a part in it, in order, each as that part's operations relative
    to the call (module path and configuration, e.g. kernel size, stride and
    ``groups=depthwise``, with channel counts left out; functions by name and constant
    arguments), where its input comes from (an earlier edge of the call, or outside), how it ends
    (the join kind and operand position, or ``value``) and which tensor dimensions it changes.
    Counting parts (of a chain that starts before the call or runs on past its end) makes a
    block look the same whatever precedes or follows it, e.g. the last block before the head.
    Absolute sizes (channel counts, resolution) are not part of it: the paper's cell is one cell
    *type* repeated across the network (a ResNet20 block at every stage, a DARTS normal cell at
    every resolution), while a stride or a projection shortcut changes the structure.

    A class is a *cell class* when two or more of its calls have the same signature. An edge
    belongs to the outermost call around it whose class is a cell class (outermost, so that a
    DARTS cell's operations are positions of the cell, not of the ``SepConv`` they are made of).
    When that call's signature occurs two or more times, the edge's key is
    ``Class#variant/position:ops`` (variant numbers the repeated signatures of one class, position
    is the edge's index inside the call), shared by the edges at that position of every call
    with that signature. Every other edge (outside any cell, in a cell that occurs once, or only
    partly in a cell) keeps its own id as key.

    **Explicit groups.** ``groups = {name: [module path prefix, ...]}`` (a single string for one
    prefix) overrides the automatic key of every edge that lies under one of the prefixes (all
    its operations in that module or below it; the longest matching prefix wins): the key is
    ``name/position``, position the edge's index among the edges under its prefix, so the k-th
    edges of every prefix of one group share. Raises UserInputError for a prefix that names no
    submodule, or under which no edge lies.
    """
    edges = g.edges_in_order()
    containers: dict[str, bool] = {}

    def is_container(path: str, cls: str) -> bool:
        if path not in containers:
            try:
                containers[path] = type(g.root.get_submodule(path)) in _CONTAINERS
            except AttributeError:
                containers[path] = cls in _CONTAINER_NAMES
        return containers[path]

    calls: dict[str, list[tuple[str, str]]] = {}  # edge id -> the calls it lies in, outermost first
    members: dict[str, list[Edge]] = {}  # call path -> the edges with a part in it, in order
    cls_of: dict[str, str] = {}
    for e in edges:
        calls[e.id] = [(p, c) for p, c in _edge_stack(g, e) if not is_container(p, c)]
        touched: dict[str, str] = {}
        for stack in _op_stacks(g, e):
            for path, cls in stack:
                if not is_container(path, cls):
                    touched.setdefault(path, cls)
        for path, cls in touched.items():
            members.setdefault(path, []).append(e)
            cls_of[path] = cls
    configs: dict[str, str] = {}
    sigs = {path: (cls_of[path], _call_signature(g, path, es, configs)) for path, es in members.items()}
    position = {path: {e.id: i for i, e in enumerate(es)} for path, es in members.items()}
    counts = Counter(sigs.values())
    cell_classes = {cls for (cls, _), n in counts.items() if n >= 2}
    variants: dict[tuple, int] = {}
    for e in edges:
        cell = next(((p, c) for p, c in calls[e.id] if c in cell_classes), None)
        if cell is None:
            e.group, e.scope = e.id, calls[e.id][-1][0] if calls[e.id] else ""
            continue
        path, cls = cell
        e.scope, sig = path, sigs[path]
        if counts[sig] < 2:
            e.group = e.id
            continue
        if sig not in variants:
            variants[sig] = 1 + sum(1 for s in variants if s[0] == cls)
        e.group = f"{cls}#{variants[sig]}/{position[path][e.id]}:{_short_ops(e, path)}"
    if groups:
        _explicit_groups(g, groups, edges)


def _op_stacks(g: Graph, e: Edge) -> list[tuple]:
    """The module stack of each operation of ``e``, and its destination's where that is a join
    (or where ``e`` is empty)."""
    stacks = [op.meta.get("scope", ()) for op in e.ops]
    dst = g.junctions[e.dst]
    if dst.is_join or not stacks:
        stacks.append(dst.scope)
    return stacks


def _edge_stack(g: Graph, e: Edge) -> tuple:
    """The module stack all of ``e`` runs in: its operations' and its destination's where that is a
    join (an empty edge: its destination's)."""
    return _common_prefix(_op_stacks(g, e))


def _in_call(stack: tuple, path: str) -> bool:
    return any(p == path for p, _ in stack)


def _call_signature(g: Graph, path: str, edges: list[Edge], configs: dict) -> tuple:
    """The structure of the call of ``path``: per edge with a part in it, that part. An edge that
    runs on past the call's end (the chain goes on into the next block or the head) or starts
    before it counts with its part inside, so that a block looks the same whatever follows it."""
    first_into: dict[str, int] = {}  # junction -> the first edge of the call that ends there
    out = []
    for i, e in enumerate(edges):
        inside = [k for k, op in enumerate(e.ops) if _in_call(op.meta.get("scope", ()), path)]
        ops = tuple(_op_signature(g, e.ops[k], path, configs) for k in inside)
        if inside:
            before = e.ops[inside[0] - 1].meta.get("out") if inside[0] else e.in_meta
            after = e.ops[inside[-1]].meta.get("out", e.out_meta)
        else:  # an empty edge, or one that only ends at a join of the call
            before, after = (e.out_meta if e.ops else e.in_meta), e.out_meta
        src = "in" if inside and inside[0] else first_into.get(e.src, "in")
        dst = g.junctions[e.dst]
        end = f"{dst.combine.kind}#{e.dst_index}" if dst.is_join and _in_call(dst.scope, path) else "value"
        out.append((ops, end, src, _shape_change(before, after)))
        first_into.setdefault(e.dst, i)
    return tuple(out)


def _relative(target: str, path: str) -> str:
    return target[len(path) + 1:] if target.startswith(path + ".") else target


def _op_signature(g: Graph, op: Op, path: str, configs: dict) -> str:
    if op.kind in ("call_module", "get_attr"):
        rel = _relative(str(op.target), path)
        if op.kind == "get_attr":
            return rel
        if op.target not in configs:
            try:
                configs[op.target] = _module_config(g.root.get_submodule(op.target))
            except AttributeError:
                configs[op.target] = "?"
        return f"{rel}={configs[op.target]}"
    return f"{op.name}({_const_signature((op.args, op.kwargs), path)})"


def _const_signature(v: Any, path: str, names: SharedNames | None = None) -> str:
    """Constant arguments as text; tensor values (the chain's input, junctions, operands) as ``_``.
    Shared parts of a large expression are numbered (:class:`~archir.ir.graph.SharedNames`)."""
    names = names if names is not None else SharedNames(v, numbered=True)
    if isinstance(v, Op):
        if v.kind == "get_attr":
            return _relative(str(v.target), path)
        return names.wrap(v, lambda: f"{v.name}({_const_signature((v.args, v.kwargs), path, names)})")
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_const_signature(x, path, names) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{_const_signature(x, path, names)}" for k, x in v.items()
                              if k != "inplace") + "}"
    if isinstance(v, slice):
        return ":".join(_const_signature(x, path, names) for x in (v.start, v.stop, v.step))
    if v is None or isinstance(v, (bool, int, float, str, torch.dtype)):
        return repr(v)
    return "_"


_LEADING_SIZES = re.compile(r"^(\(\d+(, \d+)*,?\)|\d+)(, (\(\d+(, \d+)*,?\)|\d+))*(, |$)")
_SIZE_KEYWORDS = re.compile(r"\b(in_features|out_features|inplace)=\w+(, )?")


def _module_config(m: nn.Module) -> str:
    """A module's class and configuration without its channel counts: ``Conv2d(kernel_size=(3, 3),
    stride=(2, 2), padding=(1, 1), groups=depthwise, bias=False)``, ``BatchNorm2d(eps=1e-05, ...)``."""
    try:
        text = m.extra_repr()
    except Exception:  # noqa: BLE001 - a user module's extra_repr: its class alone is the configuration
        text = ""
    groups = getattr(m, "groups", None)
    if isinstance(groups, int) and groups > 1 and groups == getattr(m, "in_channels", None):
        text = re.sub(r"\bgroups=\d+", "groups=depthwise", text)
    text = _SIZE_KEYWORDS.sub("", _LEADING_SIZES.sub("", text.strip()))
    return f"{type(m).__name__}({text.strip(', ')})"


def _shape_change(a: Any, b: Any) -> str:
    """Which dimensions an edge changes, not their sizes: ``====`` (none), ``=~~~`` (channels and
    resolution of an NCHW tensor); a change of rank, dtype or tuple structure in full."""
    if isinstance(a, TensorMeta) and isinstance(b, TensorMeta):
        if len(a.shape) != len(b.shape):
            return f"rank {len(a.shape)}->{len(b.shape)}"
        dims = "".join("=" if x == y else "~" for x, y in zip(a.shape, b.shape))
        return dims + ("" if a.dtype == b.dtype else f" {a.dtype}->{b.dtype}")
    return f"{_meta_kind(a)}->{_meta_kind(b)}"


def _meta_kind(m: Any) -> str:
    if isinstance(m, TensorMeta):
        return f"{len(m.shape)}d"
    if isinstance(m, tuple):
        return "(" + ",".join(_meta_kind(x) for x in m) + ")"
    return "-"


def _short_ops(e: Edge, path: str) -> str:
    """An edge's operations relative to ``path``, for a readable key: ``conv1·bn1·relu``."""
    names = [_relative(str(op.target), path) if op.kind in ("call_module", "get_attr") else op.name
             for op in e.ops]
    return "·".join(names) or "direct"


def _explicit_groups(g: Graph, groups: Any, edges: list[Edge]) -> None:
    prefixes: dict[str, str] = {}  # prefix -> group name
    if not isinstance(groups, dict):
        raise UserInputError("groups must be a dict {group name: [module path prefix, ...]}, not "
                             f"{type(groups).__name__}")
    for name, value in groups.items():
        items = [value] if isinstance(value, str) else value
        if not isinstance(name, str) or not name or not isinstance(items, (list, tuple)) \
                or not items or not all(isinstance(p, str) for p in items):
            raise UserInputError(f"groups: {name!r} must map to a module path prefix or a non-empty list "
                                 "of them (e.g. {'stage1': ['layer1.0', 'layer1.1']})")
        for p in items:
            if not p:
                raise UserInputError(f"groups[{name!r}]: an empty prefix would name the whole model")
            if p in prefixes:
                raise UserInputError(f"groups: prefix '{p}' is in both {prefixes[p]!r} and {name!r}")
            try:
                g.root.get_submodule(p)
            except AttributeError:
                raise UserInputError(f"groups[{name!r}]: '{p}' names no submodule of the model") from None
            prefixes[p] = name
    taken: Counter = Counter()
    for e in edges:
        under = [p for p in prefixes if _lies_under(g, e, p)]
        if not under:
            continue
        p = max(under, key=len)
        e.group, e.scope = f"{prefixes[p]}/{taken[p]}", p
        taken[p] += 1
    empty = [p for p in prefixes if not taken[p]]
    if empty:
        raise UserInputError(f"groups: no edge lies under {', '.join(repr(p) for p in empty)} (an edge lies under "
                             "a prefix when all its operations run in that module or below it)")


def _lies_under(g: Graph, e: Edge, prefix: str) -> bool:
    def under(path: str) -> bool:
        return path == prefix or path.startswith(prefix + ".")

    if not e.ops:
        scope = g.junctions[e.dst].scope
        return bool(scope) and under(scope[-1][0])
    for op in e.ops:
        scope = op.meta.get("scope", ())
        if not ((scope and under(scope[-1][0])) or (op.kind in ("call_module", "get_attr") and under(str(op.target)))):
            return False
    return True


def _common_prefix(stacks: list[tuple]) -> tuple:
    if not stacks:
        return ()
    prefix = stacks[0]
    for s in stacks[1:]:
        n = 0
        while n < min(len(prefix), len(s)) and prefix[n] == s[n]:
            n += 1
        prefix = prefix[:n]
    return prefix


def expand_tuple_uses(graph: fx.Graph, metas: dict, root: nn.Module) -> None:
    """A tuple value passed whole to a call (``torch.cat(x.chunk(2))``) is read item by item;
    except by a :class:`ByMode` call: its length may differ in the other mode (a detector's
    heads return no detections in training mode)."""
    for node in list(graph.nodes):
        meta = metas.get(node)
        if not isinstance(meta, tuple):
            continue
        for user in list(node.users):
            if user.op == "call_function" and user.target in (operator.getitem, len):
                continue  # len: a guard on a list's length (frontends/value_trace.py)
            if user.op == "call_module" and isinstance(root.get_submodule(user.target), ByMode):
                continue
            with graph.inserting_after(node):
                items = []
                for i in reversed(range(len(meta))):
                    item = graph.call_function(operator.getitem, (node, i))
                    metas[item] = meta[i]
                    items.insert(0, item)
            def swap(a, items=tuple(items)):
                return items if a is node else a

            user.args = fx.node.map_aggregate(user.args, swap)
            user.kwargs = fx.node.map_aggregate(user.kwargs, swap)


def build_graph(root: nn.Module, graph: fx.Graph, inputs: Sequence[torch.Tensor], *, granularity: str,
                name: str, frontend: str, out_spec=None) -> Graph:
    metas, leaf_macs = record(root, graph, inputs)
    expand_tuple_uses(graph, metas, root)
    return _Builder(root, graph, metas, granularity, name, frontend, out_spec, leaf_macs).build()
