"""Shared test utilities: fresh random inputs, relative errors, a top-n validity check, a check
run in a child process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from flexnsa import NSAConfig
from flexnsa.reference import (
    compression_visibility,
    importance_scores,
    masked_attention,
    reference_compress,
)

# Small-shape config that makes top-n a real choice at T of a few hundred tokens.
SMALL = NSAConfig(
    block_size=16, stride=16, select_block_size=16, num_selected=4, window=32, select_query_tile=16
)


def random_inputs(B, Hq, Hkv, T, D, *, dtype=torch.float32, device="cpu", seed=0, requires_grad=False):
    """Fresh random q, k, v (unit normal) and gates (uniform in (0, 1)) -- never zeros."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=gen)
    k = torch.randn(B, Hkv, T, D, generator=gen)
    v = torch.randn(B, Hkv, T, D, generator=gen)
    gates = torch.rand(B, T, Hq, 3, generator=gen)
    out = [x.to(device=device, dtype=dtype) for x in (q, k, v, gates)]
    for x in out:
        x.requires_grad_(requires_grad)
    return out


def spike_late_keys(k: torch.Tensor, factor: float) -> torch.Tensor:
    """k with the keys of its last third scaled by ``factor`` (in place, no autograd): a query whose
    running max was set by early keys meets logits more than 128 (log2 units) above it later, so
    a forward whose online-softmax rescale did not fire would overflow fp32 (2^128) and fail."""
    with torch.no_grad():
        k[:, :, 2 * k.shape[2] // 3:] *= factor
    return k


# Tolerances of the spiked-key tests on the GPU: fp32 dots run in TF32 (unit roundoff 4.9e-4) on
# logits of magnitude 1e2-1e3, so the lse (~ the max logit) carries ~5e-3 relative error (3.1e-3 and
# 5.3e-3 measured on an H200): 1e-2; bf16 multiplies exactly with fp32 sums: its usual 2e-2 for rounded P.
SPIKED_GPU_TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-2}


def float64(*tensors):
    return [t.detach().double().cpu().requires_grad_(t.requires_grad) for t in tensors]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert torch.isfinite(a).all(), "non-finite values in the tested output"
    denom = b.norm().item()
    return (a - b).norm().item() / denom if denom else (a - b).norm().item()


def assert_rel(a, b, tol, what=""):
    err = rel_err(a, b)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def reference_scores(q, k, v, config: NSAConfig, compressors=None):
    """Per-token importance [B, Hkv, T, Nsel] in float64, straight from the reference's steps."""
    q, k, v = (x.detach().double().cpu() for x in (q, k, v))
    T = q.shape[2]
    kc, vc = reference_compress(k, v, config, compressors)
    visible = compression_visibility(torch.arange(T), kc.shape[2], config)
    _, probs, _ = masked_attention(q, kc, vc, visible, config.softmax_scale(q.shape[-1]))
    return importance_scores(probs, T, config, k.shape[1])


def assert_valid_top_n(selected, scores, config: NSAConfig, atol: float):
    """``selected`` is *a* correct top-n under ``scores`` (ties within ``atol`` allowed).

    Checks per row: ids ascending and eligible, forced blocks present, n_eff entries, and every
    non-forced selected block scores at least the best unselected eligible block minus atol.
    """
    selected = selected.cpu()
    T, l_sel = selected.shape[2], config.select_block_size
    if config.selection == "block_shared":
        tile = config.select_query_tile
        rows = torch.arange(0, T, tile)
        assert (selected == selected[:, :, rows].repeat_interleave(tile, 2)[:, :, :T]).all(), (
            "block-shared selection differs inside a tile"
        )
        pad = -T % tile
        scores = torch.nn.functional.pad(scores, (0, 0, 0, pad)).unflatten(2, (-1, tile)).sum(3)
        selected = selected[:, :, rows]
        cur = rows // l_sel
    else:
        cur = torch.arange(T) // l_sel
    N = scores.shape[-1]
    j = torch.arange(N)
    chosen = torch.zeros(*selected.shape[:-1], N + 1, dtype=torch.bool)
    chosen.scatter_(-1, torch.where(selected < 0, N, selected), True)
    chosen = chosen[..., :N]
    valid = selected >= 0
    assert (valid.sum(-1) == chosen.sum(-1)).all(), "duplicate block ids"
    sorted_ids = torch.where(valid, selected, N).sort(-1).values
    assert (torch.where(valid, selected, N) == sorted_ids).all(), "ids not ascending / -1 not last"
    eligible = j[None, :] <= cur[:, None]
    assert not (chosen & ~eligible).any(), "an ineligible (future) block was selected"
    forced = eligible & ((j[None, :] < config.forced_initial) | (j[None, :] > cur[:, None] - config.forced_local))
    assert not (forced & ~chosen).any(), "a forced block is missing"
    n_eff = torch.clamp(cur + 1, max=config.num_selected)
    assert (chosen.sum(-1) == n_eff).all(), "wrong number of selected blocks"
    inf = torch.tensor(float("inf"), dtype=scores.dtype)
    worst_chosen = torch.where(chosen & ~forced, scores, inf).amin(-1)
    best_left = torch.where(eligible & ~chosen, scores, -inf).amax(-1)
    gap = (best_left - worst_chosen).max().item()
    assert gap <= atol, f"a better block was left out (score gap {gap:.3e} > {atol:.1e})"


def token_reference(q, k, v, gates, config: NSAConfig, selected, t: int, k_cmp=None, v_cmp=None):
    """Branch outputs (cmp, slc, win, out) [B, Hq, D] of one query token, straight from the
    definitions, in float64. Cheap per token, so it checks sampled rows of 128K-token runs."""
    q, k, v, gates = (x.detach().double() for x in (q, k, v, gates))
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    scale = config.softmax_scale(D)
    if k_cmp is None:
        k_cmp, v_cmp = reference_compress(k, v, config)
    k_cmp, v_cmp = k_cmp.detach().double(), v_cmp.detach().double()
    qt = q[:, :, t]  # [B, Hq, D]

    def attend(keys, values, queries=qt):  # keys [B, Hkv', S, D], queries [B, Hkv' * G, D]
        if keys.shape[2] == 0:
            return torch.zeros_like(queries)
        keys, values = keys.repeat_interleave(G, 1), values.repeat_interleave(G, 1)
        p = torch.softmax(torch.einsum("bhd,bhsd->bhs", queries, keys) * scale, -1)
        return torch.einsum("bhs,bhsd->bhd", p, values)

    n_vis = sum(1 for i in range(k_cmp.shape[2]) if i * config.stride + config.block_size <= t + 1)
    cmp = attend(k_cmp[:, :, :n_vis], v_cmp[:, :, :n_vis])
    slc = torch.empty_like(qt)
    for b in range(B):
        for h in range(k.shape[1]):
            ids = selected[b, h, t]
            ids = ids[ids >= 0].to(k.device)
            keys = (ids[:, None] * config.select_block_size + torch.arange(config.select_block_size, device=k.device)).flatten()
            keys = keys[keys <= t]
            heads = slice(h * G, (h + 1) * G)
            slc[b, heads] = attend(k[b : b + 1, h : h + 1, keys], v[b : b + 1, h : h + 1, keys], qt[b : b + 1, heads])[0]
    lo = max(0, t - config.window + 1)
    win = attend(k[:, :, lo : t + 1], v[:, :, lo : t + 1])
    g = gates[:, t]  # [B, Hq, 3]
    out = g[..., 0:1] * cmp + g[..., 1:2] * slc + g[..., 2:3] * win
    return cmp, slc, win, out


def run_in_child(code: str, what: str, timeout: int = 300) -> None:
    """Run ``code`` in a fresh Python (the tests folder importable) under a timeout: a GPU kernel
    that waits on an mbarrier nobody arrives at never raises, so a deadlock fails the test instead
    of hanging the GPU run."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), *sys.path]))
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, timeout=timeout, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} did not finish in {timeout} s (an mbarrier deadlock?)")
    assert done.returncode == 0, done.stderr[-3000:]
