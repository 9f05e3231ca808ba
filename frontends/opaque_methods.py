"""A method of a module (other than ``forward``) kept as one opaque operation.

A torchvision detector's own ``forward`` calls methods that no tracer follows:
``self.postprocess_detections(...)`` (RetinaNet, FCOS, SSD: how many boxes survive depends on the
scores), ``self.compute_loss(...)``, and ``self.transform.postprocess(...)`` (Mask R-CNN pastes
masks at sizes it reads as Python numbers). The root cannot be kept opaque, and ``transform``
already is, yet these calls are not calls of a module, so keeping modules opaque does not reach
them. Here such a call becomes a ``call_module`` of a :class:`MethodCall` registered on the root
(``archir_<path>_<method>``), which calls the method itself; the value tracer
(:mod:`.value_trace`) hands its result back as Python containers, as for any opaque module.

A method is named ``"<module path>:<method>"`` (the root's path is empty: ``":compute_loss"``).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import re
from typing import Iterable, Iterator

from torch import nn

SEPARATOR = ":"


def method_key(path: str, name: str) -> str:
    return f"{path}{SEPARATOR}{name}"


def is_method_key(key: str) -> bool:
    return SEPARATOR in key


def split_method_key(key: str) -> tuple[str, str]:
    """``"path:name"`` -> ``(path, name)``."""
    path, name = key.split(SEPARATOR)
    return path, name


class MethodCall(nn.Module):
    """``owner.<name>(*args, **kwargs)``, the method as its class defines it.

    ``owner`` is held, not registered as a submodule: it may be the root itself (a cycle), and
    its parameters belong to the model's own tree. A method that runs a module with parameters
    is refused when tracing (:func:`parametrised_calls`): its parameters would be hidden inside
    one opaque operation. (Tensors the method reads from its module directly stay where the
    model was traced: ``.to(device)`` does not reach them.)"""

    def __init__(self, owner: nn.Module, name: str):
        super().__init__()
        self.__dict__["owner"] = owner  # not a submodule (see above)
        self.name = name

    def forward(self, *args, **kwargs):
        return getattr(type(self.owner), self.name)(self.owner, *args, **kwargs)

    def __deepcopy__(self, memo):
        # the owner's copy where the copy being made holds it (the root, an opaque part), else
        # the owner itself: a copy of a lowered graph would otherwise copy the whole model again
        clone = MethodCall.__new__(MethodCall)
        memo[id(self)] = clone
        for key, value in self.__dict__.items():
            clone.__dict__[key] = memo.get(id(value), value) if key == "owner" else copy.deepcopy(value, memo)
        return clone

    def extra_repr(self) -> str:
        return f"{type(self.owner).__name__}.{self.name}"


def attribute_name(key: str) -> str:
    path, name = split_method_key(key)
    return "archir_" + re.sub(r"\W", "_", f"{path or 'self'}_{name}")


@contextlib.contextmanager
def calls_through(root: nn.Module, keys: Iterable[str]) -> Iterator[None]:
    """While tracing: each method in ``keys`` is, on its module, a :class:`MethodCall` registered
    on ``root`` (a ``call_module`` to a tracer). The MethodCalls stay registered afterwards (the
    traced graph calls them); the methods are given back."""
    patched = []
    try:
        for key in keys:
            path, name = split_method_key(key)
            owner = root.get_submodule(path)
            attr = attribute_name(key)
            if not hasattr(root, attr):
                root.add_module(attr, MethodCall(owner, name))
            owner.__dict__[name] = getattr(root, attr)  # found before the class's method
            patched.append((owner, name))
        yield
    finally:
        for owner, name in patched:
            owner.__dict__.pop(name, None)


def method_keys(frames: Iterable[tuple[object, str]], root: nn.Module) -> list[str]:
    """``"path:name"`` of each ``(self, function name)`` in ``frames`` (innermost first) that is a
    method of ``root`` or of one of its submodules, once each, in that order."""
    paths = {id(m): p for p, m in root.named_modules(remove_duplicate=False)}
    return list(dict.fromkeys(method_key(paths[id(owner)], name) for owner, name in frames
                              if isinstance(owner, nn.Module) and id(owner) in paths and is_method_of(owner, name)))


def methods_on_stack(root: nn.Module) -> list[str]:
    """:func:`method_keys` of the frames now running, innermost first."""
    frames, frame = [], inspect.currentframe()
    while frame is not None:
        frames.append((frame.f_locals.get("self"), frame.f_code.co_name))
        frame = frame.f_back
    return method_keys(frames, root)


def is_method_of(owner: nn.Module, name: str) -> bool:
    """Whether ``name`` is a method of ``owner``'s class other than ``forward`` and nn.Module's."""
    return name != "forward" and callable(getattr(type(owner), name, None)) and not hasattr(nn.Module, name)


@contextlib.contextmanager
def parametrised_calls() -> Iterator[list[nn.Module]]:
    """The modules with parameters of their own that run while the block runs."""
    from torch.nn.modules.module import register_module_forward_pre_hook

    found: list[nn.Module] = []

    def hook(module, args):  # noqa: ARG001
        if next(module.parameters(recurse=False), None) is not None:
            found.append(module)

    handle = register_module_forward_pre_hook(hook)
    try:
        yield found
    finally:
        handle.remove()
