"""Dataset readers: Fashion-MNIST (idx), CIFAR-10/100 (python pickles), STL-10 (binary), image folders, synthetic,
scikit-learn's 8x8 handwritten digits.

Every dataset yields ``(uint8 image tensor (C, H, W), int label)``; label -1 means unlabelled.
The on-disk formats are parsed here (no md5 checks); torchvision is used only to download.
"""
from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
import warnings
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ssl_lightning.data.decode import decode, open_image

DATASET_NAMES: tuple[str, ...] = ("fashion_mnist", "cifar10", "cifar100", "stl10", "imagefolder", "synthetic",
                                   "digits")
SPLITS: tuple[str, ...] = ("train", "val")
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "ssl_lightning"
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
STL_SIDE = 96
STL_IMAGE_BYTES = 3 * STL_SIDE * STL_SIDE


@dataclass(frozen=True)
class DatasetInfo:
    channels: int  # 1 for fashion_mnist, 3 otherwise
    image_size: int  # native side length (28, 32, 96); for imagefolder the configured crop size
    num_classes: int  # 0 when unlabelled
    mean: tuple[float, ...]  # per-channel, in [0, 1] pixel units
    std: tuple[float, ...]


_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_STATIC_INFO: dict[str, DatasetInfo] = {
    "fashion_mnist": DatasetInfo(1, 28, 10, (0.2860,), (0.3530,)),
    "cifar10": DatasetInfo(3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": DatasetInfo(3, 32, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": DatasetInfo(3, 96, 10, (0.4408, 0.4279, 0.3867), (0.2683, 0.2610, 0.2687)),
    "digits": DatasetInfo(1, 8, 10, (0.3047,), (0.3756,)),  # of the train split
}


class TensorImageDataset(Dataset):
    """In-memory uint8 images (N, C, H, W) and int64 labels (N,), label -1 = unlabelled.

    Indexing returns (uint8 tensor (C, H, W), int).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        labels = torch.full((len(images),), -1, dtype=torch.int64) if labels is None else labels.to(torch.int64)
        if labels.shape != (len(images),):
            raise ValueError(f"labels must have shape ({len(images)},), got {tuple(labels.shape)}")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


class ImageFolderDataset(Dataset):
    """Image files decoded lazily with PIL; returns (uint8 RGB tensor (3, H, W), label int or -1)."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int], classes: Sequence[str] = ()):
        if len(files) != len(labels):
            raise ValueError(f"{len(files)} files but {len(labels)} labels")
        self.files, self.labels, self.classes = [Path(f) for f in files], [int(x) for x in labels], list(classes)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with open_image(self.files[index]) as image:
            rgb = np.array(decode(image, 3), dtype=np.uint8)  # (H, W, 3)
        return torch.from_numpy(rgb).permute(2, 0, 1).contiguous(), self.labels[index]


@dataclass(frozen=True)
class _Request:
    data_dir: str | None
    split: str
    labelled: bool
    download: bool
    synthetic_size: int
    seed: int
    image_size: int | None


# ----------------------------------------------------------------------------- locating files
_FASHION_FILES = tuple(f"{s}-{k}-idx{d}-ubyte" for s in ("train", "t10k") for k, d in (("images", 3), ("labels", 1)))
_CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_STL_FILES = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin")


def _default_root(data_dir: str | None) -> Path:
    return Path(data_dir).expanduser() if data_dir else DEFAULT_CACHE_DIR


def _idx_file(directory: Path, name: str) -> Path | None:
    """``directory/name`` or ``directory/name.gz``, whichever exists."""
    return next((p for p in (directory / name, directory / f"{name}.gz") if p.is_file()), None)


def _first_dir_with(name: str, candidates: list[Path], required: Sequence[str], fixes: str,
                    *, gz_ok: bool = False) -> Path:
    """First candidate holding every required file (``gz_ok``: ``<file>.gz`` also counts)."""
    candidates = list(dict.fromkeys(candidates))
    for directory in candidates:
        if all(_idx_file(directory, f) if gz_ok else (directory / f).is_file() for f in required):
            return directory
    searched = "\n".join(f"  - {d}" for d in candidates)
    raise FileNotFoundError(f"{name}: files {', '.join(required)} not found; searched:\n{searched}\nFix: {fixes}")


def _find_fashion_mnist(data_dir: str | None) -> Path:
    given = [Path(data_dir).expanduser()] if data_dir else []
    candidates = given + [FASHION_MNIST_SYSTEM_DIR, _default_root(data_dir) / "FashionMNIST" / "raw"]
    fixes = (f"`apt-get install dataset-fashion-mnist` (installs {FASHION_MNIST_SYSTEM_DIR}), "
             "set data.data_dir to the folder holding them, or set data.download: true")
    found = _first_dir_with("fashion_mnist", candidates, _FASHION_FILES, fixes, gz_ok=True)
    if given and found != given[0]:
        warnings.warn(f"fashion_mnist: no idx files in data_dir {given[0]}; reading {found} instead", stacklevel=2)
    return found


def _find_in_subdir(name: str, subdir: str, required: Sequence[str], data_dir: str | None) -> Path:
    root = _default_root(data_dir)
    fixes = f"set data.data_dir to the folder containing {subdir}/ (or to {subdir}/ itself), or set data.download: true"
    return _first_dir_with(name, [root / subdir, root], required, fixes)


def _find_imagefolder(data_dir: str | None) -> Path:
    root = Path(data_dir).expanduser() if data_dir else None
    if root is None or not ((root / "train").is_dir() or (root.is_dir() and any(map(_is_image, root.rglob("*"))))):
        where = f"{root} has no train/ directory and no images" if root else "data.data_dir is not set"
        raise FileNotFoundError(f"imagefolder: {where}; set data.data_dir to a folder with train/<class>/*.jpg "
                                f"(and val/<class>/), extensions {', '.join(IMAGE_EXTENSIONS)}")
    return root


def _find_digits(data_dir: str | None) -> Path:
    """Reads no files; fails here, early, when scikit-learn (which ships the digits) is missing."""
    _sklearn_digits()
    return _default_root(data_dir)


_FINDERS: dict[str, Callable[[str | None], Path]] = {
    "fashion_mnist": _find_fashion_mnist,
    "cifar10": partial(_find_in_subdir, "cifar10", "cifar-10-batches-py", _CIFAR10_TRAIN + ("test_batch",)),
    "cifar100": partial(_find_in_subdir, "cifar100", "cifar-100-python", ("train", "test")),
    "stl10": partial(_find_in_subdir, "stl10", "stl10_binary", _STL_FILES),
    "imagefolder": _find_imagefolder,
    "synthetic": _default_root,  # reads no files
    "digits": lambda data_dir: _find_digits(data_dir),
}
_DOWNLOADERS: dict[str, tuple[str, dict]] = {  # name -> torchvision dataset class, extra kwargs
    "fashion_mnist": ("FashionMNIST", {}),
    "cifar10": ("CIFAR10", {}),
    "cifar100": ("CIFAR100", {}),
    "stl10": ("STL10", {"split": "train+unlabeled"}),
}


def _find_or_download(name: str, data_dir: str | None, download: bool) -> Path:
    """find_data_dir; when missing and ``download``, fetch with torchvision into data_dir (or the cache) first."""
    try:
        return find_data_dir(name, data_dir)
    except FileNotFoundError:
        if not download or name not in _DOWNLOADERS:
            raise
    import torchvision.datasets

    cls_name, kwargs = _DOWNLOADERS[name]
    _default_root(data_dir).mkdir(parents=True, exist_ok=True)
    getattr(torchvision.datasets, cls_name)(str(_default_root(data_dir)), download=True, **kwargs)
    return find_data_dir(name, data_dir)


# ----------------------------------------------------------------------------- format readers
def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse an idx file (optionally gzipped); magic 2051 -> (N, H, W) images, 2049 -> (N,) labels."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"cannot read idx file {path}: {err}") from err
    ndim, header = magic & 0xFF, 4 + 4 * (magic & 0xFF)
    found = struct.unpack(">I", raw[:4])[0] if len(raw) >= 4 else None
    if found != magic:
        raise ValueError(f"idx file {path}: magic number {found}, expected {magic}")
    dims = struct.unpack(f">{ndim}I", raw[4:header]) if len(raw) >= header else ()
    data = np.frombuffer(raw, dtype=np.uint8, offset=min(len(raw), header))
    if len(dims) != ndim or data.size != math.prod(dims):
        raise ValueError(f"idx file {path}: header dims {dims} do not match the {data.size} data bytes")
    return data.reshape(dims)


def _read_fashion_mnist(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 1, 28, 28) uint8 images and (N,) int64 labels."""
    prefix = "train" if split == "train" else "t10k"
    image_path = _idx_file(root, f"{prefix}-images-idx3-ubyte")
    label_path = _idx_file(root, f"{prefix}-labels-idx1-ubyte")
    images, labels = _read_idx(image_path, 2051), _read_idx(label_path, 2049)
    if len(images) != len(labels):
        raise ValueError(f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _read_cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python pickle -> (N, 3, 32, 32) uint8, (N,) int64."""
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data, labels = np.asarray(batch[b"data"], dtype=np.uint8), np.asarray(batch[label_key], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError) as err:
        raise ValueError(f"CIFAR batch {path}: not a CIFAR python pickle ({err!r})") from err
    if data.size != len(labels) * 3072:
        raise ValueError(f"CIFAR batch {path}: {data.size} pixel bytes for {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32), labels


def _read_cifar(files: dict[str, Sequence[str]], label_key: bytes, root: Path, split: str):
    """Concatenated batches of the split -> (N, 3, 32, 32) uint8, (N,) int64."""
    images, labels = zip(*(_read_cifar_batch(root / f, label_key) for f in files[split]))
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def _read_stl_images(paths: Sequence[Path]) -> torch.Tensor:
    """STL-10 column-major X files -> (N, 3, 96, 96) uint8, copied via memmap into one array."""
    counts = [p.stat().st_size // STL_IMAGE_BYTES for p in paths]
    for path, n in zip(paths, counts):
        if n == 0 or path.stat().st_size % STL_IMAGE_BYTES:
            raise ValueError(f"STL-10 file {path}: size {path.stat().st_size} is not a multiple of {STL_IMAGE_BYTES}")
    out = np.empty((sum(counts), 3, STL_SIDE, STL_SIDE), dtype=np.uint8)
    for path, n, start in zip(paths, counts, np.cumsum([0] + counts)):
        stored = np.memmap(path, dtype=np.uint8, mode="r").reshape(n, 3, STL_SIDE, STL_SIDE)
        out[start:start + n] = stored.transpose(0, 1, 3, 2)  # stored column-major: (x, y) -> (y, x)
    return torch.from_numpy(out)


def _read_stl10(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """train = train + unlabeled (labels -1); val = test. Labels stored as 1..10."""
    prefix = "train" if split == "train" else "test"
    x_files = [root / f"{prefix}_X.bin"] + [p for p in [root / "unlabeled_X.bin"] if split == "train" and p.is_file()]
    if split == "train" and len(x_files) == 1:
        warnings.warn(f"STL-10: {root / 'unlabeled_X.bin'} missing; training on the labelled train images only")
    images = _read_stl_images(x_files)
    y = torch.from_numpy(np.fromfile(root / f"{prefix}_y.bin", dtype=np.uint8).astype(np.int64) - 1)
    n_labelled = x_files[0].stat().st_size // STL_IMAGE_BYTES
    if len(y) != n_labelled or (y.numel() and (y.min() < 0 or y.max() > 9)):
        raise ValueError(f"STL-10 labels {root / f'{prefix}_y.bin'}: need {n_labelled} values in 1..10, got {len(y)}")
    return images, torch.cat([y, torch.full((len(images) - n_labelled,), -1, dtype=torch.int64)])


DIGITS_TRAIN_FRACTION = 0.8


def _sklearn_digits():
    """scikit-learn's ``load_digits`` (imported only when the digits are used)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ModuleNotFoundError("digits: the dataset ships with scikit-learn, which is not installed; "
                                  "`pip install scikit-learn`") from None
    return load_digits


def _read_digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 handwritten digits, 8x8 values 0..16 -> (N, 1, 8, 8) uint8 0..255 and (N,)
    labels 0..9. Split per class with one seeded permutation (seed 0): the first
    round(0.8 * count) images are train (1438 in all), the rest val (359): the same on every machine."""
    bunch = _sklearn_digits()()
    images = torch.from_numpy(np.round(bunch.images * (255 / 16)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    generator = torch.Generator().manual_seed(0)
    chosen = []
    for c in range(10):
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        keep = round(DIGITS_TRAIN_FRACTION * len(members))
        chosen.append(members[:keep] if split == "train" else members[keep:])
    indices = torch.cat(chosen).sort().values
    return images[indices], labels[indices]


_READERS: dict[str, Callable[[Path, str], tuple[torch.Tensor, torch.Tensor]]] = {
    "fashion_mnist": _read_fashion_mnist,
    "cifar10": partial(_read_cifar, {"train": _CIFAR10_TRAIN, "val": ("test_batch",)}, b"labels"),
    "cifar100": partial(_read_cifar, {"train": ("train",), "val": ("test",)}, b"fine_labels"),
    "stl10": _read_stl10,
    "digits": lambda root, split: _read_digits(split),
}


def _load_in_memory(name: str, req: _Request) -> TensorImageDataset:
    images, labels = _READERS[name](_find_or_download(name, req.data_dir, req.download), req.split)
    return TensorImageDataset(images, labels if req.labelled else None)


# ----------------------------------------------------------------------------- image folders
def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()


def _image_files(directory: Path) -> list[Path]:
    """All image files anywhere below ``directory`` (flat or nested), sorted; hidden files skipped."""
    return sorted(p for p in directory.rglob("*") if _is_image(p))


def _class_names(train_root: Path, *, required: bool) -> list[str]:
    classes = sorted(p.name for p in train_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if required and not classes:
        raise FileNotFoundError(f"imagefolder: no class sub-directories in {train_root}; "
                                "use <dir>/<class>/*.jpg, or set data.labelled: false for an unlabelled folder")
    return classes


def _split_root(root: Path, split: str) -> Path:
    """train: root/train, or root itself when it holds the images directly; val: root/val (must exist)."""
    if split == "train":
        return root / "train" if (root / "train").is_dir() else root
    if not (root / "val").is_dir():
        raise FileNotFoundError(f"imagefolder: no validation directory {root / 'val'}; "
                                "add val/<class>/ images or turn the probes off")
    return root / "val"


def _load_imagefolder(req: _Request) -> ImageFolderDataset:
    root = find_data_dir("imagefolder", req.data_dir)
    split_root = _split_root(root, req.split)
    if req.labelled:
        classes = _class_names(_split_root(root, "train"), required=True)
        unknown = set(_class_names(split_root, required=False)) - set(classes)
        if unknown:
            raise ValueError(f"imagefolder: {split_root} has classes not in the train split: {sorted(unknown)}")
        per_class = [_image_files(split_root / c) if (split_root / c).is_dir() else [] for c in classes]
        files, labels = [f for fs in per_class for f in fs], [i for i, fs in enumerate(per_class) for _ in fs]
    else:
        classes, files = [], _image_files(split_root)
        labels = [-1] * len(files)
    if not files:
        raise FileNotFoundError(f"imagefolder: no images ({', '.join(IMAGE_EXTENSIONS)}) found under {split_root}")
    return ImageFolderDataset(files, labels, classes)


def _imagefolder_info(data_dir: str | None, image_size: int | None, labelled: bool) -> DatasetInfo:
    train_root = _split_root(find_data_dir("imagefolder", data_dir), "train")
    num_classes = 0
    if labelled:
        classes = _class_names(train_root, required=True)
        empty = [c for c in classes if not any(map(_is_image, (train_root / c).rglob("*")))]
        if empty:
            raise FileNotFoundError(f"imagefolder: class folder(s) without images ({', '.join(IMAGE_EXTENSIONS)}) "
                                    f"in {train_root}: {', '.join(empty)}; add images or remove the folders")
        num_classes = len(classes)
        if num_classes == 1:
            warnings.warn(f"imagefolder: {train_root} has one class folder ({classes[0]}); a linear probe needs "
                          "at least 2 classes, so the probes are off (training is unlabelled)", stacklevel=2)
            num_classes = 0
    return DatasetInfo(3, image_size or 224, num_classes, *_IMAGENET_STATS)


# ----------------------------------------------------------------------------- synthetic
def _synthetic_patterns(size: int) -> torch.Tensor:
    """(10, 3, size, size) float class templates in [0, 1]: class colour plus oriented stripes (seed-independent)."""
    g = torch.Generator().manual_seed(1234)
    colours = 0.25 + 0.5 * torch.rand(10, 3, 1, 1, generator=g)
    angles, freqs = torch.arange(10.0) * math.pi / 10, 2.0 + torch.arange(10.0) % 3
    y, x = torch.meshgrid(torch.arange(size) / size, torch.arange(size) / size, indexing="ij")
    phase = x * angles.cos()[:, None, None] + y * angles.sin()[:, None, None]
    return (colours + 0.2 * torch.sin(2 * math.pi * freqs[:, None, None] * phase)[:, None]).clamp(0, 1)


def _load_synthetic(req: _Request) -> TensorImageDataset:
    """``synthetic_size`` samples, 3 x size x size uint8; train and val differ in seed, not in class patterns."""
    size = req.image_size or 32
    g = torch.Generator().manual_seed(req.seed * 2 + (0 if req.split == "train" else 1))
    labels = torch.randperm(req.synthetic_size, generator=g) % 10
    noise = 0.1 * torch.randn(req.synthetic_size, 3, size, size, generator=g)
    images = (_synthetic_patterns(size)[labels] + noise).clamp(0, 1).mul(255).round().to(torch.uint8)
    return TensorImageDataset(images, labels if req.labelled else None)


# ----------------------------------------------------------------------------- public API
_INFO: dict[str, Callable[[str | None, int | None, bool], DatasetInfo]] = {  # (data_dir, image_size, labelled)
    **{name: (lambda d, s, l, info=info: info) for name, info in _STATIC_INFO.items()},
    "imagefolder": _imagefolder_info,
    "synthetic": lambda d, s, l: DatasetInfo(3, s or 32, 10, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
}
_LOADERS: dict[str, Callable[[_Request], Dataset]] = {
    **{name: partial(_load_in_memory, name) for name in _READERS},
    "imagefolder": _load_imagefolder,
    "synthetic": _load_synthetic,
}


def sample_paths(dataset: Dataset, name: str, split: str) -> list[str]:
    """The name of each sample of ``load_dataset(name, ..., split)``: an image file's absolute path, or
    for in-memory datasets the pseudo-path ``<name>/<split>/<index, 5+ digits>`` (``fashion_mnist/train/00123``).
    A dataset with samples left out (``without_paths``) keeps the names of the samples it kept."""
    kept = getattr(dataset, "sample_paths", None)
    if kept is not None:
        return list(kept)
    if isinstance(dataset, ImageFolderDataset):
        return [os.path.abspath(f) for f in dataset.files]
    return [f"{name}/{split}/{i:05d}" for i in range(len(dataset))]


def read_path_list(file: str | Path) -> list[str]:
    """The paths listed in ``file``, one per line; blank lines and ``#`` comments skipped.
    ValueError naming the file when it does not exist."""
    path = Path(file).expanduser()
    if not path.is_file():
        raise ValueError(f"data.exclude: no such file {path}; write one with `ssl-lightning audit --write-exclude "
                         f"{path}` or drop data.exclude")
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def without_paths(dataset: Dataset, paths: list[str], excluded: set[str]) -> Dataset:
    """``dataset`` without the samples whose path (``paths[i]`` names sample i) is in ``excluded``."""
    keep = [i for i, p in enumerate(paths) if p not in excluded]
    if isinstance(dataset, ImageFolderDataset):
        out = ImageFolderDataset([dataset.files[i] for i in keep], [dataset.labels[i] for i in keep], dataset.classes)
    else:
        index = torch.tensor(keep, dtype=torch.int64)
        out = TensorImageDataset(dataset.images[index], dataset.labels[index])
    out.sample_paths = [paths[i] for i in keep]
    return out


def _check_name(name: str) -> None:
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")


def find_data_dir(name: str, data_dir: str | None) -> Path:
    """The directory actually read for ``name`` (raises FileNotFoundError listing what was searched and the fix)."""
    _check_name(name)
    return _FINDERS[name](data_dir)


def dataset_info(name: str, data_dir: str | None, *, image_size: int | None = None,
                 labelled: bool = True) -> DatasetInfo:
    """Channels, side length, class count and normalisation stats without loading the data."""
    _check_name(name)
    info = _INFO[name](data_dir, image_size, labelled)
    return info if labelled else replace(info, num_classes=0)


def load_dataset(name: str, data_dir: str | None, split: str, *, labelled: bool = True, download: bool = False,
                 synthetic_size: int = 512, seed: int = 0, image_size: int | None = None) -> Dataset:
    """Split "train" (what SSL trains on) or "val" (labelled held-out set); items are (uint8 (C, H, W), label)."""
    _check_name(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    return _LOADERS[name](_Request(data_dir, split, labelled, download, synthetic_size, seed, image_size))
