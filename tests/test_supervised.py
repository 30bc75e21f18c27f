"""The supervised baseline: cross-entropy on the labels of view 1 (label smoothing, unlabelled samples
weigh 0), a clear error on unlabelled data, and a fit that keeps epoch=E.ckpt every K epochs, each of
which offline evaluation and the landscape read (the landscape's pretrain loss is the cross-entropy)."""

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_data, tiny_trainer
from ssl_lightning.checkpointing import LastCheckpoint
from ssl_lightning.cli import main
from ssl_lightning.eval.features import build_datamodule, load_method
from ssl_lightning.landscape import method_landscape, parse_grid
from ssl_lightning.landscape.command import default_out_dir
from ssl_lightning.landscape.objectives import fixed_training_batches
from ssl_lightning.methods import Supervised

SMALL = dict(backbone="convnet", backbone_kwargs={"width": 4}, num_classes=10, in_chans=3, image_size=16)


def test_loss_is_the_cross_entropy_of_view_one():
    """Labels [3, -1, 7, 0]: the -1 sample weighs 0, label smoothing 0.1 is F.cross_entropy's, and the
    second view does not enter the loss."""
    torch.manual_seed(0)
    method = Supervised(label_smoothing=0.1, **SMALL)
    v1, v2, labels = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16), torch.tensor([3, -1, 7, 0])
    out = method.objective([v1, v2], labels)
    kept = labels >= 0
    expected = F.cross_entropy(method.classifier(method.backbone(v1))[kept], labels[kept], label_smoothing=0.1)
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(method.objective([v1, torch.zeros_like(v2)], labels).loss, expected)
    assert out.features.shape == (4, method.feature_dim) and "cross_entropy" in out.logs


def test_refuses_unlabelled_data():
    data = tiny_data(labelled=False)
    assert data.num_classes == 0
    with pytest.raises(ValueError, match="Supervised needs labelled data, but num_classes is 0"):
        Supervised(**{**SMALL, "num_classes": data.num_classes})
    with pytest.raises(ValueError, match="label_smoothing 1.0 must be in"):
        Supervised(label_smoothing=1.0, **SMALL)


def test_fit_keeps_every_second_epoch_and_each_is_evaluable(tmp_path, capsys):
    """4 epochs of 2 steps with keep_every_n_epochs 2: epoch=2.ckpt (4 optimizer steps) and epoch=4.ckpt
    (8, the same state as last.ckpt) besides last.ckpt and its history (last-1.ckpt), nothing else; kNN evaluation and the landscape read
    epoch=2.ckpt, whose pretrain landscape centre is the mean cross-entropy of the fixed labelled batches,
    and whose outputs go to landscape/epoch=2/, not over last.ckpt's."""
    data = tiny_data(views=[{"size": 16, "scale": (0.5, 1.0)}])
    torch.manual_seed(0)
    method = Supervised(**{**SMALL, "batch_size": data.hparams.batch_size})
    ckpts = tmp_path / "run" / "checkpoints"
    tiny_trainer(ckpts, max_epochs=4, limit_train_batches=2, limit_val_batches=0,
                 callbacks=[LastCheckpoint(dirpath=str(ckpts), keep_every_n_epochs=2)]).fit(method, data)
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["epoch=2.ckpt", "epoch=4.ckpt", "last-1.ckpt", "last.ckpt"]
    assert all(p.with_name(p.name + ".sha256.json").is_file() for p in ckpts.glob("*.ckpt")), "each is verifiable"
    steps = {p.stem: torch.load(p, weights_only=True)["global_step"] for p in ckpts.glob("*.ckpt")}
    assert steps == {"epoch=2": 4, "epoch=4": 8, "last": 8, "last-1": 6}, "last-1: the previous save (keep_last 2)"

    middle = str(ckpts / "epoch=2.ckpt")
    main(["knn", "--ckpt", middle, "--ks", "5", "--no_wandb"])
    assert "knn evaluation of" in capsys.readouterr().out
    assert default_out_dir(middle) == (tmp_path / "run" / "landscape" / "epoch=2").resolve()

    fixed = dict(num_batches=2, batch_size=32, seed=1)
    method, hparams = load_method(middle)
    grid = method_landscape(method, hparams, parse_grid("-0.5:0.5:3"), **fixed)
    with torch.no_grad():
        losses = [float(F.cross_entropy(method.classifier(method.backbone(views[0])), labels))
                  for views, labels in fixed_training_batches(build_datamodule(hparams), **fixed)]
    assert grid[1, 1] == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    last, _ = load_method(ckpts / "last.ckpt")
    assert not torch.equal(last.classifier.weight, method.classifier.weight), "epoch 2 is not the last state"
