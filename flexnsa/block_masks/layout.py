"""How query heads map onto FlexAttention's (head, row) axes.

``gqa_folded``: the G query heads of a kv group are folded into the query axis, row = t*G + g,
mask heads = Hkv, no ``enable_gqa``: a 128-row tile holds ~128/G tokens x G heads, and K/V is
loaded once per group. ``per_head``: q stays [B, Hq, T, D], mask heads = Hq, ``enable_gqa``.
(PITFALLS: a BlockMask head dim must be 1 or Hq; Hkv heads only work in the folded layout.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QueryLayout:
    name: str
    group: int  # G = Hq / Hkv

    @property
    def folded(self) -> bool:
        return self.name == "gqa_folded"

    @property
    def rows_per_token(self) -> int:
        return self.group if self.folded else 1

    @property
    def enable_gqa(self) -> bool:
        return not self.folded and self.group > 1

    def num_rows(self, seq_len: int) -> int:
        return seq_len * self.rows_per_token

    def mask_heads(self, kv_heads: int) -> int:
        return kv_heads if self.folded else kv_heads * self.group

    def fold(self, x: torch.Tensor) -> torch.Tensor:
        """[B, Hq, T, ...] -> [B, Hkv, T*G, ...] (folded) or unchanged."""
        if not self.folded:
            return x
        B, Hq, T = x.shape[:3]
        rest = x.shape[3:]
        x = x.view(B, Hq // self.group, self.group, T, *rest).transpose(2, 3)
        return x.reshape(B, Hq // self.group, T * self.group, *rest)

    def unfold(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`fold`."""
        if not self.folded:
            return x
        B, Hkv, R = x.shape[:3]
        rest = x.shape[3:]
        x = x.view(B, Hkv, R // self.group, self.group, *rest).transpose(2, 3)
        return x.reshape(B, Hkv * self.group, R // self.group, *rest)

    def token_of_row(self, q_idx: torch.Tensor) -> torch.Tensor:
        """Token index of a query row (int32: rows < 2^31 even at 128K tokens x G; division by
        the constant G compiles to a multiply-shift, where int64 division is emulated)."""
        return q_idx // self.group if self.folded else q_idx

    def kv_head_of_mask_head(self, h: torch.Tensor) -> torch.Tensor:
        return h if self.folded else h // self.group

    def token_ranges(self, seq_len: int, block_rows: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """First and last token of each query block of ``block_rows`` rows, int64 [nQB]."""
        rows = self.num_rows(seq_len)
        starts = torch.arange(0, rows, block_rows, device=device, dtype=torch.int64)
        ends = torch.clamp(starts + block_rows, max=rows) - 1
        return starts // self.rows_per_token, ends // self.rows_per_token
