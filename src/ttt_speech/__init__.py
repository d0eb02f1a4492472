"""ttt-speech: Test-Time-Training layers that give speech language models memory that does not run out."""

from __future__ import annotations

import importlib
import typing as tp

if tp.TYPE_CHECKING:
    from ttt_speech.config import TTTConfig
    from ttt_speech.layers.state import TTTState
    from ttt_speech.layers.ttt import TTTLayer

__all__ = ["TTTConfig", "TTTLayer", "TTTState"]
__version__ = "0.1.0"

# imported on first use: `import ttt_speech` (and so `ttt-speech X --help`) must not pay for torch
_LAZY = {"TTTConfig": "ttt_speech.config", "TTTState": "ttt_speech.layers.state", "TTTLayer": "ttt_speech.layers.ttt"}


def __getattr__(name: str) -> tp.Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ttt_speech' has no attribute {name!r}")
