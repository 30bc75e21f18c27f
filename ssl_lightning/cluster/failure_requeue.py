"""A SLURM task whose fit died of a failure that a restart can cure requeues itself.

The job script (slurm/job.sbatch) ends every task with ``python -m ssl_lightning.cluster.sweep finish``; when
the fit's step (srun) exited with

- status 3: a rank lost another process of the distributed run (ssl_lightning.cli: a peer killed,
  out of memory, on a lost node, or hung past ``collective_timeout_s``), or
- a status above 128: a process of the step was killed by a signal (the kernel's OOM killer, SIGBUS
  on a failing node, a SIGKILL; srun --kill-on-bad-exit also ends the other ranks with SIGTERM,
  so one dead rank makes the step's status 143 whatever that rank's own status was),

and no rank recorded an error of its own, ``finish`` runs ``scontrol requeue`` on the task. SLURM
restarts it under the same name, so it resumes from the newest checkpoint that verifies (``--ckpt_path
last``) in the same W&B run. A rank that fails for a reason a restart would meet again (a bad value,
exit 2; a Python error, exit 1) writes ``fit_error-rank<R>.json`` into ``$SSL_LIGHTNING_TASK_DIR``
(``record_fit_error``, from ssl_lightning.cli), which the job script sets to the task's run directory:
such a task is not requeued, and its summary names the error.

Two limits keep a failure that recurs from burning the allocation: at most ``max_requeues`` failure
requeues per run directory (``submit --max-failure-requeues``, default 2), and none when no newer
checkpoint was written since the previous failure requeue (the run made no progress between them).
Each requeue is recorded in ``<run dir>/failure_requeues.json``.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from pytorch_lightning.utilities import rank_zero_only

from ssl_lightning.callbacks.preemption import slurm_job_id
from ssl_lightning.callbacks.summary import read_json, write_json
from ssl_lightning.checkpointing import CHECKPOINT_DIR, RECORD_SUFFIX
from ssl_lightning.console import first_line

RECORD_FILE = "failure_requeues.json"
PEER_LOST_EXIT = 3  # ssl_lightning.cli: this rank lost another process of the run
TASK_DIR_VARIABLE = "SSL_LIGHTNING_TASK_DIR"
ERROR_FILES = "fit_error-rank*.json"


def record_fit_error(err: BaseException, exit_code: int) -> None:
    """Called by a rank whose fit fails by itself (not by losing a peer): leaves the reason where the job
    script's ``finish`` looks for it. Does nothing outside a job script (no $SSL_LIGHTNING_TASK_DIR)."""
    directory = os.environ.get(TASK_DIR_VARIABLE)
    if not directory:
        return
    rank = rank_zero_only.rank  # the strategy's global rank; before its setup, the launcher's environment
    with contextlib.suppress(OSError):  # a full disk must not hide the error itself
        write_json(Path(directory) / f"fit_error-rank{rank}.json",
                   {"rank": rank, "exit_code": exit_code, "error": f"{type(err).__name__}: {first_line(err)}"})


def fit_errors(run_dir: Path) -> list[dict]:
    """The errors ranks recorded in this attempt (the job script clears them before each attempt)."""
    return [json.loads(p.read_text()) for p in sorted(run_dir.glob(ERROR_FILES))]


def curable(exit_code: int) -> str | None:
    """Why a restart can cure a fit that exited with ``exit_code``; None when it cannot."""
    if exit_code == PEER_LOST_EXIT:
        return "a rank lost another process of the distributed run"
    if exit_code == 128 + signal.SIGTERM:
        return "a rank died or lost a peer, and srun ended the step's other processes (SIGTERM)"
    if exit_code > 128:
        number = exit_code - 128
        name = signal.Signals(number).name if number in signal.valid_signals() else f"signal {number}"
        return f"a process of the step was killed by {name}"
    return None


def newest_checkpoint_record(run_dir: Path) -> str | None:
    """The size-and-sha256 record of the newest checkpoint in ``<run_dir>/checkpoints`` (None: no
    checkpoint yet). It changes exactly when a new checkpoint is written, without reading the checkpoint
    itself. A fit whose checkpoint.dirpath lies elsewhere shows no progress here: it gets one failure
    requeue at most."""
    records = sorted((run_dir / CHECKPOINT_DIR).glob(f"*.ckpt{RECORD_SUFFIX}"), key=lambda p: p.stat().st_mtime_ns)
    return records[-1].read_text() if records else None


def past_requeues(run_dir: Path) -> list[dict]:
    return read_json(run_dir / RECORD_FILE) or []


def refusal(run_dir: Path, exit_code: int, max_requeues: int, job: str | None, past: list[dict],
            checkpoint: str | None) -> str | None:
    """Why the task is not requeued (None: requeue it), given its ``past`` failure requeues and the record
    of its newest ``checkpoint``."""
    reason = curable(exit_code)
    if reason is None:
        return f"exit status {exit_code} is not a failure a restart cures (only 3 and > 128 are)"
    errors = fit_errors(run_dir)
    if errors:
        return f"rank {errors[0]['rank']} failed by itself ({errors[0]['error']}): a restart would meet it again"
    if job is None:
        return "not inside a SLURM job"
    if len(past) >= max_requeues:
        return (f"{reason} (exit status {exit_code}), but the run was already requeued {len(past)} time(s) "
                f"after failures (--max-failure-requeues {max_requeues})")
    if past and past[-1]["checkpoint"] == checkpoint:
        return (f"{reason} (exit status {exit_code}) again before any new checkpoint was written since the "
                "previous failure requeue: a restart would repeat it")
    return None


def requeue_after_failure(run_dir: Path, exit_code: int, max_requeues: int) -> tuple[bool, str]:
    """Requeues this SLURM task when its fit's failure is curable and the limits allow. Returns whether
    it did and the line for the job's log that says what happened and why."""
    run_dir = Path(run_dir)
    job, past, checkpoint = slurm_job_id(), past_requeues(run_dir), newest_checkpoint_record(run_dir)
    refused = refusal(run_dir, exit_code, max_requeues, job, past, checkpoint)
    if refused is not None:
        return False, f"ssl-lightning: not requeued: {refused}"
    entry = {"job": job, "exit_code": exit_code, "reason": curable(exit_code), "time": time.time(),
             "checkpoint": checkpoint}
    write_json(run_dir / RECORD_FILE, [*past, entry])
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode != 0:
        write_json(run_dir / RECORD_FILE, past)
        return False, f"ssl-lightning: scontrol requeue {job} failed ({result.stderr.strip()}); resubmit the job"
    return True, (f"ssl-lightning: requeued SLURM job {job} after a failure: {curable(exit_code)} (exit status "
                  f"{exit_code}); failure requeue {len(past) + 1} of {max_requeues}, resuming from the newest "
                  "valid checkpoint")
