"""The one place image files are decoded: PIL, with JPEG DCT-scaled (draft) decoding when it is safe.

A JPEG can be decoded at 1/2, 1/4 or 1/8 of its size for little more than the cost of reading it
(libjpeg scales in the DCT domain). ``open_image`` reads only the header, so the crop boxes can be
drawn first; ``decode`` then asks for the largest reduction that still leaves every crop at least twice as many
pixels a side as its output (so every crop is still a downscale by 2 or more after the reduction).
Grayscale, CMYK, palette and alpha images become the dataset's channels (``convert``: RGB or L;
alpha is dropped, as ``ImageFolderDataset`` and torchvision's loaders do).

``decode_jpegs`` decodes a batch of raw JPEG files on the training device instead (``data.decode:
device``: nvJPEG on CUDA, libjpeg-turbo on a CPU), for when the workers are the bottleneck.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from PIL import Image

# Larger decoded images are refused (or skipped): a 12,000 x 9,000 PNG would take 324 MB per worker.
# JPEGs that large pass with augment: device, where draft decoding reduces them first.
MAX_DECODED_PIXELS = 64 * 2**20
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class UnreadableImage(ValueError):
    """A file that is not a decodable image (truncated, corrupt, not an image, or too large)."""


def open_image(path: Path | str) -> Image.Image:
    """The image with only its header read (size and mode known, pixels not decoded yet)."""
    try:
        with warnings.catch_warnings():  # the size guard below replaces PIL's bomb warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(path)
    except DECODE_ERRORS as err:
        raise UnreadableImage(f"cannot decode image {path}: {err}; delete or replace the file, "
                              "or set data.on_corrupt: skip") from err


def draft_reduction(image: Image.Image, min_side_ratio: float) -> int:
    """1, 2, 4 or 8: the JPEG DCT scale that leaves every crop still downscaled at least 2x.

    ``min_side_ratio`` is the smallest (crop side / output side) over every crop that will be cut
    from this image; the reduction is the largest power of two s with 2 s <= that ratio (1 for
    non-JPEG files). The margin of 2 keeps the antialiased resize, not libjpeg's scaled IDCT, as the
    filter that decides the output: on 50 of the benchmark's JPEGs, 64 px crops then differ from
    torchvision's crop-then-resize of the full decode by 0.032 uint8 levels on average (max 6;
    docs/image_folders.md); reducing as soon as the ratio reaches s gave 0.482 (max 12).
    """
    if image.format != "JPEG":
        return 1
    return next((s for s in (8, 4, 2) if min_side_ratio >= 2 * s), 1)


def decode(image: Image.Image, channels: int, reduction: int = 1) -> Image.Image:
    """Decode an ``open_image`` result, ``reduction`` times smaller per side (JPEG only), to RGB or L.

    The returned image is ``ceil(size / reduction)`` per side (``reduction`` 1, 2, 4 or 8).
    Raises UnreadableImage naming the file for truncated or corrupt data and for images above
    MAX_DECODED_PIXELS after the reduction.
    """
    path = getattr(image, "filename", "<bytes>")
    mode = "L" if channels == 1 else "RGB"
    try:
        if reduction > 1:
            width, height = image.size
            image.draft(mode, (width // reduction, height // reduction))  # PIL picks the largest s <= size / this
        if image.size[0] * image.size[1] > MAX_DECODED_PIXELS:
            raise UnreadableImage(
                f"image {path} is {image.size[0]} x {image.size[1]} px, more than the {MAX_DECODED_PIXELS:,} "
                "pixels decoded at once; downscale the file (JPEGs are decoded reduced with data.augment: device)")
        image.load()
        return image if image.mode == mode else image.convert(mode)
    except UnreadableImage:
        raise
    except DECODE_ERRORS as err:
        raise UnreadableImage(f"cannot decode image {path}: {err}; delete or replace the file, "
                              "or set data.on_corrupt: skip") from err


def decode_jpegs(data: list[bytes], channels: int, device: torch.device | str) -> list[torch.Tensor]:
    """Raw JPEG files -> [uint8 (channels, H, W)] decoded on ``device`` (one batched nvJPEG call on CUDA).

    On failure every file is decoded alone, so the error names the first bad one (its index in
    ``data``, as ``UnreadableImage.index``).
    """
    from torchvision.io import ImageReadMode, decode_jpeg  # noqa: PLC0415 (imports torchvision's ops)

    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    try:
        return list(decode_jpeg(tensors, mode=mode, device=device))
    except RuntimeError:
        for index, tensor in enumerate(tensors):
            try:
                decode_jpeg(tensor, mode=mode, device=device)
            except RuntimeError as err:
                error = UnreadableImage(f"cannot decode JPEG {index} of the batch on {device}: {err}")
                error.index = index
                raise error from err
        raise
