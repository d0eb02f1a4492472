"""CUDA training path for `variant="fla"` through flash-linear-attention's `chunk_ttt_linear`.

FLA's kernel covers TTT-Linear with a per-query step size (c = 1), the `o + LN(o)` output and a
fresh mini-batch start. It commits a partial last chunk, which streaming must not do, so it is only
given whole mini-batches; the caller runs the tail through the reference.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor

from ttt_speech.deps import require


@functools.cache
def fla_chunk_ttt_linear():
    """FLA's kernel, or None (with one clear warning) when flash-linear-attention is missing."""
    try:
        from fla.ops.ttt import chunk_ttt_linear
    except ImportError as e:
        warnings.warn(
            f"flash-linear-attention is not importable ({e}); variant='fla' trains through ttt-speech's "
            "own Triton kernel on CUDA instead (slower at head_dim 128). Install FLA with "
            "`pip install 'ttt-speech[gpu]'`.",
            stacklevel=3,
        )
        return None
    require("flash-linear-attention")  # its kernel's signature and semantics change between releases
    return chunk_ttt_linear


def ttt_linear_fla(
    q: Tensor, k: Tensor, v: Tensor, eta: Tensor, ln_w: Tensor, ln_b: Tensor,
    W: Tensor, b: Tensor, mini_batch: int, eps: float = 1e-6,
) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v: [B, H, T, D] with T a multiple of `mini_batch`; eta: [B, H, T]; W, b: boundary state.

    Returns out [B, H, T, D] (fp32) and the boundary weights after the run.
    """
    kernel = fla_chunk_ttt_linear()
    assert kernel is not None and q.shape[2] % mini_batch == 0
    o, W_new, b_new = kernel(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        ln_w.to(q.dtype), ln_b.to(q.dtype), eta.transpose(1, 2)[..., None].to(q.dtype),  # its backward wants one dtype
        scale=1.0, eps=eps, chunk_size=mini_batch,
        initial_state=W.float().contiguous(), initial_state_bias=b.float().contiguous(),
        output_final_state=True,
    )
    return o.transpose(1, 2).float(), W_new.float(), b_new.float()


def fla_available() -> bool:
    return torch.cuda.is_available() and fla_chunk_ttt_linear() is not None
