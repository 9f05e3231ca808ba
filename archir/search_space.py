"""``archir.search`` (defined here): a method's search space as a Python object, for any training loop.

::

    s = archir.search(model, example_inputs, method="dnat", share="full")
    opt_w = torch.optim.SGD(s.weight_parameters(), lr=0.05, momentum=0.9)
    opt_a = torch.optim.Adam(s.arch_parameters(), lr=0.05)
    for x, y in loader:                       # any loop, any loss
        loss = F.cross_entropy(s.supernet(x), y)
        opt_w.zero_grad(); opt_a.zero_grad(); loss.backward()
        opt_w.step(); opt_a.step()            # the method's own step (DNAT: θ ≥ 0) runs by itself
    slim = s.derive()                         # argmax, prune, fold: a plain, smaller nn.Module
    s.emit("out/")                            # model.py + weights.pt (+ model.onnx)

What a method must do after each architecture step (:meth:`archir.methods.Method.after_arch_step`,
or :meth:`~archir.methods.Method.after_optimizer_step` given the optimiser) runs from a
``torch.optim`` step post-hook whenever an optimiser that holds any of this search's architecture
parameters steps, so a hand-written loop cannot silently skip it. ``s.arch_optimizer(lr=...)`` is
the optimiser the method wants for them (DSO-NAS: APG-NAG), Adam for a method that names none.
"""
from __future__ import annotations

import copy as _copy
import weakref
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import UserInputError
from .ir import Graph


def _as_inputs(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs:
        return tuple(example_inputs)
    raise UserInputError("example_inputs must be a tensor or a non-empty tuple of tensors, not "
                         f"{type(example_inputs).__name__}")


class Search:
    """A traced model turned into a method's search space.

    Attributes:
        method: the :class:`archir.methods.Method` (with its options).
        graph: the search space's IR (the original graph rewritten by the method's passes).
        original: the original model's IR (its own copy of the weights, untouched by training).
        supernet: the ``nn.Module`` to train; at initialisation it computes the original function.
        example_inputs: the tuple of example inputs the model was traced with.
    """

    def __init__(self, model: nn.Module, example_inputs, method, *, granularity: str = "layer",
                 leaf_modules=(), groups: dict | None = None, submodule: str | None = None):
        from archir.frontends import trace
        from archir.passes import PassManager

        if not isinstance(model, nn.Module):
            raise UserInputError(f"archir.search needs an nn.Module, not {type(model).__name__}")
        self.method = method
        # The user's model is never trained in place: trace() works on a copy of its own. With
        # ``submodule`` the whole model trains too, so that needs a copy here (no other: each copy
        # of a large model's weights counts).
        self.submodule = submodule
        self._whole: nn.Module | None = None
        if submodule is not None:  # search inside ``submodule`` only; the rest of the model runs as is
            model = _copy.deepcopy(model)
            self._whole = model
            model, example_inputs = submodule_and_inputs(model, submodule, example_inputs)
        self.example_inputs = _as_inputs(example_inputs)
        self.graph: Graph = trace(model, self.example_inputs, granularity, leaf_modules=list(leaf_modules),
                                  groups=groups)
        self.graph.verify()
        self.original: Graph = self.graph.copy(share_root=False)
        PassManager(method.search_passes())(self.graph)
        self.supernet: nn.Module = self.graph.to_module()
        if self._whole is not None:
            self._whole.set_submodule(submodule, self.supernet)
        self._arch = list(method.arch_parameters(self.graph))
        self._arch_ids = frozenset(id(p) for p in self._arch)
        self.derived_graph: Graph | None = None
        self.recorded_decisions: dict[str, dict[str, Any]] = {}
        self._install_step_hook()
        self.choice_log: dict[str, Any] | None = None
        method.on_supernet(self.graph, self.supernet)  # a method that drives the supernet (NAO's random paths)

    # -- parameters ------------------------------------------------------------------------
    def arch_parameters(self) -> list[nn.Parameter]:
        """The method's architecture parameters (θ, λ, α ...)."""
        return list(self._arch)

    @property
    def model(self) -> nn.Module:
        """What to train: the supernet, or with ``submodule`` the whole model (a copy of the user's)
        with the supernet in that submodule's place."""
        return self._whole if self._whole is not None else self.supernet

    def whole_model(self, module: nn.Module, *, copy: bool = True) -> nn.Module:
        """With ``submodule``: a copy of the whole model (its current weights) with ``module`` (e.g.
        :meth:`derive`'s slim network) in the submodule's place; without, ``module`` itself.
        ``copy=False`` puts ``module`` into :attr:`model` itself (after an in-place derive, to
        train on with the same parameter objects)."""
        if self._whole is None:
            return module
        whole = _copy.deepcopy(self._whole) if copy else self._whole
        whole.set_submodule(self.submodule, module)
        return whole

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every trainable parameter of :attr:`model` (the supernet, or the whole model with
        ``submodule``) that is not an architecture parameter."""
        seen, out = set(), []
        for p in self.model.parameters():
            if p.requires_grad and id(p) not in self._arch_ids and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    # -- the method's step -----------------------------------------------------------------
    def _install_step_hook(self) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        ref = weakref.ref(self)

        def after_step(optimizer, args, kwargs):
            search = ref()
            if search is None or not search._arch_ids:
                return
            if any(id(p) in search._arch_ids for group in optimizer.param_groups for p in group["params"]):
                search.after_arch_step(optimizer)

        handle = register_optimizer_step_post_hook(after_step)
        self._finalizer = weakref.finalize(self, handle.remove)

    def after_arch_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """The method's step after an architecture update; runs by itself after ``optimizer.step()``
        (:meth:`archir.methods.Method.after_optimizer_step`, given that optimiser)."""
        if self.derived_graph is None:
            with torch.no_grad():
                self.method.after_optimizer_step(self.graph, optimizer)

    def arch_optimizer(self, lr: float = 0.05, params=None) -> torch.optim.Optimizer:
        """The optimiser the method wants for its architecture parameters (``params``, default all
        of them) at learning rate ``lr`` (DSO-NAS: APG-NAG with its soft threshold), or Adam for a
        method that names none. Any other optimiser works too: the method's step still follows."""
        params = self.arch_parameters() if params is None else list(params)
        if not params:
            raise UserInputError(f"{self.method.name} found nothing to search in {self.graph.name} "
                                 f"({self.method.candidates(self.graph)}): there are no architecture "
                                 "parameters to optimise; train the weights alone, or try another method")
        opt = self.method.arch_optimizer(self.graph, params, lr)
        return opt if opt is not None else torch.optim.Adam(params, lr=lr)

    def close(self) -> None:
        """Remove the optimiser hook now (it also goes when the Search is garbage-collected)."""
        self._finalizer()

    def extra_loss(self) -> torch.Tensor | None:
        """The method's penalty on the architecture (None for most methods)."""
        return self.method.extra_loss(self.graph)

    # -- decisions -------------------------------------------------------------------------
    def arch_weights(self) -> dict[str, dict[str, float]]:
        """Per searchable edge, the current weight of each of its choices (after an in-place
        derive: the weights it derived from)."""
        if self.derived_graph is not None:
            return self._derived_from
        return self.method.arch_weights(self.graph)

    def decisions(self) -> dict[str, dict[str, Any]]:
        """Per searchable edge: its ``choices``, their current ``weights`` and the leading
        ``choice`` (ties go to the choice listed last, by convention the original operations).
        The derive passes may still override a choice to keep the graph valid (a sum keeps one
        operand); after :meth:`derive` the decisions it took are in ``recorded_decisions``."""
        out = {}
        for eid, weights in self.arch_weights().items():
            order = list(weights)
            best = max(order, key=lambda c: (weights[c], order.index(c)))
            out[eid] = {"choices": order, "weights": dict(weights), "choice": best}
        return out

    def choose_architecture(self, evaluator=None, *, val_data=None, calibration_data=None, task=None,
                            calibration_batches: int = 4) -> dict[str, Any] | None:
        """Let the method pick the architecture to derive (NAO searches here; most methods do
        nothing), scoring candidates with ``evaluator`` (:class:`archir.arch_eval.ArchEvaluator`) or
        one built from ``val_data`` (held-out batches), ``calibration_data`` (training batches for
        BatchNorm statistics) and ``task`` (default: classification). Call it before :meth:`derive`;
        returns the method's log (also kept in ``choice_log``), or None."""
        if evaluator is None and val_data is not None:
            from .arch_eval import ArchEvaluator

            first = next(iter(self.supernet.parameters()), None)
            evaluator = ArchEvaluator(val_data, calibration_data, task,
                                      first.device if first is not None else "cpu",
                                      calibration_batches=calibration_batches)
        # scored on the model the data is for: with ``submodule`` the whole one (the supernet inside)
        self.choice_log = self.method.choose_architecture(self.graph, self.model, evaluator)
        return self.choice_log

    # -- derive and emit -------------------------------------------------------------------
    def derive(self, *, in_place: bool = False) -> nn.Module:
        """The slim network: the method's derive passes (argmax, prune, fold) on the current
        architecture, lowered to a ``GraphModule`` with the trained weights.

        By default this works on a copy (weights copied too) and the search can go on. With
        ``in_place=True`` the search's own graph is derived and the returned module shares the
        supernet's surviving parameter objects (so an optimiser's state carries over, as the
        built-in trainer does); the search is over after that.
        """
        from archir.passes import PassManager

        if self.derived_graph is not None:
            raise UserInputError("this search was already derived in place; derive() again needs a new search")
        graph = self.graph if in_place else self.graph.copy(share_root=False)
        weights = self.arch_weights()
        decided: dict[str, dict[str, Any]] = {}

        def record(_pass, g: Graph) -> None:  # Prune drops none edges: keep what Derive decided
            for e in g.edges.values():
                if "decision" in e.labels and e.id not in decided:
                    decided[e.id] = dict(e.labels)

        PassManager(self.method.derive_passes(), instruments=[record])(graph)
        self.recorded_decisions = decided
        module = graph.to_module()
        if in_place:
            self._derived_from = weights
            self.derived_graph = graph
            self._arch_ids = frozenset()
            self.close()
        return module

    def emit(self, out_dir: str | Path, *, onnx: bool = True, module: nn.Module | None = None,
             class_name: str | None = None) -> dict[str, str]:
        """Write the derived network to ``out_dir``: ``model.py`` + ``weights.pt`` (standalone,
        needs only torch) and, with ``onnx``, ``model.onnx`` checked against ONNX Runtime.
        ``module`` defaults to :meth:`derive` now. Returns ``{file name: path}``."""
        from .output_dir import emit_model

        module = self.derive() if module is None else module
        files, _, _ = emit_model(module, Path(out_dir), self.example_inputs, onnx=onnx,
                              class_name=class_name or f"Slim{self.graph.name}",
                              header=f"Emitted by archir ({self.method.describe()}) from {self.graph.name}.")
        return files

    def __repr__(self) -> str:
        return (f"Search({self.graph.name}, method={self.method.describe()}, "
                f"{len(self.arch_weights())} searchable edges, {len(self._arch)} architecture parameters)")


def submodule_and_inputs(model: nn.Module, path: str, example_inputs) -> tuple[nn.Module, tuple]:
    """``model``'s submodule at ``path`` and the positional tensors it receives when ``model``
    runs on ``example_inputs``: what ``submodule=`` searches and traces."""
    sub = _find_submodule(model, path)
    return sub, _inputs_of(model, sub, path, _as_inputs(example_inputs))


def largest_part_that_traces(model: nn.Module, attempt: Callable[[str], Any]) -> tuple[str, Any, str] | None:
    """For a model whose own ``forward`` does not trace: ``attempt(path)`` (a trace or search
    inside the child at ``path``) on its children with parameters, largest first, until one
    neither raises :class:`TraceError` nor :class:`UserInputError` (a child called with other
    than positional tensors). Returns ``(path, what attempt returned, "4.44M of 19.41M
    parameters, 23%")``, or None when no child traces."""
    from .errors import TraceError
    from .frontends.capture import children_by_size
    from .ir.printer import human

    total = sum(p.numel() for p in model.parameters())
    for size, path in children_by_size(model):
        try:
            found = attempt(path)
        except (TraceError, UserInputError):
            continue
        return path, found, f"{human(size)} of {human(total)} parameters, {size / max(total, 1):.0%}"
    return None


def inside_part(part: str, leaf_modules, groups: dict | None) -> tuple[list[str], dict | None]:
    """The whole model's leaf paths and groups (``{name: [path, ...]}``) that lie inside ``part``,
    relative to it: what a trace of that part takes."""
    def paths(ps):
        return [p[len(part) + 1:] for p in ps if p.startswith(part + ".")]

    part_groups = {k: paths(v) for k, v in (groups or {}).items()}
    return paths(leaf_modules), {k: v for k, v in part_groups.items() if v} or None


def untraceable_reason(model: nn.Module, failure: Exception) -> str:
    """``"FasterRCNN's own forward does not trace (its inputs are not all tensors)"``."""
    from .errors import UntraceableInputs

    where = ("its inputs are not all tensors" if isinstance(failure, UntraceableInputs)
             else f"at {failure.location}" if getattr(failure, "location", None) else None)
    return f"{type(model).__name__}'s own forward does not trace" + (f" ({where})" if where else "")


def _find_submodule(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        children = ", ".join(name for name, _ in model.named_children()) or "none"
        raise UserInputError(f"submodule {path!r} is not in {type(model).__name__} (its children: "
                             f"{children}); give a dotted path as in model.named_modules()") from None


def _inputs_of(whole: nn.Module, sub: nn.Module, path: str, example_inputs: tuple) -> tuple:
    """The positional tensor arguments ``sub`` receives when ``whole`` runs on ``example_inputs``
    (eval mode, no grad, random state restored): the submodule's own example inputs."""
    from .modes import eval_mode

    calls: list[tuple] = []

    def capture(_module, args, kwargs):
        calls.append((args, kwargs))

    handle = sub.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with eval_mode(whole), torch.no_grad(), torch.random.fork_rng(devices=[]):
            whole(*example_inputs)
    except Exception as exc:
        raise UserInputError(f"running {type(whole).__name__} on the example inputs to find what "
                             f"{path!r} receives failed: {type(exc).__name__}: {exc}") from exc
    finally:
        handle.remove()
    if len(calls) != 1:
        raise UserInputError(f"submodule {path!r} ran {len(calls)} times in one forward of "
                             f"{type(whole).__name__}; archir searches a submodule that runs exactly once")
    args, kwargs = calls[0]
    if kwargs or not args or not all(isinstance(a, torch.Tensor) for a in args):
        got = [type(a).__name__ for a in args] + [f"{k}=" for k in kwargs]
        raise UserInputError(f"submodule {path!r} is called with {', '.join(got) or 'nothing'}; archir "
                             "searches a submodule called with positional tensors only")
    return tuple(a.detach().clone() for a in args)


def search(model: nn.Module, example_inputs, method: str = "dnat", *, granularity: str = "layer",
           leaf_modules=(), groups: dict | None = None, seed: int | None = None,
           submodule: str | None = None, **method_options) -> Search:
    """Trace ``model`` and build ``method``'s search space; returns a :class:`Search`.

    ``submodule``: search inside that part only (a dotted path, e.g. a detector's ``"backbone"``),
    for models whose own ``forward`` cannot be traced (detectors iterate over a list of images and
    select boxes by their values): the whole model runs once on ``example_inputs`` to find the
    tensors the submodule receives, the submodule is traced on those, and :attr:`Search.model` is
    a copy of the whole model with the supernet in its place, to train with the model's own loss.
    :meth:`Search.derive` and :meth:`Search.emit` give the submodule's slim network;
    :meth:`Search.whole_model` puts it back into the model.

    ``method_options`` are the fields of the method's options dataclass (for DNAT: ``share``).
    ``seed`` seeds every random generator first (methods that initialise randomly repeat).
    ``leaf_modules``: submodule paths kept whole (opaque) when tracing. ``groups``: explicit
    cell-sharing groups, ``{name: [module path prefix, ...]}`` (see :func:`archir.trace`).
    The user's ``model`` is not changed: the search works on a copy.
    """
    from . import methods

    if seed is not None:
        from .training import seed_everything

        seed_everything(seed)
    return Search(model, example_inputs, methods.create(method, **method_options), granularity=granularity,
                  leaf_modules=leaf_modules, groups=groups, submodule=submodule)


