"""A transformers Llama/Qwen2 (hybrid or plain) run one segment of a long sequence at a time.

The converted model's own forward windows attention through a dense [T, T] sliding-window mask; here
a decoder layer runs on one segment with `windowed_attention`, starting from the keys/values and the
branch state the previous segment left. The branch joins attention through `hybrid_attention`, the
composition the model's own forward uses; only how attention reaches its past differs. An in-place
branch is the layer's MLP (`mlp.memory`), run here with the carried state instead of the cache.
"""

from __future__ import annotations

import sys
import typing as tp

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from ttt_speech.hf.modules import hybrid_attention
from ttt_speech.layers.attention import windowed_attention
from ttt_speech.layers.state import LayerState
from ttt_speech.names import MEMORY

KV = tuple[Tensor, Tensor]


def _rope_functions(attn: nn.Module) -> tuple[tp.Callable, tp.Callable]:
    """apply_rotary_pos_emb and repeat_kv of the transformers model file the attention class comes from."""
    for cls in type(attn).__mro__:
        module = sys.modules.get(cls.__module__)
        if module is not None and hasattr(module, "apply_rotary_pos_emb") and hasattr(module, "repeat_kv"):
            return module.apply_rotary_pos_emb, module.repeat_kv
    raise TypeError(f"{type(attn).__name__}: not a Llama/Qwen2-style attention (no apply_rotary_pos_emb/repeat_kv)")


def windowed_self_attention(model: PreTrainedModel, attn: nn.Module, h: Tensor, past: KV | None, pos: int,
                            window: int, chunk: int | None) -> tuple[Tensor, KV]:
    """The attention's projections and RoPE, `windowed_attention` over [past; this segment]."""
    B, T, _ = h.shape
    rotate, repeat_kv = _rope_functions(attn)
    q, k, v = (proj(h).view(B, T, -1, attn.head_dim).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    positions = pos + torch.arange(T, device=h.device).view(1, T)
    cos, sin = model.model.rotary_emb(h, positions)
    q, k = rotate(q, k, cos, sin)
    groups = attn.num_key_value_groups
    o, kv = windowed_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), window, past, chunk, scale=attn.scaling)
    return attn.o_proj(o.transpose(1, 2).reshape(B, T, -1)), kv


def layer_segment(model: PreTrainedModel, layer: nn.Module, x: Tensor, past: KV | None, memory: LayerState | None,
                  pos: int, window: int, chunk: int | None) -> tuple[Tensor, KV | None, LayerState | None]:
    """One decoder layer on one segment: output, and the keys/values and branch state it leaves."""
    attn = layer.self_attn
    kv: KV | None = None

    def attend(h: Tensor) -> tuple[Tensor, None]:
        nonlocal kv
        out, kv = windowed_self_attention(model, attn, h, past, pos, window, chunk)
        return out, None

    def remember(h: Tensor) -> Tensor:
        nonlocal memory
        y, memory = attn.memory(h, memory)
        return y

    out, _ = hybrid_attention(attn, layer.input_layernorm(x), attend, remember)
    x = x + out.to(x.dtype)
    h = layer.post_attention_layernorm(x)
    if not hasattr(layer.mlp, MEMORY):
        return x + layer.mlp(h), kv, memory
    y, memory = layer.mlp.memory(h, memory)  # in-place fast weights: the MLP is the memory, its state carried
    return x + y.to(x.dtype), kv, memory
