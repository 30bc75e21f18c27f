"""Decode every image once, in DataLoader workers, and keep a few numbers per image.

Image files are decoded with the suite's decoder (ssl_lightning.data.decode) DCT-reduced to about
``WORK_SIDE``-``2 WORK_SIDE`` px on the shorter side (JPEG draft decoding: the cost of a decode is
mostly reading the file); every statistic is then computed on the image resized so that its shorter
side is at most ``WORK_SIDE`` px, so the numbers do not depend on the file's resolution.

One record per image (``scan_split``): path, split, label, ``ok`` / ``error``, the stored size and
channels, and the statistics below (all on 0-255 gray levels of the working image).

- ``mean``, ``std``: brightness and contrast (dark, bright, low information);
- ``sharpness``: variance of the 4-neighbour Laplacian / variance of the image (blurry; contrast-free);
- ``spread``: 99th percentile over pixels of (max - min over R, G, B) (grayscale stored as RGB);
- ``exact``: 64-bit blake2b of the decoded pixels and their shape (exact duplicates; a DCT-reduced decode
  is confirmed on the full decode, ssl_lightning.audit.duplicates);
- ``phash``, ``phash_fine``: 64- and 256-bit perceptual hashes (DCT of the 32 x 32 gray image, its
  8 x 8 and 16 x 16 lowest frequencies above their median), an int64 and 32 bytes.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ssl_lightning.data.datasets import ImageFolderDataset, sample_paths
from ssl_lightning.data.decode import UnreadableImage, decode, open_image

WORK_SIDE = 64  # statistics are computed at most this many px on the shorter side
HASH_SIDE = 32  # the perceptual hash looks at the image resized to 32 x 32


def _dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix (n, n): row k is the k-th cosine."""
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    m = np.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    m[0] /= math.sqrt(2)
    return m


_DCT = _dct_matrix(HASH_SIDE)
_BITS = (1 << np.arange(64, dtype=np.uint64)).astype(np.uint64)


def perceptual_hashes(gray: Image.Image) -> tuple[int, bytes]:
    """pHash of a gray PIL image at two resolutions: the 8 x 8 and the 16 x 16 lowest DCT frequencies of
    its 32 x 32 resize, each bit ``coefficient > median`` (DC term in the bits, not in the median).
    Returns (64-bit hash as int64, 256-bit hash as 32 bytes). The coarse hash finds candidate pairs
    quickly, the fine one decides (duplicates.near_pairs)."""
    small = np.asarray(gray.resize((HASH_SIDE, HASH_SIDE), Image.BILINEAR), dtype=np.float64)
    dct = _DCT @ small @ _DCT.T
    coarse, fine = dct[:8, :8].ravel(), dct[:16, :16].ravel()
    coarse_bits = coarse > np.median(coarse[1:])
    coarse_hash = np.bitwise_or.reduce(_BITS[coarse_bits], initial=np.uint64(0))
    return int(np.uint64(coarse_hash).view(np.int64)), np.packbits(fine > np.median(fine[1:])).tobytes()


def exact_hash(pixels: np.ndarray) -> int:
    """64-bit blake2b of a uint8 array's shape and bytes, as int64."""
    digest = hashlib.blake2b(str(pixels.shape).encode() + pixels.tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def image_statistics(image: Image.Image) -> dict:
    """The per-image numbers of the module docstring for a decoded RGB or L PIL image."""
    pixels = np.asarray(image)
    stats = {"exact": exact_hash(pixels)}
    width, height = image.size
    scale = min(1.0, WORK_SIDE / min(width, height))
    work = image if scale == 1.0 else image.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                                                  Image.BILINEAR)
    gray_image = work if work.mode == "L" else work.convert("L")
    gray = np.asarray(gray_image, dtype=np.float32)
    if work.mode == "RGB":
        rgb = np.asarray(work, dtype=np.int16)
        stats["spread"] = float(np.percentile(rgb.max(2) - rgb.min(2), 99))
    else:
        stats["spread"] = 0.0
    variance = float(gray.var())
    laplacian = (gray[1:-1, :-2] + gray[1:-1, 2:] + gray[:-2, 1:-1] + gray[2:, 1:-1] - 4 * gray[1:-1, 1:-1])
    stats.update(mean=float(gray.mean()), std=math.sqrt(variance),
                 sharpness=float(laplacian.var()) / variance if variance > 1e-6 and laplacian.size else float("nan"),
                 **dict(zip(("phash", "phash_fine"), perceptual_hashes(gray_image))))
    return stats


def _draft_reduction(width: int, height: int) -> int:
    """Largest JPEG DCT scale (1, 2, 4, 8) that keeps the shorter side >= WORK_SIDE."""
    return next((s for s in (8, 4, 2) if min(width, height) >= WORK_SIDE * s), 1)


def scan_file(path: str) -> dict:
    """Decode one image file (DCT-reduced when it is a JPEG) and measure it; ``ok`` False with the error
    message for files that cannot be read."""
    try:
        with open_image(path) as image:
            width, height, bands, fmt = *image.size, len(image.getbands()), image.format
            reduction = _draft_reduction(width, height) if fmt == "JPEG" else 1
            decoded = decode(image, 1 if bands == 1 else 3, reduction)
            record = {"ok": True, "width": width, "height": height, "channels": bands,
                      "reduced": decoded.size != (width, height)}
            record.update(image_statistics(decoded))
            return record
    except (UnreadableImage, OSError, ValueError) as err:
        return {"ok": False, "error": str(err).split("; delete")[0]}


def scan_array(image: torch.Tensor) -> dict:
    """Measure one in-memory uint8 image (C, H, W)."""
    channels, height, width = image.shape
    array = image.permute(1, 2, 0).numpy()
    pil = Image.fromarray(array[:, :, 0] if channels == 1 else array[:, :, :3])
    return {"ok": True, "width": width, "height": height, "channels": channels, "reduced": False,
            **image_statistics(pil)}


class ScanDataset(Dataset):
    """Item i -> the record of sample i of ``base`` (an ImageFolderDataset or TensorImageDataset)."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        if isinstance(self.base, ImageFolderDataset):
            return scan_file(str(self.base.files[index]))
        return scan_array(self.base[index][0])


@dataclass
class Split:
    """The samples of one split: the dataset, its sample paths and labels (-1 when unlabelled)."""
    name: str
    dataset: Dataset
    paths: list[str]
    labels: list[int]
    classes: list[str]


def load_split(dataset: Dataset, name: str, split: str) -> Split:
    """A Split of ``dataset`` (split ``split`` of the dataset called ``name``)."""
    labels = (list(dataset.labels) if isinstance(dataset, ImageFolderDataset) else dataset.labels.tolist())
    return Split(split, dataset, sample_paths(dataset, name, split), labels, list(getattr(dataset, "classes", [])))


def scan_split(split: Split, *, num_workers: int = 2, batch_size: int = 32) -> list[dict]:
    """Records of every sample of ``split``, in order, decoded in ``num_workers`` DataLoader workers."""
    loader = DataLoader(ScanDataset(split.dataset), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=list, prefetch_factor=8 if num_workers else None)
    records = [record for batch in loader for record in batch]
    for record, path, label in zip(records, split.paths, split.labels):
        record.update(path=path, split=split.name, label=label)
    return records
