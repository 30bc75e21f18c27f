"""Decode-time crops for image files (``data.augment: device`` on ``imagefolder``).

A DataLoader worker reads a file, decodes it (``decode``: DCT-reduced when every crop allows it) and
cuts each view's random-resized crop, resized with antialiasing to the view size; it returns uint8
crops, one (count, C, size, size) tensor per kind of view. Everything after the crop (flip, jitter,
grayscale, blur, solarize, normalise) runs batched on the training device in BatchedViews.

The crop boxes follow torchvision's RandomResizedCrop rule (``random_resized_crop_params``, the same
function BatchedViews uses on in-memory data), drawn per sample from a generator seeded by
(seed, epoch, index): the crops of a sample do not depend on the worker, the number of workers, the
rank or world size, or on whether the epoch was resumed mid-way.

With ``decode="device"`` (``data.decode: device``) a worker returns a JPEG's raw bytes and its boxes
instead, and ``crops_on_device`` decodes the batch on the training device (``decode.decode_jpegs``,
nvJPEG on CUDA) and cuts the same boxes there with BatchedViews' ``crop_resize_flip``; other files
(PNG, CMYK JPEGs, ...) are still decoded and cropped in the worker.

Deviations from the per-sample pipeline: the crop is resized by PIL (antialiased bilinear, which
torchvision's tensor resize was built to match) on the uint8 image: within 1 uint8 level of
torchvision's crop-then-resize. A JPEG may be DCT-reduced first (only when every crop stays >= 2x
downscaled after it): against torchvision on the full decode, a mean 0.032 levels on the benchmark's
JPEGs (docs/image_folders.md), 0.87 on images with strong per-pixel colour noise
(tests/test_image_folder_crops.py).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ssl_lightning.data.batched_views import crop_resize_flip, random_resized_crop_params
from ssl_lightning.data.decode import UnreadableImage, decode, decode_jpegs, draft_reduction, open_image
from ssl_lightning.data.views import ViewConfig

Tensor = torch.Tensor
ON_CORRUPT = ("error", "skip")
DECODE_PLACES = ("workers", "device")
Encoded = tuple[bytes, list[Tensor], str]  # a JPEG file's bytes, its crop boxes and its path


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, epoch, index), well mixed (numpy's SeedSequence)."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def crop_boxes(width: int, height: int, configs: Sequence[ViewConfig], generator: torch.Generator) -> list[Tensor]:
    """One (count, 4) int64 tensor of (top, left, height, width) boxes per view config, torchvision's rule."""
    return [random_resized_crop_params(c.count, height, width, c.scale, c.ratio, generator) for c in configs]


def min_side_ratio(boxes: Sequence[Tensor], sizes: Sequence[int]) -> float:
    """The smallest crop side / output side over all boxes (n, 4) of every view config."""
    return min(float(b[:, 2:].min()) / size for b, size in zip(boxes, sizes))


def cut_crops(image: Image.Image, channels: int, boxes: Sequence[torch.Tensor], sizes: Sequence[int],
              reduction: int | None = None) -> list[Tensor]:
    """Decode ``image`` (header read) and cut its crops: boxes in full-size pixels -> [uint8 (count, C, s, s)].

    The file is DCT-reduced by ``draft_reduction`` (every crop stays >= 2x downscaled), or by
    ``reduction`` when given (the benchmark compares reductions).
    """
    width, height = image.size
    reduction = reduction or draft_reduction(image, min_side_ratio(boxes, sizes))
    decoded = decode(image, channels, reduction)
    # decoded pixel i holds source pixels [r * i, r * (i + 1)): boxes scale by exactly 1 / r
    sx = sy = 1 / reduction if decoded.size != (width, height) else 1.0
    crops = []
    for kind_boxes, size in zip(boxes, sizes):
        out = np.empty((len(kind_boxes), size, size, channels), dtype=np.uint8)
        for view, (top, left, h, w) in zip(out, kind_boxes.tolist()):
            # crop to the whole pixels the box touches first: PIL's resize(box=...) alone would filter in
            # pixels outside the box at its edges, where torchvision's crop-then-resize sees none
            x0, y0 = left * sx, top * sy
            x1, y1 = min((left + w) * sx, decoded.size[0]), min((top + h) * sy, decoded.size[1])
            hull = (math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1))
            box = (x0 - hull[0], y0 - hull[1], x1 - hull[0], y1 - hull[1])
            resized = decoded.crop(hull).resize((size, size), Image.Resampling.BILINEAR, box=box)
            view[...] = np.asarray(resized).reshape(view.shape)
        crops.append(torch.from_numpy(out).permute(0, 3, 1, 2).contiguous())
    return crops


class CroppedViewsDataset(Dataset):
    """Image files -> (crops, label, skipped) per (epoch, index) key (``ResumableSampler(keyed=True)``).

    crops: [uint8 (count, C, size, size)] per view config; skipped: the path of an unreadable file this
    sample replaced ("" when none). With ``on_corrupt="skip"`` an unreadable file is replaced by the
    next readable one in index order (wrapping), its crops drawn with the original key's generator,
    so batch shapes, determinism and exact resume are kept; with "error" it raises, naming the file.
    """

    def __init__(self, files: Sequence[Path], labels: Sequence[int], configs: Sequence[ViewConfig], channels: int,
                 *, seed: int = 0, on_corrupt: str = "error", decode: str = "workers"):
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"data.on_corrupt {on_corrupt!r} is not one of {ON_CORRUPT}")
        if decode not in DECODE_PLACES:
            raise ValueError(f"data.decode {decode!r} is not one of {DECODE_PLACES}")
        self.decode = decode
        if len(files) != len(labels) or not files:
            raise ValueError(f"need one label per file and at least one file, got {len(files)} files, "
                             f"{len(labels)} labels")
        self.files, self.labels = [Path(f) for f in files], list(labels)
        self.configs, self.channels, self.seed, self.on_corrupt = list(configs), channels, seed, on_corrupt
        self.sizes = [c.size for c in self.configs]

    def __len__(self) -> int:
        return len(self.files)

    def crops_of(self, index: int, generator: torch.Generator) -> list[Tensor] | Encoded:
        """The crops of file ``index``, or (decode="device", a JPEG in RGB or L) its bytes and boxes."""
        image = open_image(self.files[index])
        with image:
            boxes = crop_boxes(*image.size, self.configs, generator)
            if self.decode == "device" and image.format == "JPEG" and image.mode in ("RGB", "L"):
                return self.files[index].read_bytes(), boxes, str(self.files[index])
            return cut_crops(image, self.channels, boxes, self.sizes)

    def __getitem__(self, key: tuple[int, int]) -> tuple[list[Tensor] | Encoded, int, str]:
        epoch, index = key
        skipped = ""
        for attempt in range(len(self.files)):
            candidate = (index + attempt) % len(self.files)
            try:
                # the same generator state for every attempt: a replacement does not shift other draws
                return self.crops_of(candidate, sample_generator(self.seed, epoch, index)), \
                    self.labels[candidate], skipped
            except UnreadableImage:
                if self.on_corrupt == "error":
                    raise
                skipped = skipped or str(self.files[index])
        raise UnreadableImage(f"no file of {len(self.files)} under {self.files[0].parent} could be decoded")


def collate_encoded(items: list[tuple[list[Tensor] | Encoded, int, str]]) -> tuple[dict, Tensor, list[str]]:
    """Worker items of a decode="device" dataset -> (encoded batch, labels (N,), skipped paths).

    The encoded batch holds the JPEG bytes as Python bytes (so moving the batch to the device leaves
    them on the host, where the decoder reads them) with their boxes (N_jpeg, count, 4) per view
    config, and the crops the workers already cut (N_cut, count, C, size, size), with their indices.
    """
    payloads, labels, skipped = zip(*items)
    jpeg = [i for i, p in enumerate(payloads) if isinstance(p, tuple)]
    cut = [i for i, p in enumerate(payloads) if not isinstance(p, tuple)]
    kinds = len(payloads[0][1] if isinstance(payloads[0], tuple) else payloads[0])
    batch = {"size": len(payloads), "jpeg": [payloads[i][0] for i in jpeg],
             "jpeg_files": [payloads[i][2] for i in jpeg],
             "jpeg_index": torch.tensor(jpeg, dtype=torch.long), "cut_index": torch.tensor(cut, dtype=torch.long),
             "jpeg_boxes": [torch.stack([payloads[i][1][k] for i in jpeg]) if jpeg else None for k in range(kinds)],
             "cut": [torch.stack([payloads[i][k] for i in cut]) if cut else None for k in range(kinds)]}
    return batch, torch.tensor(labels), list(skipped)


def crops_on_device(batch: dict, configs: Sequence[ViewConfig], channels: int, device: torch.device) -> list[Tensor]:
    """A ``collate_encoded`` batch -> [uint8 (N, count, C, size, size)] per view config, on ``device``.

    The JPEGs are decoded together on the device, zero-padded to the largest one (the resampling
    weights outside a box are zero, so padding never enters a crop) and every box is cut with
    ``crop_resize_flip`` (antialiased, torchvision's resized_crop), rounded to uint8 like the worker's.
    """
    out = [torch.empty(batch["size"], c.count, channels, c.size, c.size, dtype=torch.uint8, device=device)
           for c in configs]
    if len(batch["cut_index"]):
        for crops, cut in zip(out, batch["cut"]):
            crops[batch["cut_index"].to(device)] = cut.to(device)
    if not batch["jpeg"]:
        return out
    try:
        images = decode_jpegs(batch["jpeg"], channels, device)
    except UnreadableImage as err:
        raise UnreadableImage(f"{err} ({batch['jpeg_files'][err.index]}); use data.decode: workers, which can "
                              "also skip such files (data.on_corrupt: skip)") from err
    height, width = max(im.shape[1] for im in images), max(im.shape[2] for im in images)
    padded = torch.zeros(len(images), height, channels, width, device=device)  # crop_resize_flip's layout
    for target, image in zip(padded, images):
        target[:image.shape[1], :, :image.shape[2]] = image.transpose(0, 1)
    padded = padded.transpose(1, 2)  # (m, C, H, W) view
    index = batch["jpeg_index"].to(device)
    for crops, boxes, cfg in zip(out, batch["jpeg_boxes"], configs):
        boxes = boxes.to(device)
        for j in range(cfg.count):
            view = crop_resize_flip(padded, boxes[:, j], None, cfg.size).round_().clamp_(0, 255)
            crops[index, j] = view.to(torch.uint8)
    return out
