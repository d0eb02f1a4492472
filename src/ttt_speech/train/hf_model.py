"""Training forward of a transformers Llama/Qwen2 TTT hybrid, one segment at a time.

The converted model's own forward windows attention through a dense [T, T] sliding-window mask;
this runs the same decoder-layer modules with `windowed_attention` and carries the TTT states and
the last window - 1 keys/values across segments. Data are flat token streams; the loss is
next-token cross-entropy (PAD = -1 positions carry no loss).
"""

from __future__ import annotations

import sys
import typing as tp

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from ttt_speech import TTTConfig
from ttt_speech.hf import convert
from ttt_speech.hf.modules import TTTAttention
from ttt_speech.hf.section import section_of
from ttt_speech.train.attention import windowed_attention
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
        model = tp.cast(PreTrainedModel, convert.load(cfg.hybrid, dtype=dtype))
        return model.to(device)
    if cfg.tiny:
        model = tiny_llama(cfg.seed).to(dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(cfg.pretrained, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device)
    if cfg.layers == []:
        return model
    n = model.config.num_hidden_layers
    layers = range(n) if cfg.layers == "all" else [i % n for i in tp.cast(list, cfg.layers)]
    ttt = TTTConfig(**({"dim": model.config.hidden_size, "num_heads": model.config.num_attention_heads} | cfg.ttt))
    torch.manual_seed(cfg.seed)  # the new TTT layers' initialisation
    return convert(model, layers, tp.cast(tp.Any, cfg.mode), ttt,
                   attention_window=window or getattr(model.config, "sliding_window", None) or DEFAULT_WINDOW)


def _rope_functions(attn: nn.Module) -> tuple[tp.Callable, tp.Callable]:
    """apply_rotary_pos_emb and repeat_kv of the transformers model file the attention class comes from."""
    for cls in type(attn).__mro__:
        module = sys.modules.get(cls.__module__)
        if module is not None and hasattr(module, "apply_rotary_pos_emb") and hasattr(module, "repeat_kv"):
            return module.apply_rotary_pos_emb, module.repeat_kv
    raise TypeError(f"{type(attn).__name__}: not a Llama/Qwen2-style attention (no apply_rotary_pos_emb/repeat_kv)")


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

    def ttt_layer_count(self) -> int:
        return sum(hasattr(layer.self_attn, "ttt") for layer in self.layers())

    def prepare(self, codes: Tensor) -> Batch:
        codes = codes.view(codes.shape[0], 1, -1)
        top, vocab = int(codes.max()), self.model.config.vocab_size
        if top >= vocab:
            raise ValueError(f"data has token {top}; this model's vocabulary has {vocab} entries")
        return Batch(codes.clamp_min(0), (codes[:, :, 1:] >= 0).float())

    def embed(self, inputs: Tensor, pos: int) -> Tensor:
        return self.model.model.embed_tokens(inputs[:, 0])

    def layer_forward(self, layer: nn.Module, x: Tensor, carry: LayerCarry, pos: int) -> tuple[Tensor, LayerCarry]:
        """A Llama/Qwen2 decoder layer whose self_attn is hybrid (attention + ttt) or a TTTAttention."""
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        new = LayerCarry()
        if isinstance(attn, TTTAttention):
            out, new.ttt = attn.ttt(h, carry.ttt)
        else:
            B, T, _ = h.shape
            rotate, repeat_kv = _rope_functions(attn)
            q, k, v = (proj(h).view(B, T, -1, attn.head_dim).transpose(1, 2)
                       for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
            positions = pos + torch.arange(T, device=h.device).view(1, T)
            cos, sin = self.model.model.rotary_emb(h, positions)
            q, k = rotate(q, k, cos, sin)
            groups = attn.num_key_value_groups
            o, new.kv = windowed_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), self.window, carry.kv,
                                           self.chunk, scale=attn.scaling)
            out = attn.o_proj(o.transpose(1, 2).reshape(B, T, -1))
            if hasattr(attn, "ttt"):
                y, new.ttt = attn.ttt(h, carry.ttt)
                out = out + y.to(out.dtype)
        x = x + out.to(x.dtype)
        return x + layer.mlp(layer.post_attention_layernorm(x)), new

    def logits(self, x: Tensor, batch: Batch) -> list[Tensor]:
        return [self.model.lm_head(self.model.model.norm(x))[:, None]]

    def export(self, out_dir: str) -> None:
        self.model.save_pretrained(out_dir)
