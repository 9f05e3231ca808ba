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

Modules: :mod:`.datasets` (the data set, statistics, errors), :mod:`.splits`, :mod:`.sources`
(:func:`load_dataset`, CIFAR pickles), :mod:`.image_folder` (decoding and its cache) and
:mod:`.loaders` (augmentation and batch loaders).
"""
from .datasets import DataError, ImageTensorDataset, channel_stats
from .image_folder import IMAGE_EXTENSIONS
from .loaders import BatchLoader, DeviceDataLoader, Loader, as_loader, augment_batch
from .sources import BUILTIN_DATASETS, CIFAR10_CLASSES, DATA_DIR_ENV, default_data_dir, load_dataset
from .splits import split_train

__all__ = [
    "BUILTIN_DATASETS",
    "CIFAR10_CLASSES",
    "DATA_DIR_ENV",
    "IMAGE_EXTENSIONS",
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
