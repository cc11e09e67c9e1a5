"""The NSA op captured as CUDA graphs: for short sequences, where issuing the op costs more than
running it.

At 8K on an H200 the op's forward+backward takes 7.2 ms, 6.8 ms of which is the host issuing it
(Python, autograd, ~60 kernel launches; NOTES session 12), while its kernels need ~1-2 ms. A
CUDA graph replays the whole launch sequence in one call. The op can be captured because nothing
in it reads device data on the host (tests/test_no_host_sync.py): the selected blocks, the
BlockMasks and the selection backward's reverse lists are built and consumed on the device.

A capture is for one set of shapes, dtypes and strides (a new length needs a new capture), and
the returned output tensor is the graph's own buffer, overwritten by the next call: consume or
clone it first. This is an explicit wrapper, never a silent path inside ``nsa_attention``.
"""

from __future__ import annotations

from typing import Callable

import torch

from .config import NSAConfig
from .ops import nsa_attention
from .validation import check_nsa_inputs


def graphed_nsa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gates: torch.Tensor, config: NSAConfig | None = None,
    *, warmup_iters: int = 3,
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """``f(q, k, v, gates) -> out``: ``nsa_attention(q, k, v, gates, config)`` captured as CUDA
    graphs for inputs shaped like these samples (forward, and backward when any sample requires
    grad; its gradients flow to the arguments of each call). Each call copies its arguments into
    the graph's input buffers (copies of the samples; the samples themselves are left alone) and
    replays. The samples' values drive the warm-up runs (which compile the op's kernels) and the
    capture.

    ``config.check_inputs`` (finite values, gates in [0, 1]) runs eagerly on each call's inputs
    before the replay, since a graph cannot read device data on the host.

    Learned compression (``compression='mlp'``) is refused: its MLPs' weights are not inputs of
    the graph, so their gradients would be lost; capture the model with torch.compile's
    ``mode='reduce-overhead'`` instead.
    """
    config = NSAConfig() if config is None else config
    if not isinstance(config, NSAConfig):
        raise TypeError(f"config must be a flexnsa.NSAConfig, got {type(config).__name__}")
    if not all(isinstance(x, torch.Tensor) and x.is_cuda for x in (q, k, v, gates)):
        raise ValueError("graphed_nsa_attention captures CUDA graphs: q, k, v and gates must be CUDA tensors")
    if config.compression == "mlp":
        raise ValueError(
            "graphed_nsa_attention does not capture compression='mlp': the MLP weights are not graph inputs and "
            "their gradients would be lost; use torch.compile(mode='reduce-overhead') on the module instead"
        )
    if warmup_iters < 1:
        raise ValueError(f"warmup_iters must be >= 1 (the warm-up compiles the kernels), got {warmup_iters}")

    check_nsa_inputs(q, k, v, gates, config)  # shapes, dtypes and (with check_inputs) values, before any capture
    captured = config.replace(check_inputs=False)  # the value checks read device data on the host: not capturable

    def op(q, k, v, gates):
        return nsa_attention(q, k, v, gates, captured)

    # The graph's input buffers: copies (same strides), so the caller's tensors are never overwritten.
    samples = tuple(x.detach().clone().requires_grad_(x.requires_grad) for x in (q, k, v, gates))
    graphed = torch.cuda.make_graphed_callables(op, samples, num_warmup_iters=warmup_iters)

    def call(q, k, v, gates):
        for name, x, s in zip(("q", "k", "v", "gates"), (q, k, v, gates), samples):
            if x.shape != s.shape or x.dtype != s.dtype or x.stride() != s.stride() or x.device != s.device:
                raise ValueError(
                    f"{name} {tuple(x.shape)} {x.dtype} strides {x.stride()} does not match the captured "
                    f"{tuple(s.shape)} {s.dtype} strides {s.stride()}; capture again for new shapes"
                )
        if config.check_inputs:  # eager, one host sync per call; check_inputs=False skips it
            check_nsa_inputs(q, k, v, gates, config)
        return graphed(q, k, v, gates)

    return call
