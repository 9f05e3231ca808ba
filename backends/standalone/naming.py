"""Attribute names of the emitted class: flat, unique, valid Python."""
from __future__ import annotations

import keyword
import re

import torch.fx as fx

from .base import _MODULE_ATTRS


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
