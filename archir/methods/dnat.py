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

import torch

from archir.errors import UserInputError
from archir.options import option
from archir.passes.derive import Derive, FoldIdentities, Prune, live_edges
from archir.passes.edge_choice import (SLOTS, WHY_ACTIVATION, WHY_OTHER, WHY_PARAMETRISED, WHY_SHORTCUT,
                                       EdgeChoice, arch_parameters, edge_weights, project_thetas,
                                       searchable_choices)

from . import Method, register


def _decision_edges(graph) -> dict:
    """``{θ name: [edges]}`` of the choice edges, decisions in topological order of their first edge."""
    out: dict = {}
    for e in graph.edges_in_order():
        if len(e.ops) == 1 and e.ops[0].kind == "choice" and "param" in e.labels:
            out.setdefault(e.labels["param"], []).append(e)
    return out


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

    # -- discrete choices --------------------------------------------------------------------
    def choice_space(self, graph):
        """One decision per θ parameter (its name; edges sharing a θ share it), with the valid
        choices of its edges in ``none, identity, same`` order."""
        return {name: tuple(edges[0].labels["choices"].split(",")) for name, edges in _decision_edges(graph).items()}

    def original_architecture(self, graph):
        """Every decision at ``same`` (θ = (0, 0, 1): the original network)."""
        return {name: "same" for name in _decision_edges(graph)}

    def set_architecture(self, graph, architecture):
        """θ one-hot at each decision's choice (in both forms the mixture is then exactly that
        choice: weights (1, 0, 0), (0, 1, 0) or (0, 0, 1)), so the supernet computes what
        :class:`Derive` (argmax, no ties) then gives. Refuses unknown decisions or choices, a
        missing decision, and a forbidden combination (:meth:`forbidden_choices`)."""
        space = self.choice_space(graph)
        missing = sorted(set(space) - set(architecture))
        unknown = sorted(set(architecture) - set(space))
        if missing or unknown:
            raise UserInputError(f"architecture does not fit the choice space: missing decisions {missing}, "
                                 f"unknown decisions {unknown}")
        for name, choice in architecture.items():
            if choice not in space[name]:
                raise UserInputError(f"decision {name}: {choice!r} is not one of its choices {space[name]}")
        for bad in self.forbidden_choices(graph):
            if all(architecture[d] == c for d, c in bad.items()):
                raise UserInputError(f"architecture leaves a sum without operands: {bad}")
        thetas = graph.root.archir_theta
        with torch.no_grad():
            for name, choice in architecture.items():
                theta = thetas[name]
                theta.zero_()
                theta[SLOTS.index(choice)] = 1.0

    def forbidden_choices(self, graph):
        """For every sum whose operands are all choice edges that may become none: all of them none
        (Derive would have to keep one against its θ, so the supernet and the derived network
        would differ)."""
        out = []
        for jid, j in graph.junctions.items():
            ins = graph.in_edges(jid)
            if j.combine is None or j.combine.kind != "sum" or len(ins) < 2:
                continue
            if all("none" in e.labels.get("choices", "").split(",") for e in ins):
                bad = {e.labels["param"]: "none" for e in ins}
                if bad not in out:
                    out.append(bad)
        return out

    def canonical_architecture(self, graph, architecture):
        """``architecture`` with every decision whose edges all end in dead code set to ``same``:
        with the none edges removed, a junction is dead when no path leads from it to an output
        (nor is its size read), exactly what :class:`Prune` removes, so the choice of an edge into
        a dead junction never reaches the derived network (a residual branch's first conv when
        its second chose none)."""
        edges = _decision_edges(graph)
        removed = {e.id for name, es in edges.items() for e in es if architecture.get(name) == "none"}
        live = {j for e in live_edges(graph, removed) for j in (e.src, e.dst)}
        live |= set(graph.output_junctions()) | set(graph.size_readers())
        return {name: (choice if any(e.dst in live for e in edges[name]) else "same")
                for name, choice in architecture.items()}

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
