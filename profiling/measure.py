"""Latency of the NSA op and of each of its stages, as the flex backend runs them.

Stages (the report's branches):
  compression  pooling + compressed attention (+ their backward)
  scores_topk  importance scores + top-n (no grad: same in both modes)
  mask_build   the BlockMasks the FlexAttention branches need, from indices (no grad)
  selection    selected-block attention (+ backward)
  window       sliding-window attention, unfolded to per-head layout (+ backward)
  combine      GQA fold of q (the window's query rows), gated combine per head (+ backward)
The op's total is measured separately; the report shows the stage sum next to it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from flexnsa import NSAConfig, nsa_attention
from flexnsa.backends import flex as stages
from flexnsa.cuda_graphs import graphed_nsa_attention

from .timing import first_call_s, host_ms, median_ms, peak_memory_mb

STAGES = ("compression", "scores_topk", "mask_build", "selection", "window", "combine")
MODES = ("fwd", "fwd+bwd")
# How the op is called: eagerly (its FlexAttention pieces compiled on their own, the kernels as
# custom ops), the whole op under torch.compile (``compiled_nsa_attention``), or as CUDA-graph
# replays (``flexnsa.cuda_graphs``). Stages are timed for the eager form only.
FORMS = ("eager", "compiled", "cuda_graphs")
# Dynamo recompiles the whole op per (length, grad mode, config) of a sweep; a run past this many
# raises (fail_on_recompile_limit_hit) instead of running the op eagerly under the compiled name.
COMPILED_RECOMPILE_LIMIT = 64


INPUTS = ("random", "smooth")


@dataclass(frozen=True)
class Shape:
    """The measured problem: sizes, dtype, device, and how its inputs are drawn (``INPUTS``)."""
    batch: int
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    inputs: str = "random"


def q7b_shape(dtype: torch.dtype, device: torch.device, inputs: str = "random") -> Shape:
    """DESIGN.md's canonical benchmark shape: B=1, Hq=28, Hkv=4, D=128."""
    return Shape(1, 28, 4, 128, dtype, device, inputs)


SMOOTH_SPACING = 512  # tokens between the anchors of a smooth input (8 frames of 64 tokens)
SMOOTH_SHARE = 0.8  # variance share of the slowly varying part


def random_inputs(shape: Shape, seq_len: int, seed: int, requires_grad: bool):
    """Fresh random q, k, v, gates (never zeros), generated on the device.

    ``shape.inputs``: "random", i.i.d. normal (neighbouring query tiles select unrelated blocks:
    the worst case for the selection backward's L2 reuse, NOTES session 15); "smooth", q and k
    drift slowly along the tokens (a normal anchor every SMOOTH_SPACING tokens, linearly
    interpolated, carrying SMOOTH_SHARE of the variance, plus i.i.d. noise), as consecutive
    frames of a video do, so neighbouring tiles select overlapping blocks."""
    if shape.inputs not in INPUTS:
        raise ValueError(f"inputs must be one of {INPUTS}, got {shape.inputs!r}")
    gen = torch.Generator(device=shape.device).manual_seed(seed)
    kw = dict(device=shape.device, dtype=shape.dtype, generator=gen)

    def draw(heads):
        x = torch.randn(shape.batch, heads, seq_len, shape.head_dim, **kw)
        if shape.inputs == "smooth" and seq_len > 1:
            anchors = torch.randn(shape.batch * heads, shape.head_dim, seq_len // SMOOTH_SPACING + 2, **kw)
            slow = torch.nn.functional.interpolate(anchors.float(), size=seq_len, mode="linear", align_corners=True)
            slow = slow.view(shape.batch, heads, shape.head_dim, seq_len).transpose(2, 3)
            x = (SMOOTH_SHARE**0.5 * slow + (1 - SMOOTH_SHARE) ** 0.5 * x.float()).to(shape.dtype).contiguous()
        return x

    q, k = draw(shape.q_heads), draw(shape.kv_heads)
    v = torch.randn(shape.batch, shape.kv_heads, seq_len, shape.head_dim, **kw)
    gates = torch.rand(shape.batch, seq_len, shape.q_heads, 3, **kw)
    return [x.requires_grad_(requires_grad) for x in (q, k, v, gates)]


def op_call(shape: Shape, seq_len: int, config: NSAConfig, backward: bool, seed: int = 0, form: str = "eager"):
    """(fn, inputs): one call of the op on fresh random inputs, with its backward from a random
    output gradient when ``backward`` (for the profilers that drive the op from outside the sweep);
    ``form`` "eager" or "compiled" (``called_as``)."""
    q, k, v, gates = random_inputs(shape, seq_len, seed, backward)
    grad_out = torch.randn_like(q)
    op = called_as(config, form)

    def call():
        with torch.set_grad_enabled(backward):
            out = op(q, k, v, gates)
            if backward:
                out.backward(grad_out)

    return call, [q, k, v, gates]


def compiled_nsa_attention(config: NSAConfig):
    """``f(q, k, v, gates)``: the whole op under ``torch.compile(fullgraph=True, dynamic=False)``,
    as a model compiled around it runs it: one graph per length (inductor fuses the pooling, folds,
    gates and the top-n's PyTorch steps; the kernels stay custom ops), so issuing it costs one
    guard check instead of autograd and dispatch per piece (where 8K is host-bound, NOTES)."""
    compiled = torch.compile(lambda q, k, v, gates: nsa_attention(q, k, v, gates, config), fullgraph=True, dynamic=False)

    def call(q, k, v, gates):
        with torch._dynamo.config.patch(recompile_limit=COMPILED_RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
            return compiled(q, k, v, gates)

    return call


def called_as(config: NSAConfig, form: str):
    """``f(q, k, v, gates)`` for the eager and compiled forms (the cuda_graphs form captures
    concrete inputs: ``flexnsa.cuda_graphs.graphed_nsa_attention``)."""
    if form not in ("eager", "compiled"):
        raise ValueError(f"form must be eager or compiled here, got {form!r}")
    if form == "compiled":
        return compiled_nsa_attention(config)
    return lambda q, k, v, gates: nsa_attention(q, k, v, gates, config)


def _leaf(x: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    return x.detach().requires_grad_(requires_grad)


def _with_backward(forward, grad_out, backward: bool):
    if not backward:
        return lambda: forward()
    return lambda: forward().backward(grad_out)


def measure_nsa(shape: Shape, seq_len: int, config: NSAConfig, mode: str, *, stages: bool = True, seed: int = 0, warmup_ms=25,
                rep_ms=100, form: str = "eager") -> dict:
    """Total and (flex backend) per-stage medians in ms, compile seconds and peak memory.
    ``form`` (``FORMS``): "compiled", the whole op under torch.compile (no stages); "cuda_graphs",
    the op as ``flexnsa.cuda_graphs.graphed_nsa_attention`` replays (no stages; compile seconds
    include the capture; no peak memory: a replay reuses the graph's private pool, which the
    allocator's peak counter does not see, so it would read low)."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    cuda_graphs = form == "cuda_graphs"
    backward = mode == "fwd+bwd"
    device = shape.device
    q, k, v, gates = random_inputs(shape, seq_len, seed, backward)
    grad_out = torch.randn_like(q)
    timing = dict(warmup_ms=warmup_ms, rep_ms=rep_ms)
    with torch.set_grad_enabled(backward):
        if cuda_graphs:
            start = time.perf_counter()
            graphed = graphed_nsa_attention(q, k, v, gates, config)
            torch.cuda.synchronize(device)
            capture_s = time.perf_counter() - start
            total_fn = _with_backward(lambda: graphed(q, k, v, gates), grad_out, backward)
            stages = False
        else:
            capture_s = 0.0
            op = called_as(config, form)
            total_fn = _with_backward(lambda: op(q, k, v, gates), grad_out, backward)
            stages = stages and form == "eager"
        cold_s = capture_s + first_call_s(total_fn, device)
        total = median_ms(total_fn, device, grad_to_none=[q, k, v, gates], **timing)
        launch = host_ms(total_fn, device, grad_to_none=[q, k, v, gates])
        peak = None if cuda_graphs else peak_memory_mb(total_fn, device)
        stage_ms = measure_stages(q, k, v, gates, grad_out, config, backward, timing) if stages else {}
    return {
        "mode": mode,
        "seq_len": seq_len,
        "total_ms": total,
        "host_ms": launch,
        "stages_ms": stage_ms,
        "stage_sum_ms": sum(stage_ms.values()) if stage_ms else None,
        "compile_s": max(0.0, cold_s - total / 1000),
        "peak_mb": peak,
    }


def stage_functions(q, k, v, gates, grad_out, config: NSAConfig, backward: bool):
    """Callables running each stage alone on precomputed inputs, and the leaves whose grads they fill."""
    T = q.shape[2]
    layout = stages.query_layout(config, q.device, q.shape[1] // k.shape[1])
    with torch.no_grad():
        k_cmp, v_cmp = stages.compress(k, v, config)
        q_rows = layout.fold(q)
        branch = {}
        branch["cmp"], cmp_lse = stages.compression_branch(q, q_rows, k_cmp, v_cmp, layout, config)
        selected, _ = stages.score_and_select(q, k_cmp, config, cmp_lse=cmp_lse)
        masks = stages.build_masks(selected, T, layout, config)
        branch["slc"] = stages.selection_branch(q, q_rows, k, v, selected, masks, layout, config)
        branch["win"] = stages.window_branch(q, q_rows, k, v, masks, layout, config)
    q_l, q_rows, k_l, v_l, gates_l = (_leaf(x, backward) for x in (q, q_rows, k, v, gates))
    cmp, slc, win = (_leaf(branch[n], backward) for n in ("cmp", "slc", "win"))

    def compression():
        kc, vc = stages.compress(k_l, v_l, config)
        return stages.compression_branch(q_l, q_rows, kc, vc, layout, config)[0]

    fns = {
        "compression": _with_backward(compression, grad_out, backward),
        # with the compression branch's lse, as the op runs it (the scorer skips its lse pass)
        "scores_topk": lambda: stages.score_and_select(q, k_cmp, config, cmp_lse=cmp_lse),
        "mask_build": lambda: stages.build_masks(selected, T, layout, config),
        "selection": _with_backward(
            lambda: stages.selection_branch(q_l, q_rows, k_l, v_l, selected, masks, layout, config), grad_out, backward
        ),
        "window": _with_backward(lambda: stages.window_branch(q_l, q_rows, k_l, v_l, masks, layout, config), grad_out, backward),
        # The GQA fold of q (the window's FlexAttention rows) is counted here with the gated sum.
        "combine": _with_backward(lambda: (layout.fold(q), stages.combine(gates_l, cmp, slc, win))[1], grad_out, backward),
    }
    return fns, [q_l, q_rows, k_l, v_l, gates_l, cmp, slc, win]


def measure_stages(q, k, v, gates, grad_out, config: NSAConfig, backward: bool, timing: dict) -> dict:
    fns, leaves = stage_functions(q, k, v, gates, grad_out, config, backward)
    out = {}
    for name in STAGES:
        fns[name]()  # compile outside the timed region
        out[name] = median_ms(fns[name], q.device, grad_to_none=leaves, **timing)
    return out
