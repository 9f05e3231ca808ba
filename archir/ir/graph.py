"""The edge-labelled graph IR.

A model is a DAG whose **junctions** are the tensor values where paths fork or join (graph inputs
and outputs, values consumed by two or more operations, results of operations with two or more
tensor operands) and whose **edges** are the chains of single-tensor-input operations between two
junctions::

    j0 = input x ──e0: conv1·bn1·relu──> j1 (fork) ──e1: conv·bn·relu──> j2 ──e2: conv·bn──> j3 = sum(e2, e3)
                                          └────────────e3: (empty)─────────────────────────────┘

An edge's operations are :class:`Op` templates: the fx-style ``kind``/``target``/``args``/``kwargs``
of one call, where tensor arguments are symbolic references (:class:`Input` for the chain value,
:class:`Operand` for the i-th operand of a join, :class:`JunctionRef` for a size read of another
junction) and non-tensor sub-expressions (``x.size(0)``, a parameter, a constant tensor) are nested
``Op`` s. So ``x.view(x.size(0), -1)`` is one operation on one edge: sizes never make junctions.
A traced value used several times is one shared nested ``Op`` object, so expressions are DAGs;
whatever walks them (lowering, text, signatures, rewrites) visits each shared part once.

The graph owns an ``nn.Module`` (``graph.root``) that holds every module and parameter the
operations name by their qualified names. Passes mutate the graph through its methods, which keep
the adjacency indices right; :meth:`Graph.verify` checks every invariant and names the broken one.
"""
from __future__ import annotations

import copy
import dataclasses
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import networkx as nx
import torch
from torch import nn

from archir.errors import IRError

# --------------------------------------------------------------------------------------------
# Symbolic references used inside Op templates


@dataclass(frozen=True)
class Input:
    """The operation's tensor input: the value flowing along the edge's chain."""

    def __repr__(self) -> str:
        return "x"


@dataclass(frozen=True)
class Operand:
    """The ``index``-th tensor operand of a join (the value arriving on its ``index``-th edge)."""

    index: int

    def __repr__(self) -> str:
        return f"${self.index}"


@dataclass(frozen=True)
class JunctionRef:
    """A read of another junction's value (its size, in practice: ``out.view(x.size(0), -1)``)."""

    id: str

    def __repr__(self) -> str:
        return f"%{self.id}"


IN = Input()


@dataclass(frozen=True)
class TensorMeta:
    """Shape and dtype of a tensor value, recorded on the example input."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, t: torch.Tensor) -> "TensorMeta":
        return cls(tuple(t.shape), t.dtype)

    def __str__(self) -> str:
        return f"{_DTYPE_SHORT.get(self.dtype, str(self.dtype).replace('torch.', ''))}[{','.join(map(str, self.shape))}]"


_DTYPE_SHORT = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
                torch.int64: "i64", torch.int32: "i32", torch.bool: "b8", torch.uint8: "u8"}

# A value's meta: one tensor, or a tuple of tensors (operations with several outputs), possibly
# nested (``nn.LSTM`` returns ``(out, (h, c))``) and with None items (values that are None, or not tensors).
@dataclass(frozen=True)
class ObjectMeta:
    """A value that is not a tensor but holds tensors (torchvision's ``ImageList``, a dict of
    boxes and scores), passed between opaque operations and read by the model's own code. Passes
    search no edge into or out of such a value; it is a junction like a tuple."""

    type_name: str

    def __str__(self) -> str:
        return self.type_name


Meta = TensorMeta | ObjectMeta | tuple["Meta", ...] | None


def meta_str(meta: Meta) -> str:
    """A value's meta as text: ``f32[1,3,32,32]``, tuples in parentheses, ``?`` for no meta."""
    if isinstance(meta, tuple):
        return "(" + ", ".join(meta_str(m) if isinstance(m, tuple) else str(m) for m in meta) + ")"
    return str(meta) if meta is not None else "?"


# --------------------------------------------------------------------------------------------
# Operations


ATTR_KINDS = ("call_module", "get_attr", "choice")


@dataclass(frozen=True, eq=False)
class Op:
    """One call: ``kind`` is ``call_module`` | ``call_function`` | ``call_method`` | ``get_attr``,
    or ``choice``: ``args`` are candidate paths (tuples of Ops, ``"identity"`` or ``"none"``) from
    the same input, and ``target`` names a module of ``graph.root`` that takes the values of the
    candidates other than ``"none"``, in order, and mixes or selects them.

    ``meta`` holds what the frontend measured: ``out`` (:data:`Meta` of the result), ``flops``
    (multiply-adds per example, i.e. per element of the batch), ``scope`` (module stack of the call) and ``name`` (the traced
    node's name, used for readable lowered code).
    """

    kind: str
    target: Any
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return target_name(self.kind, self.target)

    def refs(self) -> Iterator[Any]:
        """Every symbolic reference and nested Op in this op's arguments, depth first. A nested Op
        shared by several arguments (the frontend inlines each fx node once, so expressions are
        DAGs) is visited once: the walk is linear in the DAG, not in its expansion as a tree."""
        yield from self._refs(set())

    def _refs(self, seen: set[int]) -> Iterator[Any]:
        for a in _flatten((self.args, self.kwargs)):
            if isinstance(a, Op):
                if id(a) in seen:
                    continue
                seen.add(id(a))
                yield a
                yield from a._refs(seen)
            elif isinstance(a, (Input, Operand, JunctionRef)):
                yield a

    def junction_refs(self) -> set[str]:
        """Ids of the junctions this op (nested ops included) reads through :class:`JunctionRef`."""
        return {r.id for r in self.refs() if isinstance(r, JunctionRef)}

    def attr_targets(self) -> set[str]:
        """Qualified names of the modules and attributes of ``graph.root`` this op uses."""
        out = {self.target} if self.kind in ATTR_KINDS else set()
        for r in self.refs():
            if isinstance(r, Op) and r.kind in ATTR_KINDS:
                out.add(r.target)
        return out

    def replace(self, **changes) -> "Op":
        """A copy with the given fields changed (Op is frozen)."""
        return dataclasses.replace(self, **changes)

    def render(self) -> str:
        """The op as short text: ``target(args)`` for a module or attribute, ``name(args)`` otherwise
        (the chain input ``x`` and ``inplace=False`` left out), ``target{a | b}`` for a choice. A
        large expression names its shared parts (see :class:`SharedNames`)."""
        if self.kind == "choice":
            cands = [c if isinstance(c, str) else "·".join(o.render() for o in c) or "identity"
                     for c in self.args]
            return f"{self.target}{{{' | '.join(cands)}}}"
        names = SharedNames((self.args, self.kwargs))
        if self.kind in ("call_module", "get_attr"):
            base = str(self.target)
            args = [a for a in self.args if not isinstance(a, Input)]
            return base + (f"({_render_args(args, self.kwargs, names)})" if (args or self.kwargs) else "")
        args = list(self.args)
        if args and isinstance(args[0], Input):
            args = args[1:]
        inner = _render_args(args, self.kwargs, names)
        return f"{self.name}({inner})" if inner else self.name


def target_name(kind: str, target: Any) -> str:
    """A readable name for a call target: module paths, attributes and method names as they are, a
    function's ``__name__``, an ATen overload as ``add.Tensor`` (``add`` for the default one)."""
    if kind in ("call_module", "get_attr", "call_method"):
        return str(target)
    name = getattr(target, "__name__", None) or str(target)
    overload = getattr(target, "_overloadname", None)
    if overload is not None and hasattr(target, "_schema"):  # aten.add.Tensor -> add.Tensor
        name = target._schema.name.split("::")[-1] + ("" if overload == "default" else "." + overload)
    return name


# An expression that would expand to more nested ops than this, written out as a tree, names its
# shared parts instead; smaller ones are written out in full (the text form golden tests compare).
TREE_LIMIT = 256


def expression_uses(obj: Any) -> tuple[int, dict[int, int]]:
    """``(tree size, uses)`` of the nested ops in ``obj`` (nested args): how many ops it would hold
    written out as a tree (counted up to ``TREE_LIMIT + 1``), and per nested Op (by ``id``) how
    many arguments of distinct ops, or of ``obj`` itself, refer to it. Linear in the DAG."""
    sizes: dict[int, int] = {}
    uses: dict[int, int] = {}

    def visit(v: Any) -> int:
        total = 0
        for a in _flatten(v):
            if isinstance(a, Op):
                uses[id(a)] = uses.get(id(a), 0) + 1
                if id(a) not in sizes:
                    sizes[id(a)] = min(1 + visit((a.args, a.kwargs)), TREE_LIMIT + 1)
                total += sizes[id(a)]
        return min(total, TREE_LIMIT + 1)

    return visit(obj), uses


class SharedNames:
    """Names for the shared parts of one expression written as text.

    A nested Op that two or more arguments refer to is written out where it first occurs as
    ``(name := text)`` and as ``name`` afterwards, so the text grows with the DAG, not with its
    expansion as a tree (MViT threads its sizes through every block). Only where the tree would
    exceed :data:`TREE_LIMIT` ops: smaller expressions are written out in full. ``numbered``
    names them ``#0``, ``#1``... in order of first occurrence (text that must not depend on the
    traced nodes' names), else by the traced node's name."""

    def __init__(self, obj: Any, *, numbered: bool = False):
        size, uses = expression_uses(obj)
        self.shared = {i for i, n in uses.items() if n >= 2} if size > TREE_LIMIT else set()
        self.numbered = numbered
        self.given: dict[int, str] = {}
        self.taken: set[str] = set()

    def wrap(self, op: Op, text: Callable[[], str]) -> str:
        """``op`` as text: its name where it was written before, else ``text()`` (named if shared)."""
        if id(op) not in self.shared:
            return text()
        if id(op) in self.given:
            return self.given[id(op)]
        body = text()
        name = base = f"#{len(self.given)}" if self.numbered else str(op.meta.get("name") or "v")
        while name in self.taken:
            name = f"{base}_{len(self.taken)}"
        self.taken.add(name)
        self.given[id(op)] = name
        return f"({name} := {body})"


def _render_value(v: Any, names: SharedNames | None = None) -> str:
    names = names if names is not None else SharedNames(v)
    if isinstance(v, Op):
        return names.wrap(v, lambda: _render_op(v, names))
    if isinstance(v, (list, tuple)):
        inner = ", ".join(_render_value(x, names) for x in v)
        return f"[{inner}]" if isinstance(v, list) else f"({inner}{',' if len(v) == 1 else ''})"
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, torch.Tensor):
        return f"tensor{list(v.shape)}"
    return repr(v)


def _render_op(v: Op, names: SharedNames) -> str:
    if v.kind == "call_method" and v.args and isinstance(v.args[0], (Input, JunctionRef, Op)):
        rest = _render_args(list(v.args[1:]), v.kwargs, names)
        return f"{_render_value(v.args[0], names)}.{v.target}({rest})"
    if v.kind == "get_attr":
        return f"self.{v.target}"
    return f"{v.name}({_render_args(list(v.args), v.kwargs, names)})"


def _render_args(args: list, kwargs: dict, names: SharedNames) -> str:
    parts = [_render_value(a, names) for a in args]
    # inplace=False is what the frontend makes of every in-place call: noise in the text form
    parts += [f"{k}={_render_value(v, names)}" for k, v in kwargs.items()
              if not (k == "inplace" and v is False)]
    return ", ".join(parts)


def _flatten(obj: Any) -> Iterator[Any]:
    if isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _flatten(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _flatten(x)
    elif isinstance(obj, slice):
        yield from _flatten((obj.start, obj.stop, obj.step))
    else:
        yield obj


def map_refs(obj: Any, fn: Callable[[Any], Any]) -> Any:
    """Rebuild ``obj`` (nested args) with every reference or nested Op ``r`` replaced by ``fn(r)``."""
    if isinstance(obj, (Input, Operand, JunctionRef, Op)):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_refs(x, fn) for x in obj)
    if isinstance(obj, list):
        return [map_refs(x, fn) for x in obj]
    if isinstance(obj, dict):
        return {k: map_refs(v, fn) for k, v in obj.items()}
    if isinstance(obj, slice):
        return slice(map_refs(obj.start, fn), map_refs(obj.stop, fn), map_refs(obj.step, fn))
    return obj


# --------------------------------------------------------------------------------------------
# Junctions and edges

COMBINE_KINDS = ("sum", "concat", "product", "other")


@dataclass(eq=False)
class Combine:
    """How a join merges its ordered operands.

    ``kind`` is ``sum`` | ``concat`` | ``product`` | ``other``. ``op`` is the traced call with
    :class:`Operand` references, emitted verbatim while the join keeps ``arity`` operands; a pass
    that changes the number of operands of a ``sum``/``concat``/``product`` sets ``op=None`` and
    lowering emits the canonical n-ary form (chained ``+``/``*``, or ``torch.cat(..., dim)``).
    """

    kind: str
    op: Op | None
    arity: int
    dim: int | None = None  # concat only

    def __str__(self) -> str:
        return f"{self.kind}" + (f"[dim={self.dim}]" if self.kind == "concat" else "") + (
            f"<{self.op.name}>" if self.kind == "other" and self.op is not None else "")


def path_label(path: tuple) -> str:
    """A place inside the model's arguments as its forward reads it: ``("views", "rgb")`` is
    ``views['rgb']``, ``("images", 0)`` is ``images[0]``."""
    return str(path[0]) + "".join(f"[{k!r}]" for k in path[1:])


@dataclass(eq=False)
class Junction:
    """A tensor value where paths meet. ``combine`` is set for joins; ``input_name`` for inputs."""

    id: str
    meta: Meta
    combine: Combine | None = None
    input_name: str | None = None
    name: str = ""
    scope: tuple = ()  # nn_module_stack of the value's producer: ((path, class name), ...)
    labels: dict = field(default_factory=dict)
    # an input inside a list/tuple/dict argument: (argument name, index or key, ...); () otherwise
    input_path: tuple = ()

    @property
    def is_join(self) -> bool:
        return self.combine is not None

    @property
    def is_input(self) -> bool:
        return self.input_name is not None

    @property
    def input_label(self) -> str | None:
        """How the model's forward reaches this input: ``x``, ``views['rgb']``, ``images[0]``."""
        return path_label(self.input_path) if self.input_path else self.input_name


@dataclass(eq=False)
class Edge:
    """A chain of single-tensor-input operations from junction ``src`` to junction ``dst``.

    ``dst_index`` is the operand position at a join (0 otherwise). ``group`` is the cell-sharing
    key: edges at the same position of repeated blocks (same module class, same structure) share
    it. ``labels`` is free for passes (choices, decisions, ``changed``).
    """

    id: str
    src: str
    dst: str
    ops: list[Op]
    dst_index: int = 0
    in_meta: Meta = None
    out_meta: Meta = None
    group: str = ""
    scope: str = ""
    labels: dict = field(default_factory=dict)

    @property
    def flops(self) -> int:
        return sum(op.meta.get("flops", 0) for op in self.ops)

    @property
    def modules(self) -> list[str]:
        seen: dict[str, None] = {}
        for op in self.ops:
            for t in sorted(op.attr_targets()):
                seen.setdefault(t, None)
        return list(seen)

    @property
    def is_empty(self) -> bool:
        return not self.ops

    @property
    def shape_preserving(self) -> bool:
        """True when identity could replace the edge: same shape and dtype in and out."""
        return isinstance(self.in_meta, TensorMeta) and self.in_meta == self.out_meta

    def render_ops(self) -> str:
        """The edge's ops rendered and joined by `` · ``, or ``(direct)`` for an empty edge."""
        return " · ".join(op.render() for op in self.ops) if self.ops else "(direct)"


# --------------------------------------------------------------------------------------------
# The graph


class Graph:
    """Junctions and edges over one ``root`` module. Mutate only through the methods below.

    Public attributes:

    - ``root``: the ``nn.Module`` holding every module and parameter the operations name.
    - ``junctions``: ``{id: Junction}``, the tensor values where paths fork or join.
    - ``edges``: ``{id: Edge}``, the chains of single-input operations between two junctions.
    - ``inputs``: ids of the input junctions, in the model's argument order.
    - ``output``: the model's output, a nested tuple/list/dict of ``JunctionRef``, ``Op`` and constants.
    - ``name``: the model's name (used in messages and emitted files).
    - ``frontend``: the tracer that built the graph (``"fx"`` or ``"export"``).
    - ``granularity``: the junction granularity it was traced at (``"layer"`` or ``"block"``).
    - ``leaves``: ``{module path: reason}`` for submodules kept opaque (one ``call_module``).
    """

    def __init__(self, root: nn.Module, *, name: str = "model", granularity: str = "layer",
                 frontend: str = "fx"):
        self.root = root
        self.name = name
        self.granularity = granularity
        self.frontend = frontend
        self.junctions: dict[str, Junction] = {}
        self.edges: dict[str, Edge] = {}
        self.inputs: list[str] = []
        # the traced call's positional arguments, used or not (a list or dict argument holds
        # several inputs: Junction.input_path); empty: one argument per input junction
        self.arguments: list[str] = []
        # (argument, key, ...) of each list or tuple in the traced call's arguments -> its length on
        # the example: the graph reads the items by position, so another length is refused
        self.input_lengths: dict[tuple, int] = {}
        self.output: Any = None  # nested tuple/list/dict of JunctionRef / Op / constants
        self.leaves: dict[str, str] = {}  # module path -> why it was kept opaque
        self._in: dict[str, list[str]] = {}
        self._out: dict[str, list[str]] = {}
        self._next_id = 0  # next number new_id tries

    # ---- construction and mutation -------------------------------------------------------
    def new_id(self, prefix: str) -> str:
        """A fresh id ``prefix<n>`` that no junction or edge has (n from a graph-wide counter)."""
        while True:
            i = f"{prefix}{self._next_id}"
            self._next_id += 1
            if i not in self.junctions and i not in self.edges:
                return i

    def add_junction(self, j: Junction) -> Junction:
        """Add ``j`` (an input junction is appended to ``inputs``) and return it; IRError if its id is taken."""
        if j.id in self.junctions:
            raise IRError(f"junction {j.id} already exists")
        self.junctions[j.id] = j
        self._in[j.id] = []
        self._out[j.id] = []
        if j.is_input:
            self.inputs.append(j.id)
        return j

    def add_edge(self, e: Edge) -> Edge:
        """Add ``e`` (``dst``'s in-edges stay sorted by ``dst_index``) and return it; IRError if its id
        is taken or an endpoint is not in the graph."""
        if e.id in self.edges:
            raise IRError(f"edge {e.id} already exists")
        for end in (e.src, e.dst):
            if end not in self.junctions:
                raise IRError(f"edge {e.id} names junction {end}, which is not in the graph")
        self.edges[e.id] = e
        self._out[e.src].append(e.id)
        self._in[e.dst].append(e.id)
        self._in[e.dst].sort(key=lambda i: self.edges[i].dst_index)
        return e

    def remove_edge(self, eid: str) -> Edge:
        """Remove edge ``eid`` and return it (KeyError if there is none)."""
        e = self.edges.pop(eid)
        self._out[e.src].remove(eid)
        self._in[e.dst].remove(eid)
        return e

    def remove_junction(self, jid: str) -> Junction:
        """Remove junction ``jid`` and return it; IRError while an edge starts or ends there, it is a
        graph output, or an edge's operation reads its size."""
        if self._in[jid] or self._out[jid]:
            raise IRError(f"cannot remove junction {jid}: edges {self._in[jid] + self._out[jid]} still use it")
        if jid in self.output_junctions():
            raise IRError(f"cannot remove junction {jid}: it is a graph output")
        refs = [e.id for e in self.edges.values() if any(jid in op.junction_refs() for op in e.ops)]
        if refs:
            raise IRError(f"cannot remove junction {jid}: edges {refs} read its size")
        if jid in self.inputs:
            self.inputs.remove(jid)
        del self._in[jid], self._out[jid]
        return self.junctions.pop(jid)

    def move_edge(self, eid: str, *, src: str | None = None, dst: str | None = None,
                  dst_index: int | None = None) -> Edge:
        """Re-attach an edge's endpoints, keeping the indices right."""
        e = self.remove_edge(eid)
        e.src = src if src is not None else e.src
        e.dst = dst if dst is not None else e.dst
        e.dst_index = dst_index if dst_index is not None else e.dst_index
        return self.add_edge(e)

    def replace_junction_uses(self, old: str, new: str) -> None:
        """Make every use of junction ``old`` (out-edges, size reads, outputs) use ``new``."""
        for eid in list(self._out[old]):
            self.move_edge(eid, src=new)

        rebuilt: dict[int, Op] = {}  # a nested Op shared by several arguments is rebuilt once

        def swap(r):
            if isinstance(r, JunctionRef) and r.id == old:
                return JunctionRef(new)
            if isinstance(r, Op):
                if id(r) not in rebuilt:
                    rebuilt[id(r)] = _map_op_refs(r, swap)
                return rebuilt[id(r)]
            return r

        for e in self.edges.values():
            e.ops = [_map_op_refs(op, swap) for op in e.ops]
        for j in self.junctions.values():
            if j.combine is not None and j.combine.op is not None:
                j.combine.op = _map_op_refs(j.combine.op, swap)
        self.output = map_refs(self.output, swap)

    def renumber_operands(self, jid: str) -> None:
        """After removing operands of a join, make its operand indices 0..n-1 again."""
        for i, eid in enumerate(list(self._in[jid])):
            self.edges[eid].dst_index = i

    # ---- queries ----------------------------------------------------------------------------
    def in_edges(self, jid: str) -> list[Edge]:
        """The edges into ``jid``, in operand order (``dst_index``)."""
        return [self.edges[i] for i in self._in[jid]]

    def out_edges(self, jid: str) -> list[Edge]:
        """The edges out of ``jid``, in the order they were attached."""
        return [self.edges[i] for i in self._out[jid]]

    def output_junctions(self) -> list[str]:
        """Ids of the junctions the output expression reads (directly or in its ops), first use first."""
        out: dict[str, None] = {}
        for r in _flatten(self.output):
            if isinstance(r, JunctionRef):
                out.setdefault(r.id, None)
            elif isinstance(r, Op):
                for s in r.junction_refs():
                    out.setdefault(s, None)
        return list(out)

    def size_readers(self) -> dict[str, list[str]]:
        """junction id -> ids of the edges whose operations read its size."""
        readers: dict[str, list[str]] = {}
        for e in self.edges.values():
            for op in e.ops:
                for jid in op.junction_refs():
                    readers.setdefault(jid, []).append(e.id)
        for j in self.junctions.values():
            if j.combine is not None and j.combine.op is not None:
                for jid in j.combine.op.junction_refs():
                    readers.setdefault(jid, []).append(j.id)
        return readers

    def roles(self, jid: str) -> list[str]:
        """What junction ``jid`` is, from ``input``, its combine kind (``sum``...), ``multi`` (a tuple
        value), ``fork`` (two or more out-edges) and ``output``, in that order."""
        j = self.junctions[jid]
        roles = []
        if j.is_input:
            roles.append("input")
        if j.combine is not None:
            roles.append(j.combine.kind)
        if isinstance(j.meta, (tuple, ObjectMeta)):
            roles.append("multi")
        if len(self._out[jid]) >= 2:
            roles.append("fork")
        if jid in self.output_junctions():
            roles.append("output")
        return roles

    def to_networkx(self) -> nx.MultiDiGraph:
        """A networkx view: one node per junction (roles, meta, name), one edge per edge keyed by its
        id (rendered ops, flops, params, group, labels)."""
        g = nx.MultiDiGraph(name=self.name)
        for j in self.junctions.values():
            g.add_node(j.id, roles=self.roles(j.id), meta=meta_str(j.meta), name=j.name)
        for e in self.edges.values():
            g.add_edge(e.src, e.dst, key=e.id, ops=[op.render() for op in e.ops], flops=e.flops,
                       params=self.edge_params(e), group=e.group, labels=dict(e.labels))
        return g

    def dependency_graph(self) -> nx.DiGraph:
        """Junction-level DAG: edges plus size reads (a read junction must come first)."""
        g = nx.DiGraph()
        g.add_nodes_from(self.junctions)
        for e in self.edges.values():
            g.add_edge(e.src, e.dst)
            for op in e.ops:
                for r in op.junction_refs():
                    g.add_edge(r, e.dst)
        for j in self.junctions.values():
            if j.combine is not None and j.combine.op is not None:
                for r in j.combine.op.junction_refs():
                    g.add_edge(r, j.id)
        return g

    def topo_order(self) -> list[str]:
        """Junction ids in topological order of :meth:`dependency_graph`, ties in insertion order;
        IRError naming the junctions of a cycle."""
        order = {jid: i for i, jid in enumerate(self.junctions)}
        try:
            return list(nx.lexicographical_topological_sort(self.dependency_graph(), key=order.__getitem__))
        except nx.NetworkXUnfeasible as exc:
            cycle = nx.find_cycle(self.dependency_graph())
            raise IRError(f"graph has a cycle through junctions {[a for a, _ in cycle]}") from exc

    def edges_in_order(self) -> list[Edge]:
        """Edges ordered by their destination's topological position, then operand index."""
        return [e for jid in self.topo_order() for e in self.in_edges(jid)]

    # ---- costs ------------------------------------------------------------------------------
    def _param_numels(self) -> dict[str, int]:
        if not hasattr(self, "_numel_cache") or self._numel_cache[0] is not self.root:
            numels = {}
            for mname, mod in self.root.named_modules(remove_duplicate=False):
                for pname, p in mod.named_parameters(recurse=False):
                    numels[f"{mname}.{pname}" if mname else pname] = p.numel()
            self._numel_cache = (self.root, numels)
        return self._numel_cache[1]

    def op_params(self, op: Op) -> set[str]:
        """Qualified parameter names an op uses (a module's own and nested ones)."""
        numels = self._param_numels()
        names = set()
        for t in op.attr_targets():
            if t in numels:
                names.add(t)
            else:
                prefix = t + "."
                names.update(n for n in numels if n.startswith(prefix))
        return names

    def edge_params(self, e: Edge) -> int:
        """Number of parameter elements the operations of ``e`` use (each parameter counted once)."""
        numels = self._param_numels()
        names = set().union(*(self.op_params(op) for op in e.ops)) if e.ops else set()
        return sum(numels[n] for n in names)

    def junction_params(self, jid: str) -> int:
        """Parameters of a join's own call (an opaque leaf with several tensor operands, such as
        ``nn.MultiheadAttention(q, k, v)`` or ``lstm(x, (h, c))``); 0 for other junctions."""
        j = self.junctions[jid]
        if j.combine is None or j.combine.op is None:
            return 0
        numels = self._param_numels()
        return sum(numels[n] for n in self.op_params(j.combine.op))

    def total_params(self) -> int:
        """Parameters of the modules the graph uses (shared weights counted once).

        An opaque leaf (a module called as one operation: ``nn.LSTM``, ``nn.MultiheadAttention``,
        a user module in ``leaf_modules``) counts every parameter it holds, its submodules' too;
        operations anywhere count (edges, joins and the output expression)."""
        numels = self._param_numels()
        names: set[str] = set()
        for op in self.all_ops():
            names |= self.op_params(op)
        return sum(numels[n] for n in names)

    def total_flops(self) -> int:
        """FLOPs in multiply-adds per example: every edge's operations plus the joins' traced ops."""
        return sum(e.flops for e in self.edges.values()) + sum(
            j.combine.op.meta.get("flops", 0) for j in self.junctions.values()
            if j.combine is not None and j.combine.op is not None)

    def all_ops(self) -> Iterator[Op]:
        """Every top-level operation: the edges', the joins' and those of the output expression
        (nested operations are reached through :meth:`Op.refs`)."""
        for e in self.edges.values():
            yield from e.ops
        for j in self.junctions.values():
            if j.combine is not None and j.combine.op is not None:
                yield j.combine.op
        for r in _flatten(self.output):
            if isinstance(r, Op):
                yield r

    def invalidate_costs(self) -> None:
        """Forget the cached parameter sizes (after a change to ``root``'s modules or parameters)."""
        self.__dict__.pop("_numel_cache", None)

    # ---- checks -----------------------------------------------------------------------------
    def verify(self) -> "Graph":
        """Check every invariant; raise :class:`IRError` naming the first broken one."""
        from .verify import verify_graph

        verify_graph(self)
        return self

    # ---- text and pictures --------------------------------------------------------------------
    def __str__(self) -> str:
        from .printer import format_graph

        return format_graph(self)

    def to_dot(self) -> str:
        """Graphviz DOT text of the graph (:func:`archir.ir.printer.format_dot`)."""
        from .printer import format_dot

        return format_dot(self)

    def to_module(self) -> nn.Module:
        """The graph lowered to a ``torch.fx.GraphModule`` sharing ``root``'s modules and parameters."""
        from .lower import lower

        return lower(self)

    # ---- copies ----------------------------------------------------------------------------
    def copy(self, *, share_root: bool = True) -> "Graph":
        """A structural copy; the root module is shared unless ``share_root=False``."""
        g = copy.copy(self)
        if share_root:
            g.root = self.root
        else:
            g.root = copy.deepcopy(self.root)
            refresh_flat_weights(g.root)
        g.junctions = {k: dataclasses.replace(v, labels=dict(v.labels),
                                              combine=copy.copy(v.combine)) for k, v in self.junctions.items()}
        g.edges = {k: dataclasses.replace(v, ops=list(v.ops), labels=copy.deepcopy(v.labels))
                   for k, v in self.edges.items()}
        g.inputs = list(self.inputs)
        g.arguments = list(self.arguments)
        g.input_lengths = dict(self.input_lengths)
        g.leaves = dict(self.leaves)
        g._in = {k: list(v) for k, v in self._in.items()}
        g._out = {k: list(v) for k, v in self._out.items()}
        g.__dict__.pop("_numel_cache", None)
        return g


def refresh_flat_weights(root: nn.Module) -> None:
    """Make every recurrent layer's ``_flat_weights`` (the list of parameter objects its forward
    reads) and the weak references torch checks it by name its own parameters, after a copy.

    ``copy.deepcopy`` copies the list along with the parameters but keeps the weak references to
    the original's, so torch would find the list stale and rebuild it inside the copy's first
    forward (a copy that sets ``_parameters`` by hand, as ``clone_module`` does, would otherwise
    run and train the original's tensors)."""
    for m in root.modules():
        if isinstance(m, nn.RNNBase):
            m._init_flat_weights()


def fetch_attr(obj: Any, target: str) -> Any:
    """``obj.a.b.c`` for ``target = "a.b.c"`` (module paths, parameters, buffers, qualnames)."""
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def _map_op_refs(op: Op, fn: Callable[[Any], Any]) -> Op:
    return op.replace(args=map_refs(op.args, fn), kwargs=map_refs(op.kwargs, fn))


SUM_TARGETS = {operator.add, operator.iadd, torch.add, "add", "add_", "iadd"}
PRODUCT_TARGETS = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
CONCAT_TARGETS = {torch.cat, torch.concat, "cat", "concat"}
