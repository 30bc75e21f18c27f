"""Image-folder pipelines side by side: per-sample torchvision vs decode-time crops + BatchedViews.

Used by ``throughput.py --imagefolder DIR``. Writes (once) a synthetic ImageNet-like folder of JPEGs
(sides 300-500 px, quality 90, textured: gratings, colour blobs and grain), then, with the same number
of DataLoader workers and the same batch size, times training batches made ready on the device:

* per-sample: ``data.augment: workers`` (every op of every view per image in the workers);
* device: ``data.augment: device`` (the workers decode and cut the crops, BatchedViews on the device
  does the rest), through SSLDataModule itself;
* GPU decode (CUDA only): ``data.decode: device`` (the workers read the bytes, the GPU decodes and crops).

It first prints the per-image decoder costs on one core that decide which decoder runs when, and the
blur costs and the blur kernel ``BatchedViews`` picks here; then the CPU (``backbone_step.cpu_summary``).
Each pipeline's line has images/s and the CPU time per image of the main process and the workers.

Recipes: (a) BYOL, 2 x 224 px, views of experiments/imagenet100/byol.yaml; (b) DINO multi-crop,
2 x 224 px (scale 0.4-1) + 6 x 96 px (scale 0.05-0.4, blur p 0.5), the paper's recipe.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from ssl_lightning.allocator import keep_freed_memory
from ssl_lightning.data import blur
from ssl_lightning.data.batched_views import CPU_CHUNK_BYTES
from ssl_lightning.data.blur import banded_blur, blur_kernel_for, conv_blur
from ssl_lightning.data.crops import crop_boxes, crops_on_device, cut_crops, min_side_ratio, sample_generator
from ssl_lightning.data.datamodule import SSLDataModule
from ssl_lightning.data.decode import decode as decode_image, decode_jpegs, open_image
from ssl_lightning.data.views import ViewConfig, blur_kernel_size
from backbone_step import cpu_summary
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


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds these processes have used so far (Linux /proc; 0 elsewhere)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime in clock ticks
    return total / os.sysconf("SC_CLK_TCK") if total else 0.0


def images_per_second(root: Path, views: list[ViewConfig], augment: str, *, workers: int, batch_size: int,
                      batches: int, device: torch.device, decode: str = "workers") -> tuple[float, float]:
    """(training batches of ``batch_size`` images made ready on ``device`` per second (views included),
    CPU ms per image of the main process and the workers together).

    On a shared machine the first swings with the load; the second much less: on an otherwise idle
    2-core machine, where either pipeline keeps both cores busy, their ratio is about the rates' ratio.
    """
    data = SSLDataModule(dataset="imagefolder", data_dir=str(root), batch_size=batch_size, num_workers=workers,
                         views=views, augment=augment, labelled=False, decode=decode)
    data.setup("fit")
    iterator = iter(data.train_dataloader())
    pids = [os.getpid(), *(w.pid for w in getattr(iterator, "_workers", []))]

    def next_views() -> None:
        batch = next(iterator)
        if augment == "device":
            images = batch[0]
            if isinstance(images, dict):  # decode: device
                images = crops_on_device(images, data.views, data.channels, device)
            data.device_views([t.to(device, non_blocking=True) for t in images])

    for _ in range(2 * workers + 1):  # untimed: worker start-up and the batches they prefetch meanwhile
        next_views()
    start, cpu = clock(), cpu_seconds(pids)
    for _ in range(batches):
        next_views()
    seconds, cpu = clock() - start, cpu_seconds(pids) - cpu
    return batches * batch_size / seconds, cpu / (batches * batch_size) * 1e3


def report(root: Path, *, workers: int, batch_size: int, batches: int, device: torch.device) -> None:
    """Prints images/s of every pipeline for both recipes and the device/per-sample ratio.

    On a CPU the main process (which runs BatchedViews) keeps one thread: with ``workers`` busy
    workers on the same cores, more OpenMP threads only wait for each other (2 threads next to 2
    workers on the 2-core dev machine made a batch several times slower).
    """
    keep_freed_memory()  # as the CLI does at start-up (ssl_lightning/allocator.py)
    if device.type == "cpu":
        torch.set_num_threads(1)
    modes = [("per-sample (augment: workers)", "workers", "workers"),
             ("decode-time crops + batched (device)", "device", "workers")]
    if device.type == "cuda":
        modes.append(("GPU decode (decode: device)", "device", "device"))
    decoder_costs(sorted((root / "train").glob("*/*.jpg"))[:100])
    crop_deviation(sorted((root / "train").glob("*/*.jpg"))[:50])
    print(f"{root}: {len(list((root / 'train').glob('*/*.jpg')))} JPEGs, {workers} workers, batch {batch_size}, "
          f"{batches} timed batches, {time.strftime('%Y-%m-%d %H:%M')}, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(cpu_summary())
    for name, views in recipes().items():
        rates, cpu_ms = zip(*(images_per_second(root, views, augment, workers=workers, batch_size=batch_size,
                                                batches=batches, device=device, decode=decode)
                              for _, augment, decode in modes))
        cells = "   ".join(f"{label} {rate:7.1f} img/s ({ms:.1f} CPU ms/img)"
                           for (label, _, _), rate, ms in zip(modes, rates, cpu_ms))
        print(f"{name}: {cells}   ratio {rates[1] / rates[0]:.2f}x (CPU time {cpu_ms[0] / cpu_ms[1]:.2f}x)")


def _ms_per_call(fn, items) -> float:
    fn(items[0])
    start = time.perf_counter()
    for item in items:
        fn(item)
    return (time.perf_counter() - start) / len(items) * 1e3


def decoder_costs(files: list[Path]) -> None:
    """ms per image on one thread: the decoders, one 224 px crop, and the blur (conv vs banded matmuls,
    on one CPU chunk of views) with the kernel ``blur_kernel_for`` picks (timed in this process)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    data = [f.read_bytes() for f in files]

    def pil(reduction: int):
        return lambda path: decode_image(open_image(path), 3, reduction)

    costs = {"PIL full": _ms_per_call(pil(1), files), "PIL draft 1/2": _ms_per_call(pil(2), files),
             "PIL draft 1/4": _ms_per_call(pil(4), files),
             "torchvision decode_jpeg": _ms_per_call(lambda d: decode_jpegs([d], 3, "cpu"), data),
             "PIL crop + resize to 224": _ms_per_call(
                 lambda image: image.crop((10, 10, 260, 250)).resize((224, 224), Image.Resampling.BILINEAR),
                 [decode_image(open_image(f), 3) for f in files[:20]])}
    choices = []
    for size in (96, 128, 224):  # the local views, around BANDED_BLUR_MIN_KERNEL, and the 224 px views
        # one chunk of views, what BatchedViews blurs at once on a CPU (CPU_CHUNK_BYTES)
        count = max(1, CPU_CHUNK_BYTES // (3 * size * size * 4))
        views, kernel, sigma = torch.rand(count, 3, size, size), blur_kernel_size(size), torch.rand(count) * 1.9 + 0.1
        for name, kernel_fn in (("banded matmuls", banded_blur), ("depthwise conv2d", conv_blur)):
            costs[f"{size} px view blur (kernel {kernel}), {name}"] = _ms_per_call(
                lambda x: kernel_fn(x, sigma, kernel), [views] * max(3, 96 // count)) / count
        choices.append(f"{size} px {blur_kernel_for(views, sigma, kernel)}")
    torch.set_num_threads(threads)
    print("one thread, ms per image: " + ", ".join(f"{name} {ms:.2f}" for name, ms in costs.items()))
    setting = blur.BLUR_KERNEL or os.environ.get("SSL_LIGHTNING_BLUR", "auto")
    print(f"blur kernel ({setting}): {', '.join(choices)}")


def crop_deviation(files: list[Path], size: int = 64) -> None:
    """Mean and max |crop - torchvision crop of the full decode| in uint8 levels, for ``size`` px views
    (scale 0.08-1): with the DCT-reduction rule (every crop still >= 2x downscaled after it) and with
    reducing as soon as the crops are ``s`` times the output (no margin)."""
    from torchvision.transforms.v2 import functional as TF

    cfg = [ViewConfig(size=size, count=4)]
    errors: dict[str, list[torch.Tensor]] = {"rule (margin 2)": [], "no margin": []}
    for i, path in enumerate(files):
        full = torch.from_numpy(np.array(decode_image(open_image(path), 3))).permute(2, 0, 1)
        with open_image(path) as header:
            boxes = crop_boxes(*header.size, cfg, sample_generator(0, 0, i))
        ratio = min_side_ratio(boxes, [size])
        no_margin = next((s for s in (8, 4, 2) if ratio >= s), 1)
        for name, reduction in (("rule (margin 2)", None), ("no margin", no_margin)):
            with open_image(path) as image:
                crops = cut_crops(image, 3, boxes, [size], reduction)[0]
            reference = torch.stack([TF.resized_crop(full, *box, [size, size], antialias=True)
                                     for box in boxes[0].tolist()])
            errors[name].append((crops.int() - reference.int()).abs().float().flatten())
    print(f"{size} px crops vs torchvision on the full decode ({len(files)} files): " + ", ".join(
        f"{name} mean {torch.cat(e).mean():.3f} max {torch.cat(e).max():.0f} levels" for name, e in errors.items()))
