"""save_pretrained / load_nsa_model round trip, and VideoNSA-layout gate weights."""

import json

import pytest
import torch
from safetensors import safe_open

from model import (
    convert_to_nsa,
    load_nsa_model,
    load_nsa_state_dict,
    nsa_settings,
    random_model,
    synthetic_batch,
    tiny_nsa_config,
    tiny_qwen2_5_vl_config,
)

NSA = tiny_nsa_config(selection="block_shared")
SAMPLES = [[5, (4, 4, 4), 6], [3, (2, 4, 4), 4, (4, 4, 4), 2]]


def converted(seed=0, gate_seed=1, nsa=NSA, images_as_video=False):
    model = random_model(tiny_qwen2_5_vl_config(), seed=seed, dtype=torch.float32)
    convert_to_nsa(model, nsa, images_as_video=images_as_video)
    torch.manual_seed(gate_seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".self_attn.g_proj_" in name or ".self_attn.compress_" in name:
                p.normal_(0, 0.2)
    return model


def gate_state(model):
    return {k: v for k, v in model.state_dict().items() if ".g_proj_" in k}


@pytest.mark.parametrize("nsa, images_as_video", [(NSA, False), (NSA.replace(compression="mlp"), True)], ids=["mean", "mlp-images"])
def test_save_and_load_round_trip(tmp_path, nsa, images_as_video):
    model = converted(nsa=nsa, images_as_video=images_as_video)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["text_config"]["nsa"]["nsa_config"]["selection"] == "block_shared"
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        on_disk = set(f.keys())
    assert "model.layers.1.self_attn.g_proj_2.bias" in on_disk  # transformers 5.23 writes the original layout

    loaded = load_nsa_model(tmp_path)
    assert nsa_settings(loaded.config) == (nsa, images_as_video)
    assert loaded.model.nsa_router.images_as_video == images_as_video
    assert loaded.model.language_model.layers[0].self_attn.nsa_config == nsa
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    batch = synthetic_batch(model.config, SAMPLES + [[3, (4, 4), 2]], padding_side="left")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def test_load_nsa_model_refuses_unconverted_checkpoint(tmp_path):
    random_model(tiny_qwen2_5_vl_config(), dtype=torch.float32).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no NSA settings"):
        load_nsa_model(tmp_path)


@pytest.mark.parametrize("layout", ["videonsa", "in_memory"])
def test_gate_weights_of_either_layout_load(layout):
    source, target = converted(gate_seed=1), converted(gate_seed=2)
    gates = gate_state(source)
    if layout == "videonsa":  # the release's keys: model.layers.{i}.self_attn.g_proj_1.weight
        gates = {k.replace("model.language_model.", "model."): v for k, v in gates.items()}
        assert "model.layers.0.self_attn.g_proj_1.weight" in gates
    assert not torch.equal(gate_state(target)["model.language_model.layers.0.self_attn.g_proj_1.weight"], gates[next(iter(gates))])
    loaded = load_nsa_state_dict(target, gates)
    assert len(loaded) == 8
    for key, value in gate_state(source).items():
        assert torch.equal(gate_state(target)[key], value), key


def test_full_videonsa_state_dict_loads():
    """A whole checkpoint in the original layout (visual.*, model.layers.*, lm_head)."""
    source, target = converted(seed=0), converted(seed=5, gate_seed=2)
    legacy = {}
    for key, value in source.state_dict().items():
        key = key.replace("model.visual.", "visual.").replace("model.language_model.", "model.")
        legacy[key] = value
    assert "visual.blocks.0.attn.qkv.weight" in legacy and "model.embed_tokens.weight" in legacy
    load_nsa_state_dict(target, legacy)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_bad_gate_state_dicts_are_refused():
    model = converted()
    gates = gate_state(model)
    with pytest.raises(ValueError, match="missing"):
        load_nsa_state_dict(model, {k: v for k, v in gates.items() if "layers.1" not in k})
    wrong = dict(gates)
    wrong["model.language_model.layers.0.self_attn.g_proj_2.weight"] = torch.zeros(3 * 8, 64)  # gates for 8 heads
    with pytest.raises(ValueError, match="shape mismatch"):
        load_nsa_state_dict(model, wrong)
    with pytest.raises(ValueError, match="not parameters"):
        load_nsa_state_dict(model, dict(gates, **{"model.layers.0.self_attn.g_proj_3.weight": torch.zeros(1)}))
