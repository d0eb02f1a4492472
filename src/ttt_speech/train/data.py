"""Token data for training: documents in shards, the train/validation split, and stage-length chunks.

A *document* is one token array: [K, T] (Moshi: text + audio codebooks per 12.5 Hz frame) or [T]
(a flat token stream, e.g. for a transformers LLM). Documents live in
- tokenized directories written by `ttt-speech tokenize` (an `index.json` + safetensors shards; the
  document's source is its wav), or
- generic shards: `.safetensors` files (every tensor a document) and `.npy` files (one each), or
  folders of them (the document's source is its file).
The validation split is made by source file, never by chunk, so no conversation leaks across it.
Only headers are read up front (every file is checked before step 1); tokens are read lazily
through memory maps when a batch needs them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import typing as tp
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from ttt_speech.engine.skips import BadInputError, SkipLog
from ttt_speech.train.config import RepeatConfig

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
TOKENS_FORMAT = "ttt-speech/tokens"
TOKENS_VERSION = 1
PAD = -1  # "nothing here": no input, no loss (moshi's zero token)
REPEAT_TAG = 0x72657074  # "rept": seeds the generator of copied spans apart from the shuffle's


@dataclass(frozen=True)
class Document:
    source: str  # the file it came from: the unit of the train/validation split
    path: Path  # the file holding its tokens
    key: str | None  # tensor name in a .safetensors file; None for .npy
    length: int  # time steps
    streams: int  # K for [K, T] documents, 0 for flat [T] ones


@lru_cache(maxsize=64)
def _npy(path: Path) -> np.ndarray:
    return np.load(path, mmap_mode="r")


@lru_cache(maxsize=64)
def _safetensors(path: Path) -> tp.Any:
    """An open (memory-mapped) safetensors file: parsing the header once per file, not once per read."""
    return safe_open(str(path), framework="np")


def read_tokens(doc: Document, start: int, end: int) -> np.ndarray:
    """Tokens of steps [start, end) as int64 [max(K, 1), end - start]."""
    if doc.key is None:
        arr = np.asarray(_npy(doc.path)[..., start:end])
    else:
        sl = _safetensors(doc.path).get_slice(doc.key)
        arr = sl[:, start:end] if doc.streams else sl[start:end]
    return arr.astype(np.int64).reshape(max(doc.streams, 1), end - start)


def _array_document(source: str, path: Path, key: str | None, shape: tuple[int, ...], dtype: str,
                    skips: SkipLog) -> Document | None:
    where = f"{path}" + (f" [{key}]" if key is not None else "")
    if len(shape) not in (1, 2):
        skips.bad(where, f"expected a [T] or [codebooks, T] token array, got shape {list(shape)}")
        return None
    if not dtype.lower().startswith(("i", "u")):  # numpy names (int16) and safetensors names (I16)
        skips.bad(where, f"token arrays must be integers, got dtype {dtype}")
        return None
    if shape[-1] == 0 or (len(shape) == 2 and shape[0] == 0):
        skips.bad(where, "empty token array")
        return None
    return Document(source, path, key, shape[-1], shape[0] if len(shape) == 2 else 0)


def _shard_documents(path: Path, skips: SkipLog, sources: dict[str, str] | str) -> list[Document]:
    """The arrays of a .safetensors / .npy shard as documents.

    sources: tensor name -> source file for the arrays an index lists (tokenized directories), or
    the name of a generic shard, whose arrays are all documents with the shard as their source.
    """
    docs: list[Document] = []
    try:
        if path.suffix == ".npy":
            arr = _npy(path)
            doc = _array_document(str(sources), path, None, arr.shape, arr.dtype.name, skips)
            return [doc] if doc else []
        f = _safetensors(path)
        available = set(f.keys())
        keys = sorted(available) if isinstance(sources, str) else list(sources)
        if not keys:
            skips.bad(path, "empty shard (no token arrays)")
        for key in keys:
            if key not in available:
                skips.bad(path, f"has no tensor {key!r} (index.json lists it for {sources[key]})")
                continue
            sl = f.get_slice(key)
            doc = _array_document(sources if isinstance(sources, str) else sources[key], path, key,
                                  tuple(sl.get_shape()), sl.get_dtype(), skips)
            if doc:
                docs.append(doc)
    except BadInputError:
        raise
    except Exception as e:  # noqa: BLE001 - unreadable or truncated: name the file whatever the reader raised
        skips.bad(path, f"cannot read shard ({type(e).__name__}: {e})")
    return docs


def _tokenized_documents(root: Path, skips: SkipLog) -> list[Document]:
    """The documents of a directory written by `ttt-speech tokenize`, in index order."""
    index = json.loads((root / INDEX_NAME).read_text())
    if index.get("format") != TOKENS_FORMAT or index.get("version") != TOKENS_VERSION:
        raise BadInputError(f"{root / INDEX_NAME}: format/version {index.get('format')!r}/{index.get('version')!r}, "
                            f"expected {TOKENS_FORMAT!r}/{TOKENS_VERSION}")
    shards: dict[str, dict[str, str]] = {}
    for entry in index["documents"]:
        shards.setdefault(entry["shard"], {})[entry["key"]] = entry["source"]
    return [d for shard, sources in shards.items() for d in _shard_documents(root / shard, skips, sources)]


def find_documents(paths: list[str], skips: SkipLog) -> list[Document]:
    """All documents under `paths` (tokenized dirs, shard files, folders of shards), in a fixed order.

    A document's source (what the validation split hashes) is named relative to the path given, so
    the split does not change when the data moves.
    """
    docs: list[Document] = []
    for p in map(Path, paths):
        if not p.exists():
            raise BadInputError(f"{p}: no such file or directory (data path in the config)")
        if p.is_dir() and (p / INDEX_NAME).exists():
            docs += _tokenized_documents(p, skips)
        elif p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.suffix in (".safetensors", ".npy"))
            if not files:
                skips.bad(p, "directory holds no index.json, .safetensors or .npy files")
            for f in files:
                docs += _shard_documents(f, skips, str(f.relative_to(p)))
        elif p.suffix in (".safetensors", ".npy"):
            docs += _shard_documents(p, skips, p.name)
        else:
            raise BadInputError(f"{p}: expected a tokenized directory, a folder of shards, .safetensors or .npy")
    return docs


def check_streams(docs: list[Document], streams: int, what: str, skips: SkipLog) -> list[Document]:
    """Keep the documents shaped as the model reads them (`streams` rows; 0 = flat)."""
    ok = []
    for d in docs:
        if d.streams == streams or (streams == 1 and d.streams == 0):
            ok.append(d)
        else:
            shape = f"[{d.streams}, T]" if d.streams else "[T]"
            skips.bad(f"{d.path}" + (f" [{d.key}]" if d.key else ""),
                      f"token array is {shape}; {what} reads {streams} stream(s) per step")
    return ok


def split_by_source(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Hold out ceil(val_fraction * files) source files, chosen by a hash of their names (stable across runs)."""
    if val_fraction <= 0:
        return docs, []
    sources = sorted({d.source for d in docs}, key=lambda s: hashlib.sha1(s.encode()).hexdigest())
    if len(sources) < 2:
        raise BadInputError(f"val_fraction={val_fraction} needs at least 2 source files, found {len(sources)}")
    held = set(sources[:min(len(sources) - 1, math.ceil(val_fraction * len(sources)))])
    return [d for d in docs if d.source not in held], [d for d in docs if d.source in held]


Piece = tuple[int, int, int]  # (document index, start, end)


def make_chunks(docs: list[Document], length: int, pack: bool, min_len: int) -> list[list[Piece]]:
    """Cut documents into training sequences of `length` steps (shorter tails >= min_len are padded).

    pack=False: every sequence lies within one document. pack=True: documents are concatenated in
    order first, so short documents fill whole sequences.
    """
    chunks: list[list[Piece]] = []
    if not pack:
        for i, d in enumerate(docs):
            for s in range(0, d.length, length):
                e = min(s + length, d.length)
                if e - s >= min_len:
                    chunks.append([(i, s, e)])
        return chunks
    current: list[Piece] = []
    filled = 0
    for i, d in enumerate(docs):
        s = 0
        while s < d.length:
            e = min(d.length, s + length - filled)
            current.append((i, s, e))
            filled += e - s
            s = e
            if filled == length:
                chunks.append(current)
                current, filled = [], 0
    if current and filled >= min_len:
        chunks.append(current)
    return chunks


def real_length(tokens: np.ndarray) -> int:
    """Steps before the trailing PAD (the padding after a sequence's last document)."""
    filled = np.flatnonzero((tokens != PAD).any(axis=0))
    return int(filled[-1]) + 1 if filled.size else 0


def copy_spans(tokens: np.ndarray, rng: np.random.Generator, cfg: RepeatConfig) -> np.ndarray:
    """`tokens` [K, T] with up to cfg.copies copied spans: the real part is cut into that many equal
    blocks and `copy_span` draws one inside each, so no copy overwrites another's source; with
    cfg.far_gap, blocks 1, 3, 5, ... (far_blocks "random": each block with probability 1/2) draw their
    distance from it. With cfg.placement "free" the same draws go anywhere in the sequence (`free_layout`)."""
    if cfg.copies == 1:
        return copy_span(tokens, rng, cfg)
    length = real_length(tokens)
    out = tokens.copy()
    if cfg.placement == "free":
        for src, dst, n in free_layout(length, rng, cfg):
            span = tokens[:, src:src + n]
            if cfg.source == "shuffled":
                span = out[:, src:src + n] = span[:, rng.permutation(n)]
            out[:, dst:dst + n] = span
        return out
    far = cfg.far() if cfg.far_gap is not None else cfg
    is_far = far_mask(rng, cfg)
    for b in range(cfg.copies):
        lo, hi = b * length // cfg.copies, (b + 1) * length // cfg.copies
        out[:, lo:hi] = copy_span(tokens[:, lo:hi], rng, far if is_far[b] else cfg)
    return out


def far_mask(rng: np.random.Generator, cfg: RepeatConfig) -> np.ndarray:
    """Which of cfg.copies draw a far copy: every second one, or (far_blocks "random") each with probability 1/2."""
    return rng.random(cfg.copies) < 0.5 if cfg.far_blocks == "random" else np.arange(cfg.copies) % 2 == 1


def free_layout(length: int, rng: np.random.Generator, cfg: RepeatConfig) -> list[tuple[int, int, int]]:
    """(source, copy, frames) of placement "free"'s copies in `length` frames: far_mask's draws, placed by
    free_draws."""
    far = cfg.far() if cfg.far_gap is not None else cfg
    return free_draws(length, rng, [far if f else cfg for f in far_mask(rng, cfg)])


def free_draws(length: int, rng: np.random.Generator, draws: list[RepeatConfig],
               tries: int = 64) -> list[tuple[int, int, int]]:
    """(source, copy, frames) of each of `draws` anywhere in `length` frames, in no frame another read or
    wrote (the longest draws, the far ones, go first: they need the most room); a draw that finds no
    such place in `tries` attempts, or that `prob` leaves out, is skipped."""
    taken: list[tuple[int, int]] = []
    out = []
    for c in sorted(draws, key=lambda c: c.min_gap, reverse=True):
        if rng.random() >= c.prob:
            continue
        for _ in range(tries):
            n = int(rng.integers(c.min_len, c.max_len + 1))
            lo, hi = max(c.min_gap, n), min(length - n, c.max_gap if c.max_gap is not None else length)
            if lo > hi:
                continue
            d = int(rng.integers(lo, hi + 1))
            src = int(rng.integers(0, length - n - d + 1))
            if all(e <= a or b >= a + n for a in (src, src + d) for b, e in taken):
                taken += [(src, src + n), (src + d, src + d + n)]
                out.append((src, src + d, n))
                break
    return out


def copy_span(tokens: np.ndarray, rng: np.random.Generator, cfg: RepeatConfig) -> np.ndarray:
    """With probability cfg.prob, `tokens` [K, T] with an earlier span copied over a later stretch.

    A verbatim repeat >= cfg.min_gap (and <= cfg.max_gap, if set) steps after its source teaches a
    memory to recall what the attention window no longer holds (issue 7). The copy lies after the
    source (never overlapping it) and inside the real, non-PAD part; a sequence too short for that is
    returned unchanged, as is `tokens` itself when no span is drawn.
    """
    if rng.random() >= cfg.prob:
        return tokens
    length = real_length(tokens)
    longest = min(length - cfg.min_gap, length // 2)  # src + max(min_gap, n) + n <= length, src >= 0
    if longest < cfg.min_len:
        return tokens
    n = int(rng.integers(cfg.min_len, min(cfg.max_len, longest) + 1))
    gap = max(cfg.min_gap, n)
    src = int(rng.integers(0, length - n - gap + 1))
    last = length - n if cfg.max_gap is None else min(length - n, src + cfg.max_gap)
    dst = int(rng.integers(src + gap, last + 1))
    out = tokens.copy()
    span = tokens[:, src:src + n]
    if cfg.source == "shuffled":
        span = out[:, src:src + n] = span[:, rng.permutation(n)]
    out[:, dst:dst + n] = span
    return out


class TokenData:
    """Stage-length sequences of one split, in a seeded order that any process can recompute.

    Sample g of a stage (counting over all processes) is chunk perm_e[g mod n] of epoch e = g div n,
    so a resumed run, or a run on another number of processes with the same global batch, reads
    exactly the same sequences. A copied span (`repeat`, training samples only) is drawn from a
    generator seeded by (seed, stage, g), so it too depends on the position alone.
    """

    def __init__(self, docs: list[Document], streams: int, seed: int, pack: bool, min_chunk: float,
                 repeat: RepeatConfig | None = None) -> None:
        self.docs = docs
        self.streams = streams
        self.seed = seed
        self.pack = pack
        self.min_chunk = min_chunk
        self.repeat = repeat
        self._chunks: dict[int, list[list[Piece]]] = {}
        self._orders: dict[tuple[int, int, int], np.ndarray] = {}

    def chunks(self, length: int) -> list[list[Piece]]:
        if length not in self._chunks:
            self._chunks[length] = make_chunks(self.docs, length, self.pack, max(1, math.ceil(self.min_chunk * length)))
        return self._chunks[length]

    def _order(self, length: int, stage: int, epoch: int) -> np.ndarray:
        key = (length, stage, epoch)
        if key not in self._orders:  # only the current epoch's order is kept
            self._orders = {key: np.random.default_rng([self.seed, stage, epoch]).permutation(len(self.chunks(length)))}
        return self._orders[key]

    def num_chunks(self, length: int) -> int:
        return len(self.chunks(length))

    def load(self, pieces: list[Piece] | None, length: int) -> torch.Tensor:
        """One sequence [K, length] (PAD after its end; all PAD for None)."""
        out = np.full((max(self.streams, 1), length), PAD, dtype=np.int64)
        at = 0
        for i, s, e in pieces or []:
            out[:, at:at + e - s] = read_tokens(self.docs[i], s, e)
            at += e - s
        return torch.from_numpy(out)

    def check_length(self, length: int, where: str) -> None:
        """Raise BadInputError unless some sequence of `length` steps can be cut from the documents."""
        if not self.chunks(length):
            raise BadInputError(f"{where}: no sequence of {length} steps: every document is shorter than "
                                f"{self.min_chunk:g} x {length} (data.min_chunk)")

    def sample(self, g: int, length: int, stage: int) -> torch.Tensor:
        chunks = self.chunks(length)
        epoch, i = divmod(g, len(chunks))
        tokens = self.load(chunks[int(self._order(length, stage, epoch)[i])], length)
        if self.repeat is None:
            return tokens
        rng = np.random.default_rng([self.seed, stage, g, REPEAT_TAG])
        return torch.from_numpy(copy_spans(tokens.numpy(), rng, self.repeat))

    def batch(self, first: int, size: int, length: int, stage: int) -> torch.Tensor:
        """Samples first .. first + size - 1 of a stage, stacked [size, K, length]."""
        return torch.stack([self.sample(first + j, length, stage) for j in range(size)])

    def eval_batch(self, first: int, size: int, length: int) -> torch.Tensor:
        """Validation sequences in file order (no shuffling); past the end: all PAD (weight 0)."""
        chunks = self.chunks(length)
        return torch.stack([self.load(chunks[j] if j < len(chunks) else None, length)
                            for j in range(first, first + size)])
