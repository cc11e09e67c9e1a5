"""Bad input: a clear error naming the parameter, on every backend."""

import pytest
import torch

from flexnsa import nsa_attention

from helpers import SMALL, random_inputs

BACKENDS = ["flex", "reference"]


def good():
    return random_inputs(1, 4, 2, 40, 16)


def with_(index, value):
    inputs = good()
    inputs[index] = value
    return inputs


BAD = [
    ("q rank", lambda: with_(0, torch.randn(4, 40, 16)), "q must have shape"),
    ("k rank", lambda: with_(1, torch.randn(1, 2, 40)), "k must have shape"),
    ("k/v mismatch", lambda: with_(2, torch.randn(1, 2, 41, 16)), "k and v"),
    ("seq mismatch", lambda: (lambda q, k, v, g: [q[:, :, :30], k, v, g[:, :30]])(*good()), "does not match q"),
    ("heads not divisible", lambda: (lambda q, k, v, g: [q[:, :3], k, v, g[:, :, :3]])(*good()), "multiple of k/v heads"),
    ("gates shape", lambda: with_(3, torch.rand(1, 40, 4, 2)), "gates must have shape"),
    ("gates > 1", lambda: with_(3, torch.rand(1, 40, 4, 3) + 1), r"gates must lie in \[0, 1\]"),
    ("gates < 0", lambda: with_(3, -torch.rand(1, 40, 4, 3)), r"gates must lie in \[0, 1\]"),
    ("dtype mismatch", lambda: with_(1, torch.randn(1, 2, 40, 16, dtype=torch.float64)), "k dtype"),
    ("device mismatch", lambda: with_(2, torch.randn(1, 2, 40, 16, device="meta")), "v is on meta"),
    ("NaN in k", lambda: (lambda q, k, v, g: [q, k.index_fill(2, torch.tensor([3]), float("nan")), v, g])(*good()), "k contains NaN"),
    ("inf in q", lambda: (lambda q, k, v, g: [q.index_fill(2, torch.tensor([5]), float("inf")), k, v, g])(*good()), "q contains NaN or inf"),
    ("integer q", lambda: [x.to(torch.int32) for x in good()], "floating point"),
    ("not a tensor", lambda: with_(0, [[1.0]]), "q must be a torch.Tensor"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_raises(backend, make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        nsa_attention(*make(), SMALL.replace(backend=backend))


def test_nan_propagates_when_checks_are_off():
    q, k, v, g = good()
    q[0, 0, 20] = float("nan")
    with torch.no_grad():
        out = nsa_attention(q, k, v, g, SMALL.replace(backend="reference", check_inputs=False))
    assert torch.isnan(out[0, 0, 20]).all() and torch.isfinite(out[0, 0, :20]).all()


def test_flex_head_dim_it_cannot_take():
    q, k, v, g = random_inputs(1, 4, 2, 40, 24)
    with pytest.raises(ValueError, match="head_dim"):
        nsa_attention(q, k, v, g, SMALL)
    nsa_attention(q, k, v, g, SMALL.replace(backend="reference"))  # the reference takes any size


def test_config_type_is_checked():
    with pytest.raises(TypeError, match="NSAConfig"):
        nsa_attention(*good(), {"backend": "flex"})


def test_mlp_compression_needs_compressors():
    with pytest.raises(ValueError, match="compressors"):
        nsa_attention(*good(), SMALL.replace(compression="mlp"))
