"""DNAT: every edge chooses none, identity or its original operations (Kim & Lee).

The search space is :class:`archir.passes.EdgeChoice` (θ per edge or per cell-sharing group, the
normalised mixture o_e(x) = (θ_id·x + θ_same·o(x)) / Σθ, exactly the original network at
θ = (0, 0, 1)); after every θ step θ is projected onto θ ≥ 0; deriving takes each edge's argmax
(:class:`~archir.passes.Derive`), drops none edges and dead code (:class:`~archir.passes.Prune`)
and folds identities (:class:`~archir.passes.FoldIdentities`).
"""
from __future__ import annotations

from dataclasses import dataclass

from archir.options import option
from archir.passes.derive import Derive, FoldIdentities, Prune
from archir.passes.edge_choice import EdgeChoice, arch_parameters, edge_weights, project_thetas, valid_choices

from . import Method, register


@dataclass
class DNATOptions:
    share: str = option("cell", "cell: repeated blocks share architecture weights; full: one per edge.",
                        choices=("cell", "full"))
    fuse: bool = option(True, "Fold the weight of 'same' into a closing BatchNorm (same function, faster).",
                        cli=False)


@register
class DNAT(Method):
    """DNAT as a :class:`Method`: θ-weighted none / identity / same choice per edge, argmax derive."""

    name = "dnat"
    summary = "every edge chooses none / identity / its original operations (θ per edge or per cell)"
    Options = DNATOptions

    def search_passes(self):
        """One :class:`EdgeChoice` pass with the ``share`` and ``fuse`` options."""
        return [EdgeChoice(self.options.share, fuse=self.options.fuse)]

    def arch_parameters(self, graph):
        """The θ parameters (3 slots: none, identity, same) that EdgeChoice added to ``graph.root``."""
        return arch_parameters(graph)

    def after_arch_step(self, graph):
        """Project every θ onto θ ≥ 0."""
        project_thetas(graph)  # θ ≥ 0: the folded BatchNorm and the mixture need it

    def arch_weights(self, graph):
        """Per choice edge, θ normalised over its valid choices (θ_k / Σθ)."""
        return edge_weights(graph)

    def derive_passes(self):
        """Argmax (:class:`Derive`), then :class:`Prune`, then :class:`FoldIdentities`."""
        return [Derive(), Prune(), FoldIdentities()]

    def candidates(self, graph):
        """How many edges could become identity and how many could become none."""
        choices = [valid_choices(graph, e) for e in graph.edges.values()]
        identity = sum("identity" in c for c in choices)
        none = sum("none" in c for c in choices)
        return f"{identity} edges could become identity, {none} could become none"
