"""The one augmentation pipeline: per-view configs, asymmetric views and multi-crop.

A training sample becomes a list of views; each ViewConfig describes one kind of view and how
many of it to draw (``count``), so multi-crop is just ``[global x2, local x6]``.
Inputs are uint8 tensors (C, H, W); outputs are normalised float tensors.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torchvision.transforms import v2


@dataclass
class ViewConfig:
    """One kind of augmented view (defaults: SimCLR/VICReg recipe at 32 px).

    jitter = (brightness, contrast, saturation, hue) applied with probability jitter_p;
    saturation and hue are skipped for 1-channel images, where they mean nothing.
    """

    size: int = 32
    count: int = 1
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0

    def __post_init__(self) -> None:
        if self.size < 1 or self.count < 1:
            raise ValueError(f"view size {self.size} and count {self.count} must both be >= 1")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"view scale {self.scale} must satisfy 0 < min <= max <= 1")
        for name in ("hflip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            p = getattr(self, name)
            if not 0 <= p <= 1:
                raise ValueError(f"view {name}={p} is not a probability in [0, 1]")


# Data-module hyperparameters in checkpoints hold ViewConfigs; let torch.load(weights_only=True) read them.
torch.serialization.add_safe_globals([ViewConfig])


def as_view_configs(views: Sequence[ViewConfig | dict]) -> list[ViewConfig]:
    """Views as given in Python (ViewConfig) or restored from a checkpoint's hyperparameters (dict)."""
    return [v if isinstance(v, ViewConfig) else ViewConfig(**v) for v in views]


def blur_kernel_size(size: int) -> int:
    """10% of the image side, odd, at least 3 (SimCLR)."""
    k = max(3, int(0.1 * size))
    return k if k % 2 else k + 1


def build_view_transform(cfg: ViewConfig, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """uint8 (C, H, W) -> float (C, size, size), normalised with the dataset's mean/std."""
    channels = len(mean)
    brightness, contrast, saturation, hue = cfg.jitter
    if channels == 1:
        saturation, hue = 0.0, 0.0
    ops: list = [
        v2.RandomResizedCrop(cfg.size, scale=cfg.scale, ratio=cfg.ratio, antialias=True),
        v2.RandomHorizontalFlip(cfg.hflip_p),
    ]
    if cfg.jitter_p > 0 and any(cfg.jitter):
        jitter = v2.ColorJitter(brightness, contrast, saturation, hue)
        ops.append(v2.RandomApply([jitter], p=cfg.jitter_p))
    if channels == 3 and cfg.grayscale_p > 0:
        ops.append(v2.RandomGrayscale(cfg.grayscale_p))
    if cfg.blur_p > 0:
        blur = v2.GaussianBlur(blur_kernel_size(cfg.size), sigma=cfg.blur_sigma)
        ops.append(v2.RandomApply([blur], p=cfg.blur_p))
    if cfg.solarize_p > 0:
        ops.append(v2.RandomSolarize(threshold=128, p=cfg.solarize_p))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(ops)


def build_eval_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """Deterministic: resize the short side (ratio 256/224 when it has to shrink) and centre-crop."""
    ops: list = [v2.Resize(size if size <= 64 else int(size * 256 / 224), antialias=True), v2.CenterCrop(size)]
    return v2.Compose(ops + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


class MultiViewTransform:
    """Maps one image to the list of views described by ``configs`` (each repeated ``count`` times)."""

    def __init__(self, configs: Sequence[ViewConfig], mean: Sequence[float], std: Sequence[float]):
        if not configs:
            raise ValueError("at least one view config is needed; SSL methods usually take two")
        self.transforms = [build_view_transform(c, mean, std) for c in configs for _ in range(c.count)]

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        return [t(image) for t in self.transforms]

    def __len__(self) -> int:
        return len(self.transforms)
