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
    return VICReg(backbone="convnet", backbone_kwargs={"width": 8}, projector="256-256", channels_last=True,
                  optimizer=OptimizerConfig(lr=2.0, scale_lr=False, warmup_epochs=0.1),
                  num_classes=10, in_chans=1, image_size=28, batch_size=128)


def test_trained_backbone_beats_random_init(tmp_path):
    """30 VICReg steps (~3.8k images) in fp32 vs the same width-8 network untrained. Measured
    (2026-12-04, Intel Xeon): random 0.626, trained 0.685 top-1 on the 10k test images (linear probe on
    5k train features), 0.682 with the AVX2 kernels an AMD EPYC runs; the fit took 3 s. The test asks
    for a 1-point gap, over 2 standard errors of a 10k-sample accuracy (0.47 points). fp32, not bf16:
    on a CPU without native bf16, bf16 autocast made this test take 12.5 minutes (120 steps, width 16)."""
    views = [ViewConfig(size=28, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0, 0), blur_p=1.0),
             ViewConfig(size=28, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0, 0), blur_p=0.1, solarize_p=0.2)]
    data = SSLDataModule(dataset="fashion_mnist", batch_size=128, num_workers=0, views=views, augment="device")
    hparams = dict(data.hparams)
    random_result = linear_eval_method(fashion_vicreg(data).eval(), hparams, train_samples=5000)
    trained = fashion_vicreg(data)
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=30, limit_val_batches=0,
                           precision="32-true")
    trainer.fit(trained, data)
    trained_result = linear_eval_method(trained.eval(), hparams, train_samples=5000)
    print(f"random {random_result['linear/top1']:.4f} trained {trained_result['linear/top1']:.4f}")
    assert trained_result["linear/top1"] > random_result["linear/top1"] + 0.01
