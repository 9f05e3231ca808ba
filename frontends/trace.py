"""``archir.trace``: model + example inputs -> :class:`archir.Graph`."""
from __future__ import annotations

import collections
import contextlib
import copy
import io
import logging
from typing import Callable, Iterable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from archir.errors import TraceError, UntraceableInputs, UserInputError
from archir.ir import Graph
from archir.layers import stochastic_depth_for
from archir.modes import eval_mode
from archir.task import argument_names, describe

from .build import assign_groups, build_graph
from .capture import (export_trace, failing_methods, failing_modules, first_line, fx_trace,
                      fx_trace_following_modes, is_torch_leaf, largest_parts, state_kept, trace_failure,
                      user_location)
from .mode_dropout import dropout_to_modules, mode_readers
from .mode_split import merge_modes
from .normalize import UnsafeMutation, functionalize
from .opaque_methods import split_method_key

GRANULARITIES = ("layer", "block")
MAX_AUTO_LEAVES = 64  # submodules made opaque automatically before giving up


def _as_tuple(example_inputs) -> tuple:
    """The positional arguments of one call: a tensor, or a tuple/list whose items are tensors or
    lists, tuples and dicts of tensors (a detector's list of images, a batch dict)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise UserInputError("example_inputs must be a tensor or a tuple of arguments (tensors, or lists, "
                             f"tuples and dicts of tensors), not {type(example_inputs).__name__}")
    args = tuple(example_inputs)
    for path, leaf in pytree.tree_flatten_with_path(args)[0]:
        if not isinstance(leaf, torch.Tensor) or not all(isinstance(k, (pytree.SequenceKey, pytree.MappingKey))
                                                         for k in path[1:]):
            where = f"input {path[0].idx}" + pytree.keystr(path[1:])
            what = type(leaf).__name__ if not isinstance(leaf, torch.Tensor) else "tensor inside a namedtuple or object"
            raise UntraceableInputs(f"example_inputs must hold tensors in lists, tuples and dicts only; {where} "
                                    f"is a {what}. Pass tensors (a number as a 0-d tensor), or search "
                                    "inside a part of the model that takes tensors: "
                                    "archir.search(model, inputs, submodule='backbone')")
    if not pytree.tree_leaves(args):
        raise UserInputError("example_inputs hold no tensor: give at least one tensor input")
    return args


def flat_inputs(args: tuple) -> tuple[list[torch.Tensor], list[tuple]]:
    """The tensors of ``args`` in call order, and where each one is: ``(position, key, ...)`` with
    the list/tuple indices and dict keys that reach it inside argument ``position``."""
    pairs = pytree.tree_flatten_with_path(args)[0]
    return [t for _, t in pairs], [tuple(k.idx if isinstance(k, pytree.SequenceKey) else k.key for k in path)
                                  for path, _ in pairs]


def _register_constants(root: nn.Module, graph: fx.Graph) -> None:
    """Tensor attributes that are neither parameters nor buffers become non-persistent buffers,
    so that they follow ``.to(device)`` and the verifier can find them."""
    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        owner_path, _, name = node.target.rpartition(".")
        owner = root.get_submodule(owner_path) if owner_path else root
        value = getattr(owner, name)
        if isinstance(value, torch.Tensor) and name not in owner._parameters and name not in owner._buffers:
            delattr(owner, name)
            owner.register_buffer(name, value, persistent=False)


def clone_module(model: nn.Module,
                 substitute: Callable[[nn.Module], nn.Module | None] | None = None) -> nn.Module:
    """A structural copy of ``model`` with its own parameters and buffers.

    ``substitute(m)``, when given and not None for a submodule ``m``, takes that submodule's
    place in the copy (it is not copied further).

    Same result as ``copy.deepcopy`` for what tracing needs (new module objects; new tensors;
    shared modules and tied parameters stay shared) at a fraction of its cost: deepcopy rebuilds
    every attribute of every module generically, which dominated tracing time on deep models.
    """
    memo: dict[int, object] = {}

    def tensor(t):
        if t is None:
            return None
        if id(t) not in memo:
            data = t.detach().clone()
            memo[id(t)] = nn.Parameter(data, t.requires_grad) if isinstance(t, nn.Parameter) else data
        return memo[id(t)]

    def module(m: nn.Module) -> nn.Module:
        if id(m) in memo:
            return memo[id(m)]
        if substitute is not None and (new := substitute(m)) is not None:
            memo[id(m)] = new
            return new
        new = copy.copy(m)
        memo[id(m)] = new
        new.__dict__["_parameters"] = {k: tensor(v) for k, v in m._parameters.items()}
        new.__dict__["_buffers"] = {k: tensor(v) for k, v in m._buffers.items()}
        new.__dict__["_modules"] = {k: (module(v) if v is not None else None) for k, v in m._modules.items()}
        for k, v in m.__dict__.items():
            if k in ("_parameters", "_buffers", "_modules"):
                continue
            if isinstance(v, torch.Tensor):  # plain tensor attributes (fx turns them into constants)
                new.__dict__[k] = tensor(v)
            elif type(v) in (dict, list, set, collections.OrderedDict):
                # Hooks, and caches a forward fills in (timm's attention_bias_cache): what tracing
                # stores there (fx proxies) must stay on the copy, not leak into the user's model.
                new.__dict__[k] = copy.copy(v)
        if isinstance(new, nn.RNNBase):
            # its forward reads ``_flat_weights``, a list of the parameter objects: point it at
            # the copy's own parameters (else it would run, and train, the user's tensors)
            new._init_flat_weights()
        return new

    return module(model)


def _check_runs(model: nn.Module, inputs: tuple[torch.Tensor, ...], name: str) -> None:
    """Run the model once (eval, no grad) so that a bad example input fails with a clear message."""
    try:
        with eval_mode(model), torch.no_grad():
            model(*inputs)
    except Exception as exc:  # noqa: BLE001
        shapes = ", ".join(describe(x) for x in inputs)
        raise UserInputError(f"{name} fails on the example input {shapes}: {first_line(exc)}. "
                             "Give the shape the model expects (--input-shape or example_input()).") from exc


def _traceable_copy(model: nn.Module) -> nn.Module:
    """The copy a trace works on: third-party drop-path layers become :mod:`archir.layers`
    modules, which stay modules (following ``.train()``/``.eval()``) and need only torch."""
    return clone_module(model, substitute=stochastic_depth_for)


class _AttemptWarnings(logging.Handler):
    """The mode-following dropout's warnings (:mod:`.mode_dropout`) of the tracing attempt whose
    graph is kept: tracing tries fx, export and value tracing with more and more opaque parts,
    and what an abandoned attempt warned about is no longer true."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @contextlib.contextmanager
    def deferred(self):
        logger = logging.getLogger(dropout_to_modules.__module__)
        logger.addHandler(self)
        propagate, logger.propagate = logger.propagate, False
        self.records = []
        try:
            yield
        finally:
            logger.removeHandler(self)
            logger.propagate = propagate
        for record in self.records:  # only after a kept graph: an exception skips this
            logger.handle(record)

    def new_attempt(self) -> None:
        self.records = []


_attempt_warnings = _AttemptWarnings()


def trace(model: nn.Module, example_inputs, granularity: str = "layer", *,
          leaf_modules: Iterable[str] = (), frontend: str = "auto", groups: dict | None = None) -> Graph:
    """Trace ``model`` into archir's IR.

    ``frontend``: ``"auto"`` (torch.fx, then torch.export where fx fails), ``"fx"`` or ``"export"``.
    ``leaf_modules``: qualified names of submodules to keep as single opaque operations.
    ``groups``: explicit cell-sharing groups, ``{name: [module path prefix, ...]}``, overriding the
    automatic keys of the edges under those prefixes (see :func:`archir.frontends.build.assign_groups`).
    The graph owns a deep copy of ``model``; the user's model is never changed.
    """
    if granularity not in GRANULARITIES:
        raise UserInputError(f"granularity must be one of {GRANULARITIES}, not {granularity!r}")
    if frontend not in ("auto", "fx", "export"):
        raise UserInputError(f"frontend must be 'auto', 'fx' or 'export', not {frontend!r}")
    if not isinstance(model, nn.Module):
        raise UserInputError(f"expected an nn.Module, got {type(model).__name__}")
    with _attempt_warnings.deferred():
        return _trace(model, example_inputs, granularity, leaf_modules, frontend, groups)


def _trace(model: nn.Module, example_inputs, granularity: str, leaf_modules: Iterable[str], frontend: str,
           groups: dict | None) -> Graph:
    inputs = _as_tuple(example_inputs)
    name = type(model).__name__
    root = _traceable_copy(model)
    leaves = list(leaf_modules)
    _check_leaf_paths(model, leaves)
    fx_exc = None
    graph, out_spec, used, values_traced = None, None, frontend, False
    if frontend in ("auto", "fx"):
        try:
            graph = fx_trace_following_modes(root, inputs, leaves)
            functionalize(graph, root)
            used = "fx"
        except Exception as exc:  # noqa: BLE001 - any tracer failure sends us to the fallback
            if frontend == "fx":
                raise trace_failure(name, exc, exc, largest_parts(model)) from exc
            fx_exc, graph = exc, None  # functionalize may have failed on a traced graph
            root = _traceable_copy(model)  # a failed trace may have left constants on the copy
    auto: dict[str, str] = {}
    if graph is None:
        _attempt_warnings.new_attempt()
        try:
            graph, out_spec = export_trace(root, inputs, leaves)
            functionalize(graph, root)  # in-place leaf modules (ReLU(inplace=True)) still need it
            used = "export"
        except Exception as exc:  # noqa: BLE001
            _check_runs(model, inputs, name)  # a bad example input explains the failure best
            if frontend != "auto":
                raise trace_failure(name, fx_exc or exc, exc, largest_parts(model)) from exc
            root, graph, auto = _fx_with_auto_leaves(model, name, leaves, fx_exc, exc, inputs)
            used, values_traced = "fx", True
    _register_constants(root, graph)
    dropout_to_modules(graph, root)  # fx's functional dropout marked to follow the mode (export's is done)
    if not values_traced:  # (value tracing checked both modes already)
        root, graph, out_spec, used = _graph_for_both_modes(model, root, graph, out_spec, used, inputs, leaves)
    flat, paths = flat_inputs(inputs)
    placeholders = [n.name for n in graph.nodes if n.op == "placeholder"]
    try:
        g = build_graph(root, graph, flat, granularity=granularity, name=name, frontend=used,
                        out_spec=out_spec)
    except TraceError:
        raise
    except Exception:  # noqa: BLE001 - shape recording runs the model: explain a bad input
        _check_runs(model, inputs, name)
        raise
    _record_input_paths(g, model, dict(zip(placeholders, paths)), inputs)
    g.leaves.update({p: "requested" for p in leaves})
    g.leaves.update(auto)
    if groups:
        assign_groups(g, groups)
    return g


def _check_follows_modes(model: nn.Module, root: nn.Module, graph: fx.Graph, inputs: tuple, leaves: list[str],
                         fx_exc: BaseException, export_exc: BaseException, auto: dict | None = None) -> fx.Graph:
    """Keep a graph traced with values (:mod:`.value_trace`) only where it computes what the
    model computes, bit for bit, on the example inputs in eval and in training mode: the trace
    fixed every Python condition of the model's own code at the example's answers, and
    ``self.training`` is one. Where only the other mode differs (a detector returns its losses in
    training mode), the model is traced in that mode too and the two graphs share all but their
    ends (:mod:`.mode_split`). Returns the graph; raises :class:`TraceError` saying what differs."""
    problem = _mode_problem(model, root, graph, inputs)
    if problem is not None and problem[2]:
        # the model runs in that mode but computes something else: trace each mode, and merge
        # a failure in tracing propagates: the caller keeps the submodule it happened in opaque,
        # as for a failure in the traced mode (a detector's heads sample in training mode only)
        traced = _traced_in_both_modes(root, lambda r: fx_trace(r, leaves, inputs, with_values=True))
        try:
            graph = merge_modes(root, traced[True], traced[False])
            functionalize(graph, root)
            problem = _mode_problem(model, root, graph, inputs)
        except ValueError as exc:
            problem = (problem[0], problem[1] + f"; the two modes' graphs do not merge ({exc})", False)
    if problem is not None:
        name = type(model).__name__
        err = trace_failure(name, fx_exc, export_exc, largest_parts(model))
        kept = f" with {len(auto)} submodule(s) opaque" if auto else ""
        err.args = (f"{err.args[0]} Tracing it with values{kept} got through, but {problem[1]}.",)
        raise err
    return graph


def _graph_for_both_modes(model: nn.Module, root: nn.Module, graph: fx.Graph, out_spec, used: str, inputs: tuple,
                          leaves: list[str]) -> tuple[nn.Module, fx.Graph, object, str]:
    """``(root, graph, out_spec, frontend)`` of a trace by torch.fx or torch.export, or of one
    computing the model's function in both modes.

    Both tracers read ``self.training`` once, at trace time: where a module's own code branches on
    it beyond dropout (which :mod:`.mode_dropout` makes follow the mode), the graph would compute
    the traced mode's function in the other mode too (a detector-like model's losses in eval mode,
    or its detections while training). Where any module the trace followed reads the flag, the
    graph is checked against the model in both modes (:func:`_mode_problem`); where the other mode
    computes something else, each mode is traced with values (:mod:`.value_trace`, which also
    follows glue that asks for a list's length) and their ends merged (:mod:`.mode_split`).
    Where they do not merge (an auxiliary head's modules in one mode's end), the graph is kept
    as traced and a warning says so."""
    extra = set(leaves)
    kept = (root, graph, out_spec, used)
    if not mode_readers(root, lambda path, m: path in extra or is_torch_leaf(m)):
        return kept
    problem = _mode_problem(model, root, graph, inputs, flat_output=out_spec is not None)
    if problem is None or not problem[2]:  # the same in both modes, or the model fails in the other
        return kept
    both = _traceable_copy(model)
    try:
        traced = _traced_in_both_modes(both, lambda r: fx_trace_following_modes(r, inputs, leaves, with_values=True))
        merged = merge_modes(both, traced[True], traced[False])
        functionalize(merged, both)
        _register_constants(both, merged)
        dropout_to_modules(merged, both)
        still = _mode_problem(model, both, merged, inputs)
        why = still[1] if still is not None else ""
    except Exception as exc:  # noqa: BLE001 - the traced graph stays, with the warning below
        still, why = problem, f"{problem[1]}; tracing each mode did not give one graph ({first_line(exc)})"
    if still is None:
        return both, merged, None, "fx"
    traced_mode = "training" if root.training else "eval"
    logging.getLogger(dropout_to_modules.__module__).warning(
        "%s is traced in %s mode, and its graph computes that mode's function in %s mode too: %s",
        type(model).__name__, traced_mode, "eval" if root.training else "training", why)
    return kept


def _traced_in_both_modes(root: nn.Module, trace: Callable[[nn.Module], fx.Graph]) -> dict[bool, fx.Graph]:
    """``{training: trace(root in that mode)}``, each from the same state and random numbers
    (the two graphs :func:`.mode_split.merge_modes` makes one of)."""
    with state_kept(root), torch.random.fork_rng(devices=[]):
        return {training: trace(root.train(training)) for training in (True, False)}


def _mode_problem(model: nn.Module, root: nn.Module, graph: fx.Graph, inputs: tuple,
                  flat_output: bool = False) -> tuple | None:
    """None where ``graph`` (over ``root``, flat inputs) gives the model's outputs in both modes
    (the same seed before each call), else ``(training, why, the model runs in that mode)``.
    ``flat_output``: the graph returns the output's tensors in a flat list (torch.export's)."""
    copied = fx.Graph()
    copied.output(copied.graph_copy(graph, {}))  # a GraphModule would take ownership of ``graph``
    traced = fx.GraphModule(root, copied)  # shares root's modules
    name = type(model).__name__
    for training in (root.training, not root.training):
        mode = "training" if training else "eval"
        # each mode from the same state: a training-mode run updates BatchNorm's running statistics
        with state_kept(root), torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            try:
                expected = _traceable_copy(model).train(training)(*inputs)
            except Exception as exc:  # noqa: BLE001 - the model's own failure
                return (training, f"{name} itself fails in {mode} mode on the example inputs "
                                  f"({first_line(exc)}), so the graph cannot be checked there: give the "
                                  f"example inputs it needs in {mode} mode too (a detector's: images and "
                                  "targets)", False)
            torch.manual_seed(0)
            try:
                with contextlib.redirect_stderr(io.StringIO()):  # fx prints where its code failed
                    got = traced.train(training)(*pytree.tree_leaves(inputs))
                    if flat_output:  # compare the tensors alone: the output's structure is the spec's
                        expected, got = _tensors(expected), _tensors(got)
                    same = _same_values(expected, got)
                failure = ""
            except Exception as exc:  # noqa: BLE001 - the graph's failure is the difference
                same, failure = False, f"; the graph fails: {first_line(exc)}"
            if not same:
                return (training, f"the graph traced through {name}'s own code differs from it in {mode} "
                                  f"mode (its forward depends on the mode{failure})", True)
    return None


def _tensors(value) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(value) if isinstance(x, torch.Tensor)]


def _same_values(a, b) -> bool:
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    return sa == sb and all(
        (torch.equal(x, y) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else x == y)
        for x, y in zip(la, lb))


def _record_input_paths(g: Graph, model: nn.Module, paths: dict[str, tuple], inputs: tuple) -> None:
    """Record the graph's positional arguments (:attr:`Graph.arguments`) and, on each input junction,
    the argument of ``model.forward`` it is part of and the keys that reach it there
    (:attr:`Junction.input_path`), for inputs inside lists, tuples and dicts, and the length of
    each list and tuple among them (:attr:`Graph.input_lengths`).
    ``paths``: each placeholder's ``(position, key, ...)`` (an unused one has no junction)."""
    # every argument, used or not: the lowered module takes the same positional arguments
    g.arguments = argument_names(model, 1 + max((p[0] for p in paths.values()), default=-1))

    def lengths(value, path):
        if isinstance(value, (list, tuple)):
            g.input_lengths[path] = len(value)
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
        for key, item in items:
            lengths(item, (*path, key))

    for name, value in zip(g.arguments, inputs):
        lengths(value, (name,))
    for jid in g.inputs:
        j = g.junctions[jid]
        if j.input_name not in paths:
            raise TraceError(f"internal: input {j.input_name} of the traced graph is not an example input")
        position, *keys = paths[j.input_name]
        j.input_path = (g.arguments[position], *keys)


def _check_leaf_paths(model: nn.Module, leaves: list[str]) -> None:
    """Every requested leaf is a submodule of ``model`` (a typo would silently trace it through)."""
    paths = {p for p, _ in model.named_modules() if p}
    unknown = [p for p in leaves if p not in paths]
    if unknown:
        children = ", ".join(n for n, _ in model.named_children()) or "none"
        raise UserInputError(f"leaf module {unknown[0]!r} is not in {type(model).__name__} (its children: "
                             f"{children}); give dotted paths as in model.named_modules()")


def _fx_with_auto_leaves(model: nn.Module, name: str, leaves: list[str],
                         fx_exc: BaseException, export_exc: BaseException,
                         inputs: tuple[torch.Tensor, ...]) -> tuple[nn.Module, fx.Graph, dict[str, str]]:
    """Both tracers failed on the whole model: symbolic tracing again, knowing values
    (:mod:`.value_trace`), and keeping opaque (as one ``call_module`` operation) each submodule
    that it cannot follow.

    The module to keep opaque is the innermost submodule whose code was running when tracing
    failed (a frame of the traceback whose ``self`` is that module); when keeping it opaque does
    not get past the failure, the next one out is taken. Returns the traced root, its graph and
    ``{path: reason}`` for every submodule made opaque. Raises :class:`TraceError` (naming both
    first failures) when the failure is in the root's own code or after ``MAX_AUTO_LEAVES``.
    """
    auto: dict[str, str] = {}
    export_note = f"torch.export on the whole model: {first_line(export_exc)}"
    root = _traceable_copy(model)
    _attempt_warnings.new_attempt()
    try:  # glue code that asks for lengths (a detector's) traces once values are known
        graph = fx_trace_following_modes(root, inputs, leaves, with_values=True)
        functionalize(graph, root)
        graph = _check_follows_modes(model, root, graph, inputs, leaves, fx_exc, export_exc)
        return root, graph, auto
    except TraceError:
        raise
    except Exception as value_exc:  # noqa: BLE001
        exc = value_exc  # raised on ``root``: its frames name the modules of that copy
    for _attempt in range(MAX_AUTO_LEAVES + 1):
        if isinstance(exc, UnsafeMutation):  # an in-place update of a view, found after tracing
            candidates = list(getattr(exc, "modules", []))
        else:
            candidates = failing_modules(exc, root)
        candidates = [p for p in candidates if p not in auto and p not in leaves
                      and not is_torch_leaf(root.get_submodule(p))]
        if not candidates:  # the root's methods, an opaque module's
            methods = getattr(exc, "methods", []) if isinstance(exc, UnsafeMutation) else failing_methods(exc, root)
            kept = {"", *leaves, *auto}
            candidates = [k for k in methods if split_method_key(k)[0] in kept and k not in auto]
        if not candidates or _attempt == MAX_AUTO_LEAVES:
            err = trace_failure(name, fx_exc, export_exc, largest_parts(model))
            if auto:
                err.args = (f"{err.args[0]} Keeping {len(auto)} submodule(s) opaque did not help: "
                            f"{first_line(exc)}",)
            raise err from exc
        path = candidates[0]
        for inner in [p for p in auto if p.startswith(path + ".")]:
            del auto[inner]  # inside the new opaque module: no longer a separate leaf
        loc = user_location(exc)
        auto[path] = f"torch.fx: {first_line(exc)}" + (f" at {loc}" if loc else "") + f"; {export_note}"
        root = _traceable_copy(model)  # a failed trace may have left constants on the copy
        _attempt_warnings.new_attempt()
        try:
            graph = fx_trace_following_modes(root, inputs, leaves + list(auto), with_values=True)
            functionalize(graph, root)
            graph = _check_follows_modes(model, root, graph, inputs, leaves + list(auto), fx_exc, export_exc, auto)
        except TraceError:
            raise
        except Exception as retry_exc:  # noqa: BLE001
            exc = retry_exc
            continue
        return root, graph, auto
    raise AssertionError("unreachable")
