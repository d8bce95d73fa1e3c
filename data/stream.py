"""Endless, resumable batches from a bucketed dataset: what the training tasks read (train.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any


class BucketStream:
    """Endless batches from a bucketed dataset; `state_dict` is the sampler's position in its epoch.

    Files that fail to decode are replaced by the dataset and counted here; past the monitor's
    threshold the run stops with the list of files (data/dataset.py: BadDataMonitor).
    """

    def __init__(self, dataset: Any, *, seed: int, collate: Callable, num_workers: int):
        from data.dataset import BadDataMonitor

        self.dataset, self.seed, self.collate, self.num_workers = dataset, seed, collate, num_workers
        self.monitor = BadDataMonitor()
        self.sampler_state: dict | None = None
        self._sampler, self._steps_done = None, 0

    def batches(self, *, dp_rank: int, dp_size: int) -> Iterator[dict]:
        from data.dataset import make_loader

        self._sampler = self.dataset.sampler(seed=self.seed, rank=dp_rank, world_size=dp_size)
        if self.sampler_state is not None:
            self._sampler.load_state_dict(self.sampler_state)
        while True:
            epoch = self._sampler.epoch
            self.dataset.set_epoch(epoch)
            self._steps_done = self._sampler.position
            for batch in make_loader(self.dataset, self._sampler, num_workers=self.num_workers,
                                     collate_fn=self.collate):
                self._steps_done += 1
                self.monitor.update(batch)
                yield batch
            self._sampler.set_epoch(epoch + 1)

    def state_dict(self) -> dict:
        if self._sampler is None:
            return self.sampler_state or {}
        # Workers fetch ahead of the loop, so the position is what the loop consumed, not what was fetched.
        return self._sampler.state_dict(steps_done=self._steps_done)

    def load_state_dict(self, state: dict) -> None:
        self.sampler_state = state or None


class StreamTask:
    """The data half of a training task (train.py's Task protocol): batches and their resumable position.

    A task sets `self.stream` in its constructor and adds the model half (loss, tokens, media, finish).
    """

    stream: BucketStream

    def batches(self, *, dp_rank: int, dp_size: int) -> Iterator[dict]:
        return self.stream.batches(dp_rank=dp_rank, dp_size=dp_size)

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)
