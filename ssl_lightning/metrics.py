"""Pure representation-quality metrics: spectrum, RankMe / effective rank, weighted kNN, collapse stats.

All functions are side-effect free, take plain tensors and do the numerically delicate parts
(SVD, eigendecomposition, entropies) in float64.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_lightning.spectral import eigenspectrum  # the covariance spectrum lives with the other linear algebra

__all__ = ["eigenspectrum", "rankme", "effective_rank", "knn_predict", "knn_accuracy", "collapse_stats",
           "topk_accuracy"]


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> torch.Tensor:
    """0-dim float tensor: the fraction of the samples labelled >= 0 whose label is among their k highest
    logits (b, K), 0 when none is labelled. Same ops for every batch (no boolean indexing, whose
    data-dependent size would make the host wait for a GPU), so it stays on the device."""
    labelled = labels >= 0
    hit = (logits.topk(k, dim=1).indices == labels.clamp(min=0)[:, None]).any(dim=1) & labelled
    return hit.sum() / labelled.sum().clamp(min=1)


def _check_embeddings(z: torch.Tensor, name: str = "z") -> None:
    if z.dim() != 2 or z.shape[0] < 2:
        raise ValueError(f"{name} must be a 2-D tensor (N, D) with N >= 2, got shape {tuple(z.shape)}")


def _singular_value_distribution(z: torch.Tensor) -> torch.Tensor:
    """(min(N, D),) float64 singular values of the (not centred) z (N, D), normalised to sum to 1."""
    _check_embeddings(z)
    s = torch.linalg.svdvals(z.detach().to(torch.float64))
    return s / s.sum().clamp_min(torch.finfo(torch.float64).tiny)


def rankme(z: torch.Tensor, *, eps: float = 1e-7) -> torch.Tensor:
    """RankMe (Garrido et al., 2023) of z (N, D): exp(-sum_k p_k log p_k), p_k = s_k / sum(s) + eps.

    s are the min(N, D) singular values of z, which is NOT centred. Scale invariant; lies in
    roughly [1, min(N, D)]. Returns a scalar float64 tensor.
    """
    p = _singular_value_distribution(z) + eps
    return torch.exp(-(p * torch.log(p)).sum())


def effective_rank(z: torch.Tensor) -> torch.Tensor:
    """Effective rank (Roy & Vetterli, 2007) of z (N, D): RankMe's entropy without eps (0 log 0 = 0).

    Scalar float64 tensor in [1, min(N, D)]; exactly r for r equal non-zero singular values.
    """
    p = _singular_value_distribution(z)
    plogp = torch.where(p > 0, p * torch.log(p.clamp_min(torch.finfo(torch.float64).tiny)), 0.0)
    return torch.exp(-plogp.sum())


def knn_predict(
    query: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Weighted kNN class scores (Wu et al., 2018; DINO ``eval_knn``).

    query (M, D) and bank (N, D) are L2-normalised; each query takes its top-k bank neighbours by
    cosine similarity (k is capped at N) and each neighbour votes exp(sim / temperature) for its
    label in bank_labels (N,) (ints in [0, num_classes)). Returns scores (M, num_classes) in the
    compute dtype (float32, or float64 for float64 inputs). Queries are processed in chunks of
    ``chunk_size`` so peak memory is O(chunk_size * N).
    """
    if query.dim() != 2 or bank.dim() != 2 or query.shape[1] != bank.shape[1] or bank.shape[0] < 1:
        raise ValueError(f"expected query (M, D) and bank (N, D) with N >= 1, got shapes "
                         f"{tuple(query.shape)} and {tuple(bank.shape)}")
    if bank_labels.shape != (bank.shape[0],):
        raise ValueError(f"bank_labels must have shape ({bank.shape[0]},), got {tuple(bank_labels.shape)}")
    if k < 1 or temperature <= 0 or chunk_size < 1:
        raise ValueError(f"need k >= 1, temperature > 0, chunk_size >= 1; got {k}, {temperature}, {chunk_size}")
    dtype = torch.promote_types(torch.promote_types(query.dtype, bank.dtype), torch.float32)
    q = F.normalize(query.detach().to(dtype), dim=1)
    b = F.normalize(bank.detach().to(dtype), dim=1)
    labels = bank_labels.detach().to(device=b.device, dtype=torch.long)
    k = min(k, b.shape[0])
    out = []
    for start in range(0, q.shape[0], chunk_size):
        sim = q[start:start + chunk_size] @ b.T  # (chunk, N)
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = torch.exp(top_sim / temperature)
        scores = torch.zeros(sim.shape[0], num_classes, dtype=dtype, device=sim.device)
        out.append(scores.scatter_add_(1, labels[top_idx], weights))
    if not out:
        return torch.zeros(0, num_classes, dtype=dtype, device=b.device)
    return torch.cat(out)


def knn_accuracy(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy in [0, 1] of ``knn_predict`` for query (M, D) with labels (M,) against bank (N, D)."""
    scores = knn_predict(query, bank, bank_labels, num_classes=num_classes, k=k, temperature=temperature)
    return (scores.argmax(dim=1).cpu() == query_labels.detach().cpu().long()).double().mean().item()


def collapse_stats(z: torch.Tensor) -> dict[str, float]:
    """Collapse diagnostics of z (N, D).

    ``min_std`` / ``mean_std``: min / mean over dimensions of the per-dimension std of the
    L2-normalised rows (SimSiam's check: ~1/sqrt(D) without collapse, ~0 when collapsed);
    ``rankme`` and ``effective_rank`` of z.
    """
    _check_embeddings(z)
    std = F.normalize(z.detach().to(torch.float64), dim=1).std(dim=0)
    return {
        "min_std": std.min().item(),
        "mean_std": std.mean().item(),
        "rankme": rankme(z).item(),
        "effective_rank": effective_rank(z).item(),
    }
