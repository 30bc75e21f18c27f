"""Multi-crop: views arrive as [global_1 .. global_G, local_1 .. local_N] (data.views with ``count``)."""
from __future__ import annotations

from collections.abc import Callable

import torch


def check_views(views: list[torch.Tensor], num_global: int, method: str) -> None:
    if len(views) < max(2, num_global):
        raise ValueError(f"{method} needs at least {max(2, num_global)} views ({num_global} global), got "
                         f"{len(views)}; list the global views first in data.views")


def forward_views(fn: Callable[[torch.Tensor], torch.Tensor], views: list[torch.Tensor], *,
                  by_resolution: bool = True) -> list[torch.Tensor]:
    """fn applied to every view. by_resolution concatenates consecutive views of the same shape into
    one forward pass (DINO's MultiCropWrapper, SimCLR's concatenated batch), so BatchNorm sees all of
    them together; otherwise one pass per view (BYOL, MoCo, Barlow Twins)."""
    if not by_resolution:
        return [fn(v) for v in views]
    outputs: list[torch.Tensor] = []
    start = 0
    while start < len(views):
        end = start + 1
        while end < len(views) and views[end].shape == views[start].shape:
            end += 1
        outputs += list(fn(torch.cat(views[start:end])).chunk(end - start))
        start = end
    return outputs
