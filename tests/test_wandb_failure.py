"""W&B failing mid-run never stops training: its service killed (a subprocess fit) or a write refused
(PermissionError/ENOSPC, in process) gives one warning, training goes on, and the calls that could not be
logged are reported at the end of the fit."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import TINY_CLI_ARGS
from ssl_lightning.checkpointing import load_checkpoint
from ssl_lightning.wandb_run import WandbLogger, finish_wandb_run

REPO = Path(__file__).resolve().parents[1]


def test_a_refused_write_is_counted_not_raised(tmp_path, capsys):
    logger = WandbLogger(project="t", save_dir=str(tmp_path), offline=True)
    logger.log_metrics({"a": 1.0}, step=0)
    real_log = logger.experiment.log

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "wandb"))

    logger.experiment.log = refuse
    with pytest.warns(RuntimeWarning, match="W&B stopped accepting data at step 1"):
        logger.log_metrics({"a": 2.0, "b": 3.0}, step=1)
    logger.log_metrics({"c": 4.0}, step=2)  # no second warning, and no call to W&B any more
    logger.experiment.log = real_log
    finish_wandb_run(logger)
    report = capsys.readouterr().out.strip().splitlines()[-1]
    assert report == ("W&B: 2 logging call(s) from step 1 on were not logged (PermissionError: [Errno 13] "
                      f"Permission denied: '{tmp_path / 'wandb'}'); keys: a, b, c")


@pytest.mark.slow
def test_fit_survives_its_wandb_service_being_killed(tmp_path):
    callback = '{"class_path": "helpers.KillWandbServiceAtStep", "init_args": {"step": 2}}'
    out = subprocess.run([sys.executable, "-m", "ssl_lightning", "fit", "--config",
                          str(REPO / "experiments/fashion_mnist/vicreg.yaml"), *TINY_CLI_ARGS,
                          "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(tmp_path),
                          "--trainer.callbacks+", callback],
                         capture_output=True, text=True, timeout=300, cwd=REPO,
                         env={**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"},  # its own service,
                              "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"})  # not one of this test process
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("W&B stopped accepting data at step 2") == 1 and "Traceback" not in out.stderr
    assert "finished at epoch 2, step 8" in out.stdout
    report = out.stdout.strip().splitlines()[-1]
    assert report.startswith("W&B: ") and "from step 2 on were not logged" in report and "train/loss" in report
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 8
