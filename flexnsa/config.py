"""One configuration object for every NSA backend, validated on construction.

Defaults are VideoNSA's hyper-parameters (DESIGN.md): a 64-token block is one temporal patch
(2 frames at 224x224), 32 selected blocks, a 256-token window.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

SELECTION_MODES = ("per_token", "block_shared")
COMPRESSION_MODES = ("mean", "mlp")
BACKENDS = ("flex", "reference")
LAYOUTS = ("auto", "gqa_folded", "per_head")
COMPRESSION_KERNELS = ("auto", "triton", "torch")
SELECTION_KERNELS = ("auto", "triton", "flex")
WINDOW_KERNELS = ("auto", "flex", "triton")
FLEX_HEAD_DIMS = (16, 32, 64, 128, 256)


@dataclass(frozen=True)
class NSAConfig:
    """Hyper-parameters and execution choices of Native Sparse Attention.

    Semantics (block sizes, n, window, forced blocks, selection granularity, compression) define
    *what* is computed and are identical on every backend; ``backend``, ``layout`` and the
    ``flex_*`` block sizes only choose *how*.

    ``select_query_tile`` is the tile (in tokens) whose queries share one selection in
    ``block_shared`` mode; it must divide ``select_block_size`` so a tile never straddles two
    selection blocks and its forced local blocks equal those of each of its tokens.

    ``compression_kernel`` runs the compression branch: ``triton`` = Triton kernels (fused
    scores + top-n, compressed attention forward/backward; GPU, or CPU under the Triton
    interpreter); ``torch`` = chunked PyTorch scorer + FlexAttention compressed attention;
    ``auto`` = ``triton`` on CUDA, ``torch`` on CPU. With the Triton kernels, importance + top-n
    run chunked by default (a fused kernel writes group scores for a bounded chunk of tokens,
    PyTorch takes the top-n); ``fused_top_n=True`` instead runs one kernel that keeps a running
    top-n in registers and writes no score tensor at all (l = s = l', power-of-two tile, n <= 128).
    It is slower on Hopper at 128K (the per-chunk sorts; profiling/NOTES.md, Lever 7), so it is
    opt-in.

    ``selection_kernel`` runs the selection branch: ``triton`` = the Triton selected-block kernel
    (walks each row's n block ids directly; GPU, or CPU under the interpreter); ``flex`` =
    FlexAttention with a BlockMask built from the ids; ``auto`` = ``triton`` on CUDA, ``flex`` on
    CPU. FlexAttention's bf16 backward on Hopper needs 128-wide kv blocks, so every 64-token
    selection block is a partial block there (profiling/NOTES.md, Lever 9).

    ``window_kernel`` runs the sliding-window branch: ``triton`` = the selection branch's Triton
    kernels, each 64-token tile walking the blocks its window spans with the window bound in the
    mask (GPU, or CPU under the interpreter); ``flex`` = FlexAttention with the window BlockMask;
    ``auto`` = ``triton`` on CUDA from ``WINDOW_TRITON_FROM`` (16K) tokens on, else ``flex``.
    Measured at Q7B on an H200 (profiling/NOTES.md, Lever 33): the window stage at 128K 10.23 ->
    8.57 ms fwd+bwd and 2.86 -> 2.09 ms forward, the op even at 32K, peak memory +126 MiB; at 8K
    the eager op is launch-bound and the Triton window's host work costs ~2 ms more per fwd+bwd.

    ``gate_prune_epsilon`` (inference only, 0 = off): a selection row whose selection gates are all
    below it (all query heads of the kv group, all tokens of the tile) gets no selected blocks, so
    its selection branch costs nothing; the output changes by at most epsilon * max|v| per element
    (``reference.prune_selection_by_gates``). VideoNSA finds selection gates fading in deep layers.

    ``layout`` places the query heads on FlexAttention's axes (``block_masks.layout``):
    ``gqa_folded`` shares K/V loads across a group's G heads, which the FlexAttention selection
    needs (profiling/NOTES.md, Lever 2); once the Triton kernels run compression and selection,
    only the window uses FlexAttention, and ``per_head`` saves the fold/unfold copies (faster,
    ~0.9 GB less peak at 128K: NOTES, session 8). ``auto`` = ``per_head`` when both Triton
    kernels run, ``gqa_folded`` otherwise.

    ``check_inputs`` validates values (gates in [0, 1], finite q/k/v/gates); it costs one host
    sync per call, so compiled training loops and the profiler turn it off explicitly.
    """

    block_size: int = 64
    stride: int = 64
    select_block_size: int = 64
    num_selected: int = 32
    window: int = 256
    forced_initial: int = 1
    forced_local: int = 2
    selection: str = "per_token"
    select_query_tile: int = 64
    compression: str = "mean"
    compression_mlp_hidden: int | None = None
    gate_temperature: float = 0.3
    backend: str = "flex"
    layout: str = "auto"
    compression_kernel: str = "auto"
    selection_kernel: str = "auto"
    window_kernel: str = "auto"
    fused_top_n: bool = False
    gate_prune_epsilon: float = 0.0
    flex_block_q: int = 128
    flex_block_kv: int = 128
    scale: float | None = None
    check_inputs: bool = True

    def __post_init__(self) -> None:
        for name in (
            "block_size",
            "stride",
            "select_block_size",
            "num_selected",
            "window",
            "select_query_tile",
            "flex_block_q",
            "flex_block_kv",
        ):
            _require_positive_int(name, getattr(self, name))
        for name in ("forced_initial", "forced_local"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"NSAConfig.{name} must be an int >= 0, got {value!r}")
        if self.stride > self.block_size:
            raise ValueError(
                f"NSAConfig.stride ({self.stride}) must be <= block_size ({self.block_size}): "
                "a stride larger than the block leaves tokens that no compressed block covers"
            )
        if self.forced_initial + self.forced_local > self.num_selected:
            raise ValueError(
                f"NSAConfig.num_selected ({self.num_selected}) must be >= forced_initial + "
                f"forced_local ({self.forced_initial} + {self.forced_local})"
            )
        _require_choice("selection", self.selection, SELECTION_MODES)
        _require_choice("compression", self.compression, COMPRESSION_MODES)
        _require_choice("backend", self.backend, BACKENDS)
        _require_choice("layout", self.layout, LAYOUTS)
        _require_choice("compression_kernel", self.compression_kernel, COMPRESSION_KERNELS)
        _require_choice("selection_kernel", self.selection_kernel, SELECTION_KERNELS)
        _require_choice("window_kernel", self.window_kernel, WINDOW_KERNELS)
        if self.select_block_size % self.select_query_tile:
            raise ValueError(
                f"NSAConfig.select_query_tile ({self.select_query_tile}) must divide "
                f"select_block_size ({self.select_block_size})"
            )
        if not isinstance(self.fused_top_n, bool):
            raise ValueError(f"NSAConfig.fused_top_n must be a bool, got {self.fused_top_n!r}")
        if self.fused_top_n:
            from .triton_fallback import MAX_SELECTED, fused_top_n_supported

            if self.compression_kernel == "torch":
                raise ValueError("NSAConfig.fused_top_n=True is a Triton kernel: compression_kernel must be 'auto' or 'triton'")
            if not fused_top_n_supported(self):
                raise ValueError(
                    "NSAConfig.fused_top_n=True needs block_size == stride == select_block_size, a power-of-two "
                    f"select_query_tile and num_selected <= {MAX_SELECTED}"
                )
        eps = self.gate_prune_epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps < 1:
            raise ValueError(f"NSAConfig.gate_prune_epsilon must be a number in [0, 1), got {eps!r}")
        if self.compression_mlp_hidden is not None:
            _require_positive_int("compression_mlp_hidden", self.compression_mlp_hidden)
        if not (isinstance(self.gate_temperature, (int, float)) and self.gate_temperature > 0):
            raise ValueError(f"NSAConfig.gate_temperature must be > 0, got {self.gate_temperature!r}")
        if self.scale is not None and not (isinstance(self.scale, (int, float)) and self.scale > 0):
            raise ValueError(f"NSAConfig.scale must be None or > 0, got {self.scale!r}")
        for name in ("flex_block_q", "flex_block_kv"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"NSAConfig.{name} must be a power of two >= 16, got {value}")

    def replace(self, **changes) -> "NSAConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def softmax_scale(self, head_dim: int) -> float:
        return self.scale if self.scale is not None else head_dim**-0.5

    def num_compressed_blocks(self, seq_len: int) -> int:
        """Blocks i with i*stride + block_size <= seq_len (only whole blocks are pooled)."""
        if seq_len < self.block_size:
            return 0
        return (seq_len - self.block_size) // self.stride + 1

    def num_select_blocks(self, seq_len: int) -> int:
        return -(-seq_len // self.select_block_size)


def _require_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"NSAConfig.{name} must be a positive int, got {value!r}")


def _require_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"NSAConfig.{name} must be one of {choices}, got {value!r}")
