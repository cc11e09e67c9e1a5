"""Bad input gives a ValueError naming the problem, never a silent dense fallback."""

import pytest
import torch

from model import (
    convert_to_nsa,
    find_spans,
    random_model,
    synthetic_batch,
    tiny_nsa_config,
    tiny_qwen2_5_vl_config,
)
from model.compat import CACHE_ARG, output_cache
from model.spans import SparseModality

NSA = tiny_nsa_config()


@pytest.fixture(scope="module")
def model():
    return convert_to_nsa(random_model(tiny_qwen2_5_vl_config()), NSA)


def test_head_dim_the_flex_backend_cannot_take():
    model = random_model(tiny_qwen2_5_vl_config(hidden_size=96))  # head_dim 24
    with pytest.raises(ValueError, match="head_dim is 24"):
        convert_to_nsa(model, NSA.replace(backend="flex"))
    convert_to_nsa(model, NSA)  # the reference backend takes any head_dim


def test_query_heads_not_a_multiple_of_kv_heads():
    model = random_model(tiny_qwen2_5_vl_config(num_heads=4, num_kv_heads=3))
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"):
        convert_to_nsa(model, NSA)


def test_not_an_nsa_config_and_double_conversion(model):
    with pytest.raises(TypeError, match="NSAConfig"):
        convert_to_nsa(random_model(tiny_qwen2_5_vl_config()), {"block_size": 4})
    with pytest.raises(ValueError, match="already converted"):
        convert_to_nsa(model, NSA)


def test_video_span_shorter_than_one_block():
    model = convert_to_nsa(random_model(tiny_qwen2_5_vl_config()), NSA.replace(block_size=32, stride=32, select_block_size=32, select_query_tile=32))
    batch = synthetic_batch(model.config, [[3, (4, 4, 4), 2]], dtype=torch.float64)  # 16 video tokens
    with pytest.raises(ValueError, match=r"\[4, 20\) has 16 tokens, shorter than one NSA block \(32\)"):
        model(**batch)


def test_grid_with_more_tokens_than_input_ids(model):
    batch = synthetic_batch(model.config, [[3, (4, 4, 4), 2]], dtype=torch.float64)
    batch["video_grid_thw"] = torch.tensor([[6, 4, 4]])  # 24 tokens, input_ids hold 16
    with pytest.raises(ValueError, match="describes 1 video.* of 24 tokens in all, but input_ids holds 16 video tokens"):
        model(**batch)


def test_grid_split_disagrees_with_spans(model):
    """The grid lists 8 then 16 tokens; input_ids hold spans of 16 then 8 (the first cut 8 + 8)."""
    batch = synthetic_batch(model.config, [[3, (4, 4, 4), 2, (2, 4, 4), 1]], dtype=torch.float64)
    batch["video_grid_thw"] = batch["video_grid_thw"].flip(0)
    with pytest.raises(ValueError, match="video_grid_thw gives a video of 16 tokens, but its span in input_ids starting at token 12 has only 8 tokens"):
        model(**batch)


def test_adjacent_videos_are_split_by_the_grid():
    ids = torch.tensor([[7, 250, 250, 250, 250, 250, 250, 8]])
    plan = find_spans(ids, [SparseModality("video", 250, (2, 4))])
    assert plan.spans == (((1, 3), (3, 7)),)
    assert find_spans(ids, [SparseModality("video", 250, None)]).spans == (((1, 7),),)


def test_video_without_mm_token_type_ids(model):
    batch = synthetic_batch(model.config, [[3, (4, 4, 4), 2]], dtype=torch.float64)
    del batch["mm_token_type_ids"]
    with pytest.raises(ValueError, match="mm_token_type_ids"):
        model(**batch)


def test_video_after_cached_tokens_is_not_silently_dense(model):
    batch = synthetic_batch(model.config, [[3, (4, 4, 4), 2]], dtype=torch.float64)
    with torch.no_grad():
        cache = output_cache(model(input_ids=batch["input_ids"][:, :2], use_cache=True))
    with pytest.raises(NotImplementedError, match="after cached tokens"):
        model(**batch, **{CACHE_ARG: cache})
