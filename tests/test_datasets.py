"""Readers for the on-disk dataset formats, checked against small hand-written files in the real layouts."""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_lightning.data import datasets
from ssl_lightning.data.datasets import (
    DATASET_NAMES,
    DatasetInfo,
    ImageFolderDataset,
    TensorImageDataset,
    dataset_info,
    find_data_dir,
    load_dataset,
)

SYSTEM_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _no_home_cache(tmp_path, monkeypatch):
    """Never look at (or download into) the real ~/.cache during tests."""
    monkeypatch.setattr(datasets, "DEFAULT_CACHE_DIR", tmp_path / "empty-cache")


def _pattern(n: int, c: int, h: int, w: int) -> np.ndarray:
    """(n, c, h, w) uint8 where every index is recoverable: value depends on all four coordinates."""
    i, ci, hi, wi = np.meshgrid(np.arange(n), np.arange(c), np.arange(h), np.arange(w), indexing="ij")
    return ((i * 37 + ci * 101 + hi * 7 + wi * 3) % 256).astype(np.uint8)


# ----------------------------------------------------------------------------- Fashion-MNIST
def _write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    data = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(data)


def _write_fashion(directory: Path, n_train: int = 12, n_test: int = 5, gz: bool = True) -> dict[str, np.ndarray]:
    directory.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    arrays = {"train_x": _pattern(n_train, 1, 28, 28)[:, 0], "train_y": np.arange(n_train) % 10,
              "t10k_x": 255 - _pattern(n_test, 1, 28, 28)[:, 0], "t10k_y": (np.arange(n_test) * 3) % 10}
    for prefix in ("train", "t10k"):
        _write_idx(directory / f"{prefix}-images-idx3-ubyte{ext}", 2051, arrays[f"{prefix}_x"])
        _write_idx(directory / f"{prefix}-labels-idx1-ubyte{ext}", 2049, arrays[f"{prefix}_y"])
    return arrays


@pytest.mark.skipif(not SYSTEM_FASHION.is_dir(), reason=f"{SYSTEM_FASHION} absent (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_from_system_dir():
    train, val = load_dataset("fashion_mnist", None, "train"), load_dataset("fashion_mnist", None, "val")
    assert isinstance(train, TensorImageDataset)
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert val.images.shape == (10000, 1, 28, 28)
    for ds in (train, val):
        assert ds.labels.min() == 0 and ds.labels.max() == 9
        assert set(ds.labels.tolist()) == set(range(10))
    image, label = train[0]
    assert image.shape == (1, 28, 28) and isinstance(label, int)
    assert find_data_dir("fashion_mnist", None) == SYSTEM_FASHION
    assert abs(train.images.float().mean().item() / 255 - dataset_info("fashion_mnist", None).mean[0]) < 1e-3


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_files_round_trip(tmp_path, gz):
    arrays = _write_fashion(tmp_path / "fm", gz=gz)
    train = load_dataset("fashion_mnist", str(tmp_path / "fm"), "train")
    val = load_dataset("fashion_mnist", str(tmp_path / "fm"), "val")
    assert train.images.shape == (12, 1, 28, 28) and train.images.dtype == torch.uint8
    np.testing.assert_array_equal(train.images[:, 0].numpy(), arrays["train_x"])
    np.testing.assert_array_equal(train.labels.numpy(), arrays["train_y"])
    np.testing.assert_array_equal(val.images[:, 0].numpy(), arrays["t10k_x"])
    np.testing.assert_array_equal(val.labels.numpy(), arrays["t10k_y"])
    assert find_data_dir("fashion_mnist", str(tmp_path / "fm")) == tmp_path / "fm"
    unlabelled = load_dataset("fashion_mnist", str(tmp_path / "fm"), "train", labelled=False)
    assert (unlabelled.labels == -1).all()


def test_fashion_mnist_wrong_magic_names_the_file(tmp_path):
    _write_fashion(tmp_path)
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    _write_idx(bad, 2049, _pattern(12, 1, 28, 28)[:, 0])
    with pytest.raises(ValueError, match="magic") as err:
        load_dataset("fashion_mnist", str(tmp_path), "train")
    assert str(bad) in str(err.value)


def test_fashion_mnist_size_mismatch_names_the_file(tmp_path):
    _write_fashion(tmp_path)
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    with gzip.open(bad, "wb") as f:  # header claims 5 images, data holds 4
        f.write(struct.pack(">IIII", 2051, 5, 28, 28) + bytes(4 * 28 * 28))
    with pytest.raises(ValueError) as err:
        load_dataset("fashion_mnist", str(tmp_path), "val")
    assert str(bad) in str(err.value)


def test_fashion_mnist_missing_lists_searched_dirs_and_fixes(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-system")
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("fashion_mnist", str(tmp_path / "nowhere"), "train")
    message = str(err.value)
    for expected in (str(tmp_path / "nowhere"), str(tmp_path / "no-system"), "apt-get install dataset-fashion-mnist",
                     "data.data_dir", "data.download: true"):
        assert expected in message


# ----------------------------------------------------------------------------- CIFAR
def _write_cifar_pickle(path: Path, images: np.ndarray, labels: np.ndarray, label_key: bytes) -> None:
    batch = {b"batch_label": b"test batch", label_key: labels.tolist(),
             b"data": images.reshape(len(images), 3072), b"filenames": [b"x.png"] * len(images)}
    with open(path, "wb") as f:
        pickle.dump(batch, f)


def test_cifar10_pickles_read_back_in_chw_layout(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    images = [_pattern(3, 3, 32, 32) ^ np.uint8(k) for k in range(6)]
    labels = [np.array([k, (k + 1) % 10, (k + 2) % 10]) for k in range(6)]
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        _write_cifar_pickle(folder / name, images[k], labels[k], b"labels")
    train = load_dataset("cifar10", str(tmp_path), "train")
    val = load_dataset("cifar10", str(tmp_path), "val")
    assert train.images.shape == (15, 3, 32, 32) and val.images.shape == (3, 3, 32, 32)
    np.testing.assert_array_equal(train.images.numpy(), np.concatenate(images[:5]))
    np.testing.assert_array_equal(train.labels.numpy(), np.concatenate(labels[:5]))
    np.testing.assert_array_equal(val.labels.numpy(), labels[5])
    # raw row layout: the first 1024 bytes are the red plane, row-major
    raw = images[5].reshape(3, 3072)
    image, _ = val[1]
    assert image[2, 5, 17] == raw[1, 2 * 1024 + 5 * 32 + 17]
    assert image[0, 31, 0] == raw[1, 31 * 32]
    # data_dir may also point at the batches folder itself
    assert load_dataset("cifar10", str(folder), "val").images.shape == (3, 3, 32, 32)
    assert find_data_dir("cifar10", str(tmp_path)) == folder


def test_cifar100_pickles_use_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train_images, test_images = _pattern(4, 3, 32, 32), 255 - _pattern(2, 3, 32, 32)
    _write_cifar_pickle(folder / "train", train_images, np.array([0, 42, 99, 7]), b"fine_labels")
    _write_cifar_pickle(folder / "test", test_images, np.array([5, 98]), b"fine_labels")
    train = load_dataset("cifar100", str(tmp_path), "train")
    val = load_dataset("cifar100", str(folder), "val")
    np.testing.assert_array_equal(train.images.numpy(), train_images)
    assert train.labels.tolist() == [0, 42, 99, 7] and val.labels.tolist() == [5, 98]
    np.testing.assert_array_equal(val.images.numpy(), test_images)
    assert dataset_info("cifar100", None).num_classes == 100


def test_missing_cifar_dir_names_directory_and_fix(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("cifar10", str(missing), "train")
    message = str(err.value)
    assert str(missing / "cifar-10-batches-py") in message
    assert "data.data_dir" in message and "data.download: true" in message


# ----------------------------------------------------------------------------- STL-10
def _write_stl(folder: Path, images: np.ndarray, stem: str) -> None:
    """STL-10 stores each image channel column-major: byte (c, x, y) with x = column."""
    (folder / f"{stem}_X.bin").write_bytes(images.transpose(0, 1, 3, 2).tobytes())


def test_stl10_binary_column_major_and_unlabeled(tmp_path):
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    train, unlabeled, test = np.zeros((2, 3, 96, 96), np.uint8), _pattern(3, 3, 96, 96), _pattern(2, 3, 96, 96)
    train[1, 2, 5, 70] = 200  # channel 2, row 5, column 70
    _write_stl(folder, train, "train")
    _write_stl(folder, unlabeled, "unlabeled")
    _write_stl(folder, test, "test")
    (folder / "train_y.bin").write_bytes(bytes([1, 10]))
    (folder / "test_y.bin").write_bytes(bytes([3, 4]))
    raw = np.fromfile(folder / "train_X.bin", np.uint8)
    assert raw[1 * 27648 + 2 * 9216 + 70 * 96 + 5] == 200  # the writer really is column-major

    ds = load_dataset("stl10", str(tmp_path), "train")
    assert ds.images.shape == (5, 3, 96, 96) and len(ds) == 2 + 3
    assert ds.images[1, 2, 5, 70] == 200 and ds.images[1].sum() == 200
    np.testing.assert_array_equal(ds.images[2:].numpy(), unlabeled)
    assert ds.labels.tolist() == [0, 9, -1, -1, -1]
    val = load_dataset("stl10", str(folder), "val")
    np.testing.assert_array_equal(val.images.numpy(), test)
    assert val.labels.tolist() == [2, 3]

    (folder / "unlabeled_X.bin").unlink()
    with pytest.warns(UserWarning, match="unlabeled"):
        assert len(load_dataset("stl10", str(tmp_path), "train")) == 2


# ----------------------------------------------------------------------------- image folders
def _write_png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (9, 7)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_imagefolder_labelled(tmp_path):
    for split, n in (("train", 3), ("val", 1)):
        for k, cls in enumerate(("cat", "ant")):
            for i in range(n):
                _write_png(tmp_path / split / cls / f"{i}.png", (k * 100, 10, 20))
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    train = load_dataset("imagefolder", str(tmp_path), "train")
    val = load_dataset("imagefolder", str(tmp_path), "val")
    assert isinstance(train, ImageFolderDataset)
    assert len(train) == 6 and len(val) == 2
    assert sorted(train.labels) == [0, 0, 0, 1, 1, 1] and train.classes == ["ant", "cat"]
    image, label = train[0]  # sorted classes: "ant" -> 0, written with colour k=1
    assert image.shape == (3, 7, 9) and image.dtype == torch.uint8 and label == 0
    assert image[:, 0, 0].tolist() == [100, 10, 20]
    info = dataset_info("imagefolder", str(tmp_path), image_size=64)
    assert info == DatasetInfo(3, 64, 2, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert dataset_info("imagefolder", str(tmp_path)).image_size == 224


def test_imagefolder_unlabelled_flat_folder(tmp_path):
    for i in range(4):
        _write_png(tmp_path / f"img{i}.jpg", (i, i, i))
    _write_png(tmp_path / "nested" / "deeper.png", (1, 2, 3))
    Image.new("L", (5, 5), 77).save(tmp_path / "grey.bmp")
    ds = load_dataset("imagefolder", str(tmp_path), "train", labelled=False)
    assert len(ds) == 6 and set(ds.labels) == {-1}
    assert dataset_info("imagefolder", str(tmp_path), labelled=False).num_classes == 0
    grey = ds[ds.files.index(tmp_path / "grey.bmp")][0]
    assert grey.shape == (3, 5, 5) and (grey == 77).all()  # greyscale converted to RGB
    with pytest.raises(FileNotFoundError, match="val"):
        load_dataset("imagefolder", str(tmp_path), "val")


def test_imagefolder_corrupt_image_names_the_file(tmp_path):
    _write_png(tmp_path / "train" / "a" / "good.png", (1, 2, 3))
    corrupt = tmp_path / "train" / "a" / "x.jpg"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    ds = load_dataset("imagefolder", str(tmp_path), "train")
    with pytest.raises(ValueError, match="cannot decode image") as err:
        ds[ds.files.index(corrupt)]
    assert str(corrupt) in str(err.value) and "delete or replace" in str(err.value)


def test_imagefolder_missing_and_empty_dirs(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent")):
        load_dataset("imagefolder", str(tmp_path / "absent"), "train")
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "train")):
        load_dataset("imagefolder", str(tmp_path), "train", labelled=False)
    (tmp_path / "train" / "cls").mkdir()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "train")):
        load_dataset("imagefolder", str(tmp_path), "train")


# ----------------------------------------------------------------------------- names, splits, synthetic
def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        load_dataset("imagenet21k", None, "train")
    assert "imagenet21k" in str(err.value) and all(name in str(err.value) for name in DATASET_NAMES)
    with pytest.raises(ValueError, match="imagenet21k"):
        dataset_info("imagenet21k", None)


def test_bad_split_is_named():
    with pytest.raises(ValueError, match="test"):
        load_dataset("synthetic", None, "test")


def test_synthetic_is_deterministic_and_shaped():
    a = load_dataset("synthetic", None, "train", synthetic_size=64, seed=3)
    b = load_dataset("synthetic", None, "train", synthetic_size=64, seed=3)
    val = load_dataset("synthetic", None, "val", synthetic_size=64, seed=3)
    assert a.images.shape == (64, 3, 32, 32) and a.images.dtype == torch.uint8
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, val.images)
    assert set(a.labels.tolist()) == set(range(10))
    assert not torch.equal(a.images, load_dataset("synthetic", None, "train", synthetic_size=64, seed=4).images)
    small = load_dataset("synthetic", None, "train", synthetic_size=20, image_size=16, labelled=False)
    assert small.images.shape == (20, 3, 16, 16) and (small.labels == -1).all()
    assert dataset_info("synthetic", None) == DatasetInfo(3, 32, 10, (0.5,) * 3, (0.25,) * 3)
    assert dataset_info("synthetic", None, labelled=False).num_classes == 0


def test_synthetic_classes_share_patterns_across_splits():
    """A nearest-class-mean classifier fit on train separates val: the data is learnable."""
    train = load_dataset("synthetic", None, "train", synthetic_size=200)
    val = load_dataset("synthetic", None, "val", synthetic_size=100)
    x, xv = train.images.float().flatten(1), val.images.float().flatten(1)
    centroids = torch.stack([x[train.labels == k].mean(0) for k in range(10)])
    predictions = torch.cdist(xv, centroids).argmin(1)
    assert (predictions == val.labels).float().mean() > 0.9


def test_dataset_info_native_sizes():
    assert dataset_info("fashion_mnist", None) == DatasetInfo(1, 28, 10, (0.2860,), (0.3530,))
    assert dataset_info("cifar10", None).image_size == 32
    assert dataset_info("stl10", None, labelled=False).num_classes == 0
    assert dataset_info("stl10", None).image_size == 96


def test_tensor_dataset_validates_inputs():
    with pytest.raises(ValueError):
        TensorImageDataset(torch.zeros(2, 3, 4, 4), None)
    with pytest.raises(ValueError):
        TensorImageDataset(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))
    ds = TensorImageDataset(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), None)
    assert ds[1][1] == -1 and len(ds) == 2


def test_download_fetches_with_torchvision_then_reads_our_format(tmp_path, monkeypatch):
    """download=True calls torchvision's dataset class (faked here: no network) and reads what it left on disk."""
    import torchvision.datasets

    calls = []

    class FakeCIFAR100:
        def __init__(self, root, download):
            calls.append((root, download))
            folder = Path(root) / "cifar-100-python"
            folder.mkdir()
            _write_cifar_pickle(folder / "train", _pattern(2, 3, 32, 32), np.array([1, 2]), b"fine_labels")
            _write_cifar_pickle(folder / "test", _pattern(1, 3, 32, 32), np.array([3]), b"fine_labels")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", FakeCIFAR100)
    with pytest.raises(FileNotFoundError):
        load_dataset("cifar100", str(tmp_path / "dl"), "train")
    assert not calls
    ds = load_dataset("cifar100", str(tmp_path / "dl"), "train", download=True)
    assert calls == [(str(tmp_path / "dl"), True)] and ds.labels.tolist() == [1, 2]
    load_dataset("cifar100", str(tmp_path / "dl"), "val", download=True)
    assert len(calls) == 1  # already on disk: no second download
