"""flexnsa: Native Sparse Attention built from FlexAttention block masks and Triton kernels."""

from .compression import MLPCompressor
from .config import NSAConfig
from .module import NSAAttention, NSAGates
from .ops import nsa_attention
from .output import NSAOutput
from .reference import nsa_reference

__all__ = [
    "MLPCompressor",
    "NSAAttention",
    "NSAConfig",
    "NSAGates",
    "NSAOutput",
    "nsa_attention",
    "nsa_reference",
]
__version__ = "0.1.0"
