"""Monitoring callbacks: the same numbers on 2 DDP ranks as on 1, and the collapse alarm."""
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import TINY_CLI_ARGS, tiny_data, tiny_trainer, tiny_vicreg
from ssl_lightning.callbacks import KNNMonitor, SpectrumMonitor
from ssl_lightning.wandb_offline import read_offline_run

ROOT = Path(__file__).resolve().parents[1]


def cli(subcommand, *args):
    command = [sys.executable, "-m", "ssl_lightning", subcommand, "--config",
               "experiments/fashion_mnist/vicreg.yaml", *TINY_CLI_ARGS, *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def logged(root: Path) -> dict:
    (run,) = (root / "wandb").glob("offline-run-*")
    return read_offline_run(run)["summary"]


@pytest.mark.distributed
@pytest.mark.slow
def test_two_ranks_log_the_same_monitoring_values_as_one(tmp_path):
    """Validate one checkpoint with 1 process and with 2 DDP processes: every rank/ spectrum/ knn/ value
    agrees to rel. 1e-4 (same 128 fixed samples, gathered; only the summation order differs)."""
    cli("fit", "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path / "train"))
    ckpt = str(tmp_path / "train" / "checkpoints" / "last.ckpt")
    cli("validate", "--ckpt_path", ckpt, "--trainer.default_root_dir", str(tmp_path / "one"))
    cli("validate", "--ckpt_path", ckpt, "--trainer.default_root_dir", str(tmp_path / "two"),
        "--trainer.devices", "2", "--trainer.strategy", "ddp")
    one, two = logged(tmp_path / "one"), logged(tmp_path / "two")
    keys = [k for k in one if k.split("/")[0] in ("rank", "knn") or k.endswith(("top_eigenvalue", "near_zero"))]
    assert {"knn/top1", "rank/backbone_rankme", "rank/projector_effective_rank"} <= set(keys)
    for key in keys:
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key


def test_collapse_alarm_warns_and_stops(tmp_path):
    """An untrained tiny model has RankMe far below 1000: the alarm fires and, if asked, stops the run."""
    data = tiny_data()
    monitor = SpectrumMonitor(min_rankme=1000.0, stop_on_collapse=True)
    trainer = tiny_trainer(tmp_path, max_epochs=3, callbacks=[monitor])
    with pytest.warns(UserWarning, match=r"collapse alarm at epoch 0: backbone RankMe .* < min_rankme 1000"):
        trainer.fit(tiny_vicreg(data), data)
    assert trainer.current_epoch == 1 and trainer.callback_metrics["collapse/alarm"] == 1.0


def test_knn_monitor_respects_its_interval(tmp_path):
    data = tiny_data()
    trainer = tiny_trainer(tmp_path, max_epochs=2, callbacks=[KNNMonitor(every_n_epochs=2)])
    trainer.fit(tiny_vicreg(data), data)
    assert 0.0 <= trainer.callback_metrics["knn/top1"] <= 1.0
    trainer = tiny_trainer(tmp_path / "off", max_epochs=1, callbacks=[KNNMonitor(every_n_epochs=0)])
    trainer.fit(tiny_vicreg(data), data)
    assert "knn/top1" not in trainer.callback_metrics
