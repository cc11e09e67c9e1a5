"""The NSA op and the hybrid layer never wait for the GPU from the host (no .item(), no pageable
copy, no data-dependent shape) in forward or backward: in a training step each such sync drains
the launch queue and leaves the GPU idle (NOTES Lever 22). GPU only: CUDA's sync debug mode
raises on the first synchronising call."""

import copy

import pytest
import torch

from flexnsa import nsa_attention
from model import SpanPlan, convert_to_nsa, random_model, tiny_nsa_config, tiny_qwen2_5_vl_config

from helpers import SMALL, random_inputs

pytestmark = pytest.mark.gpu


def forward_backward(fn, inputs):
    out = fn(*inputs)
    out.backward(torch.ones_like(out))


def assert_no_sync(fn, inputs):
    forward_backward(fn, inputs)  # compiles, builds and caches the static masks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        forward_backward(fn, inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("window_kernel", ["auto", "triton"], ids=["auto", "triton-window-fused-gates"])
@pytest.mark.parametrize("selection", ["block_shared", "per_token"])
def test_op_makes_no_host_sync(selection, window_kernel):
    # the Triton window puts all three branches on the kernels: the fused gated backward (Lever 37)
    cfg = SMALL.replace(selection=selection, window_kernel=window_kernel, check_inputs=False)
    inputs = random_inputs(1, 14, 2, 700, 128, dtype=torch.bfloat16, device="cuda", seed=1, requires_grad=True)
    assert_no_sync(lambda q, k, v, g: nsa_attention(q, k, v, g, cfg), inputs)


def test_hybrid_layer_makes_no_host_sync():
    nsa = tiny_nsa_config().replace(backend="flex", block_size=16, stride=16, select_block_size=16, select_query_tile=16,
                                    num_selected=4, window=32, check_inputs=False)
    model = convert_to_nsa(random_model(tiny_qwen2_5_vl_config()), nsa)
    attn = copy.deepcopy(model.model.language_model.layers[0].self_attn).to("cuda", torch.bfloat16)
    T = 600
    plan = SpanPlan(batch_size=1, seq_len=T, spans=(((20, 300), (310, 560)),))
    gen = torch.Generator().manual_seed(0)
    Hq, Hkv, D = attn.num_heads, attn.num_key_value_heads, attn.head_dim
    q, k, v = (torch.randn(1, T, n, D, generator=gen).to("cuda", torch.bfloat16).requires_grad_() for n in (Hq, Hkv, Hkv))
    h = torch.randn(1, T, attn.hidden_size, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
    assert_no_sync(lambda *x: attn.hybrid_attention(*x, None, plan), (q, k, v, h))
