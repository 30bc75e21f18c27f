"""Backbone registry: name -> module mapping images to pooled features (``build_backbone``), and for
timm-based ones the timm recipe (``timm_spec``) that exported backbones are loaded back with.

Every backbone maps (N, C, H, W) images to pooled (N, feature_dim) features. ResNets get the
small-image stem (3x3 stride-1 conv, no max-pool) for inputs <= 64 px; ViTs follow the image
size with patch size 4 (<= 64 px) or 16. Any other timm model: ``timm:<name>``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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


def uses_small_stem(image_size: int, small_stem: bool | None) -> bool:
    """ResNets get the 3x3 stride-1 stem without max-pool for small images unless told otherwise."""
    return small_stem if small_stem is not None else image_size <= SMALL_IMAGE_MAX


@dataclass(frozen=True)
class TimmSpec:
    """How a backbone is made with timm: ``timm.create_model(architecture, num_classes=0, **kwargs)``,
    then the small-image stem if ``small_stem`` (the result is then not a stock timm architecture)."""

    architecture: str
    kwargs: dict
    small_stem: bool = False


def _resnet_spec(timm_name: str) -> Callable[..., TimmSpec]:
    def spec(*, in_chans: int, image_size: int, small_stem: bool | None = None, **kwargs) -> TimmSpec:
        return TimmSpec(timm_name, {"in_chans": in_chans, **kwargs}, uses_small_stem(image_size, small_stem))

    return spec


def _vit_spec(timm_name: str) -> Callable[..., TimmSpec]:
    def spec(*, in_chans: int, image_size: int, patch_size: int | None = None,
             global_pool: str = "token", **kwargs) -> TimmSpec:
        patch = patch_size or (4 if image_size <= SMALL_IMAGE_MAX else 16)
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not divisible by ViT patch_size {patch}; "
                             f"set backbone_kwargs.patch_size to a divisor of {image_size}")
        return TimmSpec(timm_name, {"in_chans": in_chans, "img_size": image_size, "patch_size": patch,
                                    "global_pool": global_pool, **kwargs})

    return spec


def _timm_any_spec(name: str) -> Callable[..., TimmSpec]:
    def spec(*, in_chans: int, image_size: int, **kwargs) -> TimmSpec:
        return TimmSpec(name, {"in_chans": in_chans, **kwargs})

    return spec


def _from_timm(spec: TimmSpec) -> nn.Module:
    model = timm.create_model(spec.architecture, pretrained=False, num_classes=0, **spec.kwargs)
    if spec.small_stem:
        model.conv1 = nn.Conv2d(model.conv1.in_channels, model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    return model


TIMM_SPECS: dict[str, Callable[..., TimmSpec]] = {
    "resnet18": _resnet_spec("resnet18"),
    "resnet34": _resnet_spec("resnet34"),
    "resnet50": _resnet_spec("resnet50"),
    "vit_tiny": _vit_spec("vit_tiny_patch16_224"),
    "vit_small": _vit_spec("vit_small_patch16_224"),
    "vit_base": _vit_spec("vit_base_patch16_224"),
}
BACKBONES: tuple[str, ...] = ("convnet", *TIMM_SPECS)


def timm_spec(name: str, *, in_chans: int, image_size: int, **kwargs) -> TimmSpec | None:
    """The timm recipe of a registered backbone (or ``timm:<name>``); None for ``convnet``, which is ours."""
    if name.startswith("timm:"):
        timm_name = name.removeprefix("timm:")
        if not timm.is_model(timm_name):
            raise ValueError(f"unknown timm model {timm_name!r}; see timm.list_models()")
        return _timm_any_spec(timm_name)(in_chans=in_chans, image_size=image_size, **kwargs)
    if name == "convnet":
        return None
    if name not in TIMM_SPECS:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)} or 'timm:<model name>'")
    return TIMM_SPECS[name](in_chans=in_chans, image_size=image_size, **kwargs)


def build_backbone(name: str, *, in_chans: int, image_size: int, **kwargs) -> tuple[nn.Module, int]:
    """Instantiate a registered backbone (or ``timm:<name>``); returns (module, feature_dim)."""
    spec = timm_spec(name, in_chans=in_chans, image_size=image_size, **kwargs)
    module = _convnet(in_chans=in_chans, image_size=image_size, **kwargs) if spec is None else _from_timm(spec)
    return module, int(module.num_features)
