"""``ssl-lightning embed --ckpt CKPT [--split train|val|both] [--projector] --out FILE``: a checkpoint's
embeddings of a dataset, with the path and label of each image.

``FILE.npz`` holds plain arrays that numpy and pandas read without this package: ``features`` (N, D)
float32 backbone features, ``labels`` (N,) int64 (-1 unlabelled), ``paths`` (N,) str (an image file's
path, or ``<dataset>/<split>/<index>`` for in-memory datasets, ssl_lightning.data.datasets.sample_paths),
``splits`` (N,) str, and with ``--projector`` ``projections`` (N, P) float32. ``FILE.pt`` holds the
same as a dict of tensors and lists (``torch.load(FILE, weights_only=True)``).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ssl_lightning.data.datamodule import TransformedDataset
from ssl_lightning.data.datasets import sample_paths
from ssl_lightning.data.views import build_eval_transform
from ssl_lightning.eval.features import build_datamodule, load_method
from ssl_lightning.eval.transfer import (add_data_arguments, backbone_channels, data_options, evaluation_data,
                                         input_adapter)
from ssl_lightning.methods import SSLMethod

SUFFIXES = (".npz", ".pt")


@torch.no_grad()
def embed_dataset(method: SSLMethod, data: dict, split: str, *, projector: bool = False, num_workers: int = 0,
                  batch_size: int = 256) -> dict:
    """Embeddings of every image of ``split`` of the data described by ``data`` (data-module
    hyperparameters: the checkpoint's, from load_method, or another dataset's), in dataset order.

    Returns ``features`` (N, D) float32, ``labels`` (N,) int64 (-1 where unlabelled), ``paths`` [N] str and,
    with ``projector``, ``projections`` (N, P) float32. Images get the eval transform (resize to the
    backbone's size, normalise) and 1 <-> 3 channel adaptation (ssl_lightning.eval.transfer).
    """
    datamodule = build_datamodule(data, num_workers=num_workers)
    info = datamodule.info
    base = datamodule._load(split, labelled=datamodule.hparams.labelled)
    paths = sample_paths(base, datamodule.hparams.dataset, split)
    dataset = TransformedDataset(base, build_eval_transform(datamodule.image_size, info.mean, info.std))
    adapt = input_adapter(backbone_channels(method), info)
    head = method.evaluated_modules()[1] if projector else None
    if projector and head is None:
        raise ValueError(f"{type(method).__name__} has no projector; drop --projector")
    features, projections, labels = [], [], []
    for images, y in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers):
        feats = method(adapt(images)).float()
        features.append(feats)
        labels.append(torch.as_tensor(y, dtype=torch.int64))
        if head is not None:
            projections.append(head(feats).float())
    out = {"features": torch.cat(features), "labels": torch.cat(labels), "paths": paths}
    if head is not None:
        out["projections"] = torch.cat(projections)
    return out


def embed_splits(method: SSLMethod, data: dict, splits: list[str], **kwargs) -> dict:
    """embed_dataset over several splits, concatenated, with ``splits`` [N] naming each row's split."""
    parts = [(s, embed_dataset(method, data, s, **kwargs)) for s in splits]
    out = {key: torch.cat([p[key] for _, p in parts]) for key in parts[0][1] if key != "paths"}
    out["paths"] = [path for _, p in parts for path in p["paths"]]
    out["splits"] = [s for s, p in parts for _ in p["paths"]]
    return out


def save_embeddings(embeddings: dict, out: str | Path) -> Path:
    """Writes ``out`` as .npz (plain numpy arrays, strings as unicode) or .pt, chosen by the suffix."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npz":
        arrays = {k: (np.array(v, dtype=str) if isinstance(v, list) else v.numpy()) for k, v in embeddings.items()}
        np.savez(out, **arrays)
    else:
        torch.save(embeddings, out)
    return out


def main(argv: list[str]) -> None:
    from ssl_lightning.cli import ConfigError

    parser = argparse.ArgumentParser(prog="ssl-lightning embed", description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by `ssl-lightning fit`")
    parser.add_argument("--split", choices=("train", "val", "both"), default="val")
    parser.add_argument("--projector", action="store_true", help="also the projector's output (projections)")
    parser.add_argument("--out", required=True, help="FILE.npz (numpy) or FILE.pt (torch)")
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=256)
    add_data_arguments(parser)  # --data.dataset / --data.data_dir: embed another dataset (eval.transfer)
    args = parser.parse_args(argv)
    if Path(args.out).suffix not in SUFFIXES:
        raise ConfigError(f"--out {args.out} must end in .npz or .pt")
    method, data = load_method(args.ckpt)
    data = evaluation_data(method, data, **data_options(args))
    splits = ["train", "val"] if args.split == "both" else [args.split]
    try:
        embeddings = embed_splits(method, data, splits, projector=args.projector, num_workers=args.num_workers,
                                  batch_size=args.batch_size)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err).splitlines()[0]) from err
    path = save_embeddings(embeddings, args.out)
    print(f"embed: {len(embeddings['paths'])} images ({', '.join(splits)}) x {embeddings['features'].shape[1]} "
          f"features -> {path}", flush=True)
