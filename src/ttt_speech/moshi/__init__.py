"""Moshi integration: TTT hybrids of a pretrained Moshi that stream in constant memory.

    from ttt_speech.moshi import convert, load_hybrid
    hybrid = convert(lm, layers="all", mode="hybrid", ttt=TTTConfig(...))
    hybrid.save_pretrained("out/")
    gen = LMGen(load_hybrid("out/"))

Importing this package imports moshi (install it with `pip install --no-deps moshi==0.2.13`).
"""

import os

import torch

from ttt_speech.deps import require

require("moshi")  # installed with --no-deps, so pip never checked it: we subclass and patch its internals

if not torch.cuda.is_available():
    # moshi torch.compiles a few kernels lazily unless NO_TORCH_COMPILE is set: on a CPU that costs
    # 4-18 s on the first forward and buys nothing. Must happen before moshi is imported.
    os.environ.setdefault("NO_TORCH_COMPILE", "1")

from ttt_speech.moshi.checkpoint import load_hybrid, save_moshi_checkpoint  # noqa: E402
from ttt_speech.moshi.config import infer_moshi_config  # noqa: E402
from ttt_speech.moshi.convert import (  # noqa: E402
    HybridSpec,
    TTTLMModel,
    convert,
    default_branch_config,
    default_gdn_config,
    default_ttt_config,
    ttt_parameters,
)
from ttt_speech.moshi.layer import TTTLayerState, TTTTransformerLayer  # noqa: E402

__all__ = [
    "HybridSpec", "TTTLMModel", "TTTLayerState", "TTTTransformerLayer", "convert", "default_branch_config",
    "default_gdn_config", "default_ttt_config",
    "infer_moshi_config", "load_hybrid", "save_moshi_checkpoint", "ttt_parameters",
]
