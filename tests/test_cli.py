"""The command line: fit from YAML, overrides, resolved config, W&B offline run, bad input."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import TINY_CLI_ARGS, offline_runs_of
from ssl_lightning.cli import main
from ssl_lightning.wandb_offline import read_offline_run

ROOT = Path(__file__).resolve().parents[1]


def fit(tmp_path, *extra):
    main(["fit", "--config", str(ROOT / "experiments/fashion_mnist/vicreg.yaml"), *TINY_CLI_ARGS,
          "--trainer.default_root_dir", str(tmp_path), *extra])


@pytest.mark.slow
def test_fit_writes_checkpoint_config_and_wandb_run(tmp_path, capsys):
    fit(tmp_path)
    out = capsys.readouterr().out
    assert "probe/val_top1" in out and "last checkpoint" in out
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    run_dirs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(run_dirs) == 1, "one offline W&B run under the run directory, named by the stored id"
    run = read_offline_run(run_dirs[0])
    assert run["complete"], "the run file ends with its exit record"
    assert 0.0 <= run["summary"]["probe/val_top1"] <= 1.0
    assert {"train/loss", "train/invariance", "train/variance", "train/covariance"} <= set(run["summary"])
    assert run["config"]["config"]["data"]["dataset"] == "synthetic", "the resolved config is logged"
    assert run["config"]["sim_weight"] == 25.0, "model hyperparameters are logged"
    summary = run["summary"]
    for features in ("backbone", "projector"):
        assert 1.0 <= summary[f"rank/{features}_rankme"] <= 32, "RankMe lies between 1 and the dimension"
        assert summary[f"spectrum/{features}_top_eigenvalue"] > 0
    assert 0.0 <= summary["knn/top1"] <= 1.0 and summary["collapse/alarm"] == 0
    assert summary["spectrum/plot/_type"] == "images/separated"
    assert summary["spectrum/values/_type"] == "table-file" and summary["spectrum/values/ncols"] == 4
    spectrum = torch.load(tmp_path / "spectra" / "epoch_0000.pt")
    assert spectrum["backbone"].shape == (16,) and bool((spectrum["backbone"].diff() <= 0).all())

    # offline evaluation logs into the same W&B run; synthetic classes are separable, chance is 0.1
    ckpt = str(tmp_path / "checkpoints" / "last.ckpt")
    def eval_run(command):
        (run,) = [r for r in map(read_offline_run, (tmp_path / "wandb").glob("offline-run-*"))
                  if r["config"].get("command") == command]
        assert run["config"]["pretrain_run_id"] == run_id, "grouped with the pre-training run"
        return run["summary"]

    linear_out = run_cli("linear", "--ckpt", ckpt, "--epochs", "200")
    linear = eval_run("linear")
    assert linear["eval/linear/top1"] > 0.5 and linear["eval/linear/top5"] >= linear["eval/linear/top1"]
    knn_out = run_cli("knn", "--ckpt", ckpt, "--ks", "5", "20")
    assert eval_run("knn")["eval/knn/top1_k20"] > 0.5
    assert "linear/top1" in linear_out.stdout and "knn/top1_k20" in knn_out.stdout


@pytest.mark.slow
def test_other_lightning_loggers_are_selectable(tmp_path):
    fit(tmp_path, "--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", str(tmp_path / "csv"))
    metrics = next((tmp_path / "csv").rglob("metrics.csv")).read_text()
    assert "probe/val_top1" in metrics.splitlines()[0]
    assert not (tmp_path / "wandb").exists()


@pytest.mark.slow
def test_resume_continues_the_same_wandb_run(tmp_path):
    fit(tmp_path)
    first_id = (tmp_path / "wandb_run_id").read_text().strip()
    fit(tmp_path, "--trainer.max_epochs", "2", "--ckpt_path", "last")
    assert (tmp_path / "wandb_run_id").read_text().strip() == first_id
    runs = offline_runs_of(tmp_path / "wandb", first_id)
    assert len(runs) == 2
    assert read_offline_run(runs[-1])["summary"]["epoch"] == 1

    main(["validate", "--config", str(ROOT / "experiments/fashion_mnist/vicreg.yaml"), *TINY_CLI_ARGS,
          "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", "last"])
    runs = offline_runs_of(tmp_path / "wandb", first_id)
    assert len(runs) == 3 and "probe/val_top1" in read_offline_run(runs[-1])["summary"]


def test_print_config_shows_resolved_values(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "experiments/fashion_mnist/vicreg.yaml"),
              "--model.init_args.sim_weight", "10", "--print_config"])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["class_path"] == "ssl_lightning.methods.VICReg"
    assert config["model"]["init_args"]["sim_weight"] == 10.0
    assert config["data"]["batch_size"] == 256 and config["checkpoint"]["every_n_train_steps"] > 0


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ssl_lightning", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_unknown_method_lists_choices():
    result = run_cli("fit", "--model", "simclrr")
    assert result.returncode != 0
    assert "unknown method 'simclrr'" in result.stderr and "vicreg" in result.stderr


def test_method_registry_name_is_accepted(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--model", "vicreg", "--print_config"])
    assert "class_path: ssl_lightning.methods.vicreg.VICReg" in capsys.readouterr().out


def test_unknown_key_is_rejected():
    result = run_cli("fit", "--config", "experiments/fashion_mnist/vicreg.yaml", "--model.init_args.sim_wieght", "3")
    assert result.returncode != 0 and "sim_wieght" in result.stderr


def test_unknown_backbone_lists_choices():
    result = run_cli("fit", "--config", "experiments/fashion_mnist/vicreg.yaml",
                     "--model.init_args.backbone", "resnet19", "--trainer.max_epochs", "0")
    assert result.returncode != 0
    assert "unknown backbone 'resnet19'" in result.stderr and "resnet18" in result.stderr


def test_unknown_method_in_yaml_lists_choices(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  class_path: vicregg\n")
    result = run_cli("fit", "--config", str(config))
    assert result.returncode != 0 and "registered methods:" in result.stderr and "vicreg (VICReg)" in result.stderr


@pytest.mark.distributed
@pytest.mark.slow
def test_two_process_ddp_fit_from_the_cli(tmp_path):
    """Lightning DDP on 2 CPU processes (gloo): the global batch of 32 is split 16 + 16, so an epoch of
    128 samples is 4 optimizer steps, and only rank 0 writes the checkpoint and the W&B run."""
    result = run_cli("fit", "--config", "experiments/fashion_mnist/vicreg.yaml", *TINY_CLI_ARGS,
                     "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_epochs", "2",
                     "--trainer.default_root_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "finished at epoch 2, step 8" in result.stdout
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1
