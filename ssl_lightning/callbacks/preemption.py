"""Preemption: on SIGUSR1 save last.ckpt, requeue the SLURM job, stop cleanly.

SLURM sends the signal ahead of the time limit (``sbatch --signal=B:USR1@<seconds>``, which our
job scripts forward to every task) or when an admin/test calls ``scancel --signal=USR1 --batch``.
The handler only sets a flag; the work happens at the end of the current training step, when the
model, optimizer and loop counters are consistent: every rank agrees on the flag (one all-reduce
per step under DDP), ``last.ckpt`` is written atomically with the data loader's position, rank 0
runs ``scontrol requeue <job>``, and the fit stops. The requeued job starts with ``--ckpt_path last``
and continues the same step, epoch position and W&B run. Lightning's own SLURM auto-requeue (which
saves from inside the signal handler, mid-step) is switched off by the CLI.

SIGTERM (``scancel``, or a time limit reached without ``--signal``; SLURM sends SIGKILL KillWait
seconds later) saves the same way at the end of the current step but does not requeue; Lightning
then stops the fit. A SIGKILL during that save leaves the previous checkpoint (checkpointing.py).
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from ssl_lightning.checkpointing import LastCheckpoint
from ssl_lightning.distributed import all_reduce_no_grad


def slurm_job_id() -> str | None:
    """The id to requeue: ``<array job>_<task>`` for array tasks, else SLURM_JOB_ID (None outside SLURM)."""
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


class PreemptionHandler(pl.Callback):
    def __init__(self, signal_name: str = "SIGUSR1", requeue: bool = True):
        """signal_name: the warning signal (SIGUSR1, as in our sbatch scripts). requeue: run
        ``scontrol requeue`` when inside a SLURM job (outside one the run just saves and stops)."""
        if not hasattr(signal, signal_name):
            raise ValueError(f"unknown signal {signal_name!r}; use a name such as SIGUSR1 or SIGUSR2")
        self.signum = getattr(signal, signal_name)
        self.requeue = requeue
        self.received = False
        self._previous = None

    def _on_signal(self, signum, frame) -> None:
        self.received = True

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            self.received = False
            self._previous = signal.signal(self.signum, self._on_signal)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        # Lightning's own SIGTERM handler sets received_sigterm; it raises SIGTERMException after this hook
        flags = torch.tensor([float(self.received), float(trainer.received_sigterm)], device=pl_module.device)
        preempted, terminated = (bool(f) for f in all_reduce_no_grad(flags, "max"))
        if not (preempted or terminated):
            return
        checkpoints = [cb for cb in trainer.callbacks if isinstance(cb, LastCheckpoint)]
        if not checkpoints:
            rank_zero_warn("preemption signal received but no LastCheckpoint callback: nothing saved")
        path = checkpoints[0].save_now(trainer) if checkpoints else None
        job = slurm_job_id()
        if terminated:
            rank_zero_info(f"ssl-lightning: SIGTERM at step {trainer.global_step}; saved {path}; stopping without "
                           "requeue (resume with --ckpt_path last)")
            trainer.should_stop = True
            return
        rank_zero_info(f"ssl-lightning: preemption signal at step {trainer.global_step}; saved {path}")
        if self.requeue and job and trainer.is_global_zero:
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if result.returncode:
                rank_zero_warn(f"scontrol requeue {job} failed ({result.stderr.strip()}); resubmit the job by hand")
            else:
                rank_zero_info(f"ssl-lightning: requeued SLURM job {job}")
        trainer.should_stop = True
