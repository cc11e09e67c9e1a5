"""Activation checkpointing, torch.compile and FSDP2 on a Qwen2.5-VL, in torchtitan's order.

The order matters: AC wraps each decoder layer first, so compile traces the wrapped layer
(recomputation included), and FSDP shards last, so its hooks sit outside the compiled region.
NSA layers are the exception (compile, then AC): see :func:`parallelize`.
Units: every text decoder layer, the vision tower as one unit (it runs once per forward on every
rank), then the root (embeddings, final norm, lm_head).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    checkpoint_wrapper,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from model.convert import vl_model_of

from .vision_attention import BatchedQwen2_5_VLVisionAttention


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return vl_model_of(model).language_model.layers


def apply_ac(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant checkpoint)."""
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        layers[i] = checkpoint_wrapper(layer, preserve_rng_state=False)


def has_nsa_layers(model: nn.Module) -> bool:
    return any(hasattr(layer.self_attn, "hybrid_attention") for layer in decoder_layers(model))


def apply_compile(model: nn.Module) -> None:
    """Compile each decoder layer separately: identical layers reuse one compiled graph.

    In an NSA layer the hybrid attention itself (span bookkeeping with data-dependent shapes, then
    flexnsa's op, whose FlexAttention calls are compiled on their own) stays out of the graph
    (``torch.compiler.disable``): dynamo compiles the norms, q/k/v projections and rotary
    embedding before it and o_proj, residuals and MLP after it, with one graph break between.
    """
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        attention = layer.self_attn
        if hasattr(attention, "hybrid_attention"):
            attention.hybrid_attention = torch.compiler.disable(attention.hybrid_attention)
        layers[i] = torch.compile(layer)


def apply_vision_compile(model: nn.Module) -> int:
    """Compile each vision block that uses the batched attention; returns how many.

    Why: eager, a block's two RMSNorms (fp32 round trip), rotary embedding and MLP are ~10
    elementwise passes over every patch, ~0.8 s of a 64K-token step on an H200 in both attention
    modes (profiling/NOTES.md, training step profile). The varlen attention call stays eager (it
    reads the segment lengths on the host), so each block compiles as two graphs around it; all
    blocks share them. Upstream's per-window attention (``vision_attention = "sdpa"``) loops over
    thousands of windows in Python, which dynamo would unroll: those blocks stay eager.
    """
    compiled = 0
    for block in vl_model_of(model).visual.blocks:
        if isinstance(block.attn, BatchedQwen2_5_VLVisionAttention):
            # the block's own forward: transformers wraps every layer's forward in one shared
            # function (GradientCheckpointingLayer's, HF's own checkpointing, which flexnsa does
            # not use), so compiling that would put vision blocks and decoder layers in one
            # dynamo cache (a "recompile" on the first step)
            # dynamic: the patch count changes with every video size, and window blocks and
            # full-attention blocks pass cu_seqlens of different lengths (static shapes would
            # recompile for each)
            forward = torch.compile(inspect.unwrap(type(block).forward).__get__(block), dynamic=True)
            block.forward = with_plain_input(forward)
            compiled += 1
    return compiled


def with_plain_input(forward):
    """The tower hands its first block a view (of its window permutation) and every later block a
    plain tensor; dynamic-shape graphs guard on a view's base, so that difference alone would
    compile each graph twice. One copy of the first block's input (~0.3 ms at 256K patches)."""

    def call(hidden_states, *args, **kwargs):
        if hidden_states._is_view():
            hidden_states = hidden_states.clone()
        return forward(hidden_states, *args, **kwargs)

    return call


def apply_fsdp(model: nn.Module, mp_policy: MixedPrecisionPolicy, mesh=None) -> None:
    """fully_shard each decoder layer, the vision tower, then the root."""
    kwargs = {"mp_policy": mp_policy, "mesh": mesh}
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        # the last layer's parameters are needed at once by backward: no point resharding them
        fully_shard(layer, reshard_after_forward=i < len(layers) - 1, **kwargs)
    fully_shard(vl_model_of(model).visual, **kwargs)
    fully_shard(model, **kwargs)


def mixed_precision_policy(name: str) -> MixedPrecisionPolicy:
    if name == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def parallelize(model: nn.Module, *, activation_checkpointing: bool, compile: bool, mixed_precision: str) -> nn.Module:
    """AC -> compile -> FSDP, each only when asked (FSDP always: it is also the data parallelism).

    Compile covers the decoder layers and the vision blocks (:func:`apply_vision_compile`); the
    vision tower is not checkpointed (it trains only with ``trainable = "all"``, and its
    activations are then kept).

    NSA layers with both AC and compile: compile -> AC instead. Dynamo traces a checkpointed
    region as one higher-order op that allows no graph break, and the NSA layer has one (its
    eager hybrid attention), so AC-then-compile would leave the whole layer uncompiled (measured:
    zero graphs). Checkpointing the compiled layer recomputes it through the same compiled graphs.
    """
    nsa_layers = has_nsa_layers(model)
    if activation_checkpointing and not (compile and nsa_layers):
        apply_ac(model)
    if compile:
        apply_compile(model)
        apply_vision_compile(model)
        if activation_checkpointing and nsa_layers:
            apply_ac(model)
    apply_fsdp(model, mixed_precision_policy(mixed_precision))
    return model
