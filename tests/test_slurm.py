"""SLURM support against a real local cluster (slurm/local_cluster.sh; .ci/run starts it).

- `ssl-lightning submit` of a tiny CPU fit with 2 tasks: the job completes, trains with DDP over gloo
  on 2 processes, and leaves its checkpoint and offline W&B run under runs/<job name>.
- Preemption: `scancel --signal=USR1 --batch` makes the running job save last.ckpt, requeue itself
  and, once restarted, resume from that step: it ends at exactly max_epochs x steps-per-epoch steps
  (an epoch restarted from scratch would add steps), in the same W&B run.
- Bad input is rejected before sbatch is called (these tests need no cluster).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import wandb

from helpers import offline_runs_of
from ssl_lightning import results
from ssl_lightning.cluster import shared_fs, submit as slurm
from ssl_lightning.callbacks.summary import read_summary
from ssl_lightning.wandb_offline import read_offline_run

ROOT = Path(__file__).resolve().parents[1]
TINY = """seed_everything: 0
trainer: {accelerator: cpu, max_epochs: EPOCHS, enable_progress_bar: false, enable_model_summary: false,
          log_every_n_steps: 1, limit_val_batches: 1}
model:
  class_path: ssl_lightning.methods.VICReg
  init_args: {backbone: convnet, backbone_kwargs: {width: 4}, projector: 32-32}
data: {dataset: synthetic, synthetic_size: 128, batch_size: 32, num_workers: 0, views: [{size: 16}, {size: 16}]}
spectrum: {every_n_epochs: 0}
knn: {every_n_epochs: 0}
"""
STEPS_PER_EPOCH = 4  # 128 / 32


def cluster_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    result = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    if result.returncode == 0 and result.stdout.strip():
        return True
    return subprocess.run([str(ROOT / "slurm" / "local_cluster.sh"), "start"]).returncode == 0


needs_cluster = pytest.mark.skipif("not cluster_up()", reason="no SLURM cluster: run slurm/local_cluster.sh start")


def tiny_config(tmp_path: Path, epochs: int) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.replace("EPOCHS", str(epochs)))
    return path


def submit(*args: str) -> str:
    """Submits from the repository root; the job inherits this environment, tests/ (helpers) included."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "ssl_lightning", "submit", *args], capture_output=True,
                            text=True, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()[-1]


def job_state(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    match = re.search(r"JobState=(\w+)", out)
    return match.group(1) if match else "UNKNOWN"


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise TimeoutError(f"waited {timeout} s for {what}")


def wait_done(job: str, log: Path, timeout: float = 400) -> None:
    wait_for(lambda: job_state(job) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout, f"job {job}")
    assert job_state(job) == "COMPLETED", log.read_text()[-3000:]


def wait_pending_then_release(job: str) -> None:
    """SLURM holds a requeued job for about 2 minutes (BeginTime); release it sooner, but not within the
    second of the requeue: slurmd's revocation of the old attempt's credential has one-second resolution,
    and a restart in the same second is refused ("Job credential revoked") and the job ends FAILED."""
    wait_for(lambda: job_state(job) == "PENDING", 120, "the job to be pending again")
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)


def finished_in_one_wandb_run(run_dir: Path, epochs: int) -> int:
    """Checks that a requeued fit finished all its steps with both of its parts in one W&B run id; returns
    the first step the second part logged."""
    summary = read_summary(run_dir)
    assert (summary["status"], summary["step"]) == ("finished", epochs * STEPS_PER_EPOCH)
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    runs = offline_runs_of(run_dir / "wandb", run_id)
    assert len(runs) == 2, "both parts log to the same W&B run"
    resumed = read_offline_run(runs[1])
    return min(row["trainer/global_step"] for row in resumed["history"] if "trainer/global_step" in row)


@pytest.mark.slurm
@pytest.mark.slow
@needs_cluster
def test_submit_two_task_ddp_fit_completes(tmp_path):
    job = submit("--config", str(tiny_config(tmp_path, 2)), "--gpus-per-node", "0", "--tasks-per-node", "2",
                 "--cpus-per-task", "1", "--time", "10", "--runs", str(tmp_path / "runs"), "--job-name", "ddp2")
    run_dir = tmp_path / "runs" / "ddp2"
    wait_done(job, run_dir / "slurm.out")
    log = (run_dir / "slurm.out").read_text()
    assert "MEMBER: 2/2" in log and "distributed_backend=gloo" in log
    assert f"finished at epoch 2, step {2 * STEPS_PER_EPOCH}, 2 process(es)" in log, \
        "the global batch of 32 is 16 + 16 on 2 ranks: still 4 steps per epoch"
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2 * STEPS_PER_EPOCH
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    (wandb_dir,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}")
    assert read_offline_run(wandb_dir)["complete"]


@pytest.mark.slurm
@pytest.mark.slow
@needs_cluster
def test_preempted_job_requeues_and_resumes_in_the_same_wandb_run(tmp_path):
    epochs = 12
    # submitted from a process with a live W&B service (a notebook; earlier tests in this session): its
    # WANDB_SERVICE reaches the job, and the resumed attempt must not register its run id there again
    wandb.init(mode="offline", dir=tmp_path).finish()
    assert "WANDB_SERVICE" in os.environ
    job = submit("--config", str(tiny_config(tmp_path, epochs)), "--gpus-per-node", "0", "--cpus-per-task", "1",
                 "--time", "10", "--runs", str(tmp_path / "runs"), "--job-name", "preempt")
    run_dir = tmp_path / "runs" / "preempt"
    ckpt, log_path = run_dir / "checkpoints" / "last.ckpt", run_dir / "slurm.out"
    wait_for(ckpt.is_file, 300, "the first epoch's checkpoint")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    wait_for(lambda: "requeued SLURM job" in log_path.read_text(), 120, "the requeue")
    wait_pending_then_release(job)
    assert read_summary(run_dir)["status"] == "preempted", "a requeued job waiting for its restart is 'preempted'"
    wait_done(job, log_path)

    log = log_path.read_text()
    assert "restart 1" in log, "SLURM restarted the same job"
    step = int(re.search(r"preemption signal at step (\d+)", log).group(1))
    assert 0 < step < epochs * STEPS_PER_EPOCH
    assert "Restored all states from the checkpoint" in log
    assert torch.load(ckpt, weights_only=False)["global_step"] == epochs * STEPS_PER_EPOCH, \
        "resumed at the interrupted step: no epoch repeated from scratch"
    first_step = finished_in_one_wandb_run(run_dir, epochs)
    assert first_step > step - 1, f"the resumed part starts after step {step}, not from scratch ({first_step})"


@pytest.mark.slurm
@pytest.mark.slow
@needs_cluster
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_a_dead_or_hung_rank_requeues_the_job_which_resumes_in_the_same_wandb_run(tmp_path, signum):
    """SIGKILL or SIGSTOP of rank 1 at step 7 of the first attempt (last.ckpt was written at step 4, the end
    of epoch 1): rank 0 stops (at once, or after collective_timeout_s 10), srun ends the step, `sweep
    finish` requeues the job, and the restart resumes at step 4 and ends at exactly 3 epochs x 4 steps, in
    the same W&B run."""
    epochs = 3
    kill = ('{"class_path": "helpers.SignalAtStep", "init_args": '
            f'{{"step": 7, "signum": {int(signum)}, "rank": 1, "restart": 0}}}}')
    job = submit("--config", str(tiny_config(tmp_path, epochs)), "--gpus-per-node", "0", "--tasks-per-node", "2",
                 "--cpus-per-task", "1", "--time", "10", "--runs", str(tmp_path / "runs"), "--job-name", "dead-rank",
                 "--max-failure-requeues", "1", "--", "--trainer.callbacks+", kill, "--collective_timeout_s", "10")
    run_dir = tmp_path / "runs" / "dead-rank"
    log_path = run_dir / "slurm.out"
    wait_for(lambda: log_path.is_file() and "after a failure" in log_path.read_text(), 300, "the failure requeue")
    wait_pending_then_release(job)
    assert read_summary(run_dir)["status"] == "requeued"
    wait_done(job, log_path)

    log = log_path.read_text()
    assert "restart 1" in log and "failure requeue 1 of 1" in log
    (requeue,) = json.loads((run_dir / "failure_requeues.json").read_text())
    assert requeue["exit_code"] > 128 or requeue["exit_code"] == 3, requeue
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == epochs * STEPS_PER_EPOCH
    first_step = finished_in_one_wandb_run(run_dir, epochs)
    assert first_step >= STEPS_PER_EPOCH, f"the restart continues from step 4, not from scratch ({first_step})"


@pytest.mark.slurm
@pytest.mark.slow
@needs_cluster
def test_grid_array_ends_with_a_complete_results_table_equal_to_local_runs(tmp_path, capsys):
    grid = ["--config", str(tiny_config(tmp_path, 2)), "--gpus-per-node", "0", "--cpus-per-task", "1",
            "--job-name", "abl", "--eval", "linear,knn",
            "--eval-train-samples", "64", "--eval-epochs", "2"]
    job = submit(*grid, "--grid", "model.init_args.var_weight=0,25", "--seeds", "0", "1", "--time", "10",
                 "--runs", str(tmp_path / "slurm"))
    root = tmp_path / "slurm" / "abl"
    queued = lambda: subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip()
    wait_for(lambda: not queued(), 400, f"every task of array {job}")
    names = [f"tiny-var_weight={w}-seed{s}" for w in (0, 25) for s in (0, 1)]
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == names
    # one of its tasks again on this machine (--local)
    local = subprocess.run([sys.executable, "-m", "ssl_lightning", "submit", *grid, "--local", "--grid",
                            "model.init_args.var_weight=25", "--seeds", "1", "--runs", str(tmp_path / "local")],
                           capture_output=True, text=True, cwd=ROOT)
    assert local.returncode == 0, local.stderr[-2000:]
    assert "[1/1] tiny-var_weight=25-seed1: finished" in local.stdout

    results.main([str(root)])
    table = capsys.readouterr().out
    for point in ("tiny var_weight=0 ", "tiny var_weight=25 "):
        row = next(line for line in table.splitlines() if point in line)
        assert "| 2 | 2 finished |" in row, table
    for name in names:
        summary = read_summary(root / name)
        assert summary["status"] == "finished" and summary["step"] == 2 * STEPS_PER_EPOCH, (name, summary)
        assert {"linear/top1", "linear/top5", "knn/top1_k20"} <= set(summary["eval"]), "evaluated after the fit"
        wandb_run = read_offline_run(next((root / name / "wandb").glob("offline-run-*")))
        assert wandb_run["complete"] and (wandb_run["name"], wandb_run["group"]) == (name, "abl")
    on_slurm, here = read_summary(root / names[3]), read_summary(tmp_path / "local" / "abl" / names[3])
    for key in ("train/loss", "probe/val_top1"):  # the same fit and evaluation as the SLURM task
        assert here["final"][key] == pytest.approx(on_slurm["final"][key], rel=1e-5, abs=1e-6), key
    for key in ("linear/top1", "knn/top1_k20"):
        assert here["eval"][key] == pytest.approx(on_slurm["eval"][key], abs=1e-6), key


# ---- bad input: rejected before sbatch (no cluster needed) -------------------------------------------
PARTITION = slurm.Partition("debug", nodes=2, cpus_per_node=16, gpus_per_node=4)


@pytest.mark.parametrize("args, message", [
    (["--gpus-per-node", "2", "--cpus-per-task", "2", "--nodes", "4"], "--nodes 4 exceeds the 2 node(s) of partition"),
    (["--gpus-per-node", "8", "--cpus-per-task", "2"], "--gpus-per-node 8 exceeds the 4 GPUs per node"),
    (["--gpus-per-node", "4", "--cpus-per-task", "8"], "32 CPUs per node exceeds the 16 CPUs per node"),
    (["--gpus-per-node", "3", "--cpus-per-task", "2"], "data.batch_size 256 in"),
    (["--gpus-per-node", "2", "--cpus-per-task", "2", "--", "--data.batch_size", "9"], "data.batch_size 9"),
    (["--gpus-per-node", "2", "--tasks-per-node", "1"], "must equal --gpus-per-node 2"),
    (["--gpus-per-node", "1", "--time", "2h"], "--time '2h' is not a SLURM time limit"),
    (["--gpus-per-node", "1", "--time", "1", "--signal-seconds", "90"], "--signal-seconds 90 is not shorter"),
    (["--nodes", "0"], "--nodes 0 must be at least 1"),
    (["--gpus-per-node", "1", "--max-failure-requeues", "-1"], "--max-failure-requeues -1 must be >= 0"),
    (["--gpus-per-node", "1", "--cpus-per-task", "2", "--nodes", "2", "--runs", "/tmp/ssl-runs"],
     "run directory /tmp/ssl-runs (tmpfs) is node-local on a cluster" if shared_fs.mount_type(Path("/tmp")) == "tmpfs"
     else "run directory /tmp/ssl-runs"),
])
def test_impossible_requests_are_rejected_before_sbatch(args, message, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(slurm, "query_partition", lambda name: PARTITION)
    monkeypatch.setattr(slurm, "SBATCH", str(tmp_path / "sbatch-must-not-run"))
    own = ["--config", str(ROOT / "experiments/fashion_mnist/vicreg.yaml"), "--time", "1:00:00"]
    with pytest.raises(SystemExit) as exit_info:
        slurm.main(own + args)  # a later --time in args wins
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_dry_run_prints_the_job_script(monkeypatch, capsys):
    monkeypatch.setattr(slurm, "query_partition", lambda name: PARTITION)
    monkeypatch.setattr(slurm, "SBATCH", "/nonexistent/sbatch")
    slurm.main(["--config", str(ROOT / "experiments/fashion_mnist/vicreg.yaml"),
                str(ROOT / "experiments/cifar10/vicreg.yaml"), "--seeds", "0", "1", "--gpus-per-node", "2",
                "--cpus-per-task", "4", "--time", "1-00:00:00", "--nodes", "2", "--runs", "/srv/ssl-runs", "--dry-run"])
    script = capsys.readouterr().out
    for line in ("#SBATCH --job-name=fashion_mnist-sweep", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=2",
                 "#SBATCH --gpus-per-node=2", "#SBATCH --array=0-3", "#SBATCH --signal=B:USR1@120",
                 "#SBATCH --requeue", "--trainer.num_nodes 2 --trainer.devices 2", "--trainer.strategy ddp",
                 "--ckpt_path last", "--seed_everything 1"):
        assert line in script, line
    assert "fashion_mnist-sweep/cifar10-vicreg-seed1" in script and "%a" in script, \
        "array tasks get their own run dir (two configs named vicreg.yaml: told apart by directory) and log"
    assert re.search(r"\$\{SLURM_JOB_ID\}", script) and "%j" not in script, "paths never depend on the job id"


@pytest.mark.parametrize("text, seconds", [("30", 1800), ("4:30", 270), ("1:00:00", 3600), ("2-0", 172800),
                                           ("1-2:3", 93780), ("1-00:00:01", 86401)])
def test_time_limits_in_every_slurm_format(text, seconds):
    assert slurm.time_limit_seconds(text) == seconds


def test_gres_gpu_counts():
    assert slurm.parse_gres_gpus("gpu:4") == 4
    assert slurm.parse_gres_gpus("gpu:h100:8(S:0-1)") == 8
    assert slurm.parse_gres_gpus("(null)") == 0


MOUNTS = """/dev/vda / ext4 rw 0 0
tmpfs /dev/shm tmpfs rw 0 0
nfs.example:/home /home nfs4 rw 0 0
scratch@o2ib:/lustre /scratch lustre rw 0 0
"""


@pytest.mark.parametrize("path, nodes, verdict", [
    ("/home/me/runs", 2, None), ("/scratch/runs", 4, None),          # network file systems: fine
    ("/work/runs", 2, "note: run directory /work/runs is on a ext4 file system"),  # local disk: exported?
    ("/tmp/runs", 2, "ValueError"), ("/dev/shm/runs", 2, "ValueError"),  # node-local on every cluster
    ("/tmp/runs", 1, None),                                          # one node: anything goes
])
def test_multi_node_run_directory_must_be_shared(path, nodes, verdict):
    if verdict == "ValueError":
        with pytest.raises(ValueError, match="is node-local on a cluster.*--runs DIR on a file system every node"):
            shared_fs.check_run_dir(Path(path), nodes, MOUNTS)
    else:
        note = shared_fs.check_run_dir(Path(path), nodes, MOUNTS)
        assert (note is None) if verdict is None else note.startswith(verdict), note
