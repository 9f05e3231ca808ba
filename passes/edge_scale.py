"""EdgeScale, DeriveScale and FoldScale: DSO-NAS's scaling factors λ on edges, and pruning them.

Zhang et al., *You Only Search Once: Single Shot Neural Architecture Search via Direct Sparse
Optimization* (DSO-NAS), Eq. (2)-(5).

**Where λ goes.** Eq. (2) writes every node as h⁽ⁱ⁾ = O⁽ⁱ⁾(Σ_j λ⁽ⁱ⁾_(j) h⁽ʲ⁾): λ scales each input
of a node's *sum*. In archir's IR a node's input sum is a ``sum`` junction, so :class:`EdgeScale`
scales every edge that ends at a sum junction with two or more operands:

    o_e(x) = λ_e · path_e(x)

An edge that ends anywhere else carries the only value of its destination: λ = 0 there would cut
the network, so it is not a connection that can be pruned and gets no λ. A shortcut into
a sum, i.e. an edge that leaves a fork (the value the block's branch reads too) and is either
operand-less (empty, ``nn.Identity``, a parameter-free slice-and-pad) or changes the shape (the
projection shortcut of a downsampling block), is *not* scaled by default: Eq. (4) adds the block
input O_(b−1) to the block output unscaled (and DSO-NAS does not search its reduction blocks), so
when every scaled input of a block's output is pruned the block becomes its shortcut: the
identity, or the projection (``shortcuts=True`` scales those too). Edges added by
:class:`~archir.passes.densify.Densify` (labelled ``dense``) always get a λ of their own,
initialised to 0 (Eq. (3)'s completely connected block, with the function unchanged at
initialisation).

λ is appended to the edge as a plain operation, ``mul(x, archir_lambda.<name>)``; at λ = 1
``x * 1.0`` is ``x`` bit for bit (IEEE multiplication by one is exact) and its gradient ``g · 1.0``
too, so the search space computes the original function at initialisation. ``share="full"``: one
λ per edge; ``share="cell"``: one per cell-sharing group (``Edge.group``, the groups DNAT shares θ
over).

**Deriving** (:class:`DeriveScale`): an edge whose λ is *exactly* 0 contributes 0·path(x) = 0 to
its sum, so removing it (then dead code, :class:`~archir.passes.derive.Prune`) leaves the function
unchanged. (The proximal step of :class:`~archir.methods.dso.APGNAG` produces true zeros, not
1e-8.) A sum whose every operand has λ = 0 computes 0: one operand (the cheapest) is kept, still
multiplied by 0, so that the function stays exact (labelled ``zero``). With a FLOPs budget
(``budget``), edges with the smallest |λ| are pruned too until the derived network fits it
(labelled ``none`` with ``budget: true``): that step changes the function, the network stage
retrains.

**Folding** (:class:`FoldScale`): every surviving λ ≠ 1 folds into the last affine operation of
its edge (the formula, for a scalar λ):

    conv / linear:   λ·(W ⊛ x + b) = (λW) ⊛ x + λb
    BatchNorm:       λ·(γ·x̂ + β)  = (λγ)·x̂ + λβ        (x̂ from batch or running statistics)
    through a ReLU:  λ·relu(y)    = relu(λ·y)           (λ ≥ 0 only)

so the emitted network has no multiply left. The fold is exact in real arithmetic and equal to
rounding in floating point (tested to 1e-6). Where the last operation before λ is not affine
(a sigmoid, a GELU, a ReLU with λ < 0, a BatchNorm without affine parameters, a module used
elsewhere, or an edge with no operation at all) λ stays as ``mul(x, λ)`` with λ a Python float
(``x * float(λ)`` is ``x * λ`` bit for bit: the float32 λ is exactly representable), and the edge
is labelled with the reason (``fold``).
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from archir.errors import IRError, UserInputError
from archir.ir import IN, Edge, Graph, Op, TensorMeta, fetch_attr

from .base import Pass, PassResult
from .derive import live_edges, remove_unused_attributes
from .edge_choice import WHY_SHORTCUT, choice_reason

LAMBDA_ROOT = "archir_lambda"
FROZEN_ATTR = "archir_frozen_scales"  # names of the BatchNorm weights EdgeScale froze (freeze_bn)
SCALE_TAG = "dso_scale"  # op.meta key of the λ multiply
WHY_SUM = "input of a sum (Eq. 2)"
WHY_SCALED_SHORTCUT = "shortcut into a sum (--shortcuts)"
WHY_DENSE = "densified candidate (Eq. 3)"


def ends_at_sum(graph: Graph, edge: Edge) -> bool:
    """Whether ``edge`` is an operand of a sum junction with two or more operands."""
    dst = graph.junctions[edge.dst]
    return dst.combine is not None and dst.combine.kind == "sum" and len(graph.in_edges(dst.id)) >= 2


def scale_reason(graph: Graph, edge: Edge, shortcuts: bool = False) -> str | None:
    """Why ``edge`` gets a λ (see the module docstring), or None where it does not."""
    if edge.labels.get("dense"):
        return WHY_DENSE
    if not ends_at_sum(graph, edge):
        return None
    from_fork = len(graph.out_edges(edge.src)) >= 2
    if from_fork and (choice_reason(graph, edge) == WHY_SHORTCUT or not edge.shape_preserving):
        return WHY_SCALED_SHORTCUT if shortcuts else None
    return WHY_SUM  # an empty edge from a junction that only it reads is a branch's tail (after a ReLU)


def scale_op(edge: Edge) -> Op | None:
    """The λ multiply that ends ``edge`` (EdgeScale's), or None."""
    if edge.ops and edge.ops[-1].meta.get(SCALE_TAG):
        return edge.ops[-1]
    return None


def lambda_of(graph: Graph, op: Op) -> torch.Tensor:
    """The λ parameter a scale op multiplies by."""
    return fetch_attr(graph.root, op.args[1].target)


def scaled_edges(graph: Graph) -> list[Edge]:
    """The edges that end with a λ multiply, in topological order."""
    return [e for e in graph.edges_in_order() if scale_op(e) is not None]


def lambda_parameters(graph: Graph) -> list[nn.Parameter]:
    """The λ parameters :class:`EdgeScale` added to ``graph.root`` (empty if none)."""
    lambdas = getattr(graph.root, LAMBDA_ROOT, None)
    return list(lambdas.values()) if lambdas is not None else []


def edge_lambdas(graph: Graph) -> dict[str, float]:
    """``{edge id: λ}`` for every scaled edge (one host read for all of them)."""
    edges = scaled_edges(graph)
    if not edges:
        return {}
    values = torch.stack([lambda_of(graph, scale_op(e)).detach().reshape(()).float().cpu() for e in edges])
    return dict(zip([e.id for e in edges], values.tolist()))


class EdgeScale(Pass):
    """Append ``mul(x, λ)`` to every edge that :func:`scale_reason` names (see the module docstring).

    ``share``: ``"full"`` (one λ per edge) or ``"cell"`` (one per cell-sharing group); ``init``: λ's
    initial value (1: the original function); ``shortcuts``: also scale parameter-free shortcuts
    into sums. Edges labelled ``dense`` get their own λ initialised to 0.

    ``freeze_bn``: the affine BatchNorm that λ would fold into (the last one before λ on the edge)
    keeps its scale γ fixed during the search (``requires_grad=False``; DSO-NAS sec. 4 fixes BN
    scales "to prevent affecting the learning of λ": λ·γ·x̂ is invariant to λ → cλ, γ → γ/c, so a
    trainable γ could undo any shrinking of λ that the L1 penalty asks for). They stay at their
    current values (1 in a fresh network; a pretrained one keeps its function), and
    :class:`DeriveScale` makes them trainable again for the network stage.
    """

    def __init__(self, share: str = "full", init: float = 1.0, shortcuts: bool = False, freeze_bn: bool = False):
        if share not in ("cell", "full"):
            raise UserInputError(f"share must be 'cell' or 'full', not {share!r}")
        self.share, self.init, self.shortcuts, self.freeze_bn = share, float(init), shortcuts, freeze_bn

    def run(self, graph: Graph) -> PassResult:
        """Scale the edges, hold λ in ``graph.root.archir_lambda`` and label each scaled edge with
        ``choices`` (``none,same``), ``param`` and ``why``. Raise IRError if the graph already has
        λ; unmodified when no edge qualifies."""
        if hasattr(graph.root, LAMBDA_ROOT):
            raise IRError("EdgeScale already ran on this graph (it has scaling factors λ)")
        lambdas = nn.ParameterDict()
        names: dict[str, str] = {}
        for e in graph.edges_in_order():
            why = scale_reason(graph, e, self.shortcuts)
            if why is None:
                continue
            dense = why == WHY_DENSE
            key = e.id if dense or self.share == "full" else e.group
            if key not in names:
                names[key] = f"l{len(names)}"
                lambdas[names[key]] = nn.Parameter(torch.tensor(0.0 if dense else self.init))
            name = names[key]
            e.ops = e.ops + [Op("call_function", operator.mul, (IN, Op("get_attr", f"{LAMBDA_ROOT}.{name}")),
                                meta={"name": f"scale_{e.id}", "out": e.out_meta, "flops": 0, SCALE_TAG: True})]
            e.labels.update(choices="none,same", param=name, why=why)
        if not names:
            return PassResult(graph, False)
        if self.freeze_bn:
            frozen = sorted({t for e in scaled_edges(graph) if not e.labels.get("dense")
                             for t in [_scale_bn(graph, e)] if t is not None})
            for target in frozen:
                fetch_attr(graph.root, target).weight.requires_grad_(False)
            setattr(graph.root, FROZEN_ATTR, frozen)
        graph.root.add_module(LAMBDA_ROOT, lambdas)
        graph.root.archir_lambda_keys = {v: k for k, v in names.items()}
        return PassResult(graph, True)


# -- costs of what pruning keeps ---------------------------------------------------------------

def kept_flops(graph: Graph, pruned: set[str] | frozenset = frozenset()) -> int:
    """FLOPs (multiply-adds per example) of ``graph`` once the edges ``pruned`` are removed along
    with the dead code they leave (what :class:`~archir.passes.derive.Prune` would keep)."""
    edges = live_edges(graph, pruned)
    live = {j for e in edges for j in (e.src, e.dst)} | set(graph.output_junctions()) | set(graph.size_readers())
    joins = sum(j.combine.op.meta.get("flops", 0) for jid, j in graph.junctions.items()
                if jid in live and j.combine is not None and j.combine.op is not None)
    return sum(e.flops for e in edges) + joins


def edge_mac(graph: Graph, edge: Edge) -> int:
    """Memory access cost of ``edge`` per example (Ma et al., ShuffleNet V2; DSO-NAS Eq. (10)):
    for every operation, the elements it reads and writes (input and output activations), plus
    the parameters it reads once, plus its output read once more by the junction's consumer (the
    sum it feeds), so that an identity edge costs its one read. Activations are counted per
    example (the batch dimension divided out); non-tensor values count 0."""
    def per_example(meta) -> int:
        if not isinstance(meta, TensorMeta) or not meta.shape:
            return 0
        n = 1
        for d in meta.shape[1:]:
            n *= d
        return n

    total, inp = 0, edge.in_meta
    for op in edge.ops:
        if op.meta.get(SCALE_TAG):
            continue
        out = op.meta.get("out")
        total += per_example(inp) + per_example(out)
        inp = out
    return total + per_example(edge.out_meta) + graph.edge_params(edge)


def _cone(graph: Graph, pruned: set[str], base: set[str] | frozenset = frozenset()) -> set[str]:
    """Ids of the edges that are live with ``base`` pruned but dead with ``base | pruned`` pruned."""
    def live_edges(p):
        live = set(graph.output_junctions()) | set(graph.size_readers())
        stack, out = list(live), set()
        while stack:
            for e in graph.in_edges(stack.pop()):
                if e.id in p:
                    continue
                out.add(e.id)
                if e.src not in live:
                    live.add(e.src)
                    stack.append(e.src)
        return out
    return live_edges(set(base)) - live_edges(set(base) | pruned)


def edge_cone_mac(graph: Graph, edge: Edge) -> int:
    """MAC of the edges removed if ``edge`` alone is pruned (the edge and what only it feeds)."""
    return sum(edge_mac(graph, graph.edges[i]) for i in _cone(graph, {edge.id}))


# -- deriving ----------------------------------------------------------------------------------

def _scale_bn(graph: Graph, edge: Edge) -> str | None:
    """The module target of the affine BatchNorm that λ on ``edge`` folds into, or None."""
    ops = chain_before(graph, edge)
    i, _ = fold_target(graph, ops, 1.0)
    if i is None or type(fetch_attr(graph.root, ops[i].target)) not in _BATCH_NORMS:
        return None
    return ops[i].target


def unfreeze_scales(graph: Graph) -> bool:
    """Make the BatchNorm scales that :class:`EdgeScale` froze trainable again; whether there were any."""
    frozen = getattr(graph.root, FROZEN_ATTR, None)
    if frozen is None:
        return False
    for target in frozen:
        try:
            fetch_attr(graph.root, target).weight.requires_grad_(True)
        except AttributeError:  # pruned with its edge
            pass
    delattr(graph.root, FROZEN_ATTR)
    return True


def budget_pruning(graph: Graph, lams: dict[str, float], budget: float,
                   penalty: dict[str, float] | None = None) -> set[str]:
    """The nonzero edges (of ``lams``, ``{edge id: λ}``) that must be pruned besides the λ = 0 ones
    for :func:`kept_flops` to fit ``budget``, greedily by the smallest r_e = |λ_e| / s_e until it
    fits (or nothing is left): ``penalty`` gives s_e, the weight of the edge's λ in a weighted L1
    penalty Σ s_e |λ_e| (default 1), and r_e is the number of steps a proximal step at that weight
    needs to bring λ_e to 0, so a costlier edge goes first at equal λ.

    A candidate must free FLOPs and leave its sum another operand, and should not take along (as
    dead code) a scaled edge that ranks above it: pruning an image trunk whose λ is small would
    also remove the blocks inside it whose λ the search kept large, far below the budget. Such a
    candidate is used only when no other one is left. Once the network fits, a pick that is no
    longer needed (one that freed little, made early) is kept after all, the highest ranked first."""
    pruned = {eid for eid, v in lams.items() if v == 0.0}
    forced: set[str] = set()
    now = kept_flops(graph, pruned)
    rank = {eid: abs(v) / max((penalty or {}).get(eid, 1.0), 1e-12) for eid, v in lams.items()}
    while now > budget:
        pick, fallback = None, None
        for eid in sorted((e for e in lams if e not in pruned), key=lambda e: (rank[e], e)):
            if not any(e.id not in pruned | {eid} for e in graph.in_edges(graph.edges[eid].dst)):
                continue
            kept_edges = {e.id for e in live_edges(graph, pruned | {eid})}
            kept = kept_flops(graph, pruned | {eid})
            if kept >= now:
                continue
            takes_along = [o for o in lams if o not in pruned and o != eid and o not in kept_edges]
            if all(rank[o] <= rank[eid] for o in takes_along):
                pick = (eid, kept)
                break
            fallback = fallback or (eid, kept)
        pick = pick or fallback
        if pick is None:
            break
        pruned.add(pick[0])
        forced.add(pick[0])
        now = pick[1]
    # an early pick that freed little may not be needed once larger ones fit the budget: keep it
    for eid in sorted(forced, key=lambda e: (rank[e], e), reverse=True):
        if now <= budget and kept_flops(graph, pruned - {eid}) <= budget:
            pruned.discard(eid)
            forced.discard(eid)
            now = kept_flops(graph, pruned)
    return forced


class DeriveScale(Pass):
    """Label every scaled edge: ``decision`` ``none`` (λ exactly 0, or pruned to meet ``budget``),
    ``zero`` (the one operand a sum keeps when all of them are 0) or ``same`` (a densified
    candidate that survives: ``added``); ``changed`` (a pruned candidate is no change) and
    ``weights`` (``{"λ": value}``). :class:`~archir.passes.derive.Prune` then removes the none edges.

    ``budget``: a FLOPs limit (multiply-adds per example): while :func:`kept_flops` exceeds it,
    the nonzero edge with the smallest |λ| (over its penalty weight, ``penalty(graph)``, when given:
    :func:`budget_pruning`) among those whose pruning frees FLOPs (and leaves its sum another
    operand) is pruned too, labelled ``budget``. BatchNorm scales frozen by
    :class:`EdgeScale` (``freeze_bn``) become trainable again.
    """

    def __init__(self, budget: float | None = None, penalty=None):
        self.budget = budget
        self.penalty = penalty  # graph -> {edge id: s_e}, the weights of the L1 penalty (budget order)

    def run(self, graph: Graph) -> PassResult:
        """Decide and label every scaled edge (see the class docstring); unmodified when there is none."""
        lams = edge_lambdas(graph)
        unfrozen = unfreeze_scales(graph)
        if not lams:
            return PassResult(graph, unfrozen)
        none = {eid for eid, v in lams.items() if v == 0.0}
        weights = self.penalty(graph) if self.penalty is not None and self.budget is not None else None
        forced = budget_pruning(graph, lams, self.budget, weights) if self.budget is not None else set()
        pruned = none | forced
        zero: set[str] = set()
        for jid, j in graph.junctions.items():  # a sum keeps one operand (exact: it computes 0)
            ins = graph.in_edges(jid)
            if j.combine is not None and ins and all(e.id in pruned for e in ins):
                keep = min(ins, key=lambda e: (e.id in forced, e.flops))
                pruned.discard(keep.id)
                forced.discard(keep.id)
                zero.add(keep.id)
        for eid, lam in lams.items():
            e = graph.edges[eid]
            decision = "none" if eid in pruned else "zero" if eid in zero else "same"
            changed = decision != "same"
            if e.labels.get("dense"):  # a candidate the original did not have: pruning it changes nothing
                decision, changed = ("none", False) if decision == "none" else ("added", True)
            e.labels.update(decision=decision, changed=changed, weights={"λ": lam})
            if eid in forced:
                e.labels["budget"] = True
        return PassResult(graph, True)



def _is_relu(graph: Graph, op: Op) -> bool:
    if op.kind == "call_module":
        return type(fetch_attr(graph.root, op.target)) is nn.ReLU
    return (op.kind == "call_function" and op.target in (torch.relu, F.relu) and len(op.args) == 1
            and op.kwargs in ({}, {"inplace": False}))


_AFFINE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _uses(graph: Graph, target: str) -> int:
    return sum(target in op.attr_targets() for op in graph.all_ops())


def chain_before(graph: Graph, edge: Edge) -> list[Op]:
    """The operations that compute ``edge``'s value before its λ: its own, preceded by those of the
    edges before it while their junction is a plain value read by that one edge only (at layer
    granularity a branch ``conv · bn · relu`` ends at a junction of its own, then an empty edge)."""
    ops = list(edge.ops[:-1]) if scale_op(edge) is not None else list(edge.ops)
    jid, seen = edge.src, set()
    outputs, read = set(graph.output_junctions()), set(graph.size_readers())
    while jid not in seen:
        seen.add(jid)
        j = graph.junctions[jid]
        ins = graph.in_edges(jid)
        if j.is_input or j.combine is not None or len(ins) != 1 or len(graph.out_edges(jid)) != 1 \
                or jid in outputs or jid in read:
            break
        ops = list(ins[0].ops) + ops
        jid = ins[0].src
    return ops


def fold_target(graph: Graph, ops: list[Op], lam: float) -> tuple[int | None, str]:
    """``(index of the operation λ folds into, "")``, or ``(None, why not)``: the last affine
    operation of ``ops`` (:func:`chain_before`; a conv, linear or affine BatchNorm called as a
    module and used by this operation only), through ReLUs when λ ≥ 0."""
    for i in range(len(ops) - 1, -1, -1):
        op = ops[i]
        if op.kind == "call_module":
            m = fetch_attr(graph.root, op.target)
            affine = type(m) in _AFFINE or (type(m) in _BATCH_NORMS and m.affine)
            if affine:
                if _uses(graph, op.target) != 1:
                    return None, f"{op.target} is used elsewhere"
                return i, ""
        if _is_relu(graph, op):
            if lam >= 0:
                continue
            return None, f"λ = {lam:.4g} < 0 does not commute with {op.render()}"
        return None, f"the last operation before λ, {op.render()}, is not affine"
    return None, "no affine operation on the edge"


class FoldScale(Pass):
    """Fold every surviving λ into its edge's last affine operation, or keep it as a constant
    multiply with the reason (see the module docstring); λ = 1 simply goes. Labels ``fold``.

    The weights are scaled in place (same parameter objects, so an optimiser's state carries over
    to the network stage; its momentum, accumulated for the unscaled weights, decays within a few
    steps)."""

    def run(self, graph: Graph) -> PassResult:
        """Rewrite every edge that ends with a λ multiply; drop λ parameters no longer used.
        Unmodified when no edge has one."""
        modified = False
        for e in graph.edges_in_order():
            op = scale_op(e)
            if op is None:
                continue
            modified = True
            lam = float(lambda_of(graph, op).detach())
            ops = e.ops[:-1]
            if lam == 1.0:
                e.ops = ops
                e.labels["fold"] = "λ = 1: dropped"
                continue
            chain = chain_before(graph, e)
            i, why = fold_target(graph, chain, lam)
            if i is None:
                e.ops = ops + [Op("call_function", operator.mul, (IN, lam),
                                  meta={"name": op.meta.get("name"), "out": op.meta.get("out"), "flops": 0})]
                e.labels["fold"] = f"kept as x * {lam:.6g}: {why}"
                continue
            m = fetch_attr(graph.root, chain[i].target)
            with torch.no_grad():
                m.weight.mul_(lam)
                if m.bias is not None:
                    m.bias.mul_(lam)
            e.ops = ops
            e.labels["fold"] = f"folded into {chain[i].target}"
        if modified:
            remove_unused_attributes(graph)
            if hasattr(graph.root, "archir_lambda_keys") and not hasattr(graph.root, LAMBDA_ROOT):
                del graph.root.archir_lambda_keys
        return PassResult(graph, modified)
