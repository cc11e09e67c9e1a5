"""Conversion of Qwen2.5-VL to NSA: structure, and equality with upstream where NSA must not act."""

import copy

import pytest
import torch

from flexnsa import NSAConfig
from model import (
    NSAQwen2_5_VLAttention,
    convert_to_nsa,
    qwen2_5_vl_7b_config,
    random_model,
    set_nsa_enabled,
    synthetic_batch,
    tiny_nsa_config,
    tiny_qwen2_5_vl_config,
)

NSA = tiny_nsa_config()
VIDEO_BATCH = [[5, (4, 4, 4), 6], [3, (2, 4, 4), 4, (4, 4, 4), 2]]


@pytest.fixture(scope="module")
def pair():
    base = random_model(tiny_qwen2_5_vl_config())
    return base, convert_to_nsa(copy.deepcopy(base), NSA)


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_conversion_swaps_text_attention_only(pair):
    base, nsa = pair
    for dense_layer, layer in zip(base.model.language_model.layers, nsa.model.language_model.layers):
        attn = layer.self_attn
        assert isinstance(attn, NSAQwen2_5_VLAttention)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert torch.equal(getattr(attn, name).weight, getattr(dense_layer.self_attn, name).weight)
        assert attn.g_proj_1.weight.shape == (64, 64) and attn.g_proj_2.weight.shape == (3 * 4, 64)
        assert attn.g_proj_1.weight.dtype == torch.float64
        assert not attn.g_proj_2.weight.any() and not attn.g_proj_2.bias.any() and not attn.g_proj_1.bias.any()
        assert attn.g_proj_1.weight.std() > 0
    names = {n for n, _ in nsa.named_parameters()} - {n for n, _ in base.named_parameters()}
    assert names == {
        f"model.language_model.layers.{i}.self_attn.g_proj_{j}.{p}" for i in range(2) for j in (1, 2) for p in ("weight", "bias")
    }
    # vision tower: same modules' classes and weights
    assert [type(m) for m in nsa.model.visual.modules()] == [type(m) for m in base.model.visual.modules()]
    for (n, p), (_, q) in zip(nsa.model.visual.named_parameters(), base.model.visual.named_parameters()):
        assert torch.equal(p, q), n
    assert nsa.config.text_config.nsa["nsa_config"]["block_size"] == 4


def test_gates_start_at_one_half(pair):
    attn = pair[1].model.language_model.layers[0].self_attn
    gates = attn.nsa_gates(torch.randn(2, 5, 64, dtype=torch.float64))
    assert gates.shape == (2, 5, 4, 3) and torch.equal(gates, torch.full_like(gates, 0.5))


def test_nsa_disabled_equals_upstream(pair):
    base, nsa = pair
    batch = synthetic_batch(base.config, VIDEO_BATCH, dtype=torch.float64)
    expected = logits(base, batch)
    set_nsa_enabled(nsa, False)
    try:
        assert torch.equal(logits(nsa, batch), expected)
    finally:
        set_nsa_enabled(nsa, True)
    assert not torch.allclose(logits(nsa, batch), expected, atol=1e-3), "NSA on should change video outputs"


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_text_only_equals_upstream(pair, padding_side):
    base, nsa = pair
    batch = synthetic_batch(base.config, [[12], [7]], padding_side=padding_side)
    assert torch.equal(logits(nsa, batch), logits(base, batch))


def test_text_before_first_video_equals_upstream(pair):
    """Causal text queries before any video see the same keys as upstream's; the text-only sample too."""
    base, nsa = pair
    batch = synthetic_batch(base.config, [[6, (4, 4, 4), 3], [20]], dtype=torch.float64)
    got, expected = logits(nsa, batch), logits(base, batch)
    torch.testing.assert_close(got[0, :7], expected[0, :7], rtol=0, atol=1e-12)  # 6 text + vision_start
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=1e-12)


def test_7b_config_shape():
    config = qwen2_5_vl_7b_config()
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (3584, 28, 28, 4)
    assert (text.intermediate_size, text.vocab_size, text.hidden_size // text.num_attention_heads) == (18944, 152064, 128)
    assert text.rope_parameters["mrope_section"] == [16, 24, 24] and not config.tie_word_embeddings
    assert (vision.depth, vision.hidden_size, vision.out_hidden_size, vision.spatial_merge_size) == (32, 1280, 3584, 2)
    assert config.video_token_id == 151656


def test_7b_conversion_on_meta_device():
    """The 7B shape converts with the flex backend (head_dim 128); gates add 2 Linear per layer."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = qwen2_5_vl_7b_config(num_hidden_layers=2)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    convert_to_nsa(model, NSAConfig())
    attn = model.model.language_model.layers[1].self_attn
    assert attn.g_proj_1.weight.shape == (3584, 3584) and attn.g_proj_2.weight.shape == (84, 3584)
    assert attn.head_dim == 128 and attn.q_proj.weight.shape == (3584, 3584)
