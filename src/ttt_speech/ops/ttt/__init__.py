"""TTT with an inner residual MLP of depth 1 (TTT-Linear) or 2 (TTT-MLP).

- `reference.ttt_chunked`: chunked dual form, differentiable, CPU and GPU; the definition.
- `naive.ttt_naive`: per-token loop with autograd gradients; the test oracle.
- `step.ttt_step_`: one token, in place, CUDA-graph capturable.
- `fla.ttt_linear_fla`: flash-linear-attention's kernel for variant="fla" on CUDA.
"""

from ttt_speech.ops.ttt.reference import ttt_chunked
from ttt_speech.ops.ttt.step import ttt_step_

__all__ = ["ttt_chunked", "ttt_step_"]
