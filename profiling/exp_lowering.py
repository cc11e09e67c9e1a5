"""How Triton lowers tl.exp and tl.exp2 on fp32 (NOTES Lever 28): prints each micro-kernel's PTX
arithmetic between the load and the store. GPU only: ``python -m profiling.exp_lowering``."""

import torch
import triton
import triton.language as tl


@triton.jit
def _exp(X, Y, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(Y + i, tl.exp(tl.load(X + i)))


@triton.jit
def _exp2(X, Y, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(Y + i, tl.exp2(tl.load(X + i)))


def main() -> None:
    x = torch.randn(32, device="cuda")
    y = torch.empty_like(x)
    for name, kernel in (("tl.exp", _exp), ("tl.exp2", _exp2)):
        ptx = kernel[(1,)](x, y, N=32, num_warps=1).asm["ptx"]
        body = [line.strip() for line in ptx.splitlines() if line.strip() and line.strip()[0] in "aefmnrs" and "." in line
                and not line.strip().startswith((".", "ret", "st.", "ld."))]
        print(f"{name}: {len(body)} arithmetic instructions: {body}")


if __name__ == "__main__":
    main()
