"""A transformers Llama/Qwen2 TTT hybrid (or plain model) wrapped for segment training.

The layer forward is the integration's (`ttt_speech.hf.segments`: the branch composed with attention
by `hybrid_attention`, windowed attention, the TTT states and the last window - 1 keys/values carried
across segments). Data are flat token streams; the loss is next-token cross-entropy (PAD = -1
positions carry no loss).
"""

from __future__ import annotations

import typing as tp
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from ttt_speech.config import TTTConfig
from ttt_speech.hf import convert, default_inplace_config
from ttt_speech.hf.checkpoint import check_llm_dir
from ttt_speech.hf.section import section_of
from ttt_speech.hf.segments import layer_segment
from ttt_speech.names import MEMORY
from ttt_speech.train.config import ModelConfig
from ttt_speech.train.model import Batch, LayerCarry, SegmentLM

DEFAULT_WINDOW = 4096  # hf convert's default attention window


def tiny_llama(seed: int = 0, vocab: int = 64, window: int = 8) -> LlamaForCausalLM:
    """A tiny random Llama (GQA: 4 query heads, 2 KV heads) for tests and demos; `window` sets its sliding window."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1 << 20,
                         attn_implementation="sdpa", sliding_window=window, pad_token_id=0)
    return LlamaForCausalLM(config)


def load_hf(cfg: ModelConfig, window: int | None, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    """The model `cfg` names; vanilla ones are converted with `window` as their attention window."""
    if cfg.hybrid:
        check_llm_dir(cfg.hybrid)
        model = tp.cast(PreTrainedModel, convert.load(cfg.hybrid, dtype=dtype))
        return model.to(device)
    if cfg.tiny:
        model = tiny_llama(cfg.seed).to(dtype)
    else:
        if Path(cfg.pretrained).exists() or str(cfg.pretrained).startswith(("/", ".", "~")):  # not a hub id
            check_llm_dir(tp.cast(str, cfg.pretrained))
        model = AutoModelForCausalLM.from_pretrained(cfg.pretrained, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device)
    if cfg.layers == []:
        return model
    n = model.config.num_hidden_layers
    layers = range(n) if cfg.layers == "all" else [i % n for i in tp.cast(list, cfg.layers)]
    mc = model.config
    ttt = (default_inplace_config(mc.hidden_size, mc.intermediate_size, **cfg.memory) if cfg.branch == "inplace"
           else TTTConfig(**({"dim": mc.hidden_size, "num_heads": mc.num_attention_heads} | cfg.memory)))
    torch.manual_seed(cfg.seed)  # the new TTT layers' initialisation
    return convert(model, layers, tp.cast(tp.Any, cfg.mode), ttt,
                   attention_window=window or getattr(model.config, "sliding_window", None) or DEFAULT_WINDOW)


class HFSegmentLM(SegmentLM):
    """transformers causal LM: one token stream."""

    model: PreTrainedModel
    streams = 1

    def __init__(self, model: PreTrainedModel, window: int | None, chunk: int | None, checkpointing: bool) -> None:
        section = section_of(model.config)
        own = section.attention_window if section else getattr(model.config, "sliding_window", None)
        window = window or own
        if window is None:
            raise ValueError("this model has no attention window: set train.attention_window")
        super().__init__(model, window, chunk, checkpointing)
        self.terms = {"tokens": (0, 1)}

    def layer_list(self) -> nn.ModuleList:
        return self.model.model.layers

    def memory_layer_count(self) -> int:
        return sum(hasattr(layer.self_attn, MEMORY) or hasattr(layer.mlp, MEMORY) for layer in self.layers())

    def prepare(self, codes: Tensor, scored: Tensor | None = None) -> Batch:
        codes = codes.view(codes.shape[0], 1, -1)
        top, vocab = int(codes.max()), self.model.config.vocab_size
        if top >= vocab:
            raise ValueError(f"data has token {top}; this model's vocabulary has {vocab} entries")
        valid = codes[:, :, 1:] >= 0
        if scored is not None:
            valid &= scored[:, None, 1:]
        return Batch(codes.clamp_min(0), valid.float())

    def layer_forward(self, layer: nn.Module, x: Tensor, carry: LayerCarry, pos: int) -> tuple[Tensor, LayerCarry]:
        x, kv, memory = layer_segment(self.model, layer, x, carry.kv, carry.memory, pos, self.window, self.chunk)
        return x, LayerCarry(memory, kv)

    def logits(self, batch: Batch, pos: int, layers: tp.Callable[[Tensor], Tensor]) -> list[Tensor]:
        x = layers(self.model.model.embed_tokens(batch.inputs[:, 0, :-1]))
        return [self.model.lm_head(self.model.model.norm(x))[:, None]]

    def export(self, out_dir: str) -> None:
        self.model.save_pretrained(out_dir)
