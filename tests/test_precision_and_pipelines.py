"""Throughput options that must not change the result: fp16 autocast (every loss keeps its fp32
island), the batched on-device pipeline vs the per-sample one on identical inputs, torch.compile.

fp16 is tested at the loss level: on CPU Lightning turns precision 16-mixed into bf16-mixed (with a
warning), so an fp16 fit needs a GPU; bf16-mixed fits run throughout the suite."""
import pytest
import pytorch_lightning as pl
import torch

from helpers import tiny_data, tiny_trainer, tiny_vicreg
from ssl_lightning import losses
from ssl_lightning.data.views import ViewConfig

pytestmark = pytest.mark.filterwarnings("ignore:num_classes is 0")


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


B, D, K = 32, 16, 24
Z1, Z2 = randn(B, D, seed=1), randn(B, D, seed=2)
S1, S2 = 0.3 * randn(B, K, seed=3), 0.3 * randn(B, K, seed=9)  # prototype scores / head outputs
QUEUE = torch.nn.functional.normalize(randn(64, D, seed=4), dim=1)
CENTER = randn(1, K, seed=5)
PRED, PATCHES = randn(4, 16, 12, seed=6), randn(4, 16, 12, seed=7)
MASK = (randn(4, 16, seed=8) > 0).float()

# name -> loss of [Z1, Z2, S1, S2]; the same call runs on fp16 values under fp16 autocast and on
# the same values in float64 without autocast.
LOSSES = {
    "vicreg": lambda z: losses.vicreg_loss(z[0], z[1]),
    "barlow": lambda z: losses.barlow_twins_loss(z[0], z[1]),
    "nt_xent": lambda z: losses.nt_xent_loss(z[0], z[1], temperature=0.5),
    "mocov2": lambda z: losses.mocov2_loss(z[0], z[1], QUEUE.to(z[0].dtype)),
    "mocov3": lambda z: losses.mocov3_loss(z[0], z[1], temperature=0.2),
    "byol": lambda z: losses.byol_loss([z[0], z[1]], [z[1], z[0]]),
    "swav": lambda z: losses.swav_loss([z[2], z[3]], [losses.sinkhorn(z[2])]),
    "dino": lambda z: losses.dino_loss([z[2], z[3]], [z[3]], CENTER.to(z[0].dtype), teacher_temp=0.04),
    "wmse": lambda z: losses.wmse_loss([z[0], z[1]], w_size=B),
    "intl": lambda z: losses.intl_loss(z[0], z[1]),
    "st": lambda z: losses.st_loss([z[0], z[1]]),
    "mae": lambda z: losses.mae_loss(PRED.to(z[0].dtype), PATCHES.to(z[0].dtype), MASK, norm_pix_loss=True),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_is_fp32_under_fp16_autocast(name):
    """fp16 inputs (what a projector under 16-mixed hands over) give an fp32 loss equal to the float64
    loss of the very same values within rel. 1e-4. A loss computed in fp16 would be off by ~1e-3 (fp16
    has an 11-bit mantissa, 4.9e-4 relative rounding) or overflow (exp, squares of sums)."""
    halves = [z.half() for z in (Z1, Z2, S1, S2)]
    with torch.autocast("cpu", dtype=torch.float16):
        loss = LOSSES[name](halves)
    reference = LOSSES[name]([h.double() for h in halves])
    assert loss.dtype == torch.float32, f"{name} returned {loss.dtype}"
    torch.testing.assert_close(loss.double(), reference, rtol=1e-4, atol=1e-6)


def test_a_loss_without_an_fp32_island_fails_that_tolerance():
    """Control: Barlow Twins' cross-correlation written without the island (matmul and sums in fp16
    under autocast) misses the float64 value by more than the 1e-4 the test above allows."""
    z1, z2 = Z1.half(), Z2.half()

    def naive(a, b):
        a, b = (a - a.mean(0)) / a.std(0, unbiased=False), (b - b.mean(0)) / b.std(0, unbiased=False)
        c = a.T @ b / a.shape[0]
        off = c - torch.diag(torch.diagonal(c))
        return (torch.diagonal(c) - 1).pow(2).sum() + 0.0051 * off.pow(2).sum()

    with torch.autocast("cpu", dtype=torch.float16):
        naive_fp16 = naive(z1, z2)
    reference = naive(z1.double(), z2.double())
    assert naive_fp16.dtype == torch.float16
    assert abs(float(naive_fp16) - float(reference)) / float(reference) > 1e-4


class LossRecorder(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


# A view that leaves the image as it is: full-image crop at the same size, no flip, no colour, no blur.
IDENTITY = {"size": 16, "scale": (1.0, 1.0), "ratio": (1.0, 1.0), "hflip_p": 0.0, "jitter_p": 0.0,
            "grayscale_p": 0.0}


def fit_losses(tmp_path, augment: str, **trainer_kwargs) -> tuple[list[float], dict]:
    pl.seed_everything(0)
    data = tiny_data(augment=augment, views=[ViewConfig(**IDENTITY), ViewConfig(**IDENTITY)])
    model = tiny_vicreg(data)
    record = LossRecorder()
    trainer = tiny_trainer(tmp_path, max_steps=3, limit_val_batches=0, **trainer_kwargs)
    trainer.callbacks.append(record)
    trainer.fit(model, data)
    return record.losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_batched_pipeline_trains_like_the_per_sample_one_on_identical_inputs(tmp_path):
    """With an identity augmentation both pipelines hand the model the same normalised images (same
    sampler order), so 3 VICReg steps give the same losses and weights within float rounding
    (rel. 1e-5; the two normalise in a different order of float ops)."""
    per_sample, w_per_sample = fit_losses(tmp_path / "workers", "workers")
    batched, w_batched = fit_losses(tmp_path / "device", "device")
    assert len(batched) == len(per_sample) == 3
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(per_sample), rtol=1e-5, atol=0)
    for key in w_per_sample:
        torch.testing.assert_close(w_batched[key], w_per_sample[key], rtol=1e-4, atol=1e-6, msg=key)
    assert per_sample[0] != per_sample[2], "the losses move, so equal losses are not trivially equal"


def test_compile_option_compiles_the_backbone_and_keeps_checkpoint_keys(tmp_path):
    """compile: {backend: aot_eager} (dynamo + AOT autograd, no C++ toolchain needed) trains to the same
    losses as eager within rel. 1e-5, and last.ckpt has the eager model's keys (no _orig_mod.)."""
    eager, _ = fit_losses(tmp_path / "eager", "device")
    pl.seed_everything(0)
    data = tiny_data(augment="device", views=[ViewConfig(**IDENTITY), ViewConfig(**IDENTITY)])
    model = tiny_vicreg(data, compile={"backend": "aot_eager"})
    record = LossRecorder()
    trainer = tiny_trainer(tmp_path / "compiled", max_steps=3, limit_val_batches=0)
    trainer.callbacks.append(record)
    trainer.fit(model, data)
    assert model.backbone._compiled_call_impl is not None, "the backbone was compiled"
    torch.testing.assert_close(torch.tensor(record.losses), torch.tensor(eager), rtol=1e-5, atol=0)
    saved = torch.load(tmp_path / "compiled" / "last.ckpt", weights_only=True)["state_dict"]
    assert saved.keys() == model.state_dict().keys() and not any("_orig_mod" in k for k in saved)
