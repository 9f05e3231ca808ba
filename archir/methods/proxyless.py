"""ProxylessNAS: binary-gated kernel-size and activation candidates, searched from deep to shallow.

Cai, Zhu & Han, *ProxylessNAS: Direct Neural Architecture Search on Target Task and Hardware*,
with the search space of *Search Space Adaptation for Differentiable Neural Architecture Search in
Image Classification* (candidate kernels and activations where the network has k×k convolutions;
scope s / m / l / f: the deepest 1, 2, 3 stages or all). The pieces:

* search space: :class:`~archir.passes.candidate_ops.CandidateOps` (warm start from the original
  weights, zero-padded; binary gates, one or two paths per step, ProxylessNAS's gradient
  estimate; see that module's docstring for the formulas);
* training: the built-in trainer with the papers' settings as :attr:`Proxyless.default_options`
  (weights by SGD with Nesterov momentum, lr 0.05, momentum 0.9, weight decay 4e-5; α by Adam, lr
  1e-3, no weight decay, on a held-out part of the training set: ``arch_update="split"``), each
  applied only where the user gave none; after each α step the two-path rescale
  (:func:`~archir.passes.candidate_ops.rescale_pairs`);
* latency (optional, ``latency_weight`` > 0): the α loss gets + w · E[latency] with
  E[latency] = Σ_units Σ_paths P(path)·lat(path) in milliseconds, each path's latency measured
  once (batch 1; ``latency_target``: torch on the supernet's device, or ONNX Runtime) and cached
  (:func:`~archir.passes.candidate_ops.expected_latency`);
* α per unit per epoch: :meth:`Proxyless.arch_weights` gives softmax(α), which the trainer logs
  each epoch (``arch_history`` in report.json, ``arch.png``: the adaptation paper's Fig. 3);
* derive: :class:`~archir.passes.candidate_ops.DeriveCandidates` (argmax, ties to the original:
  with no training the derived network is the original, bit for bit; a candidate must beat the
  original's probability by more than ``derive_margin``, 0.02 by default: after 16 α steps at the
  paper's lr 1e-3 every probability was within 0.0065 of uniform, and a bare argmax changed 17 of
  19 units by noise), then
  :class:`~archir.passes.derive.Prune` (the unchosen candidates' modules go).

* stop rule (optional, ``stop_window`` > 0): once softmax(α) moved by at most ``stop_delta`` over
  a window of α steps, α is frozen (its learning rate 0) for the rest of the search, since the
  adaptation paper saw α turn erratic when the search ran on past convergence. The architecture
  stage itself still runs its epochs (ending it early would need the trainer to ask the method),
  so the rule keeps the decision, it does not save time.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

from archir.options import option
from archir.passes.candidate_ops import (
    COMBINES,
    SCOPES,
    CandidateOps,
    DeriveCandidates,
    alpha_parameters,
    check_candidates,
    expected_latency,
    factor_choices,
    gate_ops,
    last_argmax,
    plan_units,
    rescale_pairs,
    set_alphas,
    unit_weights,
)
from archir.passes.derive import Prune

from . import Method, register


@dataclass
class ProxylessOptions:
    kernels: str = option("3,5,7", "Candidate kernel sizes of k x k convolutions (odd, comma-separated); "
                          "larger ones start from the original weights zero-padded.")
    activations: str = option("relu,leaky_relu,mish,hardswish", "Candidate activations after a conv "
                              "(comma-separated: relu, relu6, leaky_relu, mish, hardswish, silu, gelu, elu).")
    scope: str = option("f", "Search scope: the deepest s(1), m(2), l(3) stages or f(ull) (stages: runs of "
                        "convolutions at the same resolution and width).", choices=tuple(SCOPES))
    combine: str = option("separate", "separate: one decision for the kernel, one for the activation; "
                          "product: one decision over kernel x activation pairs.", choices=COMBINES)
    gate_paths: int = option(1, "Paths drawn per step by the binary gates (1, or 2 with ProxylessNAS's "
                             "rescaling of the two α).", minimum=1, maximum=2)
    latency_weight: float = option(0.0, "Weight of the expected latency (ms, measured per candidate) in the "
                                   "architecture loss; 0: off.", minimum=0.0)
    latency_target: str = option("torch", "Where candidate latencies are measured (batch 1, once, cached): "
                                 "torch on the run's device, or onnx (ONNX Runtime).", choices=("torch", "onnx"))
    stop_window: int = option(0, "Stop rule: every this many α steps compare softmax(α) with its value a "
                              "window before; once no probability moved more than --stop-delta, α is frozen "
                              "(its learning rate set to 0) for the rest of the search; 0: off.", minimum=0)
    stop_delta: float = option(0.005, "The stop rule's threshold on the largest change of a probability over "
                               "one window.", minimum=0.0)
    derive_margin: float = option(0.02, "At derive a candidate replaces the original only if its probability "
                                  "exceeds the original's by more than this (a short search leaves α near "
                                  "uniform; 0: plain argmax, as the paper).", minimum=0.0, maximum=1.0)


@register
class Proxyless(Method):
    """ProxylessNAS as a :class:`Method` (see the module docstring)."""

    name = "proxyless"
    summary = ("k x k conv edges choose kernel sizes and activations through binary gates (ProxylessNAS), "
               "scope from the deepest stage")
    Options = ProxylessOptions
    # ProxylessNAS / the adaptation paper, sec. IV-A: SGD Nesterov 0.05, momentum 0.9, wd 4e-5;
    # α by Adam 1e-3 without weight decay on held-out data
    default_options: ClassVar[dict[str, Any]] = {"lr": 0.05, "momentum": 0.9, "weight_decay": 4e-5,
                                                 "nesterov": True, "arch_lr": 1e-3, "arch_optimizer": "adam",
                                                 "arch_update": "split"}

    def __init__(self, options=None):
        super().__init__(options)
        check_candidates(self.options.kernels, self.options.activations)  # a bad list fails here, clearly
        self.stopped_at: int | None = None  # the α step at which the stop rule froze α
        self._steps, self._last_check = 0, None

    def search_passes(self):
        """One :class:`CandidateOps` pass with the options."""
        o = self.options
        return [CandidateOps(o.kernels, o.activations, o.scope, o.combine, o.gate_paths)]

    def arch_parameters(self, graph):
        """The α logits (one vector per decision)."""
        return alpha_parameters(graph)

    def after_arch_step(self, graph):
        """Two-path gates: rescale the two α drawn in the last forward (nothing with one path)."""
        rescale_pairs(graph)

    def after_optimizer_step(self, graph, optimizer):
        """The rescale (:meth:`after_arch_step`), then the stop rule (``stop_window`` > 0): every
        ``stop_window`` steps of ``optimizer``, if no softmax(α) entry moved more than ``stop_delta``
        since the last check, α is converged and ``optimizer``'s learning rate for it becomes 0
        (the adaptation paper saw α turn erratic when the search ran on past convergence);
        ``stopped_at`` records the step."""
        self.after_arch_step(graph)
        window = self.options.stop_window
        if window <= 0 or optimizer is None:
            return
        alpha_ids = {id(p) for p in alpha_parameters(graph)}
        if self.stopped_at is None:
            self._steps += 1
            if self._steps % window:
                return
            now = unit_weights(graph)
            last, self._last_check = self._last_check, now
            if last is None or max(abs(w - last[u][c]) for u, ws in now.items() for c, w in ws.items()) \
                    > self.options.stop_delta:
                return
            self.stopped_at = self._steps
        for group in optimizer.param_groups:  # frozen, also for an optimiser built later
            if any(id(p) in alpha_ids for p in group["params"]):
                group["lr"] = 0.0

    def extra_loss(self, graph):
        """``latency_weight`` · E[latency] (ms), or None when the weight is 0."""
        w = self.options.latency_weight
        if w <= 0:
            return None
        lat = expected_latency(graph, self.options.latency_target)
        return None if lat is None else w * lat

    def arch_weights(self, graph):
        """``{unit: {choice: softmax(α)}}`` (a unit is an edge, or ``<edge>_<i>`` for the i-th of several)."""
        return unit_weights(graph)

    def changed_edges(self, graph):
        """The units where some decision's argmax (ties to the original) is not the original."""
        out = set()
        for _, op, mix in gate_ops(graph):
            for p, names in zip(mix.params, mix.names):
                if last_argmax(graph.root.archir_alpha[p]) != len(names) - 1:
                    out.add(op.meta["unit"])
        return sorted(out)

    # -- discrete choices ------------------------------------------------------------------
    def choice_space(self, graph):
        """``{decision: (choice, ...)}``, the original last in each."""
        return {p: tuple(names) for _, _, mix in gate_ops(graph) for p, names in zip(mix.params, mix.names)}

    def original_architecture(self, graph):
        """Every decision at its original choice (the last)."""
        return {p: names[-1] for p, names in self.choice_space(graph).items()}

    def set_architecture(self, graph, architecture):
        """α exactly one-hot at ``architecture`` after softmax (every gate draws it; argmax is it)."""
        set_alphas(graph, architecture)

    def derive_passes(self):
        """:class:`DeriveCandidates`, then :class:`Prune`."""
        return [DeriveCandidates(margin=self.options.derive_margin), Prune()]

    # -- inspecting ------------------------------------------------------------------------
    def searchable(self, graph):
        """``{edge id: {"choices": (...), "why": reason}}`` for the edges CandidateOps would gate."""
        o = self.options
        out: dict[str, dict] = {}
        for u in plan_units(graph, o.kernels, o.activations, o.scope):
            names = tuple(n for _, ns in factor_choices(u, o.combine) for n in ns)
            entry = out.setdefault(u.edge, {"choices": (), "why": f"conv {u.kernel}x{u.kernel} "
                                            f"(stage {u.stage + 1} of {u.stages})"})
            entry["choices"] = entry["choices"] + names
        return out

    def candidates(self, graph):
        """How many convolutions get kernel and activation candidates, and in how many stages."""
        o = self.options
        units = plan_units(graph, o.kernels, o.activations, o.scope)
        kernels = sum(len(u.kernels) > 1 for u in units)
        acts = sum(len(u.acts) > 1 for u in units)
        stages = Counter(u.stage for u in units)
        return (f"{len(units)} gated convolutions in {len(stages)} stage(s) (scope {o.scope}): {kernels} choose a "
                f"kernel size, {acts} an activation")
