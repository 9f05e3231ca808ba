"""Multiply-add counts of the operations that dominate a network's cost.

FLOPs here are multiply-accumulates (MACs) as vision papers report them: for a convolution,
``out.numel() * (C_in / groups) * prod(kernel)``; for a linear map, ``out.numel() * in_features``;
for a matrix product, ``out.numel() * K`` with K the contracted dimension. Other operations count 0.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import nn

_CONV_FUNCS = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}
_LINEAR_FUNCS = {F.linear}
_MATMUL_FUNCS = {torch.matmul, operator.matmul, torch.mm, torch.bmm}
_MATMUL_METHODS = {"matmul", "mm", "bmm", "__matmul__"}


def _aten(name: str):
    packet = getattr(torch.ops.aten, name, None)
    return {getattr(packet, o) for o in packet.overloads()} if packet is not None else set()


_ATEN_CONV = _aten("conv1d") | _aten("conv2d") | _aten("conv3d") | _aten("convolution")
_ATEN_LINEAR = _aten("linear")
_ATEN_MATMUL = _aten("matmul") | _aten("mm") | _aten("bmm")


def module_flops(module: nn.Module, in_shape, out_shape) -> int:
    out_numel = math.prod(out_shape) if out_shape is not None else 0
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        in_numel = math.prod(in_shape) if in_shape is not None else 0
        return in_numel * (module.out_channels // module.groups) * math.prod(module.kernel_size)
    if isinstance(module, nn.modules.conv._ConvNd):
        return out_numel * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    if isinstance(module, nn.Linear):
        return out_numel * module.in_features
    return 0


def function_flops(target, kind: str, arg_shapes: list, out_shape) -> int:
    """``arg_shapes``: shapes of the tensor arguments in order (None for non-tensors)."""
    out_numel = math.prod(out_shape) if out_shape is not None else 0
    if kind == "call_function" and (target in _CONV_FUNCS or target in _ATEN_CONV):
        w = arg_shapes[1] if len(arg_shapes) > 1 else None
        return out_numel * math.prod(w[1:]) if w else 0
    if kind == "call_function" and (target in _LINEAR_FUNCS or target in _ATEN_LINEAR):
        w = arg_shapes[1] if len(arg_shapes) > 1 else None
        return out_numel * w[-1] if w else 0
    if (kind == "call_function" and (target in _MATMUL_FUNCS or target in _ATEN_MATMUL)) or (
            kind == "call_method" and target in _MATMUL_METHODS):
        a = arg_shapes[0] if arg_shapes else None
        return out_numel * a[-1] if a else 0
    return 0
