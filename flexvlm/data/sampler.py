"""A shuffling sampler that a checkpoint can resume mid-epoch, so a resumed run sees exactly the
batches an uninterrupted one would have."""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class ResumableSampler(Sampler[int]):
    """A permutation drawn from ``(seed, epoch)`` (Lightning calls ``set_epoch``), optionally started
    ``skip`` indices in: the part of the epoch that was trained before the checkpoint."""

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        self.num_samples, self.seed = num_samples, seed
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.skip = 0  # a skip only applies to the epoch it was saved in
        self.epoch = epoch

    def resume(self, epoch: int, samples_done: int) -> None:
        self.epoch, self.skip = epoch, samples_done

    def __len__(self) -> int:
        # the full epoch, so that the trainer's epoch length stays the same after a resume
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator)[self.skip :].tolist()
        self.skip = 0
        return iter(order)


class ResumableDataLoader(DataLoader):
    """The training loader. Lightning saves its ``state_dict`` (where the epoch stood: ``position()``
    samples of the sampler's epoch) with every checkpoint and hands it to ``load_state_dict`` when a
    run resumes, before the first batch: ``resumable`` then starts where the checkpoint was. (Under
    DDP, Lightning rebuilds the loader with its own ``sampler`` around ``resumable``.)"""

    def __init__(self, dataset: Dataset, resumable: ResumableSampler, position: Callable[[], int], **kwargs) -> None:
        kwargs.setdefault("sampler", resumable)
        super().__init__(dataset, **kwargs)
        self.resumable, self.position = resumable, position

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.resumable.epoch, "samples_done": self.position()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resumable.resume(**state)
