"""The gated sum's backward through the branch kernels (NOTES Lever 37, rule off until measured)
== float64 reference: output and the gradients of q, k, v and the gates, including gates that are
exactly 0 (whose gradient must still come out). Interpreter on CPU (fp32), native on GPU."""

import pytest
import torch

from flexnsa import NSAConfig, nsa_attention, nsa_reference
from flexnsa.backends import flex, fused_gates
from flexnsa.compression import compress_kv
from flexnsa.triton_fallback.tiles import kernel_layout

from helpers import SMALL, assert_rel, float64, random_inputs

ALL_TRITON = dict(compression_kernel="triton", selection_kernel="triton", window_kernel="triton", check_inputs=False)


def test_gated_lse():
    lse = torch.tensor([1.5, float("-inf"), 0.25, float("-inf"), -2.0])
    gate = torch.tensor([0.5, 0.5, 0.0, 0.0, 1.0])
    out = fused_gates.gated_lse(lse, gate)
    expected = torch.tensor([1.5 - torch.log(torch.tensor(0.5)).item(), float("-inf"), float("inf"), float("-inf"), -2.0])
    assert torch.equal(torch.isnan(out), torch.zeros(5, dtype=torch.bool))
    torch.testing.assert_close(out, expected)


def check(case, cfg, dtype, device, tol, grad_tol, via_op=False):
    _, Hq, Hkv, T, D = case
    q, k, v, gates = random_inputs(2, Hq, Hkv, T, D, dtype=dtype, device=device, seed=5, requires_grad=True)
    with torch.no_grad():
        gates[:, ::7, :, 1] = 0.0  # selection gates exactly 0 on some tokens: their gradient must survive
        gates[0, 3:9, :2, :] = 0.0
    if via_op:
        out = nsa_attention(q, k, v, gates, cfg)
        selected = nsa_attention(q, k, v, gates, cfg, return_branches=True).selected
    else:
        k_cmp, v_cmp = compress_kv(k, v, cfg)
        out, _, _, _, selected, _ = flex.fused_gates_branches(*(kernel_layout(x) for x in (q, k, v)), k_cmp, v_cmp, gates, cfg)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref_in = float64(q, k, v, gates)
    ref = nsa_reference(*ref_in, cfg, selected=selected.cpu())
    ref.out.backward(grad.double().cpu())
    assert_rel(out, ref.out, tol, "out")
    for name, a, b in zip(("q", "k", "v", "gates"), (q, k, v, gates), ref_in):
        assert_rel(a.grad, b.grad, grad_tol, f"d{name}")
    zero = gates.detach() == 0
    assert zero.any() and (gates.grad[zero] != 0).any(), "gates at 0 must keep their gradient"


@pytest.mark.parametrize("selection,dq_in,T", [("block_shared", True, 200), ("block_shared", False, 200), ("per_token", True, 120)],
                         ids=["block_shared-dq-in-kernel", "block_shared-dq-added", "per_token-dq-in-kernel"])
def test_fused_gates_interpreter(selection, dq_in, T, monkeypatch):
    # per-token at 120 tokens (not 200: 60 s in the interpreter, CI time), still not a block multiple
    monkeypatch.setattr(fused_gates, "DQ_IN", dq_in)  # the branches' dq summed by the dQ kernels or in place
    backward, grads_of_win = fused_gates.GatedBranches.backward, []

    def recording(ctx, grad, grad_win):
        grads_of_win.append(grad_win)
        return backward(ctx, grad, grad_win)

    monkeypatch.setattr(fused_gates.GatedBranches, "backward", staticmethod(recording))
    cfg = SMALL.replace(selection=selection, window=40, **ALL_TRITON)
    check((f"G7-T{T}", 14, 2, T, 16), cfg, torch.float32, "cpu", tol=1e-5, grad_tol=2e-5)
    # the window output is returned, not differentiable: no zero gradient of its size materialised
    assert grads_of_win == [None]


def test_fused_gates_only_where_the_rule_and_kernels_allow(monkeypatch):
    q, k, v, gates = random_inputs(1, 7, 1, 64, 16, requires_grad=True)
    cfg = SMALL.replace(**ALL_TRITON)
    k_cmp = compress_kv(k, v, cfg)[0]
    monkeypatch.setattr(fused_gates, "FUSED_GATES", False)
    assert not flex.use_fused_gates(q, k, v, gates, k_cmp, cfg, branches=False)  # the rule is off
    monkeypatch.setattr(fused_gates, "FUSED_GATES", True)
    assert flex.use_fused_gates(q, k, v, gates, k_cmp, cfg, branches=False)
    monkeypatch.setitem(fused_gates.TUNING["combine"], "fused_gates", False)  # the knob, at the tuned shape only
    q16 = torch.empty(1, 7, 64, 128, dtype=torch.bfloat16)
    assert not fused_gates.fused_gates_rule(q16) and fused_gates.fused_gates_rule(q)
    monkeypatch.setitem(fused_gates.TUNING["combine"], "fused_gates", None)
    assert not flex.use_fused_gates(q, k, v, gates, k_cmp, cfg, branches=True)  # ungated branches wanted back
    assert not flex.use_fused_gates(q, k, v, gates, k_cmp, cfg.replace(window_kernel="flex"), branches=False)
    with torch.no_grad():  # forward only: the same kernels, the gated sum in the window's epilogue
        assert flex.use_fused_gates(q, k, v, gates, k_cmp, cfg, branches=False)


@pytest.mark.parametrize("gated_window", [True, False], ids=["sum-in-window-epilogue", "sum-after"])
def test_fused_gates_forward_only_interpreter(gated_window, monkeypatch):
    # Inference (no grad) through the fused path == float64 reference; the gated sum in the
    # window kernel's epilogue or after it (NOTES Lever 40): both give the returned branches' sum.
    monkeypatch.setattr(fused_gates, "GATED_WINDOW", gated_window)
    cfg = SMALL.replace(selection="block_shared", window=40, **ALL_TRITON)
    q, k, v, gates = random_inputs(1, 14, 2, 150, 16, seed=6)
    with torch.no_grad():
        res = nsa_attention(q, k, v, gates, cfg, return_branches=True)
        out = nsa_attention(q, k, v, gates, cfg)
    ref = nsa_reference(*float64(q, k, v, gates), cfg, selected=res.selected)
    assert_rel(out, ref.out, 1e-5, "out")
    summed = flex.gated_sum(gates.permute(0, 2, 1, 3), res.cmp, res.slc, res.win)
    torch.testing.assert_close(out, summed, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_fused_gates_gpu(dtype, monkeypatch):
    # Through nsa_attention with the rule on, at the Q7B shape (Triton window forced at T = 1000).
    monkeypatch.setattr(fused_gates, "FUSED_GATES", True)
    cfg = NSAConfig(selection="block_shared", window_kernel="triton", check_inputs=False)
    tol, grad_tol = (2.5e-2, 4e-2) if dtype == torch.bfloat16 else (2e-3, 4e-3)
    check(("Q7B-T1000", 28, 4, 1000, 128), cfg, dtype, "cuda", tol, grad_tol, via_op=True)
