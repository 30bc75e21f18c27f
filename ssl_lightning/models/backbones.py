"""Backbone registry: name -> builder returning (module, feature_dim).

Every backbone maps (N, C, H, W) images to pooled (N, feature_dim) features. ResNets get the
small-image stem (3x3 stride-1 conv, no max-pool) for inputs <= 64 px; ViTs follow the image
size with patch size 4 (<= 64 px) or 16. Any other timm model: ``timm:<name>``.
"""
from __future__ import annotations

from collections.abc import Callable

import timm
import torch
from torch import nn

SMALL_IMAGE_MAX = 64


class ConvNet(nn.Module):
    """A small fast VGG-style convnet for CPU demos and tests: 3 stages of 2 conv-BN-ReLU."""

    def __init__(self, in_chans: int = 3, width: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_chans
        for stage, mult in enumerate((1, 2, 4)):
            for _ in range(2):
                layers += [nn.Conv2d(channels, width * mult, 3, padding=1, bias=False),
                           nn.BatchNorm2d(width * mult), nn.ReLU(inplace=True)]
                channels = width * mult
            if stage < 2:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.num_features = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))


def _convnet(*, in_chans: int, image_size: int, width: int = 32) -> nn.Module:
    return ConvNet(in_chans, width)


def _resnet(timm_name: str) -> Callable[..., nn.Module]:
    def build(*, in_chans: int, image_size: int, small_stem: bool | None = None, **kwargs) -> nn.Module:
        model = timm.create_model(timm_name, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)
        if small_stem if small_stem is not None else image_size <= SMALL_IMAGE_MAX:
            model.conv1 = nn.Conv2d(in_chans, model.conv1.out_channels, 3, 1, 1, bias=False)
            model.maxpool = nn.Identity()
        return model

    return build


def _vit(timm_name: str) -> Callable[..., nn.Module]:
    def build(*, in_chans: int, image_size: int, patch_size: int | None = None,
              global_pool: str = "token", **kwargs) -> nn.Module:
        patch = patch_size or (4 if image_size <= SMALL_IMAGE_MAX else 16)
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not divisible by ViT patch_size {patch}; "
                             f"set backbone_kwargs.patch_size to a divisor of {image_size}")
        return timm.create_model(timm_name, pretrained=False, num_classes=0, in_chans=in_chans,
                                 img_size=image_size, patch_size=patch, global_pool=global_pool, **kwargs)

    return build


def _timm_any(name: str) -> Callable[..., nn.Module]:
    def build(*, in_chans: int, image_size: int, **kwargs) -> nn.Module:
        return timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)

    return build


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "convnet": _convnet,
    "resnet18": _resnet("resnet18"),
    "resnet34": _resnet("resnet34"),
    "resnet50": _resnet("resnet50"),
    "vit_tiny": _vit("vit_tiny_patch16_224"),
    "vit_small": _vit("vit_small_patch16_224"),
    "vit_base": _vit("vit_base_patch16_224"),
}


def build_backbone(name: str, *, in_chans: int, image_size: int, **kwargs) -> tuple[nn.Module, int]:
    """Instantiate a registered backbone (or ``timm:<name>``); returns (module, feature_dim)."""
    if name.startswith("timm:"):
        timm_name = name.removeprefix("timm:")
        if not timm.is_model(timm_name):
            raise ValueError(f"unknown timm model {timm_name!r}; see timm.list_models()")
        builder = _timm_any(timm_name)
    elif name in BACKBONES:
        builder = BACKBONES[name]
    else:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)} or 'timm:<model name>'")
    module = builder(in_chans=in_chans, image_size=image_size, **kwargs)
    return module, int(module.num_features)
