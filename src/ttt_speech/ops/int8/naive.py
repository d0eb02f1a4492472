"""The definitions of the weight-only int8 matmuls that `triton_mm` computes."""

from __future__ import annotations

import torch
from torch import Tensor

LO = 254  # the low digit's unit is the high digit's / LO: |remainder| <= 1/2 high unit -> |low digit| <= 127


def int8_mm_naive(x: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """y[..., N] = (x[..., K] @ codes[N, K]^T) * scale[N] (+ bias[N]), all in fp32, returned in x's dtype.

    Every int8 code is exact in fp32 (and in bf16), so the only rounding before the output's is fp32 summation.
    """
    y = (x.float() @ codes.float().t()) * scale.float().reshape(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def int8_digits_naive(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [M, K] -> (digits int8 [2, M, K], unit fp32 [M]) with x ~= unit * (high + low / LO) per row.

    Why two int8 digits: int8 x int8 products run on the tensor cores' int8 path straight from the codes, where a
    bf16 x needs every code converted first (the main loop's limit at 64 rows, docs/benchmarks.md). One digit
    (w8a8) rounds x to 1/254 of its row's largest |x|; two keep it to 1/64516 (~2^-16), finer than bf16's own
    2^-9 relative step for every element within 2^7 of the row's largest: the result's error stays the weights'.
    unit = max|x| / 127 (0 for an all-zero row), divisions rounded to nearest, no fused multiply-adds assumed.
    """
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True)
    unit = amax / 127
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    high = torch.floor(xf * inv + 0.5).clamp(-127, 127)
    rest = xf - high * unit
    low = torch.floor(rest * inv * LO + 0.5).clamp(-127, 127)
    return torch.stack([high, low]).to(torch.int8), unit.reshape(-1)


def int8_mm_digits_naive(digits: Tensor, unit: Tensor, codes: Tensor, scale: Tensor, bias: Tensor | None = None,
                         dtype: torch.dtype = torch.float32) -> Tensor:
    """y[M, N] from x's two digits (`int8_digits_naive`): ((high @ codes^T) * unit + (low @ codes^T) * unit / LO)
    * scale (+ bias), the integer sums exact (fp64), returned in `dtype`."""
    c = codes.double().t()
    high, low = digits[0].double() @ c, digits[1].double() @ c
    u = unit.double().reshape(-1, 1)
    y = (high * u + low * (u / LO)) * scale.double().reshape(-1)
    if bias is not None:
        y = y + bias.double()
    return y.to(dtype)
