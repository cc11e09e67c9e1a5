"""Fused Triton scorers == float64 reference (interpreter on CPU, native on GPU): the group
scores of the chunked path, and the fused scores + top-n kernel (indices valid under the
reference's scores, ties allowed; lse)."""

import pytest
import torch

from flexnsa import NSAConfig, nsa_attention, nsa_reference
from flexnsa.reference import compression_visibility, masked_attention, reference_compress, sum_rows
from flexnsa.triton_fallback import use_triton_compression_attention, use_triton_scorer
from flexnsa.compression import compress_kv
from flexnsa.triton_fallback import fused_top_n_supported
from flexnsa.triton_fallback.compression_attention import compression_attention_fwd
from flexnsa.triton_fallback import compression_scores as score_kernels
from flexnsa.triton_fallback.compression_scores import compression_group_scores
from flexnsa.triton_fallback.selection_top_n import selection_top_n

from helpers import SMALL, assert_rel, assert_valid_top_n, float64, random_inputs, reference_scores, run_in_child

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


def compression_lse(q, k_cmp, block, stride):
    """The lse the op hands the scorers: the Triton compression branch's forward."""
    return compression_attention_fwd(q, k_cmp, k_cmp, block, stride, q.shape[-1] ** -0.5)[1]


def check_kernel(case, dtype, device, tol, tokens_per_sum=1, given_lse=False):
    _, Hq, Hkv, T, D, block, stride, chunk = case
    q, k, _, _ = random_inputs(2, Hq, Hkv, T, D, dtype=dtype, device=device, seed=3)
    ref_scores, ref_lse, kc = reference_group_scores(q, k, block, stride)
    kc = kc.to(device, dtype).contiguous()
    t0, t1 = chunk or (0, T)
    args = (block, stride, D**-0.5, t0, t1, tokens_per_sum)
    rows = -(-(t1 - t0) // tokens_per_sum)
    if given_lse:  # the second pass alone, from the compression forward's lse
        scores, none = compression_group_scores(q, kc, *args, lse=compression_lse(q, kc, block, stride))
        assert none is None and scores.shape == (2, Hkv, rows, kc.shape[2])
        assert_rel(scores, sum_rows(ref_scores[:, :, t0:t1], tokens_per_sum), tol, "group scores (given lse)")
        return
    scores, lse = compression_group_scores(q, kc, *args)
    assert scores.shape == (2, Hkv, rows, kc.shape[2]) and lse.shape == (2, Hq, t1 - t0)
    assert_rel(scores, sum_rows(ref_scores[:, :, t0:t1], tokens_per_sum), tol, "group scores")
    ref_lse = ref_lse[:, :, t0:t1]
    visible = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse).cpu(), visible)
    torch.testing.assert_close(lse.cpu()[visible], ref_lse[visible].float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_group_scores_interpreter(case):
    check_kernel(case, torch.float32, "cpu", tol=1e-5)  # interpreter dots are exact fp32


# tokens_per_sum (block-shared tile sums): in registers only (8: G = 7 programs hold 16 tokens),
# in registers then PyTorch (48 = 16 x 3), PyTorch only (3), a chunk not starting on a tile.
SUM_CASES = [(CASES[0], 8), (CASES[0], 48), (CASES[1], 3), (CASES[4], 16)]


@pytest.mark.parametrize("case,tokens_per_sum", SUM_CASES, ids=[f"{c[0]}-sum{n}" for c, n in SUM_CASES])
def test_group_scores_token_sums_interpreter(case, tokens_per_sum):
    check_kernel(case, torch.float32, "cpu", tol=1e-5, tokens_per_sum=tokens_per_sum)


@pytest.mark.parametrize("tokens_per_sum", [1, 8], ids=["per-token", "sum8"])
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[4]], ids=[CASES[i][0] for i in (0, 1, 4)])
def test_group_scores_given_lse_interpreter(case, tokens_per_sum):
    check_kernel(case, torch.float32, "cpu", tol=1e-5, tokens_per_sum=tokens_per_sum, given_lse=True)


# The mask split (only chunks some row cannot see whole are masked): C > 64 blocks so unmasked
# chunks run; per token, tile sums in registers (8), in registers then PyTorch (48), a chunk not
# starting on a tile; with and without the given lse.
MASK_SPLIT_CASES = [(CASES[0], 1, False), (CASES[0], 8, True), (CASES[0], 48, False), (CASES[1], 1, True),
                    (CASES[2], 1, True), (CASES[4], 16, True), (("G7-T1100-long", 7, 1, 1100, 16, 16, 16, None), 8, True)]


@pytest.mark.parametrize("case,tokens_per_sum,given_lse", MASK_SPLIT_CASES,
                         ids=[f"{c[0]}-sum{n}-{'given' if g else 'own'}-lse" for c, n, g in MASK_SPLIT_CASES])
def test_group_scores_mask_split_interpreter(case, tokens_per_sum, given_lse):
    check_kernel(case, torch.float32, "cpu", tol=1e-5, tokens_per_sum=tokens_per_sum, given_lse=given_lse)


# Lever 30 (prepared, off): tile sums over packed rows, the chunk's (token, head) rows back to back in
# 128-row programs, an output row per power-of-two group of a sum's rows: 8 x 7 = 56 rows (groups of
# 8), 48 x 7 (16), 64 x 7 (64, C > 64 blocks), G = 1 and 3, a chunk not starting on a tile, own and
# given lse.
PACKED_CASES = [(CASES[0], 8, False), (CASES[0], 48, True), (CASES[1], 16, False), (CASES[4], 16, True),
                (("G7-T1100-long", 7, 1, 1100, 16, 16, 16, None), 64, True), (("G3-T260", 6, 2, 260, 16, 16, 16, None), 32, False)]


@pytest.mark.parametrize("case,tokens_per_sum,given_lse", PACKED_CASES,
                         ids=[f"{c[0]}-sum{n}-{'given' if g else 'own'}-lse" for c, n, g in PACKED_CASES])
def test_group_scores_packed_tile_sums_interpreter(case, tokens_per_sum, given_lse, monkeypatch):
    monkeypatch.setattr(score_kernels, "PACKED", True)
    check_kernel(case, torch.float32, "cpu", tol=1e-5, tokens_per_sum=tokens_per_sum, given_lse=given_lse)


# Packed per-token scores (their own knob, PACKED_PER_TOKEN): at G = 7 (and 3) a token's G rows
# are summed by the indicator matmul, tokens split between two programs by two atomic adds; at G = 1
# packed rows are the padded ones. T < block, a chunk off a program boundary, stride 8, C > 64
# (unmasked chunks); own and given lse.
PACKED_PER_TOKEN_CASES = CASES + [("G3-T260", 6, 2, 260, 16, 16, 16, None), ("G7-T1100-long", 7, 1, 1100, 16, 16, 16, None)]


@pytest.mark.parametrize("given_lse", [False, True], ids=["own-lse", "given-lse"])
@pytest.mark.parametrize("case", PACKED_PER_TOKEN_CASES, ids=[c[0] for c in PACKED_PER_TOKEN_CASES])
def test_group_scores_packed_per_token_interpreter(case, given_lse, monkeypatch):
    monkeypatch.setattr(score_kernels, "PACKED_PER_TOKEN", True)
    check_kernel(case, torch.float32, "cpu", tol=1e-5, given_lse=given_lse)


# Lever 42 (the rule since session 19): the K~ chunks as TMA boxes (the interpreter emulates them;
# rows past C read as 0) in both passes, and the pointer loads GPUs before Hopper keep; padded and
# packed rows: per token and tile sums, C < one chunk (T < l, T = 150 at stride 8), C > 64
# (unmasked chunks), a chunk off a tile, own and given lse.
TMA_K_CASES = [(CASES[0], 1, False, None), (CASES[2], 1, True, None), (CASES[1], 8, False, None), (CASES[4], 16, True, None),
               (("G7-T1100-long", 7, 1, 1100, 16, 16, 16, None), 8, True, None),
               (("G7-T1100-long", 7, 1, 1100, 16, 16, 16, None), 64, False, "PACKED"), (CASES[0], 1, True, "PACKED_PER_TOKEN")]


@pytest.mark.parametrize("tma_k", [True, False], ids=["k-by-tma", "k-by-pointers"])
@pytest.mark.parametrize("case,tokens_per_sum,given_lse,packed", TMA_K_CASES,
                         ids=[f"{c[0]}-sum{n}-{'given' if g else 'own'}-lse{'-' + p.lower() if p else ''}" for c, n, g, p in TMA_K_CASES])
def test_group_scores_k_loads_interpreter(case, tokens_per_sum, given_lse, packed, tma_k, monkeypatch):
    monkeypatch.setattr(score_kernels, "TMA_K", tma_k)
    if packed:
        monkeypatch.setattr(score_kernels, packed, True)
    descriptors = []
    box_operands = score_kernels.box_operands
    monkeypatch.setattr(score_kernels, "box_operands", lambda x, rows, consts: descriptors.append(consts["TMA"]) or box_operands(x, rows, consts))
    check_kernel(case, torch.float32, "cpu", tol=1e-5, tokens_per_sum=tokens_per_sum, given_lse=given_lse)
    _, _, _, T, _, block, _, _ = case
    assert descriptors == [tma_k and T >= block]  # K~ went in as a descriptor (none over an empty K~: T < l gives C = 0)


def test_packed_per_token_needs_no_partial_sums(monkeypatch):
    """Segmented per-token sums are whole in the kernel (nothing for PyTorch to add); tile sums keep theirs."""
    monkeypatch.setattr(score_kernels, "PACKED_PER_TOKEN", True)
    q = torch.zeros(1, 7, 64, 16)
    assert score_kernels.partial_rows(q, 7, 1) == 1 and score_kernels.partial_rows(q, 1, 1) == 1
    monkeypatch.setattr(score_kernels, "PACKED", True)
    assert score_kernels._program_tokens(128, 7) == 32 and score_kernels.partial_rows(q, 7, 8) == 7


@pytest.mark.parametrize("stride", [16, 8], ids=["l=s", "overlap"])
def test_importance_packed_per_token(monkeypatch, stride):
    """The op's chunked per-token selection over the packed scorer (as importance.py sizes its chunks)."""
    monkeypatch.setattr(score_kernels, "PACKED_PER_TOKEN", True)
    test_importance_chunks_match_one_pass(monkeypatch, "per_token", "triton", stride)
    if stride == 8:  # the chunked scorer inside the op (stride 16 would take the fused top-n)
        test_op_with_triton_kernels_matches_reference("per_token", stride)


# Lever 38 (prepared, off): head-major tile sums, one program per (tile, kv head) whose rows are the
# tile's tokens of one head at a time, the G heads looped inside, one output row per tile. Sums of
# 16, 32, 64 tokens; G = 7, 3, 1; T < the tile (and < block), T not a multiple of the tile, a chunk
# (70, 181) off the tiles, stride 8 < block 16, C > 64 (unmasked chunks), D = 16 to 256; own and given lse.
HEAD_MAJOR_CASES = [(CASES[0], 16, False), (CASES[0], 32, True), (CASES[1], 16, True), (CASES[1], 32, False),
                    (CASES[2], 16, False), (CASES[2], 16, True), (CASES[3], 64, True), (CASES[4], 16, True),
                    (CASES[4], 32, False), (("G3-T260", 6, 2, 260, 16, 16, 16, None), 64, False),
                    (("G3-T260", 6, 2, 260, 16, 16, 16, None), 32, True),
                    (("G7-T1100-long", 7, 1, 1100, 16, 16, 16, None), 64, True),
                    (("G7-T1100-long", 7, 1, 1100, 16, 16, 16, None), 16, False),
                    (("G7-T150-D64-chunk", 7, 1, 150, 64, 32, 16, (20, 150)), 16, False),
                    (("G3-T100-D128", 3, 1, 100, 128, 16, 8, None), 32, True),
                    (("G1-T90-D256-chunk", 1, 1, 90, 256, 16, 16, (16, 90)), 16, False)]
HEAD_MAJOR_IDS = [f"{c[0]}-sum{n}-{'given' if g else 'own'}-lse" for c, n, g in HEAD_MAJOR_CASES]


@pytest.mark.parametrize("case,tokens_per_sum,given_lse", HEAD_MAJOR_CASES, ids=HEAD_MAJOR_IDS)
def test_group_scores_head_major_interpreter(case, tokens_per_sum, given_lse, monkeypatch):
    monkeypatch.setattr(score_kernels, "HEAD_MAJOR", True)  # q as TMA boxes (the interpreter emulates them)
    check_kernel(case, torch.float32, "cpu", tol=1e-5, tokens_per_sum=tokens_per_sum, given_lse=given_lse)


POINTER_CASES = (0, 3, 6, 9, 15)  # the q loads differ from TMA's, not the chunk loop (the long case's)


@pytest.mark.parametrize("case,tokens_per_sum,given_lse", [HEAD_MAJOR_CASES[i] for i in POINTER_CASES],
                         ids=[HEAD_MAJOR_IDS[i] for i in POINTER_CASES])
def test_group_scores_head_major_pointer_loads_interpreter(case, tokens_per_sum, given_lse, monkeypatch):
    monkeypatch.setattr(score_kernels, "HEAD_MAJOR", True)
    monkeypatch.setattr(score_kernels, "TMA", False)
    check_kernel(case, torch.float32, "cpu", tol=1e-5, tokens_per_sum=tokens_per_sum, given_lse=given_lse)


@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
def test_group_scores_head_major_token_major_q(tma, monkeypatch):
    """A token-major q ([B, T, Hq, D] seen as [B, Hq, T, D], the model's projections) gives the
    contiguous q's scores: the q boxes and pointers take its strides."""
    monkeypatch.setattr(score_kernels, "HEAD_MAJOR", True)
    monkeypatch.setattr(score_kernels, "TMA", tma)
    q, k, _, _ = random_inputs(1, 14, 2, 200, 16, seed=6)
    k_cmp = k[:, :, :12].contiguous()
    token_major = q.transpose(1, 2).contiguous().transpose(1, 2)
    lse = compression_lse(q, k_cmp, 16, 16)
    for given in (None, lse):
        want = compression_group_scores(q, k_cmp, 16, 16, 0.25, 10, 200, 32, given)
        got = compression_group_scores(token_major, k_cmp, 16, 16, 0.25, 10, 200, 32, given)
        torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
        assert (got[1] is None) == (given is not None) and (given is not None or torch.equal(got[1], want[1]))


def test_head_major_needs_no_partial_sums(monkeypatch):
    """Head-major tile sums are whole in the kernel; other sums keep the padded tiling's partials."""
    q = torch.zeros(1, 7, 64, 16)
    assert score_kernels.partial_rows(q, 7, 64) == 4
    monkeypatch.setattr(score_kernels, "HEAD_MAJOR", True)
    assert [score_kernels.partial_rows(q, 7, n) for n in (16, 32, 64, 128)] == [1, 1, 1, 1]
    assert score_kernels.partial_rows(q, 7, 8) == 1 and score_kernels.partial_rows(q, 7, 48) == 3  # padded tiling
    assert score_kernels.partial_rows(q, 7, 256) == 16 and not score_kernels._head_major(q, 1)


@pytest.mark.parametrize("stride", [16, 8], ids=["l=s", "overlap"])
def test_importance_head_major(monkeypatch, stride):
    """The op's chunked block-shared selection over the head-major scorer (16-token tiles, as
    importance.py sizes its chunks from partial_rows = 1), and the whole op against the reference."""
    monkeypatch.setattr(score_kernels, "HEAD_MAJOR", True)
    test_importance_chunks_match_one_pass(monkeypatch, "block_shared", "triton", stride, tile=16)
    if stride == 8:  # the chunked scorer inside the op (stride 16 would take the fused top-n)
        test_op_with_triton_kernels_matches_reference("block_shared", stride)


# Lever 51 (knob split_heads): a non-power-of-two G as power-of-two head parts of the padded tiles,
# one MMA each on the shared K~ chunk, no head slot padded. G = 7 (4 + 2 + 1), 3 (2 + 1), 5 (4 + 1)
# and 6 (4 + 2); per token, tile sums in registers (8), in registers then PyTorch (48), a 16-token
# tile sum; T < block, a chunk off the tiles, stride 8, C > 64 (unmasked chunks), D = 64 and 128;
# own and given lse.
SPLIT_CASES = [(CASES[0], 1, False), (CASES[0], 8, True), (CASES[0], 48, False), (CASES[2], 1, True),
               (CASES[3], 16, False), (CASES[4], 16, True), (CASES[4], 1, False),
               (("G7-T1100-long", 7, 1, 1100, 16, 16, 16, None), 16, True),
               (("G7-T1100-long", 7, 1, 1100, 16, 16, 16, None), 1, False),
               (("G3-T260", 6, 2, 260, 16, 16, 16, None), 32, False), (("G3-T260", 6, 2, 260, 16, 16, 16, None), 1, True),
               (("G5-T170-stride8", 5, 1, 170, 16, 16, 8, None), 1, True), (("G5-T170-stride8", 5, 1, 170, 16, 16, 8, None), 16, False),
               (("G6-T150-D64-chunk", 12, 2, 150, 64, 32, 16, (20, 150)), 8, False),
               (("G7-T100-D128", 7, 1, 100, 128, 16, 8, None), 16, True)]


@pytest.mark.parametrize("case,tokens_per_sum,given_lse", SPLIT_CASES,
                         ids=[f"{c[0]}-sum{n}-{'given' if g else 'own'}-lse" for c, n, g in SPLIT_CASES])
def test_group_scores_split_heads_interpreter(case, tokens_per_sum, given_lse, monkeypatch):
    monkeypatch.setattr(score_kernels, "SPLIT_HEADS", True)
    launched = []
    split = score_kernels._split_scores_kernel
    monkeypatch.setattr(score_kernels, "_split_scores_kernel", SpyKernel(split, launched))
    check_kernel(case, torch.float32, "cpu", tol=1e-5, tokens_per_sum=tokens_per_sum, given_lse=given_lse)
    _, Hq, Hkv, T, *_ = case
    parts = score_kernels.head_parts(Hq // Hkv, 128 // 8 if Hq // Hkv > 4 else 128 // 4)
    assert launched == [parts] and sum(parts) == Hq // Hkv  # the split kernel ran, with G's parts


class SpyKernel:
    """A kernel whose launches record their head parts (H0, H1, H2)."""

    def __init__(self, kernel, launched):
        self.kernel, self.launched = kernel, launched

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launched.append((kwargs["H0"], kwargs["H1"], kwargs["H2"]))
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_head_parts():
    """G's power-of-two parts, largest first; none where one part is the padded tiling (a power of
    two), more than three are needed, or the smallest part's rows are below an MMA's 16."""
    assert [score_kernels.head_parts(g, 16) for g in (7, 6, 5, 3)] == [(4, 2, 1), (4, 2, 0), (4, 1, 0), (2, 1, 0)]
    assert [score_kernels.head_parts(g, 16) for g in (1, 2, 4, 8, 15)] == [None] * 5
    assert score_kernels.head_parts(7, 8) is None and score_kernels.head_parts(6, 8) == (4, 2, 0)


def test_split_heads_applies_only_to_non_power_of_two_groups(monkeypatch):
    monkeypatch.setattr(score_kernels, "SPLIT_HEADS", True)
    q = torch.zeros(1, 8, 64, 16)
    assert score_kernels._split_parts(q, 7) == (4, 2, 1) and score_kernels._split_parts(q, 8) is None
    monkeypatch.setattr(score_kernels, "SPLIT_HEADS", False)
    assert score_kernels._split_parts(q, 7) is None


def test_given_lse_must_match_the_sequence():
    q, k, _, _ = random_inputs(1, 7, 1, 64, 16)
    k_cmp = k[:, :, :4].contiguous()
    for bad in (torch.zeros(1, 7, 63), torch.zeros(1, 7, 64, dtype=torch.float64)):
        with pytest.raises(ValueError, match="lse must be"):
            compression_group_scores(q, k_cmp, 16, 16, 0.25, lse=bad)
        with pytest.raises(ValueError, match="lse must be"):
            selection_top_n(q, k_cmp, SMALL, lse=bad)


def test_group_scores_refuse_bad_token_sum():
    q, k, _, _ = random_inputs(1, 7, 1, 40, 16, seed=2)
    with pytest.raises(ValueError, match="tokens_per_sum"):
        compression_group_scores(q, k[:, :, :4].contiguous(), 8, 8, 0.25, 0, 40, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens_per_sum", [1, 64], ids=["per-token", "tile64"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("case", CASES + [("Q7B-T3000", 28, 4, 3000, 128, 64, 64, (1000, 3000))], ids=[c[0] for c in CASES] + ["Q7B-T3000"])
def test_group_scores_gpu(case, dtype, tokens_per_sum):
    # Reference on the rounded inputs; bf16 products accumulate in fp32 (rel. ~1e-3); fp32 dots
    # run as TF32 on Hopper (~5e-4). Tile sums add positive terms: the relative error stays.
    check_kernel(case, dtype, "cuda", tol=1e-2 if dtype == torch.bfloat16 else 2e-3, tokens_per_sum=tokens_per_sum)


@pytest.mark.gpu
@pytest.mark.parametrize("given_lse", [False, True], ids=["own-lse", "given-lse"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("rule,value,tokens_per_sum", [("PACKED", True, 64), ("PACKED_PER_TOKEN", True, 1), ("HEAD_MAJOR", True, 64),
                                                      ("TMA_K", False, 64), ("TMA_K", False, 1), ("SPLIT_HEADS", True, 64),
                                                      ("SPLIT_HEADS", True, 1)],
                         ids=["tile-sums", "per-token", "head-major", "k-by-pointers-tile-sums", "k-by-pointers-per-token",
                              "split-heads-tile-sums", "split-heads-per-token"])
def test_group_scores_packed_gpu(rule, value, tokens_per_sum, dtype, given_lse, monkeypatch):
    """Packed rows at Q7B (G = 7): tile sums (partials per 64 rows) and per-token sums (the
    segmented head sum: 32 token columns per 128-row program, tf32x3 dot, atomics at splits); and
    head-major tile sums (Lever 38: 64 tokens of one head at a time, q by TMA boxes on sm_90); the
    padded tiling with K~ chunks by pointers (the rule loads them by TMA since Lever 42); the split
    head parts (Lever 51: 4 + 2 + 1 heads, no slot padded)."""
    monkeypatch.setattr(score_kernels, rule, value)
    case = ("Q7B-T3000", 28, 4, 3000, 128, 64, 64, (1000, 3000) if not given_lse else None)
    check_kernel(case, dtype, "cuda", tol=1e-2 if dtype == torch.bfloat16 else 2e-3, tokens_per_sum=tokens_per_sum, given_lse=given_lse)


@pytest.mark.gpu
@pytest.mark.parametrize("split", [True, False], ids=["split-heads", "padded"])
@pytest.mark.parametrize("tokens_per_sum", [1, 64], ids=["per-token", "tile64"])
def test_group_scores_register_cap_gpu(split, tokens_per_sum, monkeypatch):
    """Lever 51's register cap (maxnreg 168, 3 CTAs per SM on sm_90) at Q7B in bf16: the tuned
    launch the knob applies to (16-bit, head_dim 128), given and own lse."""
    monkeypatch.setattr(score_kernels, "SPLIT_HEADS", split)
    monkeypatch.setitem(score_kernels.TUNING["scores"], "maxnreg", 168)
    for given_lse, chunk in ((True, None), (False, (1000, 3000))):
        check_kernel(("Q7B-T3000", 28, 4, 3000, 128, 64, 64, chunk), torch.bfloat16, "cuda", tol=1e-2,
                     tokens_per_sum=tokens_per_sum, given_lse=given_lse)


# Lever 52: the persistent warp-specialised Gluon scorer (sm_90, 16-bit, given lse, whole tiles
# summed in registers) in a child process under a timeout, so an mbarrier deadlock fails the test
# instead of hanging the GPU run. Q7B heads (G = 7 in 8 slots) with tile sums of 64 and 16 tokens,
# a chunk (1000, 3000) off the tiles, fp16; G = 1 at head_dim 64 (128-token tiles) with l = 32 /
# s = 16 overlap; G = 3 (4 slots, 32-token tiles); T not a multiple of a tile; tiles that see
# nothing; several tiles per program (752 tiles over at most 132 programs at Q7B-T3000).
GLUON_CASES = [(("Q7B-T3000", 28, 4, 3000, 128, 64, 64, None), 64, "bfloat16"),
               (("Q7B-T3000-chunk", 28, 4, 3000, 128, 64, 64, (1000, 3000)), 64, "bfloat16"),
               (("Q7B-T3000", 28, 4, 3000, 128, 64, 64, None), 16, "float16"),
               (("G1-T700-D64-l32s16", 2, 2, 700, 64, 32, 16, None), 128, "bfloat16"),
               (("G3-T500", 12, 4, 500, 128, 64, 64, None), 32, "bfloat16")]


@pytest.mark.gpu
@pytest.mark.parametrize("knob", [True, "pipelined"], ids=["plain", "pipelined"])  # Levers 52 and 54
@pytest.mark.parametrize("case,tokens_per_sum,dtype", GLUON_CASES, ids=[f"{c[0]}-sum{n}-{d}" for c, n, d in GLUON_CASES])
def test_group_scores_gluon_gpu(case, tokens_per_sum, dtype, knob):
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon scorer is sm_90-only")
    code = (  # the rule, not a FLEXNSA_TUNING file: tuning files apply at head_dim 128 only (tiles.tuning_for)
        "import torch, test_triton_scores as t\n"
        "from flexnsa.triton_fallback import compression_scores as sc, compression_scores_sm90 as sm90\n"
        f"sc.GLUON = {knob!r}\n"
        "calls = []\n"
        "real = sm90.group_scores_sm90\n"
        "sm90.group_scores_sm90 = lambda *a, **k: calls.append(k['pipelined']) or real(*a, **k)\n"
        f"t.check_kernel({case!r}, torch.{dtype}, 'cuda', tol=1e-2, tokens_per_sum={tokens_per_sum}, given_lse=True)\n"
        f"assert calls == [{knob == 'pipelined'!r}] * len(calls) and calls, calls\n"
    )
    run_in_child(code, "the Gluon scorer")


def test_gluon_scorer_stays_off_the_cpu(monkeypatch):
    """The Gluon scorer is sm_90-only: on the CPU (the interpreter) the knob leaves the Triton kernels."""
    monkeypatch.setattr(score_kernels, "GLUON", True)
    q = torch.zeros(1, 7, 64, 16)
    assert not score_kernels._gluon(q, torch.zeros(1, 1, 4, 16), torch.zeros(1, 7, 64), 16, 16)
    test_group_scores_given_lse_interpreter(CASES[0], 8)


@pytest.mark.parametrize("stride", [8, 16], ids=["chunked-scorer", "fused-top-n"])
@pytest.mark.parametrize("selection", ["per_token", "block_shared"])
def test_op_with_triton_kernels_matches_reference(selection, stride):
    cfg = SMALL.replace(compression_kernel="triton", selection=selection, stride=stride, fused_top_n=stride == 16)
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
    assert use_triton_scorer(SMALL, torch.device("cuda")) and use_triton_compression_attention(SMALL, torch.device("cuda"))
    torch_cfg = SMALL.replace(compression_kernel="torch")
    assert not use_triton_scorer(torch_cfg, torch.device("cuda")) and not use_triton_compression_attention(torch_cfg, torch.device("cuda"))


# (id, Hq, Hkv, T, block = stride = l', selection, tile): G = 7 and 1, T not a multiple of the
# block, T < block, several chunks of blocks (merges), 2 selection rows per program (tile 8 <
# 16 tokens), and a tile spanning two 16-token sub-tiles (tile 32).
TOP_N_CASES = [
    ("G7-per_token-T200", 7, 1, 200, 8, "per_token", 8),
    ("G7-shared-tile8-T200", 14, 2, 200, 8, "block_shared", 8),
    ("G1-shared-tile4-T150", 2, 2, 150, 8, "block_shared", 4),
    ("G7-per_token-T10-short", 7, 1, 10, 16, "per_token", 16),
    ("G7-shared-tile32-T300", 7, 1, 300, 32, "block_shared", 32),
]


def check_top_n(case, dtype, device, atol, block_c=None, D=16, B=1, given_lse=False):
    _, Hq, Hkv, T, block, selection, tile = case
    cfg = NSAConfig(block_size=block, stride=block, select_block_size=block, num_selected=4, window=32,
                    selection=selection, select_query_tile=tile)
    assert fused_top_n_supported(cfg)
    q, k, v, _ = random_inputs(B, Hq, Hkv, T, D, dtype=dtype, device=device, seed=5)
    k_cmp = compress_kv(k, v, cfg)[0].contiguous()
    given = compression_lse(q, k_cmp, block, block) if given_lse else None
    rows, lse = selection_top_n(q, k_cmp, cfg, block_c=block_c, lse=given)
    assert given is None or lse is given
    tile = tile if selection == "block_shared" else 1
    assert rows.shape == (B, Hkv, -(-T // tile), 4)
    assert_valid_top_n(rows.repeat_interleave(tile, 2)[:, :, :T], reference_scores(q, k, v, cfg), cfg, atol=atol)
    _, ref_lse, _ = reference_group_scores(q, k, block, block)
    visible = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse).cpu(), visible)
    torch.testing.assert_close(lse.cpu()[visible], ref_lse[visible].float(), rtol=atol, atol=atol)


@pytest.mark.parametrize("case", TOP_N_CASES, ids=[c[0] for c in TOP_N_CASES])
def test_selection_top_n_interpreter(case):
    check_top_n(case, torch.float32, "cpu", atol=1e-5)


@pytest.mark.parametrize("case", [TOP_N_CASES[0], TOP_N_CASES[1]], ids=[c[0] for c in TOP_N_CASES[:2]])
def test_selection_top_n_given_lse_interpreter(case):
    check_top_n(case, torch.float32, "cpu", atol=1e-5, given_lse=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("selection", ["per_token", "block_shared"])
def test_scorers_given_lse_gpu(selection, dtype):
    """Q7B, T = 3000: both scorers from the compression forward's lse (the op's CUDA path)."""
    tol = 5e-2 if dtype == torch.bfloat16 else 5e-3
    tile = 64 if selection == "block_shared" else 1
    check_kernel(("Q7B-T3000", 28, 4, 3000, 128, 64, 64, (1000, 3000)), dtype, "cuda", tol, tile, given_lse=True)
    check_top_n(("Q7B", 28, 4, 3000, 64, selection, 64), dtype, "cuda", atol=tol * tile, D=128, given_lse=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize(
    "case", TOP_N_CASES + [("Q7B-per_token-T3000", 28, 4, 3000, 64, "per_token", 64),
                           ("Q7B-shared-T3000", 28, 4, 3000, 64, "block_shared", 64),
                           ("Q7B-per_token-l16-3chunks", 28, 4, 3000, 16, "per_token", 16),
                           ("Q7B-shared-l16-3chunks", 28, 4, 3000, 16, "block_shared", 16)],
    ids=[c[0] for c in TOP_N_CASES] + ["Q7B-per_token-T3000", "Q7B-shared-T3000", "Q7B-per_token-l16-3chunks",
                                       "Q7B-shared-l16-3chunks"])
def test_selection_top_n_gpu(case, dtype):
    # Score gaps within the dtype's error of the reference count as ties (bf16 logits ~1e-2 rel.,
    # summed over up to 7 heads x 64 tokens of probability mass per tile).
    D = 128 if case[0].startswith("Q7B") else 16
    tol = 5e-2 if dtype == torch.bfloat16 else 5e-3
    check_top_n(case, dtype, "cuda", atol=tol * (case[6] if case[5] == "block_shared" else 1), D=D)


def test_selection_top_n_rejects_other_geometries():
    for cfg in (SMALL.replace(stride=8), SMALL.replace(select_block_size=32, select_query_tile=16)):
        assert not fused_top_n_supported(cfg)
        with pytest.raises(ValueError, match="fused_top_n=True needs"):
            cfg.replace(fused_top_n=True)
        q, k, _, _ = random_inputs(1, 7, 1, 64, 16)
        with pytest.raises(ValueError, match="selection_top_n covers"):
            selection_top_n(q, k[:, :, :4], cfg)


def test_fused_top_n_needs_the_triton_kernels():
    with pytest.raises(ValueError, match="compression_kernel must be"):
        SMALL.replace(compression_kernel="torch", fused_top_n=True)
    with pytest.raises(ValueError, match="fused_top_n must be a bool"):
        SMALL.replace(fused_top_n=1)


@pytest.mark.parametrize("stride", [16, 8], ids=["l=s", "overlap"])
@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("selection", ["per_token", "block_shared"])
def test_importance_chunks_match_one_pass(monkeypatch, selection, kernel, stride, tile=8):
    """Several query chunks (a tiny CHUNK_ELEMENTS) select what one pass selects, and the tile
    sums (in the kernel, then PyTorch) give a valid top-n under the float64 scores."""
    from flexnsa import importance
    from flexnsa.compression import compress_kv

    cfg = SMALL.replace(selection=selection, compression_kernel=kernel, stride=stride, select_query_tile=tile)
    q, k, v, _ = random_inputs(1, 7, 1, 181, 16, seed=4)
    k_cmp, _ = compress_kv(k, v, cfg)
    whole, lse = importance.importance_top_n(q, k_cmp, cfg)
    monkeypatch.setattr(importance, "CHUNK_ELEMENTS", 1)  # one tile (or token) per chunk
    chunked, chunked_lse = importance.importance_top_n(q, k_cmp, cfg)
    assert torch.equal(chunked, whole)
    torch.testing.assert_close(chunked_lse, lse, rtol=1e-6, atol=1e-6)  # reduction widths differ by chunk
    assert_valid_top_n(whole, reference_scores(q, k, v, cfg), cfg, atol=1e-5)
    if kernel == "triton":  # from the compression forward's lse, as the op runs it on CUDA
        given = compression_lse(q, k_cmp.contiguous(), cfg.block_size, cfg.stride)
        from_given, lse_out = importance.importance_top_n(q, k_cmp, cfg, given)
        assert lse_out is given
        assert_valid_top_n(from_given, reference_scores(q, k, v, cfg), cfg, atol=1e-5)
