"""Compiled vision blocks (train.parallelize.apply_vision_compile) against eager, on CPU."""

import copy

import torch

from model import random_model, synthetic_batch, tiny_qwen2_5_vl_config
from train.parallelize import apply_vision_compile
from train.vision_attention import batch_vision_attention


def vision_inputs(config, grids=((2, 16, 16), (2, 4, 4))):
    """16 x 16 patches are 4 windows per frame: window and full-attention blocks get cu_seqlens of
    different lengths."""
    batch = synthetic_batch(config, [[3, grids[0], 2], [2, grids[1], 3]], padding_side="left", dtype=torch.float32)
    return batch["pixel_values_videos"], batch["video_grid_thw"]


def recompiles():
    """Recompiles recorded since the last `torch._dynamo.utils.clear_compilation_metrics()`: the
    metrics are process-wide and `torch._dynamo.reset()` keeps them, so earlier tests' would count."""
    return [r for r in torch._dynamo.utils.get_compilation_metrics() if getattr(r, "recompile_reason", None)]


def test_compiled_vision_blocks_match_eager_outputs_and_gradients():
    torch.manual_seed(0)
    eager = random_model(tiny_qwen2_5_vl_config()).float()
    batch_vision_attention(eager)
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    torch._dynamo.utils.clear_compilation_metrics()
    assert apply_vision_compile(compiled) == len(eager.model.visual.blocks)
    pixels, grid = vision_inputs(eager.config)
    results = []
    for model in (eager, compiled):
        out = model.model.visual(pixels, grid_thw=grid).pooler_output
        probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        (out * probe).sum().backward()
        grads = {n: p.grad for n, p in model.model.visual.named_parameters() if "blocks" in n}
        results.append((out.detach(), grads))
    (out_e, grads_e), (out_c, grads_c) = results
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # the blocks ran compiled (around the attention)
    compiled.model.visual(*vision_inputs(eager.config, ((4, 8, 8), (2, 8, 12))))  # other video sizes
    assert not recompiles(), recompiles()
    # fp32 on both sides; inductor reorders the norms' reductions: a few ulps of fp32 per block
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)
    assert grads_e.keys() == grads_c.keys()
    for name, grad in grads_c.items():
        torch.testing.assert_close(grad, grads_e[name], rtol=1e-4, atol=1e-5)


def test_blocks_with_upstream_per_window_attention_stay_eager():
    model = random_model(tiny_qwen2_5_vl_config())
    assert apply_vision_compile(model) == 0
    assert not any("forward" in vars(b) for b in model.model.visual.blocks)  # no compiled forward set
