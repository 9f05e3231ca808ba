"""Small torch-only modules that archir puts into traced graphs, and writes into standalone files.

They stand in for third-party layers, or functional code, whose behaviour depends on
``self.training`` (so that tracing would freeze the mode) and which ``torch.nn`` lacks. Each class
here must need nothing but ``torch``: the standalone backend copies its source into ``model.py``.
"""
from __future__ import annotations

import torch


class StochasticDepth(torch.nn.Module):
    """Drop whole residual branches at random while training (Huang et al., 2016).

    In training, ``y = x * m / (1 - p)`` with ``m ~ Bernoulli(1 - p)`` drawn once per example
    (``mode="row"``) or once per batch (``mode="batch"``); without ``scale_by_keep`` the division
    is skipped. In eval mode, or with ``p = 0``, ``y = x``. It draws random numbers exactly as
    ``torchvision.ops.StochasticDepth`` and ``timm``'s ``DropPath`` do, so a traced model gives the
    same outputs as the original under the same seed.
    """

    def __init__(self, p: float, mode: str = "row", scale_by_keep: bool = True):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"drop probability must be in [0, 1], got {p}")
        if mode not in ("row", "batch"):
            raise ValueError(f"mode must be 'row' or 'batch', got {mode!r}")
        self.p = p
        self.mode = mode
        self.scale_by_keep = scale_by_keep

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        shape = [x.shape[0]] + [1] * (x.ndim - 1) if self.mode == "row" else [1] * x.ndim
        mask = x.new_empty(shape).bernoulli_(keep)
        if keep > 0.0 and self.scale_by_keep:
            mask.div_(keep)
        return x * mask

    def extra_repr(self):
        return f"p={self.p!r}, mode={self.mode!r}, scale_by_keep={self.scale_by_keep!r}"


class TrainingDropoutAttention(torch.nn.Module):
    """Scaled dot-product attention whose attention-probability dropout acts only in training.

    ``y = dropout_p(softmax(q·kᵀ·s + mask))·v`` with ``s = scale`` (default ``1/sqrt(d)``) and
    ``dropout_p = p`` in training, ``0`` in eval: what ``F.scaled_dot_product_attention(...,
    dropout_p=p if self.training else 0.0)`` computes in a module's code (Hugging Face attention),
    which torch.export would fix at the traced mode. It calls that same function with the same
    arguments, so a traced model draws the same random numbers as the original under the same
    seed.
    """

    def __init__(self, p: float, is_causal: bool = False, scale: float | None = None,
                 enable_gqa: bool = False):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p
        self.is_causal = is_causal
        self.scale = scale
        self.enable_gqa = enable_gqa

    def forward(self, query, key, value, attn_mask=None):
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=self.p if self.training else 0.0,
            is_causal=self.is_causal, scale=self.scale, enable_gqa=self.enable_gqa)

    def extra_repr(self):
        return f"p={self.p!r}, is_causal={self.is_causal!r}, scale={self.scale!r}, enable_gqa={self.enable_gqa!r}"


# Classes the standalone backend may write into model.py by copying their source.
STANDALONE_CLASSES = (StochasticDepth, TrainingDropoutAttention)


def stochastic_depth_for(module: torch.nn.Module) -> StochasticDepth | None:
    """archir's equivalent of a known third-party drop-path module, or None.

    Recognised by class (``torchvision.ops.StochasticDepth``, ``timm``'s ``DropPath``), never by
    name alone: the attributes they keep are read back, and the module's mode is carried over.
    """
    cls = type(module)
    where = f"{cls.__module__}.{cls.__qualname__}"
    if where == "torchvision.ops.stochastic_depth.StochasticDepth":
        new = StochasticDepth(float(module.p), module.mode)
    elif cls.__qualname__ == "DropPath" and cls.__module__.split(".")[0] == "timm" \
            and isinstance(getattr(module, "drop_prob", None), (int, float)):
        new = StochasticDepth(float(module.drop_prob), "row", bool(getattr(module, "scale_by_keep", True)))
    else:
        return None
    return new.train(module.training)
