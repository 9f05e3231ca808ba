"""Search methods, registered by name: the one door through which every method enters archir.

A method is one class (a subclass of :class:`Method`, decorated with :func:`register`) in one
file. It declares

* ``Options``: a dataclass of its options (fields made with :func:`archir.options.option`); the
  CLI turns each field into an ``archir transform`` flag, ``archir.search(..., **options)`` takes
  them as keywords;
* :meth:`Method.search_passes`: the passes that turn a traced graph into its search space;
* :meth:`Method.arch_parameters`: the architecture parameters those passes created;
* :meth:`Method.after_arch_step`: what must run after every optimiser step of those parameters
  (DNAT's projection θ ≥ 0; a proximal step). :class:`archir.search_space.Search` runs it from an
  optimiser hook, so a user's own loop with any ``torch.optim`` optimiser cannot skip it;
* :meth:`Method.after_optimizer_step`: the same, given the optimiser that stepped (the default
  calls ``after_arch_step``; DSO-NAS's soft threshold needs the optimiser's learning rate);
* :meth:`Method.arch_optimizer`: the optimiser the method wants for its architecture parameters
  (None, the default: the trainer's Adam; DSO-NAS: APG-NAG), used by the built-in trainer
  (``--arch-optimizer method``) and by :meth:`archir.search_space.Search.arch_optimizer`;
* ``default_options``: settings of ``archir transform`` this method suggests (DSO-NAS:
  ``arch_update="split"``), applied only where the user (or a recipe) gave none;
* :meth:`Method.extra_loss`: a penalty added to the architecture loss (None: none);
* :meth:`Method.arch_weights`: per searchable edge, the current weight of each choice (logged
  each epoch, plotted, reported);
* :meth:`Method.changed_edges`: the searchable edges no longer the original, for the per-epoch
  log (None, the default: those whose leading choice in ``arch_weights`` is not the original);
* :meth:`Method.choice_space`, :meth:`Method.original_architecture`, :meth:`Method.set_architecture`:
  the method's discrete decisions, read and fixed through one interface, so that a search strategy
  (NAO's encoder-decoder, random search) works on any method's choices; with
  :meth:`Method.forbidden_choices` (combinations no architecture may hold) and
  :meth:`Method.canonical_architecture` (one representative of equivalent architectures);
* :meth:`Method.on_supernet` and :meth:`Method.choose_architecture`: a method that drives the
  supernet itself (NAO's random paths) and picks the architecture before derive, scoring
  candidates with held-out data (:mod:`archir.arch_eval`);
* :meth:`Method.derive_passes`: the passes that fix each choice and shrink the network;
* :meth:`Method.candidates`: what ``archir inspect`` says about a plain graph for this method.

Label conventions shared with the report: a search pass labels each searchable edge with
``choices`` (comma-separated names) and ``param`` (the name of its architecture parameter, equal
for edges that share one); a derive pass labels it with ``decision``, ``changed`` and ``weights``.
Method-specific lowering goes through :func:`archir.ir.lower.register_lowering`.

Built-in methods are the modules of this package (found with ``pkgutil``, so adding a file adds
a method); other packages register theirs through the ``archir.methods`` entry-point group.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from archir.errors import UserInputError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from archir.ir import Graph
    from archir.passes import Pass

_REGISTRY: dict[str, type["Method"]] = {}
_DISCOVERED = False


@dataclass
class NoOptions:
    """A method without options."""


class Method:
    """Base class of a search method (see the module docstring for what each hook means)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for ``--help`` and the README
    Options: ClassVar[type] = NoOptions
    #: ``archir transform`` options (TransformOptions fields) this method suggests; the user's
    #: own values, and a recipe's, win over them.
    default_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()

    # -- building the search space ---------------------------------------------------------
    def search_passes(self) -> list["Pass"]:
        """The passes that turn a traced graph into this method's search space (run in order, in place)."""
        raise NotImplementedError

    def arch_parameters(self, graph: "Graph") -> list["nn.Parameter"]:
        """The architecture parameters that :meth:`search_passes` created in ``graph``."""
        raise NotImplementedError

    # -- training --------------------------------------------------------------------------
    def plan_search(self, graph: "Graph", arch_steps: int) -> None:
        """Called by the built-in trainer before training with the number of architecture steps it
        will take (0 when the search has none), for methods whose schedule depends on the run's
        length (DSO-NAS's FLOPs-budget ramp). A user's own loop need not call it. Default: nothing."""

    def after_arch_step(self, graph: "Graph") -> None:
        """Runs (under no_grad) after every optimiser step that updated the arch parameters."""

    def after_optimizer_step(self, graph: "Graph", optimizer: "torch.optim.Optimizer | None") -> None:
        """Runs (under no_grad) after ``optimizer`` stepped the arch parameters (None: called
        directly, without one). The default runs :meth:`after_arch_step`."""
        self.after_arch_step(graph)

    def arch_optimizer(self, graph: "Graph", params: list["nn.Parameter"], lr: float
                       ) -> "torch.optim.Optimizer | None":
        """The optimiser this method wants for ``params`` at learning rate ``lr``, or None (the
        default) for the caller's own (the trainer's Adam)."""
        return None

    def changed_edges(self, graph: "Graph") -> "list[str] | None":
        """Ids of the searchable edges that are no longer the original now, or None (the default)
        to take those whose leading choice in :meth:`arch_weights` is not the original."""
        return None

    def extra_loss(self, graph: "Graph") -> "torch.Tensor | None":
        """A scalar penalty added to the architecture loss, or None (the default) for none."""
        return None

    def arch_weights(self, graph: "Graph") -> dict[str, dict[str, float]]:
        """``{edge id: {choice: weight}}`` for every searchable edge (JSON-able floats)."""
        raise NotImplementedError

    # -- discrete choices (for search strategies over any method's space, e.g. NAO) -----------
    def choice_space(self, graph: "Graph") -> dict[str, tuple[str, ...]]:
        """``{decision: (choice, ...)}``: the discrete decisions of a searched ``graph`` (one per
        architecture parameter, so edges that share one share a decision) and the choices of each,
        in a fixed order. Methods without discrete choices (DSO-NAS's continuous λ) raise."""
        with_choices = sorted(n for n, c in available().items() if c.choice_space is not Method.choice_space)
        raise UserInputError(f"method {self.name!r} has no discrete choice space; use a method with choices "
                             f"({', '.join(with_choices)})")

    def original_architecture(self, graph: "Graph") -> dict[str, str]:
        """``{decision: choice}``: the architecture equal to the original network."""
        raise UserInputError(f"method {self.name!r} has no discrete choice space")

    def set_architecture(self, graph: "Graph", architecture: dict[str, str]) -> None:
        """Make the supernet of ``graph`` compute exactly the discrete ``architecture``
        (``{decision: choice}``, every decision of :meth:`choice_space`), in place, under no_grad;
        deriving afterwards gives that architecture."""
        raise UserInputError(f"method {self.name!r} has no discrete choice space")

    def forbidden_choices(self, graph: "Graph") -> list[dict[str, str]]:
        """Partial architectures ``{decision: choice}`` that no architecture may contain (DNAT: every
        operand of a sum choosing none), so that a search strategy can make them impossible by
        construction; :meth:`set_architecture` refuses them. Default: none, every combination is valid."""
        return []

    def canonical_architecture(self, graph: "Graph", architecture: dict[str, str]) -> dict[str, str]:
        """The representative of ``architecture``'s class of equivalent architectures (those that
        derive to the same network; DNAT: a decision whose edges all end in pruned dead code is
        irrelevant and set to its original choice). Default: ``architecture`` itself (no symmetries)."""
        return dict(architecture)

    # -- hooks for search strategies that own the supernet (NAO) -----------------------------
    def on_supernet(self, graph: "Graph", supernet: "nn.Module") -> None:
        """Called once when :class:`~archir.search_space.Search` has lowered ``graph`` to ``supernet``
        (NAO installs its random-path sampling here). Default: nothing."""

    def choose_architecture(self, graph: "Graph", supernet: "nn.Module",
                            evaluator: "Any | None") -> "dict[str, Any] | None":
        """Called before derive with ``supernet`` (the model to score: the supernet, or with
        ``archir.search(..., submodule=...)`` the whole model around it) and an
        :class:`archir.arch_eval.ArchEvaluator` (held-out data and
        the task's metric; None without data, e.g. ``epochs=0``): a method may pick the
        architecture to derive here. Returns a JSON-able log for the report, or None (the default:
        nothing to choose, derive decides from the architecture parameters)."""
        return None

    # -- deriving --------------------------------------------------------------------------
    def derive_passes(self) -> list["Pass"]:
        """The passes that fix each choice of a searched graph and shrink it to the plain network."""
        raise NotImplementedError

    # -- inspecting ------------------------------------------------------------------------
    def candidates(self, graph: "Graph") -> str:
        """One line for ``archir inspect``: what this method could change in ``graph``."""
        return ""

    def searchable(self, graph: "Graph") -> dict[str, dict[str, Any]]:
        """``{edge id: {"choices": (...), "why": reason}}``: the edges of a plain ``graph`` that this
        method's search space would make choices, and why; ``archir inspect`` lists them."""
        return {}

    def describe(self) -> str:
        """The method and its options, for report headers."""
        opts = ", ".join(f"{k}={v}" for k, v in vars(self.options).items())
        return f"{self.name}" + (f" ({opts})" if opts else "")


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``method=cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no name")
    known = _REGISTRY.get(cls.name)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise ValueError(f"method {cls.name!r} is already registered by {known.__module__}.{known.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Forget the method ``name`` (no error if it is not registered)."""
    _REGISTRY.pop(name, None)


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    from importlib.metadata import entry_points

    for ep in entry_points(group="archir.methods"):
        register(ep.load())


def available() -> dict[str, type[Method]]:
    """Every registered method by name (built-in ones first)."""
    _discover()
    return dict(_REGISTRY)


def get(name: str) -> type[Method]:
    """The method class registered as ``name``; raise UserInputError listing the available ones if none is."""
    methods = available()
    if name not in methods:
        raise UserInputError(f"unknown method {name!r}; available: {', '.join(sorted(methods))}")
    return methods[name]


def create(name: str, **options) -> Method:
    """The method ``name`` with ``options`` checked against its ``Options`` dataclass."""
    from archir.options import build_options

    cls = get(name)
    return cls(build_options(cls.Options, options, f"method {name}"))


__all__ = ["Method", "NoOptions", "register", "unregister", "available", "get", "create"]
