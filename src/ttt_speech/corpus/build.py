"""Build a corpus directory: synthesize sentences in parallel, lay recordings out, write wavs + transcripts.

    out/corpus.json                 voices, texts, seed, settings, every recording with its repeats (quotes) and split
    out/train.jsonl, out/val.jsonl  {"path": "readings/reading_000.wav", "duration": 1203.4} per line
    out/readings/reading_000.wav    stereo 24 kHz 16-bit: the reader on the left (model) channel, right silent
    out/readings/reading_000.json   {"alignments": [[word, [start, end], "SPEAKER_MAIN"], ...], "voices": {...}}
    out/dialogues/dialogue_000.wav  left: the model's voice (SPEAKER_MAIN), right: the user's (SPEAKER_OTHER)

Sentences are synthesized in batches over a process pool, ahead of where each recording's layout
has got to; a recording is written as soon as its layout reaches its length, so only a few are in
memory at once. Everything written depends on the settings and the seed alone, not on the number
of processes or the order batches finish in. The split is by recording (never by chunk), and the
recordings read disjoint slices of their texts while the texts last.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ttt_speech.corpus.audio import RATE, estimate_word_times, level, trim, write_wav
from ttt_speech.corpus.engines import DEFAULT_VOICES, Engine, Speech, available_voices, split_voice
from ttt_speech.corpus.plan import (Layout, Recording, Timing, layout_dialogue, layout_reading, plan, quote_sources,
                                    random_words, turn_speakers)
from ttt_speech.corpus.texts import SOURCES, Sentence, load_sources, vocabulary
from ttt_speech.dsp import resample

FORMAT, VERSION = "ttt-speech/corpus", 1
SPEAKERS = ("SPEAKER_MAIN", "SPEAKER_OTHER")  # left / right channel: what train/tokenize.py reads
SECONDS_PER_WORD = 0.4  # for planning how far ahead to synthesize only


@dataclass(frozen=True)
class CorpusConfig:
    recordings: int = 4
    dialogues: int = 2
    minutes: float = 20.0  # per reading
    dialogue_minutes: float | None = None  # default: `minutes`
    voices: tuple[str, ...] = ()  # "engine:voice"; empty: the installed ones of engines.DEFAULT_VOICES
    texts: tuple[str, ...] = tuple(SOURCES)
    seed: int = 0
    repeat_fraction: float = 0.5  # share of readings that re-read earlier passages
    repeat_gap_minutes: float = 10.0  # a re-read passage ended at least this long before
    repeat_minutes: float = 1.0  # length of a re-read passage
    repeat_every_minutes: float = 5.0
    quote_fraction: float = 0.0  # share of the model's turns in a dialogue that open by quoting the user
    quote_gap_sentences: int = 20  # ... a sentence the user said this many to twice as many sentences before
    random_user_words: bool = False  # dialogues: the user's sentences are random words of the text (plan.random_words)
    val_fraction: float = 0.1
    only: tuple[str, ...] = ()  # recording names ("reading_027"): just these of the plan, as the whole corpus has them
    jobs: int = 0  # synthesis processes; 0: one per CPU
    batch: int = 16  # sentences per synthesis task
    progress: bool = True


@dataclass
class Clip:
    audio: np.ndarray  # float32 mono at 24 kHz, trimmed and levelled
    words: list[tuple[str, float, float]]  # (word, start, end) seconds within the clip


@dataclass
class BuildReport:
    out: Path
    recordings: int
    audio_seconds: float
    wall_seconds: float
    cpu_seconds: float  # this process and its synthesis processes (and theirs)
    voices_unavailable: dict[str, str] = field(default_factory=dict)


def prepare(speech: Speech, text: str) -> Clip:
    """Engine output -> 24 kHz, silence trimmed, levelled, with a time for every word of `text`."""
    audio, cut = trim(resample(speech.audio, speech.rate, RATE))
    audio = level(audio)
    words = text.split()
    dur = len(audio) / RATE
    if speech.words is not None and len(speech.words) == len(words):
        times = []
        for s, e in speech.words:  # engine times, shifted by the trim, kept inside the clip and in order
            s = min(max(s - cut, times[-1][1] if times else 0.0), dur)
            times.append((s, min(max(e - cut, s), dur)))
    else:
        times = estimate_word_times(words, audio)
    return Clip(audio, [(w, round(s, 3), round(e, 3)) for w, (s, e) in zip(words, times)])


def synthesize(engine: Engine, voice: str, texts: list[str]) -> list[Clip]:
    """One synthesis task (runs in a pool process)."""
    return [prepare(s, t) for s, t in zip(engine.synthesize(voice, texts), texts)]


class _Inline(Executor):
    """Runs each task at once, in this process (jobs=1: no pool to start, and tracebacks stay readable)."""

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[override]
        f: Future = Future()
        try:
            f.set_result(fn(*args, **kwargs))
        except Exception as e:  # handed to the caller through the future, as a pool does
            f.set_exception(e)
        return f


@dataclass
class _Progress:
    rec: Recording
    text: list[Sentence]
    target: float
    clips: dict[int, Clip] = field(default_factory=dict)
    requested: int = 0
    waiting: int = 0  # tasks in flight
    pending_words: int = 0
    done: bool = False
    quotes: dict[int, int] = field(default_factory=dict)  # a dialogue's quotes so far (plan.quote_sources)
    quotes_to: int = 0  # sentences the quotes were drawn for
    words: list[str] = field(default_factory=list)  # the text's vocabulary (texts.vocabulary), for random user words

    def text_index(self, k: int) -> int:
        """Which sentence of the recording's text sentence k says: a quote says its user sentence's, and the
        sentences after it read on from where the text was."""
        if self.rec.quote_fraction and k >= self.quotes_to:
            self.quotes_to = max(k + 1, 2 * self.quotes_to)
            self.quotes = quote_sources(self.rec.seed, turn_speakers(self.rec.seed, self.quotes_to),
                                        self.rec.quote_fraction, self.rec.quote_gap)
        if k in self.quotes:
            return self.text_index(self.quotes[k])
        return k - sum(q < k for q in self.quotes)

    def sentence(self, k: int) -> Sentence:
        i = self.text_index(k)
        if i >= len(self.text):
            raise ValueError(f"{self.rec.name}: text {self.rec.source!r} ran out ({len(self.text)} sentences); "
                             "shorten the recordings or add texts")
        if k in self.quotes:  # the user's sentence again, random words included
            return self.sentence(self.quotes[k])
        read = self.text[(self.rec.first + i) % len(self.text)]
        if not (self.rec.random_user and turn_speakers(self.rec.seed, k + 1)[k] == 1):
            return read
        return Sentence(random_words(self.rec.seed, k, len(read.text.split()), self.words), read.paragraph)

    def missing_seconds(self) -> float:
        """About how much more audio to ask for: 10 % past the target, counting what is in flight."""
        have = sum(len(c.audio) / RATE + 0.45 for c in self.clips.values()) + self.pending_words * SECONDS_PER_WORD
        return 1.1 * self.target - have

    def wants_more(self) -> bool:
        return not self.done and (self.waiting == 0 or self.missing_seconds() > 0)


def _layout(p: _Progress, timing: Timing) -> Layout:
    n = 0
    while n in p.clips:
        n += 1
    durations = [len(p.clips[i].audio) / RATE for i in range(n)]
    if p.rec.kind == "reading":
        return layout_reading(durations, [p.sentence(i).paragraph for i in range(n + 1)], timing, p.rec)
    return layout_dialogue(durations, turn_speakers(p.rec.seed, n + 1), timing, p.rec)


def render(layout: Layout, clips: dict[int, Clip]) -> tuple[np.ndarray, list[list]]:
    """Stereo audio [2, samples] and the alignments, in time order, of a finished layout."""
    audio = np.zeros((2, round(layout.duration * RATE)), np.float32)
    alignments: list[list] = []
    for p in layout.placements:
        clip = clips[p.sentence]
        at = round(p.start * RATE)
        audio[p.speaker, at:at + len(clip.audio)] += clip.audio
        alignments += [[w, [round(p.start + s, 3), round(p.start + e, 3)], SPEAKERS[p.speaker]]
                       for w, s, e in clip.words]
    return audio, alignments


def _write(out: Path, p: _Progress, layout: Layout) -> dict:
    """Write one recording's wav and transcript; its corpus.json entry."""
    audio, alignments = render(layout, p.clips)
    voices = dict(zip(SPEAKERS, p.rec.voices))
    wav = out / f"{p.rec.name}.wav"
    write_wav(wav, audio)
    tmp = wav.with_name(f".{wav.stem}.json.tmp")
    tmp.write_text(json.dumps({"alignments": alignments, "voices": voices}) + "\n")
    os.replace(tmp, wav.with_suffix(".json"))
    read = max(p.text_index(pl.sentence) for pl in layout.placements) + 1
    entry = {"path": f"{p.rec.name}.wav", "kind": p.rec.kind, "duration": round(audio.shape[1] / RATE, 3),
             "voices": voices, "text": {"source": p.rec.source, "first_sentence": p.rec.first, "sentences": read},
             "words": len(alignments),
             "repeats": [{**r, "gap": round(r["again"][0] - r["first"][1], 3)} for r in layout.repeats]}
    if p.rec.kind == "dialogue":
        entry["quotes"] = placed_quotes(layout, p.clips, p.quotes)
    return entry


def placed_quotes(layout: Layout, clips: dict[int, Clip], sources: dict[int, int]) -> list[dict]:
    """A dialogue's quotes as placed: the user's sentence ("said", right channel) and the model saying it again
    ("quoted", left channel), [start, end] in seconds, the sentence indices, and the gap between them."""
    at = {pl.sentence: pl.start for pl in layout.placements}
    out = []
    for k, j in sorted(sources.items()):
        if k in at and j in at:
            said = [round(at[j], 3), round(at[j] + len(clips[j].audio) / RATE, 3)]
            quoted = [round(at[k], 3), round(at[k] + len(clips[k].audio) / RATE, 3)]
            out.append({"said": said, "quoted": quoted, "sentences": [j, k], "gap": round(quoted[0] - said[1], 3)})
    return out


def split(entries: list[dict], val_fraction: float, seed: int) -> set[str]:
    """Paths of held-out recordings: ceil(val_fraction x n) of each kind (none of a kind with < 2), chosen
    by the seed; readings with repeats and dialogues with quotes go first, so held-out data can score them."""
    held: set[str] = set()
    rng = np.random.default_rng([seed, 3])
    for kind in ("reading", "dialogue"):
        mine = [e for e in entries if e["kind"] == kind]
        if len(mine) < 2 or val_fraction <= 0:
            continue
        order = [mine[i] for i in rng.permutation(len(mine))]
        order.sort(key=lambda e: not (e["repeats"] or e.get("quotes")))
        held |= {e["path"] for e in order[:min(len(mine) - 1, math.ceil(val_fraction * len(mine)))]}
    return held


def _only(recs: list[Recording], names: tuple[str, ...]) -> list[Recording]:
    """The planned recordings named in `names` (all if empty): a held-out set of a large corpus rebuilt exactly,
    without synthesizing the rest (each recording depends only on the plan, never on the others)."""
    if not names:
        return recs
    have = {r.name.split("/")[1]: r for r in recs}
    if unknown := [n for n in names if n not in have]:
        n = {k: sum(r.kind == k for r in recs) for k in ("reading", "dialogue")}
        raise ValueError(f"--only names {', '.join(unknown)}, not in this plan ({n['reading']} readings, "
                         f"{n['dialogue']} dialogues, numbered from 000): raise --recordings / --dialogues or fix "
                         "the names")
    return [have[n] for n in dict.fromkeys(names)]


def _voices(cfg: CorpusConfig) -> tuple[list[str], dict[str, str]]:
    if cfg.voices:
        for v in cfg.voices:
            split_voice(v)  # raises, naming what to install
        return list(dict.fromkeys(cfg.voices)), {}
    voices, skipped = available_voices(DEFAULT_VOICES)
    if not voices:
        raise RuntimeError("no speech engine is installed:\n  " + "\n  ".join(skipped.values()))
    return voices, skipped


def build(out: str | Path, cfg: CorpusConfig) -> BuildReport:
    """Write the corpus described in the module docstring into `out` (which must not hold one already)."""
    out = Path(out)
    if (out / "corpus.json").exists():
        raise FileExistsError(f"{out} already holds a corpus (corpus.json); choose another directory")
    voices, skipped = _voices(cfg)
    texts = load_sources(list(cfg.texts))
    recs = plan(cfg.recordings, cfg.dialogues, voices, {n: len(s) for n, s in texts.items()}, cfg.seed,
                cfg.repeat_fraction, cfg.quote_fraction, cfg.quote_gap_sentences, cfg.random_user_words)
    recs = _only(recs, cfg.only)
    minutes = {"reading": cfg.minutes, "dialogue": cfg.dialogue_minutes or cfg.minutes}
    timings = {k: Timing(60 * m, 60 * cfg.repeat_gap_minutes, 60 * cfg.repeat_minutes, 60 * cfg.repeat_every_minutes)
               for k, m in minutes.items()}
    for kind in ("readings", "dialogues"):
        (out / kind).mkdir(parents=True, exist_ok=True)
    words = {n: vocabulary(s) for n, s in texts.items()} if cfg.random_user_words else {}  # once a text: ~0.2 s (KJV)
    states = [_Progress(r, texts[r.source], timings[r.kind].target, words=words.get(r.source, [])) for r in recs]
    jobs = cfg.jobs or os.cpu_count() or 1
    start, cpu0 = time.perf_counter(), _cpu()
    entries: list[dict] = []
    bar = tqdm(total=round(sum(s.target for s in states)), unit="s", desc="audio", disable=not cfg.progress,
               dynamic_ncols=True)
    inflight: dict[Future, tuple[_Progress, list[int]]] = {}
    with (ProcessPoolExecutor(jobs) if jobs > 1 else _Inline()) as pool:
        while not all(s.done for s in states):
            for s in states:
                while len(inflight) < 2 * jobs and s.wants_more():
                    inflight.update(_submit(pool, s, cfg.batch))
            finished, _ = wait(inflight, return_when=FIRST_COMPLETED)
            for f in finished:
                s, idx = inflight.pop(f)
                clips = f.result()
                s.clips.update(zip(idx, clips))
                s.waiting -= 1
                s.pending_words -= sum(len(s.sentence(i).text.split()) for i in idx)
                bar.update(min(round(sum(len(c.audio) for c in clips) / RATE), bar.total - bar.n))
                if s.done:
                    continue
                layout = _layout(s, timings[s.rec.kind])
                if layout.done:
                    entries.append(_write(out, s, layout))
                    s.done, s.clips = True, {}
        for f in inflight:  # batches synthesized past the end of their recording
            f.cancel()
    bar.update(bar.total - bar.n)
    bar.close()
    entries.sort(key=lambda e: e["path"])
    held = split(entries, cfg.val_fraction, cfg.seed)
    for e in entries:
        e["split"] = "val" if e["path"] in held else "train"
    for name in ("train", "val"):
        lines = [json.dumps({"path": e["path"], "duration": e["duration"]}) for e in entries if e["split"] == name]
        (out / f"{name}.jsonl").write_text("".join(line + "\n" for line in lines))
    meta = {"format": FORMAT, "version": VERSION, "seed": cfg.seed, "sample_rate": RATE,
            "settings": {k: v for k, v in asdict(cfg).items() if k not in ("jobs", "progress")},
            "voices": {v: {"recordings": sum(v in e["voices"].values() for e in entries)} for v in voices},
            "texts": {n: {"title": SOURCES[n].title, "debian_package": SOURCES[n].package, "sentences": len(t),
                          "words": sum(len(s.text.split()) for s in t)} for n, t in texts.items()},
            "speakers": {"SPEAKER_MAIN": "left channel (the model)", "SPEAKER_OTHER": "right channel (the user)"},
            "recordings": entries}
    (out / "corpus.json").write_text(json.dumps(meta, indent=1) + "\n")
    return BuildReport(out, len(entries), sum(e["duration"] for e in entries), time.perf_counter() - start,
                       _cpu() - cpu0, skipped)


def _submit(pool: Executor, s: _Progress, batch: int) -> dict[Future, tuple[_Progress, list[int]]]:
    """Ask for the next sentences of a recording (at most `batch`, about as many as it still needs): one task
    per voice in it."""
    idx: list[int] = []
    words, need = 0, s.missing_seconds() / SECONDS_PER_WORD
    while len(idx) < batch and (not idx or words < need):
        idx.append(s.requested + len(idx))
        words += len(s.sentence(idx[-1]).text.split())
    speakers = turn_speakers(s.rec.seed, idx[-1] + 1) if s.rec.kind == "dialogue" else [0] * (idx[-1] + 1)
    futures = {}
    for who, name in enumerate(s.rec.voices):
        mine = [i for i in idx if speakers[i] == who]
        if mine:
            engine, voice = split_voice(name)
            futures[pool.submit(synthesize, engine, voice, [s.sentence(i).text for i in mine])] = (s, mine)
            s.waiting += 1
    s.requested += len(idx)
    s.pending_words += words
    return futures


def _cpu() -> float:
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))
