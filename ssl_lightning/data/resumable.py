"""Training order that resumes mid-epoch exactly where a checkpoint left it.

The epoch's sample order is a function of (seed, epoch) (DistributedSampler's rule, also on one
process). SSLDataModule stores (epoch, batches done) in every checkpoint and, on resume, starts the
sampler after the samples already trained on: a run preempted after batch k of epoch e continues
with batch k + 1 of the same order; no sample of that epoch is seen twice or skipped.
With ``keyed=True`` it yields (epoch, index) pairs, for datasets whose per-sample randomness is a
function of both (crops.CroppedViewsDataset): then the views, too, resume exactly.
"""
from __future__ import annotations

from torch.utils.data import Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """DistributedSampler (epoch-seeded order, this rank's shard) that can start ``skip`` samples in."""

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, shuffle: bool, seed: int,
                 drop_last: bool, keyed: bool = False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self._resume: tuple[int, int] | None = None
        self.keyed = keyed

    def resume_at(self, epoch: int, skip: int) -> None:
        """The next iteration over ``epoch`` starts after its first ``skip`` samples (of this rank)."""
        self._resume = (epoch, skip)

    def __iter__(self):
        indices = list(super().__iter__())
        skip = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            skip = self._resume[1]
        self._resume = None
        indices = indices[skip:]
        return iter([(self.epoch, i) for i in indices] if self.keyed else indices)
