"""A Moshi (hybrid or plain) run one segment of a long sequence at a time, carrying what it remembers.

moshi's `LMModel.forward` attends through a dense [B, 1, T, T] mask, which long training sequences
cannot afford. Here the temporal transformer runs on one segment with windowed attention, each layer
starting from the keys/values and branch state the previous segment left. The layer itself is
composed by `residual_block` (the same composition that streams), so only how attention reaches its
past differs. Embeddings and the text head are moshi's own: `LMModel.forward_text` runs with its
temporal transformer stood in for by `SegmentStack` (the sin positional embedding at the segment's
position, then the caller's loop over the layers); the audio logits are `forward_depformer_training`'s.
"""

from __future__ import annotations

import typing as tp

import torch
from moshi.models.lm import LMModel
from moshi.modules.transformer import (StreamingMultiheadAttention, StreamingTransformer, create_sin_embedding,
                                       expand_repeated_kv)
from torch import Tensor, nn

from ttt_speech.layers.attention import windowed_attention
from ttt_speech.layers.state import LayerState
from ttt_speech.moshi.compat import delay_sequence, initial_token, temporal_transformer
from ttt_speech.moshi.layer import Mix, feed_forward_block, residual_block

KV = tuple[Tensor, Tensor]
Layers = tp.Callable[[Tensor], Tensor]


def delayed_inputs(lm: LMModel, codes: Tensor) -> Tensor:
    """The model's inputs for codes [B, K, L]: the initial token, then each stream delayed by its
    acoustic delay ([B, K, L + 1]; position t reads column t and predicts column t + 1)."""
    initial = initial_token(lm).to(codes.device).expand(codes.shape[0], -1, -1)
    return torch.cat([initial, delay_sequence(lm.delays, codes, initial)], dim=2)


class SegmentStack(nn.Module):
    """Stands in for moshi's temporal transformer inside `LMModel.forward_text` on one segment.

    moshi's `StreamingTransformer.forward` adds its sin positional embedding at the streaming offset
    (0 outside streaming) and loops its layers itself; a segment starts at absolute position `pos`
    and its layers run with the state the previous segment left, one unit at a time (checkpointed,
    FSDP-sharded: `train.model.SegmentLM`). So this adds the embedding at `pos` and hands the
    hidden states to `layers`.
    """

    def __init__(self, transformer: StreamingTransformer, pos: int, layers: Layers) -> None:
        super().__init__()
        self.sin = transformer.positional_embedding in ("sin", "sin_rope")
        self.scale, self.max_period = transformer.positional_scale, transformer.max_period
        self.pos = pos
        self.run_layers = layers

    def forward(self, x: Tensor, cross_attention_src: Tensor | None = None) -> Tensor:
        if cross_attention_src is not None:
            raise ValueError("segments run Moshi without cross-attention conditioning")
        if self.sin:
            positions = self.pos + torch.arange(x.shape[1], device=x.device).view(1, -1, 1)
            x = x + self.scale * create_sin_embedding(positions, x.shape[-1], self.max_period, x.dtype)
        return self.run_layers(x)


def forward_segment(lm: LMModel, inputs: Tensor, pos: int, layers: Layers) -> tuple[Tensor, Tensor]:
    """`lm.forward_text` on inputs [B, K, T] starting at absolute position `pos`, with `layers` (hidden
    states [B, T, dim] -> [B, T, dim]) as the temporal transformer's layers: the output after `out_norm`
    [B, T, dim] and the text logits [B, 1, T, V]."""
    with temporal_transformer(lm, SegmentStack(lm.transformer, pos, layers)):
        return lm.forward_text(inputs)


def logits(lm: LMModel, inputs: Tensor, pos: int, layers: Layers) -> list[Tensor]:
    """Text logits [B, 1, T, V] and the depformer's audio logits [B, dep_q, T, card] of a segment at `pos`,
    teacher-forced on inputs [B, K, T + 1] (the depformer reads the next frame's tokens)."""
    out, text = forward_segment(lm, inputs[..., :-1], pos, layers)
    return [text, lm.forward_depformer_training(inputs[:, :, 1:], out)]


def windowed_self_attention(attn: StreamingMultiheadAttention, h: Tensor, past: KV | None, pos: int, window: int,
                            chunk: int | None, mix: Mix | None = None) -> tuple[Tensor, KV]:
    """moshi's attention on a segment: its projections and RoPE, `windowed_attention` over [past; this
    segment]. `mix(qkv, heads)` (a shared_qkv branch) may change the heads entering the output projection."""
    B, T, C = h.shape
    H = attn.num_heads
    D = C // H
    projected = attn.in_projs[0](h)
    q = projected[..., :C].view(B, T, H, D).transpose(1, 2)
    k, v = projected[..., C:].view(B, T, 2, H // attn.kv_repeat, D).permute(2, 0, 3, 1, 4)
    if attn.rope is not None:
        q, k = attn.rope(q, k, torch.full((B,), pos, device=h.device, dtype=torch.long), time_before_heads=False)
    if attn.kv_repeat > 1:
        k, v = expand_repeated_kv(k, attn.kv_repeat), expand_repeated_kv(v, attn.kv_repeat)
    out, kv = windowed_attention(q, k, v, window, past, chunk)
    heads = out.transpose(1, 2).reshape(B, T, C)
    return attn.out_projs[0](heads if mix is None else mix(projected, heads)), kv


def layer_segment(layer: nn.Module, x: Tensor, past: KV | None, memory: LayerState | None, pos: int, window: int,
                  chunk: int | None) -> tuple[Tensor, KV | None, LayerState | None]:
    """One layer (hybrid or plain) on one segment: output, and the keys/values and branch state it leaves."""
    kv: KV | None = None

    def attend(h: Tensor, mix: Mix | None) -> Tensor:
        nonlocal kv
        out, kv = windowed_self_attention(layer.self_attn, h, past, pos, window, chunk, mix)
        return out

    def remember(h: Tensor, **host: Tensor) -> Tensor:
        nonlocal memory
        y, memory = layer.memory(h, memory, **host)
        return y

    return feed_forward_block(layer, residual_block(layer, x, attend, remember), remember), kv, memory


class SegmentRunner:
    """The temporal transformer of `lm` over one long input, a segment per call, every layer starting from the
    keys/values and memory state its previous segment left (the training path, without gradients).

    `layers_at(pos)` is the `layers` argument of `forward_segment` / `logits` for the segment at `pos`;
    `forget_memory()` restarts every memory branch's state before the next segment, attention keeping its
    window: the memory-reset control of the copy probes (issue 24), as `layer.reset_memories` does while streaming.
    """

    def __init__(self, lm: LMModel, window: int) -> None:
        self.window = window
        self.layers = list(lm.transformer.layers)
        self.carry: list[tuple[KV | None, LayerState | None]] = [(None, None)] * len(self.layers)

    def layers_at(self, pos: int) -> Layers:
        def run(x: Tensor) -> Tensor:
            for i, layer in enumerate(self.layers):
                x, *self.carry[i] = layer_segment(layer, x, *self.carry[i], pos, self.window, None)
            return x

        return run

    def forget_memory(self) -> None:
        self.carry = [(kv, None) for kv, _ in self.carry]
