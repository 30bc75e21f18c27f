"""What the landscape of an SSL checkpoint measures, with everything random held fixed.

``pretrain``: the method's own pre-training loss, ``objective(views, labels).loss`` (ssl_step; the
supervised baseline's cross-entropy), averaged over fixed batches of views and their labels drawn
ONCE from the data module's training pipeline; ``torch.manual_seed(seed + i)``
before batch i's step makes anything ssl_step draws from the global RNG (MAE masks) the same at
every grid point. ``probe``: cross-entropy of the online linear probe on the evaluated backbone's
features of fixed un-augmented labelled training images. Both objectives return a differentiable
tensor (the Hessian commands differentiate them twice; the grid calls them without gradients).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch.utils.data import DataLoader, Subset

from ssl_lightning.data.datamodule import SSLDataModule
from ssl_lightning.eval.features import build_datamodule
from ssl_lightning.landscape.grid import Direction, filter_normalized_direction
from ssl_lightning.losses.supervised import labelled_cross_entropy
from ssl_lightning.methods import SSLMethod

LOSSES = ("pretrain", "probe")
ViewBatch = tuple[list[torch.Tensor], torch.Tensor]  # (views (b, C, H, W) each, labels (b,))


def _check_size(available: int, num_batches: int, batch_size: int, what: str) -> None:
    if num_batches * batch_size > available:
        raise ValueError(f"{num_batches} batches of {batch_size} need {num_batches * batch_size} {what} samples, "
                         f"the split has {available}; lower --batches or --batch_size")


def fixed_training_batches(datamodule: SSLDataModule, *, num_batches: int, batch_size: int,
                           seed: int) -> list[ViewBatch]:
    """``num_batches`` (views, labels): lists of views (b, C, H, W), one per configured view, of a
    seeded subset of the training split, augmented once by the data module's own pipeline (either
    augment mode) with RNGs seeded by ``seed``, and their labels (b,) (-1 where unlabelled). The
    caller's global RNG state is left as it was."""
    datamodule.setup("fit")
    train_set = datamodule.train_set
    _check_size(len(train_set), num_batches, batch_size, "training")
    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(Subset(train_set, order[:num_batches * batch_size].tolist()), batch_size=batch_size)
    on_device = datamodule.hparams.augment == "device"  # uint8 batches, augmented by BatchedViews
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the per-sample torchvision pipeline draws from the global RNG
        return [(datamodule.device_views(images, generator) if on_device else images, labels)
                for images, labels in loader]


def fixed_labelled_images(datamodule: SSLDataModule, *, num_batches: int, batch_size: int,
                          seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches of a seeded subset of the training split with the eval transform."""
    if datamodule.num_classes == 0:
        raise ValueError(f"dataset {datamodule.hparams.dataset!r} is unlabelled; use --loss pretrain")
    loader = datamodule.eval_loader("train", num_batches * batch_size, batch_size=batch_size, seed=seed)
    batches = list(loader)
    _check_size(sum(len(y) for _, y in batches), num_batches, batch_size, "labelled training")
    return batches


def pretrain_objective(method: SSLMethod, batches: list[ViewBatch], *, seed: int) -> Callable[[], torch.Tensor]:
    """Mean of ``method.objective(views, labels).loss`` over the batches, batch i after
    torch.manual_seed(seed + i)."""
    def loss() -> torch.Tensor:
        total = 0.0
        for i, (views, labels) in enumerate(batches):
            torch.manual_seed(seed + i)
            total = total + method.objective(views, labels).loss.float()
        return total / len(batches)
    return loss


def probe_objective(method: SSLMethod, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], torch.Tensor]:
    """Cross-entropy of the online probe on the evaluated backbone's features (not detached: the
    Hessian sees the backbone too), mean over labelled samples."""
    def loss() -> torch.Tensor:
        total, count = 0.0, 0
        for images, labels in batches:
            kept = int((labels >= 0).sum())
            total = total + labelled_cross_entropy(method.probe.logits(method(images)), labels) * kept
            count += kept
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


def method_objective(method: SSLMethod, data: dict, *, loss: str = "pretrain", num_batches: int = 4,
                     batch_size: int | None = None, seed: int = 0) -> tuple[Callable[[], torch.Tensor], set[str]]:
    """(the ``loss`` objective on fixed batches as a differentiable function of the method's current
    weights, the names of the parameters a landscape moves). ``method`` on its device, ``data`` its
    data-module hyperparameters (load_method); batch_size defaults to the global batch it was
    trained with; views, images and masks are drawn with ``seed``."""
    if loss not in LOSSES:
        raise ValueError(f"loss {loss!r} is not one of {LOSSES}")
    moved = perturbed_parameters(method, loss)  # first: fails fast when probe is asked of a probe-less method
    datamodule = build_datamodule(data)
    batch_size = batch_size or datamodule.hparams.batch_size
    device = next(method.parameters()).device
    fixed = dict(num_batches=num_batches, batch_size=batch_size, seed=seed)
    if loss == "pretrain":
        batches = [([method._prepare(v.to(device)) for v in views], labels.to(device))
                   for views, labels in fixed_training_batches(datamodule, **fixed)]
        return pretrain_objective(method, batches, seed=seed), moved
    images = [(x.to(device), y.to(device)) for x, y in fixed_labelled_images(datamodule, **fixed)]
    return probe_objective(method, images), moved


def method_plane(method: SSLMethod, data: dict, *, loss: str = "pretrain", num_batches: int = 4,
                 batch_size: int | None = None, seed: int = 0) -> tuple[Callable[[], torch.Tensor], set[str],
                                                                         Direction, Direction]:
    """(objective, moved parameter names, d1, d2): method_objective and the filter-normalised
    directions with seeds ``seed`` and ``seed + 1`` over the moved parameters."""
    objective, moved = method_objective(method, data, loss=loss, num_batches=num_batches, batch_size=batch_size,
                                        seed=seed)
    d1 = filter_normalized_direction(method, seed=seed, only=moved)
    d2 = filter_normalized_direction(method, seed=seed + 1, only=moved)
    return objective, moved, d1, d2


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
