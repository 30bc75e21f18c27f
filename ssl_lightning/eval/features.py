"""Load any method's checkpoint and extract frozen backbone features on un-augmented images."""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import torch

from ssl_lightning.checkpointing import CheckpointError, load_checkpoint
from ssl_lightning.data.datamodule import SSLDataModule
from ssl_lightning.eval.transfer import backbone_channels, input_adapter
from ssl_lightning.methods import SSLMethod


def load_method(path: str | Path) -> tuple[SSLMethod, dict]:
    """(method in eval mode on CPU, data-module hyperparameters) from a checkpoint written by fit,
    verified and loaded with weights_only=True (checkpointing.load_checkpoint; CheckpointError if unusable)."""
    checkpoint = load_checkpoint(path)
    class_path = checkpoint.get("method_class") or checkpoint.get("hyper_parameters", {}).get("_class_path", "")
    module_name, _, class_name = class_path.rpartition(".")
    if not module_name:
        raise CheckpointError(f"checkpoint {path} has no method class path in its hyperparameters; "
                              "it was not written by `ssl-lightning fit`")
    cls = getattr(importlib.import_module(module_name), class_name)
    method = cls.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    method.configure_model()  # the memory format (channels_last) the method was trained with
    return method.eval(), checkpoint.get("datamodule_hyper_parameters", {})


def build_datamodule(data: dict, *, num_workers: int = 0) -> SSLDataModule:
    """The data module a checkpoint was trained with, from its stored hyperparameters."""
    known = inspect.signature(SSLDataModule).parameters  # hparams also hold LightningCLI bookkeeping keys
    return SSLDataModule(**{**{k: v for k, v in data.items() if k in known}, "num_workers": num_workers})


@torch.no_grad()
def extract_features(method: SSLMethod, data: dict, split: str, *, batch_size: int = 512, num_workers: int = 0,
                     max_samples: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) float32, labels (N,)) of the labelled ``split`` with the eval transform
    (SSLDataModule.eval_loader); a fixed seeded subset of ``max_samples`` when given. Data with other
    channels than the backbone's (another dataset, ssl_lightning.eval.transfer) is adapted to them."""
    datamodule = build_datamodule(data, num_workers=num_workers)
    adapt = input_adapter(backbone_channels(method), datamodule.info)
    loader = datamodule.eval_loader(split, max_samples, batch_size=batch_size, seed=seed)
    feats, labels = [], []
    for images, y in loader:
        feats.append(method(adapt(images)).float())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)
