"""EdgeChoice: every edge chooses none, identity or its original operations (DNAT).

Kim & Lee, *Differentiable Neural Architecture Transformation for Reproducible Architecture
Improvement*, Eq. (1) mixes an edge's candidates linearly,

    o_e(x) = θ_none · 0 + θ_id · x + θ_same · o(x),      θ initialised to (0, 0, 1),

so the network starts exactly as the original. But in that form ∂o_e/∂θ_none = 0: θ_none never
receives a gradient and *none* can never win the argmax. archir normalises the weights by their sum
and keeps them non-negative:

    o_e(x) = (θ_id · x + θ_same · o(x)) / (θ_none + θ_id + θ_same),      θ ≥ 0 (projected after each step)

* **Parity at initialisation**: with θ = (0, 0, 1) the weights are exactly (0, 0, 1.0), so
  o_e(x) = 0·x + 1.0·o(x) = o(x) bit for bit.
* **Every choice gets gradient**: with S = Σθ,
  ∂o_e/∂θ_none = −o_e/S,  ∂o_e/∂θ_id = (x − o_e)/S,  ∂o_e/∂θ_same = (o(x) − o_e)/S;
  at initialisation ∂o_e/∂θ_none = −o(x) ≠ 0 and ∂o_e/∂θ_id = x − o(x).
* The weights are a point of the simplex, so scaling θ changes nothing but the step size.

Valid choices per edge: *identity* only where the edge's input and output have the same shape and
dtype (and the edge is not already empty); *none* only where the edge ends at a sum junction that
has another operand; *same* always. An edge with one valid choice is left as it is.

``share="full"`` gives every edge its own θ; ``share="cell"`` gives one θ to each cell-sharing
group (edges at the same position of repeated blocks, see ``Edge.group``).

Cost. Mixing is elementwise work over whole activations, which on a CPU is memory-bound: a naive
mixer reads and writes every activation several more times per step. With ``fuse=True`` (the
default), where the original path ends in an affine BatchNorm (a ReLU may follow), w_same is
folded into γ and β (``archir.passes.mixing.scaled_batch_norm``): the same values and gradients, and
∂L/∂w_same comes out of BatchNorm's own backward instead of extra passes. (Mixing a lone ReLU
edge as ``prelu(x, w_id)``, equal when w_id + w_same = 1, was measured slower on the CPU: its
backward kernel costs more than the passes it saves.)
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from archir.errors import IRError, UserInputError
from archir.ir import Edge, Graph, Input, Op, fetch_attr
from archir.ir.lower import register_lowering

from .mixing import POSITIVELY_HOMOGENEOUS, foldable_batch_norm, mix_weights, scaled_batch_norm

from .base import Pass, PassResult

SLOTS = ("none", "identity", "same")
THETA_ROOT = "archir_theta"
MIX_ROOT = "archir_mix"


def valid_choices(graph: Graph, edge: Edge) -> tuple[str, ...]:
    """The choices open to ``edge``, in :data:`SLOTS` order: none where it ends at a sum junction with
    two or more operands, identity where it has operations and keeps shape and dtype, same always."""
    dst = graph.junctions[edge.dst]
    choices = []
    if dst.combine is not None and dst.combine.kind == "sum" and len(graph.in_edges(dst.id)) >= 2:
        choices.append("none")
    if edge.ops and edge.shape_preserving:
        choices.append("identity")
    choices.append("same")
    return tuple(choices)


class WeightedSum(torch.autograd.Function):
    """``out = w_same·o + w_id·x`` (``x`` may be None) with few passes over the activations.

    Autograd's version of this expression writes and re-reads temporaries in both directions; here
    the backward is ``g·w_same``, ``g·w_id`` and two dot products (∂out/∂w_same = ⟨g, o⟩,
    ∂out/∂w_id = ⟨g, x⟩). ``w_same=None`` means ``o`` is already weighted (the weight was folded
    into a BatchNorm, see passes/mixing.py): ``out = o + w_id·x``, and ``o`` gets ``g`` itself.
    On the CPU, where reading a weight costs no device sync, the common case w_same = 1, w_id = 0
    (at initialisation, and whenever the projection holds θ_none and θ_id at 0) returns ``o``
    itself and passes the gradient through untouched.
    """

    @staticmethod
    def forward(ctx, o, w_same, x, w_id, convex=False):
        ctx.has_x = x is not None
        ctx.fast = o.device.type == "cpu" and (w_same is None or float(w_same) == 1.0) \
            and (x is None or float(w_id) == 0.0)
        ctx.scaled = w_same is not None
        ctx.save_for_backward(o if ctx.scaled else None, w_same, x, w_id)
        if ctx.fast:
            # An alias with o's exact strides: view_as may restride size-1 dimensions, and a conv
            # downstream would then pick another memory format (and round differently).
            return o.as_strided(o.shape, o.stride(), o.storage_offset())
        if not ctx.scaled:
            return torch.addcmul(o, x, w_id)
        if convex and x is not None:
            # w_id + w_same = 1 (no none slot): o + w_id·(x − o) in one pass, and exactly o at w_id = 0
            return torch.lerp(o, x, w_id)
        out = o * w_same
        if x is not None:
            out.addcmul_(x, w_id)
        return out

    @staticmethod
    def backward(ctx, g):
        o, w_same, x, w_id = ctx.saved_tensors
        need_o, need_ws, need_x, need_wi = ctx.needs_input_grad[:4]
        flat = g.reshape(-1)
        grad_o = (g if ctx.fast or not ctx.scaled else g * w_same) if need_o else None
        grad_ws = torch.dot(flat, o.reshape(-1)) if need_ws and ctx.scaled else None
        grad_x = grad_wi = None
        if ctx.has_x:
            if need_x and not ctx.fast:  # fast: w_id = 0, so x gets nothing through this edge
                grad_x = g * w_id
            if need_wi:
                grad_wi = torch.dot(flat, x.reshape(-1))
        return grad_o, grad_ws, grad_x, grad_wi, None


class EdgeMix(nn.Module):
    """Mixes the values of an edge's candidates with weights θ_k / Σθ over its valid choices.

    ``forward(*values, theta, weights=None)``: ``values`` are the candidates other than none, in
    ``choices`` order (identity's ``x`` first, then ``o(x)``); ``theta`` is the 3-slot (none,
    identity, same) parameter, possibly shared by a group; ``weights``, when the lowering already
    computed them, saves computing them again. With ``folded``, ``o(x)`` arrives already scaled
    by w_same (folded into its BatchNorm by the lowering, see passes/mixing.py). Written for few
    kernel launches and no host syncs on a GPU (a small network's step is launch-bound there):
    the valid slots are a mask buffer, not an index, and the weighted sum is one autograd
    function (:class:`WeightedSum`).
    """

    def __init__(self, choices: tuple[str, ...], folded: bool = False):
        super().__init__()
        self.choices = tuple(choices)
        self.has_identity = "identity" in self.choices
        self.convex = self.has_identity and "none" not in self.choices  # then w_id + w_same = 1
        self.folded = folded
        self.register_buffer("mask", torch.tensor([float(s in self.choices) for s in SLOTS]), persistent=False)

    def forward(self, *values: torch.Tensor, theta: torch.Tensor, weights: torch.Tensor | None = None):
        """``w_id·x + w_same·o(x)`` (``w_same·o(x)`` without an identity choice), with w = θ / Σθ over the
        valid slots unless ``weights`` is given; with ``folded``, ``o(x)`` arrives already scaled by w_same."""
        w = mix_weights(theta, self.mask) if weights is None else weights
        w_same = None if self.folded else w[2]
        if self.has_identity:
            x, o = values
            return WeightedSum.apply(o, w_same, x, w[1], self.convex)  # w_id·x + w_same·o(x)
        (o,) = values
        return o if self.folded else WeightedSum.apply(o, w_same, None, None)

    def extra_repr(self) -> str:
        """The valid choices, and whether w_same is folded into a BatchNorm (for ``print(module)``)."""
        return f"choices={self.choices}" + (", folded into BatchNorm" if self.folded else "")


def _is_relu(graph: Graph, op: Op) -> bool:
    if op.kind == "call_module":
        return isinstance(fetch_attr(graph.root, op.target), POSITIVELY_HOMOGENEOUS)
    return (op.kind == "call_function" and op.target in (torch.relu, F.relu) and len(op.args) == 1
            and op.kwargs in ({}, {"inplace": False}))


def _foldable_at(graph: Graph, ops: list[Op]) -> int | None:
    """Index of an affine BatchNorm that ends the path (a ReLU may follow it): w_same folds into
    its γ and β (passes/mixing.py). None where the path ends otherwise."""
    for i in range(len(ops) - 1, -1, -1):
        op = ops[i]
        if op.kind == "call_module":
            mod = fetch_attr(graph.root, op.target)
            if foldable_batch_norm(mod) and len(op.args) == 1 and isinstance(op.args[0], Input) and not op.kwargs:
                return i
        if not _is_relu(graph, op):
            return None
    return None


def choice_weights(theta: torch.Tensor, choices: tuple[str, ...]) -> dict[str, float]:
    """The normalised weight of each valid choice (what the mixer multiplies by)."""
    idx = [SLOTS.index(c) for c in choices]
    vals = theta.detach().float().cpu()[idx].clamp_min(0)
    total = float(vals.sum()) or 1.0
    return {c: float(v) / total for c, v in zip(choices, vals)}


class EdgeChoice(Pass):
    """Turn every edge with two or more valid choices into a θ-weighted mixture (see module doc)."""

    def __init__(self, share: str = "cell", init: tuple[float, float, float] = (0.0, 0.0, 1.0),
                 fuse: bool = True):
        if share not in ("cell", "full"):
            raise UserInputError(f"share must be 'cell' or 'full', not {share!r}")
        self.share = share
        self.init = init
        # fold w_same into a closing BatchNorm: same function and gradients, fewer passes over
        # the activations (passes/mixing.py)
        self.fuse = fuse

    def run(self, graph: Graph) -> PassResult:
        """Replace the operations of every edge with two or more valid choices by one ``choice`` op
        mixing them with a θ (``init``, one per edge or per cell group and choice set) held in
        ``graph.root.archir_theta``, mixers in ``graph.root.archir_mix``; label the edge with
        ``choices`` and ``param``. Raise IRError if the graph already has θ; unmodified if no edge has a choice."""
        if hasattr(graph.root, THETA_ROOT):
            raise IRError("EdgeChoice already ran on this graph (it has architecture weights)")
        thetas = nn.ParameterDict()
        mixers = nn.ModuleDict()
        names: dict[str, str] = {}
        for e in graph.edges_in_order():
            choices = valid_choices(graph, e)
            if len(choices) < 2:
                continue
            key = (e.id if self.share == "full" else e.group) + "|" + ",".join(choices)
            if key not in names:
                names[key] = f"t{len(names)}"
                thetas[names[key]] = nn.Parameter(torch.tensor(self.init, dtype=torch.float32))
            name = names[key]
            fold = _foldable_at(graph, e.ops) if self.fuse else None
            mixers[e.id] = EdgeMix(choices, folded=fold is not None)
            candidates = tuple("none" if c == "none" else "identity" if c == "identity" else tuple(e.ops)
                               for c in choices)
            meta = {"name": f"mix_{e.id}", "flops": e.flops, "out": e.out_meta}
            if fold is not None:
                meta.update(lowering=FOLDED_LOWERING, fold_bn=fold)
            e.ops = [Op("choice", f"{MIX_ROOT}.{e.id}", candidates,
                        {"theta": Op("get_attr", f"{THETA_ROOT}.{name}")}, meta=meta)]
            e.labels.update(choices=",".join(choices), param=name)
        if not names:  # nothing to choose: the graph and its root stay as they were
            return PassResult(graph, False)
        graph.root.add_module(THETA_ROOT, thetas)
        graph.root.add_module(MIX_ROOT, mixers)
        graph.root.archir_theta_keys = {v: k.split("|")[0] for k, v in names.items()}
        return PassResult(graph, True)


FOLDED_LOWERING = "edge_choice.fold_bn"


def _lower_folded(lowering, op: Op, inp, operands):
    """A choice whose original path ends in an affine BatchNorm (``op.meta['fold_bn']`` = its
    index): that BatchNorm takes w_same into its γ and β (passes/mixing.py) and the mixer gets
    the precomputed weights."""
    kwargs = lowering.kwargs_of(op, inp, operands)
    fold = op.meta["fold_bn"]
    mask = lowering.fx.get_attr(lowering.safe_target(f"{op.target}.mask"))
    weights = lowering.fx.call_function(mix_weights, (kwargs["theta"], mask))
    w_same = lowering.fx.call_function(operator.getitem, (weights, 2))
    vals = []
    for cand in op.args:
        if cand == "none":
            continue
        if cand == "identity":
            vals.append(inp)
            continue
        v = inp
        for i, o in enumerate(cand):
            if i == fold:
                bn = lowering.fx.get_attr(lowering.safe_target(o.target))
                v = lowering.fx.call_function(scaled_batch_norm, (v, bn, w_same))
            else:
                v = lowering.op(o, v)
        vals.append(v)
    return lowering.fx.create_node("call_module", lowering.safe_target(op.target), tuple(vals),
                                   {**kwargs, "weights": weights}, name=op.meta.get("name"))


register_lowering(FOLDED_LOWERING, _lower_folded)


def arch_parameters(graph: Graph) -> list[nn.Parameter]:
    """The θ parameters :class:`EdgeChoice` added to ``graph.root`` (empty if it added none)."""
    thetas = getattr(graph.root, THETA_ROOT, None)
    return list(thetas.values()) if thetas is not None else []


def project_thetas(graph: Graph) -> None:
    """θ ≥ 0 (a projection after each architecture step). One fused launch, no host sync."""
    params = arch_parameters(graph)
    if params:
        with torch.no_grad():
            torch._foreach_clamp_min_(params, 0.0)


def _theta_of(graph: Graph, op: Op) -> torch.Tensor:
    target = op.kwargs["theta"].target
    return getattr(getattr(graph.root, THETA_ROOT), target.split(".", 1)[1])


def edge_weights(graph: Graph) -> dict[str, dict[str, float]]:
    """Per choice edge: its normalised weights (for logs and reports)."""
    out = {}
    for e in graph.edges_in_order():
        if len(e.ops) == 1 and e.ops[0].kind == "choice":
            out[e.id] = choice_weights(_theta_of(graph, e.ops[0]), tuple(e.labels["choices"].split(",")))
    return out
