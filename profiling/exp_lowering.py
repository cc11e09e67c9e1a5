"""How Triton lowers tl.exp and tl.exp2 on fp32 (NOTES Lever 28): prints each micro-kernel's PTX
fp32 arithmetic. GPU only: ``python -m profiling.exp_lowering``. Session 12 (triton 3.6.0, H200):
tl.exp -> mul.f32 by log2 e + ex2.approx.f32; tl.exp2 -> ex2.approx.ftz.f32."""

import re

import torch
import triton
import triton.language as tl


FP32_ARITH = re.compile(r"\s*(mul|fma|add|sub|ex2)\.\S*f32\s")  # PTX fp32 arithmetic (ex2.approx[.ftz].f32, mul.f32, ...)


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
        body = [line.strip() for line in ptx.splitlines() if FP32_ARITH.match(line)]
        print(f"{name}: {len(body)} fp32 instructions: {body}")


if __name__ == "__main__":
    main()
