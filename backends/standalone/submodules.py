"""Rebuilding each called submodule as a constructor call (checked against the original)."""
from __future__ import annotations

import ast
import functools
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
            raise _why_not(path, mod, why)
        return _user_module_expr(mod, path)
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


# ---- user-defined modules kept opaque (automatic leaves): their class source is copied, ------------
# ---- or, for a class from an installed package (torchvision), imported from it --------------------
REBUILD_FN = "_archir_module"
OBJECT_FN = "_archir_object"
OBJECT_SOURCE = f'''def {OBJECT_FN}(cls, attrs):
    """An instance of ``cls`` (a plain object an opaque part holds: a box coder, a matcher) with
    the attributes it had, without running its ``__init__``."""
    obj = cls.__new__(cls)
    obj.__dict__.update(attrs)
    return obj'''
# the largest tensor held as a plain attribute (not a parameter or buffer) that model.py writes out
_MAX_LITERAL_TENSOR = 4096


def _rebuild_object(cls, attrs):  # the in-process twin of OBJECT_SOURCE
    obj = cls.__new__(cls)
    obj.__dict__.update(attrs)
    return obj


def package_class(cls, *, torch_too: bool = False) -> str | None:
    """``torchvision.models.detection.rpn.RegionProposalNetwork``: where model.py imports ``cls``
    (a class or a function) from, when it comes from an installed package other than torch and
    archir (a distribution pip knows, not a file beside the user's model), or from torch where
    ``torch_too``; None otherwise."""
    module_name, qual = getattr(cls, "__module__", None), getattr(cls, "__qualname__", None)
    if not (isinstance(module_name, str) and isinstance(qual, str)):
        return None
    top = module_name.split(".")[0]
    if not (torch_too and top == "torch") and (
            top in ("torch", "archir", "__main__", "builtins") or top not in _distributions()):
        return None
    try:
        if fetch_attr(importlib.import_module(module_name), qual) is cls:
            return f"{module_name}.{qual}"
    except (ImportError, AttributeError):
        pass
    return None


@functools.lru_cache(maxsize=1)
def _distributions() -> frozenset[str]:
    """Top-level import names of the installed distributions (reading them takes ~0.1 s: once)."""
    import importlib.metadata

    return frozenset(importlib.metadata.packages_distributions())


def required_packages(source: str) -> list[str]:
    """The installed packages (other than torch) an expression or source reads from: the roots
    of its attribute chains (``torchvision.ops.boxes.box_iou``) that name one and that nothing in
    it assigns (a local variable of the forward may have any name)."""
    tree = ast.parse(source)
    roots = {n.value.id for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
    assigned = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)}
    return sorted(n for n in roots - assigned if n in _distributions() and n not in ("torch", "archir"))


def _value_expr(value, path: str, mod: nn.Module, attr: str, _depth: int = 0) -> str:
    """A Python expression for one attribute of an opaque module: a literal, a small tensor, a
    list/tuple/dict of such values, or a plain object of an installed package's class rebuilt
    from its attributes (:data:`OBJECT_SOURCE`). Raises what else it is."""
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided or value.is_quantized or value.numel() > _MAX_LITERAL_TENSOR \
                or value.requires_grad or value.device.type == "meta":
            raise _why_not(path, mod, f"its attribute '{attr}' holds a tensor of {value.numel()} elements that is "
                                      "neither a parameter nor a buffer, so weights.pt cannot carry it")
        return f"torch.tensor({value.cpu().tolist()!r}, dtype={value.dtype})"
    if isinstance(value, torch.dtype):
        return repr(value)  # torch.float32
    if isinstance(value, torch.device):
        return f"torch.device({str(value)!r})"
    if _literal(repr(value)) and type(value) in (*_SIMPLE, tuple, list, dict, set):
        return repr(value)
    if _depth < 4 and type(value) in (tuple, list):
        items = [_value_expr(v, path, mod, attr, _depth + 1) for v in value]
        return f"({', '.join(items)}{',' if len(items) == 1 else ''})" if isinstance(value, tuple) \
            else f"[{', '.join(items)}]"
    if _depth < 4 and type(value) is dict and all(_literal(repr(k)) for k in value):
        return "{" + ", ".join(f"{k!r}: {_value_expr(v, path, mod, attr, _depth + 1)}"
                               for k, v in value.items()) + "}"
    if inspect.isfunction(value) or inspect.isbuiltin(value) or isinstance(value, type):
        where = package_class(value, torch_too=True)  # torchvision's box_iou, kept as a box similarity
        if where is not None:
            return where
    cls = type(value)
    where = package_class(cls) if not isinstance(value, (nn.Module, type)) else None
    if _depth < 4 and where is not None and hasattr(value, "__dict__") and not hasattr(cls, "__slots__"):
        attrs = [f"{k!r}: {_value_expr(v, path, mod, f'{attr}.{k}', _depth + 1)}" for k, v in vars(value).items()]
        return f"{OBJECT_FN}({where}, {{{', '.join(attrs)}}})"
    raise _why_not(path, mod, f"its attribute '{attr}' ({cls.__module__}.{cls.__qualname__}) is neither a Python "
                              "literal, a small tensor nor a plain object of an installed package, so model.py "
                              "cannot rebuild it")


REBUILD_SOURCE = f'''def {REBUILD_FN}(cls, attrs, children, params, buffers):
    """An instance of ``cls`` (a class copied above, or imported) without running its ``__init__``, whose
    arguments archir does not know: its attributes, submodules, and zero-filled parameters and
    buffers in the original's order (load_model() fills them from weights.pt)."""
    module = cls.__new__(cls)
    torch.nn.Module.__init__(module)
    for name, value in attrs.items():
        setattr(module, name, value)
    for name, (shape, dtype, requires_grad) in params.items():
        setattr(module, name, torch.nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=requires_grad))
    for name, (shape, dtype) in buffers.items():
        module.register_buffer(name, None if shape is None else torch.zeros(shape, dtype=dtype))
    for name, child in children.items():
        setattr(module, name, child)
    return module'''


def _rebuild(cls, attrs, children, params, buffers):  # the in-process twin of REBUILD_SOURCE
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    for name, value in attrs.items():
        setattr(module, name, value)
    for name, (shape, dtype, requires_grad) in params.items():
        setattr(module, name, nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=requires_grad))
    for name, (shape, dtype) in buffers.items():
        module.register_buffer(name, None if shape is None else torch.zeros(shape, dtype=dtype))
    for name, child in children.items():
        setattr(module, name, child)
    return module


def user_class_source(cls: type) -> tuple[list[str], str]:
    """The import lines and the source of a user-defined ``nn.Module`` class that model.py can
    hold: a module-level class deriving directly from ``nn.Module`` whose methods read, from
    their module's globals, only torch or standard-library modules and Python literals (these
    become import lines and assignments). Raises :class:`StandaloneError` saying what else it reads."""
    import textwrap
    import types

    where = f"{cls.__module__}.{cls.__qualname__}"
    if cls.__qualname__ != cls.__name__ or cls.__bases__ != (nn.Module,):
        raise StandaloneError(f"{where} is not a module-level class deriving directly from torch.nn.Module")
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError) as exc:
        raise StandaloneError(f"the source of {where} is unavailable") from exc
    module = importlib.import_module(cls.__module__)
    names: set[str] = set()
    for value in vars(cls).values():
        fn = getattr(value, "__func__", value)  # staticmethod / classmethod
        if isinstance(fn, property):
            fn = fn.fget
        code = getattr(fn, "__code__", None)
        if code is not None:
            stack = [code]
            while stack:
                c = stack.pop()
                names |= set(c.co_names)
                stack += [k for k in c.co_consts if isinstance(k, types.CodeType)]
    from .forward import _allowed_module, _import_line  # (forward imports this module)

    lines = []
    for ref in sorted(names & vars(module).keys()):
        val = vars(module)[ref]
        if isinstance(val, types.ModuleType):
            if not _allowed_module(val.__name__):
                raise StandaloneError(f"{where} uses module '{val.__name__}', which is neither torch nor "
                                      "the standard library")
            lines.append(_import_line(val.__name__, ref))
        elif isinstance(val, (bool, int, float, str)) and _literal(repr(val)):
            lines.append(f"{ref} = {val!r}")
        elif val is cls:
            continue
        else:
            raise StandaloneError(f"{where} uses '{ref}' ({type(val).__name__}) from its module, which is "
                                  "neither torch, the standard library nor a literal")
    return lines, f"# copied from {where}\n{_without_annotations(src.strip())}"


def _without_annotations(src: str) -> str:
    """A class's source without its annotations: they may name what model.py does not import
    (``Tensor``, the class's own module's types) and never change what the code computes."""
    tree = ast.parse(src)
    arguments = [a for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for a in [*n.args.posonlyargs, *n.args.args, *n.args.kwonlyargs, n.args.vararg, n.args.kwarg]
                 if a is not None]
    if not any(isinstance(n, ast.AnnAssign) or getattr(n, "returns", None) for n in ast.walk(tree)) \
            and not any(a.annotation for a in arguments):
        return src  # as written, comments included
    for arg in arguments:
        arg.annotation = None
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            node.returns = None
        elif isinstance(node, ast.ClassDef):
            node.body = [ast.Assign([node_.target], node_.value, lineno=node_.lineno)
                         if isinstance(node_, ast.AnnAssign) and node_.value is not None else node_
                         for node_ in node.body if not (isinstance(node_, ast.AnnAssign) and node_.value is None)]
            node.body = node.body or [ast.Pass()]
    return ast.unparse(ast.fix_missing_locations(tree))


def _class_and_attrs(mod: nn.Module, path: str, cannot_copy: str) -> tuple[str, list[str]]:
    """How model.py names ``mod``'s class (imported from its package, or the name of its copied
    source) and ``mod``'s attributes, as ``'name': expression`` items. ``cannot_copy`` says why a
    class model.py can neither import nor copy is refused (``{}``: what its source reads)."""
    cls = type(mod)
    imported = copied_or_imported(cls)
    if imported is None:
        try:
            user_class_source(cls)
        except StandaloneError as exc:
            raise _why_not(path, mod, cannot_copy.format(exc)) from None
    # (nn.Module's own bookkeeping, set by its __init__, is skipped: hooks were refused earlier)
    attrs = [f"{k!r}: {_value_expr(v, path, mod, k)}" for k, v in vars(mod).items() if k not in _MODULE_STATE]
    return imported or cls.__name__, attrs


def _rebuild_namespace(expr: str, classes) -> dict:
    """What evaluating a rebuild expression needs beside torch: the rebuild helpers, the copied
    classes and the packages classes are imported from."""
    return {REBUILD_FN: _rebuild, OBJECT_FN: _rebuild_object, **{c.__name__: c for c in classes},
            **{name: importlib.import_module(name) for name in required_packages(expr)}}


def _user_module_expr(mod: nn.Module, path: str) -> str:
    """``_archir_module(Cls, {attrs}, {children}, {params}, {buffers})`` for a user-defined module
    kept opaque: its class source goes into model.py (:func:`user_class_source`) or is imported
    from its package, the instance is rebuilt from its attributes, and the result is checked like
    any other."""
    cls_expr, attrs = _class_and_attrs(
        mod, path, "it is a user-defined class that model.py cannot copy: {}. Trace through it (drop it "
                   "from leaf_modules) or write it with torch.nn built-ins")
    if mod._non_persistent_buffers_set:
        raise _why_not(path, mod, f"its buffers {sorted(mod._non_persistent_buffers_set)} are not saved in the "
                                  "state_dict (persistent=False), so weights.pt cannot carry them")
    params = [f"{k!r}: ({tuple(p.shape)!r}, {p.dtype}, {p.requires_grad})"
              for k, p in mod._parameters.items() if p is not None]
    if any(p is None for p in mod._parameters.values()):
        raise _why_not(path, mod, "it has a parameter set to None")
    bufs = [f"{k!r}: ({None if b is None else tuple(b.shape)!r}, {None if b is None else b.dtype})"
            for k, b in mod._buffers.items()]
    children = [f"{k!r}: {_module_expr(c, f'{path}.{k}')}" for k, c in mod._modules.items() if c is not None]
    expr = (f"{REBUILD_FN}({cls_expr}, {{{', '.join(attrs)}}}, {{{', '.join(children)}}}, "
            f"{{{', '.join(params)}}}, {{{', '.join(bufs)}}})")
    return _construct(expr, path, mod, extra=_rebuild_namespace(expr, user_classes([mod])))


def method_owner_expr(owner: nn.Module, path: str) -> str:
    """``_archir_module(Cls, {attrs}, {}, {}, {})``: the module whose method a graph runs
    (:class:`~archir.frontends.opaque_methods.MethodCall`) where model.py holds no copy of it (the
    model itself: SSD's ``postprocess_detections``), rebuilt with its plain attributes only. The
    method reads no module with parameters (tracing refuses those), and model.py holds the
    model's parts elsewhere."""
    cls_expr, attrs = _class_and_attrs(owner, path, "model.py runs its methods but cannot copy its class: {}")
    expr = f"{REBUILD_FN}({cls_expr}, {{{', '.join(attrs)}}}, {{}}, {{}}, {{}})"
    ns = {"torch": torch, "__builtins__": {}, **_rebuild_namespace(expr, [type(owner)])}
    try:
        built = eval(expr, ns)  # noqa: S307 - our own expression of literals and imported classes
    except Exception as exc:  # noqa: BLE001
        raise _why_not(path, owner, f"{expr} failed: {type(exc).__name__}: {exc}") from exc
    if _plain_attrs(built) != _plain_attrs(owner):
        raise _why_not(path, owner, f"rebuilding it as {expr} does not give back its attributes")
    return expr


def copied_or_imported(cls: type) -> str | None:
    """None when model.py copies ``cls``'s source (a user's own class: model.py needs only torch);
    where model.py imports it from for a class of an installed package (:func:`package_class`):
    its source is the package's to keep (torchvision's detection parts use its ImageList, its
    nms and roi_align ops), and the user has it installed."""
    return package_class(cls)


_MODULE_STATE = set(vars(nn.Module()))


def user_classes(modules) -> list[type]:
    """The user-defined classes among ``modules`` (and their submodules), first seen first: those
    model.py copies and those it imports (:func:`copied_or_imported`)."""
    seen: dict[type, None] = {}
    for mod in modules:
        for m in mod.modules():
            cls = type(m)
            if cls not in STANDALONE_CLASSES and _class_expr(cls) is None and \
                    cls.__module__.split(".")[0] != "archir":
                seen.setdefault(cls)
    return list(seen)


def _construct(expr: str, path: str, mod: nn.Module, extra: dict | None = None) -> str:
    """Build ``expr`` in-process, check it matches ``mod``; return the final expression."""
    ns = {"torch": torch, "collections": __import__("collections"), "__builtins__": {},
          **{c.__name__: c for c in STANDALONE_CLASSES}, **(extra or {})}
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
