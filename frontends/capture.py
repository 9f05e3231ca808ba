"""From an ``nn.Module`` to a flat ``torch.fx.Graph`` over the module's own attributes.

Two tracers, tried in order:

1. ``torch.fx`` symbolic tracing, with torch.nn's modules (Conv, Linear, BatchNorm, ...) kept as
   leaf calls. Fast, and the graph names the user's modules directly.
2. ``torch.export`` (non-strict) on the example inputs, for code symbolic tracing cannot follow
   (branches on shapes, for instance). Its ATen-level graph is brought back to the level of (1):
   every call of a torch.nn leaf module becomes one ``call_module`` node again. This keeps the link
   to the user's module and parameter names, and makes BatchNorm and Dropout follow ``.train()`` /
   ``.eval()`` (an exported graph otherwise fixes their mode at export time).

Under both, functional dropout that reads ``self.training`` is made to follow the mode too
(:mod:`.mode_dropout`).

When both fail, :class:`~archir.errors.TraceError` names the file and line of the user's code
where tracing stopped.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import traceback
import warnings
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from archir.errors import TraceError
from archir.ir import fetch_attr
from archir.layers import STANDALONE_CLASSES

from .mode_dropout import dropout_to_modules, trace_following_modes
from .opaque_methods import is_method_key, method_keys
from .value_trace import value_trace


def is_torch_leaf(module: nn.Module) -> bool:
    """torch.fx's default leaf rule (a torch.nn module that is not a container), plus archir's
    own layers (``archir.layers``), which must keep following ``.train()``/``.eval()``."""
    if isinstance(module, STANDALONE_CLASSES):
        return True
    mod = type(module).__module__
    return (mod.startswith("torch.nn") or mod.startswith("torch.ao.nn")) and not isinstance(
        module, (nn.Sequential, nn.ModuleList, nn.ModuleDict))


class _LeafTracer(fx.Tracer):
    def __init__(self, extra_leaves: Iterable[str] = ()):
        super().__init__()
        self.extra_leaves = set(extra_leaves)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.extra_leaves or is_torch_leaf(m)


@contextlib.contextmanager
def state_kept(root: nn.Module):
    """Put back every module's mode and every buffer of ``root`` afterwards (a training-mode run
    updates running statistics)."""
    modes = {m: m.training for m in root.modules()}
    saved = [(b, b.clone()) for b in root.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)
        for m, training in modes.items():
            m.training = training


def fx_trace(root: nn.Module, leaves: Iterable[str] = (), inputs: Sequence | None = None,
             with_values: bool = False) -> fx.Graph:
    """Symbolically trace ``root`` (its tensor constants are registered on ``root`` itself).

    With ``inputs`` (the positional arguments of a call), an argument that is a list, tuple or
    dict of tensors becomes one placeholder per tensor, and the parameters of ``forward`` after
    the given ones that have a default (timm's ``forward(x, attn_mask=None)``) are traced at that
    default, as such a call would see them, instead of becoming inputs. The graph's placeholders
    are the tensors of ``inputs`` in ``pytree`` order; it has fx's plain code generator.
    ``with_values``: trace with :class:`.value_trace.ValueTracer` (needs ``inputs``), which lets
    the model's code ask for the length of lists, tuples and sizes.
    """
    n_inputs = None if inputs is None else len(inputs)
    concrete = _defaults_after(root, n_inputs) if n_inputs is not None else {}
    structured = _structured_args(root, inputs) if inputs is not None else {}
    if with_values:
        # tracing with values runs the model: in training mode that would move BatchNorm's
        # running statistics, and the next trace (the other mode's) and the checks would start
        # from another state than the model's
        extra = {p for p in leaves if not is_method_key(p)}
        with state_kept(root):
            graph = value_trace(root, lambda path, m: path in extra or is_torch_leaf(m), {**concrete, **structured},
                                pytree.tree_leaves(tuple(inputs)), [p for p in leaves if is_method_key(p)])
    else:
        graph = _LeafTracer(leaves).trace(root, concrete_args={**concrete, **structured} or None)
    if isinstance(graph._codegen, fx.graph._PyTreeCodeGen):
        _plain_codegen(graph)
    n_flat = len(pytree.tree_leaves(tuple(inputs))) if inputs is not None else 0
    for ph in [n for n in graph.nodes if n.op == "placeholder"][n_flat:] if concrete else []:
        # fx keeps a placeholder for each specialised value and guards it (``_assert_is_none``,
        # ``_assert(eq(...))``); the values are fixed here, so the guards go with the placeholder
        order = {n: i for i, n in enumerate(graph.nodes)}
        below, stack = set(), [ph]
        while stack:
            n = stack.pop()
            if n not in below:
                below.add(n)
                stack.extend(n.users)
        if not any(n.op == "output" for n in below):
            for n in sorted(below, key=order.get, reverse=True):
                graph.erase_node(n)
    return graph


def _structured_args(root: nn.Module, inputs: Sequence) -> dict:
    """fx's ``concrete_args`` for the arguments that are containers of tensors: the same
    structure with a placeholder marker for each tensor."""
    import inspect

    from torch.fx._symbolic_trace import PH

    if all(isinstance(x, torch.Tensor) for x in inputs):
        return {}
    params = [p for p in inspect.signature(root.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(params) < len(inputs):
        raise TypeError(f"{type(root).__name__}.forward takes {len(params)} positional arguments, "
                        f"{len(inputs)} example inputs given")
    return {p.name: pytree.tree_map(lambda _: PH, x)
            for p, x in zip(params, inputs) if not isinstance(x, torch.Tensor)}


def _plain_codegen(graph: fx.Graph) -> None:
    """Turn a graph traced with container arguments (fx's pytree code generator: flat
    placeholders, a flat output list) into a plain one over the same flat placeholders."""
    out_spec = graph._codegen.pytree_info.out_spec
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    if out_spec is not None:
        output.args = (pytree.tree_unflatten(list(output.args[0]), out_spec),)
    graph._codegen = fx.graph.CodeGen()


def fx_trace_following_modes(root: nn.Module, inputs: Sequence, leaves: Iterable[str] = (),
                             with_values: bool = False) -> fx.Graph:
    """:func:`fx_trace`, with the functional dropout of modules that read ``self.training``
    marked to follow the mode (:func:`.mode_dropout.trace_following_modes`; symbolic tracing
    reads the flag at trace time). Such models are traced a second time, their readers in the
    other mode; the tensor constants each trace stores on ``root`` are those of the graph kept."""
    extra = set(leaves)

    def is_leaf(path: str, m: nn.Module) -> bool:
        return path in extra or is_torch_leaf(m)

    before = set(vars(root))
    constants: dict[int, dict] = {}  # per graph: the attributes its trace added to ``root``

    def trace() -> fx.Graph:
        for name in set(vars(root)) - before:
            delattr(root, name)  # an earlier trace's: this one names its own from 0 again
        graph = fx_trace(root, leaves, inputs, with_values)
        constants[id(graph)] = {name: vars(root)[name] for name in set(vars(root)) - before}
        return graph

    graph = trace_following_modes(root, tuple(inputs), is_leaf, trace, as_is=trace())
    for name in set(vars(root)) - before:
        delattr(root, name)
    for name, value in constants[id(graph)].items():
        setattr(root, name, value)
    return graph


def _defaults_after(root: nn.Module, n_inputs: int) -> dict:
    import inspect

    try:
        params = list(inspect.signature(root.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params[n_inputs:]
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is not p.empty}


def export_trace(root: nn.Module, example_inputs: Sequence[torch.Tensor],
                 leaves: Iterable[str] = ()) -> tuple[fx.Graph, object]:
    """Trace with non-strict ``torch.export`` and collapse leaf-module calls.

    Returns the graph (targets are qualified names in ``root``) and the output pytree spec.
    A dynamic batch dimension is asked for first; if the model pins it, a static export follows.
    Where modules read ``self.training``, the model is exported in both modes to find their
    dropout (:func:`.mode_dropout.trace_following_modes`).
    """
    extra = set(leaves)

    def is_leaf(path: str, m: nn.Module) -> bool:
        return path in extra or is_torch_leaf(m)

    register_output_objects(root, example_inputs)
    leaf_calls: dict[int, dict[str, bool]] = {}  # per exported module: see _leaf_calls

    def export() -> fx.GraphModule:
        with _quiet_torch(), _leaf_calls(root, is_leaf) as simple, _dropout_visible(root, is_leaf):
            gm = _export(root, tuple(example_inputs)).module()
        leaf_calls[id(gm)] = simple
        return gm

    gm = trace_following_modes(root, tuple(example_inputs), is_leaf, export)  # exports once or more (see there)
    simple = leaf_calls[id(gm)]
    out_spec = gm.graph._codegen.pytree_info.out_spec if hasattr(gm.graph._codegen, "pytree_info") else None
    graph = fx.Graph()  # detached from the exported module: targets are resolved on ``root``
    out, _ = graph.graph_copy(gm.graph, {}, return_output_node=True)
    graph.output(out)
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target.startswith("_guards"):
            graph.erase_node(node)
        elif node.op == "call_function" and node.target in (torch.ops.aten.view.default,
                                                             torch.ops.aten._unsafe_view.default):
            # export lowers ``reshape`` to ``view`` where the fake tensor's strides allowed it,
            # but a kernel may lay its result out differently at run time (Hugging Face T5:
            # SDPA's output, transposed, then reshaped). The graph is functional, so ``reshape``
            # (a view wherever ``view`` works, else a copy) computes the same values. Likewise
            # ``_unsafe_view`` (reshape after a copy, timm SAM-ViT), which no ONNX exporter maps.
            node.target = torch.ops.aten.reshape.default
    _adopt_constants(graph, gm, root)
    _drop_buffer_writebacks(graph)
    _collapse_leaf_calls(graph, root, is_leaf, simple)
    dropout_to_modules(graph, root)
    _remove_unused(graph)
    return graph, out_spec


# Classes registered here as pytree nodes (flattened through their ``__dict__``); their
# instances come out of a traced graph as plain dicts (see :func:`plain_unflatten`).
OBJECT_NODES: set[type] = set()
_LEAF_TYPES = (torch.Tensor, int, float, bool, complex, str, bytes, type(None), torch.dtype, torch.device)


def _holds_tensors(value, depth: int = 0) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if depth > 8 or isinstance(value, _LEAF_TYPES):
        return False
    if isinstance(value, dict):
        return any(_holds_tensors(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_tensors(v, depth + 1) for v in value)
    return hasattr(value, "__dict__") and any(_holds_tensors(v, depth + 1) for v in vars(value).values())


def _object_flatten(obj):
    """Children: the attributes that hold tensors, in ``__dict__`` order; context: the class,
    their names, and the other attributes (kept as they are)."""
    names = [k for k, v in vars(obj).items() if _holds_tensors(v)]
    rest = {k: v for k, v in vars(obj).items() if k not in names}
    return [getattr(obj, k) for k in names], (type(obj), tuple(names), rest)


def _object_unflatten(children, context):
    cls, names, rest = context
    obj = cls.__new__(cls)
    obj.__dict__.update(rest)
    obj.__dict__.update(zip(names, children))
    return obj


def register_output_objects(root: nn.Module, example_inputs: Sequence[torch.Tensor]) -> None:
    """Let torch.export return objects of classes it does not know (Hugging Face's
    ``DynamicCache`` and its layers), which it otherwise refuses ("Found <class ...> in output,
    which is not a known type"). The model runs once; every class in its output (nested in
    containers or attributes) that holds tensors and is not a pytree node already is registered
    as one, flattened through the attributes that hold tensors.

    Registration is process-wide, as ``transformers.exporters`` does for the same classes; it
    changes nothing for code that never flattens such objects."""
    saved = [(b, b.clone()) for b in root.buffers()]  # a training-mode run updates BatchNorm's
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):  # and draws random numbers
            out = root(*example_inputs)
    except Exception:  # noqa: BLE001 - the export attempt reports the model's own error
        return
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)

    def visit(value, depth=0):
        if depth > 8 or isinstance(value, _LEAF_TYPES):
            return
        if isinstance(value, dict):
            children = list(value.values())
        elif isinstance(value, (list, tuple)):
            children = list(value)
        elif hasattr(value, "__dict__") and _holds_tensors(value):
            cls = type(value)
            if cls not in pytree.SUPPORTED_NODES:
                pytree.register_pytree_node(cls, _object_flatten, _object_unflatten,
                                            serialized_type_name=f"archir.{cls.__module__}.{cls.__qualname__}")
                OBJECT_NODES.add(cls)
            children = [v for v in vars(value).values()]
        else:
            return
        for c in children:
            visit(c, depth + 1)

    visit(out)


def plain_unflatten(leaves: list, spec):
    """``tree_unflatten`` in which every object of a class from :data:`OBJECT_NODES` becomes a
    plain dict ``{attribute: value}`` (a traced graph returns values torch can hold, and a
    standalone model.py cannot import the model's library to rebuild its classes)."""
    it = iter(leaves)

    def build(s):
        if s.is_leaf():
            return next(it)
        children = [build(c) for c in s.children()]
        if s.type in OBJECT_NODES:
            return dict(zip(s.context[1], children))
        return pytree.SUPPORTED_NODES[s.type].unflatten_fn(children, s.context)

    return build(spec)


def _export(root: nn.Module, args: tuple):
    from torch.export import Dim

    try:
        dyn = pytree.tree_map(lambda x: {0: Dim.AUTO} if x.dim() > 0 else None, args)
        ep = torch.export.export(root, args, strict=False, dynamic_shapes=dyn)
    except Exception:  # noqa: BLE001 - fall back to a static export, re-raising its own error
        ep = torch.export.export(root, args, strict=False)
    # functionalization turns in-place updates of views (x[:, 0] = v) into scatter ops
    return ep.run_decompositions({})


@contextlib.contextmanager
def _dropout_visible(root: nn.Module, is_leaf):
    """Dropout and stochastic-depth leaf modules in training mode while exporting: in eval mode
    their call is the identity and leaves no operation behind, so the exported graph would not
    drop anything when the traced model is trained. In training mode the call leaves its random
    operations, which :func:`_collapse_leaf_calls` turns back into the module (following
    ``.train()``/``.eval()``)."""
    from archir.layers import StochasticDepth

    random_layers = (nn.modules.dropout._DropoutNd, StochasticDepth)
    changed = [m for p, m in root.named_modules()
               if p and isinstance(m, random_layers) and not m.training and is_leaf(p, m)]
    for m in changed:
        m.train()
    try:
        yield
    finally:
        for m in changed:
            m.eval()


@contextlib.contextmanager
def _quiet_torch():
    """torch.export logs warnings about user code on failure; archir reports errors itself."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _remove_unused(graph: fx.Graph) -> None:
    for node in reversed(list(graph.nodes)):
        if node.op not in ("placeholder", "output") and not node.users:
            graph.erase_node(node)


def _drop_buffer_writebacks(graph: fx.Graph) -> None:
    """``copy_(running_mean, new)``: the leaf module updates its own buffers when called."""
    for node in list(graph.nodes):
        if node.op == "call_function" and getattr(node.target, "__name__", "").startswith("copy_") \
                and node.args and isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr" \
                and not node.users:
            graph.erase_node(node)


def _adopt_constants(graph: fx.Graph, gm: nn.Module, root: nn.Module) -> None:
    """Constants that export lifted (``lifted_tensor_0``) live on its module, not on ``root``:
    move them onto ``root`` as non-persistent buffers."""
    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        try:
            fetch_attr(root, node.target)
            continue
        except AttributeError:
            pass
        value = fetch_attr(gm, node.target)
        name = "_archir_const_" + node.target.replace(".", "_")
        value = value.detach().clone() if isinstance(value, torch.Tensor) else value
        root.register_buffer(name, value, persistent=False)
        gm.register_buffer(name, value, persistent=False)
        node.target = name


def _leaf_of(node: fx.Node, root: nn.Module, is_leaf) -> tuple[str, str] | None:
    """(stack key, module path) of the outermost leaf module on the node's module stack."""
    stack = node.meta.get("nn_module_stack") or {}
    for key, (path, _cls) in stack.items():
        if not path:
            continue
        try:
            mod = root.get_submodule(path)
        except AttributeError:
            continue
        if is_leaf(path, mod):
            return key, path
    return None


def _is_tensor_node(n: fx.Node) -> bool:
    return isinstance(n.meta.get("val"), torch.Tensor)


@contextlib.contextmanager
def _leaf_calls(root: nn.Module, is_leaf):
    """While exporting, record how each leaf module is called: yields ``{path: simple}``, where
    ``simple`` is True when every call of the module took one tensor (no other arguments,
    positional or keyword) and returned one tensor, the only calls :func:`_collapse_leaf_calls` can rebuild as
    ``call_module(path, (x,))``. (An ``nn.LSTM`` returns ``(out, (h, c))`` and an
    ``nn.MultiheadAttention`` takes three tensors: their ATen operations stay as they are.)
    The hooks only look at Python types, so they add nothing to the exported graph."""
    simple: dict[str, bool] = {}
    handles = []

    def make_hook(path: str):
        def hook(_mod, args, kwargs, output):
            given = [*args, *kwargs.values()]  # ``conv(input=x)`` too: rebuilt as ``conv(x)``
            ok = len(given) == 1 and isinstance(given[0], torch.Tensor) and isinstance(output, torch.Tensor)
            simple[path] = simple.get(path, True) and ok
        return hook

    try:
        for path, mod in root.named_modules():
            if path and is_leaf(path, mod):
                handles.append(mod.register_forward_hook(make_hook(path), with_kwargs=True))
        yield simple
    finally:
        for h in handles:
            h.remove()


def _collapse_leaf_calls(graph: fx.Graph, root: nn.Module, is_leaf, simple: dict[str, bool] | None = None
                         ) -> None:
    """Replace the ATen nodes of each single-input, single-output leaf call by ``call_module``.

    ``simple`` (from :func:`_leaf_calls`): leaves not marked True there are left as ATen
    operations (their parameters are read with ``get_attr``, so they still count and train)."""
    runs: list[tuple[str, list[fx.Node]]] = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        leaf = _leaf_of(node, root, is_leaf)
        if leaf is None:
            continue
        key, path = leaf
        if simple is not None and not simple.get(path, False):
            continue
        if runs and runs[-1][0] == key and runs[-1][1][-1].next is node:
            runs[-1][1].append(node)
        else:
            runs.append((key, [node]))
        runs[-1] = (key, runs[-1][1])
        node.meta["_archir_leaf_path"] = path
    for key, nodes in runs:
        members = set(nodes)
        inputs: list[fx.Node] = []
        for n in nodes:
            for a in n.all_input_nodes:
                if a not in members and a.op != "get_attr" and _is_tensor_node(a) and a not in inputs:
                    inputs.append(a)
        used_outside = [n for n in nodes if any(u not in members for u in n.users)]
        if len(inputs) != 1 or len(used_outside) != 1:
            continue
        path = nodes[0].meta["_archir_leaf_path"]
        result = used_outside[0]
        with graph.inserting_after(nodes[-1]):
            call = graph.call_module(path, (inputs[0],))
        call.meta = dict(result.meta)
        call.meta["nn_module_stack"] = result.meta.get("nn_module_stack", {})
        result.replace_all_uses_with(call)
        for n in reversed(nodes):
            if not n.users:
                graph.erase_node(n)


# ---------------------------------------------------------------------------------------------
# Where did tracing stop?

_LIB_DIRS = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (torch, fx))


def _is_library_frame(filename: str) -> bool:
    if filename.startswith("<"):
        return True
    path = os.path.abspath(filename)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    archir_dirs = (os.path.join(here, d) + os.sep for d in ("archir", "frontends", "passes", "backends"))
    return path.startswith(_LIB_DIRS) or any(path.startswith(d) for d in archir_dirs) or \
        f"{os.sep}site-packages{os.sep}" in path and f"{os.sep}torch{os.sep}" in path


def user_location(exc: BaseException) -> str | None:
    """``file:line`` of the innermost frame of user code in ``exc``'s traceback (or its causes)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        for frame in reversed(traceback.extract_tb(exc.__traceback__)):
            if not _is_library_frame(frame.filename):
                return f"{frame.filename}:{frame.lineno}"
        exc = exc.__cause__ or exc.__context__
    return None


def caller_location() -> str | None:
    """``file:line: source`` of the innermost frame of user code on the current stack."""
    for frame in reversed(traceback.extract_stack()):
        if not _is_library_frame(frame.filename):
            return f"{frame.filename}:{frame.lineno}" + (f" ({frame.line.strip()})" if frame.line else "")
    return None


def _frames_on_stack(exc: BaseException) -> Iterator[list[tuple[Any, str]]]:
    """For ``exc`` and the exceptions it was raised from or during: the ``(self, function name)``
    of each frame of its traceback, innermost first."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        tb, frames = exc.__traceback__, []
        while tb is not None:
            frames.append((tb.tb_frame.f_locals.get("self"), tb.tb_frame.f_code.co_name))
            tb = tb.tb_next
        yield frames[::-1]
        exc = exc.__cause__ or exc.__context__


def failing_modules(exc: BaseException, root: nn.Module) -> list[str]:
    """Qualified names of ``root``'s submodules whose code was running when ``exc`` was raised,
    innermost first (the root itself excluded).

    Both tracers run the user's ``forward`` methods on the module objects themselves, so each
    frame of the traceback whose ``self`` is a submodule of ``root`` names a module on the stack
    at the failure. The chained causes of ``exc`` are searched too.
    """
    paths = {id(m): p for p, m in root.named_modules(remove_duplicate=False) if p}
    found: list[str] = []
    for frames in _frames_on_stack(exc):
        found += [p for p in dict.fromkeys(paths[id(owner)] for owner, _ in frames
                                           if isinstance(owner, nn.Module) and id(owner) in paths)
                  if p not in found]
    return found


def failing_methods(exc: BaseException, root: nn.Module) -> list[str]:
    """The methods (other than ``forward``, ``"path:name"``) of ``root`` and its submodules whose
    code was running when ``exc`` was raised, innermost first: the calls that keeping modules
    opaque cannot reach (:mod:`.opaque_methods`)."""
    found: list[str] = []
    for frames in _frames_on_stack(exc):
        found += [k for k in method_keys(frames, root) if k not in found]
    return found


def first_line(exc: BaseException, limit: int = 160) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def children_by_size(model: nn.Module) -> list[tuple[int, str]]:
    """``[(parameters, name), ...]`` of ``model``'s children that hold parameters, largest first."""
    sizes = sorted(((sum(p.numel() for p in child.parameters()), name) for name, child in model.named_children()),
                   reverse=True)
    return [(size, name) for size, name in sizes if size]


def largest_parts(model: nn.Module, n: int = 3) -> str:
    """``"backbone (26.80M parameters), roi_heads (13.90M), rpn (593.94K)"``: the children of ``model``
    holding the most parameters, what ``--submodule`` could name."""
    from archir.ir.printer import human

    shown = children_by_size(model)[:n]
    return ", ".join(f"{name} ({human(size)}{' parameters' if i == 0 else ''})" for i, (size, name) in enumerate(shown))


def trace_failure(model_name: str, fx_exc: BaseException, export_exc: BaseException, parts: str = "") -> TraceError:
    loc = user_location(export_exc) or user_location(fx_exc)
    where = f" at {loc}" if loc else ""
    text = f"{fx_exc} {export_exc}".lower()
    if any(k in text for k in ("control flow", "data-dependent", "data dependent", "guardondatadependent")):
        hint = ("The code branches on tensor values there: compute both branches and select with "
                "torch.where, or keep that submodule opaque: --leaf-module PATH (leaf_modules=[...] in Python).")
    else:
        hint = ("Keep the submodule that fails opaque: --leaf-module PATH (leaf_modules=[...] in Python), or "
                "run with --debug for details.")
    msg = (f"cannot trace {model_name}{where}: torch.fx symbolic tracing failed ({first_line(fx_exc)}) "
           f"and torch.export failed ({first_line(export_exc)}). {hint} Where it fails in the model's own "
           "forward, search inside a part that traces: --submodule PATH (archir.search(..., submodule=PATH))"
           + (f"; its largest parts: {parts}." if parts else "."))
    return TraceError(msg, loc)
