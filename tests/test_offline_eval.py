"""Offline linear evaluation separates a trained backbone from a random one on real Fashion-MNIST."""
import pytorch_lightning as pl
import pytest

from helpers import tiny_trainer
from ssl_lightning.data.datamodule import SSLDataModule
from ssl_lightning.data.views import ViewConfig
from ssl_lightning.eval.linear import linear_eval_method
from ssl_lightning.methods import VICReg
from ssl_lightning.optim import OptimizerConfig

pytestmark = pytest.mark.slow


def fashion_vicreg(data):
    pl.seed_everything(0)
    return VICReg(backbone="convnet", backbone_kwargs={"width": 16}, projector="256-256", channels_last=True,
                  optimizer=OptimizerConfig(lr=2.0, scale_lr=False, warmup_epochs=0.1),
                  num_classes=10, in_chans=1, image_size=28, batch_size=256)


def test_trained_backbone_beats_random_init(tmp_path):
    """120 VICReg steps (~31k images) vs the same network untrained. Measured when written: random
    0.746, trained 0.771 top-1 on the 10k test images (linear probe on 10k train features); the
    test asks for a 1-point gap, over 2 standard errors of a 10k-sample accuracy (0.43 points)."""
    views = [ViewConfig(size=28, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0, 0), blur_p=1.0),
             ViewConfig(size=28, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0, 0), blur_p=0.1, solarize_p=0.2)]
    data = SSLDataModule(dataset="fashion_mnist", batch_size=256, num_workers=0, views=views, augment="device")
    hparams = dict(data.hparams)
    random_result = linear_eval_method(fashion_vicreg(data).eval(), hparams, train_samples=10000)
    trained = fashion_vicreg(data)
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=120, limit_val_batches=0,
                           precision="bf16-mixed")
    trainer.fit(trained, data)
    trained_result = linear_eval_method(trained.eval(), hparams, train_samples=10000)
    print(f"random {random_result['linear/top1']:.4f} trained {trained_result['linear/top1']:.4f}")
    assert trained_result["linear/top1"] > random_result["linear/top1"] + 0.01
