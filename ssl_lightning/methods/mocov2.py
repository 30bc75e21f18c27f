"""MoCo v2: Improved Baselines with Momentum Contrastive Learning (Chen, Fan, Girshick, He, 2020)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssl_lightning.distributed import batch_shuffle, batch_unshuffle, gather_no_grad
from ssl_lightning.losses.moco import mocov2_loss
from ssl_lightning.methods.base import SSLOutput
from ssl_lightning.methods.momentum import MomentumMethod
from ssl_lightning.models.heads import mlp, parse_spec
from ssl_lightning.models.queue import FeatureQueue


class MoCoV2(MomentumMethod):
    """Query encoder = backbone -> MLP head (Linear-ReLU-Linear, no BN); key encoder = its EMA copy.

    Queries of view 1 are scored against the keys of view 2 and a queue of past keys gathered from
    every rank (see ssl_lightning.losses.mocov2_loss); the queue is then fed this step's keys.
    shuffle_bn (the paper's Shuffling BN) runs the key encoder on a batch permuted across ranks, so
    its per-rank BatchNorm statistics cannot leak which key belongs to which query; it only matters
    with per-rank BN (sync_bn false, the paper's setting) and more than one device.
    symmetric adds the mirrored term (queries of view 2 vs keys of view 1, with a second queue of
    view-1 keys) and averages the two: the "symmetrized" MoCo v2 of SimSiam's comparisons and
    solo-learn's MoCo v2+, whose two queues this follows.
    """

    def __init__(
        self,
        projector: str = "2048-128",
        temperature: float = 0.2,
        queue_size: int = 65536,
        shuffle_bn: bool = True,
        symmetric: bool = False,
        base_momentum: float = 0.999,
        final_momentum: float = 0.999,
        sync_bn: bool = False,
        **kwargs,
    ):
        if shuffle_bn and sync_bn:
            raise ValueError("shuffle_bn and sync_bn are both true: with global BatchNorm the key encoder already "
                             "sees the whole batch, so shuffling changes nothing; set shuffle_bn: false "
                             "(or sync_bn: false for the paper's per-GPU BatchNorm with shuffling)")
        super().__init__(base_momentum=base_momentum, final_momentum=final_momentum, sync_bn=sync_bn, **kwargs)
        self.projector = mlp(projector, self.feature_dim, hidden_norm=False, last_bias=True)
        # The key encoder. The EMA update runs right after each optimizer step; the official code runs it
        # at the start of the next step, before computing keys: the same sequence of weights, since its
        # very first update acts on identical weights and changes nothing.
        self.add_teachers("backbone", "projector")
        # queues[i]: negatives for the queries of view i, i.e. past keys of the other view
        self.queues = nn.ModuleList(FeatureQueue(queue_size, parse_spec(projector)[-1], random_init=True)
                                    for _ in range(2 if symmetric else 1))

    def on_fit_start(self) -> None:
        super().on_fit_start()
        queue_size, batch = self.hparams.queue_size, self.hparams.batch_size
        if queue_size % batch:
            raise ValueError(f"queue_size {queue_size} is not divisible by the global batch size {batch} (each step "
                             f"enqueues the keys of the whole batch); use a multiple of {batch}, e.g. "
                             f"{batch * max(1, queue_size // batch)}")

    @torch.no_grad()
    def encode_keys(self, x: torch.Tensor) -> torch.Tensor:
        """l2-normalised key-encoder outputs (b, D) for this rank's samples, in their order."""
        if self.hparams.shuffle_bn:
            x, unshuffle_index = batch_shuffle(x)
        k = F.normalize(self.teacher["projector"](self.teacher["backbone"](x)).float(), dim=1)
        return batch_unshuffle(k, unshuffle_index) if self.hparams.shuffle_bn else k

    def ssl_step(self, views: list[torch.Tensor]) -> SSLOutput:
        if len(views) != 2:
            raise ValueError(f"MoCo v2 takes exactly 2 views, got {len(views)}; configure data.views with 2 entries")
        n = len(self.queues)  # query views: 1, or 2 when symmetric
        features = [self.backbone(v) for v in views[:n]]
        queries = [self.projector(f) for f in features]
        keys = [self.encode_keys(views[1 - i]) for i in range(n)]
        # the queues' current contents (cloned: the push below writes in place)
        loss = sum(mocov2_loss(q, k, queue.features.clone(), temperature=self.hparams.temperature)
                   for q, k, queue in zip(queries, keys, self.queues)) / n
        for k, queue in zip(keys, self.queues):
            queue.push(gather_no_grad(k))  # every rank enqueues the same global batch, in rank order
        return SSLOutput(loss=loss, features=features[0])
