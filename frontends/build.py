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
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import nn

from archir.errors import TraceError
from archir.ir import (CONCAT_TARGETS, IN, PRODUCT_TARGETS, SUM_TARGETS, Combine, Edge, Graph, Junction,
                       JunctionRef, Op, Operand, TensorMeta, fetch_attr)
from archir.ir.costs import ATEN_RNN, function_flops, module_flops, rnn_flops
from archir.ir.graph import _flatten
from archir.modes import eval_mode

_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid,
                       nn.Tanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.PReLU, nn.Softplus,
                       nn.Hardtanh)
_ACTIVATION_NAMES = {"relu", "relu6", "gelu", "silu", "hardswish", "hardsigmoid", "sigmoid", "tanh",
                     "leaky_relu", "elu", "selu", "celu", "mish", "prelu", "softplus", "hardtanh"}
_WEIGHTED_MODULES = (nn.modules.conv._ConvNd, nn.Linear)
_WEIGHTED_NAMES = {"conv1d", "conv2d", "conv3d", "convolution", "linear", "conv_transpose2d"}


def _describe(value: Any):
    """A value's :data:`~archir.ir.Meta`: a tensor, or a (possibly nested) tuple of tensors.

    Nested tuples are what recurrent layers return (``nn.LSTM``: ``(out, (h, c))``); ``None``
    items (``nn.MultiheadAttention(..., need_weights=False)``: ``(out, None)``) are allowed as long
    as the tuple holds a tensor. Anything else (sizes, Python numbers) is not dataflow: None.
    """
    if isinstance(value, torch.Tensor):
        return TensorMeta.of(value)
    if isinstance(value, (tuple, list)) and value and not isinstance(value, torch.Size):
        items = []
        for v in value:
            if v is None:
                items.append(None)
                continue
            m = _describe(v)
            if m is None:
                return None
            items.append(m)
        return tuple(items) if any(m is not None for m in items) else None
    return None


class _Recorder(fx.Interpreter):
    def __init__(self, root: nn.Module, graph: fx.Graph):
        super().__init__(root, graph=graph)
        self.metas: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.metas[n] = _describe(result)
        return result


def record(root: nn.Module, graph: fx.Graph, inputs: Sequence[torch.Tensor]) -> dict[fx.Node, Any]:
    with eval_mode(root), torch.no_grad():
        rec = _Recorder(root, graph)
        rec.run(*inputs)
    return rec.metas


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
                 frontend: str, out_spec=None):
        self.root, self.fxg, self.metas = root, graph, metas
        self.granularity, self.out_spec = granularity, out_spec
        self.ir = Graph(root, name=name, granularity=granularity, frontend=frontend)
        self.nodes = list(graph.nodes)
        self.dataflow: dict[fx.Node, bool] = {}
        self.data_occ: dict[fx.Node, list[fx.Node]] = {}
        self.jid: dict[fx.Node, str] = {}
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
        memo: dict = {}
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
            if t.op == "placeholder" or isinstance(meta, tuple) or len(self.data_occ[t]) >= 2 or not single:
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
        if n.op == "placeholder":
            raise TraceError(f"non-tensor input '{n.name}' is not supported")
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
            flops = module_flops(mod, shapes[0] if shapes else None, out_shape, shapes)
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
        assign_groups(g, {self.jid[n]: n for n in order})
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
            from torch.utils._pytree import tree_unflatten

            template = tree_unflatten(list(template), self.out_spec)
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


def assign_groups(g: Graph, nodes: dict[str, fx.Node] | None = None) -> None:
    """Cell-sharing keys: ``Class/relative-signature/k`` for edges inside a module call.

    Two edges share a key when they sit in calls of modules of the same class, perform the same
    operations relative to that module (``conv1·bn1·relu``), end the same way (junction kind and
    operand position), have the same shape behaviour, and are the k-th such edge of their call.
    Edges at the top level keep their own id as key (no sharing).
    """
    seen: dict[tuple, int] = {}
    for e in g.edges_in_order():
        stacks = [op.meta.get("scope", ()) for op in e.ops]
        dst = g.junctions[e.dst]
        if dst.is_join or not stacks:
            stacks.append(dst.scope)
        common = _common_prefix(stacks)
        if not common:
            e.group, e.scope = e.id, ""
            continue
        path, cls = common[-1]
        rel = []
        for op in e.ops:
            t = op.target if op.kind in ("call_module", "get_attr") else op.name
            if isinstance(t, str) and t.startswith(path + "."):
                t = t[len(path) + 1:]
            rel.append(str(t))
        end = f"{dst.combine.kind}#{e.dst_index}" if dst.is_join else "value"
        sig = f"{'·'.join(rel) or 'direct'}->{end}:{'same' if e.shape_preserving else 'change'}"
        k = seen.get((path, sig), 0)
        seen[(path, sig)] = k + 1
        e.group, e.scope = f"{cls}/{sig}/{k}", path


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


def expand_tuple_uses(graph: fx.Graph, metas: dict) -> None:
    """A tuple value passed whole to a call (``torch.cat(x.chunk(2))``) is read item by item."""
    for node in list(graph.nodes):
        meta = metas.get(node)
        if not isinstance(meta, tuple):
            continue
        for user in list(node.users):
            if user.op == "call_function" and user.target is operator.getitem:
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
    metas = record(root, graph, inputs)
    expand_tuple_uses(graph, metas)
    return _Builder(root, graph, metas, granularity, name, frontend, out_spec).build()
