"""The definition of the weight-only int8 matmul that `triton_mm` computes."""

from __future__ import annotations

from torch import Tensor


def int8_mm_naive(x: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """y[..., N] = (x[..., K] @ codes[N, K]^T) * scale[N] (+ bias[N]), all in fp32, returned in x's dtype.

    Every int8 code is exact in fp32 (and in bf16), so the only rounding before the output's is fp32 summation.
    """
    y = (x.float() @ codes.float().t()) * scale.float().reshape(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
