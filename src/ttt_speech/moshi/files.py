"""A Moshi checkpoint directory: the names of its files, the one reader of them, and the writer of its layout.

A released Moshi checkpoint directory holds config.json (`LMModel` kwargs plus the names of the files
beside it: `mimi_name`, `mimi_config_name`, `tokenizer_name`), model.safetensors (attention weights
fused: `...self_attn.in_proj_weight`, `...self_attn.out_proj.weight`), the Mimi codec and the text
tokenizer. A hybrid's config.json adds a "memory" section (see `moshi.checkpoint`). Everything in
ttt_speech that names or reads these files takes the names from here.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import typing as tp
from collections.abc import Iterable
from pathlib import Path

import torch
from moshi.models.lm import LMModel
from moshi.models.loaders import MIMI_NAME, MOSHI_NAME, TEXT_TOKENIZER_NAME, CheckpointInfo
from safetensors.torch import save_file
from torch import Tensor

from ttt_speech.errors import UsageError, check_safetensors
from ttt_speech.moshi.config import read_moshi_config
from ttt_speech.names import MEMORY

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MEMORY_SECTION = MEMORY
HYBRID_FORMAT = "ttt-speech/moshi-hybrid"
HYBRID_VERSION = 1
MIMI_WEIGHTS_NAME = "mimi.safetensors"
MIMI_CONFIG_NAME = "mimi_config.json"
TOKENIZER_NAME = "tokenizer.model"
# config.json keys naming a checkpoint directory's codec and tokenizer, as the released repositories do
FILE_NAMES = {"model_type": "moshi", "mimi_name": MIMI_WEIGHTS_NAME, "mimi_config_name": MIMI_CONFIG_NAME,
              "tokenizer_name": TOKENIZER_NAME}

# The small TTT hybrid and codec trained here (issue 7, docs/results.md), fp16: the embedded default of
# `generate` and `serve`. Shipped inside the package so a fresh install has real (small-model) speech.
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "assets" / "small_moshi"

_SPLIT = re.compile(r"^(?P<prefix>.*self_attn\.)(?P<kind>in|out)_projs\.(?P<i>\d+)\.weight$")


def to_moshi_layout(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Fuse `self_attn.{in,out}_projs.{i}.weight` into `in_proj_weight` / `out_proj.weight`, as released."""
    out: dict[str, Tensor] = {}
    fused: dict[str, dict[int, Tensor]] = {}
    for key, value in state.items():
        m = _SPLIT.match(key)
        if m is None:
            out[key] = value
            continue
        name = m["prefix"] + ("in_proj_weight" if m["kind"] == "in" else "out_proj.weight")
        fused.setdefault(name, {})[int(m["i"])] = value
    for name, parts in fused.items():
        out[name] = torch.cat([parts[i] for i in range(len(parts))], dim=0)
    return out


def save_moshi_checkpoint(lm: LMModel, config: dict[str, tp.Any], out_dir: str | Path,
                          extra_config: dict[str, tp.Any] | None = None) -> Path:
    """Write `lm` as config.json + model.safetensors in the released Moshi layout; returns out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in to_moshi_layout(lm.state_dict()).items()}
    save_file(state, str(out / WEIGHTS_NAME))
    config = {k: v for k, v in config.items() if k != "moshi_name"} | (extra_config or {})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out


COMPANION_KEYS = ("mimi_name", "mimi_config_name", "tokenizer_name")
# what moshi's CheckpointInfo assumes when a config.json names no files (the released repositories)
DEFAULT_COMPANIONS = {"mimi_name": MIMI_NAME, "tokenizer_name": TEXT_TOKENIZER_NAME}


def companion(root: str | Path, config: dict[str, tp.Any], key: str) -> Path | None:
    """The file beside a checkpoint that its config.json names under `key` (one of COMPANION_KEYS; moshi's
    default name when unnamed), or None when it is not there."""
    name = config.get(key, DEFAULT_COMPANIONS.get(key))
    path = Path(root) / name if isinstance(name, str) else None
    return path if path is not None and path.is_file() else None


def copy_companions(source_dir: str | Path, out_dir: str | Path, config: dict[str, tp.Any] | None = None) -> list[str]:
    """Put the codec and tokenizer files of a Moshi directory (named by `config`, default its config.json)
    into `out_dir` and name them in out_dir's config.json, so that generate and serve find them there.

    Hard links where the file system allows (a 7B Moshi's Mimi is 385 MB), copies otherwise. Returns the
    names put there; a file the directory lacks is left out."""
    src, out = Path(source_dir), Path(out_dir)
    config = json.loads((src / CONFIG_NAME).read_text()) if config is None else config
    names = {k: path.name for k in COMPANION_KEYS if (path := companion(src, config, k)) is not None}
    for name in names.values():
        target = out / name
        if target.exists() and target.samefile(src / name):
            continue
        target.unlink(missing_ok=True)
        try:
            os.link(src / name, target)
        except OSError:
            shutil.copyfile(src / name, target)
    written = json.loads((out / CONFIG_NAME).read_text()) | names
    (out / CONFIG_NAME).write_text(json.dumps(written, indent=2) + "\n")
    return list(names.values())


def save_hybrid(model: LMModel, out_dir: str | Path) -> Path:
    """A hybrid (`convert`'s TTTLMModel): config.json = the Moshi config + {"memory": {format, version, branch,
    mode, layers, config}}."""
    section = {"format": HYBRID_FORMAT, "version": HYBRID_VERSION, **model.memory_spec.to_dict()}
    return save_moshi_checkpoint(model, model.moshi_config, out_dir, {MEMORY_SECTION: section})


def checkpoint_info(path: str, mimi_config: str | None = None) -> CheckpointInfo:
    """moshi's CheckpointInfo of a local Moshi directory (config.json naming its files) or of a hub repo id:
    the one reader of a checkpoint directory's file names."""
    root = Path(path)
    if not root.is_dir():
        if root.exists() or path.startswith(("/", ".", "~")) or path.count("/") != 1:
            raise UsageError(f"{path}: no such Moshi checkpoint directory (nor a hub repo id like owner/name)")
        return CheckpointInfo.from_hf_repo(path, mimi_config_path=mimi_config)
    config_path = root / CONFIG_NAME
    if not config_path.exists():
        raise UsageError(f"{root}: no config.json (a Moshi checkpoint directory names its files there)")
    raw = read_moshi_config(config_path)
    for key in ("mimi_name", "tokenizer_name", "mimi_config_name"):
        if key in raw and not (root / raw[key]).is_file():
            raise UsageError(f"{root / raw[key]}: no such file ({key} in {config_path})")
    for weights in (root / raw.get("moshi_name", MOSHI_NAME), root / raw.get("mimi_name", "")):
        if weights.suffix == ".safetensors" and weights.is_file():
            check_safetensors(weights)
    mimi_cfg = mimi_config or (str(root / raw["mimi_config_name"]) if "mimi_config_name" in raw else None)
    return CheckpointInfo.from_hf_repo(
        str(root), moshi_weights=root / raw.get("moshi_name", MOSHI_NAME),
        mimi_weights=root / raw["mimi_name"] if "mimi_name" in raw else None,
        tokenizer=root / raw["tokenizer_name"] if "tokenizer_name" in raw else None,
        config_path=config_path, mimi_config_path=Path(mimi_cfg) if mimi_cfg else None)


def train_text_tokenizer(lines: Iterable[str], vocab_size: int, path: str | Path) -> Path:
    """A SentencePiece BPE model with Moshi's special ids: 0 end-of-padding, 1 unk, 2 eos, 3 padding."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, unk_id=1, bos_id=-1, eos_id=2, pad_id=3, minloglevel=2,
        hard_vocab_limit=False, user_defined_symbols=["<end_pad>"])
    out = Path(path)
    out.write_bytes(model.getvalue())
    return out
