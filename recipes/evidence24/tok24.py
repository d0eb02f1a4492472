"""Issue 24 device helpers (recipes/evidence.sh, step 8): a random windowed base, random-frame data, corpus -> packed int16 tokens -> tokenized dirs.

    python tok24.py base OUT CONTEXT            random SMALL_LM (attention window CONTEXT) + the shipped codec/tokenizer
    python tok24.py silence PACK FRAMES         PACK/silence.safetensors: Mimi's codes of FRAMES frames of silence
    python tok24.py random PACK OUT DOCS FRAMES random-frame documents (text + 8 codebooks random, user streams silent)
    python tok24.py encode PACK CORPUS...       every recording of the corpora -> PACK/{train,val}.safetensors
                                                (rows: text + the 8 model codebooks, int16, + the user's 8 where
                                                the right channel is not silent: dialogues); with PART=i/n in the
                                                environment, every n-th from the i-th (parallel parts: merge);
                                                GROUP=k recordings per batch (default 24: ~10 GB
                                                of host memory for 20-minute recordings, 4 on a CPU)
    python tok24.py merge PACK PART...          packs of disjoint corpora (encoded in parallel) -> one PACK
    python tok24.py unpack PACK OUT             PACK -> OUT/{train,val}: `ttt-speech tokenize` directories, a
                                                silent user's 8 codebooks rebuilt from the cached encoding of silence
    python tok24.py tokens PACK OUT MINUTES CORPUS...
                                                the three above for corpora of recordings up to MINUTES long (the
                                                silence cache a minute longer): what the corpus recipes run
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import wave
from pathlib import Path

import numpy as np


def _assets() -> Path:
    """The shipped codec and tokenizer (the data must be tokenized with what the package ships)."""
    from ttt_speech.moshi.files import SHIPPED_DIR

    return SHIPPED_DIR


def base(out: str, context: str) -> None:
    from ttt_speech.moshi.files import FILE_NAMES, save_moshi_checkpoint
    from ttt_speech.moshi.tiny import build_tiny_lm, tiny_lm_config
    from ttt_speech.scratch.moshi_lm import SMALL_LM

    config = tiny_lm_config(**SMALL_LM) | {"context": int(context)}
    save_moshi_checkpoint(build_tiny_lm(0, config), config, out, FILE_NAMES)
    for name in ("mimi.safetensors", "mimi_config.json", "tokenizer.model"):
        shutil.copyfile(_assets() / name, Path(out) / name)


def _tokenizer():
    from ttt_speech.train.tokenize import MoshiTokenizer
    import torch
    return MoshiTokenizer.from_checkpoint(str(_assets()), device="cuda" if torch.cuda.is_available() else "cpu")


def silence(pack: str, frames: str) -> None:
    """The codes of `frames` frames of silence (a prefix of it is any silent stream's codes: Mimi is causal)."""
    import torch
    from safetensors.numpy import save_file
    tok = _tokenizer()
    n = int(frames)
    with torch.no_grad():
        codes = tok._encode(np.zeros((1, n * tok.mimi.frame_size), np.float32), n)[0].astype(np.int16)
    Path(pack).mkdir(parents=True, exist_ok=True)
    save_file({"silence": codes}, str(Path(pack) / "silence.safetensors"))


def _silence(pack: str, frames: int) -> np.ndarray:
    from safetensors.numpy import load_file
    s = load_file(str(Path(pack) / "silence.safetensors"))["silence"]
    if s.shape[1] < frames:
        raise ValueError(f"silence cache holds {s.shape[1]} frames, need {frames}")
    return s[:, :frames] if frames else s


def random_docs(pack: str, out: str, docs: str, frames: str) -> None:
    from safetensors.numpy import save_file
    rng = np.random.default_rng(24)
    n, t = int(docs), int(frames)
    sil = _silence(pack, t)
    arrays = {}
    for i in range(n):
        a = np.empty((17, t), np.int16)
        a[0] = rng.integers(4, 1000, t)  # text ids 0-3 are Moshi's special tokens
        a[1:9] = rng.integers(0, 1024, (8, t))
        a[9:] = sil
        arrays[str(i)] = a
    Path(out).mkdir(parents=True, exist_ok=True)
    save_file(arrays, str(Path(out) / "random.safetensors"))


def _channels(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """A stereo 16-bit wav -> the model's (left) channel and the user's (right), None where the user is silent
    (readings: their codes are the cached silence's, added by unpack)."""
    with wave.open(str(path)) as w:
        assert w.getnchannels() == 2 and w.getsampwidth() == 2, path
        x = np.frombuffer(w.readframes(w.getnframes()), np.int16).reshape(-1, 2)
    left, right = (x[:, c].astype(np.float32) / 32768.0 for c in (0, 1))
    return left, (right if right.any() else None)


def part_of(items: list, spec: str) -> list:
    """Part i of n ("i/n"): every n-th item from the i-th, so n processes encode disjoint recordings."""
    try:
        i, n = map(int, spec.split("/"))
        assert 0 <= i < n
    except (ValueError, AssertionError):
        raise SystemExit(f"PART={spec}: give i/n with 0 <= i < n, e.g. PART=1/2") from None
    return items[i::n]


def encode(pack: str, *corpora: str, group: int = 24) -> None:
    import torch
    from safetensors.numpy import save_file
    from ttt_speech.train.tokenize import Word, read_alignments, text_stream

    out = Path(pack)
    if not (out / "silence.safetensors").is_file():  # unpack needs it: say so before minutes of encoding
        raise SystemExit(f"{pack}/silence.safetensors: missing; run `tok24.py silence {pack} FRAMES` first")
    tok = _tokenizer()
    fs, fr = tok.mimi.frame_size, tok.mimi.frame_rate
    items = []  # (split, key, wav path)
    for c in map(Path, corpora):
        for split in ("train", "val"):
            for line in (c / f"{split}.jsonl").read_text().splitlines():
                rel = json.loads(line)["path"]
                items.append((split, f"{c.name}/{rel}", c / rel))
    items = part_of(items, os.environ.get("PART", "0/1"))
    group = int(os.environ.get("GROUP", group))
    arrays: dict[str, dict[str, np.ndarray]] = {"train": {}, "val": {}}
    longest = 0
    t0 = time.time()
    for g in range(0, len(items), group):
        part = items[g:g + group]
        channels = [_channels(p) for _, _, p in part]
        wavs = [left for left, _ in channels]
        users = [i for i, (_, right) in enumerate(channels) if right is not None]
        frames = [math.ceil(len(w) / fs) for w in wavs]
        longest = max(longest, *frames)
        batch = np.zeros((len(wavs) + len(users), max(frames) * fs), np.float32)  # the users' channels after
        for i, w in enumerate([*wavs, *(channels[u][1] for u in users)]):
            batch[i, :len(w)] = w
        with torch.no_grad():
            codes = tok._encode(batch, max(frames))  # causal: zero padding after a recording leaves its codes unchanged
        for i, (split, key, path) in enumerate(part):
            words = read_alignments(path.with_suffix(".json"), len(wavs[i]) / tok.mimi.sample_rate, fr, "SPEAKER_MAIN")
            tokens = [Word(tuple(tok.text.encode(w.strip())), s, e) for w, s, e in words]
            text = text_stream(tokens, frames[i], fr, tok.pad, tok.end_pad)
            rows = [text[None], codes[i, :, :frames[i]]]
            if i in users:
                rows.append(codes[len(wavs) + users.index(i), :, :frames[i]])
            arrays[split][key] = np.concatenate(rows).astype(np.int16)
        print(f"encoded {g + len(part)}/{len(items)} recordings, {time.time() - t0:.0f} s", flush=True)
    for split, a in arrays.items():
        save_file(a, str(out / f"{split}.safetensors"))
        print(split, len(a), "recordings", sum(x.shape[1] for x in a.values()), "frames", flush=True)
    _silence(pack, longest)  # the cache covers every recording (checked after saving: the tokens are kept)


def merge(pack: str, *parts: str) -> None:
    from safetensors.numpy import load_file, save_file
    Path(pack).mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(parts[0]) / "silence.safetensors", Path(pack) / "silence.safetensors")
    for split in ("train", "val"):
        arrays: dict[str, np.ndarray] = {}
        for part in parts:
            a = load_file(str(Path(part) / f"{split}.safetensors"))
            if twice := sorted(arrays.keys() & a.keys()):
                raise ValueError(f"{part}: recordings {twice[:3]} are in another part")
            arrays |= a
        save_file(arrays, str(Path(pack) / f"{split}.safetensors"))
        print(split, len(arrays), "recordings", sum(x.shape[1] for x in arrays.values()), "frames", flush=True)


def unpack(pack: str, out: str, shard_frames: int = 1 << 20) -> None:
    from safetensors.numpy import load_file, save_file
    from ttt_speech.train.data import INDEX_NAME, TOKENS_FORMAT, TOKENS_VERSION

    silence = _silence(pack, 0)
    for split in ("train", "val"):
        if not (Path(pack) / f"{split}.safetensors").exists():  # device1.sh's pack_val brings only val
            continue
        arrays = load_file(str(Path(pack) / f"{split}.safetensors"))
        root = Path(out) / split
        root.mkdir(parents=True, exist_ok=True)
        docs, shard, filled = [], {}, 0

        def flush() -> None:
            nonlocal shard, filled
            name = f"tokens_{len({d['shard'] for d in docs}) if docs else 0:05d}.safetensors"
            save_file(shard, str(root / name))
            for k, v in shard.items():
                docs.append({"source": keys[k], "shard": name, "key": k, "frames": int(v.shape[1])})
            shard, filled = {}, 0

        keys = {}
        for i, (source, a) in enumerate(sorted(arrays.items())):
            k = str(i)
            keys[k] = source
            shard[k] = a if a.shape[0] == 17 else np.concatenate([a, silence[:, :a.shape[1]]])  # a silent user
            filled += a.shape[1]
            if filled >= shard_frames:
                flush()
        if shard:
            flush()
        index = {"format": TOKENS_FORMAT, "version": TOKENS_VERSION, "frame_rate": 12.5, "streams": 17,
                 "manifest": f"{pack}/{split}", "documents": docs, "skipped": []}
        (root / INDEX_NAME).write_text(json.dumps(index, indent=1) + "\n")
        print(split, len(docs), "documents", sum(d["frames"] for d in docs), "frames", flush=True)


def tokens(pack: str, out: str, minutes: str, *corpora: str) -> None:
    silence(pack, str(math.ceil((float(minutes) + 1) * 750)))  # 12.5 frames a second
    encode(pack, *corpora)
    unpack(pack, out)


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"base": base, "silence": silence, "random": random_docs, "encode": encode, "merge": merge,
     "unpack": unpack, "tokens": tokens}[cmd](*args)
