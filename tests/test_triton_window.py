"""Sliding-window attention on the selected-block kernels (``window_attention``) == float64
reference (t - w < s <= t): output, lse, dq, dk, dv. Interpreter on CPU (fp32), native on GPU
(bf16, fp32). Cases: G = 7 and 1, windows that are and are not block multiples, wider than T,
of a few tokens, T not a multiple of the block, T < one block."""

import pytest
import torch

from flexnsa import NSAConfig
from flexnsa.reference import masked_attention, window_visibility
from flexnsa.triton_fallback import selection_attention as slc
from flexnsa.triton_fallback import WINDOW_TRITON_FROM, use_triton_window
from flexnsa.triton_fallback.selection_attention import window_attention, window_rows

from helpers import assert_rel, random_inputs

# (id, Hq, Hkv, T, D, block, window)
CASES = [
    ("G7-T200-w40", 14, 2, 200, 16, 16, 40),
    ("G1-T150-w16", 2, 2, 150, 16, 16, 16),
    ("G7-T10-w256", 7, 1, 10, 16, 16, 256),
    ("G7-T333-l32-w3", 7, 1, 333, 16, 32, 3),
    ("G7-T170-w65", 7, 1, 170, 16, 16, 65),
]


def check(case, dtype, device, tol, seed=0):
    _, Hq, Hkv, T, D, block, window = case
    q, k, v, _ = random_inputs(2, Hq, Hkv, T, D, dtype=dtype, device=device, seed=seed, requires_grad=True)
    out, lse = window_attention(q, k, v, window, block, D**-0.5)
    grad = torch.randn_like(out)
    out.backward(grad)
    q64, k64, v64 = (x.detach().double().cpu().requires_grad_() for x in (q, k, v))
    ref, _, ref_lse = masked_attention(q64, k64, v64, window_visibility(T, window), D**-0.5)
    ref.backward(grad.double().cpu())
    assert_rel(out, ref, tol, "out")
    torch.testing.assert_close(lse.cpu(), ref_lse.float(), rtol=tol, atol=tol)
    for name, a, b in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
        assert_rel(a.grad, b.grad, 2 * tol, name)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_window_attention_interpreter(case):
    check(case, torch.float32, "cpu", tol=1e-5)


def test_window_dkv_one_item_per_block(monkeypatch):
    # The window's dK/dV: one work item per block whatever CHUNK says (2 would split each block's
    # 3-4 window rows), so every item stores alone and the gradients need no fp32 atomics buffer.
    monkeypatch.setattr(slc, "CHUNK", 2)
    monkeypatch.setattr(slc, "GROUP_TOKENS", 32)  # the selection's grouped work order must not reach the window
    lists = []

    def spy(rows, num_blocks, chunk, group_rows=0, interleave=0, **knobs):
        assert group_rows == 0, "the window's dK/dV stores in k's dtype: one group, no atomics"
        lists.append(slc_reverse_lists(rows, num_blocks, chunk, group_rows, interleave, **knobs))
        return lists[-1]

    slc_reverse_lists = slc.reverse_lists
    monkeypatch.setattr(slc, "reverse_lists", spy)
    check(CASES[0], torch.float32, "cpu", tol=1e-5, seed=4)
    owner, alone = lists[-1][0][0], lists[-1][0][3]
    assert (owner >= 0).sum() == 2 * 2 * -(-200 // 16) and (alone[owner >= 0] == 1).all()


@pytest.mark.parametrize("interleave", [True, False], ids=["interleaved-rule", "ascending"])
@pytest.mark.parametrize("case", [CASES[0], CASES[4]], ids=[CASES[0][0], CASES[4][0]])
def test_window_dkv_row_order_interpreter(case, interleave, monkeypatch):
    # Lever 45's knob (the rule): each block's window rows read in order of row mod n; off: ascending.
    monkeypatch.setattr(slc, "INTERLEAVE", interleave)
    lists = []

    def spy(rows, num_blocks, chunk, group_rows=0, interleave=0, **knobs):
        lists.append((rows.shape[3], interleave))
        return slc_reverse_lists(rows, num_blocks, chunk, group_rows, interleave, **knobs)

    slc_reverse_lists = slc.reverse_lists
    monkeypatch.setattr(slc, "reverse_lists", spy)
    check(case, torch.float32, "cpu", tol=1e-5, seed=6)
    assert lists and all((n == m > 1) if interleave else m == 0 for n, m in lists), lists


def test_window_rows_span_exactly_the_window():
    # Every visible key's block is in its tile's row, and each row's first block holds a visible key.
    T, block, window = 300, 16, 50
    rows = window_rows(1, 1, T, window, block, "cpu")[0, 0]
    visible = window_visibility(T, window)
    for r, ids in enumerate(rows.tolist()):
        tokens = range(r * block, min((r + 1) * block, T))
        needed = {s // block for t in tokens for s in range(T) if visible[t, s]}
        assert needed == {j for j in ids if j >= 0}, r
    assert rows.shape == (-(-T // block), 5)  # ceil(49 / 16) + 1


def test_bad_window_raises():
    q, k, v, _ = random_inputs(1, 7, 1, 40, 16)
    with pytest.raises(ValueError, match="window must be"):
        window_rows(1, 1, 40, 0, 16, "cpu")
    with pytest.raises(ValueError, match="window must be"):
        slc.selection_attention(q, k, v, window_rows(1, 1, 40, 8, 8, "cpu"), 8, 8, 0.25, -1)


def test_window_kernel_switch(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cfg = NSAConfig()
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        use_triton_window(cfg.replace(window_kernel="triton"), torch.device("cpu"), 100)
    cuda, long, short = torch.device("cuda"), WINDOW_TRITON_FROM, WINDOW_TRITON_FROM - 1
    # default: Triton on CUDA from WINDOW_TRITON_FROM tokens on (launch-bound below), FlexAttention on CPU
    assert cfg.window_kernel == "auto" and use_triton_window(cfg, cuda, long) and not use_triton_window(cfg, cuda, short)
    assert not use_triton_window(cfg, torch.device("cpu"), long)
    assert not use_triton_window(cfg.replace(window_kernel="flex"), cuda, long)
    assert use_triton_window(cfg.replace(window_kernel="triton"), cuda, short)
    with pytest.raises(ValueError, match="window_kernel"):
        cfg.replace(window_kernel="cuda")


def check_gated(case, dtype, device, tol, token_major=False):
    """The window kernel with the gated-sum epilogue (NOTES Lever 40): its window output and lse
    are the plain launch's, bit for bit, and y == g_cmp cmp + g_slc slc + g_win win in float64
    with the reference window; gates exactly 0 on some rows, cmp/slc fresh random."""
    _, Hq, Hkv, T, D, block, window = case
    q, k, v, gates = random_inputs(2, Hq, Hkv, T, D, dtype=dtype, device=device, seed=3)
    gen = torch.Generator().manual_seed(4)
    o_cmp, o_slc = (torch.randn(2, Hq, T, D, generator=gen).to(device, dtype) for _ in range(2))
    gates[:, ::5, :, 2] = 0.0
    if token_major:  # the model's projections: [B, T, H, D] seen as [B, H, T, D]; gates as they come
        q, k, v, o_cmp, o_slc = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v, o_cmp, o_slc))
    head_gates = gates.permute(0, 2, 1, 3)  # [B, Hq, T, 3], strided
    rows = window_rows(2, Hkv, T, window, block, q.device)
    plain_out, plain_lse = slc.selection_attention_fwd(q, k, v, rows, block, block, D**-0.5, window)
    out, out_lse, y = slc.selection_attention_fwd(q, k, v, rows, block, block, D**-0.5, window,
                                                  gated=(head_gates, o_cmp, o_slc))
    assert torch.equal(out, plain_out) and torch.equal(out_lse, plain_lse)
    assert y.shape == q.shape and y.stride() == torch.empty_like(q).stride()
    ref, _, _ = masked_attention(*(x.double().cpu() for x in (q, k, v)), window_visibility(T, window), D**-0.5)
    g = head_gates.double().cpu()
    expected = g[..., 0:1] * o_cmp.double().cpu() + g[..., 1:2] * o_slc.double().cpu() + g[..., 2:3] * ref
    assert_rel(y, expected, tol, "gated sum")


@pytest.mark.parametrize("token_major", [False, True], ids=["head-major", "token-major"])
@pytest.mark.parametrize("case", CASES[:2], ids=[c[0] for c in CASES[:2]])
def test_gated_window_interpreter(case, token_major):
    check_gated(case, torch.float32, "cpu", tol=1e-5, token_major=token_major)


def test_gated_window_bad_shapes_raise():
    q, k, v, gates = random_inputs(1, 7, 1, 40, 16)
    rows = window_rows(1, 1, 40, 16, 16, q.device)
    with pytest.raises(ValueError, match="head_gates must be"):
        slc.selection_attention_fwd(q, k, v, rows, 16, 16, 0.25, 16, gated=(gates, q, q))  # [B, T, Hq, 3]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("token_major", [False, True], ids=["head-major", "token-major"])
def test_gated_window_gpu(dtype, token_major):
    check_gated(("Q7B-T3000-w256", 28, 4, 3000, 128, 64, 256), dtype, "cuda",
                tol=2e-2 if dtype == torch.bfloat16 else 2e-3, token_major=token_major)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("case", CASES + [("Q7B-T3000-w256", 28, 4, 3000, 128, 64, 256)],
                         ids=[c[0] for c in CASES] + ["Q7B-T3000-w256"])
def test_window_attention_gpu(case, dtype):
    # bf16 P and dS are rounded before their dots (unit roundoff 3.9e-3) -> ~1e-2; TF32 ~1e-3.
    check(case, dtype, "cuda", tol=2e-2 if dtype == torch.bfloat16 else 2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_window_dkv_ascending_rows_gpu(dtype, monkeypatch):
    # Lever 45's knob off natively (the rule, interleaved rows, runs in test_window_attention_gpu).
    monkeypatch.setattr(slc, "INTERLEAVE", False)
    check(("Q7B-T3000-w256", 28, 4, 3000, 128, 64, 256), dtype, "cuda", tol=2e-2 if dtype == torch.bfloat16 else 2e-3)
