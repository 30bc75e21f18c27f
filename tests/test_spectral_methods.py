"""W-MSE, INTL, INTL-M and ST as methods.

- DDP equivalence: one step on 2 gloo ranks (6 samples each) equals one process on the 12
  concatenated samples (loss rel. 1e-5, every gradient rel. 1e-4, BN running stats equal), because
  every method gathers the views and whitens the GLOBAL batch (W-MSE: the same random sub-batch split
  of the global batch on every rank). All four methods share one 2-process launch.
- Negative control (single process, cheap): whitening each half of the batch separately, as a
  per-GPU implementation would, changes the loss by far more than the tolerance.
- INTL's default beta is 0.01 (log2 B - 3) of the GLOBAL batch: 0.05 at B = 256.
(Each fashion_mnist YAML trains 3 steps through the CLI in test_experiment_configs.py.)
"""
import math

import pytest
import torch

from ddp import run_distributed
from equivalence import assert_equivalent, ddp_step, single_process_step
from ssl_lightning import spectral
from ssl_lightning.losses import intl_beta, intl_terms, norm_mse, st_loss, wmse_loss
from ssl_lightning.methods import INTL, INTLM, METHODS, WMSE, SpectralTransform

B_LOCAL, WORLD, SIZE = 6, 2, 12
TINY = dict(backbone="convnet", backbone_kwargs={"width": 4}, in_chans=3, image_size=SIZE, num_classes=0)


def _configured(method):
    torch.manual_seed(0)
    method = method()
    method.configure_model()
    return method


def make_wmse():
    # D = 4 < w_size = 6: the global batch of 12 is split into two sub-batches, w_iter = 2 splits
    return _configured(lambda: WMSE(projector="16-4", w_size=6, w_iter=2, **TINY))


def make_intl():
    return _configured(lambda: INTL(projector="16-16-32", **TINY))


def make_st():
    return _configured(lambda: SpectralTransform(projector="16-32", power=0.5, **TINY))


def make_intl_m():
    return _configured(lambda: INTLM(projector="16-32", base_momentum=0.99, **TINY))


def make_views():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(B_LOCAL * WORLD, 3, SIZE, SIZE, generator=g) for _ in range(2)]


def make_multicrop_views():  # INTL-M: the teacher's view, a second global view, a local crop
    g = torch.Generator().manual_seed(2)
    return [torch.randn(B_LOCAL * WORLD, 3, s, s, generator=g) for s in (SIZE, SIZE, 8)]


CASES = {"wmse": (make_wmse, make_views), "intl": (make_intl, make_views), "st": (make_st, make_views),
         "intl_m": (make_intl_m, make_multicrop_views)}


def ddp_all(rank: int, world: int) -> dict:
    return {name: ddp_step(rank, world, *fns) for name, fns in CASES.items()}


@pytest.mark.distributed
def test_two_ranks_equal_one_process(tmp_path):
    ranks = run_distributed(ddp_all, out_dir=tmp_path)
    for name, fns in CASES.items():
        ref = single_process_step(*fns)
        assert torch.isfinite(ref["loss"]) and ref["loss"] > 0, name
        assert_equivalent(ref, [r[name] for r in ranks])


def test_whitening_the_halves_separately_is_not_the_global_loss():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(12, 16, generator=g), torch.randn(12, 16, generator=g)
    halves = [(z1[:6], z2[:6]), (z1[6:], z2[6:])]
    per_gpu = sum(intl_terms(list(h))["trace"] for h in halves) / 2
    assert abs(per_gpu / intl_terms([z1, z2])["trace"] - 1) > 1e-2
    per_gpu = sum(st_loss(list(h)) for h in halves) / 2
    assert abs(per_gpu / st_loss([z1, z2]) - 1) > 1e-2
    # W-MSE whitens 4 dims in sub-batches of 6: one split of the 12 vs each half on its own
    per_gpu = sum(wmse_loss([a[:, :4], b[:, :4]], w_size=6) for a, b in halves) / 2
    assert abs(per_gpu / wmse_loss([z1[:, :4], z2[:, :4]], w_size=6) - 1) > 1e-2


def test_wmse_split_is_shared_by_the_views_and_seeded():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(12, 4, generator=g)
    # identical views have identical whitened rows only if both views use the same split
    assert wmse_loss([z, z.clone()], w_size=6, seed=3).abs() < 1e-6
    other = torch.randn(12, 4, generator=g)
    assert wmse_loss([z, other], w_size=6, seed=3) == wmse_loss([z, other], w_size=6, seed=3)
    assert wmse_loss([z, other], w_size=6, seed=3) != wmse_loss([z, other], w_size=6, seed=4)
    # one sub-batch = whitening the whole batch: 2 - 2 mean cos of the two whitened views
    whole = norm_mse(spectral.cholesky_whiten(z), spectral.cholesky_whiten(other))
    torch.testing.assert_close(wmse_loss([z, other], w_size=12), whole)


def test_intl_default_beta_and_loss():
    assert intl_beta(256, 2048, axis=0) == pytest.approx(0.05)
    assert intl_beta(1024, 2048, axis=0) == pytest.approx(0.07)
    assert intl_beta(256, 8192, axis=1) == pytest.approx(0.10)
    with pytest.raises(ValueError, match="negative.*set beta"):
        intl_beta(4, 2048, axis=0)
    method = make_intl()
    views = make_views()
    out = method.ssl_step(views)
    beta = 0.01 * (math.log2(12) - 3)
    torch.testing.assert_close(out.loss, out.logs["alignment"] + beta * out.logs["trace"])
    assert out.features.shape == (12, method.feature_dim)


def test_configuration_errors_name_the_fix():
    with pytest.raises(ValueError, match="w_size > 64"):
        WMSE(projector="16-64", w_size=64, **TINY)
    method = _configured(lambda: WMSE(projector="16-4", w_size=5, **TINY))
    with pytest.raises(ValueError, match="global batch 12 is not divisible.*w_size=5"):
        method.ssl_step(make_views())
    with pytest.raises(ValueError, match="axis"):
        INTL(projector="16-8", axis=2, **TINY)


def test_registered():
    assert {"wmse": WMSE, "intl": INTL, "intl_m": INTLM, "st": SpectralTransform}.items() <= METHODS.items()
