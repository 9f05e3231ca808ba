"""Functions the lowered supernet calls for a ``choice`` operation (see passes/edge_choice.py).

A choice edge mixes its candidates with weights ``w = θ / Σ_valid θ`` (:func:`mix_weights`, the
normalised form) or ``w = θ`` (:func:`linear_weights`, the paper's Eq. (1)). Where the original
path ends in an affine BatchNorm, the weight of *same* is folded into that BatchNorm's γ and β
instead of scaling the activations afterwards:

    w_same · (γ·x̂ + β) = (w_same·γ)·x̂ + w_same·β                  (any w_same)
    w_same · relu(γ·x̂ + β) = relu((w_same·γ)·x̂ + w_same·β)        (w_same ≥ 0 only)

so a ReLU may follow the BatchNorm only in the normalised form (θ ≥ 0); in the linear form θ may
go negative and the fold is used only where the BatchNorm ends the path.

This is the same function and, by the chain rule, the same gradients, but it costs no pass over
the activations: ∂L/∂w_same = Σ_c (γ_c ∂L/∂γ'_c + β_c ∂L/∂β'_c) comes out of BatchNorm's own
backward. At w_same = 1 the scaled γ', β' equal γ, β bit for bit, so parity at initialisation holds.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Activations that commute with a non-negative scale: relu(s·y) = s·relu(y) for s ≥ 0.
POSITIVELY_HOMOGENEOUS = (nn.ReLU,)


def mix_weights(theta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """θ normalised over the valid slots (``mask``); the clamp only guards θ = 0 everywhere."""
    return theta / (theta * mask).sum().clamp_min(1e-12)


def linear_weights(theta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The paper's Eq. (1): the weights are θ itself, unnormalised and unconstrained (an invalid
    slot's weight never enters the mix, so ``mask`` is not needed)."""
    return theta


# θ's form -> the function from (θ, mask) to the mixing weights
MIX_FORMS = {"normalised": mix_weights, "linear": linear_weights}


def foldable_batch_norm(module: nn.Module) -> bool:
    """Whether ``scaled_batch_norm`` reproduces ``module`` exactly (an affine torch BatchNorm)."""
    return type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d) and module.affine


def scaled_batch_norm(x: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm, scale: torch.Tensor) -> torch.Tensor:
    """``scale · bn(x)`` with the scale folded into γ and β.

    Follows ``torch.nn.modules.batchnorm._BatchNorm.forward`` step for step (batch statistics in
    training, running-statistics update with ``momentum`` or the cumulative average when it is
    None, ``num_batches_tracked``), so at ``scale = 1`` it is ``bn(x)`` bit for bit.
    """
    bn._check_input_dim(x)
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep_running = not bn.training or bn.track_running_stats
    return F.batch_norm(x, bn.running_mean if keep_running else None, bn.running_var if keep_running else None,
                        bn.weight * scale, bn.bias * scale, use_batch_stats, factor, bn.eps)
