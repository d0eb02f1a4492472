"""`ttt-speech tokenize`: moshi-finetune-style stereo conversations -> sharded Moshi token files, once.

Input (moshi-finetune's layout): a jsonl manifest with one `{"path": "rel/a.wav", "duration": 24.5}`
per line (paths relative to the manifest), stereo wavs at Mimi's sample rate (left channel: the
model's own voice, right: the user), and beside each wav a `.json` transcript
`{"alignments": [[word, [start_s, end_s], speaker], ...]}`.

Output: one [1 + 2K, T] int16 array per conversation at Mimi's 12.5 Hz — row 0 the text stream,
rows 1..K the model's audio codebooks, rows K+1..2K the user's — in safetensors shards, and an
index.json naming every conversation's source wav (the unit of the train/validation split).

The text stream is laid out as Moshi trains (the rules of moshi-finetune's interleaver, with its
settings for Moshi: main speaker only, no BOS/EOS, no text/audio delay): a word's tokens go out one
per frame from the first frame that its start time falls in; a later word arriving while tokens
are still pending replaces them; every other frame is text padding, and a padding frame right
before a word's first token becomes the end-of-padding token.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.numpy import save_file

from ttt_speech.engine.skips import SkipLog
from ttt_speech.manifest import MAIN_SPEAKER, read_manifest
from ttt_speech.errors import UsageError
from ttt_speech.train.data import INDEX_NAME, TOKENS_FORMAT, TOKENS_VERSION

if TYPE_CHECKING:
    from sentencepiece import SentencePieceProcessor

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Word:
    tokens: tuple[int, ...]
    start: float  # seconds
    end: float


def text_stream(words: list[Word], frames: int, frame_rate: float, pad: int, end_pad: int) -> np.ndarray:
    """The text row of `frames` frames for time-stamped, tokenized words (see the module docstring)."""
    out = np.full(frames, pad, dtype=np.int64)
    order = sorted((w for w in words if w.end > w.start), key=lambda w: w.start)
    pending: list[int] = []
    nxt = 0
    for t in range(frames):
        while nxt < len(order) and order[nxt].start * frame_rate < t + 1:
            pending = list(order[nxt].tokens)
            nxt += 1
        if pending:
            if t > 0 and out[t - 1] == pad:
                out[t - 1] = end_pad
            out[t] = pending.pop(0)
    return out


def read_alignments(path: Path, duration: float, frame_rate: float, main_speaker: str) -> list[tuple[str, float, float]]:
    """The main speaker's (word, start, end) from a transcript; raises ValueError on timestamps past the audio."""
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("alignments"), list):
        raise ValueError('expected {"alignments": [[word, [start, end], speaker], ...]}')
    words = []
    for i, item in enumerate(data["alignments"]):
        try:
            word, (start, end), speaker = item
            start, end = float(start), float(end)
        except (TypeError, ValueError):
            raise ValueError(f"alignment {i} is {item!r}, expected [word, [start, end], speaker]") from None
        if start < 0:
            raise ValueError(f"alignment {i} ({word!r}) starts at {start:.2f} s, before the audio")
        if end > duration + 1 / frame_rate:  # one frame of slack for rounding in aligners
            raise ValueError(f"alignment {i} ({word!r}, {start:.2f}-{end:.2f} s) runs past the audio "
                             f"({duration:.2f} s)")
        if speaker == main_speaker:
            words.append((str(word), start, end))
    return words


class MoshiTokenizer:
    """Mimi + the text tokenizer + the Moshi config's text padding ids: wav + transcript -> codes."""

    def __init__(self, mimi: torch.nn.Module, text: SentencePieceProcessor, text_padding_id: int,
                 end_of_text_padding_id: int, main_speaker: str = MAIN_SPEAKER, chunk_seconds: float = 60.0) -> None:
        self.mimi = mimi.eval()
        self.text = text
        self.pad, self.end_pad = text_padding_id, end_of_text_padding_id
        self.main_speaker = main_speaker
        self.chunk_frames = max(1, round(chunk_seconds * mimi.frame_rate))
        self._silence: np.ndarray | None = None  # codes of silence, [K, T], grown on demand

    @classmethod
    def from_checkpoint(cls, path: str, mimi_config: str | None = None, device: str = "cpu",
                        main_speaker: str = MAIN_SPEAKER) -> MoshiTokenizer:
        """From a Moshi checkpoint directory (config.json naming Mimi and the tokenizer) or hub repo."""
        from ttt_speech.moshi.files import checkpoint_info

        info = checkpoint_info(path, mimi_config, weights=False)
        cfg = info.lm_config or {}
        text = info.get_text_tokenizer()
        if "text_card" in cfg and text.vocab_size() > cfg["text_card"]:
            raise UsageError(f"{info.tokenizer}: {text.vocab_size()} text tokens, more than the model's text_card "
                             f"{cfg['text_card']}: its ids would not fit the model; give the model's own tokenizer")
        return cls(info.get_mimi(device=device), text, cfg.get("existing_text_padding_id", 3),
                   cfg.get("existing_text_end_padding_id", 0), main_speaker)

    @torch.no_grad()
    def encode_audio(self, wav: np.ndarray) -> np.ndarray:
        """Float audio [C, S] -> codes [C, K, ceil(S / frame_size)], streamed a chunk at a time.

        An all-zero channel (a reading's silent user side) takes a prefix of one cached encoding of
        silence: the codec is causal, so that prefix is what encoding it would give, at no cost.
        """
        frames = math.ceil(wav.shape[-1] / self.mimi.frame_size)
        silent = [c for c in range(wav.shape[0]) if not wav[c].any()]
        live = [c for c in range(wav.shape[0]) if c not in silent]
        out = np.empty((wav.shape[0], self.mimi.num_codebooks, frames), dtype=np.int64)
        if live:
            out[live] = self._encode(wav[live], frames)
        if silent:
            if self._silence is None or self._silence.shape[-1] < frames:
                self._silence = self._encode(np.zeros((1, frames * self.mimi.frame_size), np.float32), frames)[0]
            out[silent] = self._silence[:, :frames]
        return out

    def _encode(self, wav: np.ndarray, frames: int) -> np.ndarray:
        """Zero-padded to whole chunks: on CUDA, Mimi's streaming encoder replays a CUDA graph that takes one
        shape only, so a shorter last chunk would fail (moshi's "every call must be done with exactly the same
        shapes"); the codec is causal, so the padding changes no code of the first `frames`."""
        fs = self.mimi.frame_size
        device = next(self.mimi.parameters()).device
        step = self.chunk_frames * fs
        x = torch.nn.functional.pad(torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32))[:, None],
                                    (0, math.ceil(frames / self.chunk_frames) * step - wav.shape[-1]))
        with self.mimi.streaming(x.shape[0]):
            codes = [self.mimi.encode(x[..., s:s + step].to(device)).cpu() for s in range(0, x.shape[-1], step)]
        return torch.cat(codes, dim=-1)[..., :frames].numpy()

    def encode_file(self, wav_path: Path) -> np.ndarray:
        """[1 + 2K, T] int16 codes of one conversation; ValueError/FileNotFoundError say what is wrong."""
        import sphn

        if not wav_path.exists():
            raise FileNotFoundError("missing wav")
        transcript = wav_path.with_suffix(".json")
        if not transcript.exists():
            raise FileNotFoundError(f"missing transcript {transcript.name} beside the wav")
        wav, sr = sphn.read(str(wav_path))
        if sr != self.mimi.sample_rate:
            raise ValueError(f"sample rate {sr} Hz, Mimi needs {self.mimi.sample_rate} Hz (resample the file first)")
        if wav.ndim != 2 or wav.shape[0] != 2:
            raise ValueError(f"expected stereo audio (left: model voice, right: user), got {wav.shape[0]} channel(s)")
        if wav.shape[-1] == 0:
            raise ValueError("empty audio")
        fr = self.mimi.frame_rate
        try:
            words = read_alignments(transcript, wav.shape[-1] / sr, fr, self.main_speaker)
        except ValueError as e:
            raise ValueError(f"{transcript.name}: {e}") from None
        audio = self.encode_audio(wav)
        tokens = [Word(tuple(self.text.encode(w.strip())), s, e) for w, s, e in words]
        text = text_stream(tokens, audio.shape[-1], fr, self.pad, self.end_pad)
        return np.concatenate([text[None], audio[0], audio[1]]).astype(np.int16)


@dataclass
class TokenizeReport:
    out_dir: Path
    documents: int
    frames: int
    skipped: list[tuple[str, str]]


def _write_shard(out_dir: Path, index: int, arrays: dict[str, np.ndarray]) -> str:
    name = f"tokens_{index:05d}.safetensors"
    tmp = out_dir / f".{name}.tmp"
    save_file(arrays, str(tmp))
    os.replace(tmp, out_dir / name)
    return name


def tokenize(manifest: str | Path, out_dir: str | Path, tokenizer: MoshiTokenizer, skip_bad: bool = False,
             shard_frames: int = 1 << 20) -> TokenizeReport:
    """Tokenize every conversation of `manifest` into `out_dir` (shards of about `shard_frames` frames)."""
    manifest, out = Path(manifest), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    skips = SkipLog(skip_bad)
    documents: list[dict] = []
    pending: dict[str, np.ndarray] = {}
    pending_sources: list[tuple[str, str, int]] = []
    total = streams = 0

    def flush() -> None:
        name = _write_shard(out, len({d["shard"] for d in documents}), pending)
        documents.extend({"source": s, "shard": name, "key": k, "frames": f} for s, k, f in pending_sources)
        pending.clear()
        pending_sources.clear()

    for rel in read_manifest(manifest, skips):
        wav = manifest.parent / rel
        try:
            codes = tokenizer.encode_file(wav)
        except (OSError, ValueError) as e:
            skips.bad(wav, str(e))
            continue
        key = str(len(documents) + len(pending))
        pending[key] = codes
        pending_sources.append((rel, key, codes.shape[-1]))
        total += codes.shape[-1]
        streams = codes.shape[0]
        if sum(a.shape[-1] for a in pending.values()) >= shard_frames:
            flush()
    if pending:
        flush()
    if not documents:
        raise ValueError(f"{manifest}: no conversation could be tokenized" +
                         (f" ({skips.summary()})" if skips.skipped else ""))
    index = {"format": TOKENS_FORMAT, "version": TOKENS_VERSION, "frame_rate": tokenizer.mimi.frame_rate,
             "streams": streams, "manifest": str(manifest),
             "documents": documents, "skipped": [{"path": p, "why": w} for p, w in skips.skipped]}
    tmp = out / f".{INDEX_NAME}.tmp"
    tmp.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(tmp, out / INDEX_NAME)
    if skips.skipped:
        log.warning(skips.summary())
    return TokenizeReport(out, len(documents), total, skips.skipped)
