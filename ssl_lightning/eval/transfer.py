"""Evaluate a checkpoint on a dataset other than its own: the ``--data.*`` options of every command
that evaluates a checkpoint (linear, knn, finetune, label-efficiency, robustness, embed).

What is adapted so that the backbone can take the new images:

- size: the eval transform (and fine-tuning's random-resized crop) produces the backbone's training
  size (``--data.image_size`` overrides it, for backbones that take any size: convnet, ResNets);
- channels: 1 -> 3 repeats the gray channel; 3 -> 1 takes the luminance (ITU-R BT.601 weights); other
  channel counts cannot be adapted (one-line error);
- normalisation: the new dataset's mean and std (after the channel mapping);
- classes: the new dataset's labels (the probe, kNN and fine-tuning head are trained on them).
"""
from __future__ import annotations

import argparse
import inspect

import torch
from torch import nn

from ssl_lightning.cli import ConfigError
from ssl_lightning.console import first_line
from ssl_lightning.data.datamodule import SSLDataModule
from ssl_lightning.data.datasets import DATASET_NAMES, DatasetInfo, dataset_info
from ssl_lightning.methods import SSLMethod

LUMINANCE = (0.299, 0.587, 0.114)  # ITU-R BT.601, as PIL's convert("L")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data.dataset``, ``--data.data_dir``, ``--data.image_size`` (all default: the checkpoint's)."""
    group = parser.add_argument_group("evaluate on other data (default: the checkpoint's dataset)")
    group.add_argument("--data.dataset", dest="data_dataset", choices=DATASET_NAMES, default=None,
                       help="dataset to evaluate on; channels and size are adapted to the backbone")
    group.add_argument("--data.data_dir", dest="data_data_dir", default=None,
                       help="its folder (imagefolder: train/<class>/*.png and val/<class>/)")
    group.add_argument("--data.image_size", dest="data_image_size", type=int, default=None,
                       help="side the images are resized to (default: the backbone's training size)")


def data_options(args: argparse.Namespace) -> dict:
    """The parsed ``--data.*`` options as keyword arguments of evaluation_data."""
    return {"dataset": args.data_dataset, "data_dir": args.data_data_dir, "image_size": args.data_image_size}


class ChannelMap(nn.Module):
    """Normalised images (N, C_in, H, W) -> (N, C_out, H, W): out[o] = sum_c weight[o, c] * in[c]."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.einsum("oc,nchw->nohw", self.weight.to(images.dtype), images)


def input_adapter(in_chans: int, info: DatasetInfo) -> nn.Module:
    """What maps images of ``info``'s dataset, normalised with its statistics, to ``in_chans`` channels.

    1 -> 3: the gray channel repeated (each copy normalised as the gray one). 3 -> 1: the luminance
    L = sum_c w_c x_c normalised with mean sum_c w_c mean_c and std sum_c w_c std_c (exact for gray
    images stored as RGB), which is the weighted average sum_c (w_c std_c / sum_k w_k std_k) z_c of
    the normalised channels z_c. Identity when the counts agree; ConfigError otherwise.
    """
    if info.channels == in_chans:
        return nn.Identity()
    if (info.channels, in_chans) == (1, 3):
        return ChannelMap(torch.ones(3, 1))
    if (info.channels, in_chans) == (3, 1):
        weight = torch.tensor(LUMINANCE) * torch.tensor(info.std)
        return ChannelMap((weight / weight.sum())[None])
    raise ConfigError(f"the checkpoint's backbone takes {in_chans}-channel images and the data has "
                      f"{info.channels}; only 1 <-> 3 channels can be adapted: evaluate on a dataset with "
                      f"{in_chans} channels")


def backbone_channels(method: SSLMethod) -> int:
    return int(method.hparams.get("in_chans", 3))


def _datamodule(data: dict) -> SSLDataModule:
    """The data module of ``data``, a missing folder or bad value reported as one line (ConfigError)."""
    known = inspect.signature(SSLDataModule).parameters
    try:
        return SSLDataModule(**{**{k: v for k, v in data.items() if k in known}, "num_workers": 0})
    except (FileNotFoundError, ValueError, ModuleNotFoundError) as err:
        raise ConfigError(first_line(err)) from err


def evaluation_data(method: SSLMethod, data: dict, *, dataset: str | None = None, data_dir: str | None = None,
                    image_size: int | None = None) -> dict:
    """The data-module hyperparameters to evaluate ``method`` on: ``dataset`` (default: the checkpoint's)
    read from ``data_dir`` (default: the checkpoint's for its own dataset) at ``image_size`` (default: the
    backbone's training size), labelled; the checkpoint's ``data`` unchanged when that is what it
    describes. Otherwise prints one line saying what is adapted. ConfigError (one line) for a missing or
    empty folder, data without 2 classes, or channels that cannot be adapted."""
    if dataset is None and data_dir is None and image_size is None:
        return data
    own = data.get("dataset", "fashion_mnist")
    dataset = dataset or own
    if data_dir is None and dataset == own:
        data_dir = data.get("data_dir")
    if image_size is not None and image_size < 1:
        raise ConfigError(f"--data.image_size {image_size} must be >= 1 (pixels), e.g. 32")
    size = image_size or int(method.hparams.get("image_size", 32))
    if (dataset, data_dir) == (own, data.get("data_dir")) and size == _datamodule(data).image_size:
        return data
    new = {"dataset": dataset, "data_dir": data_dir, "labelled": True, "views": [{"size": size}],
           "synthetic_size": data.get("synthetic_size", 512)}
    info = _datamodule(new).info
    if info.num_classes < 2:
        raise ConfigError(f"{dataset} at {data_dir} has {info.num_classes} classes; evaluation needs labels of at "
                          "least 2 classes (imagefolder: train/<class>/ and val/<class>/ folders)")
    input_adapter(backbone_channels(method), info)  # raises when the channels cannot be adapted
    print(transfer_note(own, new, info, backbone_channels(method)), flush=True)
    return new


def transfer_note(own: str, new: dict, info: DatasetInfo, in_chans: int) -> str:
    """One line: which data, at which size, how the channels and the normalisation are adapted."""
    name, size = new["dataset"], new["views"][0]["size"]
    native = "" if name in ("imagefolder", "synthetic") else f" from {dataset_info(name, None).image_size} px"
    channels = {(1, 3): "1 -> 3 channels (gray repeated)", (3, 1): "3 -> 1 channel (luminance)"}.get(
        (info.channels, in_chans), f"{in_chans} channel{'s' * (in_chans > 1)} as trained")
    return (f"note: evaluating on {name} ({info.num_classes} classes) instead of the checkpoint's {own}: "
            f"resized{native} to {size} px, {channels}, normalised with the mean/std of {name}")
