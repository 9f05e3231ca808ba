"""Rebuilding each called submodule as a constructor call (checked against the original)."""
from __future__ import annotations

import ast
import importlib.util
import inspect

import torch
from torch import nn

from archir.ir import fetch_attr
from archir.layers import STANDALONE_CLASSES

from .base import _SIMPLE, _SKIP_ATTRS, StandaloneError


def _class_expr(cls: type) -> str | None:
    """``torch.nn.Conv2d`` for a torch class (public name preferred); None if not from torch."""
    if not (cls.__module__ == "torch" or cls.__module__.startswith("torch.")):
        return None
    if getattr(nn, cls.__name__, None) is cls:
        return f"torch.nn.{cls.__name__}"
    try:
        if fetch_attr(importlib.import_module(cls.__module__), cls.__qualname__) is cls:
            return f"{cls.__module__}.{cls.__qualname__}"
    except (ImportError, AttributeError):
        pass
    return None


def _literal(node: ast.AST | str) -> bool:
    """Whether an expression (source text or an AST node) is a Python literal."""
    try:
        ast.literal_eval(node)
        return True
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False


def _plain_attrs(mod: nn.Module) -> dict[str, str]:
    """Public attributes of simple types (what constructor arguments become), as reprs."""
    out = {}
    for k, v in vars(mod).items():
        if k.startswith("_") or k in _SKIP_ATTRS:
            continue
        simple_seq = isinstance(v, (tuple, list)) and all(isinstance(x, _SIMPLE) for x in v)
        if isinstance(v, _SIMPLE) or simple_seq:
            out[k] = repr(v)
    return out


def _tensors(mod: nn.Module) -> list[tuple]:
    params = [("param", n, tuple(p.shape), p.dtype, p.requires_grad)
              for n, p in mod.named_parameters(remove_duplicate=False)]
    bufs = [("buffer", n, tuple(b.shape), b.dtype) for n, b in mod.named_buffers(remove_duplicate=False)]
    return params + bufs


def _why_not(path: str, mod: nn.Module, why: str) -> StandaloneError:
    cls = type(mod)
    return StandaloneError(f"cannot rebuild submodule '{path}' ({cls.__module__}.{cls.__qualname__}): {why}")


def _module_expr(mod: nn.Module, path: str) -> str:
    """A constructor expression rebuilding ``mod``: each leaf is checked by building it
    (:func:`_construct`); an ``nn.Sequential`` is rebuilt from its checked children."""
    cls = type(mod)
    for sub, m in mod.named_modules():
        if m._forward_hooks or m._forward_pre_hooks or getattr(m, "_backward_hooks", None):
            where = f"its submodule '{sub}' has hooks" if sub else "it has hooks"
            raise _why_not(path, mod, f"{where}, which a rebuilt module would not run")
    qual = cls.__name__ if cls in STANDALONE_CLASSES else _class_expr(cls)
    if qual is None:
        if cls.__module__.split(".")[0] == "archir":
            why = ("it is one of archir's own search-time modules; derive the architecture "
                   "(the Derive pass) before emitting a standalone model")
        else:
            why = ("it is a user-defined class; the standalone model rebuilds only torch.nn built-ins "
                   "and never pickles user classes. Trace through it (drop it from leaf_modules) "
                   "or write it with torch.nn built-ins")
        raise _why_not(path, mod, why)
    children = list(mod.named_children())
    if cls is nn.Sequential:
        if [k for k, _ in children] == [str(i) for i in range(len(children))]:
            parts = [_module_expr(c, f"{path}.{k}") for k, c in children]
        else:
            parts = [f"{k!r}: {_module_expr(c, f'{path}.{k}')}" for k, c in children]
            return f"{qual}(collections.OrderedDict({{{', '.join(parts)}}}))"
        return f"{qual}({', '.join(parts)})"
    if children:
        # A torch.nn built-in whose constructor makes its own submodules (nn.MultiheadAttention's
        # out_proj, nn.TransformerEncoderLayer's linear1...): rebuilt by its constructor like a
        # leaf, and checked submodule by submodule (:func:`_construct`). Submodules that are not
        # torch's (a user's module assigned into it) cannot come out of the constructor.
        foreign = [(sub, m) for sub, m in mod.named_modules() if sub and _class_expr(type(m)) is None]
        if qual is None or cls in STANDALONE_CLASSES or foreign:
            detail = (f" ('{foreign[0][0]}' is a {type(foreign[0][1]).__module__}."
                      f"{type(foreign[0][1]).__qualname__})") if foreign else ""
            raise _why_not(path, mod, "it has submodules that its constructor does not make"
                           f"{detail}; only nn.Sequential is rebuilt from its children")
    # The repr reads best (it is what print(model) shows), but some reprs drop arguments
    # (AvgPool2d's ceil_mode) or are not Python (padding=same): then read the arguments back.
    candidates = [e for e in (_repr_expr(mod, qual), _signature_expr(mod, qual), _rnn_expr(mod, qual))
                  if e is not None]
    if not candidates:
        if children:
            raise _why_not(path, mod, "it has submodules, and neither its repr nor its attributes give "
                                      "the arguments of its constructor (only nn.Sequential is rebuilt "
                                      "from its children)")
        raise _why_not(path, mod, f"neither its repr {repr(mod)!r} nor its attributes give the "
                                  "arguments of its constructor")
    first_error = None
    for expr in candidates:
        try:
            return _construct(expr, path, mod)
        except StandaloneError as exc:
            first_error = first_error or exc
    raise first_error


def _repr_expr(mod: nn.Module, qual: str) -> str | None:
    """``Conv2d(3, 8, kernel_size=(3, 3), ...)``: the repr, when it is a call with literal arguments."""
    name, text = type(mod).__name__, repr(mod)
    try:
        call = ast.parse(text, mode="eval").body
    except SyntaxError:
        return None
    is_call = isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == name
    if not (is_call and all(_literal(a) for a in call.args)
            and all(k.arg and _literal(k.value) for k in call.keywords)):
        return None
    return qual + text[len(name):]


# Constructor arguments that a torch.nn class does not keep as an attribute of the same name,
# read back from what they made (the rebuilt module is checked against the original anyway).
_DERIVED_ARGS = {
    nn.MultiheadAttention: {
        "bias": lambda m: m.out_proj.bias is not None,
        "add_bias_kv": lambda m: m.bias_k is not None,
    },
}


def _signature_expr(mod: nn.Module, qual: str) -> str | None:
    """A call passing each ``__init__`` parameter the value of the instance attribute of the same
    name (torch.nn modules keep their arguments so); ``bias`` becomes whether a bias exists.
    Arguments equal to their default are left out. None when a required argument has no attribute.
    """
    try:
        params = list(inspect.signature(type(mod).__init__).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    args = []
    derived = next((d for c, d in _DERIVED_ARGS.items() if isinstance(mod, c)), {})
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in ("device", "dtype"):
            continue
        if p.name in derived:
            value = derived[p.name](mod)
        elif not hasattr(mod, p.name):
            if p.default is p.empty:
                return None
            continue
        else:
            value = getattr(mod, p.name)
        if isinstance(value, torch.Tensor) or (value is None and p.name == "bias"):
            value = value is not None
        text = repr(value)
        if not _literal(text):
            if p.default is p.empty:
                return None
            continue
        if p.default is not p.empty and isinstance(value, _SIMPLE) and type(value) is type(p.default) \
                and value == p.default:
            continue
        args.append(f"{p.name}={text}")
    return f"{qual}({', '.join(args)})"


def _rnn_expr(mod: nn.Module, qual: str) -> str | None:
    """Every argument of a recurrent layer by keyword: ``nn.RNN`` takes ``*args, **kwargs`` and
    its repr leaves out ``nonlinearity``."""
    if not isinstance(mod, nn.RNNBase):
        return None
    names = ["input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional"]
    if isinstance(mod, nn.LSTM):
        names.append("proj_size")
    if isinstance(mod, nn.RNN):
        names.append("nonlinearity")
    return f"{qual}({', '.join(f'{n}={getattr(mod, n)!r}' for n in names)})"


def _float_dtypes(mod: nn.Module) -> set[torch.dtype]:
    return {t.dtype for t in [*mod.parameters(), *mod.buffers()] if t.is_floating_point()}


def _construct(expr: str, path: str, mod: nn.Module) -> str:
    """Build ``expr`` in-process, check it matches ``mod``; return the final expression."""
    ns = {"torch": torch, "collections": __import__("collections"), "__builtins__": {},
          **{c.__name__: c for c in STANDALONE_CLASSES}}
    try:
        built = eval(expr, ns)  # noqa: S307 - our own expression of literals and torch.nn classes
    except Exception as exc:  # noqa: BLE001
        raise _why_not(path, mod, f"{expr} failed: {type(exc).__name__}: {exc}") from exc
    want, have = _float_dtypes(mod), _float_dtypes(built)
    if len(want) > 1:
        raise _why_not(path, mod, f"it mixes floating dtypes {sorted(map(str, want))}")
    if want and have and want != have:
        (dtype,) = want
        expr = f"{expr}.to({dtype})"
        built = built.to(dtype)
    problems = []
    if repr(built) != repr(mod):
        problems.append(f"repr differs ({repr(built)!r} vs {repr(mod)!r})")
    for (sub, x), (_, y) in zip(built.named_modules(), mod.named_modules()):
        a, b = _plain_attrs(x), _plain_attrs(y)
        if a != b:
            diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            where = f" of '{sub}'" if sub else ""
            problems.append(f"attributes{where} differ: "
                            + ", ".join(f"{k}={b.get(k)} (rebuilt: {a.get(k)})" for k in diff))
    ta = [t[:4] for t in _tensors(built)]
    tb = [t[:4] for t in _tensors(mod)]
    if ta != tb:
        problems.append(f"parameters/buffers differ ({ta} vs {tb})")
    if problems:
        raise _why_not(path, mod, f"rebuilding it as {expr} does not round-trip: "
                       + "; ".join(problems))
    return expr
