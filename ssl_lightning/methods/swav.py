"""SwAV: Swapping Assignments between Views (Caron et al., NeurIPS 2020)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssl_lightning.distributed import gather_no_grad, rank, world_size
from ssl_lightning.losses.common import fp32
from ssl_lightning.losses.swav import sinkhorn, swav_loss
from ssl_lightning.methods.base import SSLMethod, SSLOutput
from ssl_lightning.methods.multicrop import check_views, forward_views
from ssl_lightning.models.heads import mlp, parse_spec
from ssl_lightning.models.queue import FeatureQueue


class SwAV(SSLMethod):
    """Crops [global x num_global, local ...] -> backbone (grouped by resolution) -> projector on all
    crops at once (Linear-BN-ReLU, Linear) -> L2-normalise -> prototypes (unit rows). The Sinkhorn
    codes of each global crop (GLOBAL batch) are predicted from every other crop.

    queue_length > 0 keeps, per global crop, the embeddings of the last queue_length / batch_size
    global batches from ``queue_start_epoch`` on; once full, their scores join the Sinkhorn problem.
    """

    def __init__(
        self,
        projector: str = "2048-128",
        num_prototypes: int = 3000,
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iters: int = 3,
        num_global: int = 2,
        freeze_prototypes_epochs: int = 1,
        queue_length: int = 0,
        queue_start_epoch: int = 15,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if queue_length < 0 or queue_length % self.hparams.batch_size:
            raise ValueError(f"queue_length {queue_length} must be a multiple of the global batch_size "
                             f"{self.hparams.batch_size} (0 turns the queue off), e.g. "
                             f"{max(1, round(queue_length / self.hparams.batch_size)) * self.hparams.batch_size}")
        self.projector = mlp(projector, self.feature_dim, last_bias=True)
        dim = parse_spec(projector)[-1]
        self.prototypes = nn.Linear(dim, num_prototypes, bias=False)
        # The GLOBAL queue, identical on every rank; rank r scores its slice r of W (the official
        # per-rank queues of queue_length / W rows): the same Sinkhorn problem, but checkpoints hold
        # every rank's rows and DDP's buffer broadcast from rank 0 cannot overwrite them.
        self.queues = nn.ModuleList(FeatureQueue(queue_length, dim) for _ in range(num_global if queue_length else 0))

    def frozen_modules(self) -> list[nn.Module]:
        return [self.prototypes] if self.current_epoch < self.hparams.freeze_prototypes_epochs else []

    def ssl_step(self, views: list[torch.Tensor]) -> SSLOutput:
        check_views(views, self.hparams.num_global, "SwAV")
        with torch.no_grad():
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        features = forward_views(self.backbone, views, by_resolution=True)
        z = F.normalize(self.projector(torch.cat(features)), dim=1)
        scores = self.prototypes(z)
        z, scores = z.chunk(len(views)), scores.chunk(len(views))
        queue_used = self.queue_active() and self.queues[0].full
        codes = [self.assign(scores[i], z[i], i) for i in range(self.hparams.num_global)]
        loss = swav_loss(scores, codes, temperature=self.hparams.temperature)
        return SSLOutput(loss=loss, features=features[0], logs={"queue_used": loss.new_full((), float(queue_used))})

    def queue_active(self) -> bool:
        return bool(self.queues) and self.current_epoch >= self.hparams.queue_start_epoch

    @torch.no_grad()
    def assign(self, scores: torch.Tensor, z: torch.Tensor, crop: int) -> torch.Tensor:
        """Sinkhorn codes (b, K) of one assignment crop; with the queue on, its (full) contents are
        scored against the current prototypes first, then this step's embeddings are pushed."""
        hp = self.hparams
        if not self.queue_active():
            return sinkhorn(scores, epsilon=hp.epsilon, iters=hp.sinkhorn_iters)
        queue = self.queues[crop]
        if queue.full:
            rows = queue.size // world_size()
            with fp32(queue.features[rank() * rows:(rank() + 1) * rows], self.prototypes.weight) as (past, c):
                scores = torch.cat([past @ c.T, scores.float()])
        queue.push(gather_no_grad(z))
        return sinkhorn(scores, epsilon=hp.epsilon, iters=hp.sinkhorn_iters)[-len(z):]
