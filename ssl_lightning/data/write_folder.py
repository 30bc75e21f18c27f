"""Write any dataset the suite reads as an image folder: ``<out>/<split>/<class>/<index>.png``.

``python -m ssl_lightning.data.write_folder --dataset fashion_mnist --out DIR [--per-split 500]``
writes train/ and val/ with one folder per class (``class_<label>``, or ``unlabelled`` without labels),
which ``data.dataset: imagefolder`` then reads. ``--format jpg`` writes JPEGs (quality 95) instead.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from ssl_lightning.data.datasets import DATASET_NAMES, load_dataset


def to_pil(image: torch.Tensor) -> Image.Image:
    """uint8 (C, H, W), C 1 or 3 -> PIL L or RGB."""
    array = image.permute(1, 2, 0).numpy()
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


def write_image_folder(name: str, out: str | Path, *, data_dir: str | None = None, per_split: int | None = None,
                       fmt: str = "png", splits: tuple[str, ...] = ("train", "val"), seed: int = 0) -> dict[str, int]:
    """Writes ``per_split`` images (all when None; a seeded random subset otherwise) of each split of
    dataset ``name``; returns {split: images written}."""
    out = Path(out)
    written = {}
    for split in splits:
        dataset = load_dataset(name, data_dir, split)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
        chosen = sorted(order[:per_split] if per_split else order)
        for index in chosen:
            image, label = dataset[index]
            folder = out / split / (f"class_{label}" if label >= 0 else "unlabelled")
            folder.mkdir(parents=True, exist_ok=True)
            options = {"quality": 95} if fmt == "jpg" else {}
            to_pil(image).save(folder / f"{index:05d}.{fmt}", **options)
        written[split] = len(chosen)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=DATASET_NAMES, default="fashion_mnist")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--per-split", dest="per_split", type=int, default=None)
    parser.add_argument("--format", dest="fmt", choices=("png", "jpg"), default="png")
    args = parser.parse_args(argv)
    written = write_image_folder(args.dataset, args.out, data_dir=args.data_dir, per_split=args.per_split,
                                 fmt=args.fmt)
    print(f"wrote {written} images to {args.out}", flush=True)


if __name__ == "__main__":
    main()
