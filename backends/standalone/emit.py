"""The entry point: :func:`emit_standalone`."""
from __future__ import annotations

import keyword
from pathlib import Path

import torch
import torch.fx as fx

from archir.fileio import save_torch, write_text

from .base import _FILE_NAMES, StandaloneError, StandaloneFiles
from .checks import _check_built, _exec_source, _verify
from .plan import _plan
from .source import _source


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
