"""Qwen2.5-VL configs that build a model with no download: a tiny one for tests, the 7B shape.

Weights are random either way; the 7B config exists for benchmarks and memory estimates, the tiny
one keeps every code path (vision tower, 3D mRoPE, GQA, KV cache) at a few thousand parameters.
"""

from __future__ import annotations

from transformers import Qwen2_5_VLConfig

from flexnsa import NSAConfig

# Token ids of the released checkpoints (the 7B tokenizer's special tokens).
QWEN_SPECIAL_TOKENS = dict(
    image_token_id=151655,
    video_token_id=151656,
    vision_start_token_id=151652,
    vision_end_token_id=151653,
)

# Tiny vocabulary: the last ids are the special tokens, 0 is padding.
TINY_VOCAB = 256
TINY_SPECIAL_TOKENS = dict(
    image_token_id=251, video_token_id=250, vision_start_token_id=252, vision_end_token_id=253
)


def tiny_nsa_config(**changes) -> NSAConfig:
    """NSA sized for the tiny model's synthetic videos (a few 4-token frames): 4-token blocks, 3
    selected, window 4, the reference backend (CPU training). ``changes`` override fields."""
    return NSAConfig(
        block_size=4, stride=4, select_block_size=4, num_selected=3, window=4,
        forced_initial=1, forced_local=1, select_query_tile=4, backend="reference",
    ).replace(**changes)


def qwen2_5_vl_7b_config(**text_overrides) -> Qwen2_5_VLConfig:
    """The Qwen2.5-VL-7B-Instruct shape (values of its released config.json).

    Text: hidden 3584, 28 layers, 28 q heads, 4 kv heads (head_dim 128), MLP 18944, vocab 152064,
    mrope_section [16, 24, 24], rope_theta 1e6. Vision: the 32-block, 1280-wide ViT with window
    attention (full attention in blocks 7, 15, 23, 31), merged 2x2 into 3584-wide tokens.
    """
    text = dict(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        hidden_act="silu",
        max_position_embeddings=128000,
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        sliding_window=32768,
        max_window_layers=28,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0, mrope_section=[16, 24, 24]),
        bos_token_id=151643,
        eos_token_id=151645,
    )
    text.update(text_overrides)
    vision = dict(
        depth=32,
        hidden_size=1280,
        hidden_act="silu",
        intermediate_size=3420,
        num_heads=16,
        in_channels=3,
        out_hidden_size=3584,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
        tokens_per_second=2,
    )
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=False, **QWEN_SPECIAL_TOKENS
    )


def tiny_qwen2_5_vl_config(
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    attn_implementation: str | None = None,
) -> Qwen2_5_VLConfig:
    """A random-weight Qwen2.5-VL small enough for CPU tests (head_dim = hidden / heads).

    The vision tower keeps the real patch geometry (14-px patches, 2 frames per temporal patch,
    2x2 merge), so a video grid (t, h, w) gives t*h*w/4 tokens, as in the 7B model.
    ``tie_word_embeddings`` stays False (PITFALLS: FSDP2 and tiny configs).
    """
    half = hidden_size // num_heads // 2  # rotary frequencies per head, split (t, h, w) as 1:1.5:1.5
    mrope_section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=TINY_VOCAB,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            max_position_embeddings=4096,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=mrope_section),
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=hidden_size,
            fullatt_block_indexes=[1],
        ),
        tie_word_embeddings=False,
        **TINY_SPECIAL_TOKENS,
    )
    if attn_implementation is not None:  # the text model only: the vision tower keeps sdpa
        config.text_config._attn_implementation = attn_implementation
    return config
