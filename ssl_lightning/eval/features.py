"""Load any method's checkpoint and extract frozen backbone features on un-augmented images."""
from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ssl_lightning.data.datamodule import TransformedDataset
from ssl_lightning.data.datasets import dataset_info, load_dataset
from ssl_lightning.data.views import as_view_configs, build_eval_transform
from ssl_lightning.methods import SSLMethod


def load_checkpoint(path: str | Path) -> tuple[SSLMethod, dict]:
    """(method in eval mode on CPU, data-module hyperparameters) from a last.ckpt written by fit."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; train first (ssl-lightning fit ...)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    class_path = checkpoint["hyper_parameters"].get("_class_path", "")
    module_name, _, class_name = class_path.rpartition(".")
    if not module_name:
        raise ValueError(f"checkpoint {path} has no method class path in its hyperparameters; "
                         "it was not written by `ssl-lightning fit`")
    cls = getattr(importlib.import_module(module_name), class_name)
    method = cls.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    return method.eval(), checkpoint.get("datamodule_hyper_parameters", {})


@torch.no_grad()
def extract_features(method: SSLMethod, data: dict, split: str, *, batch_size: int = 512,
                     num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) float32, labels (N,)) of the labelled ``split`` with the eval transform."""
    info = dataset_info(data["dataset"], data.get("data_dir"))
    size = as_view_configs(data["views"])[0].size if data.get("views") else info.image_size
    base = load_dataset(data["dataset"], data.get("data_dir"), split, labelled=True,
                        synthetic_size=data.get("synthetic_size", 512), image_size=info.image_size)
    loader = DataLoader(TransformedDataset(base, build_eval_transform(size, info.mean, info.std)),
                        batch_size=batch_size, num_workers=num_workers)
    feats, labels = [], []
    for images, y in loader:
        feats.append(method(images).float())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)
