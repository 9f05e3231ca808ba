"""DSO-NAS: every input of a sum is scaled by a factor λ under an L1 penalty; λ = 0 edges are pruned.

Zhang et al., *You Only Search Once: Single Shot Neural Architecture Search via Direct Sparse
Optimization* (DSO-NAS). The search problem is Eq. (5),

    min_{W, λ}  (1/K) Σ_i L(y_i, Net(x_i, W, λ)) + δ‖W‖²_F + γ‖λ‖₁,

with W trained by SGD (weight decay δ) and λ by APG-NAG (:class:`APGNAG`, Eq. (6)-(8)), the
proximal step of the L1 term giving exact zeros. The pieces:

* search space: :class:`~archir.passes.edge_scale.EdgeScale` (λ on every input of a sum,
  initialised to 1: the original function bit for bit), after
  :class:`~archir.passes.densify.Densify` with ``densify`` (Eq. (3)'s completely connected block:
  candidate edges with λ = 0, the function unchanged);
* training: the built-in trainer with the method's suggested defaults (:attr:`DSO.default_options`):
  ``arch_update="split"`` (ω and λ on two disjoint parts of the training set, the paper's sec. 3.3;
  ``--split-fraction`` is the λ part) and ``arch_optimizer="method"`` (APG-NAG). Weight
  pre-training is ``--warmup-epochs`` (the paper pre-trains, then searches). A user's own loop gets
  APG-NAG from ``Search.arch_optimizer(lr=...)``; with any other optimiser the soft threshold
  S_{ηγ} (η its learning rate) runs after every step, so zeros are exact either way;
* penalties (``penalty``): ``none`` (γ for every λ), ``flops`` (Eq. (9), adaptive FLOPs:
  γ_e = FLOPs^t_b / FLOPs_b · γ for the block b = the sum junction the edge feeds, FLOPs_b what
  pruning all of the block's scaled inputs would remove, FLOPs^t_b the part of it still kept at
  step t), ``mac`` (Eq. (10), adaptive MAC: γ_e = MAC_e / MAC_max · γ, MAC_e the memory access
  cost of the edge and of what only it feeds, :func:`~archir.passes.edge_scale.edge_mac`). A λ
  shared by several edges (``share="cell"``) takes the mean of their γ_e;
* ``target_flops``: a FLOPs budget B (a fraction of the original network's) that the search itself
  reaches, by a budget-aware penalty. Before every λ step t, P_t is the set of edges that would
  still have to be pruned for the network to fit B (the smallest |λ_e| / s_e first, s_e the
  adaptive penalty's multiplier, so that with ``flops`` or ``mac`` a costlier edge goes first at
  equal λ: :func:`~archir.passes.edge_scale.budget_pruning`); the λ of P_t get the penalty

      γ_e,t = max(γ, |λ_e| (1 − μ) / (η s_e (R − t)))   for t < R,     ∞   from R on,

  (η the learning rate, s_e the penalty's multiplier, μ APG-NAG's momentum, whose extrapolation
  adds a constant shrink up to 1/(1 − μ) times): before R, the smallest that brings them to 0 by
  the end of the ramp R (``target_steps``: half of the search's λ steps with the built-in trainer); every
  other λ keeps γ. Early in the ramp the push is small and the loss gradient decides which λ are
  smallest (an edge the loss needs climbs out of P_t and another takes its place); from R on an
  owed λ is zeroed at once (S_∞; exact after APG-NAG's two steps) and a zero λ stays 0, so the search
  ends within the budget. At derive the budget is
  enforced again on whatever is left (decisions labelled ``budget``);
* derive: :class:`~archir.passes.edge_scale.DeriveScale` (λ = 0 → none; a sum keeps one operand),
  :class:`~archir.passes.derive.Prune` (none edges, dead code, unused parameters) and
  :class:`~archir.passes.edge_scale.FoldScale` (λ folded into the last conv/linear/BatchNorm) and
  :class:`~archir.passes.derive.FoldIdentities` (what a pruned block leaves: relu · relu → relu);
* the network stage: ``--retrain continue`` (the default) trains the derived network on from the
  searched weights; ``--retrain scratch`` re-initialises it first, as the paper does (sec. 4).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from archir.options import option
from archir.passes.base import Pass, PassResult
from archir.passes.derive import FoldIdentities, Prune
from archir.passes.densify import Densify
from archir.passes.edge_scale import (DeriveScale, EdgeScale, FoldScale, _cone, budget_pruning, edge_lambdas,
                                      edge_mac, kept_flops, lambda_of, lambda_parameters, scale_op, scale_reason,
                                      scaled_edges)

from . import Method, register

FLOPS_ATTR = "archir_dso_flops"  # the original network's FLOPs, recorded on graph.root before Densify


def soft_threshold(z: torch.Tensor, alpha) -> torch.Tensor:
    """S_α(z) = sign(z) · max(|z| − α, 0), elementwise; exactly 0 where |z| ≤ α."""
    return torch.sign(z) * torch.clamp_min(z.abs() - alpha, 0.0)


class APGNAG(torch.optim.Optimizer):
    """APG-NAG (Huang & Wang, *Data-Driven Sparse Structure Selection*; DSO-NAS Eq. (6)-(8)) for
    min G(λ) + γ‖λ‖₁, one step per call::

        z_t = λ_{t−1} − η ∇G(λ_{t−1})                       (6)
        v_t = S_{ηγ}(z_t) − λ_{t−1} + μ v_{t−1}              (7)
        λ_t = S_{ηγ}(z_t) + μ v_t                            (8)

    with S the soft threshold (:func:`soft_threshold`), η the learning rate ``lr``, μ the momentum,
    v_0 = 0. λ here is the extrapolated (look-ahead) point of accelerated proximal gradient, so
    a coordinate whose S_{ηγ}(z) is 0 reaches λ = 0 *exactly* at the second consecutive such step:
    v_{t+1} = 0 − μv_t + μv_t = 0 and λ_{t+1} = 0 + μ·0 = 0, with the products computed
    separately (no fused multiply-add) so that the two μv_t are the same float. λ = v = 0 is then
    a fixed point while |∇G| ≤ γ. ``gamma`` is γ; ``penalty`` (optional) returns
    ``{id(parameter): multiplier of γ}`` before each step (adaptive penalties, a budget's γ).
    """

    def __init__(self, params, lr: float, gamma: float = 0.0, momentum: float = 0.9, penalty=None):
        if lr < 0 or gamma < 0 or not 0 <= momentum < 1:
            raise ValueError(f"APGNAG needs lr >= 0, gamma >= 0 and 0 <= momentum < 1, not {lr}, {gamma}, "
                             f"{momentum}")
        super().__init__(params, {"lr": lr, "gamma": gamma, "momentum": momentum})
        self.penalty = penalty

    @torch.no_grad()
    def step(self, closure=None):
        """One APG-NAG step of every parameter with a gradient (Eq. (6)-(8))."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scales = self.penalty() if self.penalty is not None else {}
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "v" not in state:
                    state["v"] = torch.zeros_like(p)
                alpha = lr * group["gamma"] * scales.get(id(p), 1.0)
                z = p - lr * p.grad                                   # (6)
                s = soft_threshold(z, alpha)
                v = (s - p) + mu * state["v"]                         # (7)
                p.copy_(s + mu * v)                                   # (8)
                state["v"] = v
        return loss


class _RecordFlops(Pass):
    """Record the FLOPs of the graph as it is now (the original network) on ``graph.root``."""

    def run(self, graph):
        setattr(graph.root, FLOPS_ATTR, graph.total_flops())
        return PassResult(graph, False)


@dataclass
class DSOOptions:
    share: str = option("full", "full: one λ per edge; cell: one per cell-sharing group (the groups DNAT "
                        "shares θ over).", choices=("full", "cell"))
    gamma: float = option(0.01, "γ, the weight of the L1 penalty on λ (Eq. 5); larger prunes more.", minimum=0.0)
    penalty: str = option("none", "How γ adapts per λ: none; flops (adaptive FLOPs, Eq. 9: γ times the "
                          "fraction of its block's FLOPs still kept); mac (adaptive MAC, Eq. 10: γ times the "
                          "edge's memory access cost over the largest).", choices=("none", "flops", "mac"))
    apg_momentum: float = option(0.9, "μ, the momentum of APG-NAG (Eq. 7-8).", minimum=0.0, maximum=0.999)
    densify: str = option("off", "Eq. 3's completely connected block: within a stage, candidate edges from "
                          "every earlier junction to every later sum, as identity or 1x1 convolution, with λ "
                          "starting at 0 (the function unchanged).", choices=("off", "identity", "conv1x1"))
    shortcuts: bool = option(False, "Also scale shortcuts into sums, parameter-free or projections (Eq. 4 "
                             "keeps the block input unscaled, so a fully pruned block becomes its shortcut).")
    freeze_bn: bool = option(True, "Keep the scale of the BatchNorm before each λ fixed during the search (the "
                             "paper's sec. 4: a trainable scale would undo the L1 penalty's shrinking of λ); "
                             "it trains again in the network stage.")
    target_flops: float | None = option(None, "A FLOPs budget instead of a fixed γ: the fraction of the "
                                        "original network's FLOPs the derived network may keep (0.7: 70%).",
                                        minimum=0.01, maximum=1.0)
    target_steps: int | None = option(None, "With --target-flops: the λ steps over which γ brings the network "
                                      "to the budget (default: half of the search's λ steps; 100 in your own "
                                      "training loop).", minimum=1, cli=False)


@register
class DSO(Method):
    """DSO-NAS as a :class:`Method` (see the module docstring)."""

    name = "dso"
    summary = "every input of a sum is scaled by λ under an L1 penalty (APG-NAG); λ = 0 edges are pruned"
    Options = DSOOptions
    default_options = {"arch_update": "split", "arch_optimizer": "method"}

    def __init__(self, options=None):
        super().__init__(options)
        self.budget_scales: dict[str, float] = {}  # {edge id: γ_e,t / γ} of the owed edges (target_flops)
        self.lambda_steps = 0  # λ steps taken (the controller's t)
        self.planned_steps: int | None = None  # λ steps the built-in trainer will take (plan_search)
        self._static: dict | None = None

    @property
    def gamma(self) -> float:
        """γ: the ``gamma`` option; with a FLOPs target and ``gamma=0``, 1e-4 (the controller sets γ_t)."""
        o = self.options
        return o.gamma if o.gamma > 0 or o.target_flops is None else 1e-4

    @property
    def ramp_steps(self) -> int:
        """R: the λ steps by which the controller reaches the FLOPs budget (see the module docstring)."""
        if self.options.target_steps is not None:
            return self.options.target_steps
        return max(self.planned_steps // 2, 1) if self.planned_steps else 100

    def plan_search(self, graph, arch_steps: int) -> None:
        """Keep the number of λ steps of the search, for the ramp of ``target_flops``."""
        self.planned_steps = arch_steps

    # -- search space ----------------------------------------------------------------------
    def search_passes(self):
        """Record the original FLOPs, :class:`Densify` (with ``densify``), :class:`EdgeScale`."""
        o = self.options
        passes: list[Pass] = [_RecordFlops()]
        if o.densify != "off":
            passes.append(Densify(o.densify))
        return passes + [EdgeScale(o.share, shortcuts=o.shortcuts, freeze_bn=o.freeze_bn)]

    def arch_parameters(self, graph):
        """The λ parameters (one scalar each)."""
        return lambda_parameters(graph)

    def arch_weights(self, graph):
        """``{edge id: {"λ": value}}`` for every scaled edge."""
        return {eid: {"λ": v} for eid, v in edge_lambdas(graph).items()}

    def changed_edges(self, graph):
        """The scaled edges whose λ is exactly 0 now (pruned if the search stopped here)."""
        return [eid for eid, v in edge_lambdas(graph).items() if v == 0.0]

    # -- the λ step ------------------------------------------------------------------------
    def arch_optimizer(self, graph, params, lr):
        """:class:`APGNAG` with γ, μ and the penalty's per-λ multipliers."""
        return APGNAG(params, lr=lr, gamma=self.gamma, momentum=self.options.apg_momentum,
                      penalty=lambda: self.penalty_scales(graph))

    def state_dict(self) -> dict:
        """What a checkpoint must hold besides λ and the optimisers: the budget penalty's state
        (``--target-flops``), so that a resumed run continues it (``archir transform --resume``)."""
        return {"budget_scales": dict(self.budget_scales), "lambda_steps": int(self.lambda_steps)}

    def load_state_dict(self, state: dict) -> None:
        self.budget_scales = {str(k): float(v) for k, v in state.get("budget_scales", {}).items()}
        self.lambda_steps = int(state.get("lambda_steps", 0))

    def after_optimizer_step(self, graph, optimizer):
        """After APG-NAG: only the budget controller (the proximal step is APG-NAG's own). After any
        other optimiser: the soft threshold λ ← S_{ηγ}(λ) with η that optimiser's learning rate (the
        proximal step of γ‖λ‖₁), so λ still reaches exact zeros; then the controller."""
        if optimizer is not None and not isinstance(optimizer, APGNAG):
            ids = {id(p) for p in lambda_parameters(graph)}
            scales = self.penalty_scales(graph)
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if id(p) in ids:
                        p.copy_(soft_threshold(p, group["lr"] * self.gamma * scales.get(id(p), 1.0)))
        if self.options.target_flops is not None and optimizer is not None:
            self.lambda_steps += 1
            self._steer_gamma(graph, optimizer.param_groups[0]["lr"])

    def _steer_gamma(self, graph, lr: float) -> None:
        """Set γ_e,t of the owed edges for the next λ step (``target_flops``; see the module docstring)."""
        self.budget_scales = {}
        lams = edge_lambdas(graph)
        multipliers = self._edge_multipliers(graph)
        owed = budget_pruning(graph, lams, self.options.target_flops * self.original_flops(graph), multipliers)
        remaining = self.ramp_steps - self.lambda_steps
        if remaining <= 0:  # the ramp is over: S_∞(z) = 0 whatever the gradient step added to λ, and
            # what is pruned stays pruned (a zero λ revived by its gradient would be owed again)
            self.budget_scales = dict.fromkeys(owed | {eid for eid, v in lams.items() if v == 0.0}, math.inf)
            return
        if not owed or lr <= 0:
            return
        # APG-NAG's momentum μ makes a constant shrink per step add up to 1 / (1 − μ) times it
        per_step = (1.0 - self.options.apg_momentum) / remaining
        for eid in owed:
            step = lr * self.gamma * max(multipliers.get(eid, 1.0), 1e-6)
            self.budget_scales[eid] = max(abs(lams[eid]) * per_step / step, 1.0)

    @staticmethod
    def original_flops(graph) -> int:
        """The original network's FLOPs (recorded before Densify)."""
        return getattr(graph.root, FLOPS_ATTR, 0) or graph.total_flops()

    def flops_fraction(self, graph) -> float:
        """FLOPs of the network that pruning the λ = 0 edges now would give, over the original's."""
        zeros = {e.id for e in scaled_edges(graph) if float(lambda_of(graph, scale_op(e)).detach()) == 0.0}
        return kept_flops(graph, zeros) / max(self.original_flops(graph), 1)

    def _statics(self, graph) -> dict:
        """What the penalties need that does not change during the search (computed once)."""
        if self._static is None:
            edges = scaled_edges(graph)
            blocks: dict[str, set[str]] = {}
            for e in edges:
                blocks.setdefault(e.dst, set()).add(e.id)
            full = kept_flops(graph)
            mac = {e.id: sum(edge_mac(graph, graph.edges[i]) for i in _cone(graph, {e.id})) for e in edges}
            self._static = {"edges": [(e.id, lambda_of(graph, scale_op(e))) for e in edges], "blocks": blocks,
                            "block_flops": {j: full - kept_flops(graph, s) for j, s in blocks.items()},
                            "mac": mac, "mac_max": max(mac.values(), default=0)}
        return self._static

    def _edge_multipliers(self, graph) -> dict[str, float]:
        """``{edge id: s_e}``, the adaptive penalty's multiplier of γ (Eq. (9) or (10); 1 with none)."""
        o = self.options
        st = self._statics(graph)
        if o.penalty == "none":
            return {eid: 1.0 for eid, _ in st["edges"]}
        per_edge: dict[str, float] = {}
        if o.penalty == "mac":
            for eid, _ in st["edges"]:
                per_edge[eid] = st["mac"][eid] / st["mac_max"] if st["mac_max"] else 1.0
        else:  # flops, Eq. (9)
            zeros = {eid for eid, p in st["edges"] if float(p.detach()) == 0.0}
            base = kept_flops(graph, zeros)
            for j, members in st["blocks"].items():
                total = st["block_flops"][j]
                now = base - kept_flops(graph, zeros | members)
                for eid in members:
                    per_edge[eid] = now / total if total else 1.0
        return per_edge

    def penalty_scales(self, graph) -> dict[int, float]:
        """``{id(λ): multiplier of γ}``: the adaptive penalty (Eq. (9) or (10)) times the budget
        penalty's factor (``target_flops``); a shared λ takes the mean over its edges."""
        per_edge = self._edge_multipliers(graph)
        sums: dict[int, list[float]] = {}
        for eid, p in self._statics(graph)["edges"]:
            sums.setdefault(id(p), []).append(per_edge[eid] * self.budget_scales.get(eid, 1.0))
        return {pid: sum(v) / len(v) for pid, v in sums.items()}

    # -- deriving --------------------------------------------------------------------------
    def derive_passes(self):
        """:class:`DeriveScale` (with the FLOPs budget of ``target_flops``), :class:`Prune`,
        :class:`FoldScale`, :class:`FoldIdentities`."""
        return [_DeriveWithBudget(self.options.target_flops, self._edge_multipliers), Prune(), FoldScale(),
                FoldIdentities()]

    # -- inspecting ------------------------------------------------------------------------
    def searchable(self, graph):
        """``{edge id: {"choices": ("none", "same"), "why": reason}}`` for the edges EdgeScale would scale."""
        out = {}
        for e in graph.edges_in_order():
            why = scale_reason(graph, e, self.options.shortcuts)
            if why is not None:
                out[e.id] = {"choices": ("none", "same"), "why": why}
        return out

    def candidates(self, graph):
        """How many edges would get a λ (and so could be pruned)."""
        n = len(self.searchable(graph))
        dense = "" if self.options.densify == "off" else f", plus densified {self.options.densify} candidates"
        return f"{n} edges scaled by λ (inputs of sums){dense}: each could be pruned"


class _DeriveWithBudget(DeriveScale):
    """:class:`DeriveScale` with the budget ``fraction`` × the original FLOPs (recorded on the root)."""

    name = "DeriveScale"

    def __init__(self, fraction: float | None, penalty=None):
        super().__init__(None, penalty)
        self.fraction = fraction

    def run(self, graph):
        if self.fraction is not None:
            self.budget = self.fraction * DSO.original_flops(graph)
        return super().run(graph)
