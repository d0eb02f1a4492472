"""A Moshi checkpoint directory: the names of its files, the one reader of them, and the writer of its layout.

A released Moshi checkpoint directory holds config.json (`LMModel` kwargs plus the names of the files
beside it: `mimi_name`, `mimi_config_name`, `tokenizer_name`), model.safetensors (attention weights
fused: `...self_attn.in_proj_weight`, `...self_attn.out_proj.weight`), the Mimi codec and the text
tokenizer. A hybrid's config.json adds a "memory" section (see `moshi.checkpoint`). Everything in
ttt_speech that names or reads these files takes the names from here, and every command and loader
opens a directory through `MoshiDir.read`. Importing this module imports no torch (`--help` stays fast).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import typing as tp
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ttt_speech.errors import UsageError, check_safetensors, existing_dir
from ttt_speech.names import MEMORY, current_section

if tp.TYPE_CHECKING:
    from moshi.models.lm import LMModel
    from moshi.models.loaders import CheckpointInfo
    from torch import Tensor

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MEMORY_SECTION = MEMORY
HYBRID_FORMAT = "ttt-speech/moshi-hybrid"
HYBRID_VERSION = 1
MIMI_WEIGHTS_NAME = "mimi.safetensors"
MIMI_CONFIG_NAME = "mimi_config.json"
TOKENIZER_NAME = "tokenizer.model"
# moshi.models.loaders' MOSHI_NAME, MIMI_NAME and TEXT_TOKENIZER_NAME: the names of a released repository's
# files, which its config.json does not spell out (tests/test_cli_errors.py holds them equal)
MOSHI_WEIGHTS_NAME = "model.safetensors"
MOSHI_MIMI_NAME = "tokenizer-e351c8d8-checkpoint125.safetensors"
MOSHI_TOKENIZER_NAME = "tokenizer_spm_32k_3.model"
# config.json keys naming a checkpoint directory's codec and tokenizer, as the released repositories do
FILE_NAMES = {"model_type": "moshi", "mimi_name": MIMI_WEIGHTS_NAME, "mimi_config_name": MIMI_CONFIG_NAME,
              "tokenizer_name": TOKENIZER_NAME}

# The small in-place memory hybrid (5 layers, 64-frame attention window, learned decay; issue 24) and the codec
# trained here (docs/results.md), fp16 (`cast_checkpoint` of the bf16 training export): the embedded default of
# `generate` and `serve`. Shipped inside the package so a fresh install has real (small-model) speech.
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "assets" / "small_moshi"

_SPLIT = re.compile(r"^(?P<prefix>.*self_attn\.)(?P<kind>in|out)_projs\.(?P<i>\d+)\.weight$")


def to_moshi_layout(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Fuse `self_attn.{in,out}_projs.{i}.weight` into `in_proj_weight` / `out_proj.weight`, as released."""
    import torch

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
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in to_moshi_layout(lm.state_dict()).items()}
    save_file(state, str(out / WEIGHTS_NAME))
    config = {k: v for k, v in config.items() if k != "moshi_name"} | (extra_config or {})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out


COMPANION_KEYS = ("mimi_name", "mimi_config_name", "tokenizer_name")
# where a file is looked for when config.json names none: ours (what `copy_companions` and the tiny and
# from-scratch checkpoints write), then what moshi's CheckpointInfo assumes (the released repositories)
DEFAULT_COMPANIONS = {"mimi_name": (MIMI_WEIGHTS_NAME, MOSHI_MIMI_NAME), "mimi_config_name": (MIMI_CONFIG_NAME,),
                      "tokenizer_name": (TOKENIZER_NAME, MOSHI_TOKENIZER_NAME)}


def companion(root: str | Path, config: dict[str, tp.Any], key: str) -> Path | None:
    """The file beside a checkpoint that its config.json names under `key` (one of COMPANION_KEYS; the first
    of DEFAULT_COMPANIONS there when unnamed), or None when it is not there."""
    named = config.get(key)
    names = (named,) if isinstance(named, str) else () if key in config else DEFAULT_COMPANIONS[key]
    return next((Path(root) / n for n in names if (Path(root) / n).is_file()), None)


@dataclass(frozen=True)
class MoshiDir:
    """A Moshi checkpoint directory (a hybrid or a vanilla Moshi), checked before any model is built: its
    config.json (a hybrid's memory section under "memory", whichever name the file used) and the paths of
    the files beside it. `read` is the one reader of such a directory; the loaders take what it found."""

    root: Path
    config: dict[str, tp.Any]
    weights: Path  # the model's weights (not checked, maybe not there, when read with weights=False)
    mimi: Path | None  # the companions: None when the directory has none (config.json names none there)
    mimi_config: Path | None
    tokenizer: Path | None

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_NAME

    @property
    def hybrid(self) -> bool:
        return MEMORY_SECTION in self.config

    @classmethod
    def read(cls, path: str | Path, what: str = "--model", weights: bool = True, hybrid: bool = False) -> MoshiDir:
        """The directory at `path`, or a one-line UsageError naming the bad file (`what` names the option):
        no config.json, one moshi could not build, weights missing or truncated, a vanilla Moshi's weights of
        another model. `weights=False` skips the weights; `hybrid=True` refuses a vanilla Moshi first. A
        companion that is not there is None (a hybrid saved without them names its source's)."""
        from ttt_speech.moshi.config import read_moshi_config

        root = existing_dir(path, f"{what} directory")
        config_path = root / CONFIG_NAME
        if not config_path.is_file():
            raise UsageError(f"{config_path}: no such Moshi config.json ({what} {root} has no config.json: give a "
                             "hybrid or vanilla Moshi checkpoint directory)")
        raw = current_section(read_moshi_config(config_path), str(config_path))
        if hybrid and MEMORY_SECTION not in raw:
            raise UsageError(f"{config_path} has no '{MEMORY_SECTION}' section: it is a vanilla Moshi checkpoint "
                             "(give it as --moshi-weights/--config, or convert it with convert-moshi)")
        name = WEIGHTS_NAME if MEMORY_SECTION in raw else raw.get("moshi_name", MOSHI_WEIGHTS_NAME)
        found = cls(root, raw, root / name, *(companion(root, raw, key) for key in COMPANION_KEYS))
        if not weights:
            return found
        if not found.weights.is_file():
            raise UsageError(f"{found.weights}: no such file ({what} {root} has no Moshi weights)")
        if found.hybrid:
            check_safetensors(found.weights)  # its tensors are checked against the memory section as it loads
        else:
            check_moshi_weights(found.weights, raw, config_path)
        return found


def check_moshi_weights(weights: str | Path, raw: dict[str, tp.Any], config_path: str | Path) -> None:
    """Refuse a vanilla Moshi weights file that moshi's strict load would reject (another model's file, another
    size), naming the file and the first differences, before the gigabytes are read: its header against a
    weightless (meta) build of `raw`. LoRA and quantized checkpoints are left to moshi (other tensor names)."""
    import torch
    from moshi.models.loaders import get_moshi_lm

    from ttt_speech.moshi.config import lm_kwargs

    header = check_safetensors(weights)
    found = {re.sub(r"in_proj\.weight$", "in_proj_weight", k): tuple(v["shape"]) for k, v in header.items()
             if k != "__metadata__"}
    if raw.get("lora") or raw.get("quantize") or any(k.endswith("_scb") for k in found):
        return
    with torch.device("meta"):
        meta = get_moshi_lm(None, lm_kwargs=lm_kwargs(raw), device="meta", dtype=torch.float32)
    expected = {k: tuple(v.shape) for k, v in to_moshi_layout(meta.state_dict()).items()}
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    shapes = [f"{k} {found[k]} vs {expected[k]}" for k in sorted(set(expected) & set(found)) if found[k] != expected[k]]
    if missing or unexpected or shapes:
        what = "; ".join(f"{name} ({len(keys)}): {', '.join(keys[:3])}" for name, keys in
                         (("shapes differ", shapes), ("missing", missing), ("not in the model", unexpected)) if keys)
        raise UsageError(f"{weights}: not the weights of the model {config_path} describes ({what})")


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


def cast_checkpoint(source_dir: str | Path, out_dir: str | Path, dtype: str = "float16") -> Path:
    """A copy of a Moshi checkpoint directory (hybrid or vanilla) with its model's floating tensors in `dtype`
    (a name: float16, bfloat16, float32); config.json and the companions as they were. Returns out_dir.

    Why: trainings export bf16, and the package ships fp16 (a CPU computes fp16 weights upcast, not bf16 ones).
    Casting the file, not a model built from it, keeps every tensor the file has (a learned decay included) under
    its own name. bf16 -> fp16 is exact down to 6.1e-5 (fp16's smallest normal; below, steps of 6e-8); a value
    the new dtype cannot hold (bf16 reaches 3e38, fp16 65504) is a UsageError naming it."""
    import torch
    from safetensors.torch import load_file, save_file

    found = MoshiDir.read(source_dir, "checkpoint to cast")
    target = getattr(torch, dtype, None)
    if not isinstance(target, torch.dtype) or not target.is_floating_point:
        raise UsageError(f"cast to {dtype!r}: not a floating dtype; give float16, bfloat16 or float32")
    state = load_file(str(found.weights))
    cast = {k: v.to(target) if v.dtype.is_floating_point else v for k, v in state.items()}
    overflow = [k for k, v in cast.items() if v.dtype.is_floating_point and not bool(torch.isfinite(v).all())
                and bool(torch.isfinite(state[k]).all())]
    if overflow:
        raise UsageError(f"{found.weights}: {overflow[0]} (and {len(overflow) - 1} more) exceeds {dtype}'s range; "
                         "keep the checkpoint's dtype")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(cast, str(out / found.weights.name), metadata={"format": "pt"})
    shutil.copyfile(found.config_path, out / CONFIG_NAME)
    copy_companions(found.root, out, found.config)
    return out


def save_hybrid(model: LMModel, out_dir: str | Path) -> Path:
    """A hybrid (`convert`'s HybridLMModel): config.json = the Moshi config + {"memory": {format, version, branch,
    mode, layers, config}}."""
    section = {"format": HYBRID_FORMAT, "version": HYBRID_VERSION, **model.memory_spec.to_dict()}
    return save_moshi_checkpoint(model, model.moshi_config, out_dir, {MEMORY_SECTION: section})


def checkpoint_info(path: str, mimi_config: str | None = None, weights: bool = True) -> CheckpointInfo:
    """moshi's CheckpointInfo of a local Moshi directory (read by `MoshiDir.read`; `weights=False`: for its
    codec and tokenizer only) or of a hub repo id."""
    from moshi.models.loaders import CheckpointInfo

    root = Path(path)
    if not root.is_dir():
        if root.exists() or path.startswith(("/", ".", "~")) or path.count("/") != 1:
            raise UsageError(f"{path}: no such Moshi checkpoint directory (nor a hub repo id like owner/name)")
        return CheckpointInfo.from_hf_repo(path, mimi_config_path=mimi_config)
    found = MoshiDir.read(root, "Moshi checkpoint", weights)
    for key in COMPANION_KEYS:  # moshi would look for a file named but not there on the hub
        if isinstance(found.config.get(key), str) and companion(root, found.config, key) is None:
            raise UsageError(f"{root / found.config[key]}: no such file ({key} in {found.config_path})")
    if found.mimi is not None:
        check_safetensors(found.mimi)
    mimi_cfg = mimi_config or found.mimi_config
    return CheckpointInfo.from_hf_repo(
        str(root), moshi_weights=found.weights, mimi_weights=found.mimi, tokenizer=found.tokenizer,
        config_path=found.config_path, mimi_config_path=Path(mimi_cfg) if mimi_cfg else None)


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
