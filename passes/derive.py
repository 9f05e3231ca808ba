"""Derive, Prune and FoldIdentities: from a trained supernet to the plain, smaller network.

* :class:`Derive` fixes each choice edge to its argmax (ties go to the original operations, then to
  identity) of its normalised weights, or of the raw θ in the linear form (the paper's Eq. (1):
  none, whose θ stays 0, wins when θ_id and θ_same are both negative); an edge that chose none is labelled so and keeps its operations until Prune. A sum junction never loses all its operands: if every one chose none, the operand
  whose best non-none weight is highest keeps that choice. Outputs stay connected because none is
  only ever valid at sum junctions.
* :class:`Prune` removes none edges, then dead code (junctions whose value reaches no output and
  the edges into them), turns a sum junction left with one operand into a plain junction, and
  deletes modules and parameters that no operation uses any more.
* :class:`FoldIdentities` makes identity edges direct connections: an empty edge into a plain
  junction merges the two junctions, and operations that compute the identity (``nn.Identity``,
  ``x * 1``, ``x + 0``, dropout with p = 0) disappear, and so does an idempotent activation applied
  to its own output (relu(relu(x)) = relu(x), likewise ReLU6): what a pruned residual block leaves
  between the ReLUs after the sums before and after it.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from archir.ir import Edge, Graph, Input, ObjectMeta, Op

from .base import Pass, PassResult
from .edge_choice import _theta_of, choice_weights

# argmax tie-break: prefer keeping the original, then identity, then none
_PREFERENCE = {"same": 2, "identity": 1, "none": 0}


def _best(weights: dict[str, float], allowed=None) -> str:
    items = [(w, _PREFERENCE[c], c) for c, w in weights.items() if allowed is None or c in allowed]
    return max(items)[2]


class Derive(Pass):
    """Replace every choice by its argmax candidate; record ``labels['decision']``/``['changed']``."""

    def __init__(self, decisions: dict[str, str] | None = None):
        self.fixed = decisions  # optional: impose decisions (edge id -> choice) instead of argmax

    def run(self, graph: Graph) -> PassResult:
        """Fix every choice edge to its decision (imposed, else the argmax of its normalised weights,
        or of its raw θ in the linear form, ties to same, then identity; a sum junction keeps one
        operand) and label it with ``decision``, ``changed`` and ``weights``. Unmodified when the
        graph has no choice edge."""
        weights, candidates = {}, {}
        for e in graph.edges.values():
            if len(e.ops) == 1 and e.ops[0].kind == "choice":
                op = e.ops[0]
                choices = tuple(e.labels["choices"].split(","))
                weights[e.id] = choice_weights(_theta_of(graph, op), choices, op.meta.get("form", "normalised"))
                candidates[e.id] = dict(zip(choices, op.args))
        if not weights:
            return PassResult(graph, False)
        decision = {eid: (self.fixed or {}).get(eid) or _best(w) for eid, w in weights.items()}
        # a sum junction keeps at least one operand
        for jid, j in graph.junctions.items():
            ins = graph.in_edges(jid)
            if j.combine is None or not ins:
                continue
            if all(decision.get(e.id) == "none" for e in ins):
                keep = max(ins, key=lambda e: max(w for c, w in weights[e.id].items() if c != "none"))
                decision[keep.id] = _best(weights[keep.id], allowed={"same", "identity"})
        for eid, choice in decision.items():
            e = graph.edges[eid]
            # a none edge keeps its original operations (the graph stays valid) until Prune drops it
            cand = candidates[eid]["same" if choice == "none" else choice]
            e.ops = [] if cand == "identity" else list(cand)
            e.labels.update(decision=choice, changed=choice != "same",
                            weights={c: round(w, 6) for c, w in weights[eid].items()})
        return PassResult(graph, True)


class Prune(Pass):
    """Remove none edges, dead junctions and edges, single-operand sums, and unused parameters."""

    def run(self, graph: Graph) -> PassResult:
        """Drop the edges labelled ``decision == "none"``, then dead code; a sum left with one operand
        becomes a plain junction, one left with another count emits the canonical n-ary sum; unused
        modules, parameters and buffers go."""
        modified = False
        touched = set()
        for e in list(graph.edges.values()):
            if e.labels.get("decision") == "none":
                graph.remove_edge(e.id)
                touched.add(e.dst)
                modified = True
        for jid in touched:
            graph.renumber_operands(jid)
        modified |= self._remove_dead(graph)
        for jid in touched:
            j = graph.junctions.get(jid)
            if j is not None and j.combine is not None and j.combine.kind == "sum":
                n = len(graph.in_edges(jid))
                if n == 1:
                    j.combine = None
                elif n != j.combine.arity:
                    j.combine.op = None  # emit the canonical n-ary sum
        modified |= remove_unused_attributes(graph)
        return PassResult(graph, modified)

    @staticmethod
    def _remove_dead(graph: Graph) -> bool:
        removed = False
        while True:
            outputs = set(graph.output_junctions())
            read = set(graph.size_readers())
            dead = [jid for jid, j in graph.junctions.items()
                    if not j.is_input and jid not in outputs and jid not in read and not graph.out_edges(jid)]
            if not dead:
                return removed
            for jid in dead:
                for e in graph.in_edges(jid):
                    graph.remove_edge(e.id)
                graph.remove_junction(jid)
            removed = True


def live_edges(graph: Graph, pruned: set[str] | frozenset = frozenset()) -> list[Edge]:
    """The edges of ``graph`` that remain once the edges ``pruned`` are removed along with the
    dead code they leave (what :class:`~archir.passes.derive.Prune` would keep)."""
    live = set(graph.output_junctions()) | set(graph.size_readers())
    stack = list(live)
    edges = []
    while stack:
        for e in graph.in_edges(stack.pop()):
            if e.id in pruned:
                continue
            edges.append(e)
            if e.src not in live:
                live.add(e.src)
                stack.append(e.src)
    return edges


def remove_unused_attributes(graph: Graph) -> bool:
    """Delete submodules, parameters and buffers of ``graph.root`` that no operation uses."""
    used = set()
    for op in graph.all_ops():
        used |= op.attr_targets()
    keep = set()
    for t in used:
        parts = t.split(".")
        keep.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))

    def inside_used(path: str) -> bool:
        return any(path.startswith(t + ".") for t in used)

    removed = False

    def sweep(module: nn.Module, path: str) -> None:
        # Detach unused children from their parent only, never strip a module's own tensors:
        # the supernet lowered earlier may still hold (and train) that module object.
        nonlocal removed
        for name in list(module._modules) + list(module._parameters) + list(module._buffers):
            full = f"{path}.{name}" if path else name
            if full in used or inside_used(full):
                continue
            if full in keep and name in module._modules:
                sweep(module._modules[name], full)
                continue
            delattr(module, name)
            removed = True

    sweep(graph.root, "")
    if removed:
        graph.invalidate_costs()
    return removed


def _is_identity_op(graph: Graph, op: Op) -> bool:
    if op.kind == "call_module":
        m = graph.root.get_submodule(op.target)
        return isinstance(m, nn.Identity) or (isinstance(m, nn.modules.dropout._DropoutNd) and m.p == 0)
    if op.kind == "call_function" and len(op.args) == 2 and isinstance(op.args[0], Input) and not op.kwargs:
        other = op.args[1]
        if op.target in (operator.mul, torch.mul, operator.truediv, torch.div) and other == 1 \
                and not isinstance(other, bool):
            return True
        if op.target in (operator.add, torch.add, operator.sub, torch.sub) and other == 0 \
                and not isinstance(other, bool):
            return True
    return False


#: element-wise maps with f∘f = f, by kind: the second of two in a row computes the identity
_IDEMPOTENT_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6"}
_IDEMPOTENT_FUNCTIONS = {torch.relu: "relu", F.relu: "relu", "relu": "relu", F.relu6: "relu6"}


def _idempotent_kind(graph: Graph, op: Op) -> str | None:
    """``"relu"``/``"relu6"`` when ``op`` applies that map to its input alone, else None."""
    if op.kind == "call_module":
        return _IDEMPOTENT_MODULES.get(type(graph.root.get_submodule(op.target)))
    if op.kind in ("call_function", "call_method") and len(op.args) == 1 and isinstance(op.args[0], Input) \
            and set(op.kwargs) <= {"inplace"}:
        try:
            return _IDEMPOTENT_FUNCTIONS.get(op.target)
        except TypeError:  # an unhashable target
            return None
    return None


def _previous_op(graph: Graph, edge, index: int) -> Op | None:
    """The operation whose output ``edge.ops[index]`` reads: the one before it on the edge, else
    the last one before the edge's source junction while that is a plain value with one in-edge."""
    if index > 0:
        return edge.ops[index - 1]
    seen = set()
    jid = edge.src
    while jid not in seen:
        seen.add(jid)
        j = graph.junctions[jid]
        ins = graph.in_edges(jid)
        if j.is_input or j.combine is not None or len(ins) != 1 or isinstance(j.meta, (tuple, ObjectMeta)):
            return None
        if ins[0].ops:
            return ins[0].ops[-1]
        jid = ins[0].src
    return None


class FoldIdentities(Pass):
    """Identity edges become direct connections; identity operations (and an idempotent activation
    of its own output) disappear."""

    def run(self, graph: Graph) -> PassResult:
        """Drop identity operations, then merge the ``dst`` of each empty edge into its ``src`` where
        ``dst`` is neither a join nor an input and has no other in-edge (and ``src`` is not a tuple
        value); unused modules, parameters and buffers go."""
        modified = False
        for e in graph.edges.values():
            kept = [op for op in e.ops if not _is_identity_op(graph, op)]
            if len(kept) != len(e.ops):
                e.ops = kept
                modified = True
        for e in graph.edges_in_order():  # in order: relu · relu · relu keeps the first only
            i = 0
            while i < len(e.ops):
                kind = _idempotent_kind(graph, e.ops[i])
                prev = _previous_op(graph, e, i) if kind else None
                if kind and prev is not None and _idempotent_kind(graph, prev) == kind:
                    e.ops = e.ops[:i] + e.ops[i + 1:]
                    modified = True
                else:
                    i += 1
        for e in list(graph.edges.values()):
            if e.ops or e.id not in graph.edges:
                continue
            dst = graph.junctions[e.dst]
            if dst.combine is not None or dst.is_input or len(graph.in_edges(dst.id)) != 1:
                continue
            src = graph.junctions[e.src]
            if isinstance(src.meta, (tuple, ObjectMeta)):
                continue
            graph.remove_edge(e.id)
            graph.replace_junction_uses(dst.id, src.id)
            graph.remove_junction(dst.id)
            modified = True
        if modified:
            remove_unused_attributes(graph)
        return PassResult(graph, modified)
