"""SSLDataModule: one data module for every method.

Training batches are ``(views, labels)`` with ``views`` a list of (b, C, H, W) tensors, one per
configured view; validation batches are ``(images, labels)`` for the probes. ``batch_size`` is the
GLOBAL batch, divided over devices x nodes; the training loader shards it by rank and resumes
mid-epoch exactly (ssl_lightning.data.resumable).

``augment`` picks where views are made: "workers" (per-sample torchvision in DataLoader workers,
any dataset) or "device" (uint8 batches go to the training device and BatchedViews augments
them there with per-sample random parameters). For image files (``imagefolder``) "device" cuts the
random-resized crops at decode time in the workers (ssl_lightning.data.crops) and BatchedViews does
the rest; ``on_corrupt: skip`` then replaces unreadable files instead of failing, and
``decode: device`` has the workers send JPEG bytes that are decoded and cropped on the device.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset, Subset

from ssl_lightning.data.batched_views import BatchedViews
from ssl_lightning.data.blur import blur_choices, restore_blur_choices
from ssl_lightning.data.crops import DECODE_PLACES, ON_CORRUPT, CroppedViewsDataset, collate_encoded, crops_on_device
from ssl_lightning.data.resumable import ResumableSampler
from ssl_lightning.data.datasets import (
    TensorImageDataset,
    dataset_info,
    find_data_dir,
    load_dataset,
    read_path_list,
    sample_paths,
    without_paths,
)
from ssl_lightning.data.views import MultiViewTransform, ViewConfig, as_view_configs, build_eval_transform

log = logging.getLogger(__name__)
# Our loader does resume mid-epoch (through the data module's state, see state_dict below), which
# Lightning cannot see from the loader alone.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


class TransformedDataset(Dataset):
    """(image, label) -> (transform(image), label)."""

    def __init__(self, base: Dataset, transform: Callable):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        image, label = self.base[index]
        return self.transform(image), label


AUGMENT_MODES = ("workers", "device")
FIXED_SIZE_DATASETS = ("fashion_mnist", "cifar10", "cifar100", "stl10", "synthetic", "digits")
FILE_DATASETS = ("imagefolder",)  # variable-size files: augment: device crops them in the workers


class NormalizingCollate:
    """Batch of (uint8 (C, H, W), label) -> (normalised float (N, C, H, W), labels (N,))."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def __call__(self, batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([image for image, _ in batch]).float().div_(255)
        return (images - self.mean) / self.std, torch.tensor([label for _, label in batch])


def default_views(size: int) -> list[ViewConfig]:
    """Two symmetric SimCLR-style views."""
    return [ViewConfig(size=size), ViewConfig(size=size)]


class SSLDataModule(pl.LightningDataModule):
    def __init__(
        self,
        dataset: str = "fashion_mnist",
        data_dir: str | None = None,
        batch_size: int = 256,
        num_workers: int = 4,
        views: list[ViewConfig] | None = None,
        labelled: bool = True,
        download: bool = False,
        synthetic_size: int = 512,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        augment: str = "workers",
        on_corrupt: str = "error",
        decode: str = "workers",
        exclude: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size} must be >= 1")
        if augment not in AUGMENT_MODES:
            raise ValueError(f"augment {augment!r} is not one of {AUGMENT_MODES}")
        if augment == "device" and dataset not in FIXED_SIZE_DATASETS + FILE_DATASETS:
            raise ValueError(f"augment: device supports {', '.join(FIXED_SIZE_DATASETS + FILE_DATASETS)}; "
                             f"use augment: workers for {dataset}")
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt {on_corrupt!r} is not one of {ON_CORRUPT}")
        if decode not in DECODE_PLACES:
            raise ValueError(f"decode {decode!r} is not one of {DECODE_PLACES}")
        if decode == "device" and not (augment == "device" and dataset in FILE_DATASETS):
            raise ValueError(f"decode: device needs image files read with augment: device (got dataset {dataset}, "
                             f"augment {augment}); set data.augment: device or decode: workers")
        if on_corrupt == "skip" and not (augment == "device" and dataset in FILE_DATASETS):
            raise ValueError(f"on_corrupt: skip needs image files read with augment: device (got dataset "
                             f"{dataset}, augment {augment}); set data.augment: device or on_corrupt: error")
        views = as_view_configs(views) if views else None
        crop = views[0].size if views else None
        self.info = dataset_info(dataset, data_dir, image_size=crop, labelled=labelled)
        self.views = views or default_views(self.info.image_size)
        if not download:
            find_data_dir(dataset, data_dir)  # a missing or incomplete data dir fails here, not mid-fit
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self._resume_state: dict[str, int] | None = None  # from a checkpoint: where the epoch stopped
        self.skipped_per_epoch: dict[int, int] = {}  # on_corrupt: skip -> replaced samples per epoch
        self._skipped_files: set[str] = set()
        self._reported_epochs: set[int] = set()
        # data.exclude: paths left out of every split (an audit's --write-exclude file); absolute paths of
        # image files, or relative to data_dir; pseudo-paths like fashion_mnist/train/00123 for in-memory data
        self._exclude_lines = read_path_list(exclude) if exclude else []
        self._exclude_matched: dict[str, set[str]] | None = None

    # Read by the CLI to configure the model (link_arguments apply_on="instantiate").
    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def channels(self) -> int:
        return self.info.channels

    @property
    def image_size(self) -> int:
        return self.views[0].size

    def per_device_batch_size(self) -> int:
        world = self.trainer.world_size if self.trainer is not None else 1
        if self.hparams.batch_size % world:
            raise ValueError(
                f"batch_size {self.hparams.batch_size} is not divisible by {world} devices "
                f"(devices x nodes); use a multiple of {world}, e.g. {world * max(1, self.hparams.batch_size // world)}")
        return self.hparams.batch_size // world

    def _load(self, split: str, *, labelled: bool) -> Dataset:
        hp = self.hparams
        base = load_dataset(hp.dataset, hp.data_dir, split, labelled=labelled, download=hp.download,
                            synthetic_size=hp.synthetic_size, image_size=self.info.image_size)
        if not self._exclude_lines:
            return base
        if self._exclude_matched is None:
            self._count_excluded()
        return without_paths(base, sample_paths(base, hp.dataset, split), self._excluded_keys())

    def _excluded_keys(self) -> set[str]:
        """Each line of the exclude file as written and, for image folders, as an absolute path (a
        relative line read from data_dir and from the working directory)."""
        keys = set(self._exclude_lines)
        if self.hparams.dataset in FILE_DATASETS:
            root = str(find_data_dir(self.hparams.dataset, self.hparams.data_dir))
            keys |= {os.path.abspath(os.path.join(root, line)) for line in self._exclude_lines}
            keys |= {os.path.abspath(line) for line in self._exclude_lines}
        return keys

    def _count_excluded(self) -> None:
        """Prints once how many samples data.exclude leaves out of each split, and its lines that match none."""
        hp, keys = self.hparams, self._excluded_keys()
        self._exclude_matched = {}
        for split in ("train", "val"):
            try:
                base = load_dataset(hp.dataset, hp.data_dir, split, labelled=False, synthetic_size=hp.synthetic_size,
                                    image_size=self.info.image_size)
            except FileNotFoundError:
                continue
            self._exclude_matched[split] = set(sample_paths(base, hp.dataset, split)) & keys
        matched = set().union(*self._exclude_matched.values())
        root = os.path.abspath(hp.data_dir or "")
        unmatched = [line for line in self._exclude_lines if not {line, os.path.abspath(line),
                     os.path.abspath(os.path.join(root, line))} & matched]
        counts = ", ".join(f"{split} {len(paths)}" for split, paths in self._exclude_matched.items())
        line = f"data.exclude: {len(matched)} samples left out ({counts}), listed in {hp.exclude}"
        if unmatched:
            line += f"; {len(unmatched)} of its {len(self._exclude_lines)} lines match no sample (first: {unmatched[0]})"
        if rank_zero_only.rank == 0:
            print(line, file=sys.stderr, flush=True)

    def setup(self, stage: str) -> None:
        self.per_device_batch_size()  # fail early, before any data is read, if it does not divide
        hp, info = self.hparams, self.info
        if stage == "fit" and self.train_set is None:
            base = self._load("train", labelled=hp.labelled)
            if len(base) < hp.batch_size:
                raise ValueError(
                    f"the {hp.dataset} training set has {len(base)} samples, fewer than one global batch of "
                    f"{hp.batch_size}; lower data.batch_size to at most {len(base)}")
            if hp.augment == "device":
                self.device_views = BatchedViews(self.views, info.mean, info.std)
                self.train_set = base
                if hp.dataset in FILE_DATASETS:  # crops cut at decode time, in the workers
                    self.train_set = CroppedViewsDataset(base.files, base.labels, self.views, info.channels,
                                                         seed=int(os.environ.get("PL_GLOBAL_SEED", 0)),
                                                         on_corrupt=hp.on_corrupt, decode=hp.decode)
            else:
                self.train_set = TransformedDataset(base, MultiViewTransform(self.views, info.mean, info.std))
        if stage in ("fit", "validate") and self.val_set is None and info.num_classes > 0:
            try:
                base = self._load("val", labelled=True)
            except FileNotFoundError as err:
                warnings.warn(f"no labelled validation split ({err}); validation probes are off", stacklevel=2)
                return
            self.val_set = TransformedDataset(base, build_eval_transform(self.image_size, info.mean, info.std))

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """augment: device -> the uint8 training batch becomes its views here, on the device."""
        trainer = self.trainer
        if self.hparams.augment == "device" and trainer is not None and trainer.training:
            images, labels, *skipped = batch
            if skipped:
                self._count_skipped(skipped[0], trainer.current_epoch)
            if isinstance(images, dict):  # decode: device
                images = crops_on_device(images, self.views, self.info.channels, labels.device)
            return self.device_views(images), labels
        return batch

    def _count_skipped(self, paths: list[str], epoch: int) -> None:
        """Logs each unreadable file once and, when an epoch is over, how many samples it replaced."""
        for path in filter(None, paths):
            if path not in self._skipped_files:
                self._skipped_files.add(path)
                log.warning("unreadable image %s is skipped: replaced by the next readable file (on_corrupt: skip)",
                            path)
            self.skipped_per_epoch[epoch] = self.skipped_per_epoch.get(epoch, 0) + 1
        for done in [e for e in self.skipped_per_epoch if e < epoch and e not in self._reported_epochs]:
            self._report_skipped(done)

    def _report_skipped(self, epoch: int) -> None:
        self._reported_epochs.add(epoch)
        log.warning("epoch %d: %d unreadable image(s) skipped", epoch, self.skipped_per_epoch[epoch])

    def teardown(self, stage: str) -> None:
        for epoch in [e for e in self.skipped_per_epoch if e not in self._reported_epochs]:
            self._report_skipped(epoch)

    def eval_loader(self, split: str, num_samples: int | None, *, labelled: bool = True, batch_size: int = 512,
                    seed: int = 0) -> DataLoader:
        """Un-augmented, labelled samples for monitoring: a fixed seeded subset of ``split`` (all of it
        when num_samples is None), rounded down to a multiple of the world size and sharded by rank,
        so every rank holds the same number and the gathered set is the same for any world size."""
        hp, info = self.hparams, self.info
        base = self._load(split, labelled=labelled and hp.labelled)
        order = torch.randperm(len(base), generator=torch.Generator().manual_seed(seed))
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        count = min(num_samples or len(base), len(base)) // world * world
        indices = order[:count][rank::world].tolist()
        if isinstance(base, TensorImageDataset) and base.images.shape[-1] == self.image_size:
            # already the right size: normalise whole batches instead of transforming sample by sample
            return DataLoader(Subset(base, indices), batch_size=batch_size, num_workers=hp.num_workers,
                              collate_fn=NormalizingCollate(info.mean, info.std))
        subset = Subset(TransformedDataset(base, build_eval_transform(self.image_size, info.mean, info.std)), indices)
        return DataLoader(subset, batch_size=batch_size, num_workers=hp.num_workers)

    def _loader(self, dataset: Dataset, *, train: bool) -> DataLoader:
        workers = self.hparams.num_workers
        common = dict(batch_size=self.per_device_batch_size(), drop_last=train, num_workers=workers,
                      pin_memory=self.hparams.pin_memory and torch.cuda.is_available(),
                      persistent_workers=self.hparams.persistent_workers and workers > 0)
        if not train:
            return DataLoader(dataset, **common)
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=True, drop_last=True, seed=seed,
                                   keyed=isinstance(dataset, CroppedViewsDataset))
        if self._resume_state is not None:
            epoch, batches_done = self._resume_state["epoch"], self._resume_state["batches_done"]
            sampler.resume_at(epoch, batches_done * common["batch_size"])
            self._resume_state = None
        # its own generator: creating an iterator must not draw from the global RNG, whose state the
        # checkpoint restores (a resumed run creates its iterator at a different moment)
        collate = collate_encoded if isinstance(dataset, CroppedViewsDataset) and dataset.decode == "device" else None
        return DataLoader(dataset, sampler=sampler, generator=torch.Generator().manual_seed(seed), collate_fn=collate,
                          **common)

    def state_dict(self) -> dict:
        """Saved in every checkpoint: the epoch and how many of its batches were trained on. (Lightning
        prefetches a batch, so the loader itself cannot know; its own loader-state hook runs too late
        for a resume because configure_optimizers already built the loader.)"""
        trainer = self.trainer
        if trainer is None or not trainer.training:
            return {}
        return {"epoch": trainer.current_epoch,
                "batches_done": trainer.fit_loop.epoch_loop.batch_progress.current.processed,
                "blur_kernels": blur_choices()}  # measured per machine; a resumed run keeps them

    def load_state_dict(self, state: dict) -> None:
        state = dict(state or {})
        restore_blur_choices(state.pop("blur_kernels", []))
        self._resume_state = state or None

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_set, train=False) if self.val_set is not None else []
