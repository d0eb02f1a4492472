"""Held-out token shards for evaluation: one sequence [K, T] of integer tokens per file.

A held-out sequence is an integer array [K, T] (or [T] for a text-only model). Row 0 is the text stream; for Moshi the next rows are the
audio codebooks in the model's order: its own `dep_q` codebooks, then the user's. -1 (Moshi's
`zero_token_id`) marks "no token" and is never scored. A dialogue shard may carry one more row
after the user's codebooks: the user's text (used when the user's seat is scored, see
`conversation.py`). An HF model reads row 0 only.

Reading goes through the trainer's reader (`ttt_speech.train.data.find_documents`), so every
format it accepts works here too: tokenized directories (index.json + shards), `.npy` files, and
`.safetensors` files (every tensor one document), or folders of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ttt_speech.errors import UsageError

SHARD_SUFFIXES = (".npy", ".safetensors")
TOKENS_KEY = "tokens"


@dataclass(frozen=True)
class Sequence:
    """One held-out sequence and where it came from."""

    name: str
    tokens: Tensor  # [K, T] int64
    source: str = ""  # the file it was tokenized from (a token index's "source"), for per-span scores

    @property
    def length(self) -> int:
        return self.tokens.shape[-1]


def load_sequences(path: str | Path, limit: int | None = None) -> list[Sequence]:
    """Every document under `path`, read whole, in the trainer's fixed order (first `limit` only)."""
    from ttt_speech.engine.skips import SkipLog
    from ttt_speech.train.data import find_documents, read_tokens

    docs = find_documents([str(path)], SkipLog())
    if not docs:
        raise UsageError(f"{path}: no token documents (.npy / .safetensors shards or a tokenized directory)")
    docs = docs[:limit] if limit else docs
    root = Path(path) if Path(path).is_dir() else Path(path).parent
    out = []
    for doc in docs:
        name = str(doc.path.relative_to(root)) if doc.path.is_relative_to(root) else str(doc.path)
        name += f"[{doc.key}]" if doc.key not in (None, TOKENS_KEY) else ""
        out.append(Sequence(name, torch.from_numpy(read_tokens(doc, 0, doc.length)), doc.source))
    return out


def save_sequence(path: str | Path, tokens: Tensor | np.ndarray) -> Path:
    """Write one [K, T] shard (format chosen by the suffix); used to build held-out sets and in tests."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tokens = torch.as_tensor(tokens).long()
    if out.suffix == ".npy":
        np.save(out, tokens.numpy())
    elif out.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({TOKENS_KEY: tokens.contiguous()}, str(out))
    else:
        raise ValueError(f"{out}: shard files end in {' or '.join(SHARD_SUFFIXES)}")
    return out
