"""Gate-aware selection pruning (NSAConfig.gate_prune_epsilon): an inference option whose output
error is bounded by epsilon * max|v|, checked here against the unpruned float64 reference."""

import pytest
import torch

from flexnsa import nsa_attention, nsa_reference
from flexnsa.reference import prune_selection_by_gates

from helpers import SMALL, assert_rel, float64, random_inputs

EPS = 0.05


def gates_with_faded_selection(gates, T):
    """Selection gates below EPS on the first half of the tokens, for every head (pruned there),
    and below EPS for one head only on the rest (not pruned: the group's other heads need it)."""
    g = gates.clone()
    g[:, : T // 2, :, 1] *= EPS * 0.99
    g[:, T // 2 :, 0, 1] *= EPS * 0.99
    return g


@pytest.mark.parametrize("backend", ["flex", "reference"])
@pytest.mark.parametrize("selection", ["per_token", "block_shared"])
def test_pruned_output_within_bound(backend, selection):
    T = 200
    cfg = SMALL.replace(selection=selection, backend=backend)
    q, k, v, g = random_inputs(2, 14, 2, T, 16, seed=3)
    g = gates_with_faded_selection(g, T)
    with torch.no_grad():
        pruned = nsa_attention(q, k, v, g, cfg.replace(gate_prune_epsilon=EPS), return_branches=True)
    full = nsa_reference(*float64(q, k, v, g), cfg)
    dropped = (pruned.selected < 0).all(-1)  # [B, Hkv, T] rows with no block left
    assert dropped[:, :, : T // 2 - T // 2 % 16].all() and not dropped[:, :, T // 2 + 16 :].any()
    rows = dropped.repeat_interleave(7, dim=1)  # per query head
    assert (pruned.slc[rows] == 0).all(), "pruned rows must have no selection output"
    assert_rel(pruned.slc[~rows], full.slc[~rows], 1e-5, "unpruned selection rows")
    bound = EPS * v.abs().max().item()
    err = (pruned.out.double() - full.out).abs().max().item()
    assert err <= bound + 1e-5, f"output error {err:.3e} above epsilon * max|v| = {bound:.3e}"
    assert err > 1e-4, "pruning changed nothing: the test would not see a broken bound"


def test_pruning_is_inference_only_and_validated():
    q, k, v, g = random_inputs(1, 7, 1, 64, 16, requires_grad=True)
    cfg = SMALL.replace(backend="reference", gate_prune_epsilon=EPS)
    with pytest.raises(ValueError, match="inference option"):
        nsa_attention(q, k, v, g, cfg)
    for bad in (-0.1, 1.0, True, "0.1"):
        with pytest.raises(ValueError, match="gate_prune_epsilon"):
            SMALL.replace(gate_prune_epsilon=bad)


def test_epsilon_zero_prunes_nothing():
    selected = torch.arange(4).expand(1, 2, 10, 4)
    gates = torch.zeros(1, 10, 14, 3)
    assert prune_selection_by_gates(selected, gates, SMALL) is selected


def test_pruned_forward_through_the_fused_path(monkeypatch):
    # Inference with all three branches on the Triton kernels takes the fused-gates path (the gated
    # sum in the window's epilogue, NOTES Lever 40): pruned rows come out as on the plain path.
    from flexnsa.backends import flex

    fused_calls = []
    fused_branches = flex.fused_gates_branches
    monkeypatch.setattr(flex, "fused_gates_branches", lambda *a: fused_calls.append(1) or fused_branches(*a))
    T = 200
    cfg = SMALL.replace(selection="block_shared", compression_kernel="triton", selection_kernel="triton", window_kernel="triton",
                        check_inputs=False, gate_prune_epsilon=EPS)
    q, k, v, g = random_inputs(1, 14, 2, T, 16, seed=3)
    g = gates_with_faded_selection(g, T)
    with torch.no_grad():
        plain = nsa_attention(q, k, v, g, cfg, return_branches=True)  # branches wanted: the plain path
        assert not fused_calls
        fused = nsa_attention(q, k, v, g, cfg)
    assert fused_calls == [1]
    assert (plain.selected < 0).all(-1).any(), "some rows must be pruned"
    torch.testing.assert_close(fused, plain.out, rtol=1e-6, atol=1e-6)
