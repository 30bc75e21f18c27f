"""Preemption: on SIGUSR1 save last.ckpt, requeue the SLURM job, stop cleanly.

SLURM sends the signal ahead of the time limit (``sbatch --signal=B:USR1@<seconds>``, which our
job scripts forward to every task) or when an admin/test calls ``scancel --signal=USR1 --batch``.
The handler only sets a flag; the work happens at the end of a training step, when the model,
optimizer and loop counters are consistent: ``last.ckpt`` is written atomically with the data
loader's position, rank 0 runs ``scontrol requeue <job>``, and the fit stops. The requeued job
starts with ``--ckpt_path last`` and continues the same step, epoch position and W&B run.
Lightning's own SLURM auto-requeue (which saves from inside the signal handler, mid-step) is
switched off by the CLI.

When: on one process, at the end of the step during which the signal arrived (the flag is a host
value: no collective, no synchronisation). Under DDP the ranks must agree, without making the host
wait for the device every step: each step's flags are all-reduced (MAX) on the device and read one
step later (``DelayedHostRead``), so every rank acts at the end of the step AFTER the one in which
the first rank saw the signal, all at the same step. Lightning's own per-step SIGTERM broadcast
(``_broadcast_sigterm_tensor``: a host-to-device copy, a broadcast and ``.item()`` every step) and
its SIGTERM handler (which broadcasts from inside the handler) are replaced by this agreement.

SIGTERM (``scancel``, or a time limit reached without ``--signal``; SLURM sends SIGKILL KillWait
seconds later) saves the same way but does not requeue, and the fit ends with Lightning's
SIGTERMException. A SIGKILL during that save leaves the previous checkpoint (checkpointing.py).
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ssl_lightning.checkpointing import LastCheckpoint
from ssl_lightning.distributed import DelayedHostRead, all_reduce_no_grad, is_distributed


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
        self.terminated = False  # SIGTERM, under DDP (Lightning's trainer.received_sigterm on one process)
        self._previous = self._previous_term = self._launcher = None
        self._agreed = DelayedHostRead(delay=1)

    def _on_signal(self, signum, frame) -> None:
        self.received = True

    def _on_sigterm(self, signum, frame) -> None:
        self.terminated = True
        if self._launcher is not None:  # what Lightning's handler does: pass it to the processes it started
            self._launcher.kill(signum)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            self.received = self.terminated = False
            self._agreed = DelayedHostRead(delay=1)
            self._previous = signal.signal(self.signum, self._on_signal)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Under DDP, after Lightning registered its signal handlers: ours replace its SIGTERM handling."""
        if is_distributed() and threading.current_thread() is threading.main_thread():
            self._launcher = trainer.strategy.launcher
            trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = lambda: None
            self._previous_term = signal.signal(signal.SIGTERM, self._on_sigterm)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None
        if self._previous_term is not None:
            if signal.getsignal(signal.SIGTERM) == self._on_sigterm:
                signal.signal(signal.SIGTERM, self._previous_term)
            self._previous_term = None

    def flags(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[bool, bool] | None:
        """(preempted, terminated) to act on at the end of this step, the same on every rank; None: wait."""
        local = (self.received, self.terminated or trainer.received_sigterm)
        if not is_distributed():
            return local
        flags = torch.zeros(2, device=pl_module.device)  # filled on the device: no host-to-device copy
        for i, flag in enumerate(local):
            if flag:
                flags[i].fill_(1.0)
        read = self._agreed.push(all_reduce_no_grad(flags, "max"))
        return None if read is None else (bool(read[1][0]), bool(read[1][1]))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        agreed = self.flags(trainer, pl_module)
        if agreed is None or not any(agreed):
            return
        preempted, terminated = agreed
        checkpoints = [cb for cb in trainer.callbacks if isinstance(cb, LastCheckpoint)]
        if not checkpoints:
            rank_zero_warn("preemption signal received but no LastCheckpoint callback: nothing saved")
        path = checkpoints[0].save_now(trainer) if checkpoints else None
        job = slurm_job_id()
        if terminated:
            rank_zero_info(f"ssl-lightning: SIGTERM at step {trainer.global_step}; saved {path}; stopping without "
                           "requeue (resume with --ckpt_path last)")
            trainer.should_stop = True
            if self._previous_term is not None:  # our handler, not Lightning's: Lightning will not stop the fit
                raise SIGTERMException
            return
        rank_zero_info(f"ssl-lightning: preemption signal at step {trainer.global_step}; saved {path}")
        if self.requeue and job and trainer.is_global_zero:
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if result.returncode:
                rank_zero_warn(f"scontrol requeue {job} failed ({result.stderr.strip()}); resubmit the job by hand")
            else:
                rank_zero_info(f"ssl-lightning: requeued SLURM job {job}")
        trainer.should_stop = True
