"""The hybrid layer against an independent float64 computation: NSA per video span, dense text.

The expected layer output is rebuilt from the layer's weights and inputs with upstream's RoPE,
``flexnsa.nsa_reference`` on each span's q/k/v and an explicit masked softmax for text rows; the
spans are found here from ``input_ids`` by a plain loop, not by ``model.spans``.
"""

import copy

import pytest
import torch
from torch.nn import functional as F
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb

from flexnsa import nsa_reference
from model import (
    SpanPlan,
    convert_to_nsa,
    random_model,
    synthetic_batch,
    tiny_nsa_config,
    tiny_qwen2_5_vl_config,
)

NSA = tiny_nsa_config()
# two samples, left padding, three videos (two in one sample), 32/8/16 video tokens
SAMPLES = [[5, (8, 4, 4), 6], [3, (2, 4, 4), 4, (4, 4, 4), 2]]
BRANCHES = ("cmp", "slc", "win")


@pytest.fixture(scope="module")
def base():
    return random_model(tiny_qwen2_5_vl_config())


def video_spans(input_ids, sparse_ids=(250,)):
    """(b, start, end) of each run of one sparse token id (the test prompts separate every video)."""
    spans = []
    for b, row in enumerate(input_ids.tolist()):
        t = 0
        while t < len(row):
            if row[t] in sparse_ids:
                end = t
                while end < len(row) and row[end] == row[t]:
                    end += 1
                spans.append((b, t, end))
                t = end
            else:
                t += 1
    return spans


def capture_layer(model, batch, layer=0):
    """(inputs, output) of one text layer's self_attn during a forward."""
    attn = model.model.language_model.layers[layer].self_attn
    seen = {}
    h1 = attn.register_forward_pre_hook(lambda m, a, k: seen.update(inputs=k), with_kwargs=True)
    h2 = attn.register_forward_hook(lambda m, a, out: seen.update(output=out[0]))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        h1.remove(), h2.remove()
    return attn, seen["inputs"], seen["output"]


def expected_layer_output(attn, inputs, batch, gates, config, sparse_ids=(250,)):
    """[B, T, hidden] from scratch: dense masked softmax for text rows, nsa_reference per span."""
    x = inputs["hidden_states"]
    B, T, _ = x.shape
    H, Hkv, D = 4, 2, 16

    def heads(linear, n):
        return F.linear(x, linear.weight, linear.bias).view(B, T, n, D).transpose(1, 2)

    q, k = apply_rotary_pos_emb(heads(attn.q_proj, H), heads(attn.k_proj, Hkv), *inputs["position_embeddings"])
    v = heads(attn.v_proj, Hkv)
    k_rep, v_rep = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    valid = batch["attention_mask"].bool()
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    visible = causal[None] & valid[:, None, :]  # [B, T, S]
    scores = (q @ k_rep.transpose(-1, -2)) * D**-0.5
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    out = torch.nan_to_num(torch.softmax(scores, -1)) @ v_rep  # [B, H, T, D]
    for b, s, e in video_spans(batch["input_ids"], sparse_ids):
        res = nsa_reference(q[b : b + 1, :, s:e], k[b : b + 1, :, s:e], v[b : b + 1, :, s:e], gates[b : b + 1, s:e],
                            config, compressors=attn.compressors)
        out[b, :, s:e] = res.out[0]
    return F.linear(out.transpose(1, 2).reshape(B, T, H * D), attn.o_proj.weight)


@pytest.mark.parametrize("branch", BRANCHES)
def test_forced_branch_matches_reference(base, branch):
    """One-hot gates from g_proj_2's bias (sigmoid(+-50/0.3)): the video rows are that branch of NSA."""
    model = convert_to_nsa(copy.deepcopy(base), NSA)
    j = BRANCHES.index(branch)
    for layer in model.model.language_model.layers:
        with torch.no_grad():
            layer.self_attn.g_proj_2.bias.copy_(torch.tensor([50.0 if i == j else -50.0 for i in range(3)]).repeat(4))
    batch = synthetic_batch(model.config, SAMPLES, padding_side="left", dtype=torch.float64)
    attn, inputs, output = capture_layer(model, batch, layer=1)
    B, T = batch["input_ids"].shape
    one_hot = F.one_hot(torch.tensor(j), 3).double().expand(B, T, 4, 3)
    expected = expected_layer_output(attn, inputs, batch, one_hot, NSA)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(output[valid], expected[valid], rtol=0, atol=1e-10)
    # not vacuous: the sparse branch differs from dense causal attention over the span
    dense = expected_layer_output(attn, inputs, batch, one_hot, NSA.replace(window=64, num_selected=16))
    spans = video_spans(batch["input_ids"])
    if branch != "cmp":
        assert max((expected[b, s:e] - dense[b, s:e]).abs().max() for b, s, e in spans) > 1e-3


@pytest.mark.parametrize(
    "config, samples, images_as_video",
    [
        (NSA, SAMPLES, False),
        (NSA.replace(compression="mlp", stride=2), SAMPLES, False),  # overlapping blocks, learned phi
        (NSA.replace(selection="block_shared", select_query_tile=2), SAMPLES, False),
        (NSA, [[4, (4, 4), 3, (2, 4, 4), 1], [2, (4, 8), 5]], True),  # images are spans too
    ],
    ids=["mean", "mlp-overlap", "block-shared", "images-as-video"],
)
def test_learned_gates_match_reference(base, config, samples, images_as_video):
    """Random gate MLP: gates recomputed here from g_proj_1/g_proj_2 (GELU, /0.3, sigmoid)."""
    model = convert_to_nsa(copy.deepcopy(base), config, images_as_video=images_as_video)
    torch.manual_seed(1)
    for layer in model.model.language_model.layers:
        with torch.no_grad():
            layer.self_attn.g_proj_2.weight.normal_(0, 0.2)
            layer.self_attn.g_proj_2.bias.normal_(0, 0.2)
    batch = synthetic_batch(model.config, samples, padding_side="right", dtype=torch.float64)
    attn, inputs, output = capture_layer(model, batch, layer=0)
    sparse_ids = (250, 251) if images_as_video else (250,)
    assert len(video_spans(batch["input_ids"], sparse_ids)) == 3
    x = inputs["hidden_states"]
    logits = F.linear(F.gelu(F.linear(x, attn.g_proj_1.weight, attn.g_proj_1.bias)), attn.g_proj_2.weight, attn.g_proj_2.bias)
    gates = torch.sigmoid(logits.view(*x.shape[:2], 4, 3) / 0.3)
    assert gates.std() > 0.05
    expected = expected_layer_output(attn, inputs, batch, gates, config, sparse_ids)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(output[valid], expected[valid], rtol=0, atol=1e-10)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_equals_samples_alone(base, padding_side):
    """Padding, several spans and a text-only sample: each sample's logits as if run alone."""
    model = convert_to_nsa(copy.deepcopy(base), NSA)
    samples = SAMPLES + [[9]]
    batch = synthetic_batch(model.config, samples, padding_side=padding_side, dtype=torch.float64)
    with torch.no_grad():
        together = model(**batch).logits
        for b, sample in enumerate(samples):
            alone = synthetic_batch(model.config, [sample], dtype=torch.float64)
            # same random tokens/pixels: rebuild the sample from the batch row
            mask = batch["attention_mask"][b].bool()
            alone["input_ids"] = batch["input_ids"][b, mask][None]
            alone["attention_mask"] = torch.ones_like(alone["input_ids"])
            alone["mm_token_type_ids"] = batch["mm_token_type_ids"][b, mask][None]
            if "video_grid_thw" in alone:
                first = sum(1 for s in samples[:b] for seg in s if isinstance(seg, tuple))
                count = len(alone["video_grid_thw"])
                grids = batch["video_grid_thw"]
                patches = grids.prod(-1)
                lo = int(patches[:first].sum())
                alone["video_grid_thw"] = grids[first : first + count]
                alone["pixel_values_videos"] = batch["pixel_values_videos"][lo : lo + int(patches[first : first + count].sum())]
            torch.testing.assert_close(together[b, mask], model(**alone).logits[0], rtol=0, atol=1e-10)


def test_eager_host_attention_matches_sdpa(base):
    eager = random_model(tiny_qwen2_5_vl_config(attn_implementation="eager"))
    eager.load_state_dict(base.state_dict())
    models = [convert_to_nsa(copy.deepcopy(m), NSA) for m in (base, eager)]
    batch = synthetic_batch(base.config, SAMPLES, padding_side="left", dtype=torch.float64)
    with torch.no_grad():
        a, b = (m(**batch).logits for m in models)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(a[valid], b[valid], rtol=0, atol=1e-10)


def test_flex_backend_matches_reference_under_no_grad(base):
    """backend='flex' (compiled FlexAttention on CPU, forward only) == reference, float32."""
    model32 = copy.deepcopy(base).float()
    flex = NSA.replace(backend="flex", flex_block_q=16, flex_block_kv=16)
    models = [convert_to_nsa(copy.deepcopy(model32), cfg) for cfg in (NSA, flex)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    batch = synthetic_batch(base.config, [[3, (4, 4, 4), 2]])
    with torch.no_grad():
        ref, got = (m(**batch).logits for m in models)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_segments_cover_each_sample_in_order():
    plan = SpanPlan(batch_size=3, seq_len=20, spans=(((2, 8), (10, 15)), ((0, 20),), ()))
    assert [tuple(s) for s in plan.segments(0)] == [(0, 2, False), (2, 8, True), (8, 10, False), (10, 15, True), (15, 20, False)]
    assert [tuple(s) for s in plan.segments(1)] == [(0, 20, True)]
    assert [tuple(s) for s in plan.segments(2)] == [(0, 20, False)]
    assert plan.dense_positions(0).tolist() == [0, 1, 8, 9, 15, 16, 17, 18, 19]
    assert plan.dense_positions(1).tolist() == []


def test_hybrid_plumbing_puts_rows_back_and_backward_has_no_slice_copies(base, monkeypatch):
    """With the two attentions replaced by marked linear maps, each output row must be its own
    query row's map (span rows x2, dense rows x3), and the backward graph of the layer's cutting and
    re-assembly must hold no slice/index/select backward or copy-into-slices node: those each cost
    a zero-filled full-size gradient and a copy at 64K (profiling/NOTES.md, Lever 18)."""
    attn = convert_to_nsa(copy.deepcopy(base), NSA).model.language_model.layers[0].self_attn
    monkeypatch.setattr(attn, "span_nsa", lambda q, k, v, h: 2 * q + (k.mean() + v.mean() + h.mean()) * 0)
    monkeypatch.setattr(attn, "dense_rows", lambda q, k, v, mask: 3 * q + (k.mean() + v.mean()) * 0)
    monkeypatch.setattr(attn, "causal_rows", lambda q, k, v: 3 * q + (k.mean() + v.mean()) * 0)
    plan = SpanPlan(batch_size=2, seq_len=20, spans=(((2, 8), (10, 15)), ((0, 20),)))
    Hq, Hkv, D, hidden = attn.num_heads, attn.num_key_value_heads, attn.head_dim, attn.hidden_size
    q = torch.randn(2, 20, Hq, D, requires_grad=True)
    k, v = (torch.randn(2, 20, Hkv, D, requires_grad=True) for _ in range(2))
    h = torch.randn(2, 20, hidden, requires_grad=True)
    out = attn.hybrid_attention(q, k, v, h, None, plan)
    factor = torch.full((2, 20), 3.0)
    for b in range(2):
        for start, end in plan.spans[b]:
            factor[b, start:end] = 2.0
    torch.testing.assert_close(out, factor[..., None, None] * q, rtol=0, atol=0)
    nodes, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in nodes:
            nodes.add(node)
            stack.extend(next_fn for next_fn, _ in node.next_functions)
    names = {type(n).__name__ for n in nodes}
    assert not names & {"SliceBackward0", "IndexBackward0", "SelectBackward0", "CopySlices"}, names
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(q.grad, factor[..., None, None].expand_as(q), rtol=0, atol=0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_unmasked_dense_runs_equal_their_masked_rows(base, device, monkeypatch):
    """Without a mask (plain causal), each dense run attends to the keys up to its end, aligned to
    the last (flash on GPUs); it must equal the same rows under an explicit causal mask."""
    dtype = torch.float64 if device == "cpu" else torch.bfloat16
    attn = convert_to_nsa(copy.deepcopy(base), NSA).model.language_model.layers[0].self_attn.to(device, dtype)
    calls = []
    causal_rows = attn.causal_rows
    monkeypatch.setattr(attn, "causal_rows", lambda q, k, v: calls.append((q.shape[2], k.shape[2])) or causal_rows(q, k, v))
    T = 300
    plan = SpanPlan(batch_size=2, seq_len=T, spans=(((5, 100), (110, 250)), ((0, 200),)))
    gen = torch.Generator().manual_seed(3)
    Hq, Hkv, D = attn.num_heads, attn.num_key_value_heads, attn.head_dim
    q, k, v = (torch.randn(2, T, n, D, generator=gen).to(device, dtype) for n in (Hq, Hkv, Hkv))
    h = torch.randn(2, T, attn.hidden_size, generator=gen).to(device, dtype)
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None].expand(2, 1, T, T)
    with torch.no_grad():
        plain = attn.hybrid_attention(q, k, v, h, None, plan)
        assert calls == [(5, 5), (10, 110), (50, 300), (100, 300)], calls  # (rows, keys) of each dense run
        masked = attn.hybrid_attention(q, k, v, h, causal, plan)
    assert len(calls) == 4
    tol = 1e-12 if dtype == torch.float64 else 2e-2
    torch.testing.assert_close(plain, masked, rtol=tol, atol=tol)
