"""How fast ``ssl-lightning audit`` checks an image folder, and what 1.28M images would cost.

    .venv/bin/python benchmarks/audit_speed.py [--images 2000] [--workers 2]

Writes ``--images`` JPEGs of 300-500 px a side (random width and height, quality 90) into a temp dir:
Fashion-MNIST items upscaled, tinted with a random colour and a gradient, with sensor-like noise, so
that the files decode like photos. Then runs the audit (no checkpoint) with ``--workers`` DataLoader
workers and prints the scan's images/s, the whole command's time, the CPU model (lscpu), and the
near-duplicate search timed on uniformly random 64-bit hashes for the 1.28M estimate (docs/audit.md).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ssl_lightning.audit.duplicates import near_pairs
from ssl_lightning.cli import main as cli_main
from ssl_lightning.data.datasets import load_dataset


def cpu_model() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def write_photos(out: Path, count: int, seed: int = 0) -> None:
    """``count`` colour JPEGs of 300-500 px into out/train/class_<label>/."""
    rng = np.random.default_rng(seed)
    dataset = load_dataset("fashion_mnist", None, "train")
    for index in range(count):
        image, label = dataset[index]
        width, height = rng.integers(300, 501, size=2)
        gray = np.asarray(Image.fromarray(image[0].numpy()).resize((int(width), int(height)), Image.BICUBIC),
                          dtype=np.float32) / 255
        tint = rng.uniform(0.3, 1.0, size=3)
        ramp = np.linspace(0, rng.uniform(0, 0.3), int(width), dtype=np.float32)[None, :, None]
        rgb = gray[:, :, None] * tint + ramp + rng.normal(0, 0.03, (int(height), int(width), 3))
        folder = out / "train" / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rgb.clip(0, 1) * 255).astype(np.uint8)).save(folder / f"{index:05d}.jpg", quality=90)


def time_near_search(sizes: list[int], max_hamming: int) -> list[tuple[int, float]]:
    """Seconds of near_pairs (coarse bands only) on n uniformly random 64-bit hashes, per n."""
    rng = np.random.default_rng(0)
    out = []
    for n in sizes:
        hashes = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, size=n, dtype=np.int64)
        start = time.perf_counter()
        near_pairs(hashes, max_hamming)
        out.append((n, time.perf_counter() - start))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--near-hamming", dest="near_hamming", type=int, default=6)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp) / "photos", Path(tmp) / "audit"
        start = time.perf_counter()
        write_photos(root, args.images)
        print(f"wrote {args.images} JPEGs (300-500 px) in {time.perf_counter() - start:.1f} s", flush=True)
        start = time.perf_counter()
        cli_main(["audit", "--data.data_dir", str(root), "--out", str(out), "--num_workers", str(args.workers),
                  "--near-hamming", str(args.near_hamming)])
        total = time.perf_counter() - start
        summary = json.loads((out / "audit.json").read_text())["summary"]
    print(f"audit scan: {summary['images_per_s']:.0f} images/s ({args.images} JPEGs, {args.workers} workers); "
          f"whole command {total:.1f} s = {args.images / total:.0f} images/s; CPU: {cpu_model()}")
    timings = time_near_search([100_000, 200_000, 400_000], args.near_hamming)
    print("near-duplicate search (random hashes, coarse bands): "
          + ", ".join(f"{n:,}: {s:.2f} s" for n, s in timings), flush=True)


if __name__ == "__main__":
    main()
