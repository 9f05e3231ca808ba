"""Image-folder data sets: scanning ``train/<class>/*``, decoding with Pillow (in a process pool
when large) and the decoded-image cache."""
from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from archir.fileio import atomic_path
from archir.progress import Progress, say

from .datasets import DataError, ImageTensorDataset, _finish, _resize_uint8
from .splits import _held_out_count, _stratified_split

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".webp",
                              ".tif", ".tiff"})
_PIL_FORMATS = {".jpg": ("JPEG",), ".jpeg": ("JPEG",), ".png": ("PNG",)}

_CACHE_VERSION = 1
_TEST_SPLIT_NAMES = ("test", "val", "valid", "validation")
# Below this many files per worker, a process pool costs more than it saves.
_MIN_FILES_PER_WORKER = 2000
_DECODE_CHUNK = 1000


@dataclass(frozen=True)
class _FolderOptions:
    """Options shared by the loaders of on-disk layouts (see :func:`load_dataset`)."""

    size: tuple[int, int] | None
    val_fraction: float
    seed: int
    cache_dir: Path | None  # None: no decode cache
    num_workers: int | None
    progress: bool = False  # report decoding (archir.progress)


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


def _decode_files(paths: list[str], size: tuple[int, int] | None, num_workers: int | None,
                  desc: str = "decoding", progress: bool = False) -> np.ndarray:
    """Decode images to one ``N x H x W x 3`` uint8 array, in a process pool when worthwhile;
    ``progress``: report it (:class:`archir.progress.Progress`, in images)."""

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
                results = _tracked(pool.imap(_decode_chunk, jobs, chunksize=1), jobs, desc, progress)
    if results is None:
        results = _tracked(map(_decode_chunk, jobs), jobs, desc, progress)

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


def _tracked(results: Iterable, jobs: list, desc: str, enabled: bool) -> list:
    """Collect ``results`` (one per job of up to _DECODE_CHUNK files), counting images done."""
    bar = Progress(total=sum(len(job[0]) for job in jobs), desc=desc, enabled=enabled, unit="image")
    out = []
    with bar:
        for job, result in zip(jobs, results):
            out.append(result)
            bar.update(len(job[0]))
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
    if options.progress:
        later = (f"; they are cached in {options.cache_dir}, so the next start reads them in seconds"
                 if path is not None else " (no cache: every start decodes them again)")
        say(f"decoding {len(files.paths):,} images under {files.directory} (first use){later}")
    hwc = _decode_files(files.paths, options.size, options.num_workers, desc=f"decoding {split}",
                        progress=options.progress)
    images = np.ascontiguousarray(hwc.transpose(0, 3, 1, 2))
    if path is not None and prefix is not None:
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.save(f, images, allow_pickle=False)
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
