"""The data set: :class:`ImageTensorDataset` (one contiguous ``uint8`` tensor plus labels),
per-channel statistics and :class:`DataError`."""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from archir.errors import ArchirError


PathLike = Union[str, "os.PathLike[str]"]
Device = Union[str, torch.device]
ImageSize = Union[int, tuple[int, int]]


class DataError(ArchirError):
    """A data set could not be found or read; the message says where archir looked and why."""


# --------------------------------------------------------------------------------------------
# The data set
# --------------------------------------------------------------------------------------------


class ImageTensorDataset(Dataset):
    """A labelled image data set held as one contiguous ``uint8`` tensor.

    Attributes:
        images: ``uint8`` tensor ``N x C x H x W``, contiguous NCHW. Treat it as read-only.
        labels: ``int64`` tensor ``N`` with values in ``range(len(classes))``.
        classes: class names; ``labels`` index into it.
        mean, std: ``float32`` tensors ``C``, per-channel statistics on the 0..1 scale used to
            normalise (``x = (pixel / 255 - mean) / std``); by default those of ``images``.
        source: a short human-readable description of where the data came from.

    ``dataset[i]`` returns ``(normalised float32 image C x H x W, int label)``, so the data set
    also works with a plain :class:`torch.utils.data.DataLoader`; :class:`BatchLoader` is the
    fast path.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        classes: Sequence[str],
        *,
        mean: Tensor | Sequence[float] | None = None,
        std: Tensor | Sequence[float] | None = None,
        source: str = "",
    ) -> None:
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            raise DataError(
                "images must be a uint8 tensor N x C x H x W, got "
                f"{type(images).__name__} {getattr(images, 'dtype', '')} "
                f"{tuple(getattr(images, 'shape', ()))}"
            )
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if labels.dim() != 1 or labels.numel() != images.shape[0]:
            raise DataError(
                f"labels must be a 1-D tensor of {images.shape[0]} entries, got shape "
                f"{tuple(labels.shape)}"
            )
        classes = [str(c) for c in classes]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
            raise DataError(
                f"labels must lie in 0..{len(classes) - 1} ({len(classes)} classes), got "
                f"{int(labels.min())}..{int(labels.max())}"
            )
        self.images = images.contiguous()
        self.labels = labels.contiguous()
        self.classes = classes
        channels = images.shape[1]
        if mean is None or std is None:
            computed_mean, computed_std = channel_stats(self.images)
        self.mean = _channel_vector(computed_mean if mean is None else mean, channels, "mean")
        self.std = _channel_vector(computed_std if std is None else std, channels, "std")
        if bool((self.std <= 0).any()):
            raise DataError(f"std must be positive in every channel, got {self.std.tolist()}")
        self.source = source

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index].to(torch.float32).div_(255.0)
        image.sub_(self.mean.view(-1, 1, 1)).div_(self.std.view(-1, 1, 1))
        return image, int(self.labels[index])

    def __repr__(self) -> str:
        shape = "x".join(str(s) for s in self.images.shape[1:])
        where = f", source={self.source!r}" if self.source else ""
        return (f"ImageTensorDataset({len(self)} images {shape}, {len(self.classes)} classes"
                f"{where})")

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(classes)``)."""
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def subset(self, indices: Tensor | Sequence[int], source: str | None = None
               ) -> ImageTensorDataset:
        """A new data set of the given samples (copied), keeping ``classes``, ``mean``, ``std``."""
        index = torch.as_tensor(indices, dtype=torch.int64)
        return ImageTensorDataset(
            self.images.index_select(0, index),
            self.labels.index_select(0, index),
            self.classes,
            mean=self.mean,
            std=self.std,
            source=self.source if source is None else source,
        )


def _channel_vector(value: Tensor | Sequence[float], channels: int, what: str) -> Tensor:
    vector = torch.as_tensor(value, dtype=torch.float32).detach().cpu().flatten()
    if vector.numel() != channels:
        raise DataError(f"{what} must have one entry per channel ({channels}), got "
                        f"{vector.numel()}")
    return vector.contiguous()


def channel_stats(images: Tensor, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Per-channel mean and standard deviation of ``uint8`` images ``N x C x H x W``.

    Returns two ``float32`` tensors of ``C`` entries on the 0..1 scale (population standard
    deviation). The sums of pixels and of their squares are accumulated exactly as integers
    (``255**2`` fits ``uint16``), which is also several times faster than float reductions. A
    constant channel gets ``std = 1`` so that normalising never divides by zero.
    """
    if images.dim() != 4 or images.dtype != torch.uint8:
        raise DataError(f"channel_stats expects uint8 images N x C x H x W, got {images.dtype} "
                        f"{tuple(images.shape)}")
    n, c, h, w = images.shape
    if n == 0:
        return torch.zeros(c), torch.ones(c)
    array = images.detach().cpu().numpy()
    total = np.zeros(c, dtype=np.uint64)
    total_sq = np.zeros(c, dtype=np.uint64)
    for start in range(0, n, chunk):
        block = array[start:start + chunk]
        total += block.sum(axis=(0, 2, 3), dtype=np.uint64)
        square = block.astype(np.uint16)
        np.multiply(square, square, out=square)
        total_sq += square.sum(axis=(0, 2, 3), dtype=np.uint64)
    count = float(n * h * w)
    mean = total.astype(np.float64) / count
    var = np.maximum(total_sq.astype(np.float64) / count - mean**2, 0.0)
    std = np.sqrt(var) / 255.0
    std[std < 1e-8] = 1.0
    return (torch.from_numpy(mean / 255.0).to(torch.float32),
            torch.from_numpy(std).to(torch.float32))


def _resize_uint8(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of ``uint8`` images ``N x C x H x W`` (antialiased when shrinking)."""
    if tuple(images.shape[-2:]) == size:
        return images
    shrink = size[0] < images.shape[-2] or size[1] < images.shape[-1]
    out = F.interpolate(images.to(torch.float32), size=size, mode="bilinear",
                        align_corners=False, antialias=shrink)
    return out.round_().clamp_(0, 255).to(torch.uint8).contiguous()


def _finish(train_images: Tensor, train_labels: Tensor, test_images: Tensor,
            test_labels: Tensor, classes: Sequence[str], source: str
            ) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    train = ImageTensorDataset(train_images, train_labels, classes, source=f"{source} [train]")
    test = ImageTensorDataset(test_images, test_labels, classes, mean=train.mean, std=train.std,
                              source=f"{source} [test]")
    return train, test
