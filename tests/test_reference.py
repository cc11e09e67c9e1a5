"""The reference is the spec: check its properties against first principles."""

import pytest
import torch

from flexnsa import MLPCompressor, NSAConfig, nsa_reference
from flexnsa.reference import block_overlap, select_blocks, top_n_blocks

from helpers import SMALL, assert_valid_top_n, float64, random_inputs, reference_scores


def brute_force_token(q, k, v, gates, config, selected, t):
    """One query token's output, loop by loop over the six steps (float64)."""
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    scale = config.softmax_scale(D)
    out = torch.zeros(B, Hq, D, dtype=q.dtype)
    for h in range(Hq):
        kv = h // G
        # compression
        blocks = [i for i in range(config.num_compressed_blocks(T)) if i * config.stride + config.block_size <= t + 1]
        if blocks:
            kc = torch.stack([k[:, kv, i * config.stride : i * config.stride + config.block_size].mean(1) for i in blocks], 1)
            vc = torch.stack([v[:, kv, i * config.stride : i * config.stride + config.block_size].mean(1) for i in blocks], 1)
            p = torch.softmax(torch.einsum("bd,bcd->bc", q[:, h, t], kc) * scale, -1)
            o_cmp = torch.einsum("bc,bcd->bd", p, vc)
        else:
            o_cmp = torch.zeros(B, D, dtype=q.dtype)
        outs = [o_cmp]
        for keys in (
            lambda b: [s for s in range(t + 1) if s // config.select_block_size in selected[b, kv, t].tolist()],
            lambda b: list(range(max(0, t - config.window + 1), t + 1)),
        ):
            rows = []
            for b in range(B):
                idx = torch.tensor(keys(b))
                p = torch.softmax(q[b, h, t] @ k[b, kv, idx].T * scale, -1)
                rows.append(p @ v[b, kv, idx])
            outs.append(torch.stack(rows))
        out[:, h] = sum(gates[:, t, h, i, None] * outs[i] for i in range(3))
    return out


@pytest.mark.parametrize("cfg", [SMALL, SMALL.replace(stride=8), SMALL.replace(selection="block_shared", select_query_tile=8)])
def test_reference_matches_brute_force(cfg):
    q, k, v, g = float64(*random_inputs(2, 6, 2, 90, 8, seed=1))
    res = nsa_reference(q, k, v, g, cfg)
    for t in (0, 15, 16, 31, 47, 63, 89):
        torch.testing.assert_close(res.out[:, :, t], brute_force_token(q, k, v, g, cfg, res.selected, t), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cfg", [SMALL, SMALL.replace(selection="block_shared"), SMALL.replace(stride=8, select_block_size=32, select_query_tile=16)])
def test_reference_top_n_is_valid(cfg):
    q, k, v, g = float64(*random_inputs(1, 4, 2, 300, 8, seed=2))
    res = nsa_reference(q, k, v, g, cfg)
    assert_valid_top_n(res.selected, reference_scores(q, k, v, cfg), cfg, atol=0.0)


def test_causal_no_future_leak():
    """Changing tokens after t never changes outputs at or before t, in any branch."""
    q, k, v, g = float64(*random_inputs(1, 4, 2, 160, 8, seed=3))
    cut = 70
    q2, k2, v2, g2 = (x.clone() for x in (q, k, v, g))
    for x in (q2, k2, v2):
        x[:, :, cut:] = torch.randn_like(x[:, :, cut:])
    g2[:, cut:] = torch.rand_like(g2[:, cut:])
    a, b = nsa_reference(q, k, v, g, SMALL), nsa_reference(q2, k2, v2, g2, SMALL)
    for name in ("out", "cmp", "slc", "win"):
        torch.testing.assert_close(getattr(a, name)[:, :, :cut], getattr(b, name)[:, :, :cut], rtol=0, atol=0)


def test_compression_before_first_block_is_zero():
    q, k, v, g = float64(*random_inputs(1, 2, 1, 40, 8, seed=4))
    res = nsa_reference(q, k, v, g, SMALL)  # block 16: token t sees block 0 from t = 15 on
    assert (res.cmp[:, :, :15] == 0).all()
    assert torch.isinf(res.cmp_lse[:, :, :15]).all() and torch.isfinite(res.cmp_lse[:, :, 15:]).all()
    assert (res.cmp[:, :, 15:].abs().sum(-1) > 0).all()


def test_block_shared_with_one_token_tiles_is_per_token():
    q, k, v, g = float64(*random_inputs(1, 4, 2, 130, 8, seed=5))
    a = nsa_reference(q, k, v, g, SMALL)
    b = nsa_reference(q, k, v, g, SMALL.replace(selection="block_shared", select_query_tile=1))
    assert torch.equal(a.selected, b.selected)
    torch.testing.assert_close(a.out, b.out, rtol=0, atol=0)


def test_overlap_map():
    assert torch.equal(block_overlap(256, SMALL), torch.eye(16, dtype=torch.float64))
    m = block_overlap(64, NSAConfig(block_size=32, stride=16, select_block_size=16, num_selected=4, select_query_tile=16))
    # compressed block i = [16 i, 16 i + 32) covers selection blocks i and i + 1 half each.
    assert torch.equal(m, torch.tensor([[0.5, 0.5, 0, 0], [0, 0.5, 0.5, 0], [0, 0, 0.5, 0.5]], dtype=torch.float64))


def test_top_n_selects_all_when_n_exceeds_blocks():
    cfg = NSAConfig(block_size=16, stride=16, select_block_size=16, num_selected=32, select_query_tile=16)
    scores = torch.rand(1, 1, 100, 7, dtype=torch.float64)
    sel = select_blocks(scores, 100, cfg)
    assert sel.shape == (1, 1, 100, 32)
    cur = torch.arange(100) // 16
    for t in range(100):
        assert sel[0, 0, t, : cur[t] + 1].tolist() == list(range(cur[t] + 1))
        assert (sel[0, 0, t, cur[t] + 1 :] == -1).all()


def test_top_n_prefers_high_scores():
    cfg = NSAConfig(select_block_size=1, num_selected=3, forced_initial=1, forced_local=1, select_query_tile=1)
    scores = torch.tensor([[0.0, 0.9, 0.1, 0.8, 0.2, 0.0]], dtype=torch.float64)
    assert top_n_blocks(scores, torch.tensor([5]), cfg).tolist() == [[0, 1, 5]]


def test_reference_gradcheck():
    """Autograd through the reference (float64) agrees with finite differences."""
    q, k, v, g = float64(*random_inputs(1, 2, 1, 40, 4, seed=6, requires_grad=True))
    cfg = SMALL.replace(window=8)
    sel = nsa_reference(q, k, v, g, cfg).selected
    assert torch.autograd.gradcheck(lambda *x: nsa_reference(*x, cfg, selected=sel).out, (q, k, v, g))


def test_mlp_compression_is_differentiable():
    torch.manual_seed(0)
    cfg = SMALL.replace(compression="mlp")
    comp = (MLPCompressor(16, 8).double(), MLPCompressor(16, 8).double())
    q, k, v, g = float64(*random_inputs(1, 4, 2, 70, 8, seed=7, requires_grad=True))
    res = nsa_reference(q, k, v, g, cfg, compressors=comp)
    res.out.square().sum().backward()
    assert comp[0].fc1.weight.grad.abs().sum() > 0 and comp[1].pos.grad.abs().sum() > 0
    assert k.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="compressors"):
        nsa_reference(q, k, v, g, cfg)


@pytest.mark.parametrize("token_major", [False, True])
@pytest.mark.parametrize("T", [256, 200])
def test_mean_pool_matches_reference_forward_and_backward(T, token_major):
    """compression.mean_pool (BlockMean's one-pass backward) against the float64 per-block mean of
    the reference: pooled values and the gradient, tokens after the last whole block included
    (their gradient is 0), and dx in x's layout (token-major inputs keep token-major gradients)."""
    from flexnsa.compression import mean_pool
    from flexnsa.reference import reference_compress

    cfg = NSAConfig(block_size=64, stride=64)
    gen = torch.Generator().manual_seed(T)
    base = torch.randn(2, T, 3, 16, generator=gen) if token_major else torch.randn(2, 3, T, 16, generator=gen)
    x = (base.transpose(1, 2) if token_major else base).requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    pooled = mean_pool(x, cfg.block_size, cfg.stride)
    ref, _ = reference_compress(x64, x64, cfg)
    grad = torch.randn(pooled.shape, generator=gen)
    pooled.backward(grad)
    ref.backward(grad.double())
    torch.testing.assert_close(pooled.double(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-6, atol=1e-7)
    assert x.grad.stride() == x.stride()
    assert x.grad[:, :, (T // 64) * 64 :].abs().sum() == 0 and x.grad.abs().sum() > 0
