"""The plan: what the emitted class holds (modules, tensors, ties) and under which names."""
from __future__ import annotations

import ast
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from archir.frontends.mode_split import ByMode
from archir.frontends.opaque_methods import MethodCall
from archir.ir import fetch_attr

from .base import StandaloneError
from .naming import _display_path, _Names
from .submodules import _module_expr, method_owner_expr


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
    # (flat name, constructor expression, module): modules whose methods the graph runs, held
    # for nothing else (the model itself): plain attributes only (submodules.method_owner_expr)
    owners: list[tuple[str, str, nn.Module]] = field(default_factory=list)
    # ByMode target -> the names of the emitted methods: "forward" (picks by mode), "train", "eval"
    by_mode: dict[str, dict[str, str]] = field(default_factory=dict)


def graph_parts(gm: fx.GraphModule) -> list[tuple[str, str, fx.Graph]]:
    """What model.py writes a method for: ``("", "forward", gm.graph)``, then for each
    :class:`~archir.frontends.mode_split.ByMode` (a forward that differs by mode) its two tails
    as ``(target prefix, mode, graph)``: their targets are relative to the tail."""
    parts = [("", "forward", gm.graph)]
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(fetch_attr(gm, node.target), ByMode):
            by_mode = fetch_attr(gm, node.target)
            for mode in ("train", "eval"):
                tail = getattr(by_mode, f"{mode}_tail")
                if any(isinstance(fetch_attr(tail, n.target), ByMode) for n in tail.graph.nodes
                       if n.op == "call_module"):
                    raise StandaloneError(f"'{node.target}' holds a forward that differs by mode inside another")
                parts.append((f"{node.target}.{mode}_tail.", mode, tail.graph))
    return parts


def _plan(gm: fx.GraphModule) -> _Plan:
    plan, names = _Plan(), _Names()
    by_id: dict[int, str] = {}  # id(object) -> emitted path (shared modules/tensors stay shared)
    parts = graph_parts(gm)
    called = [prefix + n.target for prefix, _, graph in parts for n in graph.nodes if n.op == "call_module"]
    read = [prefix + n.target for prefix, _, graph in parts for n in graph.nodes if n.op == "get_attr"]
    methods = [t for t in called if isinstance(fetch_attr(gm, t), MethodCall)]
    for target in dict.fromkeys(t for t in called if isinstance(fetch_attr(gm, t), ByMode)):
        flat = names.flat(_display_path(gm, target))
        plan.targets[target] = flat
        plan.by_mode[target] = {"forward": flat, **{m: names.flat(f"{flat}_{m}") for m in ("train", "eval")}}
    called = [t for t in called if t not in methods and t not in plan.by_mode]

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
    for target in dict.fromkeys(methods):
        call = fetch_attr(gm, target)
        if id(call.owner) not in by_id:  # the model itself: rebuilt with its plain attributes
            display = f"{target} ({type(call.owner).__name__})"
            flat = names.flat(f"archir_{type(call.owner).__name__}_methods")
            plan.owners.append((flat, method_owner_expr(call.owner, display), call.owner))
            by_id[id(call.owner)] = flat
        plan.targets[target] = f"{by_id[id(call.owner)]}.{call.name}"
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
