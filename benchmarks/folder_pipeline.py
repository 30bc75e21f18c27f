"""Image-folder pipelines side by side: per-sample torchvision vs decode-time crops + BatchedViews.

Used by ``throughput.py --imagefolder DIR``. Writes (once) a synthetic ImageNet-like folder of JPEGs
(sides 300-500 px, quality 90, textured: gratings, colour blobs and grain), then, with the same number
of DataLoader workers and the same batch size, times training batches made ready on the device:

* per-sample: ``data.augment: workers`` (every op of every view per image in the workers);
* device: ``data.augment: device`` (the workers decode and cut the crops, BatchedViews on the device
  does the rest), through SSLDataModule itself;
* gpu-decode (CUDA only): ``data.decode: gpu`` (the workers read the bytes, the GPU decodes and crops).

Recipes: (a) BYOL, 2 x 224 px, views of experiments/imagenet100/byol.yaml; (b) DINO multi-crop,
2 x 224 px (scale 0.4-1) + 6 x 96 px (scale 0.05-0.4, blur p 0.5), the paper's recipe.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from ssl_lightning.data.datamodule import SSLDataModule
from ssl_lightning.data.views import ViewConfig
from timing import clock

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 10


def recipes() -> dict[str, list[ViewConfig]]:
    byol = yaml.safe_load((ROOT / "experiments" / "imagenet100" / "byol.yaml").read_text())["data"]["views"]
    dino_global = [{**v, "scale": (0.4, 1.0)} for v in byol]  # blur 1.0 / 0.1, solarize 0 / 0.2, as DINO
    local = ViewConfig(size=96, count=6, scale=(0.05, 0.4), blur_p=0.5)
    return {"(a) BYOL 2x224": [ViewConfig(**v) for v in byol],
            "(b) DINO 2x224+6x96": [ViewConfig(**v) for v in dino_global] + [local]}


def textured_image(rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8, sides 300-500: a few coloured gratings, smooth colour blobs and grain."""
    height, width = rng.integers(300, 501, size=2)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.zeros((height, width, 3), np.float32)
    for _ in range(3):
        angle, freq = rng.uniform(0, np.pi), rng.uniform(0.01, 0.15)
        wave = np.sin(freq * (x * np.cos(angle) + y * np.sin(angle)) + rng.uniform(0, 6.3))
        image += wave[..., None] * rng.uniform(0.1, 0.3, 3)
    for _ in range(4):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(30, 150)
        image += np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))[..., None] * rng.uniform(-0.4, 0.4, 3)
    image += rng.normal(0, 0.04, image.shape).astype(np.float32)
    return np.clip((image + 0.5) * 255, 0, 255).astype(np.uint8)


def write_image_folder(root: Path, count: int, seed: int = 0) -> Path:
    """root/train/<class>/*.jpg, ``count`` JPEGs (quality 90); kept when it already holds that many."""
    train = root / "train"
    if len(list(train.glob("*/*.jpg"))) == count:
        return root
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = train / f"class{i % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(textured_image(rng)).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def images_per_second(root: Path, views: list[ViewConfig], augment: str, *, workers: int, batch_size: int,
                      batches: int, device: torch.device, decode: str = "cpu") -> float:
    """Training batches of ``batch_size`` images made ready on ``device`` per second (views included)."""
    data = SSLDataModule(dataset="imagefolder", data_dir=str(root), batch_size=batch_size, num_workers=workers,
                         views=views, augment=augment, labelled=False, **({"decode": decode} if decode != "cpu" else {}))
    data.setup("fit")
    iterator = iter(data.train_dataloader())

    def next_views() -> None:
        batch = next(iterator)
        if augment == "device":
            images = batch[0]
            on_device = images.to(device) if isinstance(images, torch.Tensor) else [t.to(device) for t in images]
            data.device_views(on_device)

    for _ in range(2 * workers + 1):  # untimed: worker start-up and the batches they prefetch meanwhile
        next_views()
    start = clock()
    for _ in range(batches):
        next_views()
    return batches * batch_size / (clock() - start)


def report(root: Path, *, workers: int, batch_size: int, batches: int, device: torch.device) -> None:
    """Prints images/s of every pipeline for both recipes and the device/per-sample ratio.

    On a CPU the main process (which runs BatchedViews) keeps one thread: with ``workers`` busy
    workers on the same cores, more OpenMP threads only wait for each other (measured 3-15x slower
    per batch with 2 threads next to 2 workers on 2 cores).
    """
    if device.type == "cpu":
        torch.set_num_threads(1)
    modes = [("per-sample (augment: workers)", "workers", "cpu"), ("decode-time crops + batched (device)", "device", "cpu")]
    if device.type == "cuda":
        modes.append(("GPU decode (decode: gpu)", "device", "gpu"))
    print(f"{root}: {len(list((root / 'train').glob('*/*.jpg')))} JPEGs, {workers} workers, batch {batch_size}, "
          f"{batches} timed batches, {time.strftime('%Y-%m-%d %H:%M')}")
    for name, views in recipes().items():
        rates = [images_per_second(root, views, augment, workers=workers, batch_size=batch_size, batches=batches,
                                   device=device, decode=decode) for _, augment, decode in modes]
        cells = "   ".join(f"{label} {rate:7.1f} img/s" for (label, _, _), rate in zip(modes, rates))
        print(f"{name}: {cells}   ratio {rates[1] / rates[0]:.2f}x")
