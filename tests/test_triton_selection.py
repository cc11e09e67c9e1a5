"""Triton selected-block attention == float64 reference: output, lse, dq, dk, dv, for random valid
selection rows (ascending ids, -1 padded, some rows empty). Interpreter on CPU (fp32), native on
GPU (bf16, fp32)."""

import collections

import pytest
import torch

from flexnsa import NSAConfig
from flexnsa.reference import masked_attention, selection_visibility
from flexnsa.triton_fallback import custom_ops, use_triton_selection
from flexnsa.triton_fallback import selection_attention as slc
from flexnsa.triton_fallback.selection_attention import reverse_lists, selection_attention

from helpers import SPIKED_GPU_TOL, assert_rel, random_inputs, spike_late_keys

# (id, Hq, Hkv, T, D, select block l', tile (1 = per-token), n): G = 7 and 1, T not a multiple
# of the block, T < l', tile < l', n larger than the eligible blocks.
CASES = [
    ("G7-T200-shared", 14, 2, 200, 16, 16, 16, 4),
    ("G1-T75-per_token", 2, 2, 75, 16, 16, 1, 3),  # (T 150 -> 75 for CI time: 6 interpreter tests took 35-43 s each)
    ("G7-T10-short", 7, 1, 10, 16, 16, 16, 4),
    ("G7-T333-l32-tile8", 7, 1, 333, 32, 32, 8, 5),
    ("G7-T90-per_token", 7, 1, 90, 16, 16, 1, 4),
    # 64-token tiles: 448 (token, head) rows per tile, split over 4 programs mid-token when packed.
    ("G7-T300-tile64", 7, 1, 300, 16, 16, 64, 5),
]


def random_rows(B, Hkv, T, block, tile, n, seed):
    """Valid selection rows [B, Hkv, ceil(T/tile), n]: distinct eligible ids (<= the row's current
    block) ascending, -1 padded; every 5th row and batch 1's first row empty (what gate pruning produces)."""
    gen = torch.Generator().manual_seed(seed)
    R = -(-T // tile)
    rows = torch.full((B, Hkv, R, n), -1, dtype=torch.int64)
    for b in range(B):
        for h in range(Hkv):
            for r in range(R):
                if r % 5 == 4 or (b == 1 and r == 0):
                    continue
                ids = torch.randperm(r * tile // block + 1, generator=gen)[:n].sort().values
                rows[b, h, r, : len(ids)] = ids
    return rows


def check(case, dtype, device, tol, seed=0, spiky=False):
    _, Hq, Hkv, T, D, block, tile, n = case
    cfg = NSAConfig(block_size=block, stride=block, select_block_size=block, num_selected=n, select_query_tile=block)
    q, k, v, _ = random_inputs(2, Hq, Hkv, T, D, dtype=dtype, device=device, seed=seed, requires_grad=True)
    if spiky:
        spike_late_keys(k, 50.0)
    rows = random_rows(2, Hkv, T, block, tile, n, seed).to(device)
    out, lse = selection_attention(q, k, v, rows, block, tile, D**-0.5)
    grad = torch.randn_like(out)
    out.backward(grad)
    q64, k64, v64 = (x.detach().double().cpu().requires_grad_() for x in (q, k, v))
    visible = selection_visibility(rows.cpu().repeat_interleave(tile, dim=2)[:, :, :T], T, cfg)
    ref, _, ref_lse = masked_attention(q64, k64, v64, visible, D**-0.5)
    ref.backward(grad.double().cpu())
    assert_rel(out, ref, tol, "out")
    finite = torch.isfinite(ref_lse)
    assert (~finite).any() and torch.equal(torch.isfinite(lse).cpu(), finite), "empty rows must give lse -inf"
    torch.testing.assert_close(lse.cpu()[finite], ref_lse[finite].float(), rtol=tol, atol=tol)
    assert (out.detach().cpu()[~finite] == 0).all(), "empty rows must give 0"
    for name, a, b in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
        assert_rel(a.grad, b.grad, 2 * tol, name)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_selection_attention_interpreter(case):
    check(case, torch.float32, "cpu", tol=1e-5)


def test_forward_rescales_when_a_later_max_exceeds_the_running_one_interpreter():
    # Selected blocks ascend, so late blocks with logits far above the early ones: the online softmax's
    # rescale of the running state (alpha < 1) must fire mid-row; without it 2^(s - max) overflows.
    check(CASES[0], torch.float32, "cpu", tol=1e-4, spiky=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_forward_rescales_when_a_later_max_exceeds_the_running_one_gpu(dtype):
    check(CASES[0], dtype, "cuda", tol=SPIKED_GPU_TOL[dtype], spiky=True)


@pytest.mark.parametrize("case", [CASES[0], CASES[5]], ids=[CASES[0][0], CASES[5][0]])
def test_selection_attention_padded_rows_interpreter(case, monkeypatch):
    # The padded tiling (whole tokens per program, head slots padded to a power of two).
    monkeypatch.setattr(slc, "PACKED", False)
    check(case, torch.float32, "cpu", tol=1e-5)


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[3], CASES[5]], ids=[CASES[i][0] for i in (0, 1, 3, 5)])
def test_selection_attention_pointer_loads_interpreter(case, monkeypatch):
    # K/V blocks by per-thread pointers (the TMA rule off; shapes TMA cannot box use them too).
    monkeypatch.setattr(slc, "TMA", False)
    check(case, torch.float32, "cpu", tol=1e-5)


def test_tma_only_from_hopper_on(monkeypatch):
    # An Ampere GPU cannot compile a descriptor load: the TMA rule must leave it pointer loads.
    for major, expected in ((8, False), (9, True), (10, True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, m=major: (m, 0))
        assert slc.has_tma(torch.device("cuda", 0)) is expected
    assert slc.has_tma(torch.device("cpu"))  # the interpreter emulates descriptors


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[4]], ids=[CASES[1][0], CASES[3][0], CASES[4][0]])
def test_dkv_several_selection_rows_per_iteration_interpreter(case, packed, monkeypatch):
    # dK/dV's "entries" knob: per-token (7 or 1 rows per entry) and tile-8 entries share a program's rows.
    monkeypatch.setattr(slc, "PACK_ENTRIES", True)
    monkeypatch.setattr(slc, "PACKED", packed)
    monkeypatch.setattr(slc, "CHUNK_PER_TOKEN", 5)  # items end mid-iteration: entries past hi are masked
    check(case, torch.float32, "cpu", tol=1e-5, seed=7)


@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=[CASES[1][0], CASES[4][0]])
def test_dkv_one_selection_row_per_iteration_interpreter(case, monkeypatch):
    # "entries" off: one per-token row (G rows of a 16-row tile) per dK/dV iteration.
    monkeypatch.setattr(slc, "PACK_ENTRIES", False)
    check(case, torch.float32, "cpu", tol=1e-5, seed=7)


@pytest.mark.parametrize("case", [CASES[0], CASES[5]], ids=[CASES[0][0], CASES[5][0]])
def test_dkv_packed_rows_interpreter(case, monkeypatch):
    # "head_major" off: block-shared dK/dV over packed (token, head) rows, as before Lever 36.
    monkeypatch.setattr(slc, "HEAD_MAJOR", False)
    check(case, torch.float32, "cpu", tol=1e-5, seed=11)


def test_dkv_head_major_rule():
    # The rule picks (entry, head) steps for block-shared tiles (16 .. rows tokens), not per token.
    q, k = torch.empty(1, 28, 4096, 128, dtype=torch.bfloat16), torch.empty(1, 4, 4096, 128, dtype=torch.bfloat16)
    for tile, expected in ((64, True), (1, False), (8, False)):
        rows = torch.zeros(1, 4, 4096 // tile, 32, dtype=torch.int64)
        consts = slc._launch_params(q, k, k, rows, 64, tile, "dkv")
        assert consts["HEAD_MAJOR"] is expected, tile
        if expected:
            assert (consts["ROWS"], consts["TMA"]) == (tile, True)


def test_dkv_blocks_split_into_several_chunks(monkeypatch):
    # Chunks of 2 rows: every block chosen by > 2 rows is split, and its chunks add by atomics.
    monkeypatch.setattr(slc, "CHUNK", 2)
    check(CASES[0], torch.float32, "cpu", tol=1e-5, seed=3)


@pytest.mark.parametrize("group_rows,interleave", [(0, 0), (2, 0), (3, 0), (0, 3), (3, 2)],
                         ids=["one-group", "groups-of-2", "groups-of-3", "interleave-3", "groups-of-3-interleave-2"])
def test_reverse_lists_cover_every_selection_once(group_rows, interleave):
    # Every (row, block) selection is in exactly one item; items come in (b, h, group) order, valid
    # ones first; "alone" (a plain store) exactly where the block's entries fit one chunk of one group;
    # a block's rows ascending, or (interleave m) by row mod m, ascending within a residue.
    rows = random_rows(2, 3, 150, 16, 16, 4, seed=5)
    num_blocks, chunk = -(-150 // 16), 3
    items, row_of_entry = reverse_lists(rows, num_blocks, chunk, group_rows, interleave)
    entries_of_block = collections.defaultdict(list)
    owner, lo, hi, alone = (x.long() for x in items)
    valid = owner >= 0
    assert valid[: valid.sum()].all(), "valid items come first"
    seen, order = [], []
    for i in torch.nonzero(valid).flatten().tolist():
        bh, j = divmod(owner[i].item(), num_blocks)
        assert 0 < hi[i] - lo[i] <= chunk
        groups_of_item = {r // group_rows if group_rows else 0 for r in row_of_entry[lo[i]:hi[i]].tolist()}
        assert len(groups_of_item) == 1, "an item's rows lie in one group"
        order.append((bh, *groups_of_item))
        seen += [(bh, j, r) for r in row_of_entry[lo[i]:hi[i]].tolist()]
        entries_of_block[(bh, *groups_of_item, j)] += row_of_entry[lo[i]:hi[i]].tolist()
    assert order == sorted(order)
    for block_rows in entries_of_block.values():
        assert block_rows == sorted(block_rows, key=lambda r: (r % interleave, r) if interleave else r)
    expected = [(bh, j, r) for bh, row_ids in enumerate(rows.flatten(0, 1)) for r, ids in enumerate(row_ids) for j in ids.tolist() if j >= 0]
    assert sorted(seen) == sorted(expected)
    per_bin = collections.Counter((bh, j, r // group_rows if group_rows else 0) for bh, j, r in expected)
    chunks = collections.Counter()
    for (bh, j, _), c in per_bin.items():
        chunks[bh * num_blocks + j] += -(-c // chunk)
    assert alone[valid].tolist() == [int(chunks[o] == 1) for o in owner[valid].tolist()]
    if group_rows:  # several groups: some block is split across them, so some items add by atomics
        assert (alone[valid] == 0).any()


@pytest.mark.parametrize("group_rows,interleave", [(0, 0), (3, 0), (0, 3), (3, 2)])
def test_reverse_lists_narrow_keys_give_the_same_lists(group_rows, interleave):
    # NOTES Lever 60's knob: the sort on int16 / int32 keys orders the entries exactly as on int64.
    rows = random_rows(2, 3, 150, 16, 16, 4, seed=7)
    wide = reverse_lists(rows, -(-150 // 16), 3, group_rows, interleave)
    narrow = reverse_lists(rows, -(-150 // 16), 3, group_rows, interleave, narrow_keys=True)
    assert all(torch.equal(a, b) for a, b in zip(wide, narrow))


@pytest.mark.parametrize("group_rows,interleave", [(0, 0), (3, 0), (4, 0), (0, 3), (0, 5), (3, 2), (4, 3)])
@pytest.mark.parametrize("order", ["count", "compiled"])
def test_reverse_lists_counted_order_gives_the_sorted_lists(group_rows, interleave, order, monkeypatch):
    # NOTES Lever 61's knob: entries placed by counted ranks land where the stable sort puts them;
    # "compiled" counts only inside a traced graph, so in eager it is the sort itself. Rows include
    # empty ones, -1 slots, and (the second case) repeated ids, which the sort also keeps in slot order.
    rows = random_rows(2, 3, 150, 16, 16, 4, seed=9)
    repeated = rows.clone()
    repeated[0, 1, 3] = torch.tensor([2, 0, 2, -1])
    repeated[1, 2, 7] = torch.tensor([5, 5, 5, 5])
    for case in (rows, repeated):
        sorted_lists = reverse_lists(case, -(-150 // 16), 3, group_rows, interleave)
        counted = reverse_lists(case, -(-150 // 16), 3, group_rows, interleave, order=order)
        assert all(torch.equal(a, b) for a, b in zip(sorted_lists, counted))
    ids = torch.where(rows < 0, -(-150 // 16), rows).flatten(0, 1)
    ranks = slc.count_ranks(ids, -(-150 // 16) + 1, group_rows, interleave)
    assert ranks.max() > 0, "some bin holds several entries: the ranks are not trivially 0"
    # past COUNT_MAX_CELLS the lists sort, with the same result
    monkeypatch.setattr(slc, "COUNT_MAX_CELLS", 0)
    assert all(torch.equal(a, b) for a, b in zip(sorted_lists, reverse_lists(repeated, -(-150 // 16), 3, group_rows,
                                                                             interleave, order="count")))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("order", ["sort", "compiled"])
def test_reverse_lists_under_inductor_equal_eager(order, device):
    # Inductor's own code for the lists (C++ on CPU, Triton on CUDA, as the compiled backward runs
    # them): groups that do not divide the rows, and an interleave with groups. Flat entry indices
    # (row = entry // n, group = row // group_rows) made torch 2.13's CPU code skip the last entries
    # (NOTES Lever 61); the keys are 3-d since.
    rows = random_rows(2, 3, 150, 16, 16, 4, seed=9).to(device)
    for group_rows, interleave in ((3, 0), (4, 3)):
        torch._dynamo.reset()
        compiled = torch.compile(lambda r: reverse_lists(r, -(-150 // 16), 3, group_rows, interleave, order=order), fullgraph=True)
        expected = reverse_lists(rows, -(-150 // 16), 3, group_rows, interleave)
        assert all(torch.equal(a, b) for a, b in zip(compiled(rows), expected)), (group_rows, interleave)


def test_count_cells_bounds_the_count_order_to_short_inputs():
    # Q7B block-shared (4 kv heads, 64-token tiles and blocks, n = 32): counted to 32K tokens, sorted from 64K.
    cells = {T: slc.count_cells(4, T // 64, 32, T // 64 + 1, 0) for T in (8192, 32768, 65536, 131072)}
    assert cells[32768] <= slc.COUNT_MAX_CELLS < cells[65536] < cells[131072]


def test_narrowest_int_holds_the_bound():
    assert [slc.narrowest_int(b) for b in (1, 2**15, 2**15 + 1, 2**31, 2**31 + 1)] == [
        torch.int16, torch.int16, torch.int32, torch.int32, torch.int64]


def test_reverse_lists_reject_a_bad_group():
    with pytest.raises(ValueError, match="group_rows"):
        reverse_lists(torch.zeros(1, 1, 4, 2, dtype=torch.int64), 4, 3, -1)
    with pytest.raises(ValueError, match="interleave"):
        reverse_lists(torch.zeros(1, 1, 4, 2, dtype=torch.int64), 4, 3, 0, 2.5)
    with pytest.raises(ValueError, match="order"):
        reverse_lists(torch.zeros(1, 1, 4, 2, dtype=torch.int64), 4, 3, order="radix")


@pytest.mark.parametrize("knobs", [dict(GROUP_TOKENS=32), dict(GROUP_TOKENS=48, RELAXED=False), dict(GROUP_TOKENS=0, RELAXED=False)],
                         ids=["groups", "groups-acq_rel", "one-group-acq_rel"])
@pytest.mark.parametrize("case", [CASES[0], CASES[4]], ids=[CASES[0][0], CASES[4][0]])
def test_dkv_work_order_interpreter(case, knobs, monkeypatch):
    # Lever 43's knobs: items per (group of query tokens, block; the rule's 4096-token groups are
    # one group at these lengths), relaxed atomics (the rule) or acq_rel; chunks of 2 rows so
    # blocks split within a group too.
    monkeypatch.setattr(slc, "CHUNK", 2)
    monkeypatch.setattr(slc, "CHUNK_PER_TOKEN", 5)
    for name, value in knobs.items():
        monkeypatch.setattr(slc, name, value)
    check(case, torch.float32, "cpu", tol=1e-5, seed=13)


def test_dkv_group_knob_must_be_a_count():
    q, k = torch.empty(1, 7, 256, 128, dtype=torch.bfloat16), torch.empty(1, 1, 256, 128, dtype=torch.bfloat16)
    rows = torch.zeros(1, 1, 4, 2, dtype=torch.int64)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(slc.TUNING["dkv"], "group", -64)
        with pytest.raises(ValueError, match="'group' must be"):
            slc.dkv_list_params(q, rows, 64, 0)
        mp.setitem(slc.TUNING["dkv"], "group", 4096)
        assert slc.dkv_list_params(q, rows, 64, 0)["group_rows"] == 64


def test_opcheck_selection_attention():
    q, k, v, _ = random_inputs(1, 7, 1, 40, 16, seed=2, requires_grad=True)
    rows = random_rows(1, 1, 40, 8, 8, 3, seed=2)
    torch.library.opcheck(custom_ops.selection_attention, (q, k, v, rows, 8, 8, 0.25),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def check_dq_in(case, dtype, device, tol, seed=5):
    """dq_in (another branch's gradient of q) is added inside the dQ kernel: dq = dq_in + this
    branch's dq; the other gradients do not change (NOTES Lever 39)."""
    _, Hq, Hkv, T, D, block, tile, n = case
    q, k, v, _ = random_inputs(2, Hq, Hkv, T, D, dtype=dtype, device=device, seed=seed)
    rows = random_rows(2, Hkv, T, block, tile, n, seed).to(device)
    out, lse = slc.selection_attention_fwd(q, k, v, rows, block, tile, D**-0.5)
    grad, dq_in = torch.randn_like(out), torch.randn_like(q)
    plain = slc.selection_attention_bwd(q, k, v, rows, out, lse, grad, block, tile, D**-0.5)
    summed = slc.selection_attention_bwd(q, k, v, rows, out, lse, grad, block, tile, D**-0.5, dq_in=dq_in)
    assert_rel(summed[0], dq_in.double() + plain[0].double(), tol, "dq + dq_in")
    for name, a, b in zip(("dk", "dv", "delta"), summed[1:], plain[1:]):  # equal up to the atomics' order
        assert_rel(a, b.double(), tol, name)


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[5]], ids=[CASES[i][0] for i in (0, 1, 5)])
def test_dq_in_is_added_interpreter(case):
    check_dq_in(case, torch.float32, "cpu", tol=1e-5)


def test_dq_in_must_match_q():
    q, k, v, _ = random_inputs(1, 7, 1, 40, 16)
    rows = random_rows(1, 1, 40, 8, 8, 3, seed=0)
    out, lse = slc.selection_attention_fwd(q, k, v, rows, 8, 8, 0.25)
    with pytest.raises(ValueError, match="dq_in must be"):
        slc.selection_attention_bwd(q, k, v, rows, out, lse, out, 8, 8, 0.25, dq_in=q.double())


def test_bad_shapes_raise():
    q, k, v, _ = random_inputs(1, 7, 1, 40, 16)
    with pytest.raises(ValueError, match="bad shapes"):
        selection_attention(q, k, v, random_rows(1, 1, 40, 8, 8, 3, seed=0), 8, 4, 0.25)  # rows for tile 8, not 4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize(
    "case",
    CASES + [("Q7B-T3000-shared", 28, 4, 3000, 128, 64, 64, 32), ("Q7B-T1000-per_token", 28, 4, 1000, 128, 64, 1, 32)],
    ids=[c[0] for c in CASES] + ["Q7B-T3000-shared", "Q7B-T1000-per_token"],
)
def test_selection_attention_gpu(case, dtype):
    # bf16 P and dS are rounded before their dots (unit roundoff 3.9e-3) -> ~1e-2; TF32 ~1e-3.
    check(case, dtype, "cuda", tol=2e-2 if dtype == torch.bfloat16 else 2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_dq_in_is_added_gpu(dtype):
    # dq_in + dq rounded once to q's dtype: the relative error of one rounding (bf16 3.9e-3)
    check_dq_in(("Q7B-T3000-shared", 28, 4, 3000, 128, 64, 64, 32), dtype, "cuda", tol=1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("entries", [True, False], ids=["entries", "one-row"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_dkv_selection_rows_per_iteration_gpu(dtype, entries, monkeypatch):
    # per-token dK/dV with several rows per iteration (the default, "entries") and with one
    monkeypatch.setattr(slc, "PACK_ENTRIES", entries)
    check(("Q7B-T1000-per_token", 28, 4, 1000, 128, 64, 1, 32), dtype, "cuda", tol=2e-2 if dtype == torch.bfloat16 else 2e-3)


def test_selection_kernel_switch(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cfg = NSAConfig()
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        use_triton_selection(cfg.replace(selection_kernel="triton"), torch.device("cpu"))
    assert not use_triton_selection(cfg, torch.device("cpu"))  # auto on CPU: FlexAttention
    assert use_triton_selection(cfg, torch.device("cuda"))  # auto on CUDA: Triton
    assert not use_triton_selection(cfg.replace(selection_kernel="flex"), torch.device("cuda"))
    with pytest.raises(ValueError, match="selection_kernel"):
        cfg.replace(selection_kernel="cuda")


def test_tuning_file_and_tuned_shape(tmp_path, monkeypatch):
    from flexnsa.triton_fallback.tiles import load_tuning_file, tuning_for

    table = {"fwd": {"rows": None, "num_warps": None}, "dkv": {"chunk": None}}
    path = tmp_path / "best.json"
    path.write_text('{"selection": {"fwd": {"rows": 128}, "dkv": {"chunk": 8}}, "compression": {"fwd": {"rows": 7}}}')
    monkeypatch.setenv("FLEXNSA_TUNING", str(path))
    load_tuning_file("selection", table)
    assert table == {"fwd": {"rows": 128, "num_warps": None}, "dkv": {"chunk": 8}}
    # Overrides apply at the shape they were measured at (16-bit, head_dim 128) only.
    assert tuning_for(table, "fwd", torch.empty(1, 1, 1, 128, dtype=torch.bfloat16)) == {"rows": 128}
    assert tuning_for(table, "fwd", torch.empty(1, 1, 1, 128, dtype=torch.float32)) == {}
    assert tuning_for(table, "fwd", torch.empty(1, 1, 1, 64, dtype=torch.bfloat16)) == {}
    path.write_text('{"selection": {"fwd": {"rowz": 128}}}')
    with pytest.raises(ValueError, match="unknown selection kernel or knob"):
        load_tuning_file("selection", table)


def test_inputs_beyond_32bit_offsets_are_refused():
    # A stride-0 view: 2^34 elements without the memory. The check runs before any copy or launch.
    from flexnsa.triton_fallback.compression_attention import compression_attention
    from flexnsa.triton_fallback.selection_attention import selection_attention_fwd

    q = torch.zeros(1, 1, 1, 16).expand(4, 2**14, 2**12, 16)
    k = torch.zeros(1, 1, 1, 16).expand(4, 2**11, 2**12, 16)
    with pytest.raises(ValueError, match="32-bit offsets"):
        selection_attention_fwd(q, k, k, torch.zeros(4, 2**11, 2**8, 1, dtype=torch.int64), 16, 16, 0.25)
    with pytest.raises(ValueError, match="32-bit offsets"):
        compression_attention(q, k[:, :, :4], k[:, :, :4], 16, 16, 0.25)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("case", [("Q7B-T3000-shared", 28, 4, 3000, 128, 64, 64, 32), ("Q7B-T1000-per_token", 28, 4, 1000, 128, 64, 1, 32)],
                         ids=["Q7B-T3000-shared", "Q7B-T1000-per_token"])
def test_selection_attention_pointer_loads_gpu(case, dtype, monkeypatch):
    # K/V blocks by pointers (the TMA rule off, Lever 31's A/B) natively.
    monkeypatch.setattr(slc, "TMA", False)
    check(case, dtype, "cuda", tol=2e-2 if dtype == torch.bfloat16 else 2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_dkv_packed_rows_gpu(dtype, monkeypatch):
    # Block-shared dK/dV over packed rows (the "head_major" rule off, Lever 36's A/B) natively.
    monkeypatch.setattr(slc, "HEAD_MAJOR", False)
    check(("Q7B-T3000-shared", 28, 4, 3000, 128, 64, 64, 32), dtype, "cuda", tol=2e-2 if dtype == torch.bfloat16 else 2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("case", [("Q7B-T3000-shared", 28, 4, 3000, 128, 64, 64, 32), ("Q7B-T1000-per_token", 28, 4, 1000, 128, 64, 1, 32)],
                         ids=["Q7B-T3000-shared", "Q7B-T1000-per_token"])
@pytest.mark.parametrize("knobs", [dict(GROUP_TOKENS=512), dict(GROUP_TOKENS=0, RELAXED=False)], ids=["groups", "one-group-acq_rel"])
def test_dkv_work_order_gpu(case, dtype, knobs, monkeypatch):
    # Lever 43's work order natively (512-token groups: 6 groups at T = 3000, 2 at T = 1000; the
    # rule's 4096 is one group at these lengths) and the order before it.
    for name, value in knobs.items():
        monkeypatch.setattr(slc, name, value)
    check(case, dtype, "cuda", tol=2e-2 if dtype == torch.bfloat16 else 2e-3)
