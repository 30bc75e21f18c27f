"""What the landscape of an SSL checkpoint measures, with everything random held fixed.

``pretrain``: the method's own pre-training loss, ``ssl_step(views).loss``, averaged over fixed
batches of views drawn ONCE from the data module's training pipeline; ``torch.manual_seed(seed + i)``
before batch i's step makes anything ssl_step draws from the global RNG (MAE masks) the same at
every grid point. ``probe``: cross-entropy of the online linear probe on the evaluated backbone's
features of fixed un-augmented labelled training images.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.utils.data import DataLoader, Subset

from ssl_lightning.data.datamodule import SSLDataModule
from ssl_lightning.methods import SSLMethod

LOSSES = ("pretrain", "probe")
ViewBatch = list[torch.Tensor]


def _check_size(available: int, num_batches: int, batch_size: int, what: str) -> None:
    if num_batches * batch_size > available:
        raise ValueError(f"{num_batches} batches of {batch_size} need {num_batches * batch_size} {what} samples, "
                         f"the split has {available}; lower --batches or --batch_size")


def fixed_training_views(datamodule: SSLDataModule, *, num_batches: int, batch_size: int,
                         seed: int) -> list[ViewBatch]:
    """``num_batches`` lists of views (b, C, H, W), one per configured view, of a seeded subset of the
    training split, augmented once by the data module's own pipeline (either augment mode) with RNGs
    seeded by ``seed``. The caller's global RNG state is left as it was."""
    datamodule.setup("fit")
    train_set = datamodule.train_set
    _check_size(len(train_set), num_batches, batch_size, "training")
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(Subset(train_set, order[:num_batches * batch_size].tolist()), batch_size=batch_size)
    on_device = datamodule.hparams.augment == "device"  # uint8 batches, augmented by BatchedViews
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the per-sample torchvision pipeline draws from the global RNG
        return [datamodule.device_views(images, generator) if on_device else images for images, _ in loader]


def fixed_labelled_images(datamodule: SSLDataModule, *, num_batches: int, batch_size: int,
                          seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches of a seeded subset of the training split with the eval transform."""
    if datamodule.num_classes == 0:
        raise ValueError(f"dataset {datamodule.hparams.dataset!r} is unlabelled; use --loss pretrain")
    loader = datamodule.eval_loader("train", num_batches * batch_size, batch_size=batch_size, seed=seed)
    batches = list(loader)
    _check_size(sum(len(y) for _, y in batches), num_batches, batch_size, "labelled training")
    return batches


def pretrain_objective(method: SSLMethod, batches: list[ViewBatch], *, seed: int) -> Callable[[], float]:
    """Mean of ``method.ssl_step(views).loss`` over the batches, batch i after torch.manual_seed(seed + i)."""
    def loss() -> float:
        total = 0.0
        for i, views in enumerate(batches):
            torch.manual_seed(seed + i)
            total += float(method.ssl_step(views).loss)
        return total / len(batches)
    return loss


def probe_objective(method: SSLMethod, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], float]:
    """Cross-entropy of the online probe on the evaluated backbone's features, mean over labelled samples."""
    def loss() -> float:
        total, count = 0.0, 0
        for images, labels in batches:
            value, _, kept = method.probe.loss(method(images), labels)
            total, count = total + float(value) * len(kept), count + len(kept)
        return total / max(count, 1)
    return loss


def perturbed_parameters(method: SSLMethod, loss: str) -> set[str]:
    """The parameters the landscape moves. pretrain: the trainable ones outside the probe (EMA
    teachers are not optimised; they keep the checkpoint's weights, like the buffers). probe: the
    evaluated backbone (the teacher's where the method evaluates it) and the probe."""
    if loss == "pretrain":
        probe = {id(p) for p in method.probe.parameters()} if method.probe is not None else set()
        return {n for n, p in method.named_parameters() if p.requires_grad and id(p) not in probe}
    if method.probe is None:
        raise ValueError(f"{type(method).__name__} checkpoint has no online linear probe (trained with "
                         "num_classes 0, i.e. unlabelled data); use --loss pretrain")
    wanted = {id(p) for module in (method.evaluated_modules()[0], method.probe) for p in module.parameters()}
    return {n for n, p in method.named_parameters() if id(p) in wanted}


class CheckpointClock:
    """Stands in for the Trainer while ssl_step runs outside one: the epoch and optimizer step the
    checkpoint was saved at, so schedules read inside ssl_step (DINO's teacher temperature, SwAV's
    queue start) are where training left them."""

    def __init__(self, current_epoch: int, global_step: int):
        self.current_epoch, self.global_step = current_epoch, global_step

    def __getattr__(self, name: str):
        raise AttributeError(f"ssl_step asked the trainer for {name!r}, but the landscape runs ssl_step without a "
                             "Trainer; ssl_step may read current_epoch and global_step only (log through "
                             "SSLOutput.logs, not self.log)")


@contextmanager
def at_checkpoint_step(method: SSLMethod, *, epoch: int, global_step: int) -> Iterator[None]:
    """Attaches a CheckpointClock at the checkpoint's epoch and global step; detaches it on exit."""
    method.trainer = CheckpointClock(epoch, global_step)
    try:
        yield
    finally:
        method.trainer = None
