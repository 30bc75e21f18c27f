"""Is the model or the data pipeline the limit? Images/s of one config's training step, three ways.

    python benchmarks/throughput.py --device cpu                       # the demo config, real Fashion-MNIST
    python benchmarks/throughput.py --device cuda --config experiments/cifar10/vicreg.yaml --synthetic 50000
    python benchmarks/throughput.py --imagefolder /tmp/ssl-jpegs           # JPEG folder pipelines, see below
    python benchmarks/throughput.py --device cuda --config experiments/imagenet100/byol.yaml \
        --cli_args "--data.data_dir /tmp/ssl-jpegs --model.init_args.backbone resnet50"   # (a)-(c) on JPEGs

(a) model only: the step on views made once and already on the device (the upper bound);
(b) end to end, batched: uint8 batches from the in-memory dataset -> device -> BatchedViews on the device
    -> step (``data.augment: device``);
(c) end to end, per sample: torchvision v2 per image in ``--workers`` DataLoader workers -> device -> step
    (``data.augment: workers``).
Each runs ``ssl-lightning fit`` machinery (the config's precision, channels_last, compile, probe) with
validation, monitors, logging and checkpoints off, timed over steps ``--skip``..``--steps``. Prints
images/s and the ratios b/a and b/c; then the pipelines alone: batched views/s on the device vs
per-sample views/s with ``--workers`` workers. Run it on an otherwise idle machine.

``--imagefolder DIR`` instead compares the image-folder pipelines (benchmarks/folder_pipeline.py): it
writes ``--images`` synthetic JPEGs into DIR (once) and reports per-sample vs decode-time crops +
BatchedViews (and GPU decoding on CUDA) images/s for the BYOL and DINO multi-crop recipes.
"""
from __future__ import annotations

import argparse
import shlex
import tempfile
import time
import warnings
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader

from ssl_lightning.cli import SSLCLI
from ssl_lightning.data.crops import crops_on_device
from ssl_lightning.data.datamodule import FILE_DATASETS, TransformedDataset
from ssl_lightning.data.views import MultiViewTransform
from folder_pipeline import report as report_folder, write_image_folder
from timing import StepTimer, clock

warnings.filterwarnings("ignore", message="LightningCLI's args parameter")  # our own flags are in sys.argv
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "fashion_mnist" / "vicreg.yaml"


def build(args, root: str, augment: str, max_steps: int) -> SSLCLI:
    overrides = ["--trainer.max_steps", str(max_steps), "--trainer.logger", "false", "--trainer.devices", "1",
                 "--trainer.strategy", "auto", "--trainer.accelerator", "gpu" if args.device == "cuda" else "cpu",
                 "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
                 "--trainer.enable_model_summary", "false", "--spectrum.every_n_epochs", "0",
                 "--knn.every_n_epochs", "0", "--checkpoint.every_n_train_steps", "0",
                 "--trainer.default_root_dir", root, "--data.augment", augment,
                 "--data.num_workers", str(args.workers if augment == "workers" else 0)]
    if args.synthetic:
        overrides += ["--data.dataset", "synthetic", "--data.synthetic_size", str(args.synthetic)]
    if args.batch_size:
        overrides += ["--data.batch_size", str(args.batch_size)]
    cli = SSLCLI(args=["--config", str(args.config), *overrides, *shlex.split(args.cli_args)], run=False)
    if cli.datamodule.hparams.dataset in FILE_DATASETS:  # augment: device decodes and crops in the workers too
        cli.datamodule.hparams.num_workers = args.workers
    return cli


class RepeatedBatch:
    """The same on-device batch ``length`` times: a train loader without any data pipeline."""

    def __init__(self, batch, length: int):
        self.batch, self.length = batch, length

    def __iter__(self):
        return iter([self.batch] * self.length)

    def __len__(self) -> int:
        return self.length


def images_per_second(args, mode: str) -> float:
    """Training images per second of mode "model", "batched" or "per_sample"."""
    with tempfile.TemporaryDirectory() as root:
        cli = build(args, root, "workers" if mode == "per_sample" else "device", args.steps)
        timer = StepTimer(args.skip)
        cli.trainer.callbacks.append(timer)
        batch_size = cli.datamodule.hparams.batch_size
        if mode == "model":
            data = cli.datamodule
            data.setup("fit")
            images, labels, *_ = next(iter(data.train_dataloader()))
            device = torch.device(args.device)
            if isinstance(images, dict):  # image files with data.decode: device
                images = crops_on_device(images, data.views, data.channels, device)
            views = data.device_views(images.to(device) if isinstance(images, torch.Tensor)
                                      else [crops.to(device) for crops in images])
            loader = RepeatedBatch((views, labels.to(device)), args.steps + 1)
            cli.trainer.fit(cli.model, train_dataloaders=loader)
        else:
            cli.trainer.fit(cli.model, cli.datamodule)
    return timer.steps_per_second() * batch_size


def pipeline_views_per_second(args) -> tuple[float, float]:
    """(batched views/s on the device, per-sample views/s with --workers workers) for the config's views."""
    with tempfile.TemporaryDirectory() as root:
        data = build(args, root, "device", 1).datamodule
    data.setup("fit")
    batch_size, device = data.hparams.batch_size, torch.device(args.device)
    loader = DataLoader(data.train_set, batch_size=batch_size, shuffle=True, drop_last=True)
    batches = [images.to(device) for (images, _), _ in zip(loader, range(args.pipeline_batches + 1))]
    generator = torch.Generator(device).manual_seed(0)
    data.device_views(batches[0], generator)
    start = clock()
    for images in batches[1:]:
        data.device_views(images, generator)
    views = len(data.views) * batch_size * (len(batches) - 1)
    batched = views / (clock() - start)

    info = data.info
    per_sample_set = TransformedDataset(data.train_set, MultiViewTransform(data.views, info.mean, info.std))
    loader = DataLoader(per_sample_set, batch_size=batch_size, shuffle=True, num_workers=args.workers,
                        drop_last=True, persistent_workers=args.workers > 0)
    iterator = iter(loader)
    # untimed: worker start-up and the batches the workers prefetch meanwhile (prefetch_factor 2 each)
    for _ in range(2 * args.workers + 1):
        next(iterator)
    start = time.perf_counter()
    for _ in range(args.pipeline_batches):
        next(iterator)
    per_sample = len(data.views) * batch_size * args.pipeline_batches / (time.perf_counter() - start)
    return batched, per_sample


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--config", type=Path, default=DEMO_CONFIG)
    p.add_argument("--synthetic", type=int, default=0, help="train on N in-memory synthetic images instead")
    p.add_argument("--batch_size", type=int, default=0, help="override data.batch_size")
    p.add_argument("--cli_args", default="", help='more ssl-lightning arguments, e.g. "--data.data_dir DIR '
                   '--model.init_args.backbone resnet50"')
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the per-sample pipeline")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip", type=int, default=10, help="steps not timed (start-up, compile, warm-up)")
    p.add_argument("--pipeline_batches", type=int, default=10)
    p.add_argument("--pipelines_only", action="store_true", help="skip (a)-(c): only the augmentation rates")
    p.add_argument("--imagefolder", type=Path, help="compare the JPEG-folder pipelines on a folder written here")
    p.add_argument("--images", type=int, default=2000, help="JPEGs written for --imagefolder")
    args = p.parse_args()
    if args.imagefolder:
        root = write_image_folder(args.imagefolder, args.images)
        report_folder(root, workers=args.workers, batch_size=args.batch_size or 64, batches=args.pipeline_batches,
                      device=torch.device(args.device))
        return
    if args.skip >= args.steps:
        p.error(f"--skip {args.skip} must be below --steps {args.steps}")
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.config} on {name}, {time.strftime('%Y-%m-%d')}")
    if not args.pipelines_only:
        report_training(args)
    if yaml.safe_load(args.config.read_text())["data"].get("dataset") in FILE_DATASETS:
        print("pipelines alone: see --imagefolder for image files")
        return
    batched, per_sample = pipeline_views_per_second(args)
    print(f"pipelines alone: batched {batched:,.0f} views/s, per-sample ({args.workers} workers) "
          f"{per_sample:,.0f} views/s, ratio {batched / per_sample:.1f}")


def report_training(args) -> None:
    """Prints each rate as soon as it is measured (a run cut short by a time limit keeps what it had)."""
    labels = {"model": "(a) model only, views on the device     ",
              "batched": "(b) end to end, batched views on device ",
              "per_sample": f"(c) end to end, per-sample, {args.workers} workers   "}
    rates = {}
    for mode, label in labels.items():
        rates[mode] = images_per_second(args, mode)
        print(f"{label} {rates[mode]:10,.0f} images/s", flush=True)
        if mode == "batched":
            print(f"b/a = {rates['batched'] / rates['model']:.2f}", flush=True)
    print(f"b/c = {rates['batched'] / rates['per_sample']:.2f}")


if __name__ == "__main__":
    main()
