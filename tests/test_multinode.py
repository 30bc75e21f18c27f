"""Two-node jobs on the local cluster's partition ``multi`` (slurm/local_cluster.sh start --nodes 2): nodes
sslnode1 and sslnode2 are separate hosts (network namespaces with their own address and hostname), so
the node rank, MASTER_ADDR from the node list and the rendezvous across hosts are the real ones; the run
directory is on the one shared file system (hence --allow-node-local-runs for pytest's /tmp).

- A grid sweep runs as an array of 2-node tasks; each task's weights after 8 steps equal a 1-process fit
  on the global batch (VICReg: statistics of the global batch).
- BYOL (EMA teacher) preempted with ``scancel --signal=USR1 --batch``: the job requeues, resumes and ends
  bit-identical to an uninterrupted 2-node job, in one W&B run, and within tolerance of 1 process.
- Rank 1, on sslnode2, killed: the job requeues itself and finishes.
Views are deterministic (whole image, no flip/colour), so 2 processes and 1 see the same global batch.
"""
from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_slurm import (ROOT, STEPS_PER_EPOCH, finished_in_one_wandb_run, submit, wait_done, wait_for,
                        wait_pending_then_release)

CONFIG = """seed_everything: 0
trainer: {accelerator: cpu, max_epochs: EPOCHS, enable_progress_bar: false, enable_model_summary: false,
          log_every_n_steps: 1, limit_val_batches: 1}
model:
  class_path: ssl_lightning.methods.METHOD
  init_args: {backbone: convnet, backbone_kwargs: {width: 4}, projector: 32-32, HEADS}
data:
  dataset: synthetic
  synthetic_size: 128
  batch_size: 32
  num_workers: 0
  views:
    - {size: 16, scale: [1.0, 1.0], ratio: [1.0, 1.0], hflip_p: 0.0, jitter_p: 0.0, grayscale_p: 0.0}
    - {size: 16, scale: [1.0, 1.0], ratio: [1.0, 1.0], hflip_p: 0.0, jitter_p: 0.0, grayscale_p: 0.0}
spectrum: {every_n_epochs: 0}
knn: {every_n_epochs: 0}
"""
HEADS = {"VICReg": "sync_bn: true", "BYOL": "predictor: 64-32, sync_bn: true"}
TWO_NODES = ["--nodes", "2", "--gpus-per-node", "0", "--cpus-per-task", "1", "--partition", "multi",
             "--time", "10", "--allow-node-local-runs"]
LAYOUT = re.compile(r"rank (\d) of 2 on node (\d) of 2 \((\S+)\), local rank 0; global batch 32 = "
                    r"2 node\(s\) x 1 device\(s\) x 16 per device; peak lr (\S+)")


def two_nodes_up() -> bool:
    result = subprocess.run(["sinfo", "-h", "-p", "multi", "-o", "%D"], capture_output=True, text=True) \
        if subprocess.run(["which", "sinfo"], capture_output=True).returncode == 0 else None
    if result is not None and result.stdout.strip() == "2":
        return True
    return subprocess.run([str(ROOT / "slurm" / "local_cluster.sh"), "start", "--nodes", "2"]).returncode == 0


pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.distributed,
              pytest.mark.skipif("not two_nodes_up()", reason="no 2-node cluster: slurm/local_cluster.sh start --nodes 2")]


def config(tmp_path: Path, method: str, epochs: int) -> Path:
    path = tmp_path / f"{method.lower()}.yaml"
    path.write_text(CONFIG.replace("METHOD", method).replace("EPOCHS", str(epochs)).replace("HEADS", HEADS[method]))
    return path


def one_process_fit(config_path: Path, out: Path, *extra: str) -> tuple[dict, float]:
    """(weights, peak lr) of the same fit in 1 process on the global batch."""
    result = subprocess.run([sys.executable, "-m", "ssl_lightning", "fit", "--config", str(config_path),
                             "--trainer.default_root_dir", str(out), "--trainer.logger", "false", *extra],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    peak = float(re.search(r"rank 0 of 1 on node 0 of 1 .* peak lr (\S+)", result.stderr).group(1))
    return torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"], peak


def assert_layout(log: str, peak_lr: float) -> None:
    """Both ranks reported: rank 0 on node 0 (sslnode1), rank 1 on node 1 (sslnode2), world size 2, the
    global batch split 2 x 1 x 16, and the peak lr of the 1-process fit (it follows the global batch)."""
    found = {(int(r), int(n), host, float(lr)) for r, n, host, lr in LAYOUT.findall(log)}
    assert {(0, 0, "sslnode1", peak_lr), (1, 1, "sslnode2", peak_lr)} <= found, found


def assert_same_weights(a: dict, b: dict, *, exact: bool = False) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if exact:
            assert torch.equal(a[name], b[name]), name
        elif a[name].is_floating_point():
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_grid_sweep_of_two_node_tasks_equals_one_process(tmp_path):
    path = config(tmp_path, "VICReg", 2)
    job = submit("--config", str(path), "--grid", "model.init_args.var_weight=25,15", "--max-array", "2", *TWO_NODES,
                 "--runs", str(tmp_path / "runs"), "--job-name", "mn-sweep")
    root = tmp_path / "runs" / "mn-sweep"
    queued = lambda: subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip()
    wait_for(lambda: not queued(), 400, f"both tasks of array {job}")
    for task, weight in enumerate((25, 15)):
        log = (root / f"slurm-{task}.out").read_text()
        assert "on sslnode[1-2]" in log and "MEMBER: 2/2" in log, log[-3000:]
        assert f"finished at epoch 2, step {2 * STEPS_PER_EPOCH}, 2 process(es)" in log, log[-3000:]
        reference, peak_lr = one_process_fit(path, tmp_path / f"one-{weight}", "--model.init_args.var_weight",
                                             str(weight))
        assert_layout(log, peak_lr)
        ckpt = root / f"vicreg-var_weight={weight}" / "checkpoints" / "last.ckpt"
        assert_same_weights(torch.load(ckpt, weights_only=True)["state_dict"], reference)


def test_preempted_two_node_byol_resumes_bit_identically(tmp_path):
    epochs = 6
    path = config(tmp_path, "BYOL", epochs)
    common = ["--config", str(path), *TWO_NODES, "--runs", str(tmp_path / "runs")]
    straight = submit(*common, "--job-name", "mn-straight")
    wait_done(straight, tmp_path / "runs" / "mn-straight" / "slurm.out")
    job = submit(*common, "--job-name", "mn-preempt")
    run_dir = tmp_path / "runs" / "mn-preempt"
    log_path = run_dir / "slurm.out"
    wait_for((run_dir / "checkpoints" / "last.ckpt").is_file, 300, "the first epoch's checkpoint")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    wait_for(lambda: "requeued SLURM job" in log_path.read_text(), 120, "the requeue")
    wait_pending_then_release(job)
    wait_done(job, log_path)

    log = log_path.read_text()
    step = int(re.search(r"preemption signal at step (\d+)", log).group(1))
    assert 0 < step < epochs * STEPS_PER_EPOCH and "restart 1" in log
    first_step = finished_in_one_wandb_run(run_dir, epochs)
    assert first_step > step - 1, "the resumed part continues after the preempted step"
    resumed = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    uninterrupted = torch.load(tmp_path / "runs" / "mn-straight" / "checkpoints" / "last.ckpt",
                               weights_only=True)["state_dict"]
    assert_same_weights(resumed, uninterrupted, exact=True)
    reference, peak_lr = one_process_fit(path, tmp_path / "one")
    assert_layout(log, peak_lr)
    assert_same_weights(uninterrupted, reference)  # teacher (EMA) weights included


def test_rank_killed_on_the_second_node_requeues_the_job(tmp_path):
    epochs = 3
    kill = ('{"class_path": "helpers.SignalAtStep", "init_args": '
            f'{{"step": 7, "signum": {int(signal.SIGKILL)}, "rank": 1, "restart": 0}}}}')
    job = submit("--config", str(config(tmp_path, "VICReg", epochs)), *TWO_NODES, "--runs", str(tmp_path / "runs"),
                 "--job-name", "mn-kill", "--max-failure-requeues", "1", "--", "--trainer.callbacks+", kill)
    run_dir = tmp_path / "runs" / "mn-kill"
    log_path = run_dir / "slurm.out"
    wait_for(lambda: log_path.is_file() and "after a failure" in log_path.read_text(), 300, "the failure requeue")
    wait_pending_then_release(job)
    wait_done(job, log_path)
    log = log_path.read_text()
    assert "restart 1" in log and "failure requeue 1 of 1" in log
    assert re.search(r"rank 1 of 2 on node 1 of 2 \(sslnode2\)", log), "the killed rank ran on the second host"
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == epochs * STEPS_PER_EPOCH
    assert finished_in_one_wandb_run(run_dir, epochs) >= STEPS_PER_EPOCH, "resumed from step 4, not from scratch"
