"""What the standalone backend shares: its error, the description of what it wrote, and the
names and limits every step uses."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from archir.errors import ArchirError


class StandaloneError(ArchirError):
    """The GraphModule cannot be written as a standalone torch-only model (or does not verify)."""


@dataclass(frozen=True)
class StandaloneFiles:
    """What :func:`emit_standalone` wrote.

    ``module_names`` maps each ``call_module``/``get_attr`` target of the GraphModule to the
    attribute path that holds it in the emitted class (``"layer1.0.conv1" -> "layer1_0_conv1"``;
    a parameter of a called module keeps its module: ``"fc.weight" -> "fc.weight"``).
    ``packages``: what model.py imports besides torch and the standard library (``torchvision``,
    for the classes of parts kept opaque that come from it); empty for most models.
    """

    model_py: Path
    weights: Path
    class_name: str
    num_parameters: int
    module_names: dict[str, str] = field(default_factory=dict)
    packages: tuple[str, ...] = ()


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
