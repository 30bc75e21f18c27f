"""SimCLR (NT-Xent), Barlow Twins and BYOL: losses against float64 references written here, exact
values, 2-rank == 1-process equivalence (with a negative control for Barlow's all_reduce bug), and
BYOL's EMA teacher through a resume.

Numbers checked: NT-Xent of identical embeddings = log(V*B - 1) per anchor (every logit is equal, so
each of the V*B - 1 candidates has probability 1/(V*B - 1)); the TF convention loss_a + loss_b = 2x
ours; Barlow on Hadamard columns (standardised, orthogonal) = D * (eps / (1 + eps))^2 ~ 8e-10,
the BatchNorm eps being the only deviation from c = I; BYOL regression 0 for p == z, 4 for p == -z.
"""
import math

import pytorch_lightning as pl
import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from ddp import run_distributed
from equivalence import StepWrapper, assert_equivalent, ddp_step, rel_err, single_process_step, snapshot
from helpers import StopAfterEpochs, tiny_data, tiny_trainer
from ssl_lightning.losses import (barlow_twins_loss, barlow_twins_terms, byol_loss, byol_regression_loss,
                                  multiview_nt_xent_loss, nt_xent_loss)
from ssl_lightning.methods import BYOL, METHODS, BarlowTwins, SimCLR
from ssl_lightning.models.ema import ema_update
from ssl_lightning.optim import OptimizerConfig

WORLD, B_LOCAL = 2, 6


# ---- float64 references (naive loops) -------------------------------------------------------
def reference_nt_xent(zs, t):
    """Mean over all V*N anchors of -mean_{positives} log softmax_{k != i}(s_ik / t)."""
    z = F.normalize(torch.cat([v.double() for v in zs]), dim=1)
    n, total = zs[0].shape[0], z.shape[0]
    sim = z @ z.T / t
    losses = []
    for i in range(total):
        denominator = sum(torch.exp(sim[i, k]) for k in range(total) if k != i)
        positives = [k for k in range(total) if k != i and k % n == i % n]
        losses.append(-sum(torch.log(torch.exp(sim[i, p]) / denominator) for p in positives) / len(positives))
    return torch.stack(losses).mean()


def reference_barlow(z1, z2, lambd=0.0051):
    """facebookresearch/barlowtwins main.py: c = bn(z1).T @ bn(z2) / N with BatchNorm1d(affine=False)."""
    def bn(z):
        z = z.double()
        return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + 1e-5)
    c = bn(z1).T @ bn(z2) / z1.shape[0]
    d = c.shape[0]
    on = sum((c[i, i] - 1) ** 2 for i in range(d))
    off = sum(c[i, j] ** 2 for i in range(d) for j in range(d) if i != j)
    return on + lambd * off


def reference_byol(ps, zs):
    """Sum over target views g of the mean over online views v != g of mean_batch(2 - 2 cos)."""
    def regression(p, z):
        return (2 - 2 * F.cosine_similarity(p.double(), z.double(), dim=-1)).mean()
    return sum(sum(regression(p, z) for v, p in enumerate(ps) if v != g) / (len(ps) - 1) for g, z in enumerate(zs))


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ---- NT-Xent --------------------------------------------------------------------------------
@pytest.mark.parametrize("views,n,d,t", [(2, 8, 4, 0.5), (2, 16, 32, 0.1), (4, 6, 8, 0.2)])
def test_nt_xent_matches_float64_reference(views, n, d, t):
    zs = [randn(n, d, seed=v) for v in range(views)]
    torch.testing.assert_close(multiview_nt_xent_loss(zs, temperature=t).double(), reference_nt_xent(zs, t),
                               rtol=1e-5, atol=1e-6)
    z64 = [z.double().requires_grad_() for z in zs]
    ours = torch.autograd.grad(multiview_nt_xent_loss(z64, temperature=t), z64)
    ref = torch.autograd.grad(reference_nt_xent(z64, t), z64)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("views", [2, 3])
def test_nt_xent_identical_embeddings_give_log_of_candidates(views):
    n = 8
    z = torch.ones(n, 5)
    assert multiview_nt_xent_loss([z] * views, temperature=0.1).item() == pytest.approx(math.log(views * n - 1))
    assert nt_xent_loss(z, z, temperature=0.5).item() == pytest.approx(math.log(2 * n - 1))  # log(15) = 2.708


def test_tf_convention_is_twice_the_mean():
    """google-research/simclr: loss_a = CE([logits_ab, logits_aa - inf*I]), loss_b alike, loss_a + loss_b."""
    z1, z2 = F.normalize(randn(10, 6, seed=1), dim=1), F.normalize(randn(10, 6, seed=2), dim=1)
    t, labels, mask = 0.2, torch.arange(10), torch.eye(10, dtype=torch.bool)
    loss_a = F.cross_entropy(torch.cat([z1 @ z2.T, (z1 @ z1.T).masked_fill(mask, -1e9)], 1) / t, labels)
    loss_b = F.cross_entropy(torch.cat([z2 @ z1.T, (z2 @ z2.T).masked_fill(mask, -1e9)], 1) / t, labels)
    torch.testing.assert_close(loss_a + loss_b, 2 * nt_xent_loss(z1, z2, temperature=t))


def test_multi_positive_averages_log_probabilities():
    """With 3 views, mean of the log-probabilities over positives != log of their summed probability
    (the SupCon 'L_in' form that solo-learn's simclr_loss_func uses); with 2 views both coincide."""
    def log_of_sum(zs, t):
        z = F.normalize(torch.cat(zs), dim=1)
        n, total = zs[0].shape[0], z.shape[0]
        logits = (z @ z.T / t).masked_fill(torch.eye(total, dtype=torch.bool), float("-inf"))
        same = (torch.arange(total)[:, None] % n == torch.arange(total)[None] % n) & ~torch.eye(total, dtype=torch.bool)
        log_prob = logits - logits.logsumexp(1, keepdim=True)
        return -log_prob.masked_fill(~same, float("-inf")).logsumexp(1).mean()
    zs = [randn(8, 4, seed=v) for v in range(3)]
    torch.testing.assert_close(nt_xent_loss(*zs[:2], temperature=0.3), log_of_sum(zs[:2], 0.3))
    assert abs(multiview_nt_xent_loss(zs, temperature=0.3) - log_of_sum(zs, 0.3)) > 0.1


# ---- Barlow Twins ---------------------------------------------------------------------------
@pytest.mark.parametrize("n,d,lambd", [(8, 4, 0.0051), (64, 32, 0.0051), (33, 100, 0.1)])
def test_barlow_matches_float64_reference(n, d, lambd):
    z1 = randn(n, d, seed=n) * 3 + 1
    z2 = z1 + randn(n, d, seed=d)
    ours = barlow_twins_loss(z1, z2, lambd=lambd)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), reference_barlow(z1, z2, lambd), rtol=1e-5, atol=1e-5)
    z1, z2 = z1.double().requires_grad_(), z2.double().requires_grad_()
    for a, b in zip(torch.autograd.grad(barlow_twins_loss(z1, z2, lambd=lambd), (z1, z2)),
                    torch.autograd.grad(reference_barlow(z1, z2, lambd), (z1, z2))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_barlow_is_zero_for_standardised_decorrelated_identical_views():
    """Columns 1..8 of a 16x16 Hadamard matrix: zero mean, biased variance 1, mutually orthogonal."""
    h = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(4):
        h = torch.kron(h, torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64))
    z, d, eps = h[:, 1:9], 8, 1e-5
    terms = barlow_twins_terms(z, z.clone())
    assert terms["off_diagonal"].item() < 1e-28
    assert terms["on_diagonal"].item() == pytest.approx(d * (eps / (1 + eps)) ** 2, rel=1e-9)  # 8.0e-10
    assert barlow_twins_loss(1e3 * z, 1e3 * z).item() < 1e-20  # scale >> eps: c = I to 1e-11


def test_barlow_fp32_island_under_autocast():
    z1, z2 = randn(16, 8, seed=3), randn(16, 8, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = barlow_twins_loss(z1.bfloat16(), z2.bfloat16())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), reference_barlow(z1.bfloat16(), z2.bfloat16()), rtol=1e-5, atol=1e-5)


# ---- BYOL -----------------------------------------------------------------------------------
def test_byol_regression_exact_values_and_stop_gradient():
    p = randn(8, 16, seed=5)
    assert byol_regression_loss(p, p.clone()).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_regression_loss(p, -p).item() == pytest.approx(4.0, abs=1e-6)
    assert byol_regression_loss(3 * p, p).item() == pytest.approx(0.0, abs=1e-6)  # scale-invariant
    z = randn(8, 16, seed=6).requires_grad_()
    byol_regression_loss(p.requires_grad_(), z).backward()
    assert z.grad is None and p.grad is not None, "the target is behind a stop-gradient"
    assert byol_loss([p, p], [-p, -p]).item() == pytest.approx(8.0, abs=1e-5)  # official loss_1 + loss_2


@pytest.mark.parametrize("views", [2, 4])
def test_byol_matches_float64_reference(views):
    ps, zs = [randn(8, 16, seed=v) for v in range(views)], [randn(8, 16, seed=10 + g) for g in range(2)]
    torch.testing.assert_close(byol_loss(ps, zs).double(), reference_byol(ps, zs), rtol=1e-6, atol=1e-6)


def test_nt_xent_and_byol_fp32_islands_under_autocast():
    z1, z2 = randn(16, 8, seed=7).bfloat16(), randn(16, 8, seed=8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nt, byol = nt_xent_loss(z1, z2, temperature=0.1), byol_regression_loss(z1, z2)
    assert nt.dtype == byol.dtype == torch.float32
    torch.testing.assert_close(nt.double(), reference_nt_xent([z1, z2], 0.1), rtol=1e-5, atol=1e-6)


# ---- methods --------------------------------------------------------------------------------
def test_registry_and_bad_configurations():
    assert METHODS["simclr"] is SimCLR and METHODS["barlow"] is BarlowTwins and METHODS["byol"] is BYOL
    small = dict(backbone="convnet", backbone_kwargs={"width": 4}, image_size=12)
    with pytest.raises(ValueError, match="must end in the projector's output width 16"):
        BYOL(projector="32-16", predictor="32-8", **small)
    x = randn(4, 3, 12, 12)
    with pytest.raises(ValueError, match="exactly 2 views, got 3"):
        BarlowTwins(projector="16-16", **small).ssl_step([x, x, x])
    with pytest.raises(ValueError, match="at least 2 views"):
        SimCLR(projector="16-8", **small).ssl_step([x])


def make_simclr() -> SimCLR:
    torch.manual_seed(0)
    method = SimCLR(backbone="convnet", backbone_kwargs={"width": 4}, projector="32-16", temperature=0.2,
                    in_chans=3, image_size=12, num_classes=0)
    method.configure_model()
    return method


def make_barlow() -> BarlowTwins:
    torch.manual_seed(0)
    method = BarlowTwins(backbone="convnet", backbone_kwargs={"width": 4}, projector="32-32-16",
                         in_chans=3, image_size=12, num_classes=0)
    method.configure_model()
    return method


def make_byol() -> BYOL:
    torch.manual_seed(0)
    method = BYOL(backbone="convnet", backbone_kwargs={"width": 4}, projector="32-16", predictor="32-16",
                  in_chans=3, image_size=12, num_classes=0)
    method.configure_model()
    return method


def make_two_views() -> list[torch.Tensor]:
    return [randn(WORLD * B_LOCAL, 3, 12, 12, seed=1), randn(WORLD * B_LOCAL, 3, 12, 12, seed=2)]


def make_multicrop_views() -> list[torch.Tensor]:
    """2 global 12 px views and 2 local 8 px views."""
    return make_two_views() + [randn(WORLD * B_LOCAL, 3, 8, 8, seed=3), randn(WORLD * B_LOCAL, 3, 8, 8, seed=4)]


def official_cross_correlation(z1, z2):
    """The official main.py: global (SyncBN) standardisation, then the LOCAL c summed over ranks by a
    plain in-place all_reduce that autograd does not see."""
    from ssl_lightning.distributed import all_reduce_no_grad, all_reduce_sum_with_grad, world_size

    def standardise(z):
        n = z.shape[0] * world_size()
        mean = all_reduce_sum_with_grad(z.sum(0)) / n
        var = all_reduce_sum_with_grad((z - mean).pow(2).sum(0)) / n
        return (z - mean) / torch.sqrt(var + 1e-5)

    c = standardise(z1).T @ standardise(z2) / (z1.shape[0] * world_size())
    return c + (all_reduce_no_grad(c) - c).detach()


def byol_step_then_ema(rank, world):
    """One BYOL step (SGD lr 0.5, then EMA with m = 0.9) on 2 ranks, or on 1 process when world == 1."""
    method, views = make_byol(), make_multicrop_views()
    model = DistributedDataParallel(StepWrapper(method)) if world > 1 else StepWrapper(method)
    loss = model(*[v.chunk(world)[rank] for v in views])
    loss.backward()
    if world > 1:
        loss = loss.detach().clone()
        torch.distributed.all_reduce(loss)
    out = snapshot(method, loss / world)
    torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5).step()
    for name, teacher in method.teacher.items():
        ema_update(teacher, getattr(method, name), 0.9)
    out["teacher"] = {n: p.clone() for n, p in method.teacher.named_parameters()}
    return out


def all_ddp_steps(rank, world):
    """Every 2-rank run of this file in one spawn (process start-up dominates on a small CPU)."""
    import ssl_lightning.losses.barlow as barlow

    out = {"simclr": ddp_step(rank, world, make_simclr, make_multicrop_views),
           "barlow": ddp_step(rank, world, make_barlow, make_two_views),
           "byol": byol_step_then_ema(rank, world)}
    correct, barlow.cross_correlation = barlow.cross_correlation, official_cross_correlation
    try:
        out["barlow_all_reduce"] = ddp_step(rank, world, make_barlow, make_two_views)
    finally:
        barlow.cross_correlation = correct
    return out


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    return run_distributed(all_ddp_steps, out_dir=tmp_path_factory.mktemp("ddp"))


@pytest.mark.distributed
def test_simclr_multicrop_step_equals_single_process(ddp_runs):
    assert_equivalent(single_process_step(make_simclr, make_multicrop_views), [r["simclr"] for r in ddp_runs])


@pytest.mark.distributed
def test_barlow_step_equals_single_process_and_plain_all_reduce_is_w_times_too_small(ddp_runs):
    ref = single_process_step(make_barlow, make_two_views)
    assert_equivalent(ref, [r["barlow"] for r in ddp_runs])
    for r in (r["barlow_all_reduce"] for r in ddp_runs):
        assert rel_err(r["loss"], ref["loss"]) <= 1e-5, "same loss value: only the gradient is wrong"
        for name, g in ref["grads"].items():
            assert rel_err(WORLD * r["grads"][name], g) <= 1e-4, f"{name}: gradient not exactly 1/W of the true one"


@pytest.mark.distributed
def test_byol_multicrop_step_equals_single_process_teacher_included(ddp_runs):
    ref, ranks = byol_step_then_ema(0, 1), [r["byol"] for r in ddp_runs]
    assert not any(name.startswith("teacher.") for name in ref["grads"]), "the target gets no gradient"
    assert any(name.startswith("teacher.") and "running_var" in name for name in ref["buffers"])
    # The online projector's last bias feeds the predictor's BatchNorm, which removes it: its gradient
    # is 0 up to rounding (~1e-7), where a relative error means nothing. Compare it in absolute terms.
    bias = "projector.3.bias"
    for r in [ref, *ranks]:
        assert r["grads"].pop(bias).abs().max() < 1e-6
    assert_equivalent(ref, ranks)  # includes the teacher's BatchNorm running statistics (global BN)
    for r in ranks:
        for name, p in ref["teacher"].items():
            torch.testing.assert_close(r["teacher"][name], p, rtol=1e-5, atol=1e-6, msg=name)


# ---- BYOL resume: the EMA teacher is part of the exact state -------------------------------


class FirstStep(pl.Callback):
    """Teacher before training, student and teacher right after optimizer step 1."""

    def on_train_start(self, trainer, pl_module):
        self.teacher0 = {n: p.detach().clone() for n, p in pl_module.teacher.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1:
            self.student1 = {f"{k}.{n}": p.detach().clone() for k in pl_module.teacher
                             for n, p in getattr(pl_module, k).named_parameters()}
            self.teacher1 = {n: p.detach().clone() for n, p in pl_module.teacher.named_parameters()}
            self.momenta = pl_module.momentum_at(0), pl_module.momentum_at(1)


def fit_byol(ckpt_dir, *, callbacks=(), ckpt_path=None):
    pl.seed_everything(0)
    data = tiny_data()
    model = BYOL(backbone="convnet", backbone_kwargs={"width": 4}, projector="32-16", predictor="32-16",
                 base_momentum=0.9, optimizer=OptimizerConfig(name="lars", lr=0.3, warmup_epochs=0.5),
                 num_classes=data.num_classes, in_chans=data.channels, image_size=data.image_size,
                 batch_size=data.hparams.batch_size)
    trainer = tiny_trainer(ckpt_dir)
    trainer.callbacks.extend(callbacks)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model, trainer


@pytest.mark.slow
def test_byol_resume_is_bit_identical_including_the_teacher(tmp_path):
    first = FirstStep()
    straight, t_straight = fit_byol(tmp_path / "straight", callbacks=[first])
    fit_byol(tmp_path / "split", callbacks=[StopAfterEpochs(1)])
    resumed, t_resumed = fit_byol(tmp_path / "split", ckpt_path="last")
    assert t_resumed.global_step == t_straight.global_step == 8
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and any(k.startswith("teacher.") for k in a)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ after resume: {different}"
    for name, t0 in first.teacher0.items():  # the EMA ran, and the teacher lags behind the student
        if t0.ndim > 1:  # (projector.3.bias never moves: the predictor's BatchNorm gives it no gradient)
            assert not torch.equal(a[f"teacher.{name}"], t0) and not torch.equal(a[f"teacher.{name}"], a[name]), name

    # step 1: teacher = m0 * teacher0 + (1 - m0) * student1, m0 = momentum_at(0) = 0.9 (after the step)
    m0, m1 = first.momenta
    assert m0 == pytest.approx(0.9) and m1 > m0
    for name, t1 in first.teacher1.items():
        t0, s1 = first.teacher0[name].double(), first.student1[name].double()
        torch.testing.assert_close(t1.double(), m0 * t0 + (1 - m0) * s1, rtol=1e-6, atol=1e-7, msg=name)
    worst = max((t1.double() - (m1 * first.teacher0[n].double() + (1 - m1) * first.student1[n].double())).abs().max()
                for n, t1 in first.teacher1.items())
    assert worst > 1e-6, "momentum_at(1) would give a different teacher: the check can fail"
