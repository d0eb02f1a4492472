"""Where each supported transformers architecture keeps the decoder stack that gets TTT layers.

One row per model_type, so a new architecture is a new row, not new code. A causal LM keeps its
decoder layers at `model.model.layers`; a speech-in/text-out model such as Qwen2-Audio keeps a whole
language model beside its audio tower (`model.model.language_model`) and that language model's
config under `text_config`. Every supported decoder layer keeps its attention at `self_attn`, the
one module a conversion changes: audio towers, projectors and MoE MLPs are never touched, and the
`ttt` section goes on the decoder's own config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import transformers
from torch import nn
from transformers import CONFIG_MAPPING, PreTrainedConfig


@dataclass(frozen=True)
class Layout:
    """How to find the language model inside one architecture."""

    decoder: str  # attribute path from the top model to the decoder stack (the module with `.layers`)
    config_key: str | None = None  # key of that decoder's config inside config.json (None: the top level)
    model_class: str = "AutoModelForCausalLM"  # transformers class `convert.load` builds from a directory


CAUSAL_LM = Layout("model")
LAYOUTS: dict[str, Layout] = {
    "llama": CAUSAL_LM,  # Llama-3.1 (LLaMA-Omni), Llama-2 with speech tokens (Spirit-LM)
    "qwen2": CAUSAL_LM,  # Qwen2 / Qwen2.5 (Mini-Omni, LLaMA-Omni2, VITA-1.5)
    "mixtral": CAUSAL_LM,  # Mixtral 8x7B sparse MoE (VITA)
    "qwen2_audio": Layout("model.language_model", "text_config", "Qwen2AudioForConditionalGeneration"),
}


def config_model_type(config: PreTrainedConfig) -> str:
    """The transformers model_type behind a config, also for subclasses with their own (LLaMA-Omni's)."""
    for cls in type(config).__mro__:
        model_type = getattr(cls, "model_type", "")
        if model_type in CONFIG_MAPPING:
            return model_type
    raise ValueError(f"{type(config).__name__} does not derive from a transformers config class")


def layout_of(config: PreTrainedConfig) -> Layout:
    """The layout of a model's architecture; other decoder LMs (Mistral, ...) are tried as plain causal LMs."""
    return LAYOUTS.get(config_model_type(config), CAUSAL_LM)


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack of `model` (a module with `.layers` and its own `.config`)."""
    config = getattr(model, "config", None)
    layout = layout_of(config) if isinstance(config, PreTrainedConfig) else CAUSAL_LM
    base: Any = model
    for name in layout.decoder.split("."):
        base = getattr(base, name, None)
    if base is None or not isinstance(getattr(base, "layers", None), nn.ModuleList):
        raise TypeError(
            f"{type(model).__name__}: expected decoder layers at `model.{layout.decoder}.layers` "
            f"(supported: {', '.join(LAYOUTS)} and their subclasses, such as LLaMA-Omni's and VITA's)"
        )
    return base


def decoder_config_dict(cfg: dict[str, Any]) -> dict[str, Any]:
    """The decoder's part of a config.json: the whole dict, or its `text_config` for Qwen2-Audio."""
    layout = LAYOUTS.get(cfg.get("model_type", ""), CAUSAL_LM)
    return cfg if layout.config_key is None else cfg[layout.config_key]


def model_class(model_type: str) -> type:
    """The transformers class that builds a whole model of this type from a directory."""
    return getattr(transformers, LAYOUTS.get(model_type, CAUSAL_LM).model_class)
