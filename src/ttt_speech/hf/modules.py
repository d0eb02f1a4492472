"""The memory branch inside a transformers decoder layer, and the ways to put it there.

hybrid:  `self_attn` keeps its class and weights, but its class gains a mixin that adds
         `self.memory(normed input)` to the attention output. The decoder layer adds that sum to the
         residual, so the TTT branch reads exactly what attention reads (the input_layernorm output)
         and all original state-dict keys stay where they were; the new ones live under `self_attn.memory.`.
replace: `self_attn` becomes `TTTAttention`, a TTT layer initialised from the attention's q/k/v/o.
in-place (an `InPlaceConfig`): the layer's `mlp` keeps its class and weights, but its class gains a
         mixin that runs it as an `InPlaceLayer` (`self.mlp.memory`): its down_proj plus per-stream fast
         weights (docs/ttt.md). The decoder layer calls `mlp(x)` with nothing else, so a pre-hook on the
         decoder layer hands the mlp the cache and padding mask of the current forward.

Padding: the model's forward hook passes `memory_token_mask` [B, T] (False = padding) down the
decoder layers' kwargs. Padded tokens never touch a TTT state: columns where every stream has a
real token run through the chunked form, the other columns through the streaming step with
`exec_mask` (so left-padded prompts give each stream exactly the state it would have alone).

Training segments (`hf.segments`) pass a `Segment` down the same kwargs (`memory_segment=`): the
branch reads and leaves its state there instead of in a cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ttt_speech.hf.cache import MemoryCache
from ttt_speech.hf.compat import get_cache
from ttt_speech.layers.inplace import InPlaceLayer
from ttt_speech.layers.state import LayerState
from ttt_speech.layers.streaming import StreamingLayer
from ttt_speech.layers.ttt import TTTLayer
from ttt_speech.names import MEMORY

TOKEN_MASK_KWARG = "memory_token_mask"
SEGMENT_KWARG = "memory_segment"
KV = tuple[Tensor, Tensor]


@dataclass
class Segment:
    """A training segment's view of one decoder layer, passed down its forward as `memory_segment=`.

    Attention reaches `past` (the previous segment's last window - 1 keys/values) through a window of
    `window` positions (`hf.segments.segment_attention`); the memory branch starts from `memory`
    instead of a `MemoryCache`. The layer's forward leaves what the next segment starts from in `kv`
    and `memory`.
    """

    past: KV | None
    memory: LayerState | None
    window: int
    chunk: int | None
    kv: KV | None = None


def _pads_before_tokens(token_mask: Tensor) -> bool:
    """True when some stream has a padded position followed by a real token (left or inner padding)."""
    real_at_or_after = token_mask.flip(1).cummax(1).values.flip(1)
    return bool((~token_mask & real_at_or_after).any())


def _runs(flags: list[bool]) -> list[tuple[int, int, bool]]:
    """Maximal runs [start, end) of equal flags."""
    runs, start = [], 0
    for t in range(1, len(flags) + 1):
        if t == len(flags) or flags[t] != flags[start]:
            runs.append((start, t, flags[start]))
            start = t
    return runs


def _masked(layer: StreamingLayer, x: Tensor, state: LayerState, token_mask: Tensor) -> tuple[Tensor, LayerState]:
    """TTT over x where padded tokens neither read nor write the state (no grad: uses `step`)."""
    if torch.is_grad_enabled():
        raise ValueError(
            "padding before real tokens (or any padding while a MemoryCache carries the state) needs the no-grad "
            "streaming step, so the TTT state can skip the padded tokens: run inference under torch.no_grad(), "
            "and train with right padding and use_cache=False (or model.train())."
        )
    ys = []
    for start, end, all_real in _runs(token_mask.all(0).tolist()):
        if all_real:
            y, state = layer(x[:, start:end], state)
            ys.append(y)
        else:
            for t in range(start, end):
                y, state = layer.step(x[:, t : t + 1], state, exec_mask=token_mask[:, t])
                ys.append(y)
    return torch.cat(ys, dim=1), state


def memory_branch(layer: StreamingLayer, x: Tensor, cache: Any, layer_idx: int, token_mask: Tensor | None) -> Tensor:
    """Output of memory layer `layer_idx` for x [B, T, dim], carrying its state in `cache` when it is a MemoryCache
    or a training `Segment`.

    Without either (use_cache=False) each call starts from the layer's initial weights and uses the
    chunked form; trailing padding is harmless there (causal, state dropped).
    """
    if isinstance(cache, Segment):
        y, cache.memory = layer(x, cache.memory)
        return y
    state = cache.memory_state(layer_idx, layer, x.shape[0], x.device) if isinstance(cache, MemoryCache) else None
    if state is None:
        if token_mask is None or not _pads_before_tokens(token_mask):
            return layer(x)[0]
        return _masked(layer, x, layer.init_state(x.shape[0], x.device), token_mask)[0]
    if token_mask is not None:
        y, state = _masked(layer, x, state, token_mask)
    elif x.shape[1] == 1 and not torch.is_grad_enabled():
        y, state = layer.step(x, state)  # in place: the decode hot path
    else:
        y, state = layer(x, state)
    cache.memory_states[layer_idx] = state
    return y


def memory_carrier(kwargs: dict[str, Any]) -> Any:
    """What carries a memory state across the forwards of a decoder layer given these kwargs: a training
    `Segment`, else the cache (a `MemoryCache` while generating)."""
    segment = kwargs.get(SEGMENT_KWARG)
    return get_cache(kwargs) if segment is None else segment


class HybridAttentionMixin:
    """Mixed in front of an attention class: attention output + the gated memory branch's output."""

    memory: TTTLayer
    layer_idx: int

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Tensor, Any]:
        token_mask = kwargs.pop(TOKEN_MASK_KWARG, None)
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        attention = super().forward  # type: ignore[misc]
        return hybrid_attention(
            self, hidden, lambda h: attention(*args, **kwargs),
            lambda h: memory_branch(self.memory, h, memory_carrier(kwargs), self.layer_idx, token_mask))


_HYBRID_CLASSES: dict[type, type] = {}


def hybrid_class(cls: type[nn.Module]) -> type[nn.Module]:
    """`Hybrid<cls>`: one subclass per attention class, so isinstance checks on the original still hold."""
    if cls not in _HYBRID_CLASSES:
        _HYBRID_CLASSES[cls] = type(f"Hybrid{cls.__name__}", (HybridAttentionMixin, cls), {"__module__": __name__})
    return _HYBRID_CLASSES[cls]


class InPlaceMLPMixin:
    """Mixed in front of a gated MLP class (gate_proj, up_proj, down_proj, act_fn): the MLP with in-place
    fast weights, its state carried in the MemoryCache like a TTT layer's."""

    memory: InPlaceLayer
    layer_idx: int
    # (cache, padding mask) of the decoder layer's current forward, set by `pass_memory_context`
    memory_context: tuple[Any, Tensor | None] = (None, None)

    def forward(self, x: Tensor) -> Tensor:
        cache, token_mask = self.memory_context
        return memory_branch(self.memory, x, cache, self.layer_idx, token_mask).to(x.dtype)


def pass_memory_context(layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    """Forward pre-hook of a decoder layer whose mlp has in-place fast weights: the mlp gets the cache and
    padding mask that reach the layer (and its attention) as keyword arguments."""
    layer.mlp.memory_context = (memory_carrier(kwargs), kwargs.get(TOKEN_MASK_KWARG))


def drop_memory_context(layer: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
    """Forward hook: the mlp forgets the cache once the layer is done (no reference outlives the forward)."""
    layer.mlp.memory_context = (None, None)


_INPLACE_CLASSES: dict[type, type] = {}


def inplace_class(cls: type[nn.Module]) -> type[nn.Module]:
    """`InPlace<cls>`: one subclass per MLP class, so isinstance checks on the original still hold."""
    if cls not in _INPLACE_CLASSES:
        _INPLACE_CLASSES[cls] = type(f"InPlace{cls.__name__}", (InPlaceMLPMixin, cls), {"__module__": __name__})
    return _INPLACE_CLASSES[cls]


class TTTAttention(nn.Module):
    """Drop-in `self_attn` made of a TTT layer only (mode="replace"); returns (output, None) like attention."""

    def __init__(self, memory: TTTLayer, layer_idx: int) -> None:
        super().__init__()
        self.memory = memory
        self.layer_idx = layer_idx

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, None]:
        token_mask = kwargs.get(TOKEN_MASK_KWARG)
        return hybrid_attention(
            self, hidden_states, None,
            lambda h: memory_branch(self.memory, h, memory_carrier(kwargs), self.layer_idx, token_mask))


def hybrid_attention(attn: nn.Module, hidden: Tensor, attend: Callable[[Tensor], tuple[Tensor, Any]] | None,
                     remember: Callable[[Tensor], Tensor]) -> tuple[Tensor, Any]:
    """What a decoder layer's `self_attn` returns: the one place a memory branch joins attention.

    `attn` is a hybrid attention (attention output + gated branch output, both reading the normed input
    `hidden`), a `TTTAttention` (the branch alone; `attend` is not called) or a plain attention. `attend`
    runs the attention (transformers' own with its cache, or windowed over training segments);
    `remember` runs the branch.
    """
    if isinstance(attn, TTTAttention) or attend is None:
        return remember(hidden).to(hidden.dtype), None
    out, weights = attend(hidden)
    if hasattr(attn, MEMORY):
        out = out + remember(hidden).to(out.dtype)
    return out, weights


def expand_kv_heads(proj: nn.Linear, num_kv_heads: int, num_heads: int) -> nn.Linear:
    """A Linear whose output has `num_heads` heads: each KV head repeated as grouped-query attention shares it.

    Query head h reads KV head h // (num_heads // num_kv_heads), the order of transformers' `repeat_kv`.
    """
    if num_kv_heads == num_heads:
        return proj
    rep = num_heads // num_kv_heads
    head_dim = proj.out_features // num_kv_heads
    out = nn.Linear(proj.in_features, num_heads * head_dim, bias=proj.bias is not None,
                    device=proj.weight.device, dtype=proj.weight.dtype)
    with torch.no_grad():
        w = proj.weight.view(num_kv_heads, head_dim, proj.in_features)
        out.weight.copy_(w.repeat_interleave(rep, dim=0).reshape(num_heads * head_dim, proj.in_features))
        if proj.bias is not None:
            out.bias.copy_(proj.bias.view(num_kv_heads, head_dim).repeat_interleave(rep, dim=0).reshape(-1))
    return out
