"""DNAT: searchable edges choose none, identity or their original operations (Kim & Lee).

The search space is :class:`archir.passes.EdgeChoice`: the paper's, by default, where the edges that
choose are those with a parametrised conv or linear layer (and the normalisation after it) and the
operand-less shortcuts into sums; activation-only and normalisation-only edges stay fixed unless
``search_activations``. θ per edge or per cell-sharing group, in one of two forms: ``normalised``
(the default, o_e(x) = (θ_id·x + θ_same·o(x)) / Σθ, θ projected onto θ ≥ 0 after every θ step) or
``linear`` (the paper's Eq. (1), θ_id·x + θ_same·o(x) with raw θ, no projection); both are exactly
the original network at θ = (0, 0, 1). Deriving takes each edge's argmax (:class:`~archir.passes.Derive`),
drops none edges and dead code (:class:`~archir.passes.Prune`) and folds identities
(:class:`~archir.passes.FoldIdentities`).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from archir.options import option
from archir.passes.derive import Derive, FoldIdentities, Prune
from archir.passes.edge_choice import (WHY_ACTIVATION, WHY_OTHER, WHY_PARAMETRISED, WHY_SHORTCUT, EdgeChoice,
                                       arch_parameters, edge_weights, project_thetas, searchable_choices)

from . import Method, register


@dataclass
class DNATOptions:
    share: str = option("cell", "cell: repeated blocks share architecture weights; full: one per edge.",
                        choices=("cell", "full"))
    fuse: bool = option(True, "Fold the weight of 'same' into a closing BatchNorm (same function, faster).",
                        cli=False)
    search_activations: bool = option(False, "Also search edges of activations or normalisations only (the "
                                      "paper searches conv/linear edges and shortcuts into sums).")
    form: str = option("normalised", "How θ mixes an edge: normalised (θ/Σθ, θ >= 0) or linear (the paper's "
                       "Eq. (1): raw θ, may go negative, no projection).", choices=("normalised", "linear"))


_SHORT = {WHY_PARAMETRISED: "parametrised", WHY_SHORTCUT: "shortcuts into sums",
          WHY_ACTIVATION: "activation/normalisation", WHY_OTHER: "other"}


@register
class DNAT(Method):
    """DNAT as a :class:`Method`: θ-weighted none / identity / same choice per edge, argmax derive."""

    name = "dnat"
    summary = "conv/linear edges and shortcuts into sums choose none / identity / their original operations"
    Options = DNATOptions

    def search_passes(self):
        """One :class:`EdgeChoice` pass with the ``share``, ``fuse``, ``search_activations`` and ``form`` options."""
        o = self.options
        return [EdgeChoice(o.share, fuse=o.fuse, search_activations=o.search_activations, form=o.form)]

    def arch_parameters(self, graph):
        """The θ parameters (3 slots: none, identity, same) that EdgeChoice added to ``graph.root``."""
        return arch_parameters(graph)

    def after_arch_step(self, graph):
        """Normalised form: project every θ onto θ ≥ 0. Linear form (Eq. (1)): nothing, θ may go negative."""
        if self.options.form == "normalised":
            project_thetas(graph)  # θ ≥ 0: the folded BatchNorm (through a ReLU) and the mixture need it

    def arch_weights(self, graph):
        """Per choice edge, θ normalised over its valid choices (θ_k / Σθ), or the raw θ in the linear form."""
        return edge_weights(graph)

    def derive_passes(self):
        """Argmax (:class:`Derive`), then :class:`Prune`, then :class:`FoldIdentities`."""
        return [Derive(), Prune(), FoldIdentities()]

    def searchable(self, graph) -> dict[str, dict[str, object]]:
        """``{edge id: {"choices": (...), "why": reason}}`` for every edge of a plain ``graph`` that
        would become a choice, in topological order."""
        out = {}
        for e in graph.edges_in_order():
            choices, why = searchable_choices(graph, e, self.options.search_activations)
            if len(choices) >= 2:
                out[e.id] = {"choices": choices, "why": why}
        return out

    def candidates(self, graph):
        """How many edges are searchable and why, how many could become identity and how many none."""
        found = self.searchable(graph)
        reasons = Counter(v["why"] for v in found.values())
        why = ", ".join(f"{reasons[r]} {_SHORT[r]}" for r in _SHORT if reasons[r])
        identity = sum("identity" in v["choices"] for v in found.values())
        none = sum("none" in v["choices"] for v in found.values())
        return (f"{len(found)} searchable edges" + (f" ({why})" if why else "")
                + f": {identity} could become identity, {none} could become none")
