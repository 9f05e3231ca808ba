"""Standalone slim-module backend: a ``torch.fx.GraphModule`` -> ``model.py`` + ``weights.pt``.

The emitted ``model.py`` is readable Python that imports nothing but ``torch`` and the standard
library. It defines ``class <class_name>(torch.nn.Module)`` with

* an ``__init__`` that builds every submodule the graph calls, under a flat attribute name
  (``layer1.0.conv1`` -> ``self.layer1_0_conv1``), and registers every parameter/buffer the graph
  reads with ``get_attr`` (right shape, dtype and ``requires_grad``; values come from
  ``weights.pt``);
* a ``forward`` written by torch.fx's own code generator from a copy of the graph whose
  ``call_module``/``get_attr`` targets point at the flat names (fx's ``x = None`` bookkeeping
  lines are dropped);

plus ``build_model()`` and ``load_model(weights_path=None)``. ``weights.pt`` is the emitted
class's ``state_dict``, loadable with ``torch.load(path, weights_only=True)``. It is the same
idea as ``GraphModule.to_folder()``, minus the pickled modules: nothing user-defined is pickled.

How submodules are rebuilt
--------------------------
A ``torch.nn`` built-in is written as its ``repr()``, which for leaf modules is its class name and
constructor arguments (``Conv2d(3, 8, kernel_size=(3, 3), ..., bias=False)``); where the repr is
not a literal call or drops arguments (``padding=same``, ``AvgPool2d``'s ``ceil_mode``), as a call
passing each ``__init__`` parameter the instance attribute of the same name. ``nn.Sequential`` is
rebuilt from its children, and :mod:`archir.layers` classes have their source copied into the
file. Every rebuilt leaf is constructed in-process and checked against the original: same ``repr()``, same public plain attributes (``p``, ``eps``, ``inplace``...),
same parameter and buffer names, shapes and dtypes. A module that fails this (a user-defined
class, an archir search-time module, a torch module with hooks, or one with submodules other than
``nn.Sequential``) raises :class:`StandaloneError` naming its path, its type and why.

Other details
-------------
* One object, one attribute: a module or tensor reachable under several targets is built once;
  parameters tied across modules are re-tied in ``__init__`` (``self.b.weight = self.a.weight``);
  a ``get_attr`` of a called module's parameter reads it through that module (``self.fc.weight``).
* Tensors read with ``get_attr`` outside called modules become parameters or persistent buffers
  built with ``torch.zeros``; frozen parameters get ``requires_grad_(False)``. A module
  whose floating tensors are not float32 gets ``.to(dtype)``. Everything is built on the CPU.
* ``build_model()`` returns the model in the source module's train/eval mode; ``.train()`` and
  ``.eval()`` work as usual (Dropout and BatchNorm are modules).
* Both files are written atomically (``archir.fileio``); the source goes through ``compile()`` and
  is executed in-process (and its state_dict checked against the source tensors) before writing.

Globals referenced by ``forward`` must come from torch or the standard library; a small pure
function defined in archir (``archir.frontends.normalize.functional_setitem``) is inlined from
its source. Anything else raises :class:`StandaloneError`.

With ``example_inputs``, the written file is imported in-process and its outputs (eval mode,
weights loaded from ``weights.pt``) must equal the GraphModule's bit for bit (``torch.equal``).
"""
from __future__ import annotations

import ast
import builtins
import importlib.util
import inspect
import keyword
import re
import sys
import textwrap
import types
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch import nn

from archir.errors import ArchirError
from archir.fileio import save_torch, write_text
from archir.ir import fetch_attr
from archir.layers import STANDALONE_CLASSES

__all__ = ["StandaloneError", "StandaloneFiles", "emit_standalone"]


class StandaloneError(ArchirError):
    """The GraphModule cannot be written as a standalone torch-only model (or does not verify)."""


@dataclass(frozen=True)
class StandaloneFiles:
    """What :func:`emit_standalone` wrote.

    ``module_names`` maps each ``call_module``/``get_attr`` target of the GraphModule to the
    attribute path that holds it in the emitted class (``"layer1.0.conv1" -> "layer1_0_conv1"``;
    a parameter of a called module keeps its module: ``"fc.weight" -> "fc.weight"``).
    """

    model_py: Path
    weights: Path
    class_name: str
    num_parameters: int
    module_names: dict[str, str] = field(default_factory=dict)


# Module-level names model.py defines itself; a graph global may not take one of them.
_FILE_NAMES = {"torch", "build_model", "load_model", "Path"}
# Attribute names an nn.Module instance already has (``forward``, ``training``, ``_modules``...).
_MODULE_ATTRS = set(dir(nn.Module())) | {"forward"}
# torch submodules that ``import torch`` always imports: chains through them need no import line.
_IMPORTED_BY_TORCH = {"torch", "torch.nn", "torch.nn.functional", "torch.functional"}
# Module attributes that are bookkeeping, not constructor arguments.
_SKIP_ATTRS = {"training"}
_SIMPLE = (bool, int, float, str, type(None), torch.dtype, torch.device)
_INLINE_MAX_LINES = 200  # a copied helper this long still reads better than a refusal


# ---- naming ---------------------------------------------------------------------------------
def _attr_expr(base: str, path: str) -> str:
    """``self`` + ``a.0.b`` -> ``getattr(self.a, '0').b``: a Python expression for the path."""
    expr = base
    for atom in path.split(".") if path else []:
        if atom.isidentifier() and not keyword.iskeyword(atom):
            expr += "." + atom
        else:
            expr = f"getattr({expr}, {atom!r})"
    return expr


class _Names:
    """Flat, unique, valid attribute names that clash with nothing an nn.Module has."""

    def __init__(self):
        self.taken: set[str] = set()

    def flat(self, path: str) -> str:
        base = re.sub(r"\W", "_", path.replace(".", "_")) or "m"
        base = re.sub(r"^__+", "_", base)  # ``self.__x`` would be name-mangled inside the class
        if base[0].isdigit():
            base = "m_" + base
        while keyword.iskeyword(base) or base in _MODULE_ATTRS:
            base += "_"
        name, i = base, 1
        while name in self.taken:
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name


def _display_path(gm: fx.GraphModule, target: str) -> str:
    """Undo lowering's ``meta`` -> ``meta_`` renaming: flat names follow the user's own paths."""
    renamed = {new: old for old, new in getattr(gm, "archir_renamed", {}).items()}
    head, dot, rest = target.partition(".")
    return renamed.get(head, head) + dot + rest


# ---- submodules -----------------------------------------------------------------------------
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
    if mod._forward_hooks or mod._forward_pre_hooks or getattr(mod, "_backward_hooks", None):
        raise _why_not(path, mod, "it has hooks, which a rebuilt module would not run")
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
        raise _why_not(path, mod, "it has submodules, and only nn.Sequential is rebuilt from its "
                                  "children (its repr is not a constructor call)")
    # The repr reads best (it is what print(model) shows), but some reprs drop arguments
    # (AvgPool2d's ceil_mode) or are not Python (padding=same): then read the arguments back.
    candidates = [e for e in (_repr_expr(mod, qual), _signature_expr(mod, qual)) if e is not None]
    if not candidates:
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
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in ("device", "dtype"):
            continue
        if not hasattr(mod, p.name):
            if p.default is p.empty:
                return None
            continue
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


# ---- plan: what the emitted class holds ------------------------------------------------------
@dataclass
class _Plan:
    # GraphModule target -> attribute path in the emitted class
    targets: dict[str, str] = field(default_factory=dict)
    # (flat name, constructor expression, original module, user's path)
    modules: list[tuple[str, str, nn.Module, str]] = field(default_factory=list)
    # (flat name, original tensor, is a Parameter): tensors read with get_attr outside called modules
    tensors: list[tuple[str, torch.Tensor, bool]] = field(default_factory=list)
    # (flat name, literal repr): non-tensor constants read with get_attr
    constants: list[tuple[str, str]] = field(default_factory=list)
    # emitted state_dict key -> original tensor (the values weights.pt will hold)
    originals: dict[str, torch.Tensor] = field(default_factory=dict)


def _plan(gm: fx.GraphModule) -> _Plan:
    plan, names = _Plan(), _Names()
    by_id: dict[int, str] = {}  # id(object) -> emitted path (shared modules/tensors stay shared)
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    read = [n.target for n in gm.graph.nodes if n.op == "get_attr"]

    def add_module(target: str, mod: nn.Module):
        flat = names.flat(_display_path(gm, target))
        expr = _module_expr(mod, target)
        plan.modules.append((flat, expr, mod, _display_path(gm, target)))
        for sub, m in mod.named_modules(remove_duplicate=False):
            by_id.setdefault(id(m), f"{flat}.{sub}" if sub else flat)
        for key, t in mod.state_dict(keep_vars=True).items():
            plan.originals[f"{flat}.{key}"] = t
        for key, t in [*mod.named_parameters(remove_duplicate=False),
                       *mod.named_buffers(remove_duplicate=False)]:
            by_id.setdefault(id(t), f"{flat}.{key}")
        return flat

    # Called modules in graph order, except that a module inside another called module comes after
    # it and is reached through it (its parameters stay those of the outer module).
    order = list(dict.fromkeys(called))
    nested = [t for t in order if any(t.startswith(o + ".") for o in order)]
    for target in [t for t in order if t not in nested] + sorted(nested, key=lambda t: t.count(".")):
        mod = fetch_attr(gm, target)
        if not isinstance(mod, nn.Module):
            raise StandaloneError(f"call_module target '{target}' is a {type(mod).__name__}, not a module")
        plan.targets[target] = by_id[id(mod)] if id(mod) in by_id else add_module(target, mod)
    for target in dict.fromkeys(read):
        obj = fetch_attr(gm, target)
        if id(obj) in by_id:
            plan.targets[target] = by_id[id(obj)]
        elif isinstance(obj, nn.Module):
            plan.targets[target] = add_module(target, obj)
        elif isinstance(obj, torch.Tensor):
            if obj.layout != torch.strided or obj.is_quantized or obj.is_meta:
                raise StandaloneError(f"get_attr '{target}': a {obj.layout} (quantized or meta) tensor "
                                      "cannot be saved as a plain buffer")
            flat = names.flat(_display_path(gm, target))
            plan.tensors.append((flat, obj, isinstance(obj, nn.Parameter)))
            plan.originals[flat] = obj
            by_id[id(obj)] = plan.targets[target] = flat
        else:
            text = repr(obj)
            try:
                ok = ast.literal_eval(text) == obj
            except (ValueError, TypeError, SyntaxError):
                ok = False
            if not ok:
                raise StandaloneError(f"get_attr '{target}' holds a {type(obj).__name__}, which is neither "
                                      "a tensor, a torch.nn module nor a Python literal")
            flat = names.flat(_display_path(gm, target))
            plan.constants.append((flat, text))
            plan.targets[target] = flat
    return plan


# ---- forward ---------------------------------------------------------------------------------
# fx's registered builtins: the expression each stands for ("" = an import that binds the name).
_CUSTOM_BUILTINS = {
    "inf": (["import math"], "math.inf"),
    "nan": (["import math"], "math.nan"),
    "NoneType": ([], "type(None)"),
    "device": ([], "torch.device"),
    "fx_pytree": (["import torch.fx._pytree as fx_pytree"], ""),
    "pytree": (["import torch.utils._pytree as pytree"], ""),
}


@dataclass
class _Global:
    """How model.py provides one global of the generated forward."""

    imports: list[str]
    expr: str = ""  # a qualified reference (``math.sqrt``) substituted at each use
    function: ast.FunctionDef | None = None  # an inlined function definition
    where: str = ""


def _stdlib(module_name: str) -> bool:
    top = module_name.split(".")[0]
    return top in sys.stdlib_module_names and top not in ("builtins",)


def _allowed_module(module_name: str) -> bool:
    """What model.py may import: torch and the standard library."""
    return module_name.split(".")[0] == "torch" or _stdlib(module_name)


def _import_line(module_name: str, bound_as: str) -> str:
    return f"import {module_name}" if bound_as == module_name else f"import {module_name} as {bound_as}"


def _public_module(obj: Any, module_name: str) -> str:
    """``_operator`` -> ``operator`` when the public module holds the same object."""
    top, _, rest = module_name.partition(".")
    if top.startswith("_") and not rest and top[1:] in sys.stdlib_module_names:
        try:
            public = importlib.import_module(top[1:])
            if getattr(public, getattr(obj, "__name__", ""), None) is obj:
                return top[1:]
        except ImportError:
            pass
    return module_name


def _lookup(module_name: str, obj: Any) -> str | None:
    """The attribute path of ``obj`` inside ``module_name``, or None."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    qual = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if qual:
        try:
            if fetch_attr(module, qual) is obj:
                return qual
        except AttributeError:
            pass
    for k, v in vars(module).items():
        if v is obj and not k.startswith("_"):
            return k
    return None


def _code_names(code: types.CodeType) -> set[str]:
    out = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            out |= _code_names(const)
    return out


def _inline(fn: Any) -> _Global:
    """The import lines and definition of a small plain function from outside torch (archir's
    own, or a library's ``torch.fx.wrap``-ed helper) that uses only torch and the standard
    library, to be copied into model.py. The emitted model is verified numerically afterwards."""
    where = f"{fn.__module__}.{fn.__qualname__}"
    if fn.__closure__ or fn.__qualname__ != fn.__name__:
        raise StandaloneError(f"the graph calls {where}, which is not a plain module-level function; "
                              "it cannot be inlined into the standalone model")
    try:
        src = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError) as exc:
        raise StandaloneError(f"the graph calls {where}, whose source is unavailable") from exc
    tree = ast.parse(src)
    fdef = tree.body[0] if len(tree.body) == 1 else None
    if not isinstance(fdef, ast.FunctionDef) or fdef.decorator_list:
        raise StandaloneError(f"the graph calls {where}, which is not a plain undecorated function")
    if len(src.splitlines()) > _INLINE_MAX_LINES:
        raise StandaloneError(f"the graph calls {where} ({len(src.splitlines())} lines), too long to inline")
    a = fdef.args
    if not all(_literal(d) for d in [*a.defaults, *(d for d in a.kw_defaults if d is not None)]):
        raise StandaloneError(f"the graph calls {where}, whose default arguments are not literals")
    imports = []
    for ref in sorted(_code_names(fn.__code__) & fn.__globals__.keys()):
        val = fn.__globals__[ref]
        if isinstance(val, types.ModuleType) and _allowed_module(val.__name__):
            imports.append(_import_line(val.__name__, ref))
        else:
            raise StandaloneError(f"the graph calls {where}, which uses '{ref}' ({type(val).__name__}) from "
                                  "outside torch and the standard library; it cannot be inlined")
    # Annotations may name archir types: drop them (the function is short, its docstring stays).
    for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]:
        if arg is not None:
            arg.annotation = None
    fdef.returns = None
    return _Global(imports, function=fdef, where=where)


def _resolve_global(name: str, obj: Any) -> _Global:
    """How model.py provides the generated code's global ``name`` (bound to ``obj`` by fx)."""
    if name == "torch" and obj is torch:
        return _Global([], "torch")
    if name in _CUSTOM_BUILTINS:
        imports, expr = _CUSTOM_BUILTINS[name]
        return _Global(list(imports), expr or name)
    if isinstance(obj, types.ModuleType):
        if _allowed_module(obj.__name__):
            return _Global([_import_line(obj.__name__, obj.__name__)], obj.__name__)
        raise StandaloneError(f"the graph uses module '{obj.__name__}', which is neither torch nor "
                              "the standard library")
    module_name = getattr(obj, "__module__", None) or ""
    if inspect.isfunction(obj) and not _allowed_module(module_name):
        return _inline(obj)  # archir's functional_setitem, torchvision's fx-wrapped helpers...
    if _allowed_module(module_name):
        module_name = _public_module(obj, module_name)
        attr = _lookup(module_name, obj)
        if attr is not None:
            return _Global([f"import {module_name}"], f"{module_name}.{attr}")
    what = f"{module_name}.{getattr(obj, '__qualname__', type(obj).__name__)}" if module_name else repr(obj)
    raise StandaloneError(f"the graph references {what} (as '{name}'), which is neither part of torch nor "
                          "the standard library nor a small plain function that can be copied; the "
                          "standalone model may import only torch")


class _Rename(ast.NodeTransformer):
    """Replace global names by expressions (``math_sqrt`` -> ``math.sqrt``)."""

    def __init__(self, subst: dict[str, ast.expr]):
        self.subst = subst

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if isinstance(node.ctx, ast.Load) and node.id in self.subst:
            return ast.copy_location(ast.parse(ast.unparse(self.subst[node.id]), mode="eval").body, node)
        return node


def _bound_names(fdef: ast.FunctionDef) -> set[str]:
    """The function's arguments and local variables."""
    args = {a.arg for a in ast.walk(fdef.args) if isinstance(a, ast.arg)}
    stores = {n.id for n in ast.walk(fdef) if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)}
    return args | stores


def _free_names(fdef: ast.FunctionDef) -> set[str]:
    """Names the function reads from module globals (builtins aside)."""
    loads = {n.id for n in ast.walk(fdef) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return loads - _bound_names(fdef) - set(dir(builtins))


def _is_release(stmt: ast.stmt) -> bool:
    """fx's ``a = b = None`` lines that free intermediate values early."""
    return (isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant) and stmt.value.value is None
            and all(isinstance(t, ast.Name) for t in stmt.targets))


def _forward(gm: fx.GraphModule, plan: _Plan) -> tuple[str, list[str], list[str]]:
    """Forward source (unindented), import lines, module-level definitions it needs."""
    codegen = gm.graph._codegen
    if type(codegen) is not fx.graph.CodeGen:
        raise StandaloneError(f"the GraphModule uses a custom fx code generator ({type(codegen).__name__}); "
                              "only plain graphs can be emitted")
    graph = fx.Graph()
    values, old_output = graph.graph_copy(gm.graph, {}, return_output_node=True)
    graph.output(values, type_expr=getattr(old_output, "type", None))
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            node.target = plan.targets[node.target]
    code = graph.python_code(root_module="self")
    tree = ast.parse(code.src)
    fdef = next(s for s in tree.body if isinstance(s, ast.FunctionDef) and s.name == "forward")
    fdef.body = [s for s in fdef.body if not _is_release(s)] or [ast.Pass()]

    free = _free_names(fdef)
    bound = _bound_names(fdef)
    resolved = {}
    for name in sorted(free):
        if name not in code.globals:
            raise StandaloneError(f"internal: generated forward uses '{name}', which fx did not define")
        resolved[name] = _resolve_global(name, code.globals[name])
    imports = [line for g in resolved.values() for line in g.imports]
    import_roots = {line.split()[-1].split(".")[0] for line in imports}
    taken = bound | free | import_roots | _FILE_NAMES | set(dir(builtins))
    defs, subst = [], {}
    for name, g in resolved.items():
        if g.function is not None:
            # An inlined function keeps its own name unless something else already has it.
            # (never a leading "__": inside the class body Python would mangle the call)
            candidates = (g.function.name, g.function.name.lstrip("_") + "_fn", name)
            new = next(n for n in candidates if n not in taken or n == name)
            taken.add(new)
            g.function.name = new
            defs.append(f"# inlined from {g.where}\n" + ast.unparse(g.function))
            subst[name] = ast.Name(new, ast.Load())
        elif g.expr.split(".")[0] == name:
            continue  # bound by its import line (``torch``, ``fx_pytree``)
        elif g.expr.split(".")[0] in bound:
            # A local variable shadows the module the expression starts with: keep fx's alias.
            if name in _FILE_NAMES:
                raise StandaloneError(f"the graph needs a global named '{name}', which model.py uses itself")
            defs.append(f"{name} = {g.expr}")
        else:
            subst[name] = ast.parse(g.expr, mode="eval").body
    fdef = _Rename(subst).visit(fdef)
    return ast.unparse(fdef), imports, defs


def _torch_imports(source: str) -> list[str]:
    """``import torch.x.y`` lines for every torch submodule an attribute chain goes through that
    ``import torch`` does not import by itself."""
    needed = set()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Attribute):
            continue
        chain, cur = [], node
        while isinstance(cur, ast.Attribute):
            chain.append(cur.attr)
            cur = cur.value
        if not (isinstance(cur, ast.Name) and cur.id == "torch"):
            continue
        dotted = "torch"
        for atom in reversed(chain):
            dotted += "." + atom
            if dotted.startswith("torch.ops"):
                break
            mod = sys.modules.get(dotted)
            if not isinstance(mod, types.ModuleType):
                break
            if dotted not in _IMPORTED_BY_TORCH:
                needed.add(dotted)
    deepest = {m for m in needed if not any(o.startswith(m + ".") for o in needed)}
    return [f"import {m}" for m in sorted(deepest)]


# ---- source ----------------------------------------------------------------------------------
def _layer_sources(plan: _Plan) -> list[str]:
    """The source of each :mod:`archir.layers` class the model holds (they need only torch)."""
    used = {type(m) for _, _, mod, _ in plan.modules for m in mod.modules()}
    return [f"# copied from {cls.__module__}\n" + textwrap.dedent(inspect.getsource(cls)).strip("\n")
            for cls in STANDALONE_CLASSES if cls in used]


def _docstring(class_name: str, gm: fx.GraphModule, header: str, num_parameters: int) -> str:
    import archir

    lines = [f"{class_name}: a standalone PyTorch model written by archir {archir.__version__}.", ""]
    if header.strip():
        lines += [*header.strip("\n").splitlines(), ""]
    lines += [
        f"Source: {type(gm).__name__} (torch.fx GraphModule), {num_parameters:,} parameters.",
        "Needs only PyTorch. weights.pt beside this file holds the state_dict:",
        "",
        "    model = load_model()          # build_model() + torch.load(weights.pt, weights_only=True)",
        "    model.eval()",
    ]
    text = "\n".join(lines).replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    return f'"""{text}\n"""'


def _tensor_ctor(t: torch.Tensor) -> str:
    return f"torch.zeros({tuple(t.shape)!r}, dtype={t.dtype})"


def _source(gm: fx.GraphModule, plan: _Plan, class_name: str, header: str, num_parameters: int) -> str:
    forward_src, imports, defs = _forward(gm, plan)
    init = ["super().__init__()"]
    for flat, expr, mod, display in plan.modules:
        note = f"  # {display}" if flat != re.sub(r"\W", "_", display.replace(".", "_")) else ""
        init.append(f"self.{flat} = {expr}{note}")
        for pname, p in mod.named_parameters():
            if not p.requires_grad:
                init.append(f"{_attr_expr('self.' + flat, pname)}.requires_grad_(False)")
    for flat, t, is_param in plan.tensors:
        if is_param:
            grad = "" if t.requires_grad else ", requires_grad=False"
            init.append(f"self.{flat} = torch.nn.Parameter({_tensor_ctor(t)}{grad})")
        else:
            init.append(f"self.register_buffer({flat!r}, {_tensor_ctor(t)})")
    for flat, text in plan.constants:
        init.append(f"self.{flat} = {text}")
    # Tensors shared by two owners (tied weights) stay shared.
    first: dict[int, str] = {}
    for key, t in plan.originals.items():
        if id(t) in first:
            init.append(f"{_attr_expr('self', key)} = {_attr_expr('self', first[id(t)])}")
        else:
            first[id(t)] = key

    modes = [f"model.train({gm.training})"]
    for flat, _, mod, _ in plan.modules:
        for sub, m in mod.named_modules():
            if m.training != gm.training:
                path = f"{flat}.{sub}" if sub else flat
                modes.append(f"{_attr_expr('model', path)}.train({m.training})")

    body = [
        f"class {class_name}(torch.nn.Module):",
        textwrap.indent("\n".join(["def __init__(self):", *("    " + line for line in init)]), "    "),
        "",
        textwrap.indent(forward_src, "    "),
        "",
        "",
        "def build_model():",
        f'    """A fresh {class_name} in the source module\'s train/eval mode, with initial weights."""',
        f"    model = {class_name}()",
        *("    " + m for m in modes),
        "    return model",
        "",
        "",
        "def load_model(weights_path=None):",
        '    """build_model() with the weights from weights_path (default: weights.pt beside this file)."""',
        "    model = build_model()",
        "    if weights_path is None:",
        '        weights_path = Path(__file__).with_name("weights.pt")',
        '    model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))',
        "    return model",
    ]
    body_text = "\n".join(body)
    if "collections.OrderedDict" in body_text:
        imports.append("import collections")
    std = sorted({line for line in imports if not line.split()[1].startswith("torch")})
    tch = sorted({line for line in imports + _torch_imports("\n".join(defs) + "\n" + body_text)
                  if line.split()[1].startswith("torch")} - {"import torch"})
    head = [_docstring(class_name, gm, header, num_parameters), "",
            *std, "from pathlib import Path", "", "import torch", *tch]
    aliases = [d for d in defs if not d.startswith("#")]
    functions = [d for d in defs if d.startswith("#")] + _layer_sources(plan)
    text = "\n".join(head) + "\n"
    if aliases:
        text += "\n" + "\n".join(aliases) + "\n"
    for fn in functions:
        text += "\n\n" + fn + "\n"
    return text + "\n\n" + body_text + "\n"


# ---- checks ----------------------------------------------------------------------------------
def _exec_source(source: str, filename: str) -> dict[str, Any]:
    """compile() and run model.py's definitions; refuse a module-level name bound twice."""
    seen: dict[str, int] = {}
    for stmt in ast.parse(source).body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            bound = [(a.asname or a.name).split(".")[0] for a in stmt.names]
        elif isinstance(stmt, (ast.FunctionDef, ast.ClassDef)):
            bound = [stmt.name]
        elif isinstance(stmt, ast.Assign):
            bound = [t.id for t in stmt.targets if isinstance(t, ast.Name)]
        else:
            bound = []
        for name in bound:
            if name in seen and not isinstance(stmt, ast.Import):  # ``import torch.nn`` rebinds torch
                raise StandaloneError(f"model.py would define '{name}' twice (lines {seen[name]} and "
                                      f"{stmt.lineno}); choose another class_name")
            seen[name] = stmt.lineno
    ns: dict[str, Any] = {"__name__": f"_archir_standalone_check_{uuid.uuid4().hex}", "__file__": filename}
    exec(compile(source, filename, "exec"), ns)  # noqa: S102 - the source we just generated
    return ns


def _check_built(model: nn.Module, plan: _Plan) -> dict[str, torch.Tensor]:
    """Compare the emitted class with the originals; return the weights to save."""
    for flat, _, mod, display in plan.modules:
        built = getattr(model, flat)
        if repr(built) != repr(mod) or [t[:4] for t in _tensors(built)] != [t[:4] for t in _tensors(mod)]:
            raise StandaloneError(f"internal: emitted submodule '{flat}' does not match '{display}'")
    state = model.state_dict()
    weights = {}
    for key, t in state.items():
        if key not in plan.originals:
            raise StandaloneError(f"internal: emitted state_dict key '{key}' has no source tensor")
        orig = plan.originals[key]
        if orig.shape != t.shape or orig.dtype != t.dtype:
            raise StandaloneError(f"emitted '{key}' is {tuple(t.shape)} {t.dtype} but the source is "
                                  f"{tuple(orig.shape)} {orig.dtype}")
        w = orig.detach().cpu()
        if w.untyped_storage().nbytes() != w.numel() * w.element_size():
            w = w.clone()  # a view of a larger tensor: save only what it shows
        weights[key] = w
    missing = sorted(set(plan.originals) - set(state))
    if missing:
        raise StandaloneError(f"internal: source tensors {missing} have no place in the emitted state_dict")
    for key, p in model.named_parameters(remove_duplicate=False):
        if p.requires_grad != plan.originals[key].requires_grad:
            raise StandaloneError(f"internal: emitted '{key}' has requires_grad={p.requires_grad}")
    return weights


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _mismatch(a: Any, b: Any, where: str = "output") -> str | None:
    """The first difference between nested outputs ``a`` (GraphModule) and ``b`` (emitted)."""
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor):
            return f"{where}: tensor vs {type(b).__name__}"
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"{where}: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
        if not torch.equal(a, b):
            diff = (a.double() - b.double()).abs().max().item() if a.is_floating_point() else "n/a"
            return f"{where}: values differ (max abs diff {diff})"
        return None
    if isinstance(a, dict):
        if not isinstance(b, dict) or list(a) != list(b):
            return f"{where}: dict keys {list(a)} vs {list(b) if isinstance(b, dict) else type(b).__name__}"
        found = (_mismatch(a[k], b[k], f"{where}[{k!r}]") for k in a)
        return next((m for m in found if m), None)
    if isinstance(a, (tuple, list)):
        if not isinstance(b, (tuple, list)) or len(a) != len(b):
            return f"{where}: sequence of {len(a)} vs {b!r:.60}"
        found = (_mismatch(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b)))
        return next((m for m in found if m), None)
    return None if a == b else f"{where}: {a!r:.60} vs {b!r:.60}"


def _verify(gm: fx.GraphModule, model_py: Path, weights: Path, class_name: str, inputs: tuple) -> None:
    name = f"_archir_standalone_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, model_py)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    emitted = module.load_model(weights).eval()
    if type(emitted).__name__ != class_name:
        raise StandaloneError(f"internal: {model_py} built a {type(emitted).__name__}, not {class_name}")
    devices = {t.device for t in [*gm.parameters(), *gm.buffers()]}
    if len(devices) == 1:
        emitted.to(devices.pop())  # the emitted model is built on the CPU
    with torch.no_grad(), _eval_mode(gm):
        expected = gm(*inputs)
        try:
            got = emitted(*inputs)
        except Exception as exc:  # noqa: BLE001
            raise StandaloneError(f"running {model_py} on the example inputs failed: "
                                  f"{type(exc).__name__}: {exc}") from exc
    problem = _mismatch(expected, got)
    if problem:
        raise StandaloneError(f"{model_py} does not reproduce the GraphModule on the example inputs "
                              f"(eval mode): {problem}. The files were left in place for inspection.")


# ---- entry point -----------------------------------------------------------------------------
def emit_standalone(module: fx.GraphModule, out_dir: Path | str, *, class_name: str = "SlimModel",
                    example_inputs: tuple[torch.Tensor, ...] | None = None,
                    header: str = "") -> StandaloneFiles:
    """Write ``out_dir/model.py`` (torch-only source) and ``out_dir/weights.pt`` (its state_dict).

    ``header``: extra lines for model.py's docstring (provenance: archir version, options...).
    ``example_inputs``: if given, import the written model and check its eval-mode outputs equal
    ``module``'s bit for bit. Raises :class:`StandaloneError` when a submodule or a called function
    cannot be written with torch alone, or when the check fails.
    """
    if not isinstance(module, fx.GraphModule):
        raise StandaloneError(f"emit_standalone needs a torch.fx.GraphModule, got {type(module).__name__}")
    if not class_name.isidentifier() or keyword.iskeyword(class_name) or class_name in _FILE_NAMES:
        raise StandaloneError(f"class_name {class_name!r} is not a usable Python class name")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    out_dir = Path(out_dir)
    model_py, weights_pt = out_dir / "model.py", out_dir / "weights.pt"

    plan = _plan(module)
    params = {id(p): p for _, _, mod, _ in plan.modules for p in mod.parameters()}
    params.update({id(t): t for _, t, is_param in plan.tensors if is_param})
    num_parameters = sum(p.numel() for p in params.values())
    source = _source(module, plan, class_name, header, num_parameters)
    ns = _exec_source(source, str(model_py))  # compile() + run the definitions
    weights = _check_built(ns["build_model"](), plan)

    out_dir.mkdir(parents=True, exist_ok=True)
    save_torch(weights, weights_pt)
    write_text(model_py, source)
    if example_inputs is not None:
        _verify(module, model_py, weights_pt, class_name, tuple(example_inputs))
    return StandaloneFiles(model_py=model_py, weights=weights_pt, class_name=class_name,
                           num_parameters=num_parameters, module_names=dict(plan.targets))
