"""A transformers Llama/Qwen2/Mixtral (hybrid or plain) run one segment of a long sequence at a time.

The converted model's own forward windows attention through a dense [T, T] sliding-window mask; here
each decoder layer runs its own forward (norms, residuals, MLP or experts, the branch joined by
`hybrid_attention`) on one segment, and only its attention function is swapped: `segment_attention`,
registered with transformers' `AttentionInterface`, runs `windowed_attention` over the keys/values
the previous segment left and this segment's. The branch state rides down the layer's kwargs in a
`Segment` (`hf.modules`), in place of the `MemoryCache` that carries it while generating; an in-place
branch is the layer's MLP (`mlp.memory`), which reads the same `Segment`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import repeat_kv

from ttt_speech.hf.compat import attention_implementation_as
from ttt_speech.hf.modules import KV, SEGMENT_KWARG, Segment
from ttt_speech.layers.attention import windowed_attention
from ttt_speech.layers.state import LayerState

SEGMENT_ATTENTION = "ttt_speech_segment"


def segment_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                      scaling: float | None = None, **kwargs: Any) -> tuple[Tensor, None]:
    """An `AttentionInterface` function: `windowed_attention` over [the segment's past; this segment] for
    query [B, H, T, D] and key/value [B, H_kv, T, D] (RoPE applied); the keys/values it leaves go to the
    `Segment`. Returns [B, T, H, D], as transformers' attention functions do."""
    segment: Segment = kwargs[SEGMENT_KWARG]
    groups = module.num_key_value_groups
    out, segment.kv = windowed_attention(query, repeat_kv(key, groups), repeat_kv(value, groups), segment.window,
                                         segment.past, segment.chunk, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)


def layer_segment(model: PreTrainedModel, layer: nn.Module, x: Tensor, past: KV | None, memory: LayerState | None,
                  pos: int, window: int, chunk: int | None) -> tuple[Tensor, KV | None, LayerState | None]:
    """One decoder layer's own forward on one segment: output, and the keys/values and branch state it leaves."""
    segment = Segment(past, memory, window, chunk)
    positions = pos + torch.arange(x.shape[1], device=x.device).view(1, -1)
    with attention_implementation_as(model.config, SEGMENT_ATTENTION):
        x = layer(x, position_ids=positions, position_embeddings=model.model.rotary_emb(x, positions),
                  **{SEGMENT_KWARG: segment})
    return x, segment.kv, segment.memory
