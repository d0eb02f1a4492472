"""Moshi integration: memory hybrids of a pretrained Moshi that stream in constant memory.

    from ttt_speech.moshi import convert, load_hybrid
    hybrid = convert(lm, layers=range(28, 32))  # in-place (the default branch); memory=TTTConfig(...) for TTT
    hybrid.save_pretrained("out/")
    gen = LMGen(load_hybrid("out/"))

The names above import moshi on first use (install it with `pip install --no-deps moshi==0.2.13`);
importing the package alone stays cheap, so `ttt-speech generate --help` does not wait for torch.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
import typing as tp

from ttt_speech.deps import require

require("moshi")  # installed with --no-deps, so pip never checked it: we subclass and patch its internals


def _no_cuda() -> bool:
    """True when this process cannot use CUDA: the exact answer once torch is imported, else (so that
    importing this package does not import torch) whether the machine has no NVIDIA device node."""
    if "torch" in sys.modules:
        return not sys.modules["torch"].cuda.is_available()
    return not os.path.exists("/dev/nvidiactl")


if _no_cuda():
    # moshi torch.compiles a few kernels lazily unless NO_TORCH_COMPILE is set: on a CPU that costs
    # 4-18 s on the first forward and buys nothing. Must happen before moshi is imported.
    os.environ.setdefault("NO_TORCH_COMPILE", "1")

if tp.TYPE_CHECKING:
    from ttt_speech.moshi.checkpoint import load_hybrid
    from ttt_speech.moshi.files import save_moshi_checkpoint
    from ttt_speech.moshi.config import infer_moshi_config
    from ttt_speech.moshi.convert import (HybridLMModel, HybridSpec, convert, default_branch_config,
                                          default_gdn_config, default_inplace_config, default_ttt_config,
                                          memory_parameters, set_attention_window)
    from ttt_speech.moshi.layer import HybridLayerState, HybridTransformerLayer

_LAZY = {
    "load_hybrid": "checkpoint", "save_moshi_checkpoint": "files", "infer_moshi_config": "config",
    "HybridSpec": "convert", "HybridLMModel": "convert", "convert": "convert", "default_branch_config": "convert",
    "default_gdn_config": "convert", "default_inplace_config": "convert", "default_ttt_config": "convert",
    "memory_parameters": "convert", "set_attention_window": "convert",
    "HybridLayerState": "layer", "HybridTransformerLayer": "layer",
}
__all__ = sorted(_LAZY)
# the class names before issue 20 (they said TTT for any branch): still importable, the same classes
_OLD_NAMES = {"TTTLMModel": "HybridLMModel", "TTTLayerState": "HybridLayerState",
              "TTTTransformerLayer": "HybridTransformerLayer"}


def __getattr__(name: str) -> tp.Any:
    name = _OLD_NAMES.get(name, name)
    if name in _LAZY:
        return getattr(importlib.import_module(f"ttt_speech.moshi.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'ttt_speech.moshi' has no attribute {name!r}")


class _Package(types.ModuleType):
    """Importing the submodule `convert` makes it the package's attribute `convert`, hiding the function
    of that name, which an eager `from .convert import convert` used to restore; this restores it lazily."""

    def __getattribute__(self, name: str) -> tp.Any:
        value = super().__getattribute__(name)
        if name == "convert" and isinstance(value, types.ModuleType):
            return value.convert
        return value


sys.modules[__name__].__class__ = _Package
