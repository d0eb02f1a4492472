"""Moshi checkpoints on disk: the released format, and hybrid checkpoints (the same + a "memory" section).

A released Moshi checkpoint is config.json (`LMModel` kwargs plus CheckpointInfo's keys) and
model.safetensors whose attention weights are stored fused: `...self_attn.in_proj_weight` and
`...self_attn.out_proj.weight` (moshi's load hook splits them into `in_projs.{i}`). A hybrid
checkpoint keeps that layout for everything Moshi has, adds `transformer.layers.{i}.memory.*`
tensors, and describes them in config.json under "memory" (its "branch" field, "ttt", "gdn" or "inplace",
says which layer they belong to; files written before it existed are TTT). Directories written before
issue 20 say "ttt" for the section and the tensors; `names` reads them. `get_moshi_lm` loads strictly
and cannot know the memory layers, so hybrids load through `load_hybrid`.
"""

from __future__ import annotations

import re
import typing as tp
from pathlib import Path

import torch
from moshi.models.loaders import get_moshi_lm
from safetensors.torch import load_file
from torch import Tensor

from ttt_speech.errors import UsageError, existing_file
from ttt_speech.moshi.config import lm_kwargs
from ttt_speech.moshi.convert import BRANCHES, MODES, HybridLMModel, convert
from ttt_speech.moshi.files import (CONFIG_NAME, HYBRID_FORMAT, HYBRID_VERSION, MEMORY_SECTION, WEIGHTS_NAME, MoshiDir,
                                    to_moshi_layout)
from ttt_speech.moshi.layer import BranchConfig
from ttt_speech.names import current_keys

_MEMORY_KEY = re.compile(r"^transformer\.layers\.(\d+)\.memory\.")


def load_text_tokenizer(path: str | Path, text_card: int) -> tp.Any:
    """A SentencePiece model for a model of `text_card` text tokens; a UsageError naming the file if it is not one,
    or has fewer pieces than the model can generate (decoding such a token would fail mid-run)."""
    import sentencepiece

    p = existing_file(path, "SentencePiece tokenizer")
    try:
        tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(p))
    except (OSError, RuntimeError):
        raise UsageError(f"{p}: not a SentencePiece model; give the model's tokenizer (tokenizer.model)") from None
    if tokenizer.vocab_size() < text_card:
        raise UsageError(f"{p}: {tokenizer.vocab_size()} text tokens, fewer than the model's text_card {text_card}; "
                         "give the tokenizer the model was trained with")
    return tokenizer


def _parse_section(section: tp.Any, where: Path) -> tuple[str, list[int], BranchConfig]:
    if not isinstance(section, dict):
        raise UsageError(f"{where}: '{MEMORY_SECTION}' must be an object, got {type(section).__name__}")
    if section.get("format") != HYBRID_FORMAT or section.get("version") != HYBRID_VERSION:
        raise UsageError(f"{where}: '{MEMORY_SECTION}' has format/version {section.get('format')!r}/"
                         f"{section.get('version')!r}; this library reads {HYBRID_FORMAT!r}/{HYBRID_VERSION}")
    mode, layers, cfg = section.get("mode"), section.get("layers"), section.get("config")
    branch = section.get("branch", "ttt")  # written before Gated DeltaNet branches existed: TTT
    if branch not in BRANCHES:
        raise UsageError(f"{where}: memory.branch must be one of {tuple(BRANCHES)}, got {branch!r}")
    if mode not in MODES:
        raise UsageError(f"{where}: memory.mode must be one of {MODES}, got {mode!r}")
    if not isinstance(layers, list) or not all(isinstance(i, int) for i in layers):
        raise UsageError(f"{where}: memory.layers must be a list of layer indices, got {layers!r}")
    if not isinstance(cfg, dict):
        raise UsageError(f"{where}: memory.config must be an object, got {cfg!r}")
    try:
        return mode, layers, BRANCHES[branch].from_dict(cfg)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{where}: memory.config: {e}") from None


def _mismatch(where: Path, expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]],
              mode: str, layers: list[int]) -> str | None:
    """A message naming how the tensors disagree with the 'memory' section, or None if they agree."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [f"{k}: file {found[k]} vs config {expected[k]}"
              for k in sorted(set(expected) & set(found)) if expected[k] != found[k]]
    if not (missing or unexpected or shapes):
        return None
    lines = [f"{where}: the '{MEMORY_SECTION}' section of {CONFIG_NAME} disagrees with {WEIGHTS_NAME}"]
    file_layers = sorted({int(m.group(1)) for k in found if (m := _MEMORY_KEY.match(k))})
    if file_layers != sorted(layers):
        lines.append(f"memory.layers is {sorted(layers)} but {WEIGHTS_NAME} has memory tensors for layers {file_layers}")
    attn = sorted({int(k.split(".")[2]) for k in found if k.startswith("transformer.layers.") and ".self_attn." in k})
    if mode == "replace" and set(attn) & set(layers):
        lines.append(f"memory.mode is 'replace' but layers {sorted(set(attn) & set(layers))} still have attention")
    if mode == "hybrid" and set(layers) - set(attn):
        lines.append(f"memory.mode is 'hybrid' but layers {sorted(set(layers) - set(attn))} have no attention")
    if shapes:
        lines.append("shape mismatches (the memory config's dim/num_heads/inner/... differ?): " + "; ".join(shapes[:8]))
    if missing:
        lines.append(f"missing tensors ({len(missing)}): {missing[:8]}")
    if unexpected:
        lines.append(f"unexpected tensors ({len(unexpected)}): {unexpected[:8]}")
    return "\n  ".join(lines)


def check_hybrid_dir(path: str | Path) -> dict[str, tp.Any]:
    """The config.json of a hybrid directory (its section under "memory"), after `MoshiDir.read` checked what
    can be checked without building the model (else a UsageError)."""
    return MoshiDir.read(path, "hybrid checkpoint", hybrid=True).config


def load_hybrid(path: str | Path, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.bfloat16) -> HybridLMModel:
    """Load a checkpoint written by `save_pretrained` (a directory with config.json + model.safetensors).

    Builds the Moshi model and its memory layers on the meta device, checks every tensor name and
    shape of the file against the "memory" section, then assigns the file's tensors (no double copy).
    A directory written before issue 20 ("ttt" section, `.ttt.` tensors) loads the same.
    """
    root = Path(path)
    raw = check_hybrid_dir(root)
    mode, layers, cfg = _parse_section(raw.pop(MEMORY_SECTION), root / CONFIG_NAME)
    lm = get_moshi_lm(None, lm_kwargs=lm_kwargs(raw), device="meta", dtype=dtype)
    if not layers or not all(0 <= i < len(lm.transformer.layers) for i in layers):
        raise UsageError(f"{root / CONFIG_NAME}: memory.layers {layers} out of range for "
                         f"{len(lm.transformer.layers)} layers")
    model = convert(lm, layers, mode, cfg, init_from_attention=False, moshi_config=raw)  # type: ignore[arg-type]
    state = load_file(str(root / WEIGHTS_NAME), device=str(device))
    state = {k: _cast(k, v, dtype) for k, v in current_keys(to_moshi_layout(state)).items()}
    expected = {k: tuple(v.shape) for k, v in to_moshi_layout(model.state_dict()).items()}
    problem = _mismatch(root, expected, {k: tuple(v.shape) for k, v in state.items()}, mode, layers)
    if problem:
        raise UsageError(problem)
    model.load_state_dict(state, strict=True, assign=True)
    _check_materialized(model)
    return model.eval()


def _cast(key: str, value: Tensor, dtype: torch.dtype) -> Tensor:
    """As moshi's get_moshi_lm: floats to `dtype`, except the conditioners, which stay fp32."""
    if not value.dtype.is_floating_point:
        return value
    return value.float() if key.startswith(("condition_provider.", "fuser.")) else value.to(dtype)


def _check_materialized(model: HybridLMModel) -> None:
    """Built on meta and filled by assignment: anything still on meta was missing from the file."""
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise RuntimeError(f"tensors left uninitialised after loading: {leftover[:8]}")
