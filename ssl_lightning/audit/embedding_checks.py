"""Checks on SSL embeddings (``audit --ckpt``): near duplicates by cosine similarity, kNN outliers, and
k-means cluster sizes (a collection dominated by one kind of image, with or without labels).

Everything is on L2-normalised features (N, D), compared in chunks of rows so memory is O(chunk x N).
"""
from __future__ import annotations

import torch

CHUNK = 2048


def normalise(features: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, D) float32 rows of unit length."""
    return torch.nn.functional.normalize(features.float(), dim=1)


def knn_similarities(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities (N, k) and indices (N, k) of each row's k nearest other rows of unit z (N, D)."""
    k = min(k, len(z) - 1)
    sims, index = [], []
    for start in range(0, len(z), CHUNK):
        block = z[start:start + CHUNK] @ z.T  # (chunk, N)
        block[torch.arange(len(block)), torch.arange(start, start + len(block))] = -2.0  # not itself
        s, i = block.topk(k, dim=1)
        sims.append(s)
        index.append(i)
    return torch.cat(sims), torch.cat(index)


def outliers(z: torch.Tensor, k: int, mad_factor: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(kNN distance (N,): 1 - mean cosine similarity to the k nearest, flagged (N,) bool, cut-off):
    flagged when the distance exceeds median + mad_factor x 1.4826 x MAD (robust z-score)."""
    sims, _ = knn_similarities(z, k)
    distance = 1 - sims.mean(1)
    median = distance.median()
    mad = 1.4826 * (distance - median).abs().median()
    cutoff = float(median + mad_factor * mad)
    return distance, distance > cutoff, cutoff


def embedding_pairs(z: torch.Tensor, min_cosine: float) -> list[tuple[int, int, float]]:
    """(i, j, cosine) for every pair i < j of unit rows with cosine similarity >= min_cosine."""
    pairs = []
    for start in range(0, len(z), CHUNK):
        block = z[start:start + CHUNK] @ z.T
        rows, cols = torch.nonzero(block >= min_cosine, as_tuple=True)
        keep = cols > rows + start
        for r, c in zip(rows[keep].tolist(), cols[keep].tolist()):
            pairs.append((r + start, c, float(block[r, c])))
    return pairs


def kmeans(z: torch.Tensor, k: int, *, iterations: int = 30, seed: int = 0) -> torch.Tensor:
    """Spherical k-means (cosine) with k-means++ seeding -> assignments (N,) int64 in [0, k)."""
    k = min(k, len(z))
    g = torch.Generator().manual_seed(seed)
    centres = [z[torch.randint(len(z), (1,), generator=g)].squeeze(0)]
    closest = torch.full((len(z),), 2.0)
    for _ in range(1, k):
        closest = torch.minimum(closest, 1 - z @ centres[-1])
        weights = closest.clamp_min(0) ** 2
        pick = torch.multinomial(weights if weights.sum() > 0 else torch.ones(len(z)), 1, generator=g)
        centres.append(z[pick].squeeze(0))
    centres = torch.stack(centres)
    for _ in range(iterations):
        assign = torch.cat([(z[s:s + CHUNK] @ centres.T).argmax(1) for s in range(0, len(z), CHUNK)])
        sums = torch.zeros_like(centres).index_add_(0, assign, z)
        counts = torch.bincount(assign, minlength=k)
        centres = torch.where(counts[:, None] > 0, normalise(sums), centres)
    return assign


def cluster_summary(assign: torch.Tensor, k: int) -> dict:
    """Sizes (largest first, with their cluster ids), the largest cluster's share, and its share relative
    to an even split (1.0 = balanced)."""
    sizes = torch.bincount(assign, minlength=k)
    order = sizes.argsort(descending=True)
    largest = float(sizes.max()) / max(1, len(assign))
    return {"k": k, "sizes": sizes[order].tolist(), "ids": order.tolist(), "largest_share": round(largest, 4),
            "largest_vs_even": round(largest * k, 3)}
