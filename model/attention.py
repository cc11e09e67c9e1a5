"""The hybrid video/text attention of one Qwen2.5-VL text decoder layer.

Why a module swap and not an ``AttentionInterface`` function: the gates need the layer's hidden
states, which attention functions never receive. So the layer's ``self_attn`` becomes this
subclass: the same q/k/v/o projections (the very same ``nn.Linear`` objects), plus the VideoNSA
gate MLP under the release's names (``self_attn.g_proj_1``, ``self_attn.g_proj_2``).

Semantics (DESIGN.md, "Hybrid video/text layer"), given a :class:`~model.spans.SpanPlan`:
- queries in a video span: NSA over that span's q/k/v only (after 3D mRoPE), blocks from the span start;
- every other query (text, padding): dense causal GQA over all keys of the sequence, under the
  layer's own attention mask (padding, causality);
- outputs go back to their original positions. Nothing is zeroed: the other modality is masked
  or simply not part of the key set.
Without a plan (NSA off, text-only batches, decoding over a KV cache) the layer is exactly
upstream's attention.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn import functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLAttention, apply_rotary_pos_emb

from flexnsa import MLPCompressor, NSAConfig, NSAGates, nsa_attention
from flexnsa.module import gate_values

from .compat import pop_cache
from .spans import SpanPlan

DENSE_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


class NSAQwen2_5_VLAttention(Qwen2_5_VLAttention):
    """Qwen2.5-VL text attention + VideoNSA gates: NSA inside video spans, dense elsewhere."""

    def __init__(self, config, layer_idx: int, nsa_config: NSAConfig):
        super().__init__(config, layer_idx)
        self.nsa_config = nsa_config
        self.init_nsa_parameters()

    @classmethod
    def from_dense(cls, dense: Qwen2_5_VLAttention, nsa_config: NSAConfig) -> "NSAQwen2_5_VLAttention":
        """Wrap an existing attention: its projection modules are reused as they are (no copy)."""
        weight = dense.q_proj.weight
        with torch.device("meta"):
            nsa = cls(dense.config, dense.layer_idx, nsa_config)
        for name in DENSE_PROJECTIONS:
            setattr(nsa, name, getattr(dense, name))
        nsa.init_nsa_parameters(device=weight.device, dtype=weight.dtype)
        return nsa.train(dense.training)

    def init_nsa_parameters(self, device=None, dtype=None) -> None:
        """Fresh gate MLP with flexnsa.NSAGates' init (g_proj_2 zero: every gate starts at 0.5)."""
        with torch.device(device) if device is not None else contextlib.nullcontext():
            gates = NSAGates(self.hidden_size, self.num_heads, self.nsa_config.gate_temperature).to(dtype=dtype)
            self.g_proj_1, self.g_proj_2 = gates.g_proj_1, gates.g_proj_2
            if self.nsa_config.compression == "mlp":
                args = (self.nsa_config.block_size, self.head_dim, self.nsa_config.compression_mlp_hidden)
                self.compress_k = MLPCompressor(*args).to(dtype=dtype)
                self.compress_v = MLPCompressor(*args).to(dtype=dtype)

    @property
    def compressors(self):
        return (self.compress_k, self.compress_v) if self.nsa_config.compression == "mlp" else None

    def nsa_gates(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[B, T, Hq, 3] gates (cmp, slc, win) from this layer's hidden states."""
        return gate_values(hidden_states, self.g_proj_1, self.g_proj_2, self.num_heads, self.nsa_config.gate_temperature)

    def project_qkv(self, hidden_states: torch.Tensor, position_embeddings):
        """q [B, T, Hq, D], k/v [B, T, Hkv, D] after 3D mRoPE: upstream's values, kept in the
        projections' token-major layout so that their gradients come back in it (no transposing
        copies before the projections' backward)."""
        B, T, _ = hidden_states.shape
        q, k, v = (proj(hidden_states).view(B, T, -1, self.head_dim) for proj in (self.q_proj, self.k_proj, self.v_proj))
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
        return q, k, v

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask=None,
        position_ids=None,
        cache=None,
        position_embeddings=None,
        nsa_spans: SpanPlan | None = None,
        **kwargs,
    ):
        """``cache`` is the KV cache under either transformers name (``past_key_values`` before 5.24)."""
        passed_by_name = pop_cache(kwargs)
        cache = cache if cache is not None else passed_by_name
        if nsa_spans is None or not nsa_spans.any:
            return super().forward(hidden_states, attention_mask, position_ids, cache, position_embeddings, **kwargs)
        B, T, _ = hidden_states.shape
        nsa_spans.check_shape(B, T)
        q, k, v = self.project_qkv(hidden_states, position_embeddings)
        if cache is not None:  # the prefill fills the cache; decoding is dense over it
            k, v = (x.transpose(1, 2) for x in cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx))
        if k.shape[1] != T:
            raise NotImplementedError(
                f"NSA over video tokens needs the whole sequence in one forward; the KV cache already "
                f"held {k.shape[1] - T} tokens (chunked prefill of video is not supported)"
            )
        out = self.hybrid_attention(q, k, v, hidden_states, attention_mask, nsa_spans)
        return self.o_proj(out.reshape(B, T, -1)), None

    def hybrid_attention(self, q, k, v, hidden_states, attention_mask, plan: SpanPlan) -> torch.Tensor:
        """[B, T, Hq, D] (o_proj's layout) from token-major q [B, T, Hq, D], k/v [B, T, Hkv, D]: NSA
        for each span's queries, dense attention for every other query over all keys.

        Each tensor is cut into the plan's segments (spans and the runs between them) by one split
        and the output put back by one cat, so the backward is a cat and views: no full-size zero
        fill and copy per slice, no scatter for the dense rows, no copy into slices of a buffer
        (the 64K training profile, profiling/NOTES.md session 8). The pieces stay token-major views:
        the NSA op takes that layout as it is and returns its output and gradients in it, so the
        cat and the split's backward copy contiguous rows (NOTES Lever 21)."""
        B, T, Hq, D = q.shape
        segments = [plan.segments(b) for b in range(B)]
        sizes = [run.length for runs in segments for run in runs]
        pieces = iter(zip(*(x.reshape(B * T, *x.shape[2:]).split(sizes) for x in (q, k, v, hidden_states))))
        # per sample [1, Hkv, T, D]: the dense rows' keys (split, not sliced: its backward is a cat)
        k_heads, v_heads = k.transpose(1, 2).split(1), v.transpose(1, 2).split(1)
        out_parts = []
        for b, runs in enumerate(segments):
            sample = [next(pieces) for _ in runs]  # (q, k, v, hidden) of each run
            dense_parts = iter(self.dense_outputs(sample, runs, k_heads[b], v_heads[b], attention_mask, plan, b))
            for (qp, kp, vp, hp), run in zip(sample, runs):
                if run.sparse:
                    out_parts.append(token_major(self.span_nsa(heads_first(qp), heads_first(kp), heads_first(vp), hp[None])))
                else:
                    out_parts.append(next(dense_parts))
        return torch.cat(out_parts).view(B, T, Hq, D)

    def dense_outputs(self, sample, runs, k, v, attention_mask, plan: SpanPlan, b: int) -> list[torch.Tensor]:
        """Token-major outputs of sample b's dense runs, in order. ``sample``: the (q, k, v, hidden)
        pieces of its runs; k, v [1, Hkv, T, D]: all its keys.

        Without a mask (plain causal, no padding) run [s, e) attends to keys [0, e), aligned to
        the last of them (``causal_rows``: the flash kernel, no mask tensor, no keys beyond e);
        its keys are the pieces up to e (views for the first run and the last, a cat in between:
        no slice of k, whose backward would zero-fill a full-size gradient). With a mask (padding)
        all dense rows take their rows of it in one masked call over all T keys. Nothing here
        reads the device from the host: a host sync per layer left the GPU idle (NOTES Lever 22)."""
        dense = [(i, piece[0]) for i, (piece, run) in enumerate(zip(sample, runs)) if not run.sparse]
        if not dense:
            return []
        T = k.shape[2]
        if attention_mask is None:
            outputs = []
            for i, qp in dense:
                if runs[i].end == T:
                    keys, values = k, v
                else:  # the key and value pieces of runs 0..i
                    keys, values = (heads_first(cat([piece[j] for piece in sample[: i + 1]])) for j in (1, 2))
                outputs.append(token_major(self.causal_rows(heads_first(qp), keys, values)))
            return outputs
        mask = mask_rows(attention_mask, b, plan.dense_positions(b, k.device))
        q_rows = cat([qp for _, qp in dense])
        return list(token_major(self.dense_rows(heads_first(q_rows), k, v, mask)).split([len(qp) for _, qp in dense]))

    def span_nsa(self, q, k, v, hidden_states) -> torch.Tensor:
        """NSA over one span (its own keys only); compression blocks start at the span's first token."""
        gates = self.nsa_gates(hidden_states).to(q.dtype)
        return nsa_attention(q, k, v, gates, self.nsa_config, compressors=self.compressors)

    def causal_rows(self, q_rows, k, v) -> torch.Tensor:
        """The last R query rows of a causal sequence over its S keys: row i sees keys <= S - R + i."""
        dropout = self.attention_dropout if self.training else 0.0
        bias = causal_lower_right(q_rows.shape[2], k.shape[2])
        return F.scaled_dot_product_attention(q_rows, k, v, attn_mask=bias, dropout_p=dropout, scale=self.scaling, enable_gqa=True)

    def dense_rows(self, q_rows, k, v, mask) -> torch.Tensor:
        """Dense GQA attention of some query rows over all keys under their rows of the mask."""
        dropout = self.attention_dropout if self.training else 0.0
        empty = None
        if mask.dtype == torch.bool:  # a query that sees nothing (padding) would give NaN: zero it
            empty = ~mask.any(-1, keepdim=True)
            mask = mask | empty
        out = F.scaled_dot_product_attention(
            q_rows, k, v, attn_mask=mask, dropout_p=dropout, scale=self.scaling, enable_gqa=True
        )
        return out if empty is None else out.masked_fill(empty, 0.0)


def cat(pieces: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat that returns a lone piece itself (no copy)."""
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def heads_first(x: torch.Tensor) -> torch.Tensor:
    """One sample's token-major [T, H, D] as the attention ops' [1, H, T, D] (a view)."""
    return x.transpose(0, 1).unsqueeze(0)


def token_major(x: torch.Tensor) -> torch.Tensor:
    """[1, H, T, D] back to [T, H, D] (a view)."""
    return x.squeeze(0).transpose(0, 1)


def mask_rows(attention_mask, b: int, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` of sample b's 4-D mask as [1, 1|H, R, S]: bool (True = visible) or additive
    float. Masks of other attention implementations (flash's 2-D mask, flex's BlockMask) are
    refused rather than misread. (No mask at all is plain causal: ``dense_outputs``.)
    """
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        return attention_mask[b : b + 1][:, :, rows]
    raise ValueError(
        "the NSA hybrid layer reads the text model's 4-D attention mask (attn_implementation 'sdpa' "
        f"or 'eager'); got {type(attention_mask).__name__}"
        + (f" of shape {tuple(attention_mask.shape)}" if isinstance(attention_mask, torch.Tensor) else "")
    )
