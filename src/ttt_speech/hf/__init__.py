"""Hugging Face integration: memory hybrids of transformers decoder LLMs (Llama-3.1, Qwen2/Qwen2.5, LLaMA-Omni).

    from ttt_speech.hf import convert
    model = convert(model, layers=range(24, 32), attention_window=4096)  # in-place (the default branch)
    model = convert(model, layers=range(24, 32), memory=TTTConfig(...))  # or TTT (replace mode, Mixtral)
    model.generate(ids, max_new_tokens=200_000)   # memory bounded by the window + the memory states
    model.save_pretrained("out/"); model = convert.load("out/")

The names above import transformers on first use, so `ttt-speech convert-hf --help` does not wait for it;
the installed release is checked here, at import, all the same.
"""

from __future__ import annotations

import importlib
import typing as tp

from ttt_speech.deps import require

require("transformers")  # refuses a missing or untested release (hf/compat.py reads the same check)

if tp.TYPE_CHECKING:
    from ttt_speech.hf.cache import MemoryCache
    from ttt_speech.hf.checkpoint import LoadReport, load_llm
    from ttt_speech.hf.conversion import Converter, convert, default_inplace_config
    from ttt_speech.hf.section import MemorySection

_LAZY = {"MemoryCache": "cache", "LoadReport": "checkpoint", "load_llm": "checkpoint", "Converter": "conversion",
         "convert": "conversion", "default_inplace_config": "conversion", "MemorySection": "section"}
__all__ = sorted(_LAZY)
# the class names before issue 20 (they said TTT for any branch): still importable, the same classes
_OLD_NAMES = {"TTTCache": "MemoryCache", "TTTSection": "MemorySection"}


def __getattr__(name: str) -> tp.Any:
    name = _OLD_NAMES.get(name, name)
    if name in _LAZY:
        return getattr(importlib.import_module(f"ttt_speech.hf.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'ttt_speech.hf' has no attribute {name!r}")
