"""The text of model.py."""
from __future__ import annotations

import inspect
import re
import textwrap

import torch
import torch.fx as fx

from archir.layers import STANDALONE_CLASSES

from .forward import _forward, _torch_imports
from .naming import _attr_expr
from .plan import _Plan
from .submodules import (OBJECT_FN, OBJECT_SOURCE, REBUILD_SOURCE, copied_or_imported, required_packages,
                         user_class_source, user_classes)


def _layer_sources(plan: _Plan) -> list[str]:
    """The source of each :mod:`archir.layers` class the model holds (they need only torch)."""
    used = {type(m) for _, _, mod, _ in plan.modules for m in mod.modules()}
    return [f"# copied from {cls.__module__}\n" + textwrap.dedent(inspect.getsource(cls)).strip("\n")
            for cls in STANDALONE_CLASSES if cls in used]


def _docstring(class_name: str, gm: fx.GraphModule, header: str, num_parameters: int,
               packages: dict[str, list[str]] | None = None) -> str:
    import archir

    lines = [f"{class_name}: a standalone PyTorch model written by archir {archir.__version__}.", ""]
    if header.strip():
        lines += [*header.strip("\n").splitlines(), ""]
    lines += [
        f"Source: {type(gm).__name__} (torch.fx GraphModule), {num_parameters:,} parameters.",
        *(["Needs only PyTorch."] if not packages else [
            f"Needs PyTorch and {pkg}: the parts kept opaque ({', '.join(parts)}) are its classes."
            if parts else f"Needs PyTorch and {pkg} (model.py imports from it)." for pkg, parts in packages.items()]),
        "weights.pt beside this file holds the state_dict:",
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
    for flat, expr, owner in plan.owners:
        init.append(f"self.{flat} = {expr}  # runs {type(owner).__name__}'s own methods (no parameters)")
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
        "    # mmap: the file's pages are read as they are copied in, not loaded whole beside the model",
        '    model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True, mmap=True))',
        "    return model",
    ]
    body_text = "\n".join(body)
    if "collections.OrderedDict" in body_text:
        imports.append("import collections")
    aliases = [d for d in defs if not d.startswith("#")]
    functions = [d for d in defs if d.startswith("#")] + _layer_sources(plan)
    classes = user_classes(mod for _, _, mod, _ in plan.modules)
    classes += [type(owner) for _, _, owner in plan.owners if type(owner) not in classes]
    if classes:  # user-defined modules kept opaque: their classes are copied or imported (checked when built)
        for cls in classes:
            if copied_or_imported(cls) is not None:
                continue  # an installed package's class that model.py imports (see below)
            lines, src = user_class_source(cls)
            imports += [line for line in lines if line.startswith("import ")]
            aliases += [line for line in lines if not line.startswith("import ") and line not in aliases]
            functions.append(src)
        functions.append(REBUILD_SOURCE)
    if f"{OBJECT_FN}(" in body_text:
        functions.append(OBJECT_SOURCE)
    packages = tuple(required_packages(body_text))
    code = "\n".join(defs) + "\n" + body_text
    std = sorted({line for line in imports if not line.split()[1].startswith("torch")})
    tch = sorted({line for line in imports + _torch_imports(code)
                  if line.split()[1].startswith("torch")} - {"import torch"})
    pkg = sorted(set(_torch_imports(code, packages)) - set(tch) - {"import torch"})
    opaque = {p: [display for _, expr, _, display in plan.modules if p in required_packages(expr)]
              + [f"{type(owner).__name__}'s own methods" for _, expr, owner in plan.owners
                 if p in required_packages(expr)] for p in packages}
    head = [_docstring(class_name, gm, header, num_parameters, opaque), "",
            *std, "from pathlib import Path", "", "import torch", *tch, *([""] + pkg if pkg else [])]
    text = "\n".join(head) + "\n"
    if aliases:
        text += "\n" + "\n".join(aliases) + "\n"
    for fn in functions:
        text += "\n\n" + fn + "\n"
    return text + "\n\n" + body_text + "\n"
