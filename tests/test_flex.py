"""flex backend == float64 reference, branch by branch: CPU forward (compiled), GPU fwd + bwd."""

import warnings

import pytest
import torch

from flexnsa import MLPCompressor, NSAConfig, nsa_attention, nsa_reference
from flexnsa.compression import mean_pool

from helpers import SMALL, assert_rel, assert_valid_top_n, float64, random_inputs, reference_scores, rel_err, token_reference

BRANCHES = ("out", "cmp", "slc", "win")

# (id, Hq, Hkv, T, D, config): G = 7 and 1, T not a multiple of 64/128, T < one block, stride < block.
CASES = [
    ("G7-T200", 14, 2, 200, 16, SMALL),
    ("G1-T150", 2, 2, 150, 16, SMALL),
    ("G7-T10-short", 7, 1, 10, 16, SMALL),
    ("G7-stride<block", 14, 2, 203, 16, SMALL.replace(block_size=32, stride=16)),
    ("G7-block_shared", 14, 2, 200, 16, SMALL.replace(selection="block_shared")),
    ("G7-per_head", 14, 2, 200, 16, SMALL.replace(layout="per_head")),
    ("G7-per_head-shared", 7, 1, 177, 16, SMALL.replace(layout="per_head", selection="block_shared", select_query_tile=8)),
    ("G7-selblock32", 14, 2, 211, 16, SMALL.replace(select_block_size=32, select_query_tile=16, flex_block_kv=16)),
    ("G7-mlp", 14, 2, 140, 16, SMALL.replace(compression="mlp")),
    ("G7-videonsa-T300", 7, 1, 300, 32, NSAConfig()),
    # The selection branch on its other kernel (Triton on CPU = interpreter; FlexAttention on GPU).
    ("G7-slc-triton", 14, 2, 200, 16, SMALL.replace(selection_kernel="triton")),
    ("G7-slc-triton-shared", 14, 2, 200, 16, SMALL.replace(selection_kernel="triton", selection="block_shared")),
    # The window on the Triton kernels (interpreter on CPU): a window narrower and wider than 64.
    ("G7-win-triton", 14, 2, 200, 16, SMALL.replace(window_kernel="triton")),
    ("G7-all-triton-w100", 7, 1, 230, 16, SMALL.replace(window=100, compression_kernel="triton", selection_kernel="triton",
                                                       window_kernel="triton", selection="block_shared")),
]
# On GPU the default (auto) selection kernel is Triton, and the window's from 16K tokens on (so
# FlexAttention's in these short cases); these keep the other kernels tested there.
FLEX_SELECTION_CASES = [
    ("G7-slc-flex", 14, 2, 200, 16, SMALL.replace(selection_kernel="flex")),
    ("G7-slc-flex-shared", 14, 2, 200, 16, SMALL.replace(selection_kernel="flex", selection="block_shared")),
    ("Q7B-T1000-slc-flex", 28, 4, 1000, 128, NSAConfig(selection_kernel="flex")),
    ("Q7B-T1000-win-triton", 28, 4, 1000, 128, NSAConfig(window_kernel="triton", selection="block_shared")),
]


def compressors_for(cfg, D, dtype, device, seed=0):
    if cfg.compression != "mlp":
        return None, None
    torch.manual_seed(seed)
    comp = (MLPCompressor(cfg.block_size, D).to(device, dtype), MLPCompressor(cfg.block_size, D).to(device, dtype))
    comp64 = tuple(MLPCompressor(cfg.block_size, D).double() for _ in range(2))
    for c64, c in zip(comp64, comp):
        c64.load_state_dict({n: p.detach().double().cpu() for n, p in c.state_dict().items()})
    return comp, comp64


def check_against_reference(case, dtype, device, tol, grad_tol=None, seed=0):
    _, Hq, Hkv, T, D, cfg = case
    inputs = random_inputs(2, Hq, Hkv, T, D, dtype=dtype, device=device, seed=seed, requires_grad=grad_tol is not None)
    comp, comp64 = compressors_for(cfg, D, dtype, device, seed)
    res = nsa_attention(*inputs, cfg, compressors=comp, return_branches=True)
    ref_in = float64(*inputs)
    ref = nsa_reference(*ref_in, cfg, compressors=comp64, selected=res.selected.cpu())
    for name in BRANCHES:
        assert_rel(getattr(res, name), getattr(ref, name), tol, name)
    visible = torch.isfinite(ref.cmp_lse)
    assert torch.equal(torch.isfinite(res.cmp_lse).cpu(), visible)
    torch.testing.assert_close(res.cmp_lse.cpu()[visible], ref.cmp_lse[visible], rtol=tol, atol=tol * 10)
    scores = reference_scores(*ref_in[:3], cfg, comp64)
    assert_valid_top_n(res.selected, scores, cfg, atol=tol * 10)
    if grad_tol is None:
        return
    grad_out = torch.randn_like(res.out)
    res.out.backward(grad_out)
    ref.out.backward(grad_out.double().cpu())
    for name, a, b in zip(("q", "k", "v", "gates"), inputs, ref_in):
        assert_rel(a.grad, b.grad, grad_tol, f"d{name}")
    if comp is not None:
        assert_rel(comp[0].fc1.weight.grad, comp64[0].fc1.weight.grad, grad_tol, "dW mlp")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_flex_forward_cpu(case):
    # fp32 everywhere on CPU: errors are fp32 rounding of O(T) sums, far under 1e-5.
    with torch.no_grad():
        check_against_reference(case, torch.float32, "cpu", tol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize(
    "case",
    CASES + FLEX_SELECTION_CASES + [("Q7B-T1000", 28, 4, 1000, 128, NSAConfig())],
    ids=[c[0] for c in CASES + FLEX_SELECTION_CASES] + ["Q7B-T1000"],
)
def test_flex_forward_backward_gpu(case, dtype):
    # The reference runs on the bf16-rounded inputs, so only kernel arithmetic counts: bf16
    # probabilities/outputs (unit roundoff 3.9e-3) compound to ~1e-2; fp32 dots may run as
    # TF32 (10-bit mantissa, ~5e-4 per dot) on Hopper.
    tol, grad_tol = (2.5e-2, 4e-2) if dtype == torch.bfloat16 else (2e-3, 4e-3)
    cfg = case[-1]
    if dtype != torch.float32 and min(cfg.flex_block_q, cfg.flex_block_kv) < 128:
        # Hopper's only bf16 backward config needs 128-multiples: forward is checked, and
        # training must fail with a clear error rather than a lowering trace.
        with torch.no_grad():
            check_against_reference(case, dtype, "cuda", tol=tol)
        q, k, v, g = random_inputs(1, case[1], case[2], case[3], case[4], dtype=dtype, device="cuda", requires_grad=True)
        with pytest.raises(ValueError, match="multiples of 128"):
            nsa_attention(q, k, v, g, cfg)
        return
    check_against_reference(case, dtype, "cuda", tol=tol, grad_tol=grad_tol)


def test_flex_cpu_training_is_refused_clearly():
    q, k, v, g = random_inputs(1, 2, 1, 40, 16, requires_grad=True)
    with pytest.raises(RuntimeError, match="backend='reference'"):
        nsa_attention(q, k, v, g, SMALL)


def test_empty_sequence():
    for backend in ("flex", "reference"):
        q, k, v, g = random_inputs(1, 4, 2, 0, 16)
        res = nsa_attention(q, k, v, g, SMALL.replace(backend=backend), return_branches=True)
        assert res.out.shape == (1, 4, 0, 16) and res.selected.shape == (1, 2, 0, 4)


def test_per_token_vs_block_shared_difference(capsys):
    """The two granularities differ (measured and printed), and tiles of 1 token coincide."""
    q, k, v, g = random_inputs(1, 14, 2, 400, 16, seed=11)
    with torch.no_grad():
        per_token = nsa_attention(q, k, v, g, SMALL, return_branches=True)
        shared = nsa_attention(q, k, v, g, SMALL.replace(selection="block_shared"), return_branches=True)
        one = nsa_attention(q, k, v, g, SMALL.replace(selection="block_shared", select_query_tile=1), return_branches=True)
    same = (per_token.selected == shared.selected).float().mean().item()
    diff_out, diff_slc = rel_err(shared.out, per_token.out), rel_err(shared.slc, per_token.slc)
    with capsys.disabled():
        print(f"\n[per-token vs block-shared, T=400, l'=16, n=4, tile 16] identical selections: {same:.1%}, "
              f"rel. diff out {diff_out:.3e}, slc {diff_slc:.3e}")
    assert 0 < diff_out < 1 and same < 1
    assert torch.equal(one.selected, per_token.selected)
    torch.testing.assert_close(one.out, per_token.out, rtol=0, atol=0)


def run_without_recompiles(device, dtype, Hq, Hkv, T, D, cfg):
    """First call compiles; later calls with new data (so a new selection) must not recompile
    or fall back to eager flex_attention."""
    with torch.no_grad():
        first = nsa_attention(*random_inputs(1, Hq, Hkv, T, D, dtype=dtype, device=device, seed=0), cfg, return_branches=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "flex_attention called without torch.compile" would raise
            torch.compiler.set_stance("fail_on_recompile")
            try:
                for seed in (1, 2):
                    later = nsa_attention(*random_inputs(1, Hq, Hkv, T, D, dtype=dtype, device=device, seed=seed), cfg, return_branches=True)
            finally:
                torch.compiler.set_stance("default")
    assert not torch.equal(first.selected, later.selected), "selection did not change: the test proves nothing"


def test_no_recompile_when_selection_changes_cpu():
    run_without_recompiles("cpu", torch.float32, 14, 2, 200, 16, SMALL)


@pytest.mark.gpu
@pytest.mark.parametrize("selection", ["per_token", "block_shared"])
@pytest.mark.parametrize("layout", ["gqa_folded", "per_head"])
def test_no_recompile_when_selection_changes_gpu(selection, layout):
    run_without_recompiles("cuda", torch.bfloat16, 28, 4, 8192, 128, NSAConfig(selection=selection, layout=layout, check_inputs=False))


@pytest.mark.gpu
@pytest.mark.parametrize("T", [65536 + 77, 131072])
def test_long_context_sampled_rows_gpu(T):
    """At 64K-128K tokens (int32 offset overflow territory), sampled rows of every branch match
    a float64 per-token computation from the definitions."""
    cfg = NSAConfig(check_inputs=False)
    q, k, v, g = random_inputs(1, 28, 4, T, 128, dtype=torch.bfloat16, device="cuda", seed=5)
    with torch.no_grad():
        res = nsa_attention(q, k, v, g, cfg, return_branches=True)
        k_cmp, v_cmp = (mean_pool(x.double(), cfg.block_size, cfg.stride) for x in (k, v))
        gen = torch.Generator().manual_seed(0)
        rows = sorted(set(torch.randint(0, T, (12,), generator=gen).tolist()) | {0, 63, T - 1})
        for t in rows:
            expected = token_reference(q, k, v, g, cfg, res.selected, t, k_cmp, v_cmp)
            for name, e in zip(BRANCHES[1:] + BRANCHES[:1], expected):
                assert_rel(getattr(res, name)[:, :, t], e, 2.5e-2, f"{name} row {t}")


@pytest.mark.parametrize("layout", ["head_major", "token_major"])
def test_compiled_gated_sum_equals_eager(layout):
    """The GPU combine (inductor, dynamic shapes, its own backward) computes the same gated sum and
    gradients as the eager definition, every gradient in the layout of the incoming one; checked
    on CPU (inductor's C++ backend) at two lengths without a recompile."""
    from flexnsa.backends.flex import CompiledGatedSum, gated_sum, gates_like

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for T in (37, 64):
        gen = torch.Generator().manual_seed(T)
        gates = torch.rand(2, T, 7, 3, generator=gen, dtype=torch.float64)  # the model's [B, T, Hq, 3]
        branches = [torch.randn(2, 7, T, 16, generator=gen, dtype=torch.float64) for _ in range(3)]
        if layout == "token_major":
            branches = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in branches]
        leaves = [x.clone().requires_grad_() for x in (gates, *branches)]
        twins = [x.clone().requires_grad_() for x in (gates, *branches)]
        out = CompiledGatedSum.apply(gates_like(leaves[0], leaves[1]), *leaves[1:])
        ref = gated_sum(gates_like(twins[0], twins[1]), *twins[1:])
        assert out.stride() == branches[0].stride()
        grad = torch.randn(2, T, 7, 16, generator=gen, dtype=torch.float64).transpose(1, 2)
        grad = grad.contiguous() if layout == "head_major" else grad
        grads = torch.autograd.grad(out, leaves, grad)
        ref_grads = torch.autograd.grad(ref, twins, grad)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert all(g.stride() == grad.stride() for g in grads[1:]), [g.stride() for g in grads[1:]]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # forward and backward


def test_static_masks_are_built_once_per_key():
    """The window mask is data-independent: one build per (length, layout, config, device), equal
    to a fresh build; another length or config gets its own."""
    from flexnsa.backends.flex import static_mask
    from flexnsa.block_masks import QueryLayout, window_block_mask

    layout = QueryLayout("gqa_folded", 7)
    first = static_mask(window_block_mask, 200, layout, SMALL, "cpu")
    assert static_mask(window_block_mask, 200, layout, SMALL, torch.device("cpu")) is first
    fresh = window_block_mask(200, layout, SMALL, "cpu")
    for a, b in zip(first.as_tuple(), fresh.as_tuple()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
    assert static_mask(window_block_mask, 201, layout, SMALL, "cpu") is not first
    assert static_mask(window_block_mask, 200, layout, SMALL.replace(window=16), "cpu") is not first


def test_auto_layout_is_per_head_only_when_triton_runs_compression_and_selection():
    """The fold serves FlexAttention selection (K/V shared by a group's heads); with both Triton
    kernels only the window is a flex call, and per head it needs no fold/unfold copies."""
    from flexnsa.backends.flex import query_layout

    cpu = torch.device("cpu")
    assert NSAConfig().layout == "auto"
    assert query_layout(NSAConfig(), cpu, 7).name == "gqa_folded"  # CPU auto: flex selection, torch scorer
    both = NSAConfig(compression_kernel="triton", selection_kernel="triton")  # interpreter (conftest)
    assert query_layout(both, cpu, 7).name == "per_head"
    assert query_layout(both.replace(selection_kernel="flex"), cpu, 7).name == "gqa_folded"
    assert query_layout(both.replace(layout="gqa_folded"), cpu, 7).name == "gqa_folded"
