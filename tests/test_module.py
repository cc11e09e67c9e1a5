import pytest
import torch

from flexnsa import NSAAttention, nsa_reference

from helpers import SMALL, float64, random_inputs


def make(config, hidden=32, Hq=4, Hkv=2, D=16):
    torch.manual_seed(0)
    return NSAAttention(hidden, Hq, Hkv, D, config)


def test_gates_start_at_one_half_and_use_videonsa_names():
    m = make(SMALL)
    x = torch.randn(2, 10, 32)
    torch.testing.assert_close(m.gates(x), torch.full((2, 10, 4, 3), 0.5))
    names = set(n for n, _ in m.named_parameters())
    assert {"gates.g_proj_1.weight", "gates.g_proj_2.weight", "gates.g_proj_2.bias"} <= names


def test_module_equals_functional_and_trains_on_cpu():
    m = make(SMALL.replace(backend="reference")).double()
    torch.nn.init.normal_(m.gates.g_proj_2.weight, std=0.1)
    x = torch.randn(1, 70, 32, dtype=torch.float64)
    q, k, v, _ = float64(*random_inputs(1, 4, 2, 70, 16, seed=1, requires_grad=True))
    out = m(x, q, k, v)
    gates = torch.sigmoid(m.gates.g_proj_2(torch.nn.functional.gelu(m.gates.g_proj_1(x))).view(1, 70, 4, 3) / 0.3)
    torch.testing.assert_close(out, nsa_reference(q, k, v, gates, m.config).out)
    out.square().mean().backward()
    assert m.gates.g_proj_2.weight.grad.abs().sum() > 0 and q.grad.abs().sum() > 0


def test_mlp_compression_module_holds_compressors():
    m = make(SMALL.replace(backend="reference", compression="mlp"))
    q, k, v, _ = random_inputs(1, 4, 2, 40, 16, requires_grad=True)
    m(torch.randn(1, 40, 32), q, k, v).sum().backward()
    assert m.compress_k.fc1.weight.grad is not None and m.compress_v.pos.grad is not None


def test_module_checks_head_layout():
    m = make(SMALL)
    q, k, v, _ = random_inputs(1, 8, 2, 40, 16)
    with pytest.raises(ValueError, match="q heads"):
        m(torch.randn(1, 40, 32), q, k, v)
