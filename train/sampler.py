"""Each rank's endless, resumable stream of usable samples.

Order: per epoch a seeded permutation of the dataset (the same on every rank), cut into
world-size strides; rank r reads positions r, r+W, ... (the remainder is dropped, so every rank
has the same number per epoch). A sample that fails (:class:`SampleError`) is skipped, counted
by kind, and the rank reads its next position, so every rank still yields exactly the samples a
step needs: the forward count per step (vision tower included) never differs between ranks,
which is what keeps collectives from hanging. ``position`` is the resume point.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch

from .dataset import SampleError

log = logging.getLogger(__name__)


class SampleStream:
    def __init__(self, dataset, *, rank: int, world_size: int, seed: int, shuffle: bool = True, on_bad_video: str = "skip"):
        self.per_rank = len(dataset) // world_size
        if self.per_rank == 0:
            raise ValueError(f"the dataset has {len(dataset)} samples, fewer than the {world_size} ranks")
        self.dataset, self.rank, self.world_size = dataset, rank, world_size
        self.seed, self.shuffle, self.on_bad_video = seed, shuffle, on_bad_video
        self.position = 0
        self.skipped: Counter = Counter()
        self._order_epoch, self._order = None, None

    def index_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.per_rank)
        if epoch != self._order_epoch:
            n = len(self.dataset)
            if self.shuffle:
                order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            else:
                order = torch.arange(n)
            self._order_epoch, self._order = epoch, order[self.rank :: self.world_size][: self.per_rank].tolist()
        return self._order[offset]

    def next_sample(self) -> dict:
        failures = 0
        while True:
            index = self.index_at(self.position)
            self.position += 1
            try:
                return self.dataset[index]
            except SampleError as e:
                if e.kind == "bad_video" and self.on_bad_video == "error":
                    raise RuntimeError(f"{e} (data.on_bad_video = 'error')") from None
                self.skipped[e.kind] += 1
                log.warning("rank %d skips %s", self.rank, e)
                failures += 1
                if failures >= self.per_rank:
                    raise RuntimeError(f"rank {self.rank}: {failures} samples in a row failed; last: {e}") from None

    def take(self, count: int) -> list[dict]:
        return [self.next_sample() for _ in range(count)]

    def state_dict(self) -> dict:
        return {"position": self.position, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]
        self.skipped = Counter(state["skipped"])
