"""Checkpoints that are never half-written, and a last.ckpt at a configurable interval.

Lightning's own save goes through an fsspec transaction whose temporary file lives in the system
temp dir; when checkpoints sit on another file system (a cluster's shared disk) the final move is
a copy, and a kill during it leaves a truncated last.ckpt. Here the temporary file is written
next to the target, fsynced, and renamed over it: a crash or SIGTERM leaves the old or the new
checkpoint, never a corrupt or missing one.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning_fabric.plugins import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to ``path`` via a fsynced sibling temp file and os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Trainer plugin: every checkpoint the Trainer writes goes through atomic_torch_save."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got {storage_options!r}")
        atomic_torch_save(checkpoint, path)


class LastCheckpoint(ModelCheckpoint):
    """Keeps ``<dirpath>/last.ckpt`` up to date: every ``every_n_train_steps`` optimizer steps
    (0 = off), at the end of every ``every_n_epochs``-th epoch (0 = off) and at the step that reaches
    trainer.max_steps; PreemptionHandler adds one on SIGUSR1. ``keep_every_n_epochs`` K > 0 also keeps
    ``<dirpath>/epoch=E.ckpt`` (E = epochs completed) at the end of every K-th epoch, through the same
    atomic save; nothing else is kept (none by default).

    A ModelCheckpoint subclass so that ``--ckpt_path last`` finds it; its own save rules replace
    ModelCheckpoint's top-k/monitor logic, which never writes last.ckpt when save_top_k=0.
    """

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int = 0, every_n_epochs: int = 1,
                 keep_every_n_epochs: int = 0):
        if every_n_train_steps < 0 or every_n_epochs < 0 or keep_every_n_epochs < 0:
            raise ValueError(f"every_n_train_steps {every_n_train_steps}, every_n_epochs {every_n_epochs} and "
                             f"keep_every_n_epochs {keep_every_n_epochs} must be >= 0 (0 turns that trigger off)")
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, enable_version_counter=False)
        self.every_steps, self.every_epochs = every_n_train_steps, every_n_epochs
        self.keep_every_epochs = keep_every_n_epochs

    def save_now(self, trainer) -> str:
        """Write last.ckpt for the current step, whatever the schedule (preemption)."""
        self._save_last(trainer)
        return self.last_model_path

    def _save_last(self, trainer) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run or self._last_global_step_saved == trainer.global_step \
                and trainer.global_step > 0 and self.last_model_path:
            return
        self.last_model_path = str(Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}")
        trainer.save_checkpoint(self.last_model_path)
        self._last_global_step_saved = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        last_step = 0 < trainer.max_steps <= trainer.global_step  # a run that ends mid-epoch by max_steps
        if last_step or self.every_steps and trainer.global_step % self.every_steps == 0:
            self._save_last(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.current.processed < trainer.num_training_batches:
            return  # stopped mid-epoch (preemption): an epoch-end save would mark the epoch as finished
        epochs_done = trainer.current_epoch + 1
        if self.every_epochs and epochs_done % self.every_epochs == 0:
            self._last_global_step_saved = -1  # the epoch-end state (loop counters) differs from the step save
            self._save_last(trainer)
        if self.keep_every_epochs and epochs_done % self.keep_every_epochs == 0 and not trainer.fast_dev_run:
            trainer.save_checkpoint(str(Path(self.dirpath) / f"epoch={epochs_done}{self.FILE_EXTENSION}"))

    def on_validation_end(self, trainer, pl_module) -> None:
        pass

    def on_train_end(self, trainer, pl_module) -> None:
        pass  # ModelCheckpoint saves "last" here; after a mid-epoch stop that would mark the epoch finished

    def on_exception(self, trainer, pl_module, exception) -> None:
        pass  # the state after an exception may be mid-step; the previous last.ckpt is the consistent one


def rng_state() -> dict[str, Any]:
    """Every RNG a training step can draw from (augmentations, sampler order, dropout, masks)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)  # weights_only-safe
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
