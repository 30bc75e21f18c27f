"""Fine-tuning evaluation with few labels: backbone + linear head trained end-to-end on a
class-balanced, seeded fraction of the labelled train split; top-1/top-5 on the validation split.

The backbone is the one offline evaluation looks at (``method.evaluated_modules()[0]``: the EMA
teacher for DINO-style methods), in train mode (BatchNorm uses batch statistics) while training.
Recipe: light supervised augmentation (random-resized crop, scale (0.2, 1), and horizontal flip;
no colour); head = BatchNorm1d without affine (standardises features whatever their scale, as in
MAE's linear probe) + Linear; AdamW (weight decay 1e-4) with lr ``lr`` (3e-3) for the head and
``lr * backbone_lr_scale`` (0.1) for the backbone, so a random head does not wreck the pre-trained
features in the first steps; cosine decay to 0 over all steps; cross-entropy. ``random_init``
fine-tunes the same architecture from its initialisation instead: the baseline that tells what
pre-training bought.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from ssl_lightning.data.datamodule import SSLDataModule, TransformedDataset
from ssl_lightning.data.views import ViewConfig, build_view_transform
from ssl_lightning.eval.features import build_datamodule, load_method
from ssl_lightning.eval.linear import topk_accuracy
from ssl_lightning.eval.transfer import backbone_channels, evaluation_data, input_adapter
from ssl_lightning.methods import SSLMethod

TRAIN_CROP_SCALE = (0.2, 1.0)


def class_orders(labels: torch.Tensor, *, seed: int) -> list[torch.Tensor]:
    """For each class c present in ``labels`` (N,), ascending, its sample indices in one seeded random
    order. Labels < 0 (unlabelled samples, STL-10's unlabeled split) belong to no class."""
    generator = torch.Generator().manual_seed(seed)
    orders = []
    for c in torch.unique(labels[labels >= 0]).tolist():
        members = torch.nonzero(labels == c).flatten()
        orders.append(members[torch.randperm(len(members), generator=generator)])
    if not orders:
        raise ValueError("the train split has no labelled samples (every label is -1); fine-tuning needs labels")
    return orders


def nested_subsets(labels: torch.Tensor, fractions: list[float], *, seed: int) -> dict[float, torch.Tensor]:
    """{fraction: sorted indices}: seeded, class-balanced subsets that nest (a smaller fraction's subset
    lies inside a larger one's): per class the first max(1, round(fraction * count(c))) samples of the
    class's one seeded order (class_orders). Each fraction is in (0, 1]."""
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        raise ValueError(f"fraction {bad[0]} is not in (0, 1]; 0.01 keeps 1% of each class")
    orders = class_orders(labels, seed=seed)
    return {f: torch.cat([order[:max(1, round(f * len(order)))] for order in orders]).sort().values
            for f in fractions}


def balanced_subset(labels: torch.Tensor, fraction: float, *, seed: int) -> torch.Tensor:
    """Indices (sorted) of a seeded, class-balanced subset: for each class c present in ``labels``
    (N,), round(fraction * count(c)) samples drawn without replacement, at least 1; labels < 0 are
    never drawn. The same seed gives nested subsets across fractions (nested_subsets)."""
    return nested_subsets(labels, [fraction], seed=seed)[fraction]


class Classifier(nn.Module):
    """backbone (N, C, H, W) -> (N, D) features -> standardise (BatchNorm1d, no affine) -> Linear
    -> (N, num_classes) logits. Without the standardisation the head learns at the speed the
    feature scale allows (measured: 68% vs 76% top-1 after 90 steps on 1% of Fashion-MNIST)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, *, channels_last: bool,
                 adapt: nn.Module | None = None):
        super().__init__()
        self.adapt = adapt or nn.Identity()  # other data's channels -> the backbone's (eval.transfer)
        self.backbone = backbone
        self.head = nn.Sequential(nn.BatchNorm1d(feature_dim, affine=False), nn.Linear(feature_dim, num_classes))
        self.channels_last = channels_last

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = self.adapt(images)
        if self.channels_last:  # the memory format the backbone was trained in (faster CPU convolutions)
            images = images.contiguous(memory_format=torch.channels_last)
        return self.head(self.backbone(images))


def untrained_copy(method: SSLMethod) -> SSLMethod:
    """The same method class and hyperparameters, freshly initialised (the random-init baseline)."""
    hparams = {k: v for k, v in method.hparams.items() if not k.startswith("_")}  # LightningCLI bookkeeping
    fresh = type(method)(**hparams)
    fresh.configure_model()
    return fresh


def labelled_train_subset(datamodule: SSLDataModule, fraction: float, *, seed: int) -> Subset:
    """(augmented image, label) pairs of the balanced subset of the train split."""
    base = datamodule._load("train", labelled=True)
    indices = balanced_subset(torch.as_tensor(base.labels), fraction, seed=seed)
    info = datamodule.info
    view = ViewConfig(size=datamodule.image_size, scale=TRAIN_CROP_SCALE, jitter_p=0.0, grayscale_p=0.0)
    return Subset(TransformedDataset(base, build_view_transform(view, info.mean, info.std)), indices.tolist())


def train_classifier(model: Classifier, loader: DataLoader, *, epochs: int, lr: float, backbone_lr_scale: float,
                     weight_decay: float, device: torch.device) -> float:
    """AdamW with per-step cosine decay; the backbone's lr is ``lr * backbone_lr_scale``. Returns the
    mean loss of the last epoch."""
    groups = [{"params": model.backbone.parameters(), "lr": lr * backbone_lr_scale},
              {"params": model.head.parameters(), "lr": lr}]
    optimizer = torch.optim.AdamW(groups, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(loader))
    model.train()
    for _ in range(epochs):
        losses = []
        for images, labels in loader:
            loss = F.cross_entropy(model(images.to(device)), labels.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
    return sum(losses) / len(losses)


@torch.no_grad()
def predict(model: Classifier, loader: DataLoader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, num_classes) float32, labels (N,)) with the model in eval mode."""
    model.eval()
    logits, labels = [], []
    for images, y in loader:
        logits.append(model(images.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def finetune_method(method: SSLMethod, data: dict, *, label_fraction: float, epochs: int = 30, lr: float = 3e-3,
                    backbone_lr_scale: float = 0.1, weight_decay: float = 1e-4, batch_size: int = 64,
                    seed: int = 0, num_workers: int = 0, device: str | None = None) -> dict[str, float]:
    """Fine-tunes ``method``'s evaluated backbone (in place) with a linear head on ``label_fraction``
    (in (0, 1]) of each class of the train split. Returns finetune/top1, finetune/top5 (more than 5
    classes), finetune/labelled_samples, finetune/train_loss and finetune/seconds."""
    start = time.time()
    if not 0 < label_fraction <= 1:
        raise ValueError(f"label_fraction {label_fraction} is not in (0, 1]; it is a fraction of each class "
                         "(0.01 = 1%); on the command line --labels takes percent (1, 10, 100)")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs {epochs} and batch_size {batch_size} must both be >= 1")
    datamodule = build_datamodule(data, num_workers=num_workers)
    num_classes = datamodule.num_classes
    if num_classes == 0:
        raise ValueError(f"the checkpoint's data ({data.get('dataset')!r}, labelled={data.get('labelled')}) has "
                         "num_classes 0: fine-tuning needs labels; pre-train on a labelled dataset "
                         "(data.labelled: true; imagefolder needs train/<class>/ folders)")
    torch.manual_seed(seed)  # head init, augmentations and shuffling
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backbone = method.evaluated_modules()[0].requires_grad_(True)  # an EMA teacher is frozen until now
    adapt = input_adapter(backbone_channels(method), datamodule.info)
    model = Classifier(backbone, method.feature_dim, num_classes, channels_last=method.hparams.channels_last,
                       adapt=adapt).to(dev)
    train_set = labelled_train_subset(datamodule, label_fraction, seed=seed)
    # drop_last: a last batch of one sample would break train-mode BatchNorm
    loader = DataLoader(train_set, batch_size=min(batch_size, len(train_set)), shuffle=True, drop_last=True,
                        num_workers=num_workers, generator=torch.Generator().manual_seed(seed))
    train_loss = train_classifier(model, loader, epochs=epochs, lr=lr, backbone_lr_scale=backbone_lr_scale,
                                  weight_decay=weight_decay, device=dev)
    logits, labels = predict(model, datamodule.eval_loader("val", None, batch_size=512), dev)
    results = {"finetune/top1": topk_accuracy(logits, labels, 1)}
    if num_classes > 5:
        results["finetune/top5"] = topk_accuracy(logits, labels, 5)
    return {**results, "finetune/labelled_samples": float(len(train_set)), "finetune/train_loss": train_loss,
            "finetune/seconds": time.time() - start}


def finetune_eval(ckpt: str | Path, *, label_fraction: float, epochs: int = 30, seed: int = 0,
                  random_init: bool = False, data_options: dict | None = None, **kwargs) -> dict[str, float]:
    """finetune_method on a checkpoint written by ``ssl-lightning fit`` (the file is only read);
    ``random_init``: the same architecture, freshly initialised with ``seed``, as a baseline;
    ``data_options``: another dataset (ssl_lightning.eval.transfer.evaluation_data)."""
    method, data = load_method(ckpt)
    data = evaluation_data(method, data, **(data_options or {}))
    if random_init:
        torch.manual_seed(seed)
        method = untrained_copy(method)
    return finetune_method(method, data, label_fraction=label_fraction, epochs=epochs, seed=seed, **kwargs)
