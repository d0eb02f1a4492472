"""The `memory` section a converted model carries in its config (and so in `config.json`; `ttt` before issue 20).

It is the single source of truth for what `convert` did: the cache, the forward hook and the loader
all read it, so a model rebuilt from a directory behaves exactly like the one that was saved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from transformers import PreTrainedConfig

from ttt_speech.config import InPlaceConfig, TTTConfig
from ttt_speech.names import LEGACY, MEMORY, memory_section

SECTION_FORMAT = "ttt-speech/hf"
SECTION_VERSION = 1

Mode = Literal["hybrid", "replace"]
# the section's "branch" -> its config class; a section written before the field existed is TTT
BRANCHES: dict[str, type] = {"ttt": TTTConfig, "inplace": InPlaceConfig}


@dataclass(frozen=True)
class MemorySection:
    """What a conversion did to a transformers causal LM."""

    mode: Mode
    layers: tuple[int, ...]
    attention_window: int
    memory: TTTConfig | InPlaceConfig  # InPlaceConfig: the layers' MLPs get in-place fast weights
    llm_model_type: str  # transformers model_type of the language model (e.g. "llama" under LLaMA-Omni)

    @property
    def branch(self) -> str:
        return next(name for name, cls in BRANCHES.items() if isinstance(self.memory, cls))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SECTION_FORMAT,
            "version": SECTION_VERSION,
            "branch": self.branch,
            "mode": self.mode,
            "layers": list(self.layers),
            "attention_window": self.attention_window,
            "llm_model_type": self.llm_model_type,
            "config": self.memory.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MemorySection:
        if d.get("format") != SECTION_FORMAT:
            raise ValueError(f"config '{MEMORY}' section: expected format {SECTION_FORMAT!r}, got {d.get('format')!r}")
        if d.get("version") != SECTION_VERSION:
            raise ValueError(
                f"config '{MEMORY}' section: version {d.get('version')!r}, this library reads version {SECTION_VERSION}"
            )
        branch = d.get("branch", "ttt")
        if branch not in BRANCHES:
            raise ValueError(f"config '{MEMORY}' section: branch must be one of {tuple(BRANCHES)}, got {branch!r}")
        return cls(
            mode=d["mode"],
            layers=tuple(int(i) for i in d["layers"]),
            attention_window=int(d["attention_window"]),
            memory=BRANCHES[branch].from_dict(d["config"]),
            llm_model_type=d["llm_model_type"],
        )


def section_of(config: PreTrainedConfig) -> MemorySection | None:
    """The section of a converted model's config, or None for a model that was never converted.

    It lives on the language model's config: the config itself for a causal LM, its `text_config`
    for a model with an audio tower (Qwen2-Audio); either may be passed.
    """
    text = config.get_text_config(decoder=True)
    d = memory_section({name: getattr(text, name) for name in (MEMORY, LEGACY) if hasattr(text, name)})
    return None if d is None else MemorySection.from_dict(d)
