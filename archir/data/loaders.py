"""Batch loaders: on-device augmentation, :class:`BatchLoader`, :class:`DeviceDataLoader` and
:func:`as_loader`."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .datasets import DataError, Device, ImageTensorDataset

# Loaders copy a whole data set to an accelerator once when it is at most this large.
_PRELOAD_MAX_BYTES = 2 << 30


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


class Loader(Protocol):
    """What training code needs from a loader: ``len()`` batches of ``(x, y)`` on ``device``."""

    device: torch.device
    batch_size: int

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]: ...


def _crop_flip(x: Tensor, offsets: Tensor, flips: Tensor, padding: int) -> Tensor:
    """Crop ``x`` (``N x C x H x W``) at ``offsets`` (``2 x N``: row, column, in
    ``0..2*padding``) from its zero-padded copy and mirror the samples where ``flips`` is true.

    One ``gather`` on the padded batch: output pixel ``(i, j)`` of sample ``n`` is padded pixel
    ``(offsets[0, n] + i, offsets[1, n] + j')`` with ``j' = W - 1 - j`` when flipped, else ``j``.
    """
    n, c, h, w = x.shape
    device = x.device
    padded = F.pad(x, (padding, padding, padding, padding)) if padding else x
    width = w + 2 * padding
    rows = offsets[0].view(n, 1) + torch.arange(h, device=device)
    columns = torch.arange(w, device=device).expand(n, w)
    columns = torch.where(flips.view(n, 1), columns.flip(1), columns) + offsets[1].view(n, 1)
    index = (rows.view(n, h, 1) * width + columns.view(n, 1, w)).view(n, 1, h * w)
    flat = padded.reshape(n, c, -1)
    return flat.gather(2, index.expand(n, c, h * w)).view(n, c, h, w)


def augment_batch(x: Tensor, *, padding: int = 4, flip: bool = True, cutout: int = 0,
                  generator: torch.Generator | None = None) -> Tensor:
    """CIFAR-standard augmentation of a whole batch ``N x C x H x W`` (any dtype, any device).

    Each sample is padded with ``padding`` zeros on every side, cropped back to ``H x W`` at a
    uniformly random offset, and (if ``flip``) mirrored left-right with probability 1/2; then,
    if ``cutout`` > 0, a ``cutout x cutout`` square is zeroed in it (:func:`cutout_batch`). The
    random numbers are drawn on the CPU from ``generator`` (so a seed gives the same result on
    every device) and moved to ``x.device``. Returns a new contiguous tensor of ``x``'s dtype.
    On ``uint8`` pixels the padding (and a cutout square) is black, as in torchvision's
    ``RandomCrop(padding=4)``; on normalised floats it is the value 0, i.e. the data set mean.
    """
    if x.dim() != 4:
        raise DataError(f"augment_batch expects a batch N x C x H x W, got {tuple(x.shape)}")
    if padding < 0:
        raise DataError(f"padding must be non-negative, got {padding}")
    n = x.shape[0]
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator)
    flips = (torch.rand(n, generator=generator) < 0.5) if flip else torch.zeros(n, dtype=torch.bool)
    out = _crop_flip(x, offsets.to(x.device), flips.to(x.device), padding)
    return cutout_batch(out, cutout, generator=generator) if cutout else out


def cutout_batch(x: Tensor, size: int, *, generator: torch.Generator | None = None) -> Tensor:
    """Cutout (DeVries & Taylor 2017, "Improved Regularization of Convolutional Neural Networks
    with Cutout"): in every sample of ``x`` (``N x C x H x W``) zero all channels of a
    ``size x size`` square centred at a uniformly random pixel, clipped at the image borders
    (a centre near a border zeroes less than ``size**2`` pixels), with probability 1 as in
    their CIFAR-10 code and in DARTS. Rows ``cy - size // 2`` to ``cy - size // 2 + size - 1``
    (the same for columns): for an even ``size`` exactly the reference's square, for an odd
    one a full ``size`` (the reference zeroes ``size - 1``).

    The value written is 0 in ``x``'s own value space: on normalised batches (how the loaders
    apply it, after normalisation) that is the data set's mean, as in the reference; on ``uint8``
    pixels it is black. The centres are drawn on the CPU from ``generator`` (row, then column,
    per batch) and moved to ``x.device``; ``size == 0`` returns ``x`` itself."""
    if x.dim() != 4:
        raise DataError(f"cutout expects a batch N x C x H x W, got {tuple(x.shape)}")
    if size < 0:
        raise DataError(f"cutout size must be non-negative, got {size}")
    if size == 0:
        return x
    n, _, h, w = x.shape
    top = torch.randint(0, h, (n, 1), generator=generator).to(x.device) - size // 2
    left = torch.randint(0, w, (n, 1), generator=generator).to(x.device) - size // 2
    rows = torch.arange(h, device=x.device).view(1, h)
    columns = torch.arange(w, device=x.device).view(1, w)
    in_rows = (rows >= top) & (rows < top + size)  # N x H
    in_columns = (columns >= left) & (columns < left + size)  # N x W
    mask = (in_rows.view(n, 1, h, 1) & in_columns.view(n, 1, 1, w))
    return x.masked_fill(mask, 0).contiguous()


def _check_cutout(cutout: int) -> None:
    if cutout < 0:
        raise DataError(f"cutout must be non-negative, got {cutout}")


def _cpu_generator(seed: int, generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        return torch.Generator().manual_seed(seed)
    if generator.device.type != "cpu":
        raise DataError(f"the loader's generator must live on the CPU, got {generator.device}")
    return generator


class BatchLoader:
    """Fast batches from an :class:`ImageTensorDataset`: slice, move, augment, normalise.

    Each epoch (each ``iter()``) draws a permutation from a CPU ``torch.Generator`` (when
    ``shuffle``), gathers each batch of ``uint8`` images with one ``index_select``, moves it to
    ``device``, applies :func:`augment_batch` (when ``augment``), normalises with the data
    set's ``mean`` and ``std`` and then applies :func:`cutout_batch` (when ``cutout`` > 0; after
    normalisation, so the square holds the data set mean, as in DeVries & Taylor's code).
    Batches are contiguous NCHW ``float32`` with ``int64`` labels.

    Loaders built with the same seed (or equally seeded generators) yield identical batch
    sequences, on any device; successive epochs of one loader differ. On an accelerator the
    whole ``uint8`` data set is copied there once (``preload``; by default when it is at most
    2 GiB), and the indices are moved to it.

    Args:
        dataset: the data set.
        batch_size: samples per batch; the last batch is smaller unless ``drop_last``.
        shuffle: draw a new order every epoch.
        augment: random crop with ``padding`` zero pixels and random horizontal flip.
        device: where batches are delivered.
        seed: seed of the loader's generator when ``generator`` is not given.
        generator: a CPU generator to draw from instead (shared state, not copied).
        drop_last: drop the last incomplete batch.
        padding: crop padding for ``augment``.
        preload: keep a copy of the data set on ``device`` (default: automatic, see above).
        cutout: side in pixels of the cutout square (0: none); applied with or without
            ``augment``, after it, drawn from the same generator.
    """

    def __init__(
        self,
        dataset: ImageTensorDataset,
        batch_size: int = 128,
        shuffle: bool = False,
        augment: bool = False,
        device: Device = "cpu",
        seed: int = 0,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        padding: int = 4,
        preload: bool | None = None,
        cutout: int = 0,
    ) -> None:
        if not isinstance(dataset, ImageTensorDataset):
            raise DataError(f"BatchLoader needs an ImageTensorDataset, got "
                            f"{type(dataset).__name__}; use as_loader() for other data sets")
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        _check_cutout(cutout)
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.augment = augment
        self.cutout = int(cutout)
        self.device = torch.device(device)
        self.generator = _cpu_generator(seed, generator)
        self.drop_last = drop_last
        self.padding = padding
        if preload is None:
            preload = self.device.type != "cpu" and dataset.images.nbytes <= _PRELOAD_MAX_BYTES
        self.preload = preload and self.device.type != "cpu"
        channels = dataset.images.shape[1]
        std = dataset.std.to(torch.float64)
        # (pixel / 255 - mean) / std == pixel * scale - shift
        self._scale = (1.0 / (255.0 * std)).to(torch.float32).view(1, channels, 1, 1)
        self._shift = (dataset.mean.to(torch.float64) / std).to(torch.float32)
        self._shift = self._shift.view(1, channels, 1, 1)
        self._scale, self._shift = self._scale.to(self.device), self._shift.to(self.device)
        self._source: tuple[Tensor, Tensor] | None = None

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __repr__(self) -> str:
        return (f"BatchLoader({len(self.dataset)} samples, batch_size={self.batch_size}, "
                f"shuffle={self.shuffle}, augment={self.augment}, cutout={self.cutout}, device={self.device})")

    def _tensors(self) -> tuple[Tensor, Tensor]:
        if self._source is None:
            images, labels = self.dataset.images, self.dataset.labels
            if self.preload:
                images, labels = images.to(self.device), labels.to(self.device)
            self._source = (images, labels)
        return self._source

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        images, labels = self._tensors()
        n = len(self.dataset)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else None
        non_blocking = self.device.type == "cuda"
        for b in range(len(self)):
            start, stop = b * self.batch_size, min((b + 1) * self.batch_size, n)
            if order is None:
                xb, yb = images[start:stop], labels[start:stop].clone()
            else:
                index = order[start:stop].to(images.device)
                xb, yb = images.index_select(0, index), labels.index_select(0, index)
            xb = xb.to(self.device, non_blocking=non_blocking)
            yb = yb.to(self.device, non_blocking=non_blocking)
            if self.augment:
                xb = augment_batch(xb, padding=self.padding, generator=self.generator)
            x = xb.to(torch.float32, memory_format=torch.contiguous_format)
            x.mul_(self._scale).sub_(self._shift)
            if self.cutout:  # after normalising: the square holds the mean (0), as in the reference
                x = cutout_batch(x, self.cutout, generator=self.generator)
            yield x, yb


class DeviceDataLoader:
    """A :class:`torch.utils.data.DataLoader` over any data set, with the :class:`BatchLoader`
    interface: ``len()`` batches on ``device``, in any structure the samples have (``(x, y)``,
    ``(x1, x2, y)``, dicts; see :mod:`archir.task` for how the trainer reads them).

    Runs in the main process (``num_workers=0``) with a CPU generator seeded by ``seed``, so
    the batch order is reproducible. ``augment`` applies :func:`augment_batch` on the device to
    ``(x, y)`` batches whose ``x`` is a 4-D float image batch (padding value 0 in the data set's
    own value space); ``cutout`` > 0 applies :func:`cutout_batch` after it to the same batches
    (with or without ``augment``; the square is 0 in the data set's value space, its mean when
    the data set is normalised); other batches are left as they are. ``collate`` is the
    :class:`~torch.utils.data.DataLoader`'s ``collate_fn``: how a list of samples becomes a batch
    (default: stack their tensors; a detector's images and targets, say, are batched as lists).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int = 128,
        shuffle: bool = False,
        device: Device = "cpu",
        seed: int = 0,
        augment: bool = False,
        drop_last: bool = False,
        padding: int = 4,
        generator: torch.Generator | None = None,
        cutout: int = 0,
        collate: Callable | None = None,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        _check_cutout(cutout)
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.augment = augment
        self.cutout = int(cutout)
        self.padding = padding
        self.generator = _cpu_generator(seed, generator)
        self.loader = DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle,
                                 num_workers=0, drop_last=drop_last, generator=self.generator,
                                 collate_fn=collate)

    def __len__(self) -> int:
        return len(self.loader)

    def __repr__(self) -> str:
        return (f"DeviceDataLoader({type(self.dataset).__name__}, batch_size={self.batch_size}, "
                f"augment={self.augment}, cutout={self.cutout}, device={self.device})")

    def __iter__(self) -> Iterator:
        from archir.task import move_to

        for batch in self.loader:
            batch = move_to(batch, self.device)  # any structure: (x, y), (x1, x2, y), dicts
            if ((self.augment or self.cutout) and isinstance(batch, (list, tuple)) and len(batch) == 2
                    and isinstance(batch[0], Tensor) and batch[0].dim() == 4 and batch[0].is_floating_point()):
                x, y = batch
                if self.augment:
                    x = augment_batch(x, padding=self.padding, generator=self.generator)
                x = cutout_batch(x, self.cutout, generator=self.generator)
                yield x.contiguous(), y
            else:
                yield batch


def as_loader(
    dataset: Dataset,
    batch_size: int = 128,
    shuffle: bool = False,
    device: Device = "cpu",
    seed: int = 0,
    augment: bool = False,
    drop_last: bool = False,
    cutout: int = 0,
    collate: Callable | None = None,
) -> BatchLoader | DeviceDataLoader:
    """A loader with one interface for any data set: ``len()`` and batches on ``device``. An
    :class:`ImageTensorDataset` gets the fast :class:`BatchLoader`; any other ``torch`` data set
    (samples of any structure, see :mod:`archir.task`) is wrapped in a :class:`DeviceDataLoader`.
    ``cutout`` > 0: a random square of that side zeroed per image (:func:`cutout_batch`).
    ``collate``: how samples become a batch (:class:`DeviceDataLoader`, for any data set).
    """
    if isinstance(dataset, ImageTensorDataset) and collate is None:
        return BatchLoader(dataset, batch_size, shuffle=shuffle, augment=augment, device=device,
                           seed=seed, drop_last=drop_last, cutout=cutout)
    return DeviceDataLoader(dataset, batch_size, shuffle=shuffle, device=device, seed=seed,
                            augment=augment, drop_last=drop_last, cutout=cutout, collate=collate)
