"""`SegmentLM`: what the training loop drives — a model that trains on one segment of a long sequence.

A training sequence longer than fits is cut into segments. Each segment's forward starts from the
`Carry` the previous one left: per layer the TTT state and the keys/values of the last
window - 1 positions, plus the absolute position (RoPE). Between segments the carry is detached
(truncated backpropagation through time), so memory is bounded by the segment length while the
model sees exactly what one forward over the whole sequence would show it.

The families (Moshi, transformers Llama/Qwen2) differ in how one layer runs on a segment and in
the model forward around the layers (tokens to hidden states, hidden states to logits), which
`logits` runs with `SegmentLM`'s per-layer loop in place of the model's layer stack (Moshi: moshi's
own `forward_text`); `moshi_model.py` and `hf_model.py` implement those two pieces. The loss is a
weighted cross-entropy per *term* (Moshi: text and audio, each normalised by its own total weight
as moshi-finetune does); the forward returns each term's weighted sum so that the loop can
normalise by totals over all segments and all processes.
"""

from __future__ import annotations

import functools
import typing as tp
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ttt_speech.layers.state import LayerState


@dataclass
class LayerCarry:
    """What one layer hands to the next segment: its memory state and its last window - 1 keys/values."""

    memory: LayerState | None = None  # the memory branch's state (TTT, Gated DeltaNet, in-place) across segments
    kv: tuple[Tensor, Tensor] | None = None

    def detach(self) -> LayerCarry:
        return LayerCarry(None if self.memory is None else self.memory.detach(),
                          None if self.kv is None else (self.kv[0].detach(), self.kv[1].detach()))


@dataclass
class Carry:
    pos: int  # absolute position of the next segment's first step
    layers: list[LayerCarry]


@dataclass
class Batch:
    """A prepared batch of T positions: position t reads inputs[..., t] and is scored against
    targets[..., t] = inputs[:, :Kt, t + 1] with weights[..., t] (0: no loss). inputs: [B, K, T + 1]
    (Moshi's depformer also reads inputs[..., t + 1], teacher-forced); weights: [B, Kt, T].

    soft_weights [B, Kt, T] (or None): positions scored against a teacher's distribution instead, by
    KL(teacher || model) (`train.own_prefix.distill`); teacher: its logits per term for this segment, set by
    the loop right before the forward."""

    inputs: Tensor
    weights: Tensor
    soft_weights: Tensor | None = None
    teacher: list[Tensor] | None = None

    @property
    def length(self) -> int:
        return self.weights.shape[-1]

    @property
    def targets(self) -> Tensor:
        return self.inputs[:, : self.weights.shape[1], 1:]

    def segment(self, start: int, end: int) -> Batch:
        soft = None if self.soft_weights is None else self.soft_weights[..., start:end]
        return replace(self, inputs=self.inputs[..., start:end + 1], weights=self.weights[..., start:end],
                       soft_weights=soft, teacher=None)


def weighted_ce_sum(logits: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
    """sum(weights * cross_entropy): logits [..., V], targets/weights [...]; targets where weight is 0 are ignored."""
    targets = torch.where(weights > 0, targets, 0)
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (ce * weights.reshape(-1)).sum()


def weighted_kl_sum(teacher: Tensor, logits: Tensor, weights: Tensor) -> Tensor:
    """sum(weights * KL(softmax(teacher) || softmax(logits))): logits [..., V], weights [...]; only where the
    weight is > 0 (elsewhere the logits may be NaN: positions a delay leaves empty)."""
    where = weights > 0
    t = F.log_softmax(teacher[where].float(), -1)
    kl = (t.exp() * (t - F.log_softmax(logits[where].float(), -1))).sum(-1)
    return (kl * weights[where]).sum()


class SegmentLM(nn.Module):
    """Base of the family adapters. Holds the integration's model as `self.model`."""

    # name -> rows [start, end) of Batch.targets that the term's loss covers
    terms: dict[str, tuple[int, int]]
    # token rows per time step the data must have (Moshi: text + audio codebooks; LLMs: 1)
    streams: int

    def __init__(self, model: nn.Module, window: int, chunk: int | None, checkpointing: bool) -> None:
        super().__init__()
        self.model = model
        self.window = window
        self.chunk = chunk
        self.checkpointing = checkpointing
        # plain lists, not registered: the layers stay where the model has them (same state-dict names);
        # `steps[i]` runs layer i on a segment, and is what FSDP2 wraps (see parallel.py)
        self._layers: list[nn.Module] = list(self.layer_list())
        self.steps: list[tp.Callable[..., tuple[Tensor, LayerCarry]]] = [
            functools.partial(self._step, layer) for layer in self._layers]

    def layers(self) -> list[nn.Module]:
        """The sequence layers, in order: units of gradient checkpointing and FSDP sharding."""
        return self._layers

    # -- what a family provides ------------------------------------------------------------------
    def layer_list(self) -> nn.ModuleList:
        """The model's container of sequence layers."""
        raise NotImplementedError

    def prepare(self, codes: Tensor, scored: Tensor | None = None) -> Batch:
        """Tokens [B, K, L] from the data (-1 = nothing there) -> inputs and loss weights. `scored` [B, L]
        (bool): the frames that are targets (None: all); the others are context only (own samples,
        `train.own_prefix`)."""
        raise NotImplementedError

    def layer_forward(self, layer: nn.Module, x: Tensor, carry: LayerCarry, pos: int) -> tuple[Tensor, LayerCarry]:
        raise NotImplementedError

    def logits(self, batch: Batch, pos: int, layers: tp.Callable[[Tensor], Tensor]) -> list[Tensor]:
        """One logits tensor per term [B, rows of the term, T, V] for the segment `batch` starting at
        absolute position `pos`: the model's own forward, with `layers` (hidden states [B, T, dim] in
        and out) standing in for its loop over the sequence layers."""
        raise NotImplementedError

    def memory_layer_count(self) -> int:
        raise NotImplementedError

    def export(self, out_dir: str) -> None:
        """Write an inference checkpoint in the integration's own format."""
        raise NotImplementedError

    # -- the shared training forward -------------------------------------------------------------
    def _step(self, layer: nn.Module, x: Tensor, carry: LayerCarry, pos: int) -> tuple[Tensor, LayerCarry]:
        """One layer on one segment; the carry it hands on is detached (truncated BPTT between segments)."""
        if self.checkpointing and torch.is_grad_enabled():
            x, carry = checkpoint(self.layer_forward, layer, x, carry, pos, use_reentrant=False)
        else:
            x, carry = self.layer_forward(layer, x, carry, pos)
        return x, carry.detach()

    def segment_logits(self, batch: Batch, carry: Carry | None = None) -> tuple[list[Tensor], Carry]:
        """The logits per term for this segment, and the carry for the next one."""
        carry = carry or Carry(0, [LayerCarry() for _ in self.layers()])
        start = carry.pos
        new: list[LayerCarry] = []

        def layers(x: Tensor) -> Tensor:
            for step, c in zip(self.steps, carry.layers):
                x, c = step(x, c, start)
                new.append(c)
            return x

        logits = self.logits(batch, start, layers)
        if len(new) != len(carry.layers):
            raise RuntimeError(f"{type(self).__name__}.logits ran {len(new)} of {len(carry.layers)} layers")
        return logits, Carry(start + batch.length, new)

    def forward(self, batch: Batch, carry: Carry | None = None) -> tuple[Tensor, Carry]:
        """Weighted loss sums per term [len(terms)] for this segment, and the carry for the next one."""
        logits, carry = self.segment_logits(batch, carry)
        targets = batch.targets
        sums = [weighted_ce_sum(term, targets[:, a:b], batch.weights[:, a:b])
                for term, (a, b) in zip(logits, self.terms.values())]
        if batch.teacher is not None and batch.soft_weights is not None:
            sums = [s + weighted_kl_sum(t, term, batch.soft_weights[:, a:b])
                    for s, t, term, (a, b) in zip(sums, batch.teacher, logits, self.terms.values())]
        return torch.stack(sums), carry

    def term_weights(self, batch: Batch) -> Tensor:
        """Total loss weight of each term in `batch` [len(terms)] (the normalisers), soft targets included."""
        weights = batch.weights if batch.soft_weights is None else batch.weights + batch.soft_weights
        return torch.stack([weights[:, a:b].sum() for a, b in self.terms.values()]).float()

