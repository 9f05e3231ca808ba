"""Functional dropout follows ``.train()``/``.eval()`` under both tracers.

torch.fx and torch.export both run the model's code once, so ``self.training`` is read at its
traced value. A module whose code calls ``F.dropout(x, p, training=self.training)``,
``F.scaled_dot_product_attention(..., dropout_p=p if self.training else 0.)`` (Hugging Face and
timm attention) or torchvision's ``stochastic_depth(x, p, mode, self.training)`` leaves no dropout
when traced in eval mode, and a dropout that never stops when traced in training mode. (Dropout
*modules* are leaves under fx and are handled by ``capture._dropout_visible`` under export.)

1. Readers: the modules whose own ``forward`` reads ``training`` and whose code the tracer
   follows (not leaves, nor inside one), kept if they draw random numbers in training mode (one
   eager run, :func:`dropping_readers`). Only their own flag changes, never their children's.
2. Trace twice, the readers in training mode ("on") and in eval mode ("off"), and walk both
   graphs in order (:func:`trace_following_modes`). They must be the same graph but for dropout:
   a dropout call found only in "on" (ATen ``native_dropout``/``dropout``), or a call found in
   both that drops out in "on" only (fx: ``F.dropout``'s ``training``; both tracers: attention
   whose ``dropout_p`` is 0 in "off"). Under export a copy, or the same view written otherwise,
   counts as no difference: the attention kernel that drops out lays its output out differently,
   which changes how ``reshape`` is exported. Anything else that differs (batch statistics, an
   auxiliary head) means that training changes more than dropout there: the innermost reader
   around the difference keeps its own mode (a warning says why), and the walk is repeated
   without it.
3. The "on" graph is kept; those dropout nodes are marked (``node.meta[FOLLOW]``, the calling
   module's path) and :func:`dropout_to_modules` makes each an ``nn.Dropout`` (or the
   ``nn.Dropout2d``... matching the function), a :class:`archir.layers.StochasticDepth`, or for
   attention an :class:`archir.layers.TrainingDropoutAttention`, a child of the calling module in
   its mode. Each calls the function the model's code calls, with the same arguments, so in
   training they draw the same random numbers (same seed, bit-identical outputs).
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from archir.layers import StochasticDepth, TrainingDropoutAttention

logger = logging.getLogger(__name__)

FOLLOW = "_archir_follows_mode"  # meta key: the path of the module that called the dropout
MAX_ROUNDS = 4  # readers given up one at a time before keeping every module in its own mode

_aten = torch.ops.aten
_SDPA = _aten.scaled_dot_product_attention.default
_ATTENTIONS = {_SDPA, F.scaled_dot_product_attention}  # export's ATen op, fx's function
_ATEN_DROPOUTS = {_aten.native_dropout.default, _aten.dropout.default}
# fx records the functions the model's code calls; each becomes the module of the same name
FUNCTIONAL_DROPOUTS = {F.dropout: nn.Dropout, F.dropout1d: nn.Dropout1d, F.dropout2d: nn.Dropout2d,
                       F.dropout3d: nn.Dropout3d, F.alpha_dropout: nn.AlphaDropout,
                       F.feature_alpha_dropout: nn.FeatureAlphaDropout,
                       torch.dropout: nn.Dropout, torch.alpha_dropout: nn.AlphaDropout}
# torch's own functions (what F.dropout calls) are builtins without a signature to bind
_TORCH_DROPOUT_PARAMETERS = ("input", "p", "train")
# what in a call's arguments turns its dropout on and off (the rest must match between modes)
_SWITCHES = {"attention": ("dropout_p",), "dropout": ("train", "p", "inplace"), "depth": ("train", "p")}


def mode_readers(root: nn.Module, is_leaf) -> dict[str, nn.Module]:
    """``{path: module}`` for the modules whose own ``forward`` reads ``training`` (found in its
    code's names) and that the export traces through."""
    found: dict[str, nn.Module] = {}
    leaves: list[str] = []
    for path, m in root.named_modules():
        if any(path.startswith(p + ".") for p in leaves):
            continue
        if path and is_leaf(path, m):
            leaves.append(path)
            continue
        code = getattr(inspect.unwrap(type(m).forward), "__code__", None)  # past decorators
        if code is not None and "training" in code.co_names:
            found[path] = m
    return found


def dropping_readers(root: nn.Module, readers: dict[str, nn.Module], inputs: tuple, is_leaf
                     ) -> dict[str, nn.Module]:
    """The readers that draw random numbers in training mode: one eager run (no grad, the random
    state and the buffers restored) with the readers in training, each random ATen operation
    charged to the innermost reader running (none inside a leaf: a dropout module follows the
    mode already). Much cheaper than an export, it spares the second export where training adds
    no dropout (a dropout probability of 0, a training-only branch without random numbers). A
    model that does not run so (it wants targets in training, say) is exported as it is."""
    from torch.utils._python_dispatch import TorchDispatchMode

    running: list[str | None] = []  # the modules running, innermost last (None: a leaf)
    found: set[str] = set()

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if running and running[-1] is not None and _draws(func, args, kwargs or {}):
                found.add(running[-1])
            return func(*args, **(kwargs or {}))

    def enter(path):
        return lambda _m, _args: running.append(path)  # (None: the arguments stay)

    def leave(_m, _args, _out):
        running.pop()  # (None: the output stays)

    watched = {**{p: m for p, m in root.named_modules() if p and is_leaf(p, m)}, **readers}
    handles = [h for p, m in watched.items()
               for h in (m.register_forward_pre_hook(enter(p if p in readers else None)),
                         m.register_forward_hook(leave))]
    saved = [(b, b.clone()) for b in root.buffers()]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]), _modes(readers, True), Watch():
            root(*inputs)
    except Exception as exc:  # noqa: BLE001 - the model as it is: today's export
        logger.info("functional dropout keeps the traced mode: the model does not run with %s in "
                    "training mode (%s)", _names(readers, root), (str(exc).splitlines() or [""])[0][:160])
        return {}
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)
    return {p: m for p, m in readers.items() if p in found}


def _draws(func, args: tuple, kwargs: dict) -> bool:
    """Does this ATen call draw random numbers? (Attention kernels are tagged as random for
    their ``dropout_p`` argument, even when it is 0.)"""
    if torch.Tag.nondeterministic_seeded not in getattr(func, "tags", ()):
        return False
    names = [a.name for a in func._schema.arguments]
    if "dropout_p" not in names:
        return True
    i = names.index("dropout_p")
    return (args[i] if i < len(args) else kwargs.get("dropout_p", 0.0)) != 0


@contextlib.contextmanager
def _modes(modules: dict[str, nn.Module], training: bool):
    """Set these modules' own flags (``.train()`` would also flip their BatchNorm children)."""
    saved = {p: m.training for p, m in modules.items()}
    for m in modules.values():
        m.training = training
    try:
        yield
    finally:
        for p, m in modules.items():
            m.training = saved[p]


def trace_following_modes(root: nn.Module, inputs: tuple, is_leaf, trace: Callable[[], fx.GraphModule | fx.Graph],
                          as_is: fx.GraphModule | fx.Graph | None = None) -> fx.GraphModule | fx.Graph:
    """``trace()`` (which traces ``root`` as its modules are set, with either tracer) with the
    mode-following dropout of the readers visible and marked; every module in its own mode where
    that is not safe (see the module docstring). ``as_is``: ``trace()``'s result for the model as
    it is, when the caller has it already (fx: a failing trace fails before the eager run)."""
    readers = mode_readers(root, is_leaf)
    readers = dropping_readers(root, readers, inputs, is_leaf) if readers else {}
    own = {p: m.training for p, m in readers.items()}
    done: dict[tuple, fx.GraphModule | fx.Graph] = {}
    if as_is is not None:
        done[tuple(sorted(own.items()))] = as_is

    def run(active: dict[str, nn.Module], training: bool) -> fx.GraphModule | fx.Graph:
        key = tuple(sorted((p, training if p in active else own[p]) for p in own))
        if key not in done:  # "off" is often the graph of the model as it is: trace it once
            with _modes(active, training):
                done[key] = trace()
        return done[key]

    for _ in range(MAX_ROUNDS):
        if not readers:
            break
        try:
            on, off = run(readers, True), run(readers, False)
        except Exception as exc:  # noqa: BLE001 - traced as it is below, raising its own error
            logger.warning("functional dropout keeps the traced mode: tracing with %s in the other "
                           "mode failed (%s)", _names(readers, root), (str(exc).splitlines() or [""])[0][:160])
            readers = {}
            break
        result = _walk(_graph(on), _graph(off))
        if result == []:
            break  # no dropout to follow: the model's graph as it is
        if isinstance(result, list):
            for node in result:
                node.meta[FOLLOW] = _owner(node, root)
            return on
        node, why = result
        path = _innermost(node, readers)
        if path is None:
            logger.warning("functional dropout keeps the traced mode: tracing in training mode "
                           "changes more than dropout outside the modules that read self.training (%s)", why)
            readers = {}
            break
        logger.warning("functional dropout in %s keeps the traced mode: its training mode changes "
                       "more than dropout (%s)", _names({path: None}, root), why)
        readers = {p: m for p, m in readers.items() if p != path}
    else:
        logger.warning("functional dropout keeps the traced mode in %s: still differing after %d rounds",
                       _names(readers, root), MAX_ROUNDS)
    return run({}, False)


def _graph(traced: fx.GraphModule | fx.Graph) -> fx.Graph:
    return traced.graph if isinstance(traced, fx.GraphModule) else traced


def _names(modules: dict, root: nn.Module) -> str:
    return ", ".join(f"'{p}'" if p else type(root).__name__ for p in sorted(modules))


def _role(node: fx.Node) -> str | None:
    """``"dropout"``, ``"depth"`` (stochastic depth), ``"attention"``, or None for other nodes."""
    if node.op != "call_function":
        return None
    if node.target in _ATTENTIONS:
        return "attention"
    if node.target in _ATEN_DROPOUTS or node.target in FUNCTIONAL_DROPOUTS:
        return "dropout"
    if _is_torchvision_stochastic_depth(node.target):
        return "depth"
    return None


def _is_torchvision_stochastic_depth(fn) -> bool:
    return getattr(fn, "__module__", None) == "torchvision.ops.stochastic_depth" \
        and getattr(fn, "__name__", None) == "stochastic_depth"


def _bound(node: fx.Node) -> dict:
    """A dropout or attention call's arguments by name, defaults filled in (ATen's names: the
    ``training`` of ``F.dropout`` is ``train``; fx's attention function has the ATen op's)."""
    target = _SDPA if node.target is F.scaled_dot_product_attention else node.target
    if isinstance(target, torch._ops.OpOverload):
        out = {}
        for i, a in enumerate(target._schema.arguments):
            if i < len(node.args):
                out[a.name] = node.args[i]
            elif a.name in node.kwargs:
                out[a.name] = node.kwargs[a.name]
            elif a.has_default_value():
                out[a.name] = a.default_value
        return out
    if target in (torch.dropout, torch.alpha_dropout):
        return {**dict(zip(_TORCH_DROPOUT_PARAMETERS, node.args)), **node.kwargs, "inplace": False}
    bound = inspect.signature(target).bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    out = dict(bound.arguments)
    out["train"] = out.pop("training")
    return out


def _drops(node: fx.Node) -> bool:
    """Does this dropout call (see :func:`_role`) drop out, with a probability the module can hold
    (a number, not a value computed in the graph)?"""
    b = _bound(node)
    p = b["dropout_p"] if _role(node) == "attention" else b["p"]
    on = p != 0 if _role(node) == "attention" else bool(b["train"]) and p != 0
    return on and isinstance(p, (int, float))


# Value-preserving differences: the attention kernel that runs with dropout (the math one) lays its
# output out otherwise than the fused one, so export's ``reshape`` becomes a copy then a view.
_VIEWS = {_aten.view.default, _aten._unsafe_view.default, _aten.reshape.default}
_COPIES = {_aten.clone.default}


def _kind(target):
    return _VIEWS if target in _VIEWS else target


def _same(a: fx.Node, b: fx.Node, to_off: dict, alias: dict) -> bool:
    """Same operation on corresponding inputs (``a`` from "on", ``b`` from "off")."""
    if a.op != b.op or _kind(a.target) != _kind(b.target):
        return False
    if a.target in _VIEWS and _shape(a) is not None:  # [1, -1, 16] and [1, 4, 16]: the same view
        return to_off.get(a.args[0]) == alias.get(b.args[0], b.args[0]) and _shape(a) == _shape(b)
    return _mapped(a, to_off) == _mapped(b, alias, keep=True)


def _shape(node: fx.Node) -> str | None:
    val = node.meta.get("val")
    return str(tuple(val.shape)) if isinstance(val, torch.Tensor) else None


def _mapped(node: fx.Node, to: dict, keep: bool = False):
    return fx.node.map_arg((node.args, node.kwargs), lambda n: to.get(n, n if keep else None))


def _is_new_dropout(a: fx.Node) -> bool:
    """A dropout of "on" with no counterpart in "off" (ATen's, or an fx call under ``if self.training``)."""
    if _role(a) not in ("dropout", "depth") or not _bound(a)["train"] or \
            not isinstance(_bound(a)["p"], (int, float)):
        return False
    # native_dropout returns (output, mask): only its output may be read
    return a.target is not _aten.native_dropout.default or all(
        u.target is operator.getitem and u.args[1] == 0 for u in a.users)


def _switched_off(a: fx.Node, b: fx.Node | None, to_off: dict, alias: dict) -> bool:
    """The same call, but dropping out in "on" (``a``) and not in "off" (``b``): attention whose
    ``dropout_p`` is 0 in "off", fx's ``F.dropout`` whose ``training`` is False there."""
    role = _role(a)
    if b is None or role is None or b.op != a.op or b.target is not a.target or not _drops(a) or _drops(b):
        return False
    ba, bb = _bound(a), _bound(b)
    for name in _SWITCHES[role]:
        ba.pop(name, None), bb.pop(name, None)
    return fx.node.map_arg(ba, lambda n: to_off.get(n)) == fx.node.map_arg(bb, lambda n: alias.get(n, n))


def _is_copy(node: fx.Node | None) -> bool:
    return node is not None and node.op == "call_function" and node.target in _COPIES


def _walk(on: fx.Graph, off: fx.Graph) -> list[fx.Node] | tuple[fx.Node, str]:
    """The nodes of ``on`` that are mode-following dropout, or, where the graphs differ otherwise,
    ``(node, why)`` (``node`` from either graph, for its module stack). A copy found in one graph
    only stands for its input (``to_off``: "on" node -> "off" node; ``alias``: "off" copy -> input)."""
    to_off: dict[fx.Node, fx.Node | None] = {}
    alias: dict[fx.Node, fx.Node] = {}
    follow: list[fx.Node] = []  # in order; a set beside it for lookups
    dropped: set[fx.Node] = set()
    rest = iter(off.nodes)
    b = next(rest, None)
    for a in on.nodes:
        first = a.args[0] if a.args else None
        if a.target is operator.getitem and first in dropped:
            to_off[a] = to_off[first]  # native_dropout(x)[0] stands for x in "off"
            continue
        while True:
            if b is not None and _same(a, b, to_off, alias):
                to_off[a], b = b, next(rest, None)
            elif _switched_off(a, b, to_off, alias):
                follow.append(a)
                to_off[a], b = b, next(rest, None)
            elif _is_new_dropout(a):
                to_off[a] = to_off.get(first)
                follow.append(a)
                dropped.add(a)
            elif _is_copy(a):
                to_off[a] = to_off.get(first)
            elif _is_copy(b):
                alias[b] = alias.get(b.args[0], b.args[0])
                b = next(rest, None)
                continue
            else:
                where = b if b is not None and a.op == "output" else a
                return where, f"first at {_describe(a)} in training vs {_describe(b)} in eval"
            break
    while _is_copy(b):
        b = next(rest, None)
    if b is not None:
        return b, f"eval has more operations from {_describe(b)}"
    return follow


def _describe(node: fx.Node | None) -> str:
    if node is None:
        return "the end of the graph"
    name = getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {name}"


def _stack(node: fx.Node) -> list[str]:
    """Module paths around ``node``, outermost first, the root ("") included."""
    paths = [p for p, _cls in (node.meta.get("nn_module_stack") or {}).values()]
    return [""] + [p for p in paths if p]


def _innermost(node: fx.Node, readers: dict) -> str | None:
    return next((p for p in reversed(_stack(node)) if p in readers), None)


def _owner(node: fx.Node, root: nn.Module) -> str:
    """The innermost module on the node's stack that ``root`` holds (whose mode it follows)."""
    for path in reversed(_stack(node)):
        try:
            root.get_submodule(path)
            return path
        except AttributeError:
            continue
    return ""


def dropout_to_modules(graph: fx.Graph, root: nn.Module) -> int:
    """Replace the nodes marked by :func:`trace_following_modes` (carried into ``graph`` by
    ``graph_copy``, or that very graph under fx) by calls of new child modules of their callers;
    return how many."""
    count = 0
    for node in list(graph.nodes):
        owner = node.meta.get(FOLLOW)
        if owner is None:
            continue
        module = root.get_submodule(owner)
        role, b = _role(node), _bound(node)
        results = [node]
        if role == "attention":
            layer = TrainingDropoutAttention(float(b["dropout_p"]), bool(b["is_causal"]), b["scale"],
                                             bool(b["enable_gqa"]))
            args = (b["query"], b["key"], b["value"]) + ((b["attn_mask"],) if b["attn_mask"] is not None else ())
        elif role == "depth":
            layer, args = StochasticDepth(float(b["p"]), b["mode"]), (b["input"],)
        else:
            layer, args = FUNCTIONAL_DROPOUTS.get(node.target, nn.Dropout)(float(b["p"])), (b["input"],)
            if node.target is _aten.native_dropout.default:
                results = list(node.users)
        name = _free_name(module, "_archir_attention" if role == "attention" else "_archir_dropout")
        module.add_module(name, layer.train(module.training))
        with graph.inserting_before(node):
            call = graph.call_module(f"{owner}.{name}" if owner else name, args)
        call.meta = {k: v for k, v in (results[0].meta if results else node.meta).items() if k != FOLLOW}
        for r in results:
            r.replace_all_uses_with(call)
            if r is not node:
                graph.erase_node(r)
        graph.erase_node(node)
        count += 1
    return count


def _free_name(module: nn.Module, stem: str) -> str:
    n = 0
    while hasattr(module, f"{stem}{n}"):
        n += 1
    return f"{stem}{n}"
