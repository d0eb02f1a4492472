"""Per-stream sampling: a session's tokens depend on its own seed, never on its batch neighbours.

moshi's `LMGen` samples every stream of a batch from torch's one global generator, so in a server
that batches sessions a session's tokens would depend on who else is connected, and a suspended
conversation could never be replayed exactly. Here each stream draws its Gumbel noise from a hash
of (seed, frame offset, codebook, token id): reproducible from the seed alone, no generator state
beyond the LMGen frame offsets already in the streaming state, and plain tensor arithmetic (so it
can sit inside moshi's CUDA graphs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from moshi.models.lm import LMModel
from torch import Tensor

from ttt_speech.moshi.compat import HookedLMGen, LMGenState, streaming_state

_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31: a 32-bit value times one stays below 2**63, so int64 never overflows.
_MUL1, _MUL2 = 0x7FEB352D, 0x4A6D9B35
_GOLDEN = 0x1E3779B9


def mix32(x: Tensor) -> Tensor:
    """An avalanche hash of int64 tensors holding 32-bit values (xorshift-multiply rounds)."""
    x = x & _MASK32
    x = ((x ^ (x >> 16)) * _MUL1) & _MASK32
    x = ((x ^ (x >> 15)) * _MUL2) & _MASK32
    return x ^ (x >> 16)


def stream_uniform(seed: Tensor, offset: Tensor, stream: int, n: int) -> Tensor:
    """Uniform noise in (0, 1), [B, n] float32, a pure function of (seed[b], offset[b], stream, index)."""
    key = mix32(mix32(seed) ^ (seed >> 32))
    key = mix32(key ^ offset)
    key = mix32(key ^ (stream * _GOLDEN))
    idx = torch.arange(n, device=seed.device, dtype=torch.int64) * _GOLDEN
    bits = mix32(key[:, None] ^ idx) >> 8  # 24 bits: exact in float32
    return (bits.to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def sample(logits: Tensor, temp: float, top_k: int, seed: Tensor, offset: Tensor, stream: int) -> Tensor:
    """Top-k sampling at temperature `temp` from logits [B, V] by the Gumbel-max trick; [B] long.

    The same distribution as moshi's `sample_token` (softmax(logits / temp) restricted to the top k);
    temp <= 0 is greedy.
    """
    if temp <= 0.0:
        return logits.argmax(dim=-1)
    x = logits.float() / temp
    if 0 < top_k < x.shape[-1]:
        kth = x.topk(top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    gumbel = -torch.log(-torch.log(stream_uniform(seed, offset, stream, x.shape[-1])))
    return (x + gumbel).argmax(dim=-1)


@dataclass(frozen=True)
class SamplingConfig:
    """moshi's sampling defaults (LMGen and moshi.server)."""

    temp: float = 0.8
    temp_text: float = 0.7
    top_k: int = 250
    top_k_text: int = 25
    greedy: bool = False


class SeededLMGen(HookedLMGen):
    """`LMGen` whose streams sample with `sample` from per-stream seeds.

    LMGen has no per-stream generator, so: its own sampling is set to argmax; the text-logits hook
    replaces the logits by a one-hot of this stream's sample (LMGen's argmax then picks it); and
    `depformer_step` samples the audio codebooks the same way. The seeds live in the LMGen streaming
    state (`state.seeds`, [B] int64) beside the offsets, so they are saved and restored with it.
    Out-of-sync streams are on: each stream has its own offset, and rows still inside the acoustic
    delay come back as `ungenerated_token_id`.
    """

    def __init__(self, lm_model: LMModel, sampling: SamplingConfig = SamplingConfig()) -> None:
        super().__init__(lm_model, use_sampling=False, temp=sampling.temp, temp_text=sampling.temp_text,
                         top_k=sampling.top_k, top_k_text=sampling.top_k_text, support_out_of_sync=True,
                         on_text_logits_hook=self._sample_text)
        self.greedy = sampling.greedy
        self._frame: Tensor | None = None  # static copy of the offsets: LMGen rebinds state.offsets

    def extend_streaming_state(self, state: LMGenState, batch_size: int) -> None:
        state.seeds = torch.zeros(batch_size, dtype=torch.long, device=self.lm_model.device)  # type: ignore[attr-defined]
        self._frame = torch.zeros(batch_size, dtype=torch.long, device=self.lm_model.device)

    def _noise_key(self) -> tuple[Tensor, Tensor]:
        state = streaming_state(self)
        assert state is not None and self._frame is not None
        return state.seeds, self._frame  # type: ignore[attr-defined]

    def _sample_text(self, text_logits: Tensor) -> None:
        """LMGen's text-logits hook: text_logits [B, 1, 1, V] becomes a one-hot (0 / -inf) of our sample."""
        state = streaming_state(self)
        assert state is not None and self._frame is not None
        self._frame.copy_(state.offsets)
        if self.greedy:
            return
        seed, frame = self._noise_key()
        token = sample(text_logits[:, 0, 0], self.temp_text, self.top_k_text, seed, frame, 0)
        onehot = torch.full_like(text_logits, float("-inf"))
        text_logits.copy_(onehot.scatter_(-1, token.view(-1, 1, 1, 1), 0.0))

    def depformer_step(self, text_token: Tensor, transformer_out: Tensor) -> Tensor:
        """The audio codebooks one after the other, each conditioned on the previous token; [B, dep_q]."""
        lm = self.lm_model
        assert lm.depformer is not None
        seed, frame = self._noise_key()
        temp = 0.0 if self.greedy else self.temp
        prev, tokens = text_token, []
        with lm.depformer.streaming(text_token.shape[0]):
            for cb in range(lm.dep_q):
                logits = lm.forward_depformer(cb, prev[:, None, None], transformer_out)[:, 0, 0]
                prev = sample(logits, temp, self.top_k, seed, frame, 1 + cb)
                tokens.append(prev)
        return torch.stack(tokens, dim=1)
