"""The emitted ``forward``: fx's generated code, with its globals resolved to torch and standard
library imports or inlined small functions."""
from __future__ import annotations

import ast
import builtins
import importlib.util
import inspect
import sys
import textwrap
import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from archir.ir import fetch_attr

from .base import _FILE_NAMES, _IMPORTED_BY_TORCH, _INLINE_MAX_LINES, StandaloneError
from .plan import _Plan
from .submodules import _literal


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
    helpers: list["_Global"] | None = None  # functions the inlined one calls, inlined too (by name)


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


def _torch_constant(node: ast.expr, fn: Any) -> bool:
    """A default such as ``torch.float32``: an attribute of ``torch`` (as ``fn``'s module binds the
    name, and as model.py imports it) that is a dtype, a layout or a memory format."""
    if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "torch"
            and fn.__globals__.get("torch") is torch):
        return False
    return isinstance(getattr(torch, node.attr, None), (torch.dtype, torch.layout, torch.memory_format))


def _registered_as_is(fn: Any) -> bool:
    """Whether ``fn``'s decorators returned the very function its ``def`` made (registrations such as
    ``torch.fx.wrap`` or timm's ``register_notrace_function``), so that the ``def`` without them
    computes the same: ``fn`` wraps nothing (no ``__wrapped__``) and its code object is that of
    the ``def`` whose source was read (same name, same first line: a wrapper's code is its own)."""
    if hasattr(fn, "__wrapped__") or not inspect.isfunction(fn):
        return False
    try:
        first = inspect.getsourcelines(fn)[1]
    except (OSError, TypeError):
        return False
    return fn.__code__.co_name == fn.__name__ and fn.__code__.co_firstlineno == first


def _inline(fn: Any, _seen: tuple = ()) -> _Global:
    """The import lines and definition of a small plain function from outside torch (archir's
    own, or a library's ``torch.fx.wrap``-ed helper) that uses only torch and the standard
    library, to be copied into model.py; plain functions of its own module that it calls are
    copied too, under their own names (torchvision's video Swin: ``shifted_window_attention_3d``
    calls ``_compute_attention_mask_3d``). The emitted model is verified numerically afterwards."""
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
    if not isinstance(fdef, ast.FunctionDef) or (fdef.decorator_list and not _registered_as_is(fn)):
        raise StandaloneError(f"the graph calls {where}, which is not a plain undecorated function")
    fdef.decorator_list = []  # registrations only (see _registered_as_is): the function is the same without
    if len(src.splitlines()) > _INLINE_MAX_LINES:
        raise StandaloneError(f"the graph calls {where} ({len(src.splitlines())} lines), too long to inline")
    a = fdef.args
    if not all(_literal(d) or _torch_constant(d, fn) for d in [*a.defaults, *(d for d in a.kw_defaults if d is not None)]):
        raise StandaloneError(f"the graph calls {where}, whose default arguments are not literals")
    imports, helpers = [], []
    for ref in sorted(_code_names(fn.__code__) & fn.__globals__.keys()):
        val = fn.__globals__[ref]
        if isinstance(val, types.ModuleType) and _allowed_module(val.__name__):
            imports.append(_import_line(val.__name__, ref))
        elif inspect.isfunction(val) and val.__name__ == ref and val.__module__ == fn.__module__ \
                and val is not fn and val not in _seen:
            helper = _inline(val, (*_seen, fn))
            helpers += [*(helper.helpers or []), helper]
            imports += helper.imports
        elif val is fn or val in _seen:
            continue  # recursion: the definition is already copied
        else:
            raise StandaloneError(f"the graph calls {where}, which uses '{ref}' ({type(val).__name__}) from "
                                  "outside torch and the standard library; it cannot be inlined")
    # Annotations may name archir types: drop them (the function is short, its docstring stays).
    for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]:
        if arg is not None:
            arg.annotation = None
    fdef.returns = None
    return _Global(imports, function=fdef, where=where, helpers=helpers)


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


def _as_del(stmt: ast.stmt) -> ast.stmt:
    """fx's ``a = b = None`` (freeing values after their last use) as ``del a, b``; other
    statements as they are."""
    if (isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant) and stmt.value.value is None
            and all(isinstance(t, ast.Name) for t in stmt.targets)):
        return ast.Delete(targets=[ast.Name(id=t.id, ctx=ast.Del()) for t in stmt.targets])
    return stmt


def _method(source_graph: fx.Graph, prefix: str, name: str, plan: _Plan) -> tuple[ast.FunctionDef, dict]:
    """The emitted method ``name`` computing ``source_graph`` (its targets under ``prefix``),
    and the globals fx's generated code reads."""
    codegen = source_graph._codegen
    if type(codegen) is not fx.graph.CodeGen:
        raise StandaloneError(f"the GraphModule uses a custom fx code generator ({type(codegen).__name__}); "
                              "only plain graphs can be emitted")
    graph = fx.Graph()
    values, old_output = graph.graph_copy(source_graph, {}, return_output_node=True)
    graph.output(values, type_expr=getattr(old_output, "type", None))
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            node.target = plan.targets[prefix + node.target]
    code = graph.python_code(root_module="self")
    tree = ast.parse(code.src)
    fdef = next(s for s in tree.body if isinstance(s, ast.FunctionDef) and s.name == "forward")
    fdef.name = name
    # fx's ``a = b = None`` lines free each value after its last use (model.py's peak memory is then
    # the original's, not every activation of the network at once); ``del a, b`` says so plainly
    fdef.body = [_as_del(s) for s in fdef.body] or [ast.Pass()]
    return fdef, code.globals


def _by_mode_method(names: dict[str, str]) -> str:
    return (f"def {names['forward']}(self, *values):\n"
            "    # the end of the forward that the model's own code writes differently in training\n"
            f"    return self.{names['train']}(*values) if self.training else self.{names['eval']}(*values)")


def _forward(gm: fx.GraphModule, plan: _Plan) -> tuple[str, list[str], list[str]]:
    """Forward source (unindented; with the methods of a forward that differs by mode), import
    lines, module-level definitions it needs."""
    from .plan import graph_parts

    methods, globals_ = [], {}
    for prefix, part, graph in graph_parts(gm):
        name = "forward" if part == "forward" else plan.by_mode[prefix.rsplit(".", 2)[0]][part]
        fdef, fx_globals = _method(graph, prefix, name, plan)
        for key, obj in fx_globals.items():
            if key in globals_ and globals_[key] is not obj:
                raise StandaloneError(f"internal: the generated methods name two objects '{key}'")
            globals_[key] = obj
        methods.append(fdef)

    free = set().union(*map(_free_names, methods))
    bound = set().union(*map(_bound_names, methods))
    resolved = {}
    for name in sorted(free):
        if name not in globals_:
            raise StandaloneError(f"internal: generated forward uses '{name}', which fx did not define")
        resolved[name] = _resolve_global(name, globals_[name])
    imports = [line for g in resolved.values() for line in g.imports]
    import_roots = {line.split()[-1].split(".")[0] for line in imports}
    taken = bound | free | import_roots | _FILE_NAMES | set(dir(builtins))
    defs, subst, copied = [], {}, {}  # copied: where -> the name its definition has in model.py
    module_names = import_roots | _FILE_NAMES | {n for n, g in resolved.items()
                                                 if g.function is None and g.expr.split(".")[0] in bound}
    for name, g in resolved.items():
        if g.function is not None:
            if g.where in copied and copied[g.where] not in bound:  # copied as another one's helper
                subst[name] = ast.Name(copied[g.where], ast.Load())
                continue
            # An inlined function keeps its own name unless something else already has it.
            # (never a leading "__": inside the class body Python would mangle the call)
            candidates = (g.function.name, g.function.name.lstrip("_") + "_fn", name)
            new = next(n for n in candidates if n not in taken or n == name)
            taken.add(new)
            module_names.add(new)
            g.function.name = new
            copied[g.where] = new
            for h in g.helpers or []:  # called by their own names from the copied code
                own = h.function.name
                if copied.get(h.where) == own:
                    continue
                # only module-level names can clash (a local of forward named like it cannot:
                # forward reaches every copied function under the name chosen above)
                if own in module_names:
                    raise StandaloneError(f"{g.where} calls {h.where}, whose name '{own}' is taken "
                                          "in model.py; it cannot be inlined")
                taken.add(own)
                module_names.add(own)
                copied[h.where] = own
                defs.append(f"# inlined from {h.where} (called by {g.where})\n" + ast.unparse(h.function))
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
    sources = [ast.unparse(_Rename(subst).visit(fdef)) for fdef in methods]
    sources += [_by_mode_method(names) for names in plan.by_mode.values()]
    return "\n\n".join(sources), imports, defs


def _torch_imports(source: str, packages: tuple[str, ...] = ()) -> list[str]:
    """``import torch.x.y`` lines for every torch submodule an attribute chain goes through that
    ``import torch`` does not import by itself; for each of ``packages`` (installed packages whose
    classes model.py imports: ``torchvision``), the deepest module each chain goes through."""
    needed = set()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Attribute):
            continue
        chain, cur = [], node
        while isinstance(cur, ast.Attribute):
            chain.append(cur.attr)
            cur = cur.value
        if not (isinstance(cur, ast.Name) and cur.id in ("torch", *packages)):
            continue
        dotted = cur.id
        if dotted != "torch":
            needed.add(dotted)
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
