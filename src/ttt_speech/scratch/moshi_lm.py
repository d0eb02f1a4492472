"""A new Moshi-architecture LM, from scratch: a small config, a trained codec and a text tokenizer
laid out as a released checkpoint directory.

Laid out that way, the from-scratch model goes through the same roads as a real Moshi: `tokenize`,
`train` (`model.pretrained: <dir>`), `convert-moshi`, `eval-long`, `generate` and `serve`.
"""

from __future__ import annotations

import shutil
import typing as tp
from collections.abc import Iterable
from pathlib import Path

from ttt_speech.codec.model import export_dir, load_codec
from ttt_speech.errors import UsageError
from ttt_speech.moshi.files import FILE_NAMES, MIMI_CONFIG_NAME, MIMI_WEIGHTS_NAME, save_moshi_checkpoint, train_text_tokenizer
from ttt_speech.moshi.tiny import TinyCheckpoint, build_tiny_lm, tiny_lm_config

# Moshi's layout (text + 8 generated + 8 user codebooks, acoustic delay 1, RMSNorm, SiLU gating, RoPE,
# a depformer over the 8 generated codebooks with weights per step: moshi streams only that kind) at
# 6.97M parameters; with TTT in all 5 layers 7.78M, so 15.6 MB in fp16 beside the 9.2 MB small codec
# (configs/codec_small.yaml): 24.7 MB. Context 250 frames = 20 s.
SMALL_LM: dict[str, tp.Any] = {
    "dim": 192, "num_heads": 3, "num_layers": 5, "hidden_scale": 3.5, "context": 250, "text_card": 1000,
    "n_q": 16, "dep_q": 8, "card": 1024, "depformer_dim": 64, "depformer_dim_feedforward": 128,
    "depformer_num_heads": 2, "depformer_num_layers": 1, "depformer_weights_per_step": True,
    "delays": [0] + ([0] + [1] * 7) * 2,
}




def write_scratch_checkpoint(out_dir: str | Path, codec_dir: str | Path, text_lines: Iterable[str],
                             lm_config: dict[str, tp.Any] | None = None, seed: int = 0) -> TinyCheckpoint:
    """A randomly initialised Moshi LM + the exported codec + a tokenizer trained on `text_lines`."""
    codec = export_dir(codec_dir)
    mimi = load_codec(codec)
    config = tiny_lm_config(**SMALL_LM) | (lm_config or {})
    n_codebooks = mimi.num_codebooks
    if config["dep_q"] > n_codebooks or config["card"] != mimi.cardinality:
        raise UsageError(f"{codec}: {n_codebooks} codebooks of {mimi.cardinality}, the LM wants "
                         f"{config['dep_q']} of {config['card']}")
    ckpt = TinyCheckpoint(Path(out_dir))
    ckpt.root.mkdir(parents=True, exist_ok=True)
    for name in (MIMI_WEIGHTS_NAME, MIMI_CONFIG_NAME):
        shutil.copyfile(codec / name, ckpt.root / name)
    train_text_tokenizer(text_lines, config["text_card"], ckpt.tokenizer)
    save_moshi_checkpoint(build_tiny_lm(seed, config), config, ckpt.root, FILE_NAMES)
    return ckpt
