"""Scoring the architectures of a weight-sharing supernet on held-out data (NAO-WS, one-shot NAS).

A supernet trained with random paths has BatchNorm running statistics averaged over many
architectures, so an architecture scored with them is scored on the wrong statistics (Guo et al.,
*Single Path One-Shot*, sec. 3.3; NAO-WS likewise). :class:`ArchEvaluator` therefore first
re-estimates them for the architecture the supernet computes now:

    μ_B ← (1/n) Σ_i μ_i,   σ²_B ← (1/n) Σ_i σ²_i           (``momentum=None``: the cumulative mean)

over a fixed list of calibration batches (training data, forward passes in training mode,
no gradients), then evaluates the task's metric (``archir.task``: higher is better; never
assumed to be accuracy or cross-entropy) on a fixed list of held-out batches. Both lists are
materialised once, so the same architecture on the same weights always gets the same score.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .task import Task, classification_task


def _take(loader: Iterable | None, n: int | None) -> list:
    if loader is None:
        return []
    return list(loader if n is None else itertools.islice(loader, n))


class ArchEvaluator:
    """``score(module)``: recalibrate BatchNorm on ``calibration`` then the task's mean metric on
    ``data`` (held-out batches). ``calibration_batches`` / ``max_batches`` cap how many batches
    of each loader are kept (None: all of the held-out loader); ``log`` receives progress lines."""

    def __init__(self, data: Iterable, calibration: Iterable | None, task: Task | None = None,
                 device: str | torch.device = "cpu", *, calibration_batches: int = 4,
                 max_batches: int | None = None, log: Callable[[str], None] | None = None):
        self.task = task or classification_task()
        self.log = log  # where a search strategy reports progress (None: quiet)
        self.device = torch.device(device)
        self._loaders = (data, calibration)
        self.max_batches, self.calibration_batches = max_batches, calibration_batches
        self._batches: list | None = None
        self._calibration: list | None = None
        self.metric_name = self.task.metric_name
        self.calls = 0

    def configure(self, *, max_batches: int | None = None, calibration_batches: int | None = None) -> None:
        """Change the caps before the first use (a method's own settings, e.g. NAO's ``eval_batches``)."""
        if self._batches is None:
            self.max_batches = max_batches
            if calibration_batches is not None:
                self.calibration_batches = calibration_batches

    @property
    def batches(self) -> list:
        """The held-out batches (taken from the loader once, on first use)."""
        if self._batches is None:
            self._batches = _take(self._loaders[0], self.max_batches)
        return self._batches

    @property
    def calibration(self) -> list:
        """The calibration batches (taken once, on first use)."""
        if self._calibration is None:
            self._calibration = _take(self._loaders[1], self.calibration_batches)
        return self._calibration

    @torch.no_grad()
    def recalibrate(self, module: nn.Module) -> int:
        """Re-estimate the running statistics of every BatchNorm of ``module`` that tracks them
        (cumulative mean over the calibration batches); returns how many were reset. Nothing
        happens without calibration batches."""
        from .task import move_to

        bns = [m for m in module.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        if not bns or not self.calibration:
            return 0
        momenta = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        was = module.training
        module.train()
        try:
            for batch in self.calibration:
                args, kwargs, _ = move_to(self.task.split_batch(batch), self.device)
                module(*args, **kwargs)
        finally:
            module.train(was)
            for m, mom in zip(bns, momenta):
                m.momentum = mom
        return len(bns)

    def score(self, module: nn.Module, recalibrate: bool = True) -> float:
        """The task's metric of ``module`` on the held-out batches (after :meth:`recalibrate`)."""
        from .training import evaluate

        if recalibrate:
            self.recalibrate(module)
        self.calls += 1
        return float(evaluate(module, self.batches, self.device, self.task)[1])

    def describe(self) -> dict[str, Any]:
        """What the scores were computed on (for reports)."""
        return {"metric": self.metric_name, "held_out_batches": len(self.batches),
                "calibration_batches": len(self.calibration)}
