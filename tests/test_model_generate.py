"""generate() after an NSA prefill: decoding is dense over the KV cache.

Every decoded step's logits must equal an uncached forward over prompt + generated tokens (in
which the video rows get NSA and the new text rows dense attention over all keys).
"""

import pytest
import torch

from model import (
    convert_to_nsa,
    random_model,
    synthetic_batch,
    tiny_nsa_config,
    tiny_qwen2_5_vl_config,
)

NSA = tiny_nsa_config()
SPECIAL = [250, 251, 252, 253]  # a random model must not generate vision tokens


@pytest.mark.parametrize("samples", [[[4, (4, 4, 4), 3]], [[4, (4, 4, 4), 3], [2, (2, 4, 4), 6, (2, 4, 4), 1]]])
def test_generate_matches_uncached_forward(samples):
    model = convert_to_nsa(random_model(tiny_qwen2_5_vl_config()), NSA)
    torch.manual_seed(3)
    for layer in model.model.language_model.layers:
        with torch.no_grad():
            layer.self_attn.g_proj_2.weight.normal_(0, 0.2)
    batch = synthetic_batch(model.config, samples, padding_side="left", dtype=torch.float64)
    steps = 4
    with torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, suppress_tokens=SPECIAL,
            output_logits=True, return_dict_in_generate=True, pad_token_id=0,
        )
    assert out.sequences.shape[1] == batch["input_ids"].shape[1] + steps
    full = dict(batch)
    new = out.sequences.shape[1] - batch["input_ids"].shape[1]
    full["input_ids"] = out.sequences
    full["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones(len(samples), new, dtype=torch.long)], 1)
    full["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros(len(samples), new, dtype=torch.int)], 1)
    with torch.no_grad():
        uncached = model(**full, use_cache=False).logits
    prompt = batch["input_ids"].shape[1]
    for i, step_logits in enumerate(out.logits):  # generate() returns float32 logits: 1-ulp tolerance
        torch.testing.assert_close(step_logits, uncached[:, prompt - 1 + i].float(), rtol=2e-7, atol=2e-7)
