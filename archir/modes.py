"""Module-mode helpers."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` in eval mode for the ``with`` block, then restore every submodule's own
    ``training`` flag (a model with some submodules frozen in eval mode keeps them so).

    The flags are restored even when the block raises. Yields ``module``::

        with eval_mode(model):
            y = model(x)
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode
