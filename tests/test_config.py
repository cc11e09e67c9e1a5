import pytest

from flexnsa import NSAConfig


def test_defaults_are_videonsa():
    c = NSAConfig()
    assert (c.block_size, c.stride, c.select_block_size, c.num_selected, c.window) == (64, 64, 64, 32, 256)
    assert (c.forced_initial, c.forced_local, c.gate_temperature) == (1, 2, 0.3)
    assert (c.selection, c.compression, c.backend) == ("per_token", "mean", "flex")


@pytest.mark.parametrize(
    "field,value",
    [
        ("block_size", 0),
        ("stride", -1),
        ("select_block_size", 1.5),
        ("num_selected", 0),
        ("window", 0),
        ("window", -4),
        ("forced_initial", -1),
        ("forced_local", True),
        ("selection", "per_head"),
        ("compression", "max"),
        ("backend", "cuda"),
        ("layout", "folded"),
        ("gate_temperature", 0.0),
        ("select_query_tile", 48),  # does not divide 64
        ("flex_block_q", 96),
        ("scale", -1.0),
    ],
)
def test_invalid_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        NSAConfig(**{field: value})


def test_stride_larger_than_block_is_rejected():
    with pytest.raises(ValueError, match="stride"):
        NSAConfig(block_size=32, stride=64)


def test_num_selected_must_hold_forced_blocks():
    with pytest.raises(ValueError, match="num_selected"):
        NSAConfig(num_selected=2, forced_initial=1, forced_local=2)


def test_block_counts():
    c = NSAConfig(block_size=64, stride=32)
    assert c.num_compressed_blocks(63) == 0
    assert c.num_compressed_blocks(64) == 1
    assert c.num_compressed_blocks(200) == 5  # starts 0, 32, 64, 96, 128 (128 + 64 <= 200)
    assert c.num_select_blocks(200) == 4
