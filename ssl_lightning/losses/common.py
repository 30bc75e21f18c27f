"""Small tensor helpers shared by the losses."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """Flattened off-diagonal elements of a square (n, n) matrix: n*(n-1) values."""
    n = m.shape[0]
    return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


@contextlib.contextmanager
def fp32(*tensors: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    """fp32 island: autocast off and the given tensors cast to float32 (float64 is kept)."""
    device_type = tensors[0].device.type
    with torch.autocast(device_type=device_type, enabled=False):
        yield tuple(t if t.dtype == torch.float64 else t.float() for t in tensors)
