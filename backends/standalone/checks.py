"""Checks of the emitted model: its definitions run, its state_dict matches the source tensors,
and (with example inputs) its outputs equal the GraphModule's bit for bit."""
from __future__ import annotations

import ast
import copy
import importlib.util
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from archir.modes import eval_mode

from .base import StandaloneError
from .plan import _Plan
from .submodules import _tensors


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


def _verify(gm: fx.GraphModule, model_py: Path, weights: Path, class_name: str, inputs: tuple,
            plan: _Plan) -> None:
    """model.py and weights.pt, imported afresh, give ``gm``'s outputs on ``inputs`` bit for bit
    in eval mode, and in training mode too where the forward differs by mode."""
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
    with torch.no_grad(), eval_mode(gm):
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
    if plan.by_mode:  # the forward differs by mode: check the training-mode end too
        _verify_training(gm, emitted, model_py, inputs)


def _verify_training(gm: fx.GraphModule, emitted: nn.Module, model_py: Path, inputs: tuple) -> None:
    """Both in training mode, on copies (training updates BatchNorm statistics), from the same
    random state (a detector's heads sample), without disturbing the caller's."""
    outputs = []
    for module in (gm, emitted):
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(0)
            try:
                outputs.append(copy.deepcopy(module).train()(*inputs))
            except Exception as exc:  # noqa: BLE001
                raise StandaloneError(f"running {model_py} in training mode on the example inputs failed: "
                                      f"{type(exc).__name__}: {exc}") from exc
    problem = _mismatch(*outputs)
    if problem:
        raise StandaloneError(f"{model_py} does not reproduce the GraphModule on the example inputs "
                              f"(training mode): {problem}. The files were left in place for inspection.")
