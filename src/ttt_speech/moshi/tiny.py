"""Tiny Moshi + Mimi built in code, and written to disk in the released formats.

Tests, the `generate` demo, the server and the trainer need a Moshi that exists without a download
and runs in milliseconds on a CPU. These builders use moshi's own classes with the layout of the
released 7B config (RMSNorm f32, SiLU gating, RoPE, depformer with weights per step and multi
linear, acoustic delays), only small; `write_tiny_checkpoint` lays out a directory that moshi's
`CheckpointInfo.from_hf_repo` loads with local paths and no network.
"""

from __future__ import annotations

import copy
import json
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import torch
from moshi.models.compression import MimiModel
from moshi.models.lm import LMModel
from moshi.models.loaders import CheckpointInfo, get_mimi, get_moshi_lm
from safetensors.torch import save_file

from ttt_speech import TTTConfig
from ttt_speech.moshi.compat import default_mimi_config
from ttt_speech.moshi.files import (CONFIG_NAME, FILE_NAMES, MIMI_CONFIG_NAME, MIMI_WEIGHTS_NAME, TOKENIZER_NAME,
                                    WEIGHTS_NAME, save_moshi_checkpoint, train_text_tokenizer)
from ttt_speech.moshi.convert import LayerSpec, HybridLMModel, convert

# The released moshiko config's keys and layout, at ~40k parameters. 2 generated + 2 user audio
# codebooks (Moshi: 8 + 8), delays as in Moshi (text and the first codebook of each side undelayed).
_TINY_LM: dict[str, tp.Any] = {
    "dim": 32, "text_card": 64, "existing_text_padding_id": 3, "n_q": 4, "dep_q": 2, "card": 32,
    "num_heads": 4, "num_layers": 2, "hidden_scale": 4.125, "causal": True, "layer_scale": None,
    "context": 8, "max_period": 10000, "gating": "silu", "norm": "rms_norm_f32",
    "positional_embedding": "rope", "depformer_dim": 16, "depformer_dim_feedforward": 32,
    "depformer_num_heads": 2, "depformer_num_layers": 1, "depformer_layer_scale": None,
    "depformer_multi_linear": True, "depformer_max_period": 10000,
    "depformer_gating": "silu", "depformer_pos_emb": "none", "depformer_weights_per_step": True,
    "delays": [0, 0, 1, 0, 1],
}


def tiny_lm_config(**overrides: tp.Any) -> dict[str, tp.Any]:
    """A Moshi config.json dict (LMModel kwargs) for a tiny model; `overrides` replace keys."""
    return copy.deepcopy(_TINY_LM) | overrides


def tiny_mimi_config(num_codebooks: int = 2, card: int = 32) -> dict[str, tp.Any]:
    """Mimi's config layout (seanet/quantizer/transformer) at 24 kHz and 12.5 Hz, ~100k parameters."""
    cfg = default_mimi_config()
    cfg["seanet"].update(dimension=16, n_filters=4)
    cfg["quantizer"].update(dimension=8, n_q=max(num_codebooks, 2), bins=card,
                            input_dimension=16, output_dimension=16)
    cfg["transformer"].update(d_model=16, num_heads=2, num_layers=1, dim_feedforward=32, context=25,
                              input_dimension=16, output_dimensions=[16])
    return cfg


def build_tiny_lm(seed: int = 0, config: dict[str, tp.Any] | None = None, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32) -> LMModel:
    """A randomly initialised (deterministic for a seed) tiny Moshi LMModel in eval mode."""
    torch.manual_seed(seed)
    return get_moshi_lm(None, lm_kwargs=config or tiny_lm_config(), device=device, dtype=dtype)


def build_tiny_hybrid(seed: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                      layers: LayerSpec = "all", gate_init: float = 0.5) -> HybridLMModel:
    """`build_tiny_lm` with TTT hybrid layers whose gate is open (`gate_init`), so the TTT path is live."""
    lm = build_tiny_lm(seed, device=device, dtype=dtype)
    torch.manual_seed(seed)
    return convert(lm, layers, "hybrid", TTTConfig(dim=lm.dim, num_heads=4, mini_batch=16, gate_init=gate_init))


def build_tiny_mimi(seed: int = 0, config: dict[str, tp.Any] | None = None,
                    device: torch.device | str = "cpu", num_codebooks: int = 2) -> MimiModel:
    """A randomly initialised (deterministic for a seed) tiny Mimi codec in eval mode."""
    torch.manual_seed(seed)
    return get_mimi(None, config or tiny_mimi_config(num_codebooks), device=device, num_codebooks=num_codebooks)


def write_tiny_tokenizer(path: str | Path, vocab_size: int) -> Path:
    """A SentencePiece model trained on a few built-in sentences (ids 0-3 as Moshi uses them)."""
    words = ("the a moshi speaks and listens at twelve frames per second while memory grows "
             "test time training keeps a fixed size state for hours of audio").split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) for i in range(200)]
    return train_text_tokenizer(lines, vocab_size, path)


@dataclass(frozen=True)
class TinyCheckpoint:
    """Paths of a tiny Moshi checkpoint directory (the files of a released model repository)."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG_NAME

    @property
    def moshi_weights(self) -> Path:
        return self.root / WEIGHTS_NAME

    @property
    def mimi_weights(self) -> Path:
        return self.root / MIMI_WEIGHTS_NAME

    @property
    def mimi_config(self) -> Path:
        return self.root / MIMI_CONFIG_NAME

    @property
    def tokenizer(self) -> Path:
        return self.root / TOKENIZER_NAME

    def checkpoint_info(self) -> CheckpointInfo:
        """moshi's CheckpointInfo for these files, without touching the network."""
        return CheckpointInfo.from_hf_repo(
            "local/tiny-moshi", moshi_weights=self.moshi_weights, mimi_weights=self.mimi_weights,
            tokenizer=self.tokenizer, config_path=self.config, mimi_config_path=self.mimi_config)


def write_tiny_checkpoint(out_dir: str | Path, seed: int = 0, lm_config: dict[str, tp.Any] | None = None,
                          tokenizer: bool = True) -> TinyCheckpoint:
    """Write config.json + model.safetensors (released key layout), a Mimi and a tokenizer to `out_dir`."""
    ckpt = TinyCheckpoint(Path(out_dir))
    config = lm_config or tiny_lm_config()
    lm = build_tiny_lm(seed, config)
    save_moshi_checkpoint(lm, config, ckpt.root, FILE_NAMES)
    n_mimi = max(config["dep_q"], config["n_q"] - config["dep_q"])
    mimi_cfg = tiny_mimi_config(n_mimi, config["card"])
    mimi = build_tiny_mimi(seed, mimi_cfg, num_codebooks=n_mimi)
    save_file({k: v.contiguous() for k, v in mimi.state_dict().items()}, str(ckpt.mimi_weights))
    ckpt.mimi_config.write_text(json.dumps(mimi_cfg, indent=2) + "\n")
    if tokenizer:
        write_tiny_tokenizer(ckpt.tokenizer, config["text_card"])
    return ckpt
