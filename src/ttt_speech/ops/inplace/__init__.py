"""In-place fast weights: a gated MLP's output projection W_down plus a per-stream delta updated per chunk.

- `reference.inplace_chunked`: chunk by chunk, differentiable, any T and starting offset; the definition.
- `parallel.inplace_parallel`: the same in attention form, all frames at once (training's fast path).
- `naive.inplace_naive`: frame by frame, per stream, pair by pair; the test oracle.
- `step.inplace_step_`: one frame, in place, CUDA-graph capturable.
"""

from ttt_speech.ops.inplace.parallel import inplace_parallel
from ttt_speech.ops.inplace.reference import inplace_chunked
from ttt_speech.ops.inplace.step import inplace_step_

__all__ = ["inplace_chunked", "inplace_parallel", "inplace_step_"]
