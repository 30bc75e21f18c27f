"""`ssl-lightning export`: the evaluated backbone leaves the suite as model.safetensors + config.json, loads
back with ssl_lightning.load_backbone always and with timm's own pretrained loader where the architecture
is stock timm, gives the checkpoint's features (rel. 1e-6), and carries no projector or probe."""
import json

import pytest
import timm
import torch
from safetensors.torch import load_file

import ssl_lightning
from helpers import tiny_data, tiny_trainer, tiny_vicreg
from ssl_lightning.cli import main
from ssl_lightning.eval.features import load_method
from ssl_lightning.methods import BYOL


def fitted_checkpoint(tmp_path, byol: bool = False, **model_kwargs):
    """2 steps of tiny VICReg (or BYOL evaluating its EMA teacher) on synthetic 16 px data; returns last.ckpt."""
    data = tiny_data()
    model = tiny_vicreg(data, **model_kwargs) if not byol else BYOL(
        backbone="convnet", backbone_kwargs={"width": 4}, projector="32-16", predictor="32-16", evaluate_teacher=True,
        num_classes=data.num_classes, in_chans=data.channels, image_size=data.image_size, batch_size=32)
    tiny_trainer(tmp_path / "ckpt", max_epochs=1, limit_train_batches=2, limit_val_batches=1).fit(model, data)
    return tmp_path / "ckpt" / "last.ckpt"


def features_close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).norm() / b.norm()) < 1e-6


@pytest.mark.parametrize("backbone, kwargs, stock", [
    ("convnet", {"width": 4}, False),                   # ours: ssl_lightning.load_backbone only
    ("resnet18", {"small_stem": True}, False),          # 3x3 stem, no max-pool: not stock timm
    ("resnet18", {"small_stem": False}, True),          # the stock timm resnet18
    ("vit_tiny", {"depth": 2}, True),                   # stock timm ViT at 16 px, patch 4
])
def test_export_loads_back_with_the_same_features(tmp_path, backbone, kwargs, stock):
    ckpt = fitted_checkpoint(tmp_path, backbone=backbone, backbone_kwargs=kwargs)
    out = tmp_path / "export"
    main(["export", "--ckpt", str(ckpt), "--out", str(out)])
    config = json.loads((out / "config.json").read_text())
    assert config["stock_timm"] is stock and config["method"] == "VICReg" and config["evaluated"] == "online"
    assert config["input_size"] == [3, 16, 16] and config["mean"] == [0.5, 0.5, 0.5], config
    assert config["global_step"] == 2 and config["feature_dim"] > 0

    method, _ = load_method(ckpt)
    images = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = method(images)
        assert features_close(ssl_lightning.load_backbone(out)(images), expected)
        if stock:
            model = timm.create_model(config["timm_architecture"], pretrained=True, num_classes=0,
                                      pretrained_cfg_overlay={"file": str(out / "model.safetensors")},
                                      **config["timm_kwargs"]).eval()
            assert features_close(model(images), expected)


def test_export_takes_the_ema_teacher_and_never_a_head(tmp_path):
    """BYOL evaluates its EMA teacher: the export holds the teacher's backbone weights (which differ from the
    online backbone's after 2 steps) and no projector, predictor, probe or teacher-head key."""
    ckpt = fitted_checkpoint(tmp_path, byol=True)
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "export")])
    weights = load_file(str(tmp_path / "export" / "model.safetensors"))
    method, _ = load_method(ckpt)
    teacher, online = method.teacher["backbone"].state_dict(), method.backbone.state_dict()
    assert weights.keys() == teacher.keys() == online.keys()
    assert all(torch.equal(weights[k], teacher[k]) for k in weights)
    assert any(not torch.equal(weights[k], online[k]) for k in weights if weights[k].is_floating_point())
    assert json.loads((tmp_path / "export" / "config.json").read_text())["evaluated"] == "ema_teacher"
    head_sizes = {p.numel() for name in ("projector", "predictor", "probe") for p in getattr(method, name).parameters()}
    backbone_sizes = {v.numel() for v in online.values()}
    assert not any(k.startswith(("projector", "predictor", "probe", "teacher", "fc.", "head.")) for k in weights)
    assert head_sizes - backbone_sizes, "the heads have shapes of their own, so a leak would show in the keys"


def test_bad_inputs_get_clear_errors(tmp_path, capsys):
    """A missing or foreign checkpoint ends the command with one line (exit 2), as every checkpoint load does."""
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2 and "missing.ckpt does not exist" in capsys.readouterr().err.splitlines()[-1]
    not_ours = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}}, not_ours)
    with pytest.raises(SystemExit), pytest.warns(UserWarning, match="loading it unverified"):
        main(["export", "--ckpt", str(not_ours), "--out", str(tmp_path / "x")])
    assert "not written by `ssl-lightning fit`" in capsys.readouterr().err.splitlines()[-1]
    with pytest.raises(FileNotFoundError, match="not a directory written by"):
        ssl_lightning.load_backbone(tmp_path)
