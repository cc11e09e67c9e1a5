"""Fused Triton group scores == float64 reference (interpreter on CPU, native on GPU)."""

import pytest
import torch

from flexnsa import NSAConfig, nsa_attention, nsa_reference
from flexnsa.reference import compression_visibility, masked_attention, reference_compress
from flexnsa.triton_fallback import use_triton_compression_attention, use_triton_scorer
from flexnsa.triton_fallback.compression_scores import compression_group_scores

from helpers import SMALL, assert_rel, assert_valid_top_n, float64, random_inputs, reference_scores

# (id, Hq, Hkv, T, D, block, stride, chunk): G = 7 and 1, T not a multiple of 64, T < block, overlap.
CASES = [
    ("G7-T200", 14, 2, 200, 16, 16, 16, None),
    ("G1-T150-stride8", 2, 2, 150, 16, 16, 8, None),
    ("G7-T10-short", 7, 1, 10, 16, 16, 16, None),
    ("G7-T300-l64", 7, 1, 300, 32, 64, 64, None),
    ("G7-chunk-70:181", 14, 2, 200, 16, 32, 16, (70, 181)),
]


def reference_group_scores(q, k, block, stride):
    cfg = NSAConfig(block_size=block, stride=stride, select_block_size=block, num_selected=4, select_query_tile=block)
    q, k = (x.detach().double().cpu() for x in (q, k))
    kc, _ = reference_compress(k, k, cfg)
    T = q.shape[2]
    _, probs, lse = masked_attention(q, kc, kc, compression_visibility(torch.arange(T), kc.shape[2], cfg), q.shape[-1] ** -0.5)
    B, Hq, Hkv = q.shape[0], q.shape[1], k.shape[1]
    return probs.reshape(B, Hkv, Hq // Hkv, T, kc.shape[2]).sum(2), lse, kc


def check_kernel(case, dtype, device, tol):
    _, Hq, Hkv, T, D, block, stride, chunk = case
    q, k, _, _ = random_inputs(2, Hq, Hkv, T, D, dtype=dtype, device=device, seed=3)
    ref_scores, ref_lse, kc = reference_group_scores(q, k, block, stride)
    t0, t1 = chunk or (0, T)
    scores, lse = compression_group_scores(q, kc.to(device, dtype).contiguous(), block, stride, D**-0.5, t0, t1)
    assert scores.shape == (2, Hkv, t1 - t0, kc.shape[2])
    assert_rel(scores, ref_scores[:, :, t0:t1], tol, "group scores")
    visible = torch.isfinite(ref_lse[:, :, t0:t1])
    assert torch.equal(torch.isfinite(lse[:, :, t0:t1]).cpu(), visible)
    torch.testing.assert_close(lse[:, :, t0:t1].cpu()[visible], ref_lse[:, :, t0:t1][visible].float(), rtol=tol, atol=tol)
    outside = torch.cat([lse[:, :, :t0], lse[:, :, t1:]], dim=2)
    assert torch.isinf(outside).all(), "rows outside the chunk were written"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_group_scores_interpreter(case):
    check_kernel(case, torch.float32, "cpu", tol=1e-5)  # interpreter dots are exact fp32


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("case", CASES + [("Q7B-T3000", 28, 4, 3000, 128, 64, 64, (1000, 3000))], ids=[c[0] for c in CASES] + ["Q7B-T3000"])
def test_group_scores_gpu(case, dtype):
    # Reference on the rounded inputs; bf16 products accumulate in fp32 (rel. ~1e-3); fp32 dots
    # run as TF32 on Hopper (~5e-4).
    check_kernel(case, dtype, "cuda", tol=1e-2 if dtype == torch.bfloat16 else 2e-3)


@pytest.mark.parametrize("selection", ["per_token", "block_shared"])
def test_op_with_triton_kernels_matches_reference(selection):
    cfg = SMALL.replace(compression_kernel="triton", selection=selection, stride=8)
    q, k, v, g = random_inputs(1, 14, 2, 177, 16, seed=9)
    with torch.no_grad():
        res = nsa_attention(q, k, v, g, cfg, return_branches=True)
    ref = nsa_reference(*float64(q, k, v, g), cfg, selected=res.selected)
    for name in ("out", "cmp", "slc", "win"):
        assert_rel(getattr(res, name), getattr(ref, name), 1e-5, name)
    assert_valid_top_n(res.selected, reference_scores(q, k, v, cfg), cfg, atol=1e-5)


def test_triton_kernels_on_cpu_need_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for use in (use_triton_scorer, use_triton_compression_attention):
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            use(SMALL.replace(compression_kernel="triton"), torch.device("cpu"))
        assert not use(SMALL, torch.device("cpu"))  # auto on CPU: FlexAttention + PyTorch
    assert use_triton_scorer(SMALL, torch.device("cuda")) and not use_triton_compression_attention(SMALL, torch.device("cuda"))
