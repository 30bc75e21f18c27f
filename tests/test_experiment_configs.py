"""Every shipped experiment config is valid, and every Fashion-MNIST config trains via the CLI.

A typo in a YAML (an unknown key, a removed option, a wrong type) must fail here, not on a cluster:
every experiments/<dataset>/<method>.yaml goes through the full argument parser (--print_config
validates every key against the classes' signatures without building the model). The CPU-sized
Fashion-MNIST configs each train 3 optimizer steps on the real data (batch 128, monitors off)
and must produce a finite loss.
"""
import math
from pathlib import Path

import pytest

from ssl_lightning.cli import SSLCLI

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "experiments").glob("*/*.yaml"))
FASHION = sorted((ROOT / "experiments" / "fashion_mnist").glob("*.yaml"))
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        SSLCLI(args=["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist")
@pytest.mark.parametrize("config", FASHION, ids=lambda p: p.stem)
def test_fashion_mnist_config_trains(config, tmp_path):
    cli = SSLCLI(args=[
        "fit", "--config", str(config), "--trainer.default_root_dir", str(tmp_path),
        "--data.batch_size", "128", "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1",
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--spectrum.every_n_epochs", "0", "--knn.every_n_epochs", "0"])
    assert cli.trainer.global_step == 3
    loss = float(cli.trainer.callback_metrics["train/loss"])
    assert math.isfinite(loss), f"{config.name}: loss {loss}"
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
