"""The plan: what the emitted class holds (modules, tensors, ties) and under which names."""
from __future__ import annotations

import ast
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from archir.ir import fetch_attr

from .base import StandaloneError
from .naming import _display_path, _Names
from .submodules import _module_expr


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
