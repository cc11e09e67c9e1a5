"""Token-major inputs (a video span of the model's [B, T, H, D] projections, seen as [B, H, T, D])
run through the Triton kernels and the whole op without a copy: outputs and gradients come back in
the inputs' layout, with the values of contiguous inputs (NOTES Lever 21)."""

import pytest
import torch

from flexnsa import nsa_attention
from flexnsa.compression import compress_kv
from flexnsa.triton_fallback.compression_attention import compression_attention
from flexnsa.triton_fallback.selection_attention import selection_attention
from flexnsa.triton_fallback.tiles import is_dense, kernel_layout, strides_like

from helpers import SMALL, assert_rel, random_inputs
from test_triton_selection import random_rows


def token_major(*tensors):
    """The same values in a [B, T, H, D] buffer, seen as [B, H, T, D] (leaves)."""
    return [x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(x.requires_grad) for x in tensors]


def assert_same_layout(a, b, what):
    assert a.stride() == b.stride(), f"{what}: strides {a.stride()} != {b.stride()}"


def run_selection(q, k, v, rows):
    out, lse = selection_attention(q, k, v, rows, 16, 16, 0.25)
    grad = torch.arange(out.numel(), device=out.device).reshape(out.shape).sin().to(out.dtype)
    return (out, lse, *torch.autograd.grad(out, (q, k, v), grad))


def run_compression(q, k, v):
    kc, vc = compress_kv(k, v, SMALL)
    out, lse = compression_attention(q, kc, vc, 16, 16, 0.25)
    grad = torch.arange(out.numel(), device=out.device).reshape(out.shape).cos().to(out.dtype)
    return (out, lse, *torch.autograd.grad(out, (q, k, v), grad))


def check_kernels(device, dtype, tol):
    q, k, v, _ = random_inputs(2, 14, 2, 200, 16, dtype=dtype, device=device, seed=3, requires_grad=True)
    rows = random_rows(2, 2, 200, 16, 16, 4, seed=3).to(device)
    tq, tk, tv = token_major(q, k, v)
    for name, run, args in (("selection", run_selection, (rows,)), ("compression", run_compression, ())):
        expected = run(q, k, v, *args)
        got = run(tq, tk, tv, *args)
        torch.testing.assert_close(got[1], expected[1], rtol=tol, atol=tol)  # lse (-inf where nothing is visible)
        for what, a, b in zip(("out", "dq", "dk", "dv"), got[:1] + got[2:], expected[:1] + expected[2:]):
            assert_rel(a, b, tol, f"{name} {what}")
        out, _, dq, dk, dv = got
        assert_same_layout(out, tq, f"{name} out")
        assert_same_layout(dq, tq, f"{name} dq")
        if name == "selection":  # compression's dk, dv come through the pooling's backward
            assert_same_layout(dk, tk, f"{name} dk")
            assert_same_layout(dv, tv, f"{name} dv")


def test_kernels_keep_token_major_layout_interpreter():
    check_kernels("cpu", torch.float32, 1e-6)


@pytest.mark.gpu
def test_kernels_keep_token_major_layout_gpu():
    check_kernels("cuda", torch.bfloat16, 1e-2)


def test_kernel_layout_copies_only_what_the_kernels_cannot_index():
    x = torch.randn(2, 50, 4, 16).transpose(1, 2)
    assert kernel_layout(x) is x and is_dense(x)
    assert kernel_layout(x[:, :, :20]).is_contiguous()  # gaps between batches: copied
    y = torch.randn(2, 4, 50, 16).transpose(-1, -2).contiguous().transpose(-1, -2)  # head_dim not unit-stride
    assert kernel_layout(y).is_contiguous() and torch.equal(kernel_layout(y), y)
    c = torch.randn(2, 4, 50, 16)
    assert strides_like(c, x).stride() == x.stride() and torch.equal(strides_like(c, x), c)
    assert strides_like(x, x) is x


def test_op_output_token_major_interpreter():
    # The whole op (Triton compression, scores, selection; FlexAttention window, forward-only on CPU).
    cfg = SMALL.replace(compression_kernel="triton", selection_kernel="triton", check_inputs=False)
    q, k, v, g = random_inputs(1, 7, 1, 100, 16, seed=5)
    tq, tk, tv = token_major(q, k, v)
    with torch.no_grad():
        expected = nsa_attention(q, k, v, g, cfg, return_branches=True)
        got = nsa_attention(tq, tk, tv, g, cfg, return_branches=True)
    for what in ("out", "cmp", "slc", "win"):
        assert_rel(getattr(got, what), getattr(expected, what), 1e-6, what)
        assert_same_layout(getattr(got, what), tq, what)
    assert torch.equal(got.selected, expected.selected)


@pytest.mark.gpu
def test_op_token_major_forward_backward_gpu():
    cfg = SMALL.replace(check_inputs=False)  # CUDA defaults: Triton kernels, per-head layout
    q, k, v, g = random_inputs(1, 14, 2, 700, 128, dtype=torch.bfloat16, device="cuda", seed=6, requires_grad=True)
    tq, tk, tv = token_major(q, k, v)
    results = []
    for inputs in ((q, k, v), (tq, tk, tv)):
        out = nsa_attention(*inputs, g, cfg)
        grad = torch.arange(out.numel(), device="cuda").reshape(out.shape).sin().to(out.dtype)
        results.append((out, *torch.autograd.grad(out, (*inputs, g), grad)))
    for what, a, b in zip(("out", "dq", "dk", "dv", "dgates"), results[1], results[0]):
        assert_rel(a, b, 1e-2, what)
    out, dq, dk, dv, _ = results[1]
    assert_same_layout(out, tq, "out")
    assert_same_layout(dq, tq, "dq")
    assert_same_layout(dk, tk, "dk")
    assert_same_layout(dv, tv, "dv")
