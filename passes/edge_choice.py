"""EdgeChoice: searchable edges choose none, identity or their original operations (DNAT).

Kim & Lee, *Differentiable Neural Architecture Transformation for Reproducible Architecture
Improvement*, search space and θ.

**Which edges are choices.** The paper's graph is the network's cells: each edge holds a
convolution (or linear layer) with the normalisation that follows it, or a shortcut, and only
those edges choose. :func:`choice_reason` says whether an edge is searchable and why:

* ``"parametrised: conv/linear (+ norm)"``: one of its operations is a parametrised conv or linear
  (a ``call_module`` of a module holding parameters outside normalisation layers and activations:
  ``nn.Conv*``, ``nn.Linear``, a wrapper or opaque leaf around them; or a functional
  ``F.conv*``/``F.linear`` reading a weight);
* ``"shortcut into a sum"``: it ends at a sum junction with two or more operands and carries no
  parameters, no activation and no normalisation (empty, ``nn.Identity``, dropout, or a
  parameter-free path such as a slice-and-pad shortcut or a DARTS pooling edge);
* otherwise the edge is fixed, so an edge of activations only or normalisations only (a ReLU after
  a residual sum, which the layer granularity makes an edge of its own) keeps its operations.
  With ``search_activations=True`` every other edge is searchable too (the space archir searched
  before): ``"activation/normalisation (--search-activations)"``, or ``"other operations
  (--search-activations)"`` for one with other operations (a stride-1 pooling, a layer scale).

Valid choices per searchable edge (:func:`valid_choices`): *identity* only where the edge's input
and output have the same shape and dtype (and the edge is not already empty); *none* only where the
edge ends at a sum junction that has another operand; *same* always. A fixed edge, and an edge with
one valid choice, is left as it is. Each searchable edge is labelled ``choices``, ``param`` and
``why``.

**θ's form.** ``form="linear"`` is the paper's Eq. (1),

    o_e(x) = θ_none · 0 + θ_id · x + θ_same · o(x),      θ initialised to (0, 0, 1),

with raw, unconstrained θ (it may go negative; nothing projects it), and the argmax of the raw θ
decides. There ∂o_e/∂θ_none = 0: θ_none stays at 0, but *none* still wins the argmax whenever
θ_id and θ_same end below 0. ``form="normalised"`` (the default) divides by the sum and keeps θ
non-negative:

    o_e(x) = (θ_id · x + θ_same · o(x)) / (θ_none + θ_id + θ_same),      θ ≥ 0 (projected after each step)

The reason to normalise is not that none could never win under Eq. (1): it is how *none* wins.
Under Eq. (1) none is passive: on an edge whose best contribution is about zero, θ_id and θ_same
settle at 0 ± the optimiser's noise next to θ_none = 0, and the argmax of three near-zero numbers is
a coin toss. Normalised, θ_none gets the gradient −o_e/Σθ (it grows while the edge's output does
not help) and takes the mass. Measured on a seeded toy (one edge into a sum, only θ trains, Adam
lr 0.05, 300 steps of batch 32, MSE, 10 seeds; wins none / identity / same, and the mean margin
between the winner's weight and the runner-up's):

    edge                                  Eq. (1) linear             normalised
    useless (the target ignores it)       6 / 1 / 3, margin 0.012    10 / 0 / 0, margin 0.98
    harmful (best weights −0.5, −0.5)     10 / 0 / 0, margin 0.50    10 / 0 / 0, margin 1.00
    useful (o(x) in the target)           0 / 0 / 10, margin 1.00    0 / 0 / 10, margin 0.99
    identity-like (x in the target)       0 / 10 / 0, margin 1.00    0 / 10 / 0, margin 0.99

So Eq. (1) does pick none when the edge's weights go negative, but on a useless edge its decision
rests on a margin of about a quarter of one Adam step and changes with the seed; the normalised
form decides the same 10 of 10 times, by 0.98 of the simplex's total weight of 1.

* **Parity at initialisation** (both forms): with θ = (0, 0, 1) the weights are exactly (0, 0, 1.0),
  so o_e(x) = 0·x + 1.0·o(x) = o(x) bit for bit.
* **Gradients** (normalised, S = Σθ): ∂o_e/∂θ_none = −o_e/S, ∂o_e/∂θ_id = (x − o_e)/S,
  ∂o_e/∂θ_same = (o(x) − o_e)/S; at initialisation ∂o_e/∂θ_none = −o(x) ≠ 0. The weights are a
  point of the simplex, so scaling θ changes nothing but the step size.

``share="full"`` gives every edge its own θ; ``share="cell"`` gives one θ to each cell-sharing
group (edges at the same position of repeated blocks, see ``Edge.group``).

Cost. Mixing is elementwise work over whole activations, which on a CPU is memory-bound: a naive
mixer reads and writes every activation several more times per step. With ``fuse=True`` (the
default), where the original path ends in an affine BatchNorm, w_same is folded into γ and β
(``archir.passes.mixing.scaled_batch_norm``): the same values and gradients, and ∂L/∂w_same comes
out of BatchNorm's own backward instead of extra passes. In the normalised form a ReLU may follow
the BatchNorm (w_same ≥ 0 commutes with it); in the linear form w_same may be negative, so the fold
applies only where the BatchNorm ends the path (w·bn(x) is exact for any sign) and an edge with a
ReLU after its BatchNorm is mixed unfused. (Mixing a lone ReLU edge as ``prelu(x, w_id)``, equal
when w_id + w_same = 1, was measured slower on the CPU: its backward kernel costs more than the
passes it saves.)
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from archir.errors import IRError, UserInputError
from archir.ir import Edge, Graph, Input, Op, fetch_attr
from archir.ir.guards import guard
from archir.ir.lower import register_lowering

from .mixing import MIX_FORMS, POSITIVELY_HOMOGENEOUS, foldable_batch_norm, scaled_batch_norm

from .base import Pass, PassResult

SLOTS = ("none", "identity", "same")
THETA_ROOT = "archir_theta"
MIX_ROOT = "archir_mix"
FORMS = tuple(MIX_FORMS)  # ("normalised", "linear")

WHY_PARAMETRISED = "parametrised: conv/linear (+ norm)"
WHY_SHORTCUT = "shortcut into a sum"
WHY_ACTIVATION = "activation/normalisation (--search-activations)"
WHY_OTHER = "other operations (--search-activations)"


def valid_choices(graph: Graph, edge: Edge) -> tuple[str, ...]:
    """The choices open to ``edge``, in :data:`SLOTS` order: none where it ends at a sum junction with
    two or more operands, identity where it has operations and keeps shape and dtype, same always.
    (Whether the edge is searchable at all is :func:`choice_reason`'s question.)"""
    choices = []
    if _ends_at_sum(graph, edge):
        choices.append("none")
    if edge.ops and edge.shape_preserving:
        choices.append("identity")
    choices.append("same")
    return tuple(choices)


def _ends_at_sum(graph: Graph, edge: Edge) -> bool:
    dst = graph.junctions[edge.dst]
    return dst.combine is not None and dst.combine.kind == "sum" and len(graph.in_edges(dst.id)) >= 2


# -- which edges are searchable ---------------------------------------------------------------

_NORM_TYPES = tuple(t for t in (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
                                getattr(nn, "RMSNorm", None)) if t is not None)
_IDENTITY_TYPES = (nn.Identity, nn.modules.dropout._DropoutNd)
# functions that are a conv or linear layer when they read a weight (fx and ATen names)
_WEIGHT_FNS = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
               "convolution", "_convolution", "linear", "bilinear", "addmm", "matmul", "mm", "bmm", "einsum"}
_ACTIVATION_FNS = {"relu", "relu6", "gelu", "silu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "hardtanh",
                   "leaky_relu", "elu", "selu", "celu", "mish", "softplus", "softsign", "softmax", "log_softmax",
                   "prelu", "rrelu", "glu", "logsigmoid", "tanhshrink", "threshold", "hardshrink", "softshrink"}
_ACTIVATION_WORDS = ("relu", "gelu", "silu", "swish", "sigmoid", "tanh", "mish", "softmax", "activation")
_IDENTITY_FNS = {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
                 "contiguous", "clone", "detach", "identity"}


def _weights_outside_norm(m: nn.Module) -> bool:
    """Whether ``m`` holds parameters outside its normalisation layers and activations (PReLU)."""
    if isinstance(m, _NORM_TYPES) or type(m).__module__ == "torch.nn.modules.activation" \
            and not isinstance(m, nn.MultiheadAttention):
        return False
    children = list(m.children())
    if not children and "norm" in type(m).__name__.lower():  # a norm of one's own (LayerNorm2d, ...)
        return False
    if any(True for _ in m.parameters(recurse=False)):
        return True
    return any(_weights_outside_norm(c) for c in children)


def _reads_weight(op: Op) -> bool:
    """Whether a functional op reads a parameter or constant tensor besides its chain input."""
    for r in op.refs():
        if isinstance(r, Op) and r.kind == "get_attr":
            return True
    stack = [op.args, op.kwargs]
    while stack:
        a = stack.pop()
        if isinstance(a, torch.Tensor):
            return True
        if isinstance(a, (list, tuple)):
            stack.extend(a)
        elif isinstance(a, dict):
            stack.extend(a.values())
    return False


def _trivial_arithmetic(op: Op) -> bool:
    if len(op.args) != 2 or not isinstance(op.args[0], Input) or op.kwargs \
            or isinstance(op.args[1], bool) or not isinstance(op.args[1], (int, float)):
        return False
    other = op.args[1]
    return (op.target in (operator.mul, torch.mul, operator.truediv, torch.div) and other == 1) or \
        (op.target in (operator.add, torch.add, operator.sub, torch.sub) and other == 0)


def op_class(graph: Graph, op: Op) -> str:
    """What an operation is, for :func:`choice_reason`: ``"weights"`` (a parametrised conv or linear),
    ``"norm"``, ``"activation"``, ``"identity"`` (identity, dropout, copies), ``"parameter"``
    (another function reading a parameter) or ``"other"`` (parameter-free)."""
    if op.kind == "choice":
        return "other"
    if op.kind == "call_module":
        m = fetch_attr(graph.root, op.target)
        name = type(m).__name__.lower()
        if isinstance(m, _IDENTITY_TYPES) or "droppath" in name or "stochasticdepth" in name:
            return "identity"
        if _weights_outside_norm(m):
            return "weights"
        if isinstance(m, _NORM_TYPES) or "norm" in name:
            return "norm"
        if type(m).__module__ == "torch.nn.modules.activation" or any(w in name for w in _ACTIVATION_WORDS):
            return "activation"
        return "other"
    if op.kind == "call_function" and op.target is guard:
        return "identity"  # a run-time check that returns its input (archir.ir.guards)
    if op.kind in ("call_function", "call_method"):
        name = op.name.split(".")[0].lower()
        base = name.rstrip("_") if not name.startswith("_") else name
        if base in _WEIGHT_FNS:
            return "weights" if _reads_weight(op) else "other"
        if base in _IDENTITY_FNS or _trivial_arithmetic(op):
            return "identity"
        if "batch_norm" in base or base.endswith("_norm") or base == "normalize":
            return "norm"
        if base in _ACTIVATION_FNS:
            return "activation"
        if _reads_weight(op):  # x * self.gamma and the like: parameters, but no conv or linear
            return "parameter"
    return "other"


def choice_reason(graph: Graph, edge: Edge, search_activations: bool = False) -> str | None:
    """Why ``edge`` is searchable (see the module docstring), or None where it stays fixed."""
    kinds = {op_class(graph, op) for op in edge.ops}
    if "weights" in kinds:
        return WHY_PARAMETRISED
    if _ends_at_sum(graph, edge) and kinds <= {"identity", "other"}:
        return WHY_SHORTCUT
    if search_activations:
        return WHY_ACTIVATION if kinds <= {"norm", "activation", "identity"} else WHY_OTHER
    return None


def searchable_choices(graph: Graph, edge: Edge,
                       search_activations: bool = False) -> tuple[tuple[str, ...], str | None]:
    """``(choices, why)``: :func:`valid_choices` with its :func:`choice_reason`, or ``(("same",), None)``
    for a fixed edge. The edge is a choice when it has two or more choices."""
    why = choice_reason(graph, edge, search_activations)
    return (valid_choices(graph, edge), why) if why is not None else (("same",), None)


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
    """Mixes the values of an edge's candidates with weights θ_k / Σθ over its valid choices
    (``form="normalised"``) or with θ itself (``form="linear"``, the paper's Eq. (1)).

    ``forward(*values, theta, weights=None)``: ``values`` are the candidates other than none, in
    ``choices`` order (identity's ``x`` first, then ``o(x)``); ``theta`` is the 3-slot (none,
    identity, same) parameter, possibly shared by a group; ``weights``, when the lowering already
    computed them, saves computing them again. With ``folded``, ``o(x)`` arrives already scaled
    by w_same (folded into its BatchNorm by the lowering, see passes/mixing.py). Written for few
    kernel launches and no host syncs on a GPU (a small network's step is launch-bound there):
    the valid slots are a mask buffer, not an index, and the weighted sum is one autograd
    function (:class:`WeightedSum`).
    """

    def __init__(self, choices: tuple[str, ...], folded: bool = False, form: str = "normalised"):
        super().__init__()
        if form not in MIX_FORMS:
            raise UserInputError(f"form must be one of {', '.join(MIX_FORMS)}, not {form!r}")
        self.choices = tuple(choices)
        self.form = form
        self.has_identity = "identity" in self.choices
        # normalised without a none slot: w_id + w_same = 1 (never so for raw θ)
        self.convex = form == "normalised" and self.has_identity and "none" not in self.choices
        self.folded = folded
        self.register_buffer("mask", torch.tensor([float(s in self.choices) for s in SLOTS]), persistent=False)

    def forward(self, *values: torch.Tensor, theta: torch.Tensor, weights: torch.Tensor | None = None):
        """``w_id·x + w_same·o(x)`` (``w_same·o(x)`` without an identity choice), with w = θ / Σθ over the
        valid slots (normalised) or w = θ (linear) unless ``weights`` is given; with ``folded``,
        ``o(x)`` arrives already scaled by w_same."""
        w = MIX_FORMS[self.form](theta, self.mask) if weights is None else weights
        w_same = None if self.folded else w[2]
        if self.has_identity:
            x, o = values
            return WeightedSum.apply(o, w_same, x, w[1], self.convex)  # w_id·x + w_same·o(x)
        (o,) = values
        return o if self.folded else WeightedSum.apply(o, w_same, None, None)

    def extra_repr(self) -> str:
        """The valid choices, and whether w_same is folded into a BatchNorm (for ``print(module)``)."""
        return f"choices={self.choices}" + (", linear" if self.form == "linear" else "") + (
            ", folded into BatchNorm" if self.folded else "")


def _is_relu(graph: Graph, op: Op) -> bool:
    if op.kind == "call_module":
        return isinstance(fetch_attr(graph.root, op.target), POSITIVELY_HOMOGENEOUS)
    return (op.kind == "call_function" and op.target in (torch.relu, F.relu) and len(op.args) == 1
            and op.kwargs in ({}, {"inplace": False}))


def _foldable_at(graph: Graph, ops: list[Op], through_relu: bool = True) -> int | None:
    """Index of an affine BatchNorm that ends the path (with ``through_relu``, a ReLU may follow
    it: exact only for w_same ≥ 0): w_same folds into its γ and β (passes/mixing.py). None where
    the path ends otherwise."""
    for i in range(len(ops) - 1, -1, -1):
        op = ops[i]
        if op.kind == "call_module":
            mod = fetch_attr(graph.root, op.target)
            if foldable_batch_norm(mod) and len(op.args) == 1 and isinstance(op.args[0], Input) and not op.kwargs:
                return i
        if not (through_relu and _is_relu(graph, op)):
            return None
    return None


def choice_weights(theta: torch.Tensor, choices: tuple[str, ...], form: str = "normalised") -> dict[str, float]:
    """The weight of each valid choice: normalised (θ clamped at 0, over the valid slots: what the
    mixer multiplies by) or, for ``form="linear"``, the raw θ (possibly negative)."""
    idx = [SLOTS.index(c) for c in choices]
    vals = theta.detach().float().cpu()[idx]
    if form == "linear":
        return {c: float(v) for c, v in zip(choices, vals)}
    vals = vals.clamp_min(0)
    total = float(vals.sum()) or 1.0
    return {c: float(v) / total for c, v in zip(choices, vals)}


class EdgeChoice(Pass):
    """Turn every searchable edge (:func:`choice_reason`) with two or more valid choices into a
    θ-weighted mixture (see the module docstring).

    ``share``: ``"cell"`` or ``"full"``; ``init``: θ's initial value; ``fuse``: fold w_same into a
    closing BatchNorm (same function and gradients, fewer passes over the activations; in the
    linear form only where the BatchNorm ends the path); ``search_activations``: also make
    activation-only and normalisation-only edges choices; ``form``: ``"normalised"``
    (θ/Σθ, θ ≥ 0) or ``"linear"`` (the paper's Eq. (1), raw θ).
    """

    def __init__(self, share: str = "cell", init: tuple[float, float, float] = (0.0, 0.0, 1.0),
                 fuse: bool = True, search_activations: bool = False, form: str = "normalised"):
        if share not in ("cell", "full"):
            raise UserInputError(f"share must be 'cell' or 'full', not {share!r}")
        if form not in MIX_FORMS:
            raise UserInputError(f"form must be one of {', '.join(MIX_FORMS)}, not {form!r}")
        self.share = share
        self.init = init
        self.fuse = fuse
        self.search_activations = search_activations
        self.form = form

    def run(self, graph: Graph) -> PassResult:
        """Replace the operations of every searchable edge with two or more valid choices by one
        ``choice`` op mixing them with a θ (``init``, one per edge or per cell group and choice set)
        held in ``graph.root.archir_theta``, mixers in ``graph.root.archir_mix``; label the edge with
        ``choices``, ``param`` and ``why``. Raise IRError if the graph already has θ; unmodified if
        no edge has a choice."""
        if hasattr(graph.root, THETA_ROOT):
            raise IRError("EdgeChoice already ran on this graph (it has architecture weights)")
        thetas = nn.ParameterDict()
        mixers = nn.ModuleDict()
        names: dict[str, str] = {}
        for e in graph.edges_in_order():
            choices, why = searchable_choices(graph, e, self.search_activations)
            if len(choices) < 2:
                continue
            key = (e.id if self.share == "full" else e.group) + "|" + ",".join(choices)
            if key not in names:
                names[key] = f"t{len(names)}"
                thetas[names[key]] = nn.Parameter(torch.tensor(self.init, dtype=torch.float32))
            name = names[key]
            fold = _foldable_at(graph, e.ops, through_relu=self.form == "normalised") if self.fuse else None
            mixers[e.id] = EdgeMix(choices, folded=fold is not None, form=self.form)
            candidates = tuple("none" if c == "none" else "identity" if c == "identity" else tuple(e.ops)
                               for c in choices)
            meta = {"name": f"mix_{e.id}", "flops": e.flops, "out": e.out_meta, "form": self.form}
            if fold is not None:
                meta.update(lowering=FOLDED_LOWERING, fold_bn=fold)
            e.ops = [Op("choice", f"{MIX_ROOT}.{e.id}", candidates,
                        {"theta": Op("get_attr", f"{THETA_ROOT}.{name}")}, meta=meta)]
            e.labels.update(choices=",".join(choices), param=name, why=why)
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
    the precomputed weights (normalised or raw θ, ``op.meta['form']``)."""
    kwargs = lowering.kwargs_of(op, inp, operands)
    fold = op.meta["fold_bn"]
    mask = lowering.fx.get_attr(lowering.safe_target(f"{op.target}.mask"))
    weights = lowering.fx.call_function(MIX_FORMS[op.meta.get("form", "normalised")], (kwargs["theta"], mask))
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
    """θ ≥ 0 (the normalised form's projection after each architecture step; the linear form has
    none). One fused launch, no host sync."""
    params = arch_parameters(graph)
    if params:
        with torch.no_grad():
            torch._foreach_clamp_min_(params, 0.0)


def _theta_of(graph: Graph, op: Op) -> torch.Tensor:
    target = op.kwargs["theta"].target
    return getattr(getattr(graph.root, THETA_ROOT), target.split(".", 1)[1])


def edge_weights(graph: Graph) -> dict[str, dict[str, float]]:
    """Per choice edge: its weights (normalised, or the raw θ in the linear form; for logs and reports)."""
    out = {}
    for e in graph.edges_in_order():
        if len(e.ops) == 1 and e.ops[0].kind == "choice":
            op = e.ops[0]
            out[e.id] = choice_weights(_theta_of(graph, op), tuple(e.labels["choices"].split(",")),
                                       op.meta.get("form", "normalised"))
    return out
