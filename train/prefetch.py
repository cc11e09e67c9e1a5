"""Micro-batches collated (and pinned) by a background thread while the GPU runs the step before.

Why: at 64K tokens one micro-batch's collate (a 1.2 GB pixel concatenation) and its copy from
pageable memory took 0.73 s of every step, NSA and dense alike, with the GPU idle until they were
done (session-5 metrics and step traces, profiling/NOTES.md). The thread reads the stream in
exactly the order the step would, so every step sees the same data. What a checkpoint records is
the stream's state after the last micro-batch the trainer *took*, so a resume starts exactly
there and re-reads what was prefetched but not used; nothing is lost or seen twice.

``depth`` = 0 reads in the step itself (no thread). An error in the thread (a config that says
``on_bad_video = "error"``, a dataset that fails every sample) is raised in the trainer at the
micro-batch it belongs to, never swallowed.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections import Counter
from typing import Callable


class BatchPrefetcher:
    """``next()`` -> the next micro-batch of ``count`` samples, as ``make_batch(samples)`` builds it."""

    def __init__(self, stream, count: int, make_batch: Callable[[list[dict]], dict], depth: int):
        if depth < 0:
            raise ValueError(f"data.prefetch must be >= 0 micro-batches, got {depth}")
        self.stream, self.count, self.make_batch, self.depth = stream, count, make_batch, depth
        self._taken = stream.state_dict()  # a fresh dict each call: the stream keeps no reference
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = None
        if depth:
            self._thread = threading.Thread(target=self._fill, name="batch-prefetch", daemon=True)
            self._thread.start()

    def _read(self) -> tuple[dict, dict]:
        batch = self.make_batch(self.stream.take(self.count))
        return batch, self.stream.state_dict()

    def _fill(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._read()
            except BaseException as e:  # handed to the trainer with the micro-batch it belongs to
                item = e
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def next(self) -> dict:
        if not self.depth:
            batch, self._taken = self._read()
            return batch
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        batch, self._taken = item
        return batch

    def state_dict(self) -> dict:
        """The stream's state after the last micro-batch taken (what a resume continues from)."""
        return copy.deepcopy(self._taken)

    @property
    def skipped(self) -> Counter:
        """Samples skipped, by kind, up to the last micro-batch taken."""
        return Counter(self._taken["skipped"])

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
