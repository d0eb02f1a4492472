"""Weight-only int8 matmul: y = x @ (codes * scale)^T (+ bias), codes int8 [N, K], one scale per output channel.

- `naive.int8_mm_naive`: dequantize-free fp32 matmul, then the scale; the definition and test oracle.
- `naive.int8_digits_naive` / `naive.int8_mm_digits_naive`: x as two int8 digits (to 2^-16 of each row's largest
  |x|) and the exact integer matmul of those digits: the oracle of the kernels that run on int8 tensor cores.
- `triton_mm.int8_mm_triton`: our Triton kernel: reads the int8 codes once, converts them in registers, fp32
  accumulation (CUDA, or Triton's CPU interpreter; needs triton, imported only by who calls it).
"""

from ttt_speech.ops.int8.naive import int8_mm_naive

__all__ = ["int8_mm_naive"]
