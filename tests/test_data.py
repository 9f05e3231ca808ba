"""Tests of archir.data: data sets, splits, caches and batch loaders.

Everything runs offline on scikit-learn's bundled digits or on tiny data sets generated in
``tmp_path`` (PNG image folders, fake torchvision CIFAR pickles).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from archir import data
from archir.data import image_folder, loaders
from archir.data import (
    BatchLoader,
    DataError,
    DeviceDataLoader,
    ImageTensorDataset,
    as_loader,
    augment_batch,
    channel_stats,
    load_dataset,
    split_train,
)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True)
def _isolated_data_dir(tmp_path_factory: pytest.TempPathFactory,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Never read or write the user's real ~/.cache/archir-data."""
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path_factory.mktemp("archir-data-home")))


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Batch-sized ops gain nothing from a second thread, and on a busy 2-core machine torch's
    spinning OpenMP threads make them 40x slower: run these tests on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> tuple[ImageTensorDataset, ImageTensorDataset]:
    return load_dataset("digits")


def _tiny(n: int = 50, classes: int = 5, size: int = 8, seed: int = 0) -> ImageTensorDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % classes
    return ImageTensorDataset(images, labels, [f"c{i}" for i in range(classes)], source="tiny")


def _pixels(label: int, index: int, size: tuple[int, int] = (6, 6)) -> np.ndarray:
    """A distinct, reproducible RGB image for class ``label``, sample ``index``."""
    rng = np.random.default_rng(1000 * label + index)
    return rng.integers(0, 256, (*size, 3), dtype=np.uint8)


def _make_folder(root: Path, classes: list[str], per_class: dict[str, int],
                 size: tuple[int, int] = (6, 6)) -> None:
    """``root/<split>/<class>/<i>.png`` with ``per_class[split]`` lossless images per class."""
    for split, count in per_class.items():
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(_pixels(label, i if split == "train" else 100 + i, size)).save(
                    folder / f"{i:03d}.png")


def _make_cifar_pickles(directory: Path, per_batch: int = 2) -> dict[str, np.ndarray]:
    """A fake ``cifar-10-batches-py`` with ``per_batch`` images per batch file."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        pixels = rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, per_batch)]
        with open(directory / name, "wb") as f:
            pickle.dump({b"data": pixels, b"labels": labels, b"batch_label": name.encode()}, f)
        written[name] = pixels
    names = [f"class{i}".encode() for i in range(10)]
    with open(directory / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, f)
    return written


# ---- digits ---------------------------------------------------------------------------------


def test_digits_shapes_dtypes_classes(digits):
    train, test = digits
    assert (len(train), len(test)) == (1437, 360)
    for ds in (train, test):
        assert ds.images.dtype == torch.uint8 and ds.images.is_contiguous()
        assert ds.images.shape[1:] == (3, 32, 32)
        assert ds.labels.dtype == torch.int64
        assert ds.classes == [str(i) for i in range(10)]
        assert torch.equal(ds.images[:, 0], ds.images[:, 2])  # grey replicated to 3 channels
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    assert set(train.labels.tolist()) == set(test.labels.tolist()) == set(range(10))
    # the test split is normalised with the training statistics
    assert train.mean.shape == train.std.shape == (3,)
    assert torch.equal(test.mean, train.mean) and torch.equal(test.std, train.std)
    assert torch.allclose(train.mean, channel_stats(train.images)[0])


def test_digits_split_is_deterministic_and_seeded():
    a_train, a_test = load_dataset("digits")
    b_train, _ = load_dataset("digits")
    c_train, _ = load_dataset("digits", seed=1)
    assert torch.equal(a_train.images, b_train.images)
    assert torch.equal(a_train.labels, b_train.labels)
    assert not torch.equal(a_train.labels, c_train.labels)
    # per-class proportions are kept (stratified)
    counts = torch.bincount(a_test.labels, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37


def test_getitem_works_with_plain_dataloader(digits):
    train, _ = digits
    image, label = train[0]
    assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
    assert isinstance(label, int)
    expected = (train.images[0].float() / 255 - train.mean.view(3, 1, 1)) / train.std.view(3, 1, 1)
    assert torch.allclose(image, expected, atol=1e-6)
    x, y = next(iter(DataLoader(train, batch_size=16)))
    assert x.shape == (16, 3, 32, 32) and y.dtype == torch.int64


def test_subset_and_test_subset_are_stratified():
    train, test = load_dataset("digits", subset=200, test_subset=50)
    assert (len(train), len(test)) == (200, 50)
    assert int(torch.bincount(train.labels, minlength=10).min()) >= 19
    full, _ = load_dataset("digits")
    assert torch.equal(train.mean, full.mean)  # statistics of the full training split
    with pytest.raises(DataError, match="more images"):
        load_dataset("digits", subset=5000)


def test_channel_stats_matches_float_reference():
    ds = _tiny(n=40, size=5)
    mean, std = channel_stats(ds.images)
    x = ds.images.double() / 255
    assert torch.allclose(mean.double(), x.mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.allclose(std.double(), x.std(dim=(0, 2, 3), unbiased=False), atol=1e-6)
    constant = torch.full((2, 1, 3, 3), 7, dtype=torch.uint8)
    assert channel_stats(constant)[1].item() == 1.0


# ---- loaders --------------------------------------------------------------------------------


def _collect(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def test_batch_loader_shapes_and_normalisation(digits):
    train, _ = digits
    loader = BatchLoader(train, batch_size=100)
    assert len(loader) == 15  # ceil(1437 / 100)
    batches = _collect(loader)
    assert len(batches) == 15 and batches[-1][0].shape[0] == 37
    x, y = batches[0]
    assert x.dtype == torch.float32 and x.is_contiguous() and x.shape == (100, 3, 32, 32)
    assert torch.equal(y, train.labels[:100])
    expected = torch.stack([train[i][0] for i in range(100)])
    assert torch.allclose(x, expected, atol=1e-5)
    assert len(BatchLoader(train, batch_size=100, drop_last=True)) == 14
    assert sum(len(y) for _, y in BatchLoader(train, 100, drop_last=True)) == 1400


def test_batch_loader_same_seed_same_batches(digits):
    train = digits[0].subset(range(300))
    make = lambda seed: BatchLoader(train, 64, shuffle=True, augment=True, seed=seed)  # noqa: E731
    a, b, c = _collect(make(3)), _collect(make(3)), _collect(make(4))
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not torch.equal(a[0][1], c[0][1]) and not torch.equal(a[0][0], c[0][0])
    # successive epochs of one loader differ, and a shuffled epoch covers every sample once
    loader = make(3)
    first, second = _collect(loader), _collect(loader)
    assert not torch.equal(first[0][1], second[0][1])
    labels = torch.cat([y for _, y in first])
    assert torch.equal(torch.bincount(labels, minlength=10), torch.bincount(train.labels))
    generator = torch.Generator().manual_seed(3)
    d = _collect(BatchLoader(train, 64, shuffle=True, augment=True, generator=generator))
    assert torch.equal(d[3][0], a[3][0])


def test_augmentation_keeps_shape_and_changes_content(digits):
    train, _ = digits
    plain = next(iter(BatchLoader(train, 128)))[0]
    augmented = next(iter(BatchLoader(train, 128, augment=True, seed=0)))[0]
    assert augmented.shape == plain.shape and augmented.dtype == torch.float32
    assert augmented.is_contiguous()
    assert not torch.equal(augmented, plain)
    changed = (augmented - plain).abs().flatten(1).amax(dim=1) > 0
    assert int(changed.sum()) > 100  # 1 in 81 keeps offset (4, 4), half of those flip


def test_crop_flip_matches_per_sample_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 7, 9), dtype=torch.uint8, generator=g)
    offsets = torch.randint(0, 9, (2, 16), generator=g)
    flips = torch.rand(16, generator=g) < 0.5
    out = loaders._crop_flip(x, offsets, flips, padding=4)
    for n in range(16):
        padded = F.pad(x[n], (4, 4, 4, 4))
        top, left = int(offsets[0, n]), int(offsets[1, n])
        expected = padded[:, top:top + 7, left:left + 9]
        if flips[n]:
            expected = expected.flip(-1)
        assert torch.equal(out[n], expected)
    assert out.is_contiguous() and out.dtype == torch.uint8


def test_augment_batch_identity_without_padding_or_flip():
    x = torch.rand(4, 3, 5, 5)
    assert torch.equal(augment_batch(x, padding=0, flip=False), x)
    flipped_or_not = augment_batch(x, padding=0, generator=torch.Generator().manual_seed(1))
    for n in range(4):
        assert torch.equal(flipped_or_not[n], x[n]) or torch.equal(flipped_or_not[n], x[n].flip(-1))


# ---- cutout ---------------------------------------------------------------------------------


def _cutout_reference(n: int, h: int, w: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Per sample, the pixels a cutout of ``size`` zeroes (``N x 1 x H x W``), drawn like
    :func:`loaders.cutout_batch` (centre row then column from ``generator``) and clipped by slicing."""
    rows = torch.randint(0, h, (n,), generator=generator)
    columns = torch.randint(0, w, (n,), generator=generator)
    mask = torch.zeros(n, 1, h, w, dtype=torch.bool)
    for i in range(n):
        top, left = int(rows[i]) - size // 2, int(columns[i]) - size // 2
        mask[i, :, max(top, 0):max(top + size, 0), max(left, 0):max(left + size, 0)] = True
    return mask


@pytest.mark.parametrize("size", [4, 5])
def test_cutout_zeroes_a_clipped_square_per_image(size):
    n, c, h, w = 64, 3, 10, 12
    x = torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(0)) + 1.0  # no zero anywhere
    out = loaders.cutout_batch(x, size, generator=torch.Generator().manual_seed(5))
    mask = _cutout_reference(n, h, w, size, torch.Generator().manual_seed(5))
    assert torch.equal(out, x.masked_fill(mask, 0)) and out.is_contiguous() and out.dtype == x.dtype
    zeros = (out == 0).sum(dim=(1, 2, 3))
    interior = [i for i in range(n) if mask[i, 0].sum() == size * size]
    border = [i for i in range(n) if mask[i, 0].sum() < size * size]
    assert interior and border  # both occur among 64 random centres
    for i in interior:  # an interior centre zeroes exactly size x size pixels of every channel
        assert int(zeros[i]) == c * size * size
    for i in border:  # clipped at the image border: fewer
        assert 0 < int(zeros[i]) < c * size * size


def test_cutout_interior_centre_and_border_clipping():
    x = torch.ones(1, 2, 9, 9)
    g = torch.Generator().manual_seed(0)
    # force the centre: (4, 4) is interior for a side of 4, (0, 8) a corner
    centres = iter([torch.tensor([[4]]), torch.tensor([[4]]), torch.tensor([[0]]), torch.tensor([[8]])])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loaders.torch, "randint", lambda *a, **k: next(centres))
        inner = loaders.cutout_batch(x, 4, generator=g)
        corner = loaders.cutout_batch(x, 4, generator=g)
    assert int((inner == 0).sum()) == 2 * 16
    assert torch.equal((inner[0, 0] == 0).nonzero().amin(0), torch.tensor([2, 2]))  # rows/columns 2..5
    assert torch.equal((inner[0, 0] == 0).nonzero().amax(0), torch.tensor([5, 5]))
    assert int((corner == 0).sum()) == 2 * 2 * 3  # rows 0..1, columns 6..8
    assert torch.equal(corner[0, :, :2, 6:], torch.zeros(2, 2, 3))
    # a square larger than the image, any centre: the whole image
    assert int((loaders.cutout_batch(x, 18, generator=g) == 0).sum()) == 2 * 81


def test_cutout_deterministic_and_off_at_zero():
    x = torch.rand(8, 3, 16, 16) + 1.0
    a = augment_batch(x, cutout=8, generator=torch.Generator().manual_seed(3))
    b = augment_batch(x, cutout=8, generator=torch.Generator().manual_seed(3))
    c = augment_batch(x, cutout=8, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert ((a == 0).sum(dim=(1, 2, 3)) > 0).all()
    # cutout=0 changes nothing: same crops and flips, same generator state afterwards
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(augment_batch(x, cutout=0, generator=g1), augment_batch(x, generator=g2))
    assert torch.equal(g1.get_state(), g2.get_state())
    assert loaders.cutout_batch(x, 0) is x
    with pytest.raises(DataError, match="non-negative"):
        loaders.cutout_batch(x, -1)
    with pytest.raises(DataError, match="cutout"):
        BatchLoader(_tiny(), 8, cutout=-2)


def test_batch_loader_cutout_holds_the_mean_after_normalisation():
    ds = _tiny(n=40, size=12)
    plain = _collect(BatchLoader(ds, 16))
    cut = _collect(BatchLoader(ds, 16, cutout=6, seed=9))
    again = _collect(BatchLoader(ds, 16, cutout=6, seed=9))
    g = torch.Generator().manual_seed(9)
    for (xp, yp), (xc, yc), (xa, _) in zip(plain, cut, again):
        mask = _cutout_reference(len(yp), 12, 12, 6, g)
        assert torch.equal(yp, yc) and torch.equal(xc, xa)
        assert torch.equal(xc, xp.masked_fill(mask, 0))  # 0 after normalisation: the data set mean
    # with augment, the cutout comes after the crop and flip, from the same generator
    aug = _collect(BatchLoader(ds, 16, augment=True, seed=9))
    aug_cut = _collect(BatchLoader(ds, 16, augment=True, cutout=6, seed=9))
    assert torch.equal(aug[0][1], aug_cut[0][1])
    assert not torch.equal(aug[0][0], aug_cut[0][0])
    assert all(((x == 0).sum(dim=(1, 2, 3)) >= 3 * 9).all() for x, _ in aug_cut)  # a centre's quarter at least


def test_device_data_loader_cutout():
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.rand(20, 3, 10, 10, generator=g) + 1.0, torch.arange(20) % 5)
    plain = _collect(as_loader(ds, 10, seed=2))
    cut = _collect(as_loader(ds, 10, seed=2, cutout=4))
    assert isinstance(as_loader(ds, 10, cutout=4), DeviceDataLoader)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(cut, _collect(as_loader(ds, 10, seed=2, cutout=4))))
    for (xp, _), (xc, _) in zip(plain, cut):
        for before, after in zip(xp, xc):  # one square per image, all channels, at most 4 x 4
            zeroed = (after == 0).all(dim=0)
            assert torch.equal(after, before.masked_fill(zeroed, 0))
            rows, columns = zeroed.any(dim=1).nonzero().flatten(), zeroed.any(dim=0).nonzero().flatten()
            assert int(zeroed.sum()) == len(rows) * len(columns) > 0
            assert len(rows) <= 4 and len(columns) <= 4
            assert len(rows) == 4 or rows[0] == 0 or rows[-1] == 9  # shorter only at a border
            assert len(columns) == 4 or columns[0] == 0 or columns[-1] == 9


def test_as_loader_for_generic_datasets():
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(50, 3, 8, 8, generator=g), torch.arange(50) % 5)
    loader = as_loader(ds, batch_size=16, shuffle=True, seed=7)
    assert isinstance(loader, DeviceDataLoader) and len(loader) == 4
    a, b = _collect(loader), _collect(as_loader(ds, 16, shuffle=True, seed=7))
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert sorted(torch.cat([y for _, y in a]).tolist()) == sorted(ds.tensors[1].tolist())
    x, y = a[0]
    assert x.device.type == "cpu" and y.dtype == torch.int64
    augmented = next(iter(as_loader(ds, 16, seed=7, augment=True)))[0]
    assert augmented.shape == (16, 3, 8, 8)
    assert isinstance(as_loader(_tiny(), 8), BatchLoader)


def test_generic_dataset_batches_keep_their_structure():
    """Several inputs plus a target, or dicts, arrive as the data set made them (archir.task reads them)."""
    class Triples(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.full((3,), float(i)), torch.ones(2), i

    class Dicts(Triples):
        def __getitem__(self, i):
            return {"x": torch.full((3,), float(i)), "target": i}

    x1, x2, y = next(iter(as_loader(Triples(), 2, augment=True)))
    assert x1.shape == (2, 3) and x2.shape == (2, 2) and y.tolist() == [0, 1]
    batch = next(iter(as_loader(Dicts(), 2)))
    assert set(batch) == {"x", "target"} and batch["target"].tolist() == [0, 1]


# ---- splits ---------------------------------------------------------------------------------


def test_split_train_is_deterministic_disjoint_and_stratified():
    ds = _tiny(n=100, classes=4)
    a, b = split_train(ds, 0.25, seed=1)
    assert (len(a), len(b)) == (75, 25)
    assert torch.equal(torch.bincount(b.labels), torch.tensor([7, 6, 6, 6]))
    assert torch.equal(a.mean, ds.mean) and torch.equal(b.std, ds.std)
    a2, b2 = split_train(ds, 0.25, seed=1)
    assert torch.equal(a.images, a2.images) and torch.equal(b.labels, b2.labels)
    rows = {tuple(img.flatten().tolist()) for img in torch.cat([a.images, b.images])}
    assert len(rows) == 100  # every sample exactly once
    with pytest.raises(DataError):
        split_train(ds, 1.0)


def test_split_train_generic_dataset():
    ds = TensorDataset(torch.arange(30).float(), torch.arange(30) % 3)
    a, b = split_train(ds, 0.5, seed=0)
    assert len(a) + len(b) == 30 and len(b) == 15
    assert set(a.indices).isdisjoint(b.indices)
    assert split_train(ds, 0.5, seed=0)[1].indices == b.indices


# ---- CIFAR-10 and image folders ---------------------------------------------------------------


def test_missing_cifar10_raises_with_where_and_how(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and str(tmp_path / "cifar10-jpg") in message
    assert "tar -xzf" in message and "download=True" in message


def test_missing_cifar10_uses_env_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "elsewhere"))
    with pytest.raises(DataError, match="elsewhere"):
        load_dataset("cifar10")


def test_unknown_name_or_path(tmp_path):
    with pytest.raises(DataError, match="neither a known name"):
        load_dataset(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="no data set archir can read"):
        load_dataset(str(tmp_path))


def test_cifar_pickle_layout(tmp_path):
    written = _make_cifar_pickles(tmp_path / "cifar-10-batches-py")
    train, test = load_dataset("cifar10", data_dir=tmp_path)
    assert train.images.shape == (10, 3, 32, 32) and test.images.shape == (2, 3, 32, 32)
    assert train.classes == [f"class{i}" for i in range(10)]
    assert np.array_equal(train.images[:2].numpy().reshape(2, -1), written["data_batch_1"])
    assert np.array_equal(test.images.numpy().reshape(2, -1), written["test_batch"])
    # the same folder given as a path, directly or as its parent
    direct, _ = load_dataset(str(tmp_path / "cifar-10-batches-py"))
    assert torch.equal(direct.images, train.images)


def test_image_folder_loading(tmp_path):
    classes = ["cat", "ant", "bee"]
    _make_folder(tmp_path / "set", classes, {"train": 3, "val": 2})
    train, test = load_dataset(str(tmp_path / "set"), cache=False)
    assert train.classes == ["ant", "bee", "cat"]  # sorted folder names
    assert train.images.shape == (9, 3, 6, 6) and test.images.shape == (6, 3, 6, 6)
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # lossless PNG: pixels come back exactly, in NCHW
    # sample 3 is the first "bee" (written as class 2), test sample 0 the first "ant" (class 1)
    assert np.array_equal(train.images[3].permute(1, 2, 0).numpy(), _pixels(2, 0))
    assert np.array_equal(test.images[0].permute(1, 2, 0).numpy(), _pixels(1, 100))
    assert torch.equal(test.mean, train.mean)


def test_image_folder_cifar10_subfolder_and_resizing(tmp_path):
    classes = list(data.CIFAR10_CLASSES)
    _make_folder(tmp_path / "cifar10-jpg", classes, {"train": 1, "test": 1})
    train, test = load_dataset("cifar10", data_dir=tmp_path)
    assert len(train) == len(test) == 10 and train.classes == sorted(classes)
    bigger, _ = load_dataset("cifar10", data_dir=tmp_path, image_size=(8, 10))
    assert bigger.images.shape == (10, 3, 8, 10)


def test_image_folder_without_test_split_and_mixed_sizes(tmp_path):
    root = tmp_path / "mixed"
    _make_folder(root, ["a", "b"], {"train": 5})
    Image.fromarray(np.zeros((9, 4, 3), np.uint8)).save(root / "train" / "a" / "odd.png")
    Image.fromarray(np.zeros((6, 6), np.uint8), mode="L").save(root / "train" / "b" / "grey.png")
    train, test = load_dataset(str(root), val_fraction=0.25, cache=False)
    assert len(train) + len(test) == 12 and len(test) == 3
    assert train.images.shape[1:] == (3, 6, 6)  # the odd one resized to the common size


def test_wrong_class_count_for_cifar10(tmp_path):
    _make_folder(tmp_path, ["a", "b"], {"train": 1, "test": 1})
    with pytest.raises(DataError, match="2 classes"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_decode_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    root = tmp_path / "set"
    _make_folder(root, ["x", "y"], {"train": 3, "test": 2})
    cache_dir = tmp_path / "cache"
    first, _ = load_dataset(str(root), cache_dir=cache_dir)
    cached = sorted(p.name for p in cache_dir.iterdir())
    assert len(cached) == 2 and all(name.endswith(".npy") for name in cached)  # no temp files

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the cache is current")

    monkeypatch.setattr(image_folder, "_decode_files", no_decoding)
    second, _ = load_dataset(str(root), cache_dir=cache_dir)
    assert torch.equal(first.images, second.images)

    # changing a file invalidates the cache of its split; the stale file is replaced
    monkeypatch.undo()
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "home"))
    Image.fromarray(np.full((6, 6, 3), 9, np.uint8)).save(root / "train" / "x" / "000.png")
    os.utime(root / "train" / "x" / "000.png", ns=(1, 1))
    third, _ = load_dataset(str(root), cache_dir=cache_dir)
    assert int(third.images[0].max()) == 9
    assert len(list(cache_dir.iterdir())) == 2
    # another image_size is cached beside, not instead of, the original size
    load_dataset(str(root), cache_dir=cache_dir, image_size=4)
    assert len(list(cache_dir.iterdir())) == 4


def test_default_cache_lives_under_data_dir(tmp_path):
    _make_folder(tmp_path / "set", ["x", "y"], {"train": 2, "test": 1})
    load_dataset(str(tmp_path / "set"), data_dir=tmp_path / "dd")
    assert len(list((tmp_path / "dd" / "cache").glob("*.npy"))) == 2


def test_process_pool_decoding_matches_serial(tmp_path, monkeypatch):
    root = tmp_path / "set"
    _make_folder(root, ["a", "b", "c"], {"train": 4, "test": 1})
    serial, _ = load_dataset(str(root), cache=False, num_workers=1)
    monkeypatch.setattr(image_folder, "_MIN_FILES_PER_WORKER", 1)
    monkeypatch.setattr(image_folder, "_DECODE_CHUNK", 3)
    pooled, _ = load_dataset(str(root), cache=False, num_workers=2)
    assert torch.equal(serial.images, pooled.images)


def test_unreadable_image_names_the_file(tmp_path):
    _make_folder(tmp_path, ["a"], {"train": 1})
    (tmp_path / "train" / "a" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.png"):
        load_dataset(str(tmp_path), cache=False)


# ---- CUDA -----------------------------------------------------------------------------------


@CUDA
def test_batch_loader_on_cuda_matches_cpu(digits):
    train, _ = digits
    cpu = _collect(BatchLoader(train, 64, shuffle=True, augment=True, seed=5))
    gpu = _collect(BatchLoader(train, 64, shuffle=True, augment=True, seed=5, device="cuda"))
    assert gpu[0][0].device.type == "cuda" and gpu[0][1].device.type == "cuda"
    for (xc, yc), (xg, yg) in zip(cpu, gpu):
        assert torch.equal(yc, yg.cpu())
        assert torch.allclose(xc, xg.cpu(), atol=1e-5)
    no_preload = _collect(BatchLoader(train, 64, shuffle=True, seed=5, device="cuda",
                                      preload=False))
    assert no_preload[0][0].device.type == "cuda"
    ds = TensorDataset(torch.randn(10, 3, 4, 4), torch.arange(10))
    x, y = next(iter(as_loader(ds, 4, device="cuda", augment=True)))
    assert x.device.type == "cuda" and y.device.type == "cuda"
