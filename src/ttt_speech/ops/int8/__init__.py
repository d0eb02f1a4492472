"""Weight-only int8 matmul: y = x @ (codes * scale)^T (+ bias), codes int8 [N, K], one scale per output channel.

- `naive.int8_mm_naive`: dequantize-free fp32 matmul, then the scale; the definition and test oracle.
- `triton_mm.int8_mm_triton`: our Triton kernel: reads the int8 codes once, converts them in registers, fp32
  accumulation (CUDA, or Triton's CPU interpreter; needs triton, imported only by who calls it).
"""

from ttt_speech.ops.int8.naive import int8_mm_naive

__all__ = ["int8_mm_naive"]
