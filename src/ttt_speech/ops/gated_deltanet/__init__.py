"""Gated DeltaNet (Yang et al. 2024): a gated delta-rule fast-weight memory with a fixed-size state.

- `reference.gated_delta_chunked`: chunked WY/UT form, differentiable, any T; the definition.
- `reference.gated_delta_step_`: one token, in place, CUDA-graph friendly.
- `naive.gated_delta_naive`: per-token recurrence; the test oracle.
"""

from ttt_speech.ops.gated_deltanet.reference import check_shapes, gated_delta_chunked, gated_delta_step_, l2_normalize

__all__ = ["check_shapes", "gated_delta_chunked", "gated_delta_step_", "l2_normalize"]
