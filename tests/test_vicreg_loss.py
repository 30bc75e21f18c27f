"""VICReg loss vs a float64 transcription of the official code (facebookresearch/vicreg)."""
import pytest
import torch

from ssl_lightning.losses import vicreg_loss, vicreg_terms


def reference_vicreg(x, y, sim=25.0, var=25.0, cov=1.0, eps=1e-4, halve=True):
    """Straight float64 reading of main_vicreg.py: repr_loss, std_loss, cov_loss."""
    x, y = x.double(), y.double()
    n, d = x.shape
    repr_loss = ((x - y) ** 2).mean()
    x, y = x - x.mean(0), y - y.mean(0)
    std_x = torch.sqrt(x.var(dim=0) + eps)
    std_y = torch.sqrt(y.var(dim=0) + eps)
    std_loss = torch.relu(1 - std_x).mean() + torch.relu(1 - std_y).mean()
    if halve:
        std_loss = std_loss / 2
    cov_x, cov_y = x.T @ x / (n - 1), y.T @ y / (n - 1)
    off = ~torch.eye(d, dtype=torch.bool)
    cov_loss = cov_x[off].pow(2).sum() / d + cov_y[off].pow(2).sum() / d
    return sim * repr_loss + var * std_loss + cov * cov_loss


@pytest.mark.parametrize("halve", [True, False])
@pytest.mark.parametrize("n,d", [(8, 4), (64, 32), (33, 100)])
def test_matches_float64_reference(n, d, halve):
    g = torch.Generator().manual_seed(n * d)
    z1 = torch.randn(n, d, generator=g) * 0.5
    z2 = z1 + 0.3 * torch.randn(n, d, generator=g)
    ours = vicreg_loss(z1, z2, halve_variance=halve)
    ref = reference_vicreg(z1, z2, halve=halve)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)


def test_gradients_match_reference():
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(16, 8, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(16, 8, generator=g, dtype=torch.float64, requires_grad=True)
    ours = torch.autograd.grad(vicreg_loss(z1, z2), (z1, z2))
    ref = torch.autograd.grad(reference_vicreg(z1, z2), (z1, z2))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_zero_for_ideal_embeddings():
    """Identical views, unit variance per dim (std = sqrt(1 + eps) > 1), orthogonal dims => loss 0."""
    n, d = 64, 16
    x = torch.randn(n, d, dtype=torch.float64)
    q, _ = torch.linalg.qr(x - x.mean(0))  # centred orthonormal columns
    z = q * (n - 1) ** 0.5  # unbiased variance exactly 1, zero covariance
    assert vicreg_loss(z, z.clone()).abs() < 1e-12


def test_terms_and_weights():
    z1, z2 = torch.randn(32, 8), torch.randn(32, 8)
    t = vicreg_terms(z1, z2)
    weighted = vicreg_loss(z1, z2, sim_weight=2.0, var_weight=3.0, cov_weight=5.0)
    torch.testing.assert_close(weighted, 2 * t["invariance"] + 3 * t["variance"] + 5 * t["covariance"])


def test_collapsed_embeddings_pay_full_variance_penalty():
    """All-identical embeddings: std = sqrt(eps) = 0.01, so each dim pays relu(1 - 0.01) = 0.99."""
    z = torch.ones(16, 4)
    t = vicreg_terms(z, z)
    assert t["variance"].item() == pytest.approx(0.99, abs=1e-6)
    assert t["invariance"].item() == 0.0 and t["covariance"].item() == 0.0


def test_fp32_island_under_autocast():
    z1, z2 = torch.randn(16, 8), torch.randn(16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = vicreg_loss(z1.bfloat16(), z2.bfloat16())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), reference_vicreg(z1.bfloat16().float(), z2.bfloat16().float()),
                               rtol=1e-5, atol=1e-6)


def test_batch_of_one_is_an_error():
    with pytest.raises(ValueError, match="at least 2 samples"):
        vicreg_loss(torch.randn(1, 4), torch.randn(1, 4))
