"""MAE and RC-MAE: masking, the masked-patch loss against float64 references, the encoder being the
backbone itself, the EMA teacher (formula, same mask, eval mode, exact resume), DDP equivalence, and
the probe/monitors on ViT features.

Sizes: a 2-block, 32-d ViT on 16 px images with 4 px patches (L = 16 patches; mask ratio 0.75 keeps
int(16 * 0.25) = 4), a 1-block 32-d decoder.
"""
from unittest import mock

import numpy as np
import pytorch_lightning as pl
import pytest
import torch

import ssl_lightning.methods.mae as mae_method
import ssl_lightning.models.mae as mae_model
from ddp import run_distributed
from equivalence import assert_equivalent, ddp_step, max_grad_error, rel_err, single_process_step
from helpers import StopAfterEpochs, tiny_data, tiny_trainer
from ssl_lightning.callbacks import KNNMonitor, SpectrumMonitor
from ssl_lightning.data.views import ViewConfig
from ssl_lightning.losses.mae import mae_loss, normalize_patches
from ssl_lightning.methods import MAE, METHODS, RCMAE
from ssl_lightning.models.mae import (forward_encoder, patchify, random_masking, sincos_pos_embed_2d,
                                      unpatchify)
from ssl_lightning.optim import OptimizerConfig

pytestmark = pytest.mark.filterwarnings("ignore:num_classes is 0")
WORLD, B_LOCAL, SIZE = 2, 6, 16
TINY_VIT = dict(backbone="vit_tiny", backbone_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2},
                decoder_dim=32, decoder_depth=1, decoder_heads=2)


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---- masking --------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio,kept", [(0.75, 12), (0.9, 4), (0.5, 24), (0.3, 34)])
def test_masking_keeps_int_l_times_one_minus_r_and_unshuffles_exactly(ratio, kept):
    """L = 49 (a 7 x 7 grid): int(49 * 0.25) = 12, int(49 * 0.1) = 4 (4.9 rounds down), 24, 34."""
    n, length, dim = 8, 49, 3
    x = randn(n, length, dim)
    torch.manual_seed(0)
    visible, mask, ids_restore = random_masking(x, ratio)
    assert visible.shape == (n, kept, dim) == (n, int(length * (1 - ratio)), dim)
    assert torch.equal(mask.sum(1), torch.full((n,), float(length - kept))), "same masked count per sample"
    # the decoder's unshuffle: visible tokens + placeholders, gathered by ids_restore, = x where visible
    padded = torch.cat([visible, torch.zeros(n, length - kept, dim)], dim=1)
    restored = torch.gather(padded, 1, ids_restore[:, :, None].expand(-1, -1, dim))
    assert torch.equal(restored, x * (1 - mask)[:, :, None])
    # and a full shuffle followed by ids_restore gives back the original sequence exactly
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    shuffled = torch.gather(x, 1, ids_shuffle[:, :, None].expand(-1, -1, dim))
    assert torch.equal(torch.gather(shuffled, 1, ids_restore[:, :, None].expand(-1, -1, dim)), x)
    assert len({tuple(m.tolist()) for m in mask}) == n, "every sample gets its own mask"


def test_masks_follow_the_global_seed_and_the_noise():
    x = randn(4, 16, 2)
    masks = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        masks.append(random_masking(x, 0.75)[1])
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    noise = torch.rand(4, 16)
    _, mask, _ = random_masking(x, 0.75, noise)
    kept_by_noise = noise.argsort(1)[:, :4].sort(1).values  # the 4 smallest noise values are kept
    assert torch.equal((mask == 0).nonzero()[:, 1].view(4, 4), kept_by_noise)


# ---- patches, targets, loss -----------------------------------------------------------------
def test_patchify_layout_and_unpatchify_roundtrip():
    images = randn(2, 3, 8, 12)
    patches = patchify(images, 4)  # 2 x 3 grid of 4 x 4 patches, 48 values each
    assert patches.shape == (2, 6, 48)
    for l in range(6):
        row, col = divmod(l, 3)
        block = images[:, :, row * 4:(row + 1) * 4, col * 4:(col + 1) * 4]  # (n, c, p, q)
        assert torch.equal(patches[:, l], block.permute(0, 2, 3, 1).reshape(2, 48)), "pixels in (p, q, c) order"
    assert torch.equal(unpatchify(patches, 4, 3, grid=(2, 3)), images)
    square = randn(3, 1, 16, 16)
    assert torch.equal(unpatchify(patchify(square, 4), 4, 1), square)


def test_patch_order_matches_the_vits_patch_embedding():
    """Prediction l must be about the patch that token l embeds: the timm conv patch embedding equals
    a Linear on patchify's rows (weights permuted to (p, q, c)), token for token."""
    torch.manual_seed(0)
    method = MAE(**TINY_VIT, in_chans=3, image_size=SIZE, num_classes=0)
    proj = method.backbone.patch_embed.proj
    images = randn(2, 3, SIZE, SIZE)
    as_linear = patchify(images, 4) @ proj.weight.permute(0, 2, 3, 1).reshape(32, -1).T + proj.bias
    torch.testing.assert_close(method.backbone.patch_embed(images), as_linear, rtol=1e-5, atol=1e-5)


def reference_mae_loss(pred, patches, mask, norm_pix):
    """float64 loops: per-patch (x - mean) / sqrt(unbiased var + 1e-6), then the mean over masked
    patches of the per-patch mean squared error."""
    pred, patches = pred.double(), patches.double()
    total, count = 0.0, 0
    for n in range(pred.shape[0]):
        for l in range(pred.shape[1]):
            target = patches[n, l]
            if norm_pix:
                mean = target.sum() / len(target)
                var = ((target - mean) ** 2).sum() / (len(target) - 1)
                target = (target - mean) / torch.sqrt(var + 1e-6)
            if mask[n, l]:
                total += ((pred[n, l] - target) ** 2).sum() / len(target)
                count += 1
    return total / count


@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_matches_float64_reference(norm_pix):
    patches, pred = randn(3, 16, 48, seed=1) * 2 + 0.5, randn(3, 16, 48, seed=2)
    torch.manual_seed(0)
    _, mask, _ = random_masking(patches, 0.75)
    ours = mae_loss(pred, patches, mask, norm_pix_loss=norm_pix)
    torch.testing.assert_close(ours.double(), reference_mae_loss(pred, patches, mask, norm_pix), rtol=1e-6, atol=1e-7)
    target = normalize_patches(patches.double())
    torch.testing.assert_close(target.mean(-1), torch.zeros(3, 16, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(target.var(-1), torch.full((3, 16), 1.0, dtype=torch.float64), rtol=1e-5, atol=0)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_ignores_visible_patches(norm_pix):
    patches, pred = randn(2, 16, 48, seed=3), randn(2, 16, 48, seed=4)
    torch.manual_seed(1)
    _, mask, _ = random_masking(patches, 0.75)
    loss = mae_loss(pred, patches, mask, norm_pix_loss=norm_pix)
    visible_changed = patches + 100 * randn(2, 16, 48, seed=5) * (1 - mask)[:, :, None]
    assert torch.equal(mae_loss(pred, visible_changed, mask, norm_pix_loss=norm_pix), loss), "bit-identical"
    n, l = mask.nonzero()[0].tolist()
    masked_changed = patches.clone()
    masked_changed[n, l] += 1.0 + torch.arange(48.0) / 48  # not a constant shift, which norm_pix would remove
    changed = mae_loss(pred, masked_changed, mask, norm_pix_loss=norm_pix)
    expected = reference_mae_loss(pred, masked_changed, mask, norm_pix)
    assert abs(changed.item() - loss.item()) > 1e-3
    assert changed.item() == pytest.approx(expected.item(), rel=1e-6)


def test_sincos_position_embedding_matches_the_official_numpy_code():
    """facebookresearch/mae util/pos_embed.py, re-typed here in numpy."""
    def official(dim, size):
        grid = np.stack(np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32)), 0)

        def one_d(d, pos):
            omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float32) / (d / 2.0))
            out = np.einsum("m,d->md", pos.reshape(-1), omega)
            return np.concatenate([np.sin(out), np.cos(out)], axis=1)

        emb = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
        return np.concatenate([np.zeros([1, dim]), emb], axis=0)

    ours = sincos_pos_embed_2d(32, (4, 4))
    assert ours.shape == (1, 17, 32)
    np.testing.assert_allclose(ours[0].numpy(), official(32, 4), rtol=1e-5, atol=1e-6)


# ---- the encoder is the backbone -------------------------------------------------------------
def test_encoder_path_is_the_backbone_itself():
    """forward_encoder with nothing masked and an identity shuffle (increasing noise) is the timm
    ViT's own forward_features, bit for bit: same modules, same parameters, no copies. The fixed
    sin-cos position embedding gets no gradient; every other backbone parameter gets one."""
    torch.manual_seed(0)
    method = MAE(**TINY_VIT, in_chans=3, image_size=SIZE, num_classes=0)
    vit, images = method.backbone, randn(2, 3, SIZE, SIZE)
    noise = torch.arange(16.0).expand(2, 16)
    latent, mask, _ = forward_encoder(vit, images, 0.0, noise)
    assert mask.sum() == 0
    torch.testing.assert_close(latent, vit.forward_features(images), rtol=0, atol=0)
    torch.testing.assert_close(vit.pool(latent), method(images), rtol=0, atol=0)
    torch.testing.assert_close(vit.pos_embed, sincos_pos_embed_2d(32, (4, 4)), rtol=0, atol=0)
    assert not vit.pos_embed.requires_grad and not method.decoder.pos_embed.requires_grad
    method.ssl_step([images]).loss.backward()
    no_grad = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad


def test_registry_and_bad_configurations():
    assert METHODS["mae"] is MAE and METHODS["rcmae"] is RCMAE and issubclass(RCMAE, mae_method.MAE)
    with pytest.raises(ValueError, match="needs a timm VisionTransformer backbone"):
        MAE(backbone="convnet", backbone_kwargs={"width": 4}, image_size=SIZE, num_classes=0)
    method = MAE(**TINY_VIT, image_size=SIZE, num_classes=0)
    with pytest.raises(ValueError, match="exactly 1 view, got 2"):
        method.ssl_step([randn(2, 3, SIZE, SIZE)] * 2)
    with pytest.raises(ValueError, match="mask_ratio 1.0 must be in"):
        MAE(**TINY_VIT, mask_ratio=1.0, image_size=SIZE, num_classes=0)


# ---- DDP equivalence ------------------------------------------------------------------------
# Masks: ssl_step draws the noise of the whole global batch, (W*b, L), from the global RNG and rank r
# keeps rows r*b..(r+1)*b. make_method seeds the global RNG (manual_seed(0)) in the single process and
# on every rank, so each sample gets the same noise, hence the same mask, in both runs.
# Loss: a per-rank mean over the masked patches. Every sample has L - int(L (1 - r)) = 12 masked
# patches, so each rank divides by b*12 and the mean of the W rank losses (DDP's gradient average)
# is the mean over all 2b*12 masked patches: the single-process loss, exactly up to rounding.
def make_mae() -> MAE:
    torch.manual_seed(0)
    method = MAE(**TINY_VIT, in_chans=3, image_size=SIZE, num_classes=0)
    method.configure_model()
    torch.manual_seed(0)  # the masks are drawn from here, identically in every process
    return method


def make_rcmae() -> RCMAE:
    """At initialisation the teacher equals the student, so the consistency term and its gradient
    would be 0: perturb the teacher (seeded) so the check covers it."""
    torch.manual_seed(0)
    method = RCMAE(**TINY_VIT, in_chans=3, image_size=SIZE, num_classes=0)
    method.configure_model()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in method.teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    torch.manual_seed(0)
    return method


def make_one_view() -> list[torch.Tensor]:
    return [randn(WORLD * B_LOCAL, 3, SIZE, SIZE, seed=11)]


def all_ddp_steps(rank, world):
    """Every 2-rank run of this file in one spawn (process start-up dominates on a small CPU)."""
    out = {"mae": ddp_step(rank, world, make_mae, make_one_view),
           "rcmae": ddp_step(rank, world, make_rcmae, make_one_view)}
    # the naive draw: every rank draws (b, L) from the same seed, so rank 1 reuses rank 0's masks
    with mock.patch.object(mae_method, "global_mask_noise", lambda b, length, device: torch.rand(b, length)):
        out["mae_local_noise"] = ddp_step(rank, world, make_mae, make_one_view)
    return out


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    return run_distributed(all_ddp_steps, out_dir=tmp_path_factory.mktemp("ddp"))


@pytest.mark.distributed
def test_mae_step_equals_single_process_and_needs_global_noise(ddp_runs):
    ref = single_process_step(make_mae, make_one_view)
    assert "backbone.blocks.0.attn.qkv.weight" in ref["grads"] and "decoder.mask_token" in ref["grads"]
    assert_equivalent(ref, [r["mae"] for r in ddp_runs], loss_tol=1e-6, grad_tol=1e-5)
    # control: with per-rank (b, L) draws rank 1 masks its samples like rank 0's, not like the single
    # process: the loss moves by ~3e-3 and the gradients by ~0.8 (relative), far beyond the tolerances
    naive = [r["mae_local_noise"] for r in ddp_runs]
    assert rel_err(naive[0]["loss"], ref["loss"]) > 1e-4 and max_grad_error(naive, ref) > 1e-2


@pytest.mark.distributed
def test_rcmae_step_equals_single_process(ddp_runs):
    ref = single_process_step(make_rcmae, make_one_view)
    assert not any(name.startswith("teacher.") for name in ref["grads"]), "the teacher gets no gradient"
    terms = make_rcmae().ssl_step(make_one_view()).logs
    assert terms["rc"] > 0.1, "the perturbed teacher makes the consistency term non-trivial (0.27)"
    assert ref["loss"].item() == pytest.approx((terms["mae"] + terms["rc"]).item(), rel=1e-6), "gamma = 1"
    assert_equivalent(ref, [r["rcmae"] for r in ddp_runs], loss_tol=1e-6, grad_tol=1e-5)


# ---- RC-MAE teacher through training and a resume ------------------------------------------
class Recorder(pl.Callback):
    """Teacher before training; student and teacher right after optimizer step 1; the train/eval
    mode of student and teacher while a training step runs."""

    def __init__(self):
        self.modes = []

    def on_train_start(self, trainer, pl_module):
        self.teacher0 = {n: p.detach().clone() for n, p in pl_module.teacher.named_parameters()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.modes.append((pl_module.backbone.training, pl_module.decoder.training,
                           any(m.training for m in pl_module.teacher.modules())))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1:
            self.student1 = {f"{k}.{n}": p.detach().clone() for k in pl_module.teacher
                             for n, p in getattr(pl_module, k).named_parameters()}
            self.teacher1 = {n: p.detach().clone() for n, p in pl_module.teacher.named_parameters()}
            self.momenta = pl_module.momentum_at(0), pl_module.momentum_at(1)


def one_view_data():
    return tiny_data(views=[ViewConfig(size=SIZE, scale=(0.5, 1.0))])


def fit_rcmae(ckpt_dir, *, callbacks=(), ckpt_path=None, **trainer_kwargs):
    pl.seed_everything(0)
    data = one_view_data()
    # lr 1e-2 per 256 without warm-up: Adam moves weights ~1.25e-3 in step 1, so momentum_at(1) instead of
    # momentum_at(0) (0.9038 vs 0.9) would move the teacher by ~5e-6, beyond the 1e-6 tolerance.
    optimizer = OptimizerConfig(name="adamw", lr=1e-2, weight_decay=0.05, betas=(0.9, 0.95), warmup_epochs=0.0)
    model = RCMAE(**TINY_VIT, base_momentum=0.9, optimizer=optimizer,
                  num_classes=data.num_classes, in_chans=data.channels, image_size=data.image_size,
                  batch_size=data.hparams.batch_size)
    trainer = tiny_trainer(ckpt_dir, **trainer_kwargs)
    trainer.callbacks.extend(callbacks)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model, trainer


@pytest.mark.slow
def test_rcmae_teacher_ema_same_mask_eval_mode_and_exact_resume(tmp_path, monkeypatch):
    masks = []

    def recording_masking(x, mask_ratio, noise=None):
        out = random_masking(x, mask_ratio, noise)
        masks.append(out[2])  # ids_restore
        return out

    monkeypatch.setattr(mae_model, "random_masking", recording_masking)
    record = Recorder()
    straight, t_straight = fit_rcmae(tmp_path / "straight", callbacks=[record])
    monkeypatch.undo()
    fit_rcmae(tmp_path / "split", callbacks=[StopAfterEpochs(1)])
    resumed, t_resumed = fit_rcmae(tmp_path / "split", ckpt_path="last")

    # same mask: student and teacher calls alternate, 8 steps (4 per epoch x 2 epochs)
    assert len(masks) == 2 * 8
    for student_ids, teacher_ids in zip(masks[::2], masks[1::2]):
        assert torch.equal(student_ids, teacher_ids)
    assert not torch.equal(masks[0], masks[2]), "a new mask every step"
    assert record.modes and all(mode == (True, True, False) for mode in record.modes), record.modes

    # step 1: teacher = m0 * teacher0 + (1 - m0) * student1, m0 = momentum_at(0) = 0.9 (after the step)
    m0, m1 = record.momenta
    assert m0 == pytest.approx(0.9) and m1 > m0
    for name, t1 in record.teacher1.items():
        t0, s1 = record.teacher0[name].double(), record.student1[name].double()
        torch.testing.assert_close(t1.double(), m0 * t0 + (1 - m0) * s1, rtol=1e-6, atol=1e-6, msg=name)
    worst = max((t1.double() - (m1 * record.teacher0[n].double() + (1 - m1) * record.student1[n].double())).abs().max()
                for n, t1 in record.teacher1.items())
    assert worst > 1e-6, "momentum_at(1) would give a different teacher: the check can fail"

    # resume: teacher, student, optimizer position and the schedule continue exactly
    assert t_resumed.global_step == t_straight.global_step == 8
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and any(k.startswith("teacher.decoder.") for k in a)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ after resume: {different}"
    assert straight.momentum_at(t_straight.global_step) == resumed.momentum_at(t_resumed.global_step)
    assert not any(m.training for m in resumed.teacher.modules())


# ---- probe and monitors on ViT features ------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("pool", ["token", "avg"])
def test_probe_knn_and_spectrum_run_on_vit_features(tmp_path, pool):
    pl.seed_everything(0)
    data = one_view_data()
    kwargs = {**TINY_VIT, "backbone_kwargs": {**TINY_VIT["backbone_kwargs"], "global_pool": pool}}
    model = MAE(**kwargs, optimizer=OptimizerConfig(name="adamw", lr=1e-3, warmup_epochs=0.5),
                num_classes=data.num_classes, in_chans=data.channels, image_size=data.image_size,
                batch_size=data.hparams.batch_size)
    trainer = tiny_trainer(tmp_path, max_epochs=1,
                           callbacks=[SpectrumMonitor(num_samples=64, features=("backbone",)),
                                      KNNMonitor(bank_size=64, num_queries=32)])
    trainer.fit(model, data)
    metrics = trainer.callback_metrics
    assert 0.0 <= metrics["knn/top1"] <= 1.0 and 0.0 <= metrics["probe/val_top1"] <= 1.0
    assert 1.0 <= metrics["rank/backbone_rankme"] <= 32.0  # at most the 32 feature dimensions
    assert torch.isfinite(metrics["train/mae"]) and torch.isfinite(metrics["probe/train_loss"])
    images = data.val_dataloader().dataset[0][0][None]
    features = model.eval()(images)
    tokens = model.backbone.forward_features(images)
    pooled = tokens[:, 0] if pool == "token" else model.backbone.fc_norm(tokens[:, 1:].mean(1))
    torch.testing.assert_close(features, pooled, rtol=1e-6, atol=1e-6)
