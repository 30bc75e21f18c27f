"""Tiny, fast configurations shared by the tests."""
from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytorch_lightning as pl

from ssl_lightning.checkpointing import AtomicCheckpointIO, LastCheckpoint
from ssl_lightning.data.datamodule import SSLDataModule
from ssl_lightning.data.views import ViewConfig
from ssl_lightning.methods import VICReg
from ssl_lightning.optim import OptimizerConfig

SIZE = 16
# The same tiny run on the command line: synthetic data, width-4 convnet, 1 epoch of 4 steps.
TINY_CLI_ARGS = [
    "--data.dataset", "synthetic", "--data.synthetic_size", "128", "--data.batch_size", "32",
    "--data.num_workers", "0", "--data.views", '[{"size": 16}, {"size": 16}]',
    "--model.init_args.backbone", "convnet", "--model.init_args.backbone_kwargs", '{"width": 4}',
    "--model.init_args.projector", "32-32", "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "1",
]


def tiny_data(**kwargs) -> SSLDataModule:
    views = [ViewConfig(size=SIZE, scale=(0.5, 1.0)), ViewConfig(size=SIZE, scale=(0.5, 1.0), solarize_p=0.2)]
    defaults = dict(dataset="synthetic", batch_size=32, num_workers=0, synthetic_size=128, views=views)
    return SSLDataModule(**{**defaults, **kwargs})


def tiny_vicreg(data: SSLDataModule, **kwargs) -> VICReg:
    defaults = dict(backbone="convnet", backbone_kwargs={"width": 4}, projector="32-32-32",
                    optimizer=OptimizerConfig(name="lars", lr=0.3, warmup_epochs=0.5),
                    num_classes=data.num_classes, in_chans=data.channels, image_size=data.image_size,
                    batch_size=data.hparams.batch_size)
    return VICReg(**{**defaults, **kwargs})


def tiny_checkpoint(directory: Path, data: SSLDataModule) -> Path:
    """last.ckpt of a width-4 VICReg convnet after 2 steps on ``data``."""
    tiny_trainer(directory / "checkpoints", max_epochs=1, limit_train_batches=2, limit_val_batches=0).fit(
        tiny_vicreg(data), data)
    return directory / "checkpoints" / "last.ckpt"


def tiny_trainer(ckpt_dir, **kwargs) -> pl.Trainer:
    # default_root_dir: a test passing its own callbacks still gets Lightning's default checkpoint,
    # which must land in its tmp dir, not in the repository
    defaults = dict(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_progress_bar=False,
                    default_root_dir=str(ckpt_dir),
                    enable_model_summary=False, num_sanity_val_steps=0, plugins=[AtomicCheckpointIO()],
                    callbacks=[LastCheckpoint(dirpath=str(ckpt_dir))])
    return pl.Trainer(**{**defaults, **kwargs})


class SignalAtStep(pl.Callback):
    """Sends this process ``signum`` during step ``step``, as SLURM would, at an arbitrary moment
    (SIGUSR1 ahead of the time limit; SIGTERM on scancel or a time limit without --signal)."""

    def __init__(self, step: int, signum: int = signal.SIGUSR1, rank: int | None = None, restart: int | None = None):
        """rank None: every rank; restart: only in that attempt of a SLURM job (SLURM_RESTART_COUNT, 0 first)."""
        self.step, self.signum, self.rank, self.restart = step, signum, rank, restart

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if (trainer.global_step == self.step - 1 and self.rank in (None, trainer.global_rank)
                and self.restart in (None, attempt)):
            os.kill(os.getpid(), self.signum)


class SleepAtSetup(pl.Callback):
    """Rank ``rank`` starts ``seconds`` late (after the process group exists, before the model is
    broadcast), as a rank of a loaded machine or a late node would."""

    def __init__(self, rank: int, seconds: float):
        self.rank, self.seconds = rank, seconds

    def setup(self, trainer, pl_module, stage):
        if trainer.global_rank == self.rank:
            time.sleep(self.seconds)


class StopAfterEpochs(pl.Callback):
    """Simulates a job killed after ``n`` epochs (the schedule still spans max_epochs)."""

    def __init__(self, n: int):
        self.n = n

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 >= self.n:
            trainer.should_stop = True


def offline_runs_of(wandb_dir: Path, run_id: str) -> list[Path]:
    """The offline W&B run directories of run_id, oldest first; every other run directory fails the test.

    W&B names them offline-run-<YYYYmmdd_HHMMSS>-<id>, adding -1, -2 ... when two parts of a run start
    within the same second (a tiny resumed fit does).
    """
    runs = sorted(wandb_dir.glob("offline-run-*"))
    pattern = re.compile(rf"offline-run-\d{{8}}_\d{{6}}-{re.escape(run_id)}(-\d+)?")
    assert all(pattern.fullmatch(r.name) for r in runs), [r.name for r in runs]
    return runs


class KillWandbServiceAtStep(pl.Callback):
    """SIGKILLs this process's W&B service (its wandb-core child) at the start of step ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            import subprocess

            children = subprocess.run(["pgrep", "-P", str(os.getpid()), "-f", "wandb-core"],
                                      capture_output=True, text=True).stdout.split()
            assert children, "no W&B service process under this process"
            for pid in children:
                os.kill(int(pid), signal.SIGKILL)
