"""Offline linear evaluation: a linear classifier on frozen, pre-extracted, standardised features.

The W-MSE/INTL protocol for small datasets: backbone in eval mode, features of un-augmented images,
standardised with the training mean/std, a Linear layer trained with Adam (lr 1e-2, cosine to
1e-8) and no weight decay; top-1/top-5 on the labelled validation split.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ssl_lightning.eval.features import extract_features, load_method
from ssl_lightning.eval.transfer import evaluation_data
from ssl_lightning.methods import SSLMethod


def train_linear(train_x: torch.Tensor, train_y: torch.Tensor, *, num_classes: int, epochs: int = 30,
                 lr: float = 1e-2, batch_size: int = 1024, seed: int = 0) -> torch.nn.Module:
    """Linear classifier on (N, D) features that are already standardised."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = torch.nn.Linear(train_x.shape[1], num_classes)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    steps = epochs * -(-len(train_x) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=lr * 1e-6)
    for _ in range(epochs):
        for idx in torch.randperm(len(train_x), generator=g).split(batch_size):
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return head


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).float().mean().item()


def linear_eval_method(method: SSLMethod, data: dict, *, epochs: int = 30, num_workers: int = 0,
                       train_samples: int | None = None) -> dict[str, float]:
    """{"linear/top1", "linear/top5", "linear/seconds"} for a method and its data-module hyperparameters."""
    start = time.time()
    train_x, train_y = extract_features(method, data, "train", num_workers=num_workers, max_samples=train_samples)
    val_x, val_y = extract_features(method, data, "val", num_workers=num_workers)
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    head = train_linear((train_x - mean) / std, train_y, num_classes=num_classes, epochs=epochs)
    with torch.no_grad():
        logits = head((val_x - mean) / std)
    return {"linear/top1": topk_accuracy(logits, val_y, 1), "linear/top5": topk_accuracy(logits, val_y, 5),
            "linear/seconds": time.time() - start}


def linear_eval(ckpt: str, data_options: dict | None = None, **kwargs) -> dict[str, float]:
    """linear_eval_method on a checkpoint written by ``ssl-lightning fit``; ``data_options``: another
    dataset (ssl_lightning.eval.transfer.evaluation_data's keyword arguments)."""
    method, data = load_method(ckpt)
    return linear_eval_method(method, evaluation_data(method, data, **(data_options or {})), **kwargs)
