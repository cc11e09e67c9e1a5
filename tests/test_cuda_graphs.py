"""graphed_nsa_attention (the op as CUDA graphs, for short sequences): replays on new inputs give
the eager op's output and gradients, and the float64 reference's; the wrapper refuses what it
cannot capture."""

import pytest
import torch

from flexnsa import nsa_attention, nsa_reference
from flexnsa.cuda_graphs import graphed_nsa_attention

from helpers import SMALL, assert_rel, float64, random_inputs


def test_refuses_cpu_tensors():
    q, k, v, g = random_inputs(1, 7, 1, 64, 16)
    with pytest.raises(ValueError, match="CUDA tensors"):
        graphed_nsa_attention(q, k, v, g, SMALL)


@pytest.mark.gpu
def test_refuses_learned_compression_and_no_warmup():
    q, k, v, g = random_inputs(1, 7, 1, 64, 16, device="cuda")
    with pytest.raises(ValueError, match="compression='mlp'"):
        graphed_nsa_attention(q, k, v, g, SMALL.replace(compression="mlp"))
    with pytest.raises(ValueError, match="warmup_iters"):
        graphed_nsa_attention(q, k, v, g, SMALL, warmup_iters=0)


@pytest.mark.gpu
@pytest.mark.parametrize("window_kernel", ["auto", "triton"], ids=["auto", "triton-window-fused-gates"])
@pytest.mark.parametrize("selection", ["block_shared", "per_token"])
def test_replays_match_the_eager_op_and_the_reference(selection, window_kernel):
    cfg = SMALL.replace(selection=selection, window_kernel=window_kernel)  # triton: the fused gated backward
    shape = (1, 14, 2, 700, 64)
    samples = random_inputs(*shape, dtype=torch.bfloat16, device="cuda", seed=1, requires_grad=True)
    kept = [x.detach().clone() for x in samples]
    graphed = graphed_nsa_attention(*samples, cfg)
    assert all(torch.equal(a, b) for a, b in zip(samples, kept)), "the samples must not become the graph's buffers"
    for seed in (2, 3):  # new data each call: the selected blocks change, the graph is the same
        inputs = random_inputs(*shape, dtype=torch.bfloat16, device="cuda", seed=seed, requires_grad=True)
        grad = torch.randn_like(inputs[0])
        out = graphed(*inputs)
        out.backward(grad)
        got = [out.detach().clone()] + [x.grad.clone() for x in inputs]
        eager_in = [x.detach().clone().requires_grad_() for x in inputs]
        eager = nsa_attention(*eager_in, cfg)
        eager.backward(grad)
        expected = [eager.detach()] + [x.grad for x in eager_in]
        # Same kernels on the same data; only the fp32 atomics' order in dK/dV may differ.
        for name, a, b in zip(("out", "dq", "dk", "dv", "dgates"), got, expected):
            assert_rel(a, b, 1e-3, f"{name} (graph vs eager, seed {seed})")
        ref_in = float64(*inputs)  # on the bf16-rounded inputs; tolerances as tests/test_flex.py's bf16 cases
        ref = nsa_reference(*ref_in, cfg).out
        ref.backward(*float64(grad))
        assert_rel(got[0], ref, 2.5e-2, "out vs float64 reference")
        for name, a, r in zip(("dq", "dk", "dv", "dgates"), got[1:], ref_in):
            assert_rel(a, r.grad, 4e-2, f"{name} vs float64 reference")


@pytest.mark.gpu
def test_forward_only_capture_and_checks():
    cfg = SMALL
    samples = random_inputs(1, 7, 1, 300, 64, dtype=torch.bfloat16, device="cuda", seed=4)
    with torch.no_grad():
        graphed = graphed_nsa_attention(*samples, cfg)
        inputs = random_inputs(1, 7, 1, 300, 64, dtype=torch.bfloat16, device="cuda", seed=5)
        assert_rel(graphed(*inputs), nsa_attention(*inputs, cfg), 1e-3, "forward-only replay")
        bad = [x.clone() for x in inputs]
        bad[0][0, 0, 5, 0] = float("nan")
        with pytest.raises(ValueError, match="NaN"):  # check_inputs still runs, eagerly, per call
            graphed(*bad)
        with pytest.raises(ValueError, match="capture again"):
            graphed(*random_inputs(1, 7, 1, 320, 64, dtype=torch.bfloat16, device="cuda", seed=6))
