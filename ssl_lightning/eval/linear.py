"""Offline linear evaluation: a linear classifier on frozen, pre-extracted, standardised features.

The W-MSE/INTL protocol for small datasets: features of un-augmented images, standardised with the
training mean/std, a Linear layer trained with Adam (lr 1e-2, cosine to 1e-6 x) and no weight decay.
Usage: python -m ssl_lightning.eval.linear --ckpt runs/<run>/checkpoints/last.ckpt [--epochs 30]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from ssl_lightning.eval.features import extract_features, load_checkpoint


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


def linear_eval(ckpt: str, *, epochs: int = 30, num_workers: int = 0) -> dict[str, float]:
    """{"top1", "top5", "seconds"} of the offline linear probe on the checkpoint's dataset."""
    start = time.time()
    method, data = load_checkpoint(ckpt)
    train_x, train_y = extract_features(method, data, "train", num_workers=num_workers)
    val_x, val_y = extract_features(method, data, "val", num_workers=num_workers)
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    num_classes = int(train_y.max()) + 1
    head = train_linear((train_x - mean) / std, train_y, num_classes=num_classes, epochs=epochs)
    with torch.no_grad():
        logits = head((val_x - mean) / std)
    return {"top1": topk_accuracy(logits, val_y, 1), "top5": topk_accuracy(logits, val_y, 5),
            "seconds": time.time() - start}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--num_workers", type=int, default=0)
    args = parser.parse_args(argv)
    result = linear_eval(args.ckpt, epochs=args.epochs, num_workers=args.num_workers)
    print(f"offline linear probe ({args.ckpt}): top-1 {result['top1']:.4f}, top-5 {result['top5']:.4f} "
          f"({result['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
