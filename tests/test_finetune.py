"""Fine-tuning evaluation with few labels: the class-balanced seeded subset, an end-to-end run on real
Fashion-MNIST through the command line, which weights it trains (the EMA teacher where the method
evaluates it) and the errors for bad input."""
import hashlib

import pytest
import torch

from helpers import tiny_data, tiny_trainer, tiny_vicreg
from ssl_lightning.checkpointing import CheckpointError
from ssl_lightning.cli import main
from ssl_lightning.data.datamodule import SSLDataModule
from ssl_lightning.data.datasets import load_dataset
from ssl_lightning.data.views import ViewConfig
from ssl_lightning.eval.features import load_method
from ssl_lightning.eval.finetune import balanced_subset, finetune_eval, finetune_method, untrained_copy
from ssl_lightning.methods import BYOL
from ssl_lightning.wandb_offline import read_offline_run


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_subset_is_class_balanced_and_seeded():
    """Fashion-MNIST's train split has 6000 images per class: 1% is exactly 60 per class, 600 in all."""
    labels = load_dataset("fashion_mnist", None, "train").labels
    subset = balanced_subset(labels, 0.01, seed=0)
    assert len(subset) == 600 and len(set(subset.tolist())) == 600
    assert torch.bincount(labels[subset], minlength=10).tolist() == [60] * 10
    assert torch.equal(subset, balanced_subset(labels, 0.01, seed=0)), "the same seed, the same subset"
    other = balanced_subset(labels, 0.01, seed=1)
    assert torch.bincount(labels[other], minlength=10).tolist() == [60] * 10
    assert len(set(subset.tolist()) & set(other.tolist())) < 60, "another seed draws another subset"


def test_subset_rounds_per_class_keeps_one_and_skips_unlabelled():
    """Counts 3, 160 and 40 unlabelled (-1) at 1%: round(0.03) -> at least 1, round(1.6) = 2, none of -1."""
    labels = torch.cat([torch.zeros(3), torch.ones(160), -torch.ones(40)]).long()
    subset = balanced_subset(labels, 0.01, seed=0)
    assert torch.bincount(labels[subset]).tolist() == [1, 2]
    assert len(balanced_subset(labels, 1.0, seed=0)) == 163, "100% is every labelled sample"


@pytest.fixture(scope="module")
def fashion_checkpoint(tmp_path_factory):
    """A width-8 VICReg convnet trained 20 steps (batch 64) on real Fashion-MNIST, saved as last.ckpt."""
    tmp = tmp_path_factory.mktemp("fashion")
    data = SSLDataModule(dataset="fashion_mnist", batch_size=64, num_workers=0, augment="device",
                         views=[ViewConfig(size=28, scale=(0.2, 1.0)), ViewConfig(size=28, scale=(0.2, 1.0))])
    model = tiny_vicreg(data, backbone_kwargs={"width": 8})
    tiny_trainer(tmp / "checkpoints", max_epochs=1, limit_train_batches=20, limit_val_batches=0).fit(model, data)
    return tmp / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_finetune_command_on_fashion_mnist(fashion_checkpoint):
    """`ssl-lightning finetune --labels 1 --epochs 2 --batch_size 16`: 600 labelled images (60 per
    class), 74 steps. Top-1 on the 10000 test images must beat chance (10%) by 10 points, over 30
    standard errors (measured when written: 35.6% top-1, 83.8% top-5, 2.3 s); the results land in an
    offline W&B eval run next to the checkpoint; the checkpoint is only read."""
    before = sha256(fashion_checkpoint)
    main(["finetune", "--ckpt", str(fashion_checkpoint), "--labels", "1", "--epochs", "2", "--batch_size", "16"])
    assert sha256(fashion_checkpoint) == before, "fine-tuning must not write the checkpoint"
    (run_dir,) = (fashion_checkpoint.parent.parent / "wandb").glob("offline-run-*")
    run = read_offline_run(run_dir)
    assert run["config"]["command"] == "finetune-1pct"
    summary = run["summary"]
    print({k: v for k, v in summary.items() if k.startswith("eval/")})
    assert summary["eval/finetune/labelled_samples"] == 600
    assert 0.2 < summary["eval/finetune/top1"] <= summary["eval/finetune/top5"] <= 1.0


def tiny_byol(data, evaluate_teacher: bool) -> BYOL:
    return BYOL(backbone="convnet", backbone_kwargs={"width": 4}, projector="32-16", predictor="32-16",
                evaluate_teacher=evaluate_teacher, num_classes=data.num_classes, in_chans=data.channels,
                image_size=data.image_size, batch_size=data.hparams.batch_size)


def parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


@pytest.mark.parametrize("evaluate_teacher", [False, True])
def test_finetunes_the_evaluated_backbone_and_only_reads_the_checkpoint(tmp_path, evaluate_teacher):
    """BYOL evaluating its student or its EMA teacher: exactly that backbone changes (every parameter
    tensor), the other one keeps its checkpoint weights bit for bit, the file is unchanged."""
    data = tiny_data()
    tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0).fit(
        tiny_byol(data, evaluate_teacher), data)
    ckpt = tmp_path / "last.ckpt"
    before = sha256(ckpt)
    method, hparams = load_method(ckpt)
    tuned, other = (method.teacher["backbone"], method.backbone) if evaluate_teacher else \
        (method.backbone, method.teacher["backbone"])
    tuned_before, other_before = parameters(tuned), parameters(other)
    results = finetune_method(method, hparams, label_fraction=0.25, epochs=1, batch_size=16, device="cpu")
    assert results["finetune/labelled_samples"] == 30, "synthetic: 12 or 13 per class x 0.25 -> 3 x 10"
    for name, value in parameters(tuned).items():
        assert not torch.equal(value, tuned_before[name]), f"{name} did not change"
    for name, value in parameters(other).items():
        assert torch.equal(value, other_before[name]), f"{name} of the backbone not evaluated changed"
    assert sha256(ckpt) == before


def test_random_init_is_the_same_architecture_untrained(tmp_path):
    """--random_init: same parameter names and shapes as the checkpoint's backbone, other values."""
    data = tiny_data()
    tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0).fit(tiny_vicreg(data), data)
    method, _ = load_method(tmp_path / "last.ckpt")
    fresh = untrained_copy(method)
    trained, untrained = method.backbone.state_dict(), fresh.backbone.state_dict()
    assert trained.keys() == untrained.keys()
    assert all(trained[k].shape == untrained[k].shape for k in trained)
    assert not torch.equal(trained["features.0.weight"], untrained["features.0.weight"])
    assert untrained["features.1.running_mean"].abs().sum() == 0, "BatchNorm statistics at their initial values"


def test_bad_input_names_the_value_and_the_fix(tmp_path, capsys):
    """A fraction outside (0, 1], --labels outside (0, 100], a missing checkpoint, unlabelled data."""
    with pytest.raises(ValueError, match=r"label_fraction 10 is not in \(0, 1\].*--labels takes percent"):
        finetune_method(None, {"dataset": "synthetic"}, label_fraction=10)
    with pytest.raises(CheckpointError, match="missing.ckpt does not exist; train first"):
        finetune_eval(tmp_path / "missing.ckpt", label_fraction=0.01)
    for bad in ("0", "150", "-1"):
        with pytest.raises(SystemExit):
            main(["finetune", "--ckpt", "x.ckpt", "--labels", bad])
        assert f"--labels {bad} is not a percentage in (0, 100]; use e.g. 1, 10 or 100" in capsys.readouterr().err
    unlabelled = dict(tiny_data(labelled=False).hparams)
    no_labels = r"\('synthetic', labelled=False\) has num_classes 0: fine-tuning needs labels; pre-train on a labelled"
    with pytest.raises(ValueError, match=no_labels):
        finetune_method(None, unlabelled, label_fraction=0.01)
