"""Multiply-add counts of the operations that dominate a network's cost.

FLOPs here are multiply-accumulates (MACs) as vision papers report them: for a convolution,
``out.numel() * (C_in / groups) * prod(kernel)``; for a linear map, ``out.numel() * in_features``;
for a matrix product, ``out.numel() * K`` with K the contracted dimension. Biases, activations,
normalisations and other elementwise work count 0.

Opaque leaves (a module kept as one call):

* **Recurrent layers** (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``, as modules or as the ATen
  ``lstm``/``gru``/``rnn_tanh``/``rnn_relu`` calls torch.export leaves) count their gate matrix
  products at every time step::

      MACs = B · T · Σ_layers D · G · H · (I_l + H_out)   (+ B · T · L · D · H · H_out with proj_size)

  with G gates (RNN 1, GRU 3, LSTM 4), hidden size H, H_out = ``proj_size`` or H, D = 2 when
  bidirectional (else 1), I_0 = ``input_size`` and I_l = D · H_out for the later layers, sequence
  length T and batch B. For one layer without projection this is
  ``G · H · (I + H) · T · D`` per example. It equals B · T times the sum of the element counts of
  the layer's weight matrices (``weight_ih_l*``, ``weight_hh_l*``, ``weight_hr_l*``), which is how it
  is computed. The cells (``nn.RNNCell``, ``nn.LSTMCell``, ``nn.GRUCell``) count one step:
  ``B · G · H · (I + H)``.
* **nn.MultiheadAttention** kept whole (and ``scaled_dot_product_attention``) counts the input
  projections ``N_q·E·E + N_k·kdim·E + N_v·vdim·E`` (N_* = number of query/key/value vectors),
  the attention products ``N_q · S · 2E`` (S = source length, + 1 each with ``add_bias_kv`` /
  ``add_zero_attn``) and the output projection ``N_q · E · E``.
* **Any other module kept opaque** (a user-defined module or a container in ``leaf_modules``, or
  one made opaque because tracing could not follow it; :func:`counted_by_costs` is False) counts
  what it ran on the example input: the frontend runs each such call under
  ``torch.utils.flop_counter.FlopCounterMode``, whose FLOPs (2 per multiply-add of a convolution,
  a matrix product or attention) are halved. Work that depends on the input's values (a loop over
  detected boxes) is counted as the example ran it.

The frontend divides every count by the leading dimension of the model's first input, so the
numbers in the IR are per example.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch import nn

from archir.layers import TrainingDropoutAttention

_CONV_FUNCS = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d}
_LINEAR_FUNCS = {F.linear}
_MATMUL_FUNCS = {torch.matmul, operator.matmul, torch.mm, torch.bmm}
_MATMUL_METHODS = {"matmul", "mm", "bmm", "__matmul__"}
_SDPA_FUNCS = {F.scaled_dot_product_attention}


def _aten(name: str):
    packet = getattr(torch.ops.aten, name, None)
    return {getattr(packet, o) for o in packet.overloads()} if packet is not None else set()


_ATEN_CONV = _aten("conv1d") | _aten("conv2d") | _aten("conv3d") | _aten("convolution")
_ATEN_LINEAR = _aten("linear")
_ATEN_MATMUL = _aten("matmul") | _aten("mm") | _aten("bmm")
_ATEN_SDPA = _aten("scaled_dot_product_attention")
# ATen recurrent calls with their (input, hx, params, ...) signature: torch.export keeps them whole
ATEN_RNN = _aten("lstm") | _aten("gru") | _aten("rnn_tanh") | _aten("rnn_relu")


def rnn_flops(in_shape, input_size: int, weight_shapes) -> int:
    """MACs of a recurrent layer (see the module docstring): the number of input vectors
    (``prod(in_shape) / input_size`` = B · T) times the element count of its weight matrices."""
    if in_shape is None or not input_size:
        return 0
    steps = math.prod(in_shape) // input_size
    return steps * sum(math.prod(s) for s in weight_shapes if s is not None and len(s) == 2)


def _rnn_weight_shapes(module: nn.Module) -> list[tuple[int, ...]]:
    return [tuple(p.shape) for name, p in module.named_parameters(recurse=False)
            if name.startswith("weight_") and p.dim() == 2]


def _attention_flops(module: nn.MultiheadAttention, arg_shapes: list) -> int:
    shapes = [s for s in (arg_shapes or [])[:3]]
    if len(shapes) < 3 or any(s is None or not s for s in shapes):
        return 0
    q, k, v = shapes
    e, kdim, vdim = module.embed_dim, module.kdim, module.vdim
    n_q, n_k, n_v = math.prod(q) // e, math.prod(k) // kdim, math.prod(v) // vdim
    source = k[1] if module.batch_first and len(k) == 3 else k[0]
    source += int(module.bias_k is not None) + int(module.add_zero_attn)
    return n_q * e * e + n_k * kdim * e + n_v * vdim * e + n_q * source * 2 * e + n_q * e * e


def counted_by_costs(module: nn.Module) -> bool:
    """Whether :func:`module_flops` accounts for ``module`` (a torch.nn layer, counted or zero by
    the convention above); False for an opaque module whose work must be measured."""
    if isinstance(module, TrainingDropoutAttention):
        return True
    if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return False
    return type(module).__module__.startswith("torch.nn.")


def module_flops(module: nn.Module, in_shape, out_shape, arg_shapes: list | None = None) -> int:
    """MACs of one call of ``module``: ``in_shape`` is its first tensor argument's shape,
    ``arg_shapes`` the shapes of all its tensor arguments in order (None for non-tensors)."""
    out_numel = math.prod(out_shape) if out_shape is not None else 0
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        in_numel = math.prod(in_shape) if in_shape is not None else 0
        return in_numel * (module.out_channels // module.groups) * math.prod(module.kernel_size)
    if isinstance(module, nn.modules.conv._ConvNd):
        return out_numel * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    if isinstance(module, nn.Linear):
        return out_numel * module.in_features
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        return rnn_flops(in_shape, module.input_size, _rnn_weight_shapes(module))
    if isinstance(module, nn.MultiheadAttention):
        return _attention_flops(module, arg_shapes if arg_shapes is not None else [in_shape] * 3)
    if isinstance(module, TrainingDropoutAttention):  # the SDPA call it wraps
        return function_flops(F.scaled_dot_product_attention, "call_function",
                              arg_shapes if arg_shapes is not None else [in_shape] * 3, out_shape)
    return 0  # unknown, in particular a user-defined module kept opaque


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
    if kind == "call_function" and (target in _SDPA_FUNCS or target in _ATEN_SDPA):
        q, k, v = (list(arg_shapes) + [None] * 3)[:3]
        if not (q and k and v):
            return 0
        return math.prod(q[:-1]) * k[-2] * (q[-1] + v[-1])
    return 0
