"""TTT with an inner residual MLP of depth 1 (TTT-Linear) or 2 (TTT-MLP).

- `reference.ttt_chunked`: chunked dual form, differentiable, CPU and GPU; the definition.
- `naive.ttt_naive`: per-token loop with autograd gradients; the test oracle.
- `step.ttt_step_`: one token, in place, CUDA-graph capturable.
- `fla.ttt_linear_fla`: flash-linear-attention's kernel for variant="fla" on CUDA.
- `triton_chunk.ttt_linear_chunked_triton`: our TTT-Linear training kernel (forward + backward).
- `triton_step.ttt_linear_step_fused_`: our fused one-token step.
"""

from ttt_speech.ops.ttt.reference import ttt_chunked
from ttt_speech.ops.ttt.step import ttt_step_

__all__ = ["ttt_chunked", "ttt_step_"]
