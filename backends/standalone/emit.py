"""The entry points: :func:`emit_standalone`, and :func:`check_emittable` (the same refusals,
ahead of time, writing nothing)."""
from __future__ import annotations

import ast
import keyword
from pathlib import Path

import torch
import torch.fx as fx

from archir.fileio import save_torch, write_text
from archir.frontends.opaque_methods import MethodCall
from archir.ir import fetch_attr
from archir.layers import STANDALONE_CLASSES

from .base import _FILE_NAMES, StandaloneError, StandaloneFiles
from .checks import _check_built, _exec_source, _verify
from .forward import _free_names, _resolve_global
from .naming import _display_path
from .plan import _plan, graph_parts
from .source import _source
from .submodules import _module_expr, method_owner_expr, required_packages


def emit_standalone(module: fx.GraphModule, out_dir: Path | str, *, class_name: str = "SlimModel",
                    example_inputs: tuple[torch.Tensor, ...] | None = None,
                    header: str = "") -> StandaloneFiles:
    """Write ``out_dir/model.py`` (torch-only source) and ``out_dir/weights.pt`` (its state_dict).
    Parts kept opaque whose classes come from an installed package (torchvision's detection
    transform and heads) are imported from it (:attr:`StandaloneFiles.packages`).

    ``header``: extra lines for model.py's docstring (provenance: archir version, options...).
    ``example_inputs``: if given, import the written model and check its eval-mode outputs equal
    ``module``'s bit for bit (and its training-mode outputs, where the forward differs by mode).
    Raises :class:`StandaloneError` when a submodule or a called function cannot be written, or
    when the check fails.
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
    weights = _checked_weights(ns["build_model"], plan)

    out_dir.mkdir(parents=True, exist_ok=True)
    save_torch(weights, weights_pt)
    write_text(model_py, source)
    if example_inputs is not None:
        _verify(module, model_py, weights_pt, class_name, tuple(example_inputs), plan)
    return StandaloneFiles(model_py=model_py, weights=weights_pt, class_name=class_name,
                           num_parameters=num_parameters, module_names=dict(plan.targets),
                           packages=tuple(required_packages(source)))


def _checked_weights(build_model, plan) -> dict[str, torch.Tensor]:
    """:func:`_check_built` on the emitted class built on the meta device first (structure,
    shapes and dtypes, without a second copy of a large model's weights), then on the CPU where
    that fails: a constructor that needs real tensors (a user's class reading values) or prints
    them in its ``repr``. The CPU build's verdict is the one that counts."""
    try:
        with torch.device("meta"):
            built = build_model()
        return _check_built(built, plan)
    except Exception:  # noqa: BLE001 - the CPU build below raises the real error, if any
        return _check_built(build_model(), plan)


def _search_time(obj) -> bool:
    """archir's own search-time modules and helpers (EdgeMix, mix_weights...): derive removes them."""
    mod = type(obj).__module__ if isinstance(obj, torch.nn.Module) else getattr(obj, "__module__", "") or ""
    if isinstance(obj, torch.nn.Module) and type(obj) in STANDALONE_CLASSES:
        return False
    return mod.startswith(("archir.passes", "archir.methods")) or (
        isinstance(obj, torch.nn.Module) and mod.split(".")[0] == "archir")


def check_emittable(module: fx.GraphModule) -> None:
    """Raise :class:`StandaloneError` now if :func:`emit_standalone` could not write the network
    that ``module`` derives to; write nothing.

    Meant to run right after a search is built, before any training: ``module`` may be the
    supernet (archir's own search-time modules and functions, which deriving removes, are
    skipped) or the original model's lowered graph. Every other module the graph calls or reads
    is rebuilt in-process and checked as the emitter does (a user-defined module kept opaque with
    ``leaf_modules=[...]`` is refused), and every function ``forward`` calls must come from torch,
    the standard library, or be a small plain function model.py can copy. The error is one line:
    ``cannot emit a standalone model.py: cannot rebuild submodule 'gate' (pkg.Gate): ... <what to do>``.
    """
    if not isinstance(module, fx.GraphModule):
        raise StandaloneError(f"check_emittable needs a torch.fx.GraphModule, got {type(module).__name__}")
    try:
        _check_modules(module)
        _check_globals(module)
    except StandaloneError as exc:
        raise StandaloneError(f"cannot emit a standalone model.py: {exc}") from exc


def _check_modules(gm: fx.GraphModule) -> None:
    checked: list[str] = []
    seen: set[int] = set()
    held: set[int] = set()  # every module model.py will hold
    methods: list[tuple[str, MethodCall]] = []
    for prefix, _, graph in graph_parts(gm):
        for node in graph.nodes:
            if node.op not in ("call_module", "get_attr"):
                continue
            target = prefix + node.target
            obj = fetch_attr(gm, target)
            if isinstance(obj, MethodCall):
                methods.append((target, obj))
            if not isinstance(obj, torch.nn.Module) or id(obj) in seen:
                continue
            seen.add(id(obj))
            if _search_time(obj) or any(target.startswith(t + ".") for t in checked):
                continue  # removed by derive (or archir's own: checked below), or inside a module checked whole
            _module_expr(obj, _display_path(gm, target))
            checked.append(target)
            held |= {id(m) for m in obj.modules()}
    for target, call in methods:
        if id(call.owner) not in held:
            method_owner_expr(call.owner, f"{target} ({type(call.owner).__name__})")


def _check_globals(gm: fx.GraphModule) -> None:
    for _, _, graph in graph_parts(gm):
        codegen = graph._codegen
        if type(codegen) is not fx.graph.CodeGen:
            raise StandaloneError(f"the GraphModule uses a custom fx code generator ({type(codegen).__name__}); "
                                  "only plain graphs can be emitted")
        code = graph.python_code(root_module="self")
        tree = ast.parse(code.src)
        fdef = next(st for st in tree.body if isinstance(st, ast.FunctionDef) and st.name == "forward")
        for name in sorted(_free_names(fdef)):
            if name in code.globals and not _search_time(code.globals[name]):
                _resolve_global(name, code.globals[name])
