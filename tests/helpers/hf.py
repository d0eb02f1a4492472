"""Tiny Llama/Qwen2 models built from config (GQA: 4 query heads, 2 KV heads), never downloaded; a cache-bytes probe."""

import pytest
import torch
from torch import nn

pytest.importorskip("transformers", minversion="5.23")  # pyproject's hf extra

from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from ttt_speech import TTTConfig  # noqa: E402
from ttt_speech.hf import MemoryCache  # noqa: E402
from ttt_speech.hf.layouts import decoder_of  # noqa: E402

VOCAB, HIDDEN, HEADS, KV_HEADS = 97, 64, 4, 2
FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def tiny_config(family: str = "llama", layers: int = 3, attn: str = "sdpa", **extra):
    config_cls, _ = FAMILIES[family]
    return config_cls(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=1024,
        attn_implementation=attn, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra,
    )


def tiny_model(family: str = "llama", seed: int = 0, **kw):
    torch.manual_seed(seed)
    return FAMILIES[family][1](tiny_config(family, **kw)).eval()


def ttt_config(gate: float = 0.0, mini_batch: int = 4, **kw) -> TTTConfig:
    return TTTConfig(dim=HIDDEN, num_heads=HEADS, mini_batch=mini_batch, gate_init=gate, **kw)


def ttt_modules(model) -> list[nn.Module]:
    return [layer.self_attn.memory for layer in decoder_of(model).layers if hasattr(layer.self_attn, "memory")]


@torch.no_grad()
def perturb_ttt(model, seed: int = 1, scale: float = 0.3) -> None:
    """Move every TTT parameter off its init so the TTT branch changes the logits by a lot."""
    g = torch.Generator().manual_seed(seed)
    for module in ttt_modules(model):
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


class BytesProbe(LogitsProcessor):
    """Records (sequence length, cache bytes) at every decoding step."""

    def __init__(self, cache) -> None:
        self.cache, self.rows = cache, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        nbytes = self.cache.nbytes if isinstance(self.cache, MemoryCache) else sum(
            layer.keys.untyped_storage().nbytes() * 2 for layer in self.cache.layers)
        self.rows.append((input_ids.shape[1], nbytes))
        return scores
