"""Where the sparse (video) spans of a batch are, found once per forward from ``input_ids``.

A span is one video (or image, when images are treated like video): its tokens are contiguous
in ``input_ids``, and NSA runs over exactly those tokens, with compression blocks counted from
the span's first token so that blocks are frames. Two videos with no text between them form one
run of video tokens; the grids (``video_grid_thw``) cut it into one span per video. A grid that
disagrees with the tokens is an error, never a guess.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class SparseModality:
    """One kind of sparse token: its id and, when the grids are known, the tokens of each item."""

    name: str  # "video" or "image": names the *_grid_thw argument in error messages
    token_id: int
    item_tokens: tuple[int, ...] | None = None


class Segment(NamedTuple):
    """A run [start, end) of one sample's tokens: a sparse span, or dense tokens between spans."""

    start: int
    end: int
    sparse: bool

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SpanPlan:
    """Per sample, the [start, end) token ranges of its sparse spans (sorted, disjoint)."""

    batch_size: int
    seq_len: int
    spans: tuple[tuple[tuple[int, int], ...], ...]

    @property
    def any(self) -> bool:
        return any(self.spans)

    def check_shape(self, batch_size: int, seq_len: int) -> None:
        if (batch_size, seq_len) != (self.batch_size, self.seq_len):
            raise ValueError(
                f"NSA span plan was built for batch {self.batch_size} x {self.seq_len} tokens, "
                f"but the attention got {batch_size} x {seq_len}"
            )

    def segments(self, b: int) -> tuple[Segment, ...]:
        """Sample b's [0, seq_len) cut into consecutive runs: its spans and the dense runs between them."""
        runs, pos = [], 0
        for start, end in self.spans[b]:
            if start > pos:
                runs.append(Segment(pos, start, sparse=False))
            runs.append(Segment(start, end, sparse=True))
            pos = end
        if pos < self.seq_len:
            runs.append(Segment(pos, self.seq_len, sparse=False))
        return tuple(runs)

    def dense_positions(self, b: int, device=None) -> torch.Tensor:
        """Positions of sample b outside every span (text and padding), ascending: they attend densely."""
        runs = [torch.arange(s.start, s.end, device=device) for s in self.segments(b) if not s.sparse]
        return torch.cat(runs) if runs else torch.zeros(0, dtype=torch.int64, device=device)  # made there: no copy, no sync


def tokens_per_item(grid_thw: torch.Tensor | None, spatial_merge_size: int) -> tuple[int, ...] | None:
    """LLM tokens of each image/video: t * h * w / merge^2 (grid in patches, as the processor gives it)."""
    if grid_thw is None:
        return None
    return tuple(int(n) for n in (grid_thw.prod(-1) // spatial_merge_size**2).tolist())


def mm_token_type_ids(input_ids: torch.Tensor, image_token_id: int, video_token_id: int) -> torch.Tensor:
    """0 text, 1 image, 2 video: what transformers 5.x needs for 3D mRoPE (it falls back to 1-D without)."""
    return (input_ids == image_token_id).int() + 2 * (input_ids == video_token_id).int()


def find_spans(
    input_ids: torch.Tensor,
    modalities: list[SparseModality],
    attention_mask: torch.Tensor | None = None,
    min_length: int = 1,
) -> SpanPlan:
    """Sparse spans of ``input_ids`` [B, T]: runs of one sparse token id, cut per item by the grids.

    Raises ValueError when the grids and the tokens disagree, or when a span is shorter than
    ``min_length`` (one compression block: NSA over it would have no block to select).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
    ids = input_ids.detach().cpu()
    valid = torch.ones_like(ids, dtype=torch.bool)
    if attention_mask is not None:
        valid = attention_mask.detach().cpu().bool()
    for m in modalities:
        if m.item_tokens is not None:
            found, described = int(((ids == m.token_id) & valid).sum()), sum(m.item_tokens)
            if found != described:
                raise ValueError(
                    f"{m.name}_grid_thw describes {len(m.item_tokens)} {m.name}(s) of {described} tokens "
                    f"in all, but input_ids holds {found} {m.name} tokens (id {m.token_id})"
                )
    queues = {m.token_id: deque(m.item_tokens) for m in modalities if m.item_tokens is not None}
    by_id = {m.token_id: m for m in modalities}
    spans = []
    for b in range(ids.shape[0]):
        sample = []
        for start, end, token_id in _runs(ids[b], valid[b], list(by_id)):
            sample += _split_run(start, end, by_id[token_id], queues.get(token_id), b)
        spans.append(tuple(sample))
    for b, sample in enumerate(spans):
        for start, end in sample:
            if end - start < min_length:
                raise ValueError(
                    f"sample {b}: the sparse span at tokens [{start}, {end}) has {end - start} tokens, "
                    f"shorter than one NSA block ({min_length}); use a smaller NSAConfig.block_size "
                    "or longer videos"
                )
    return SpanPlan(ids.shape[0], ids.shape[1], tuple(spans))


def _runs(ids: torch.Tensor, valid: torch.Tensor, token_ids: list[int]):
    """(start, end, token_id) of each maximal run of one sparse token id in a 1-D sequence."""
    tagged = torch.where(torch.isin(ids, torch.tensor(token_ids)) & valid, ids, -1)
    sparse = tagged >= 0
    differs_prev = torch.ones_like(sparse)
    differs_prev[1:] = tagged[1:] != tagged[:-1]
    differs_next = torch.ones_like(sparse)
    differs_next[:-1] = tagged[:-1] != tagged[1:]
    starts = (sparse & differs_prev).nonzero().flatten().tolist()
    ends = ((sparse & differs_next).nonzero().flatten() + 1).tolist()
    return [(s, e, int(tagged[s])) for s, e in zip(starts, ends)]


def _split_run(start: int, end: int, modality: SparseModality, queue: deque | None, b: int):
    """One span per item of the run (the whole run when the grids are unknown)."""
    if queue is None:
        return [(start, end)]
    pieces = []
    while start < end:
        if not queue:
            raise ValueError(
                f"sample {b}: {modality.name} tokens at [{start}, {end}) are not described by "
                f"{modality.name}_grid_thw (it has no {modality.name} left)"
            )
        n = queue.popleft()
        if start + n > end:
            raise ValueError(
                f"sample {b}: {modality.name}_grid_thw gives a {modality.name} of {n} tokens, but its "
                f"span in input_ids starting at token {start} has only {end - start} tokens"
            )
        pieces.append((start, start + n))
        start += n
    return pieces
