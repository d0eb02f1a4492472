"""The one door into moshi's private attributes (moshi 0.2.13).

moshi keeps several things we need behind underscores: the per-layer streaming state class, the
streaming state itself, the cache of streaming children, the delay helper, Mimi's latent encoder,
the default Mimi config. Every such access in ttt_speech goes through a name defined here, so a moshi
release that renames one breaks here, and `tests/test_compat.py` (one test per private) says which.
No other module may touch a moshi object's `_private` (a test greps the source for it).
"""

from __future__ import annotations

import contextlib
import copy
import typing as tp

import torch
from moshi.models.compression import MimiModel
from moshi.models.lm import LMGen, LMModel, _LMGenState
from moshi.models.lm_utils import _delay_sequence
from moshi.models.loaders import _lm_kwargs, _mimi_config
from moshi.modules.gating import _get_activation
from moshi.modules.streaming import StreamingModule
from moshi.modules.transformer import StreamingMultiheadAttention, StreamingTransformerLayer, _LayerState
from moshi.quantization.core_vq import EuclideanCodebook
from torch import Tensor, nn

# moshi's per-layer streaming state (KV cache offsets, exec mask): the base of a hybrid layer's state.
LayerStreamingState = _LayerState
# LMGen's streaming state (offsets, the delayed-token cache): extended by seeded sampling.
LMGenState = _LMGenState


class HookedTransformerLayer(StreamingTransformerLayer):
    """moshi's transformer layer with its two private hooks under public names.

    moshi's layer runs `_sa_block` and `_ff_block` (the attention and feed-forward halves of the
    residual block) and makes its streaming state with `_init_streaming_state`; a subclass overrides
    `attention_block`, `feed_forward_block` and `init_streaming_state` instead.
    """

    def attention_block(self, x: Tensor) -> Tensor:
        return super()._sa_block(x)

    def feed_forward_block(self, x: Tensor) -> Tensor:
        return super()._ff_block(x)

    def _ff_block(self, x: Tensor) -> Tensor:
        return self.feed_forward_block(x)

    def init_streaming_state(self, batch_size: int) -> _LayerState:
        return super()._init_streaming_state(batch_size)

    def _sa_block(self, x: Tensor) -> Tensor:
        return self.attention_block(x)

    def _init_streaming_state(self, batch_size: int) -> _LayerState:
        return self.init_streaming_state(batch_size)


class HookedLMGen(LMGen):
    """moshi's `LMGen` whose private state factory is public: `extend_streaming_state` adds fields."""

    def extend_streaming_state(self, state: _LMGenState, batch_size: int) -> None:
        """Called with each new streaming state; adds nothing by default."""

    def _init_streaming_state(self, batch_size: int) -> _LMGenState:
        state = super()._init_streaming_state(batch_size)
        self.extend_streaming_state(state, batch_size)
        return state


def feed_forward(layer: StreamingTransformerLayer, x: Tensor) -> Tensor:
    """The feed-forward half of a layer's residual block (norm2, gating or MLP, layer scale, residual)."""
    return layer._ff_block(x)


@contextlib.contextmanager
def temporal_transformer(lm: LMModel, stand_in: nn.Module) -> tp.Iterator[None]:
    """Inside the block `lm.transformer` is `stand_in`, so `lm.forward_text` (embeddings, then
    `self.transformer(x)`, then `out_norm` and the text head) runs another stack of layers.

    moshi's forward_text calls its transformer by attribute; a release that stops doing so would
    silently run the real layers, so the block raises when the stand-in was never called.
    """
    own = lm.transformer
    calls: list[None] = []
    hook = stand_in.register_forward_pre_hook(lambda module, args: calls.append(None))
    lm.transformer = stand_in
    try:
        yield
    finally:
        lm.transformer = own
        hook.remove()
    if not calls:
        raise RuntimeError("LMModel.forward_text did not call lm.transformer: this moshi release composes its "
                           "forward another way; ttt_speech.moshi.compat.temporal_transformer needs updating")


def streaming_state(module: StreamingModule) -> tp.Any:
    """The module's own streaming state (None outside `with module.streaming(B)`)."""
    return module._streaming_state


def forget_streaming_children(model: StreamingModule) -> None:
    """Drop moshi's cache of each module's streaming children: needed after modules were swapped in."""
    for m in model.modules():
        if isinstance(m, StreamingModule):
            m._cached_children = None


def delay_sequence(delays: list[int], codes: Tensor, initial: Tensor) -> Tensor:
    """codes [B, K, T] with stream k shifted right by delays[k], the gap filled with `initial` [B, K, 1]."""
    return _delay_sequence(delays, codes, initial)


def initial_token(lm: LMModel) -> Tensor:
    """The token column [1, K, 1] that precedes a sequence (text initial id, then audio initial ids)."""
    return lm._get_initial_token()


def activation(name: str) -> tp.Callable[[Tensor], Tensor]:
    """The activation function moshi's gating builds from a config name."""
    return _get_activation(name)


def default_lm_config() -> dict[str, tp.Any]:
    """A copy of the released Moshi-7B LM's config dict (`get_moshi_lm`'s lm_kwargs: the benchmarks' shape)."""
    return copy.deepcopy(_lm_kwargs)


def default_mimi_config() -> dict[str, tp.Any]:
    """A copy of the released Mimi's config dict (seanet / quantizer / transformer)."""
    return copy.deepcopy(_mimi_config)


def encode_latent(mimi: MimiModel, x: Tensor) -> Tensor:
    """Mimi's encoder up to the quantizer: audio [B, 1, T] -> unquantized latent at the encoder rate."""
    return mimi._encode_to_unquantized_latent(x)


def to_encoder_framerate(mimi: MimiModel, x: Tensor) -> Tensor:
    """The quantizer's output, upsampled back to the encoder's frame rate (the decoder's input)."""
    return mimi._to_encoder_framerate(x)


def schedule_dead_code_check(codebook: EuclideanCodebook, forwards: int) -> None:
    """Make the codebook check for dead codes after `forwards` more training forwards (1: this one)."""
    codebook._next_unused_check = forwards


@contextlib.contextmanager
def kv_caches_follow_autocast(model: nn.Module) -> tp.Iterator[None]:
    """Within, each moshi attention of `model` that starts streaming under autocast makes its ring KV cache in
    the autocast dtype. moshi makes it in the dtype of the attention's weights (`_init_streaming_state`),
    but under autocast the keys and values it writes come out of the projection in the autocast dtype:
    float32 weights under bf16 autocast fail in the cache's `scatter_` ("Expected self.dtype to be equal
    to src.dtype"). The depformer starts streaming anew every step, so the states are made right, not
    cast once."""
    attns = [m for m in model.modules() if isinstance(m, StreamingMultiheadAttention)]

    def follow(make: tp.Callable[[int], tp.Any]) -> tp.Callable[[int], tp.Any]:
        def init(batch_size: int) -> tp.Any:
            state = make(batch_size)
            kv = state.kv_cache
            if kv is not None and torch.is_autocast_enabled(kv.cache.device.type) and kv.cache.is_floating_point():
                kv.cache = kv.cache.to(torch.get_autocast_dtype(kv.cache.device.type))
            return state
        return init

    for m in attns:
        m._init_streaming_state = follow(m._init_streaming_state)
    try:
        yield
    finally:
        for m in attns:
            del m._init_streaming_state


def force_text_token(gen: LMGen, token: int | Tensor) -> None:
    """Overwrite the text token LMGen just sampled for the current frame with `token` (one for every stream,
    or one per stream [B])."""
    state = gen._streaming_state
    assert state is not None, "force_text_token needs LMGen in streaming mode"
    streams = torch.arange(state.cache.shape[0], device=state.cache.device)
    state.cache[streams, 0, state.offsets % state.cache.shape[-1]] = torch.as_tensor(token).to(state.cache)
