"""Reading the language model out of a local transformers directory, and saying what was not read.

A LLaMA-Omni directory is a Llama checkpoint with more beside it: speech encoder/projector weights
under `model.`, a speech generator at the top level, and config keys the Llama config does not
know (VITA's is the same around a Mixtral). `load_llm` builds the transformers model the directory
holds (from its own model_type, or the one a `memory` section or the architecture name points to; a
Qwen2-Audio directory builds the whole Qwen2-Audio), loads its weights with transformers'
`from_pretrained`, and returns a `LoadReport` of every tensor and config key it left alone.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import safe_open
from torch import Tensor
from transformers import CONFIG_MAPPING, PreTrainedModel
from transformers.core_model_loading import revert_weight_conversion

from ttt_speech.errors import UsageError, check_safetensors, existing_dir, read_json_object
from ttt_speech.hf.layouts import decoder_config_dict, model_class
from ttt_speech.names import LEGACY, MEMORY, memory_section

logger = logging.getLogger(__name__)

# Config keys a conversion writes; not "left alone" when they come back.
CONVERSION_CONFIG_KEYS = frozenset({MEMORY, LEGACY, "sliding_window", "layer_types", "use_sliding_window", "max_window_layers"})
LLM_FAMILIES = ("qwen2", "llama", "mixtral")  # LLaMA-Omni (Llama-3.1), LLaMA-Omni2 (Qwen2.5), VITA (Mixtral)


@dataclass
class LoadReport:
    """What a load took from a directory and what it left alone."""

    path: str
    model_type: str
    left_alone_keys: list[str] = field(default_factory=list)
    left_alone_config_keys: list[str] = field(default_factory=list)
    missing_keys: list[str] = field(default_factory=list)

    def groups(self) -> dict[str, int]:
        """Left-alone tensors per module prefix, e.g. {'model.speech_encoder': 12, 'speech_generator': 4}."""
        def prefix(key: str) -> str:
            parts = key.split(".")
            return ".".join(parts[:2] if parts[0] == "model" and len(parts) > 2 else parts[:1])

        return dict(sorted(Counter(prefix(k) for k in self.left_alone_keys).items()))

    def __str__(self) -> str:
        lines = [f"loaded the {self.model_type} language model from {self.path}"]
        if self.left_alone_keys:
            lines.append(f"left alone {len(self.left_alone_keys)} tensors:")
            lines += [f"  {p}.* ({n} tensors)" for p, n in self.groups().items()]
        if self.left_alone_config_keys:
            lines.append(f"left alone config keys: {', '.join(self.left_alone_config_keys)}")
        if self.missing_keys:
            lines.append(f"missing from the checkpoint: {', '.join(self.missing_keys)}")
        return "\n".join(lines)


def read_config(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / "config.json").read_text())


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a directory (single file or sharded with an index)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def checkpoint_keys(path: str | Path) -> set[str]:
    keys: set[str] = set()
    for f in checkpoint_files(path):
        with safe_open(str(f), framework="pt") as st:
            keys.update(st.keys())
    return keys


def read_tensors(path: str | Path, keys: set[str], device: torch.device | str = "cpu") -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for f in checkpoint_files(path):
        with safe_open(str(f), framework="pt", device=str(device)) as st:
            out.update({k: st.get_tensor(k) for k in st.keys() if k in keys})
    return out


def llm_model_type(cfg: dict[str, Any]) -> str:
    """The transformers model_type of the LLM in a config.json (LLaMA-Omni's own type maps to 'llama')."""
    model_type = cfg.get("model_type", "")
    if model_type in CONFIG_MAPPING:
        return model_type
    section = memory_section(cfg)
    if section is not None:
        return section["llm_model_type"]
    names = [model_type, *cfg.get("architectures", [])]
    for family in LLM_FAMILIES:
        if any(family in n.lower() for n in names):
            return family
    raise ValueError(
        f"cannot tell which transformers language model {names} is; expected a model_type transformers knows "
        f"or one naming {LLM_FAMILIES}"
    )


def saved_names(model: PreTrainedModel, keys: set[str]) -> dict[str, str]:
    """The name `save_pretrained` writes each of these state-dict keys under.

    transformers renames some architectures' keys on save (Qwen2-Audio's `model.language_model.` is
    written as `language_model.model.`); shapes are enough to compute the names (meta tensors).
    """
    sd = model.state_dict()
    return {k: next(iter(revert_weight_conversion(model, {k: sd[k].to("meta")}))) for k in keys}


def check_llm_dir(path: str | Path) -> dict[str, Any]:
    """The config.json of a transformers LLM directory (converted or not), checked before anything is built: not
    a Moshi checkpoint (transformers would build a default 7B Moshi from it), a model_type transformers knows,
    weights there (safetensors files whole). Else a UsageError naming the directory or file."""
    root = existing_dir(path, "transformers model directory")
    cfg = read_json_object(root / "config.json", "transformers config.json")
    if "dep_q" in cfg or cfg.get("model_type") == "moshi":
        raise UsageError(f"{root}: a Moshi checkpoint, not a transformers LLM (use the Moshi commands: convert-moshi)")
    try:
        llm_model_type(cfg)
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{root}: {e}") from None
    index = root / "model.safetensors.index.json"
    if index.exists() and not isinstance(read_json_object(index, "safetensors index").get("weight_map"), dict):
        raise UsageError(f"{index}: no weight_map; copy or download it again")
    try:
        files = checkpoint_files(root)
    except FileNotFoundError:  # transformers also reads pytorch_model*.bin (Spirit-LM ships those)
        if not any((root / n).is_file() for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
            raise UsageError(f"{root}: no weights (model.safetensors, pytorch_model.bin, or an index of their "
                             "shards)") from None
        files = []
    for f in files:
        check_safetensors(f)
    return cfg


def satisfied(model: PreTrainedModel, loaded: set[str]) -> set[str]:
    """State-dict keys that `loaded` covers, counting tied parameters (lm_head tied to the embeddings)."""
    sd = model.state_dict()
    ptrs = {sd[k].data_ptr() for k in loaded if k in sd}
    return {k for k, t in sd.items() if k in loaded or t.data_ptr() in ptrs}


def load_llm(
    path: str | Path, dtype: torch.dtype | str | None = None, attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, LoadReport]:
    """Build the directory's language model with its weights; report every tensor/config key not used.

    Keys the directory has that this LLM lacks end up in `report.left_alone_keys` (logged); LLM
    parameters the directory lacks end up in `report.missing_keys` (the caller decides: a replace-mode
    checkpoint legitimately lacks the replaced attentions).
    """
    cfg = read_config(path)
    model_type = llm_model_type(cfg)
    for name in (MEMORY, LEGACY):  # built unconverted; `convert.load` converts it
        decoder_config_dict(cfg).pop(name, None)
    config_cls = CONFIG_MAPPING[model_type]
    known = set(config_cls().to_dict())
    llm_cfg = {k: v for k, v in cfg.items() if k in known and k != "model_type"}
    extra = sorted(k for k in cfg if k not in known and k not in CONVERSION_CONFIG_KEYS)
    config = config_cls(**llm_cfg)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its table would call the TTT tensors "UNEXPECTED"; ours says more
    try:
        model, info = model_class(model_type).from_pretrained(
            str(path), config=config, dtype=dtype, attn_implementation=attn_implementation, output_loading_info=True,
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
    report = LoadReport(
        path=str(path),
        model_type=model_type,
        left_alone_keys=sorted(info["unexpected_keys"]),
        left_alone_config_keys=extra,
        missing_keys=sorted(info["missing_keys"]),
    )
    return model, report


def log_report(report: LoadReport) -> None:
    (logger.warning if report.left_alone_keys or report.left_alone_config_keys else logger.info)(str(report))
