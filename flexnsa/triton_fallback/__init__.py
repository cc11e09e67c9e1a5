"""Triton kernels: compression attention + fused importance/top-n, and a per-token selection
kernel for when FlexAttention is not the right tool. (The compression kernel is issue 3; until
it lands the flex backend computes compression with FlexAttention and scores in PyTorch.)"""
