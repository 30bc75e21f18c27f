"""A ring buffer of embeddings, checkpointed with the model (MoCo v2 negatives, SwAV's assignment queue)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FeatureQueue(nn.Module):
    """(size, dim) buffer written ``n`` rows at a time; ``filled`` counts valid rows.

    random_init fills it with l2-normalised Gaussian rows that count as valid (MoCo's initial queue);
    otherwise it starts empty and ``full`` says when every row holds a real embedding (SwAV).
    Under DDP the initial values come from rank 0 (DDP broadcasts buffers when it wraps the model).

    The write position and fill count are buffers (so checkpoints hold them) mirrored as host integers,
    which are what ``push`` and ``full`` read: reading the buffers would make the host wait for the
    device every step. The mirrors are refreshed from the buffers when a state dict is loaded.
    """

    def __init__(self, size: int, dim: int, *, random_init: bool = False):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"queue size {size} and dim {dim} must be positive")
        init = F.normalize(torch.randn(size, dim), dim=1) if random_init else torch.zeros(size, dim)
        self.register_buffer("features", init)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.tensor(size if random_init else 0, dtype=torch.long))
        self._ptr, self._filled = 0, size if random_init else 0
        self.register_load_state_dict_post_hook(FeatureQueue._read_counters)

    @staticmethod
    def _read_counters(module: FeatureQueue, incompatible_keys) -> None:
        module._ptr, module._filled = int(module.ptr), int(module.filled)

    @property
    def size(self) -> int:
        return self.features.shape[0]

    @property
    def full(self) -> bool:
        return self._filled == self.size

    @torch.no_grad()
    def push(self, x: torch.Tensor) -> None:
        """Overwrite the oldest ``len(x)`` rows with ``x`` (which should already be what you want stored:
        the keys gathered from all ranks for MoCo, this rank's embeddings for SwAV)."""
        n = x.shape[0]
        if self.size % n:
            raise ValueError(f"queue size {self.size} is not divisible by the {n} rows pushed per step; "
                             f"choose a queue size that is a multiple of {n}")
        start = self._ptr
        self.features[start:start + n] = x.detach().to(self.features.dtype)
        self._ptr, self._filled = (start + n) % self.size, min(self._filled + n, self.size)
        self.ptr.fill_(self._ptr)
        self.filled.fill_(self._filled)
