"""A training loader that resumes mid-epoch exactly where a checkpoint left it.

The epoch's sample order is a function of (seed, epoch) (DistributedSampler's rule, also on one
process), and the loader's state (epoch, batches done) goes into every checkpoint through
Lightning's stateful-loader protocol (state_dict / load_state_dict). A run preempted after batch k
of epoch e resumes with batch k + 1 of the same order: no sample of that epoch is seen twice or
skipped, and no epoch restarts from scratch.
"""
from __future__ import annotations

from collections.abc import Callable

from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """DistributedSampler (epoch-seeded order, this rank's shard) that can start ``skip`` samples in."""

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, shuffle: bool, seed: int,
                 drop_last: bool):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self._resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, skip: int) -> None:
        """The next iteration over ``epoch`` starts after its first ``skip`` samples (of this rank)."""
        self._resume = (epoch, skip)

    def __iter__(self):
        indices = list(super().__iter__())
        skip = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            skip = self._resume[1]
        self._resume = None
        return iter(indices[skip:])


class ResumableLoader(DataLoader):
    """DataLoader over a ResumableSampler whose state is (epoch, batches done in that epoch).

    ``batches_done`` is asked of the trainer at save time (Lightning prefetches one batch, so the
    loader itself cannot know how many batches were trained on)."""

    def __init__(self, dataset: Dataset, *, sampler: ResumableSampler, batches_done: Callable[[], int], **kwargs):
        super().__init__(dataset, sampler=sampler, **kwargs)
        self.batches_done = batches_done

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches_done": int(self.batches_done())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.resume_at(state["epoch"], state["batches_done"] * self.batch_size)
