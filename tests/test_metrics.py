"""Pure metric functions of ssl_lightning.metrics, against closed-form cases and float64 references."""
import math
import re

import numpy as np
import pytest
import torch

from ssl_lightning.metrics import (
    collapse_stats,
    effective_rank,
    eigenspectrum,
    knn_accuracy,
    knn_predict,
    rankme,
)

N_ISO, D_ISO = 20000, 32


@pytest.fixture(scope="module")
def iso():
    """Isotropic Gaussian, N >> D: all singular values ~ sqrt(N) (spread ~ 2 sqrt(D / N) ~ 8%)."""
    return torch.randn(N_ISO, D_ISO, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def rank_r(n, d, r, scale=3.0, seed=0):
    """z = scale * Q R^T with Q (n, r), R (d, r) orthonormal columns: exactly r singular values, all = scale."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0]
    rr = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64))[0]
    return scale * q @ rr.T


def rank_one(n=5000, d=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, generator=g, dtype=torch.float64) @ torch.randn(1, d, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------- RankMe / effective rank
@pytest.mark.parametrize("fn", [rankme, effective_rank])
def test_isotropic_rank_close_to_d(fn, iso):
    # Singular values within ~8% of each other -> entropy within ~0.1% of log D; allow 2% on the rank.
    r = fn(iso)
    assert r.dtype == torch.float64 and r.dim() == 0
    assert abs(r.item() - D_ISO) < 0.02 * D_ISO
    assert r.item() <= D_ISO * (1 + 1e-4)  # effective rank <= min(N, D) (RankMe: + eps slack)


@pytest.mark.parametrize("fn", [rankme, effective_rank])
def test_rank_one_data_close_to_one(fn):
    # One non-zero singular value: erank = 1; RankMe adds 31 * (-eps log eps) ~ 5e-5 of entropy.
    assert 1 - 1e-9 <= fn(rank_one()).item() < 1.05


@pytest.mark.parametrize("fn", [rankme, effective_rank])
def test_scale_invariant(fn, iso):
    # p_k = s_k / sum(s) does not change under z -> c z (float64 data so 7.3 * z rounds at 1e-16).
    assert abs(fn(iso).item() - fn(7.3 * iso).item()) < 1e-10
    z = rank_r(500, 32, 4, seed=3) + 1e-3 * iso[:500]
    assert abs(fn(z).item() - fn(7.3 * z).item()) < 1e-10


@pytest.mark.parametrize("r", [1, 5, 17])
def test_exact_rank_r_equal_singular_values(r):
    # r equal singular values: p = 1/r on r entries -> erank = r exactly; RankMe = r up to the eps effect.
    z = rank_r(2000, 32, r)
    assert effective_rank(z).item() == pytest.approx(r, rel=1e-9)
    assert rankme(z).item() == pytest.approx(r, rel=1e-3)


def test_n_smaller_than_d_rank_at_most_n():
    z = torch.randn(10, 64, generator=torch.Generator().manual_seed(2))
    er, rm = effective_rank(z).item(), rankme(z).item()
    assert 7 < er <= 10 + 1e-9
    assert 7 < rm <= 10 * (1 + 1e-4)


def test_rankme_vs_effective_rank_bound(iso):
    # Provable relation: f(x) = -x log x is concave, so f(x + eps) - f(x) is non-increasing on [0, 1] and
    # lies in [f(1 + eps) - f(1), f(eps) - f(0)] = [-(1 + eps) log(1 + eps), -eps log eps]
    # (and -(1+eps) log(1+eps) >= -(1+eps) eps). Summing over K = min(N, D) singular values:
    #   -K eps (1 + eps)  <=  log RankMe - log erank  <=  -K eps log eps.
    # So RankMe <= erank * exp(-K eps log eps) (i.e. <= erank + a small eps effect), and it is not
    # generally below erank: the eps mass raises the entropy of small p_k (RankMe >= erank here).
    eps = 1e-7
    cases = [iso, rank_one(), rank_r(2000, 32, 5), torch.randn(10, 64, generator=torch.Generator().manual_seed(4)),
             iso * torch.logspace(0, -6, D_ISO, dtype=torch.float64)]
    for z in cases:
        k = min(z.shape)
        gap = math.log(rankme(z, eps=eps).item()) - math.log(effective_rank(z).item())
        assert -k * eps * (1 + eps) - 1e-12 <= gap <= -k * eps * math.log(eps) + 1e-12


# ---------------------------------------------------------------- eigenspectrum
@pytest.mark.parametrize("n,d", [(500, 16), (8, 20)])
def test_eigenspectrum(n, d):
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(n)) * torch.linspace(0.1, 3, d)
    ev = eigenspectrum(z)
    assert ev.shape == (d,) and ev.dtype == torch.float64
    assert (ev >= 0).all()
    assert (ev[:-1] >= ev[1:]).all()  # descending
    cov = torch.cov(z.double().T)
    assert ev.sum().item() == pytest.approx(torch.trace(cov).item(), rel=1e-8)
    ref = np.clip(np.linalg.eigvalsh(np.cov(z.double().numpy().T))[::-1], 0, None)
    np.testing.assert_allclose(ev.numpy(), ref, rtol=1e-8, atol=1e-10 * ref.max())
    if n <= d:  # rank of the centred data is at most N - 1
        assert (ev[n - 1:] < 1e-10 * ev[0]).all()


# ---------------------------------------------------------------- kNN
def test_knn_separated_clusters_is_perfect():
    # 5 clusters at 10 * e_c in 16-D, unit noise: cos sim ~0.93 to own centre, ~0 to others.
    g = torch.Generator().manual_seed(0)
    centres = 10 * torch.eye(16)[:5]
    bank_labels = torch.arange(5).repeat_interleave(50)
    bank = centres[bank_labels] + torch.randn(250, 16, generator=g)
    query_labels = torch.arange(5).repeat(20)
    query = centres[query_labels] + torch.randn(100, 16, generator=g)
    acc = knn_accuracy(query, query_labels, bank, bank_labels, num_classes=5, k=20, temperature=0.07)
    assert acc == 1.0


def test_knn_k1_returns_own_label():
    g = torch.Generator().manual_seed(1)
    bank = torch.randn(30, 8, generator=g)
    labels = torch.randint(0, 4, (30,), generator=g)
    scores = knn_predict(bank * 2.5, bank, labels, num_classes=4, k=1)  # scaling: cosine ignores norm
    assert scores.shape == (30, 4)
    assert torch.equal(scores.argmax(1), labels)


def test_knn_temperature_weighting_beats_majority():
    # query e_0; class 0 neighbour at angle 0.1 (sim .995); two class 1 at angle 1 (sim .540); class 2 opposite.
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    ang = torch.tensor([0.1, 1.0, -1.0, math.pi], dtype=torch.float64)
    bank = torch.stack([ang.cos(), ang.sin()], 1) * torch.tensor([[1.0], [3.0], [0.5], [2.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 2])
    for t, winner in [(0.07, 0), (10.0, 1)]:  # sharp: exp(.995/.07) >> 2 exp(.54/.07); flat: majority wins
        scores = knn_predict(q, bank, labels, num_classes=3, k=3, temperature=t)
        sims = ang.cos()[:3]
        ref = torch.tensor([[torch.exp(sims[0] / t), torch.exp(sims[1:] / t).sum(), 0.0]], dtype=torch.float64)
        torch.testing.assert_close(scores, ref, rtol=1e-12, atol=0)
        assert scores.argmax(1).item() == winner


def test_knn_k_larger_than_bank():
    bank = torch.randn(4, 3, generator=torch.Generator().manual_seed(5))
    scores = knn_predict(bank, bank, torch.tensor([0, 1, 0, 1]), num_classes=2, k=20)
    assert scores.shape == (4, 2) and torch.isfinite(scores).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_knn_chunking_gives_same_scores(dtype):
    g = torch.Generator().manual_seed(6)
    query, bank = torch.randn(53, 12, generator=g, dtype=dtype), torch.randn(40, 12, generator=g, dtype=dtype)
    labels = torch.randint(0, 6, (40,), generator=g)
    small = knn_predict(query, bank, labels, num_classes=6, k=5, temperature=0.1, chunk_size=7)
    big = knn_predict(query, bank, labels, num_classes=6, k=5, temperature=0.1, chunk_size=10**6)
    assert small.shape == big.shape == (53, 6) and small.dtype == dtype
    # Same rows, same arithmetic; tolerance only guards against BLAS picking another kernel per chunk shape.
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(small, big, rtol=tol, atol=0)
    assert torch.equal(small.argmax(1), big.argmax(1))


# ---------------------------------------------------------------- collapse stats
def test_collapse_stats_collapsed():
    g = torch.Generator().manual_seed(7)
    z = torch.randn(1, 32, generator=g).expand(500, 32) + 1e-6 * torch.randn(500, 32, generator=g)
    s = collapse_stats(z)
    assert set(s) == {"min_std", "mean_std", "rankme", "effective_rank"}
    assert all(isinstance(v, float) for v in s.values())
    assert s["min_std"] < 1e-4 and s["mean_std"] < 1e-4
    assert s["rankme"] < 1.01 and s["effective_rank"] < 1.01


def test_collapse_stats_isotropic(iso):
    # Each coordinate of a uniformly random unit vector has variance 1 / D.
    s = collapse_stats(iso)
    assert s["mean_std"] == pytest.approx(1 / math.sqrt(D_ISO), rel=0.02)
    assert s["min_std"] == pytest.approx(1 / math.sqrt(D_ISO), rel=0.05)
    assert s["rankme"] == pytest.approx(D_ISO, rel=0.02)


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize("fn", [eigenspectrum, rankme, effective_rank, collapse_stats])
@pytest.mark.parametrize("shape", [(5,), (1, 8), (2, 3, 4)])
def test_bad_input_raises_with_shape(fn, shape):
    with pytest.raises(ValueError, match=re.escape(str(shape))):
        fn(torch.zeros(shape))
