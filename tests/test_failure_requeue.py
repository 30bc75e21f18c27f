"""The job script's `sweep finish` after a failed fit: it requeues the SLURM task when a rank died or
hung (srun's status 3 or > 128, and no rank recorded an error of its own), at most
--max-failure-requeues times and only when a new checkpoint was written since the previous requeue;
any other failure is marked failed with the rank's error. scontrol is a fake here that records its
arguments; tests/test_slurm.py runs the real thing on the local cluster."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from pytorch_lightning.utilities import rank_zero_only

from ssl_lightning.cluster import sweep
from ssl_lightning.callbacks.summary import read_summary, write_json
from ssl_lightning.cluster.failure_requeue import RECORD_FILE, TASK_DIR_VARIABLE, curable, record_fit_error


@pytest.fixture
def slurm_task(tmp_path, monkeypatch):
    """A run directory inside a fake SLURM task (job 77) whose `scontrol` writes its arguments to a file."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol-calls.txt"
    bin_dir.mkdir()
    fake = bin_dir / "scontrol"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexit ${{FAKE_SCONTROL_STATUS:-0}}\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    for name in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    write_json(run_dir / "summary.json", {"status": "running", "step": 6})
    return run_dir, calls


def save_checkpoint(run_dir: Path, step: int) -> None:
    """What a checkpoint save leaves for finish to see: a new size-and-sha256 record."""
    (run_dir / "checkpoints" / "last.ckpt.sha256.json").write_text(json.dumps({"sha256": f"{step:064x}"}))


def test_which_exit_statuses_a_restart_cures():
    assert curable(3) and curable(137) and curable(143), "a lost peer, SIGKILL, SIGTERM from srun's kill-on-bad-exit"
    assert not any(curable(code) for code in (1, 2, 128))


def test_a_dead_rank_requeues_the_task_until_the_budget_is_spent(slurm_task, capsys):
    run_dir, calls = slurm_task
    save_checkpoint(run_dir, 6)
    summary = sweep.finish(run_dir, 143, max_failure_requeues=2)
    assert summary["status"] == "requeued" and "failure requeue 1 of 2" in summary["error"]
    assert calls.read_text().splitlines() == ["requeue 77"]
    assert read_summary(run_dir)["status"] == "requeued", "the results table shows it as waiting to restart"

    save_checkpoint(run_dir, 10)  # the restart made progress, then lost a peer
    assert sweep.finish(run_dir, 3, max_failure_requeues=2)["status"] == "requeued"
    save_checkpoint(run_dir, 14)
    summary = sweep.finish(run_dir, 137, max_failure_requeues=2)
    assert summary["status"] == "failed", "the third failure exceeds --max-failure-requeues 2"
    assert len(calls.read_text().splitlines()) == 2
    assert "already requeued 2 time(s) after failures (--max-failure-requeues 2)" in capsys.readouterr().out
    assert [r["exit_code"] for r in json.loads((run_dir / RECORD_FILE).read_text())] == [143, 3]


def test_no_requeue_when_the_restart_wrote_no_new_checkpoint(slurm_task, capsys):
    run_dir, calls = slurm_task
    save_checkpoint(run_dir, 6)
    assert sweep.finish(run_dir, 137, max_failure_requeues=5)["status"] == "requeued"
    summary = sweep.finish(run_dir, 137, max_failure_requeues=5)  # died again before its next save
    assert summary["status"] == "failed" and len(calls.read_text().splitlines()) == 1
    assert "again before any new checkpoint was written" in capsys.readouterr().out


def test_a_rank_that_failed_by_itself_is_not_requeued_and_its_error_is_kept(slurm_task, monkeypatch):
    run_dir, calls = slurm_task
    save_checkpoint(run_dir, 6)
    monkeypatch.setenv(TASK_DIR_VARIABLE, str(run_dir))
    monkeypatch.setattr(rank_zero_only, "rank", 1)  # what the strategy sets on the second process
    record_fit_error(ValueError("optimizer.lr -1 must be > 0\nmore detail"), exit_code=2)
    summary = sweep.finish(run_dir, 143, max_failure_requeues=2)  # srun's status after it SIGTERMed rank 0
    assert summary["status"] == "failed" and not calls.exists()
    assert summary["error"] == "rank 1: ValueError: optimizer.lr -1 must be > 0; see the task's log"


@pytest.mark.parametrize("exit_code", [1, 2])
def test_errors_of_the_fit_itself_are_not_requeued(slurm_task, exit_code):
    run_dir, calls = slurm_task
    summary = sweep.finish(run_dir, exit_code, max_failure_requeues=2)
    assert summary["status"] == "failed" and not calls.exists()


def test_a_preempted_task_is_left_to_its_own_requeue(slurm_task):
    run_dir, calls = slurm_task
    write_json(run_dir / "summary.json", {"status": "preempted", "step": 6})
    assert sweep.finish(run_dir, 143, max_failure_requeues=2)["status"] == "preempted" and not calls.exists()


def test_a_failed_scontrol_marks_the_run_failed_and_spends_nothing(slurm_task, monkeypatch, capsys):
    run_dir, _ = slurm_task
    monkeypatch.setenv("FAKE_SCONTROL_STATUS", "1")
    assert sweep.finish(run_dir, 137, max_failure_requeues=2)["status"] == "failed"
    assert "scontrol requeue 77 failed" in capsys.readouterr().out
    assert json.loads((run_dir / RECORD_FILE).read_text()) == []


def test_outside_slurm_or_with_requeues_off_nothing_is_requeued(slurm_task, monkeypatch):
    run_dir, calls = slurm_task
    assert sweep.finish(run_dir, 137, max_failure_requeues=0)["status"] == "failed"
    monkeypatch.delenv("SLURM_JOB_ID")
    assert sweep.finish(run_dir, 137, max_failure_requeues=2)["status"] == "failed"
    assert not calls.exists()
