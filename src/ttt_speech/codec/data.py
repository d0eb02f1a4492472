"""Audio for the codec: mono examples from wav files, random crops at 24 kHz, read lazily.

Sources are jsonl manifests in moshi-finetune's format (`{"path": "rel.wav", "duration": s}`, paths
relative to the manifest), directories (every *.wav below) or single wav files. Each channel of a
file is its own example, so a stereo conversation gives both speakers. Every file's header is read
before training starts, so a missing or unreadable file stops the run at once, named. Crop `i` is a
function of the seed and `i` alone (any worker, any restart reads the same audio for it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ttt_speech.audio import SAMPLE_RATE
from ttt_speech.engine.skips import BadInputError, SkipLog
from ttt_speech.manifest import read_manifest

RESAMPLE_MARGIN = 0.05  # seconds read beyond a crop on each side so the resampler's warm-up falls outside it


@dataclass(frozen=True)
class AudioExample:
    path: Path
    channel: int
    channels: int
    sample_rate: int
    duration: float  # seconds


def _wav_paths(source: Path, skips: SkipLog) -> list[Path]:
    if source.is_dir():
        return sorted(source.rglob("*.wav"))
    if source.suffix == ".jsonl" and source.is_file():
        return [source.parent / rel for rel in read_manifest(source, skips)]
    if source.is_file():
        return [source]
    skips.bad(source, "no such manifest, directory or audio file")
    return []


def find_audio(sources: list[str], skips: SkipLog) -> list[AudioExample]:
    """Every channel of every readable file of `sources`; bad files raise BadInputError (or are skipped)."""
    import sphn

    out: list[AudioExample] = []
    for source in sources:
        for path in _wav_paths(Path(source), skips):
            if not path.is_file():
                skips.bad(path, "no such audio file")
                continue
            try:
                reader = sphn.FileReader(str(path))
            except (ValueError, OSError) as e:
                skips.bad(path, f"cannot read audio ({e})")
                continue
            if reader.duration_sec <= 0 or reader.channels < 1:
                skips.bad(path, "empty audio")
                continue
            out.extend(AudioExample(path, c, reader.channels, reader.sample_rate, reader.duration_sec)
                       for c in range(reader.channels))
    if not out:
        raise BadInputError(f"no usable audio in {sources}")
    return out


def read_audio(ex: AudioExample, start: float, samples: int) -> np.ndarray:
    """`samples` samples of `ex` at 24 kHz from `start` seconds on (zeros past the end of the file)."""
    import sphn

    try:
        if ex.sample_rate == SAMPLE_RATE:
            pcm, _ = sphn.read(str(ex.path), start_sec=start, duration_sec=samples / SAMPLE_RATE)
            x = pcm[ex.channel]
        else:
            first = max(0.0, start - RESAMPLE_MARGIN)
            pcm, _ = sphn.read(str(ex.path), start_sec=first,
                               duration_sec=start - first + samples / SAMPLE_RATE + RESAMPLE_MARGIN)
            x = sphn.resample(pcm[ex.channel: ex.channel + 1], ex.sample_rate, SAMPLE_RATE)[0]
            x = x[round((start - first) * SAMPLE_RATE):]
    except (ValueError, OSError, IndexError) as e:
        raise BadInputError(f"{ex.path}: cannot read audio ({e})") from None
    out = np.zeros(samples, dtype=np.float32)
    n = min(samples, x.shape[-1])
    out[:n] = x[:n]
    return out


class Crops(torch.utils.data.Dataset):
    """Crop `i`: an example drawn in proportion to its duration, a uniform start; [1, samples] float32."""

    def __init__(self, examples: list[AudioExample], samples: int, seed: list[int]) -> None:
        self.examples = examples
        self.samples = samples
        self.seed = seed
        self.ends = np.cumsum([e.duration for e in examples])

    def __getitem__(self, i: int) -> torch.Tensor:
        rng = np.random.default_rng([*self.seed, i])
        k = min(int(np.searchsorted(self.ends, rng.random() * self.ends[-1], side="right")), len(self.examples) - 1)
        ex = self.examples[k]
        start = rng.random() * max(0.0, ex.duration - self.samples / SAMPLE_RATE)
        return torch.from_numpy(read_audio(ex, start, self.samples))[None]


def crop_batches(crops: Crops, first: int, last: int, batch_size: int, workers: int) -> torch.utils.data.DataLoader:
    """Batches of crops `first`, `first + 1`, ... `last - 1` in order (`workers` processes read them)."""
    return torch.utils.data.DataLoader(crops, batch_size=batch_size, sampler=range(first, last),
                                       num_workers=workers, drop_last=True,
                                       persistent_workers=False, prefetch_factor=4 if workers else None)
