"""DDP with two time limits: a generous one for the rendezvous and start-up, a short one for training.

torch has one timeout per process group, set when the group is created; it bounds the rendezvous
(every rank joining the TCP store) as well as every later collective. A short hang timeout (say 10 s,
to notice a stopped rank quickly) then also ends runs whose ranks merely start seconds apart: on a
loaded 2-core machine a rank took more than 10 s to import and join ("Timed out after 11 seconds
waiting for clients. 1/2 clients joined"), and the ranks of a multi-node job start as their nodes do.

So the group is created with ``rendezvous_timeout`` (it also covers the model broadcast, the sanity
check and the first training step, while ranks may still be out of step: data workers starting,
first-step compilation), and after the first training step has completed on every rank (its
collectives return only then) the group's timeout becomes ``collective_timeout``.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch.distributed as dist
from pytorch_lightning.strategies import DDPStrategy

RENDEZVOUS_TIMEOUT_S = 1800  # torch's default for gloo; ranks of a multi-node job may start minutes apart
COLLECTIVE_TIMEOUT_S = 600  # NCCL's default; torch's gloo default (30 min) is long for a dead peer


def set_group_timeout(timeout: timedelta) -> None:
    """The default process group's timeout for every later collective (torch >= 2.12: set_timeout)."""
    setter = getattr(dist, "set_timeout", None)
    if setter is None:
        from torch.distributed.distributed_c10d import _set_pg_timeout as setter  # older torch
    setter(timeout)


class TwoTimeoutDDPStrategy(DDPStrategy):
    def __init__(self, rendezvous_timeout: timedelta = timedelta(seconds=RENDEZVOUS_TIMEOUT_S),
                 collective_timeout: timedelta = timedelta(seconds=COLLECTIVE_TIMEOUT_S), **kwargs: Any):
        super().__init__(timeout=rendezvous_timeout, **kwargs)
        self.collective_timeout = collective_timeout
        self.batches_started = 0  # this process's training batches since the fit (or resume) began

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self.batches_started += 1
        if self.batches_started == 2 and dist.is_initialized():  # step 1's collectives returned on every rank
            set_group_timeout(self.collective_timeout)
