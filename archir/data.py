"""Data sets and batch loaders for ``archir transform --data NAME|PATH --data-dir DIR``.

A data set is held as ONE contiguous ``uint8`` tensor ``N x C x H x W`` plus ``int64`` labels
(:class:`ImageTensorDataset`). Batches are sliced from it with a permutation, moved to the device
as ``uint8``, augmented there (vectorised over the batch) and normalised to ``float32``
(:class:`BatchLoader`). No per-image Python work happens during training: on a 2-core machine
per-image transforms cost more than the model itself.

Sources (:func:`load_dataset`):

``"digits"`` (default)
    scikit-learn's bundled handwritten digits (1,797 images, offline). The 8x8 images with
    values 0..16 are scaled to 0..255, resized once to 32x32 (bilinear) and replicated to three
    channels so CIFAR-shaped models run; a stratified split gives 1,437 training and 360 test
    images (``val_fraction=0.2``, ``seed=0``).
``"cifar10"``
    looked up in ``data_dir`` (default ``~/.cache/archir-data``, or ``$ARCHIR_DATA_DIR``), in
    torchvision's pickle layout (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``) or an
    image-folder layout (``train/<class>/*.jpg``, ``test/<class>/*.jpg``), directly or in a
    ``cifar10/`` or ``cifar10-jpg/`` subfolder. archir never downloads: when nothing is found,
    :class:`DataError` says where it looked and how to get the data.
any other string
    a path to either layout. Image folders are decoded with Pillow (in a process pool when
    large), converted to RGB, and the decoded ``uint8`` array is cached as a ``.npy`` file in
    ``<data_dir>/cache/`` keyed by the folder's path and every file's name, size and mtime, so
    the second load skips decoding.

Normalisation uses the per-channel mean and standard deviation of the full training split
(before any ``subset``), on the 0..1 scale: ``x = (pixel / 255 - mean) / std``. The test split
and every subset or split of a data set keep the statistics of the training set they came from.

Augmentation (``augment=True``) is the CIFAR-standard one (He et al., 2016, "Deep Residual
Learning for Image Recognition", section 4.2): pad 4 zero (black) pixels on each side, take a
random crop of the original size, flip horizontally with probability 1/2.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import pickle
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from archir.errors import ArchirError

__all__ = [
    "BUILTIN_DATASETS",
    "CIFAR10_CLASSES",
    "DATA_DIR_ENV",
    "BatchLoader",
    "DataError",
    "DeviceDataLoader",
    "ImageTensorDataset",
    "Loader",
    "as_loader",
    "augment_batch",
    "channel_stats",
    "default_data_dir",
    "load_dataset",
    "split_train",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
Device = Union[str, torch.device]
ImageSize = Union[int, tuple[int, int]]

BUILTIN_DATASETS = ("digits", "cifar10")
"""Names that :func:`load_dataset` treats as data sets rather than paths."""

DATA_DIR_ENV = "ARCHIR_DATA_DIR"
"""Environment variable that overrides the default data directory."""

DEFAULT_DATA_DIR = "~/.cache/archir-data"

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".webp",
                              ".tif", ".tiff"})
_PIL_FORMATS = {".jpg": ("JPEG",), ".jpeg": ("JPEG",), ".png": ("PNG",)}

_CACHE_VERSION = 1
_CIFAR_PICKLE_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_SUBDIRS = ("", "cifar10", "cifar10-jpg")
_TEST_SPLIT_NAMES = ("test", "val", "valid", "validation")
# Below this many files per worker, a process pool costs more than it saves.
_MIN_FILES_PER_WORKER = 2000
_DECODE_CHUNK = 1000
# Loaders copy a whole data set to an accelerator once when it is at most this large.
_PRELOAD_MAX_BYTES = 2 << 30


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


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def default_data_dir() -> Path:
    """``$ARCHIR_DATA_DIR`` when set, else ``~/.cache/archir-data`` (expanded)."""
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).expanduser()


def load_dataset(
    name_or_path: PathLike = "digits",
    data_dir: PathLike | None = None,
    *,
    val_fraction: float = 0.2,
    subset: int | None = None,
    test_subset: int | None = None,
    image_size: ImageSize | None = None,
    seed: int = 0,
    cache: bool = True,
    cache_dir: PathLike | None = None,
    num_workers: int | None = None,
) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    """Load a data set as ``(train, test)`` :class:`ImageTensorDataset` objects.

    Args:
        name_or_path: ``"digits"``, ``"cifar10"`` (case-insensitive), or a path to a data set
            in torchvision's CIFAR pickle layout or an image-folder layout (``train/<class>/*``
            plus ``test/<class>/*`` or ``val/<class>/*``; class names are the sorted subfolder
            names of ``train/``). Write ``./cifar10`` to mean a folder rather than the name.
        data_dir: where ``"cifar10"`` is looked for and where the decode cache lives; default
            :func:`default_data_dir`.
        val_fraction: share of the data held out for testing when the source has no test
            split of its own (digits, or an image folder with ``train/`` only); stratified.
        subset: keep only this many training images (stratified, chosen by ``seed``), e.g. for
            benchmarks. Normalisation statistics still come from the full training split.
        test_subset: the same for the test split.
        image_size: ``H`` or ``(H, W)`` to resize every image to (bilinear). Default: keep the
            source size (32x32 for digits); images of an image folder that differ in size are
            resized to the most common size, with a warning.
        seed: seed of the held-out split and of the subsets.
        cache: read and write the decoded-image cache of image folders.
        cache_dir: where that cache lives; default ``<data_dir>/cache``.
        num_workers: processes decoding an image folder; default the number of usable CPUs.

    Raises:
        DataError: the data set is missing or malformed; the message says where archir looked
            and how to get the data. archir never downloads anything.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    for what, value in (("subset", subset), ("test_subset", test_subset)):
        if value is not None and value < 1:
            raise DataError(f"{what} must be a positive number of images, got {value}")
    size = _normalise_size(image_size)
    root_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    options = _FolderOptions(
        size=size,
        val_fraction=val_fraction,
        seed=seed,
        cache_dir=(Path(cache_dir).expanduser() if cache_dir is not None
                   else root_dir / "cache") if cache else None,
        num_workers=num_workers,
    )

    name = os.fspath(name_or_path)
    key = name.lower()
    if key == "digits":
        train, test = _load_digits(size or (32, 32), val_fraction, seed)
    elif key in ("cifar10", "cifar-10"):
        train, test = _load_cifar10(root_dir, options)
    else:
        path = Path(name).expanduser()
        if not path.is_dir():
            raise DataError(
                f"data set {name!r} is neither a known name ({', '.join(BUILTIN_DATASETS)}) "
                f"nor an existing directory (looked for {path.resolve()})"
            )
        layout = _detect_layout(path)
        if layout is None:
            raise DataError(_layout_help(path))
        train, test = _load_layout(layout, options)

    if subset is not None:
        train = _take_subset(train, subset, seed, "subset")
    if test_subset is not None:
        test = _take_subset(test, test_subset, seed, "test_subset")
    return train, test


@dataclass(frozen=True)
class _FolderOptions:
    """Options shared by the loaders of on-disk layouts (see :func:`load_dataset`)."""

    size: tuple[int, int] | None
    val_fraction: float
    seed: int
    cache_dir: Path | None  # None: no decode cache
    num_workers: int | None


def _normalise_size(image_size: ImageSize | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        size = (image_size, image_size)
    else:
        size = tuple(int(s) for s in image_size)  # type: ignore[assignment]
    if len(size) != 2 or min(size) < 1:
        raise DataError(f"image_size must be a positive int or (height, width), got {image_size}")
    return size  # type: ignore[return-value]


def _take_subset(dataset: ImageTensorDataset, count: int, seed: int, what: str
                 ) -> ImageTensorDataset:
    if count > len(dataset):
        raise DataError(f"{what}={count} asks for more images than the split has ({len(dataset)})")
    if count == len(dataset):
        return dataset
    _, keep = _stratified_split(dataset.labels, count, seed)
    return dataset.subset(keep, f"{dataset.source} [{what} {count}, seed {seed}]")


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


def _load_digits(size: tuple[int, int], val_fraction: float, seed: int
                 ) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0))
    images = torch.from_numpy(pixels.clip(0, 255).astype(np.uint8)).unsqueeze(1)
    images = _resize_uint8(images, size).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    train_idx, test_idx = _stratified_split(labels, _held_out_count(len(labels), val_fraction),
                                            seed)
    classes = [str(c) for c in bunch.target_names]
    source = f"digits (scikit-learn, {size[0]}x{size[1]}, split seed {seed})"
    return _finish(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx],
                   classes, source)


# A layout is ("pickle", dir holding data_batch_1..) or ("folder", root holding train/).
_Layout = tuple[str, Path]


def _detect_layout(root: Path) -> _Layout | None:
    if (root / _CIFAR_PICKLE_DIR / "data_batch_1").is_file():
        return "pickle", root / _CIFAR_PICKLE_DIR
    if (root / "data_batch_1").is_file():
        return "pickle", root
    if (root / "train").is_dir():
        return "folder", root
    return None


def _layout_help(path: Path) -> str:
    return (
        f"{path.resolve()} holds no data set archir can read. Expected either torchvision's "
        f"CIFAR pickle layout ({_CIFAR_PICKLE_DIR}/data_batch_1..5 and test_batch) or an image "
        "folder: train/<class>/*.jpg|png and test/<class>/* (or val/<class>/*)."
    )


def _load_layout(layout: _Layout, options: _FolderOptions
                 ) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    kind, path = layout
    if kind == "pickle":
        return _load_cifar_pickles(path, options.size)
    return _load_image_folder(path, options)


def _load_cifar10(data_dir: Path, options: _FolderOptions
                  ) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    looked: list[Path] = []
    for sub in _CIFAR_SUBDIRS:
        root = data_dir / sub if sub else data_dir
        looked.append(root)
        layout = _detect_layout(root)
        if layout is None:
            continue
        train, test = _load_layout(layout, options)
        if train.num_classes != 10:
            raise DataError(
                f"found a data set at {layout[1]} while looking for CIFAR-10, but it has "
                f"{train.num_classes} classes ({', '.join(train.classes[:12])}), not 10"
            )
        return train, test
    raise DataError(_cifar_help(data_dir, looked))


def _cifar_help(data_dir: Path, looked: Sequence[Path]) -> str:
    archives = sorted(p for p in data_dir.glob("*.tar.gz") if "cifar" in p.name.lower()) \
        if data_dir.is_dir() else []
    lines = [
        "CIFAR-10 not found. archir looked for torchvision's pickle layout "
        f"({_CIFAR_PICKLE_DIR}/data_batch_1..5, test_batch) and for an image folder "
        "(train/<class>/*.jpg, test/<class>/*.jpg) in:",
        *(f"  {p}" for p in looked),
    ]
    for archive in archives:
        lines.append(f"There is an archive at {archive}: extract it with "
                     f"tar -xzf {archive} -C {data_dir}")
    lines += [
        "archir never downloads data. To get CIFAR-10:",
        f"  - from a CIFAR-10 archive: mkdir -p {data_dir} && "
        f"tar -xzf cifar10-jpg.tar.gz -C {data_dir}",
        "  - on a machine with internet: python -c \"import torchvision; "
        f"torchvision.datasets.CIFAR10('{data_dir}', download=True)\" (then copy "
        f"{_CIFAR_PICKLE_DIR}/ into {data_dir})",
        f"  - or point archir at another folder with --data-dir DIR or {DATA_DIR_ENV}=DIR.",
    ]
    return "\n".join(lines)


def _read_pickle(path: Path) -> dict[Any, Any]:
    """Read one of CIFAR's pickles. Like torchvision, this unpickles the file: load only
    folders you trust."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as exc:  # unpickling can fail in many ways; all mean a bad file
        raise DataError(f"cannot read CIFAR pickle {path}: {exc}") from exc
    if not isinstance(batch, dict):
        raise DataError(f"CIFAR pickle {path} holds a {type(batch).__name__}, not a dict")
    return batch


def _pickle_field(batch: dict[Any, Any], name: str, path: Path) -> Any:
    for key in (name.encode(), name):
        if key in batch:
            return batch[key]
    raise DataError(f"CIFAR pickle {path} has no {name!r} entry (keys: {list(batch)[:6]})")


def _load_cifar_pickles(directory: Path, size: tuple[int, int] | None
                        ) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    """torchvision's ``cifar-10-batches-py``: pickled dicts with ``data`` (N x 3072 uint8,
    channel-major 3 x 32 x 32) and ``labels``; class names in ``batches.meta``."""
    missing = [n for n in (*_CIFAR_TRAIN_BATCHES, "test_batch") if not (directory / n).is_file()]
    if missing:
        raise DataError(f"CIFAR pickle folder {directory} lacks {', '.join(missing)}")

    def read(names: Sequence[str]) -> tuple[Tensor, Tensor]:
        images, labels = [], []
        for name in names:
            batch = _read_pickle(directory / name)
            data = np.asarray(_pickle_field(batch, "data", directory / name), dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise DataError(f"{directory / name}: expected data of shape N x 3072, got "
                                f"{data.shape}")
            images.append(data.reshape(-1, 3, 32, 32))
            labels.append(np.asarray(_pickle_field(batch, "labels", directory / name),
                                     dtype=np.int64))
        return (torch.from_numpy(np.concatenate(images)),
                torch.from_numpy(np.concatenate(labels)))

    train_images, train_labels = read(_CIFAR_TRAIN_BATCHES)
    test_images, test_labels = read(("test_batch",))
    classes: Sequence[str] = CIFAR10_CLASSES
    if (directory / "batches.meta").is_file():
        meta = _read_pickle(directory / "batches.meta")
        names = meta.get(b"label_names", meta.get("label_names"))
        if names:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    if size is not None:
        train_images = _resize_uint8(train_images, size)
        test_images = _resize_uint8(test_images, size)
    return _finish(train_images, train_labels, test_images, test_labels, classes,
                   f"CIFAR pickles at {directory}")


# ---- image folders --------------------------------------------------------------------------


@dataclass(frozen=True)
class _SplitFiles:
    """The image files of one split, in a deterministic order, and their fingerprint (a hash
    of every file's class, name, size and mtime)."""

    directory: Path
    classes: list[str]
    paths: list[str]
    labels: list[int]
    fingerprint: str


def _scan_split(directory: Path, classes: list[str] | None) -> _SplitFiles:
    """List ``directory/<class>/*.<image>``; ``classes`` fixes the class order (train's)."""
    with os.scandir(directory) as it:
        found = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    if classes is None:
        classes = found
    else:
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataError(f"{directory} has classes that the training split lacks: "
                            f"{', '.join(unknown[:10])}")
    lines: list[str] = []
    paths: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        class_dir = directory / name
        if not class_dir.is_dir():
            continue
        with os.scandir(class_dir) as it:
            entries = [e for e in it
                       if e.name[e.name.rfind("."):].lower() in IMAGE_EXTENSIONS and e.is_file()]
        entries.sort(key=lambda e: e.name)
        for entry in entries:
            st = entry.stat()
            paths.append(entry.path)
            lines.append(f"{name}/{entry.name}\t{st.st_size}\t{st.st_mtime_ns}\n")
        labels.extend([label] * len(entries))
    if not paths:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under "
                        f"{directory}/<class>/")
    fingerprint = hashlib.sha1("".join(lines).encode()).hexdigest()
    return _SplitFiles(directory, classes, paths, labels, fingerprint)


def _decode_one(path: str, size: tuple[int, int] | None) -> np.ndarray:
    """Decode one image file to an ``H x W x 3`` uint8 array (resized to ``size`` if given)."""
    from PIL import Image

    formats = _PIL_FORMATS.get(os.path.splitext(path)[1].lower())
    try:
        try:
            image = Image.open(path, formats=formats)
        except Exception:  # a misnamed file: let Pillow try every format
            if formats is None:
                raise
            image = Image.open(path)
        with image:
            if image.mode != "RGB":
                image = image.convert("RGB")
            if size is not None and image.size != (size[1], size[0]):
                image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            return np.asarray(image, dtype=np.uint8)
    except Exception as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc


def _decode_chunk(job: tuple[list[str], tuple[int, int] | None]
                  ) -> np.ndarray | list[np.ndarray]:
    """Decode a list of files: one stacked array, or a list when the sizes differ."""
    paths, size = job
    arrays = [_decode_one(p, size) for p in paths]
    if len({a.shape for a in arrays}) == 1:
        return np.stack(arrays)
    return arrays


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _decode_files(paths: list[str], size: tuple[int, int] | None, num_workers: int | None
                  ) -> np.ndarray:
    """Decode images to one ``N x H x W x 3`` uint8 array, in a process pool when worthwhile."""
    workers = _usable_cpus() if num_workers is None else max(1, num_workers)
    workers = min(workers, max(1, len(paths) // _MIN_FILES_PER_WORKER))
    jobs = [(paths[i:i + _DECODE_CHUNK], size) for i in range(0, len(paths), _DECODE_CHUNK)]
    results: list[np.ndarray | list[np.ndarray]] | None = None
    if workers > 1:
        import multiprocessing
        import warnings

        import PIL.Image  # noqa: F401  imported before forking, so no child imports it

        # fork, as torch's DataLoader does on Linux: spawn and forkserver would re-import torch
        # in every worker and re-run an unguarded user script. The children run only Pillow
        # and numpy, so the locks of torch's threads (Python >= 3.12 warns about them) are
        # never taken there.
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else None)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*multi-threaded.*fork",
                                        category=DeprecationWarning)
                pool = context.Pool(workers)
        except (OSError, ValueError, AssertionError) as exc:  # e.g. inside a daemon process
            logger.warning("cannot start %d decoding processes (%s); decoding serially",
                           workers, exc)
        else:
            with pool:
                results = pool.map(_decode_chunk, jobs, chunksize=1)
    if results is None:
        results = [_decode_chunk(job) for job in jobs]

    if all(isinstance(r, np.ndarray) for r in results) and \
            len({r.shape[1:] for r in results}) == 1:  # type: ignore[union-attr]
        return np.concatenate(results)  # type: ignore[arg-type]
    arrays = [a for r in results for a in r]
    shapes = Counter(a.shape for a in arrays)
    target, _ = shapes.most_common(1)[0]
    logger.warning("images have %d different sizes; resizing %d of %d to the most common size "
                   "%dx%d (pass image_size to choose)", len(shapes),
                   len(arrays) - shapes[target], len(arrays), target[0], target[1])
    from PIL import Image

    out = np.empty((len(arrays), *target), dtype=np.uint8)
    for i, array in enumerate(arrays):
        if array.shape != target:
            array = np.asarray(Image.fromarray(array).resize((target[1], target[0]),
                                                             Image.Resampling.BILINEAR))
        out[i] = array
    return out


def _cache_path(cache_dir: Path, files: _SplitFiles, split: str, size: tuple[int, int] | None
                ) -> tuple[Path, str]:
    """Cache file for a split and the file-name prefix shared by its older versions."""
    root = files.directory.resolve()
    root_key = hashlib.sha1(str(root).encode()).hexdigest()[:10]
    key = hashlib.sha1(
        f"v{_CACHE_VERSION}|{root}|{size}|{'/'.join(files.classes)}|{files.fingerprint}".encode()
    ).hexdigest()[:16]
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in root.parent.name)[:40]
    size_tag = "orig" if size is None else f"{size[0]}x{size[1]}"
    prefix = f"{stem or 'data'}-{root_key}-{split}-{size_tag}-"
    return cache_dir / f"{prefix}{key}.npy", prefix


def _save_atomic(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as ``.npy`` via a temporary file and ``os.replace`` (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is as readable as the data
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _decode_split(files: _SplitFiles, split: str, options: _FolderOptions) -> Tensor:
    """Images of a split as ``N x 3 x H x W`` uint8, from the cache when it is current."""
    path = prefix = None
    if options.cache_dir is not None:
        path, prefix = _cache_path(options.cache_dir, files, split, options.size)
        if path.is_file():
            try:
                cached = np.load(path, allow_pickle=False)
                if cached.dtype == np.uint8 and cached.ndim == 4 and \
                        cached.shape[0] == len(files.paths):
                    logger.debug("loaded %d decoded images from %s", len(cached), path)
                    return torch.from_numpy(cached)
                logger.warning("ignoring cache %s: unexpected shape %s", path, cached.shape)
            except (OSError, ValueError, EOFError) as exc:
                logger.warning("ignoring unreadable cache %s: %s", path, exc)

    logger.info("decoding %d images under %s (cached afterwards)", len(files.paths),
                files.directory)
    hwc = _decode_files(files.paths, options.size, options.num_workers)
    images = np.ascontiguousarray(hwc.transpose(0, 3, 1, 2))
    if path is not None and prefix is not None:
        try:
            _save_atomic(path, images)
            for old in path.parent.glob(f"{prefix}*.npy"):
                if old != path:
                    old.unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("cannot write the decoded-image cache %s: %s", path, exc)
    return torch.from_numpy(images)


def _load_image_folder(root: Path, options: _FolderOptions
                       ) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    train_files = _scan_split(root / "train", None)
    train_images = _decode_split(train_files, "train", options)
    train_labels = torch.tensor(train_files.labels, dtype=torch.int64)
    test_dir = next((root / n for n in _TEST_SPLIT_NAMES if (root / n).is_dir()), None)
    source = f"image folder {root}"
    if test_dir is not None:
        test_files = _scan_split(test_dir, train_files.classes)
        test_images = _decode_split(test_files, test_dir.name, options)
        test_labels = torch.tensor(test_files.labels, dtype=torch.int64)
        if test_images.shape[1:] != train_images.shape[1:]:
            test_images = _resize_uint8(test_images, tuple(train_images.shape[-2:]))
        return _finish(train_images, train_labels, test_images, test_labels, train_files.classes,
                       source)
    logger.info("%s has no test/ or val/ split: holding out %.0f%% of train/ (seed %d)", root,
                100 * options.val_fraction, options.seed)
    keep, held = _stratified_split(
        train_labels, _held_out_count(len(train_labels), options.val_fraction), options.seed)
    return _finish(train_images[keep], train_labels[keep], train_images[held], train_labels[held],
                   train_files.classes, f"{source} (split seed {options.seed})")


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


def augment_batch(x: Tensor, *, padding: int = 4, flip: bool = True,
                  generator: torch.Generator | None = None) -> Tensor:
    """CIFAR-standard augmentation of a whole batch ``N x C x H x W`` (any dtype, any device).

    Each sample is padded with ``padding`` zeros on every side, cropped back to ``H x W`` at a
    uniformly random offset, and (if ``flip``) mirrored left-right with probability 1/2. The
    random numbers are drawn on the CPU from ``generator`` (so a seed gives the same result on
    every device) and moved to ``x.device``. Returns a new contiguous tensor of ``x``'s dtype.
    On ``uint8`` pixels the padding is black, as in torchvision's ``RandomCrop(padding=4)``; on
    normalised floats it is the value 0.
    """
    if x.dim() != 4:
        raise DataError(f"augment_batch expects a batch N x C x H x W, got {tuple(x.shape)}")
    if padding < 0:
        raise DataError(f"padding must be non-negative, got {padding}")
    n = x.shape[0]
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator)
    flips = (torch.rand(n, generator=generator) < 0.5) if flip else torch.zeros(n, dtype=torch.bool)
    return _crop_flip(x, offsets.to(x.device), flips.to(x.device), padding)


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
    ``device``, applies :func:`augment_batch` (when ``augment``) and normalises with the data
    set's ``mean`` and ``std``. Batches are contiguous NCHW ``float32`` with ``int64`` labels.

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
    ) -> None:
        if not isinstance(dataset, ImageTensorDataset):
            raise DataError(f"BatchLoader needs an ImageTensorDataset, got "
                            f"{type(dataset).__name__}; use as_loader() for other data sets")
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.augment = augment
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
                f"shuffle={self.shuffle}, augment={self.augment}, device={self.device})")

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
            yield x, yb


class DeviceDataLoader:
    """A :class:`torch.utils.data.DataLoader` over any data set of ``(tensor, label)`` pairs,
    with the :class:`BatchLoader` interface: ``len()`` batches of ``(x, y)`` on ``device``.

    Runs in the main process (``num_workers=0``) with a CPU generator seeded by ``seed``, so
    the batch order is reproducible. Inputs are made contiguous NCHW; ``augment`` applies
    :func:`augment_batch` to 4-D inputs on the device (padding value 0 in the data set's own
    value space).
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
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.augment = augment
        self.padding = padding
        self.generator = _cpu_generator(seed, generator)
        self.loader = DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle,
                                 num_workers=0, drop_last=drop_last, generator=self.generator)

    def __len__(self) -> int:
        return len(self.loader)

    def __repr__(self) -> str:
        return (f"DeviceDataLoader({type(self.dataset).__name__}, batch_size={self.batch_size}, "
                f"augment={self.augment}, device={self.device})")

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for batch in self.loader:
            if not isinstance(batch, (list, tuple)) or len(batch) != 2:
                raise DataError(
                    f"{type(self.dataset).__name__} must return (input, label) pairs; a batch "
                    f"came as {type(batch).__name__}"
                    + (f" of {len(batch)} items" if isinstance(batch, (list, tuple)) else "")
                )
            x, y = batch
            if not isinstance(x, Tensor):
                raise DataError(f"{type(self.dataset).__name__} must return tensor inputs, got "
                                f"{type(x).__name__}")
            y = torch.as_tensor(y)
            non_blocking = self.device.type == "cuda"
            x = x.to(self.device, non_blocking=non_blocking)
            y = y.to(self.device, non_blocking=non_blocking)
            if self.augment and x.dim() == 4:
                x = augment_batch(x, padding=self.padding, generator=self.generator)
            yield x.contiguous(), y


def as_loader(
    dataset: Dataset,
    batch_size: int = 128,
    shuffle: bool = False,
    device: Device = "cpu",
    seed: int = 0,
    augment: bool = False,
    drop_last: bool = False,
) -> BatchLoader | DeviceDataLoader:
    """A loader with one interface for any data set: ``len()`` and ``(x, y)`` batches on
    ``device``. An :class:`ImageTensorDataset` gets the fast :class:`BatchLoader`; any other
    ``torch`` data set returning ``(tensor, label)`` is wrapped in a :class:`DeviceDataLoader`.
    """
    if isinstance(dataset, ImageTensorDataset):
        return BatchLoader(dataset, batch_size, shuffle=shuffle, augment=augment, device=device,
                           seed=seed, drop_last=drop_last)
    return DeviceDataLoader(dataset, batch_size, shuffle=shuffle, device=device, seed=seed,
                            augment=augment, drop_last=drop_last)
