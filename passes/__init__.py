"""Graph passes: each rewrites an archir graph in place and reports whether it changed it.

``Pass``/``PassResult``/``PassManager`` are the infrastructure (see :mod:`archir.passes.base`);
the rest are the passes archir's methods are built from.
"""
from .base import Pass, PassError, PassManager, PassResult
from .candidate_ops import CandidateOps, DeriveCandidates
from .derive import Derive, FoldIdentities, Prune
from .densify import Densify
from .edge_choice import EdgeChoice
from .edge_scale import DeriveScale, EdgeScale, FoldScale

__all__ = ["Pass", "PassError", "PassManager", "PassResult", "EdgeChoice", "Derive", "Prune", "FoldIdentities",
           "EdgeScale", "DeriveScale", "FoldScale", "Densify", "CandidateOps", "DeriveCandidates"]
