"""Triton compressed attention == float64 reference: output, lse, dq, dK~, dV~ (and dk, dv through
pooling). Interpreter on CPU (fp32), native on GPU (bf16, fp32)."""

import pytest
import torch

from flexnsa import MLPCompressor, NSAConfig
from flexnsa.compression import compress_kv
from flexnsa.reference import compression_visibility, masked_attention
from flexnsa.triton_fallback import compression_attention as cmp_attn
from flexnsa.triton_fallback.compression_attention import compression_attention

from helpers import SPIKED_GPU_TOL, assert_rel, random_inputs, run_in_child, spike_late_keys

# (id, Hq, Hkv, T, D, block, stride): G = 7 and 1, T not a multiple of 64, T < block, overlap,
# tiles of 18 tokens (packed, 126 of 128 rows) crossing block boundaries.
CASES = [
    ("G7-T200", 14, 2, 200, 16, 16, 16),
    ("G1-T150-stride8", 2, 2, 150, 16, 16, 8),
    ("G7-T10-short", 7, 1, 10, 16, 16, 16),
    ("G7-T333-l32s16", 7, 1, 333, 32, 32, 16),
    # C = 68 > 64-block chunks: later tiles run unmasked chunks (fwd, dQ) and unmasked token tiles (dK~/dV~)
    ("G7-T1100-long", 7, 1, 1100, 16, 16, 16),
    ("G3-T130", 6, 2, 130, 16, 16, 16),  # packed: 42 tokens x 3 heads in 128 rows
]


def check(case, dtype, device, tol, compression="mean", spiky=False):
    _, Hq, Hkv, T, D, block, stride = case
    cfg = NSAConfig(block_size=block, stride=stride, select_block_size=block, num_selected=4,
                    select_query_tile=block, compression=compression)
    q, k, v, _ = random_inputs(2, Hq, Hkv, T, D, dtype=dtype, device=device, seed=4, requires_grad=True)
    if spiky:
        spike_late_keys(k, 200.0)
    comp = None
    if compression == "mlp":
        torch.manual_seed(0)
        comp = (MLPCompressor(block, D).to(device, dtype), MLPCompressor(block, D).to(device, dtype))
    kc, vc = (x.detach().requires_grad_() for x in compress_kv(k, v, cfg, comp))
    out, lse = compression_attention(q, kc, vc, block, stride, D**-0.5)
    grad = torch.randn_like(out)
    out.backward(grad)
    q64, kc64, vc64 = (x.detach().double().cpu().requires_grad_() for x in (q, kc, vc))
    visible = compression_visibility(torch.arange(T), kc.shape[2], cfg)
    ref, _, ref_lse = masked_attention(q64, kc64, vc64, visible, D**-0.5)
    ref.backward(grad.double().cpu())
    assert_rel(out, ref, tol, "out")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse).cpu(), finite)
    torch.testing.assert_close(lse.cpu()[finite], ref_lse[finite].float(), rtol=tol, atol=tol)
    assert_rel(q.grad, q64.grad, 2 * tol, "dq")
    if kc.shape[2]:
        assert_rel(kc.grad, kc64.grad, 2 * tol, "dK~")
        assert_rel(vc.grad, vc64.grad, 2 * tol, "dV~")
        # Through the pooling (or MLP phi): dk = d(phi)/dk applied to dK~.
        kc2, vc2 = compress_kv(k, v, cfg, comp)
        compression_attention(q.detach(), kc2, vc2, block, stride, D**-0.5)[0].backward(grad)
        expected_dk = torch.autograd.grad(compress_kv(k, v, cfg, comp)[0], k, kc.grad)[0]
        assert_rel(k.grad, expected_dk, 2 * tol, "dk through phi")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_compression_attention_interpreter(case):
    check(case, torch.float32, "cpu", tol=1e-5)


def test_forward_rescales_when_a_later_max_exceeds_the_running_one_interpreter():
    # Late compressed blocks with logits far above the early ones: the online softmax's
    # rescale of the running state (alpha < 1) must fire mid-row; without it 2^(s - max) overflows.
    check(CASES[4], torch.float32, "cpu", tol=1e-4, spiky=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_forward_rescales_when_a_later_max_exceeds_the_running_one_gpu(dtype):
    check(CASES[4], dtype, "cuda", tol=SPIKED_GPU_TOL[dtype], spiky=True)


def test_compression_attention_mlp_phi_interpreter():
    check(CASES[0], torch.float32, "cpu", tol=1e-5, compression="mlp")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("case", CASES + [("Q7B-T3000", 28, 4, 3000, 128, 64, 64)], ids=[c[0] for c in CASES] + ["Q7B-T3000"])
def test_compression_attention_gpu(case, dtype):
    # bf16 P and dS are rounded before their dots (unit roundoff 3.9e-3) -> ~1e-2; TF32 ~1e-3.
    check(case, dtype, "cuda", tol=2e-2 if dtype == torch.bfloat16 else 2e-3)



# Variants of the rules (the default: dK~/dV~ over head-major tiles, q/dO by TMA boxes, Lever 36;
# K~/V~ chunks by TMA boxes in fwd and dQ, session 17): packed (token, head) rows in dK~/dV~ (the
# "head_major" rule off), every load by pointers ("tma" off: pre-Hopper GPUs run this path), and
# the splits' partial dK~/dV~ added by acq_rel atomics (Lever 44's "relaxed" knob off).
DKV_VARIANTS = {"packed_rows": ("HEAD_MAJOR", False), "pointer_loads": ("TMA", False), "acq_rel_atomics": ("RELAXED", False)}


@pytest.mark.parametrize("variant", DKV_VARIANTS)
@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[5]], ids=[CASES[0][0], CASES[4][0], CASES[5][0]])
def test_dkv_variants_interpreter(case, variant, monkeypatch):
    monkeypatch.setattr(cmp_attn, *DKV_VARIANTS[variant])
    check(case, torch.float32, "cpu", tol=1e-5)


def test_dkv_head_major_tma_and_relaxed_rules():
    q, kc = torch.empty(1, 28, 4096, 128, dtype=torch.bfloat16), torch.empty(1, 4, 64, 128, dtype=torch.bfloat16)
    consts = cmp_attn._launch_params(q, kc, "dkv")[-1]
    assert (consts["HEAD_MAJOR"], consts["TMA"], consts["RELAXED"], consts["BLOCK_T"], consts["G_PAD"]) == (True, True, True, 64, 7)
    assert "HEAD_MAJOR" not in cmp_attn._launch_params(q, kc, "dq")[-1]
    assert cmp_attn._launch_params(q, kc, "fwd")[-1]["TMA"] and cmp_attn._launch_params(q, kc, "dq")[-1]["TMA"]
    assert not cmp_attn._launch_params(q, kc[:, :, :0], "fwd")[-1]["TMA"], "no descriptor over an empty K~ (T < l)"


@pytest.mark.gpu
@pytest.mark.parametrize("variant", DKV_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_dkv_variants_gpu(dtype, variant, monkeypatch):
    monkeypatch.setattr(cmp_attn, *DKV_VARIANTS[variant])
    check(("Q7B-T3000", 28, 4, 3000, 128, 64, 64), dtype, "cuda", tol=2e-2 if dtype == torch.bfloat16 else 2e-3)


# The warp-specialised Gluon forward (NOTES Lever 47; sm_90, 16-bit, head_dim 64 or 128): the
# same checks (output, lse, and the gradients of the op whose forward it is), with a count that
# shows it ran rather than the Triton forward. Cases: G = 7 and 1, T not a multiple of 64, tiles
# that see nothing, l = 32 / s = 16 overlap, Q7B heads.
GLUON_CASES = [("G7-T700-D128", 7, 1, 700, 128, 64, 64), ("G7-T2000-D64-l32s16", 14, 2, 2000, 64, 32, 16),
               ("G1-T300-D128", 2, 2, 300, 128, 16, 16), ("Q7B-T3000", 28, 4, 3000, 128, 64, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", GLUON_CASES, ids=[c[0] for c in GLUON_CASES])
def test_gluon_ws_forward_gpu(case, dtype, monkeypatch):
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon forward is sm_90-only")
    from flexnsa.triton_fallback import compression_forward_sm90 as sm90

    calls = []
    real = sm90.compression_attention_fwd_sm90
    monkeypatch.setattr(sm90, "compression_attention_fwd_sm90", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(cmp_attn, "GLUON_WS", True)
    check(case, dtype, "cuda", tol=2e-2)
    assert calls, "the Gluon forward did not run"


# Lever 48's ping-pong (the consumers take turns at their MMAs through two mbarriers) and Lever
# 50's persistent forward (one program per SM over the tiles; Q7B-T3000 and the D = 64 case give
# each program several tiles, both batches): the same checks in a child process under a timeout,
# so an mbarrier deadlock fails the test instead of hanging the GPU run (a wait that is never
# satisfied does not raise).
CHILD_CASES = ([("pingpong", GLUON_CASES[0], "bfloat16"), ("pingpong", GLUON_CASES[3], "bfloat16")]
               + [("persistent", c, "bfloat16") for c in GLUON_CASES] + [("persistent", GLUON_CASES[3], "float16")])


@pytest.mark.gpu
@pytest.mark.parametrize("knob,case,dtype", CHILD_CASES, ids=[f"{k}-{c[0]}-{d}" for k, c, d in CHILD_CASES])
def test_gluon_forward_variant_gpu(knob, case, dtype):
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon forward is sm_90-only")
    code = (  # the rule, not a FLEXNSA_TUNING file: tuning files apply at head_dim 128 only (tiles.tuning_for)
        "import torch, test_triton_compression as t\n"
        "from flexnsa.triton_fallback import compression_attention as cmp_attn, compression_forward_sm90 as sm90\n"
        f"cmp_attn.GLUON_WS = {knob!r}\n"
        "calls = []\n"
        "real = sm90.compression_attention_fwd_sm90\n"
        f"sm90.compression_attention_fwd_sm90 = lambda *a, **k: calls.append(k['tuning'][{knob!r}]) or real(*a, **k)\n"
        f"t.check({case!r}, torch.{dtype}, 'cuda', tol=2e-2)\n"
        "assert calls and all(calls), calls\n"
    )
    run_in_child(code, f"the {knob} forward")
