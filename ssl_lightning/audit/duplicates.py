"""Exact and near duplicates among the scan records, within a split and across splits (leaks).

Exact: the same decoded pixels. Files decoded DCT-reduced by the scan are grouped by the hash of the
reduced pixels first, and every group is confirmed on the full decode (two JPEGs that differ only in
fine detail have the same reduced decode).

Near: 64-bit perceptual hashes within ``max_hamming`` bits and 256-bit ones within ``max_fine``
bits (the coarse hash alone matches many distinct 28 px Fashion-MNIST items; docs/audit.md). The search is by bands (multi-index hashing):
split the 64 bits into ``max_hamming + 1`` bands; two hashes within ``max_hamming`` bits agree exactly
on at least one band (pigeonhole), so only pairs that share a band value are compared. Memory is
O(N) plus the pairs of one bucket chunk at a time; time is about N^2 / 2^(64 / (max_hamming + 1))
comparisons per band for uniformly spread hashes (docs/audit.md).
"""
from __future__ import annotations

import numpy as np

from ssl_lightning.audit.scan import exact_hash
from ssl_lightning.data.decode import UnreadableImage, decode, open_image

PAIR_CHUNK = 1 << 22  # candidate pairs compared at once (32 MB of indices)


def _full_hash(path: str) -> int | None:
    try:
        with open_image(path) as image:
            return exact_hash(np.asarray(decode(image, 1 if len(image.getbands()) == 1 else 3)))
    except (UnreadableImage, OSError):
        return None


def exact_groups(records: list[dict]) -> list[list[int]]:
    """Groups (each sorted, size >= 2) of indices into ``records`` with the same decoded pixels."""
    by_hash: dict[int, list[int]] = {}
    for i, record in enumerate(records):
        if record["ok"]:
            by_hash.setdefault(record["exact"], []).append(i)
    groups = []
    for members in by_hash.values():
        if len(members) < 2:
            continue
        if any(records[i]["reduced"] for i in members):  # confirm on the full decode
            full: dict[int | None, list[int]] = {}
            for i in members:
                full.setdefault(_full_hash(records[i]["path"]), []).append(i)
            groups += [g for key, g in full.items() if key is not None and len(g) >= 2]
        else:
            groups.append(members)
    return groups


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit differences between int64 hashes a and b (same shape) -> uint8 array of that shape."""
    return np.bitwise_count(a.view(np.uint64) ^ b.view(np.uint64))


def _band_pairs(keys: np.ndarray):
    """Yield (i, j) index arrays, i < j, of every pair with equal keys (N,), a chunk at a time."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    sizes = np.diff(np.r_[starts, len(keys)])
    left, right = [], []
    pending = 0
    for start, size in zip(starts[sizes > 1], sizes[sizes > 1]):
        members = order[start:start + size]
        for offset in range(1, size):  # pair each member with the ones `offset` places after it
            left.append(members[:-offset])
            right.append(members[offset:])
            pending += size - offset
            if pending >= PAIR_CHUNK:
                yield np.concatenate(left), np.concatenate(right)
                left, right, pending = [], [], 0
    if left:
        yield np.concatenate(left), np.concatenate(right)


def near_pairs(hashes: np.ndarray, max_hamming: int, fine: np.ndarray | None = None,
               max_fine: int = 256) -> dict[tuple[int, int], int]:
    """{(i, j): distance} for every pair i < j of int64 hashes (N,) within ``max_hamming`` bits and, when
    ``fine`` (N, 4) uint64 256-bit hashes are given, within ``max_fine`` of those bits (the distance
    returned is then the fine one)."""
    bands = max_hamming + 1
    edges = np.linspace(0, 64, bands + 1).round().astype(int)
    unsigned = hashes.view(np.uint64)
    found: dict[tuple[int, int], int] = {}
    for lo, hi in zip(edges[:-1], edges[1:]):
        keys = (unsigned >> np.uint64(lo)) & np.uint64((1 << int(hi - lo)) - 1)
        for i, j in _band_pairs(keys):
            i, j = np.minimum(i, j), np.maximum(i, j)
            distance = hamming(hashes[i], hashes[j]).astype(np.int64)
            close = distance <= max_hamming
            i, j, distance = i[close], j[close], distance[close]
            if fine is not None:
                distance = hamming(fine[i], fine[j]).sum(1, dtype=np.int64)
                close = distance <= max_fine
                i, j, distance = i[close], j[close], distance[close]
            found.update(zip(zip(i.tolist(), j.tolist()), distance.tolist()))
    return found


def duplicate_issues(records: list[dict], *, max_hamming: int, max_fine: int,
                     min_std: float = 0.0) -> dict[str, list[dict]]:
    """``exact_duplicate``, ``near_duplicate`` (within a split) and ``split_leak`` (val image that is an
    exact or near duplicate of a train image) entries: one per flagged image, naming the earlier image
    (train before val, then path order) that it duplicates. Near-constant images (gray-level std below
    ``min_std``) are left out of the near search: their perceptual hash is rounding noise."""
    issues: dict[str, list[dict]] = {"exact_duplicate": [], "near_duplicate": [], "split_leak": []}
    flagged: set[int] = set()

    def add(i: int, j: int, **extra) -> None:  # j duplicates i (i comes first)
        if j in flagged:
            return
        flagged.add(j)
        a, b = records[i], records[j]
        kind = "split_leak" if a["split"] != b["split"] else extra.pop("kind")
        extra.pop("kind", None)
        issues[kind].append({"path": b["path"], "split": b["split"], "duplicate_of": a["path"],
                             "duplicate_split": a["split"], **extra})

    for group in exact_groups(records):
        for j in group[1:]:
            add(group[0], j, kind="exact_duplicate", match="exact")
    ok = [i for i, r in enumerate(records) if r["ok"] and r["std"] >= min_std]
    hashes = np.array([records[i]["phash"] for i in ok], dtype=np.int64)
    fine = np.frombuffer(b"".join(records[i]["phash_fine"] for i in ok), dtype=np.uint64).reshape(-1, 4)
    pairs = near_pairs(hashes, max_hamming, fine, max_fine) if len(ok) > 1 else {}
    for (a, b), distance in sorted(pairs.items(), key=lambda item: (item[0][1], item[0][0])):
        add(ok[a], ok[b], kind="near_duplicate", match="phash", hamming_256=int(distance))
    return issues
