"""Mean pooling's forward+backward for k and v at 128K (Q7B's kv heads), BlockMean against
autograd's mean of the block view (NOTES session 16): same values, one pass instead of two in the
backward. GPU only:

    python -m profiling.pool_probe
"""

from __future__ import annotations

import torch
import triton.testing

from flexnsa.compression import mean_pool


def autograd_mean(x, block_size):
    return x.unflatten(2, (x.shape[2] // block_size, block_size)).mean(dim=-2, dtype=torch.float32).to(x.dtype)


def main(seq_len: int = 131072) -> None:
    k = torch.randn(1, 4, seq_len, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    g = torch.randn(1, 4, seq_len // 64, 128, device="cuda", dtype=torch.bfloat16)
    for name, pool in (("BlockMean", lambda x: mean_pool(x, 64, 64)), ("autograd", lambda x: autograd_mean(x, 64))):
        ms = triton.testing.do_bench(lambda: torch.autograd.backward([pool(k), pool(v)], [g, g]), grad_to_none=[k, v],
                                     return_mode="median")
        print(f"mean pooling fwd+bwd of k and v, T={seq_len}, {name}: {ms:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
