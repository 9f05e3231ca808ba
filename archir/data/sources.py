"""Where data sets come from: :func:`load_dataset` (``digits``, ``cifar10`` or a path), layout
detection and CIFAR pickles."""
from __future__ import annotations

import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .datasets import DataError, ImageSize, ImageTensorDataset, PathLike, _finish, _resize_uint8
from .image_folder import _FolderOptions, _load_image_folder
from .splits import _held_out_count, _stratified_split

BUILTIN_DATASETS = ("digits", "cifar10")
"""Names that :func:`load_dataset` treats as data sets rather than paths."""

DATA_DIR_ENV = "ARCHIR_DATA_DIR"
"""Environment variable that overrides the default data directory."""

DEFAULT_DATA_DIR = "~/.cache/archir-data"

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)


_CIFAR_PICKLE_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_SUBDIRS = ("", "cifar10", "cifar10-jpg")


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
    progress: bool = False,
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
        progress: report the decoding of an image folder (:mod:`archir.progress`) and where its
            cache goes.

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
        progress=progress,
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


#: What a CIFAR pickle may name: numpy's array reconstruction (numpy 1 and 2 module paths)
#: and, in pickles written by Python 3 at protocol 2, ``_codecs.encode`` for bytes. Dicts,
#: lists, str, bytes, ints and floats need no global at all.
_PICKLE_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
})


class _DataUnpickler(pickle.Unpickler):
    """An unpickler for data files: any global outside :data:`_PICKLE_GLOBALS` (a function or
    class a crafted pickle would call, such as ``os.system``) is refused before it is looked up,
    so reading a CIFAR batch cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR batch never holds (refused: "
                                     "unpickling it could run code)")


def read_data_pickle(path: str | Path) -> Any:
    """Unpickle a data file (``encoding="bytes"``, as CIFAR's Python 2 pickles need) admitting
    only dicts, lists, str, bytes, numbers and numpy arrays (:class:`_DataUnpickler`)."""
    with open(path, "rb") as f:
        return _DataUnpickler(f, encoding="bytes").load()


def _read_pickle(path: Path) -> dict[Any, Any]:
    """Read one of CIFAR's pickles through :func:`read_data_pickle` (no code runs, unlike a plain
    ``pickle.load``)."""
    try:
        batch = read_data_pickle(path)
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
