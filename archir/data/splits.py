"""Deterministic (stratified) splits of a data set."""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from .datasets import DataError, ImageTensorDataset

# --------------------------------------------------------------------------------------------
# Deterministic splits
# --------------------------------------------------------------------------------------------


def _held_out_count(n: int, fraction: float) -> int:
    """``ceil(fraction * n)``, scikit-learn's convention for the size of a held-out part."""
    return math.ceil(fraction * n - 1e-9)


def _stratified_split(labels: Tensor, n_second: int, seed: int) -> tuple[Tensor, Tensor]:
    """Split sample indices into two sorted parts, the second of ``n_second`` samples.

    Each class contributes to the second part in proportion to its size (largest remainder
    rounding, ties to the smaller class index); which samples go is drawn from a
    ``torch.Generator`` seeded with ``seed``, so the split depends only on labels and seed.
    """
    labels = labels.to(torch.int64).cpu()
    n = labels.numel()
    if not 0 <= n_second <= n:
        raise DataError(f"cannot take {n_second} of {n} samples")
    generator = torch.Generator().manual_seed(seed)
    classes, counts = torch.unique(labels, return_counts=True)
    quota = counts.to(torch.float64) * n_second / max(n, 1)
    take = quota.floor().to(torch.int64)
    remaining = n_second - int(take.sum())
    for i in torch.argsort(take - quota, stable=True).tolist():  # largest remainder first
        if remaining == 0:
            break
        if take[i] < counts[i]:
            take[i] += 1
            remaining -= 1
    first: list[Tensor] = []
    second: list[Tensor] = []
    for cls, k in zip(classes.tolist(), take.tolist()):
        members = (labels == cls).nonzero().flatten()
        members = members[torch.randperm(members.numel(), generator=generator)]
        second.append(members[:k])
        first.append(members[k:])
    empty = torch.empty(0, dtype=torch.int64)
    part_a = torch.cat(first).sort().values if first else empty
    part_b = torch.cat(second).sort().values if second else empty
    return part_a, part_b


def _dataset_targets(dataset: Dataset) -> Tensor | None:
    """Labels of a generic data set when it exposes them (``targets`` / ``labels``), else None."""
    for name in ("targets", "labels"):
        values = getattr(dataset, name, None)
        if values is None:
            continue
        try:
            tensor = torch.as_tensor(values)
        except (TypeError, ValueError, RuntimeError):
            continue
        if tensor.dim() == 1 and tensor.numel() == len(dataset) and not tensor.is_floating_point():
            return tensor
    return None


def split_train(dataset: Dataset, fraction: float = 0.5, seed: int = 0
                ) -> tuple[Dataset, Dataset]:
    """Deterministically split a training set into ``(part_a, part_b)``.

    ``part_b`` holds ``ceil(fraction * len(dataset))`` samples (the held-out part, e.g. the
    architecture-update half in the "split" mode), ``part_a`` the rest. The split is stratified
    by class for an :class:`ImageTensorDataset` (both parts keep its ``mean`` and ``std``) and
    for any data set with integer ``targets``; other data sets are split by a seeded random
    permutation and returned as :class:`torch.utils.data.Subset`.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"split fraction must lie strictly between 0 and 1, got {fraction}")
    n = len(dataset)  # type: ignore[arg-type]
    n_b = _held_out_count(n, fraction)
    if n_b == 0 or n_b == n:
        raise DataError(f"splitting {n} samples with fraction {fraction} leaves a part empty")
    if isinstance(dataset, ImageTensorDataset):
        idx_a, idx_b = _stratified_split(dataset.labels, n_b, seed)
        return (dataset.subset(idx_a, f"{dataset.source} [split part a, seed {seed}]"),
                dataset.subset(idx_b, f"{dataset.source} [split part b, seed {seed}]"))
    targets = _dataset_targets(dataset)
    if targets is not None:
        idx_a, idx_b = _stratified_split(targets, n_b, seed)
    else:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        idx_a, idx_b = order[n_b:].sort().values, order[:n_b].sort().values
    return Subset(dataset, idx_a.tolist()), Subset(dataset, idx_b.tolist())
