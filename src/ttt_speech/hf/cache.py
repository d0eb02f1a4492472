"""`MemoryCache`: the bounded memory of a converted model during `generate`.

It is transformers' own `DynamicCache` built from the converted config, so every attention layer
gets a `DynamicSlidingWindowLayer` that keeps `attention_window - 1` past keys/values, plus one
`TTTState` per TTT layer. Replaced layers (mode="replace") have no attention, so their KV slot is a
`DummyLayer`. Both parts have a size fixed by the batch size and the window, never by how long a
stream has run.

`generate` builds a plain `DynamicCache`; the converted model's forward hook adopts it (the same
object becomes a `MemoryCache`), so `generate` keeps working without any extra argument.
"""

from __future__ import annotations

import typing as tp

import torch
from transformers import Cache, DynamicCache, PreTrainedConfig
from transformers.cache_utils import DummyLayer, DynamicSlidingWindowLayer

from ttt_speech.compat import retype
from ttt_speech.hf.section import MemorySection, section_of
from ttt_speech.layers.state import TTTState
from ttt_speech.layers.ttt import TTTLayer


def _section(config: PreTrainedConfig) -> MemorySection:
    section = section_of(config)
    if section is None:
        raise ValueError("MemoryCache needs the config of a model converted with ttt_speech.hf.convert")
    return section


class MemoryCache(DynamicCache):
    """Sliding-window KV cache + the memory states of a converted model (`MemoryCache(model.config)`)."""

    attention_window: int
    memory_states: dict[int, TTTState]

    def __init__(self, config: PreTrainedConfig) -> None:
        super().__init__(config=config)
        self._attach(_section(config))

    def _attach(self, section: MemorySection) -> None:
        self.attention_window = section.attention_window
        self.memory_states = {}
        if section.mode == "replace":
            for i in section.layers:
                self.layers[i] = DummyLayer()

    @classmethod
    def adopt(cls, cache: Cache, config: PreTrainedConfig) -> MemoryCache:
        """Turn a fresh `DynamicCache` (e.g. the one `generate` made) into a `MemoryCache`, in place.

        In place, because `generate` keeps its own reference to the object. Refused for other cache
        classes (static caches, quantized, ...) and for a cache already holding tokens without memory
        states: continuing from it would silently start the memory layers from scratch.
        """
        if isinstance(cache, MemoryCache):
            return cache
        section = _section(config)
        if type(cache) is not DynamicCache:
            raise TypeError(
                f"converted models run with a MemoryCache (or a fresh DynamicCache); got {type(cache).__name__}"
            )
        if cache.get_seq_length() > 0:
            raise ValueError("this DynamicCache already holds tokens but no TTT state; start from a new MemoryCache")
        fresh = MemoryCache(config)
        cache = retype(cache, MemoryCache)
        cache.layers = fresh.layers
        cache.layer_class_to_replicate = None
        cache._attach(section)
        return cache

    def memory_state(self, layer_idx: int, layer: TTTLayer, batch_size: int, device: torch.device) -> TTTState:
        """The state of memory layer `layer_idx`, created from the layer's initial weights on first use."""
        state = self.memory_states.get(layer_idx)
        if state is None:
            state = self.memory_states[layer_idx] = layer.init_state(batch_size, device)
        elif state.batch_size != batch_size:
            raise ValueError(f"memory state of layer {layer_idx} holds {state.batch_size} streams, input has {batch_size}")
        return state

    @property
    def kv_nbytes(self) -> int:
        """Bytes of storage behind the cached keys/values (what the allocator holds, not just the views)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, DynamicSlidingWindowLayer) and layer.is_initialized:
                total += layer.keys.untyped_storage().nbytes() + layer.values.untyped_storage().nbytes()
        return total

    @property
    def memory_nbytes(self) -> int:
        return sum(s.nbytes for s in self.memory_states.values())

    @property
    def nbytes(self) -> int:
        return self.kv_nbytes + self.memory_nbytes

    def reset(self) -> None:
        super().reset()
        self.memory_states.clear()

    def _reindex_states(self, pick: tp.Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a batch re-indexing (beam reorder, expansion, selection) to every TTT state's streams."""
        for i, state in self.memory_states.items():
            self.memory_states[i] = state.replace(**{name: pick(state[name]) for name in state})

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: each beam continues from the state of the beam it was chosen from."""
        super().reorder_cache(beam_idx)
        self._reindex_states(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._reindex_states(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._reindex_states(lambda t: t[indices.to(t.device)])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "MemoryCache cannot crop (assisted/speculative decoding): a TTT state has no history to roll back to; "
            "use greedy, sampling or beam search")
