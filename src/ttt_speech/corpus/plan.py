"""What each recording reads, in which voice, and where each sentence goes in time: all from the seed.

A recording is laid out from its sentences' durations alone, sequentially, with a random generator
seeded by (seed, recording): laying out more sentences extends a shorter layout unchanged, so the
builder can synthesize ahead in batches and still write the same corpus on every run.

Readings: one voice, consecutive sentences, short pauses (longer at paragraph ends). In a reading
with repeats, once `repeat_gap` plus one to two times `repeat` has passed and then every
`repeat_every`, a span of about `repeat` that ended at least `repeat_gap` earlier is played again:
the same audio, pauses included, and the same words.
Dialogues: two voices take turns of 1-3 consecutive sentences; only one speaks at a time. In a dialogue with
quotes, a share of the model's turns open by saying again a sentence the user said `quote_gap` to 2 x
`quote_gap` sentences earlier: the same words in the model's voice (`quote_sources`), so that recalling what the
user said, not what the model said, can be trained and scored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ttt_speech.corpus.audio import RATE

LEAD_IN, TAIL = 0.3, 0.5  # seconds of silence before the first and after the last sentence


@dataclass(frozen=True)
class Timing:
    """Lengths in seconds (the CLI takes minutes)."""

    target: float  # a recording ends with the first sentence that reaches this
    repeat_gap: float = 600.0
    repeat: float = 60.0
    repeat_every: float = 300.0


@dataclass(frozen=True)
class Recording:
    kind: str  # "reading" | "dialogue"
    index: int
    voices: tuple[str, ...]  # (reader,) or (model = left channel, user = right channel)
    source: str  # text source name
    first: int  # index of its first sentence in the source (it reads on from there, wrapping)
    repeats: bool
    seed: tuple[int, ...]
    quote_fraction: float = 0.0  # dialogues: share of the model's turns that open with a quote of the user
    quote_gap: int = 20  # ... of a user sentence this many to twice as many sentences earlier
    random_user: bool = False  # dialogues: the user says random words of the text (`random_words`), not its sentences

    @property
    def name(self) -> str:
        return f"{self.kind}s/{self.kind}_{self.index:03d}"


@dataclass(frozen=True)
class Placement:
    sentence: int  # index in the recording's sentence stream
    start: float  # seconds
    speaker: int  # 0: left channel (SPEAKER_MAIN), 1: right (SPEAKER_OTHER)
    repeat: int | None = None  # which repeat this is a copy for, None for a first reading


@dataclass
class Layout:
    placements: list[Placement] = field(default_factory=list)
    repeats: list[dict] = field(default_factory=list)  # {"first": [s, e], "again": [s, e], "sentences": [i, j)}
    end: float = 0.0  # end of the last sentence
    done: bool = False  # the target was reached (else more sentences are needed)

    @property
    def duration(self) -> float:
        return self.end + TAIL


def _sample(t: float) -> float:
    """A time on the sample grid, so that a repeat is a sample-exact copy."""
    return round(t * RATE) / RATE


def plan(recordings: int, dialogues: int, voices: list[str], sizes: dict[str, int], seed: int,
         repeat_fraction: float, quote_fraction: float = 0.0, quote_gap: int = 20,
         random_user: bool = False) -> list[Recording]:
    """Readings then dialogues; texts go round the sources, each recording starting in its own slice of its text."""
    if not voices:
        raise ValueError("no voice to read with")
    if dialogues and len(voices) < 2:
        raise ValueError(f"dialogues need two voices, got {voices}")
    rng = np.random.default_rng([seed, 0])
    names = sorted(sizes)
    order = rng.permutation(len(names))
    source = [names[order[i % len(names)]] for i in range(recordings + dialogues)]
    rotate = {n: int(rng.integers(sizes[n])) for n in names}
    first, seen = [], dict.fromkeys(names, 0)
    for s in source:
        share = source.count(s)
        first.append((rotate[s] + seen[s] * sizes[s] // share) % sizes[s])
        seen[s] += 1
    repeating = set(rng.permutation(recordings)[:round(repeat_fraction * recordings)].tolist())
    v0 = int(rng.integers(len(voices)))
    out = [Recording("reading", i, (voices[(v0 + i) % len(voices)],), source[i], first[i], i in repeating,
                     (seed, 1, i)) for i in range(recordings)]
    for d in range(dialogues):
        model = (v0 + d) % len(voices)
        user = (model + 1 + int(rng.integers(len(voices) - 1))) % len(voices)
        j = recordings + d
        out.append(Recording("dialogue", d, (voices[model], voices[user]), source[j], first[j], False, (seed, 2, d),
                             quote_fraction, quote_gap, random_user))
    return out


def quote_sources(seed: tuple[int, ...], speakers: list[int], fraction: float, gap: int) -> dict[int, int]:
    """Quotes among a dialogue's sentences (speakers: `turn_speakers`): sentence k -> the user's sentence j it
    says again. A model turn's first sentence is a quote with probability `fraction`, of a user sentence drawn
    from gap to 2 x gap sentences before it. Each k draws from its own seed and reads speakers[:k] only, so more
    sentences extend the quotes unchanged (the builder plans ahead in batches)."""
    out: dict[int, int] = {}
    for k in range(1, len(speakers)):
        if speakers[k] != 0 or speakers[k - 1] != 1:
            continue
        rng = np.random.default_rng([*seed, 2, k])
        said = [j for j in range(max(0, k - 2 * gap), k - gap + 1) if speakers[j] == 1]
        if rng.uniform() < fraction and said:
            out[k] = said[int(rng.integers(len(said)))]
    return out


def random_words(seed: tuple[int, ...], k: int, n: int, vocabulary: list[str]) -> str:
    """Sentence k of a dialogue as n words drawn from `vocabulary`, from its own seed: a user sentence that no
    training pass can make familiar, so a model that quotes it must have heard it (issue 24: quotes of the texts'
    own sentences were recited from the weights)."""
    rng = np.random.default_rng([*seed, 3, k])
    return " ".join(vocabulary[i] for i in rng.integers(len(vocabulary), size=n)).capitalize() + "."


def turn_speakers(seed: tuple[int, ...], n: int) -> list[int]:
    """Speaker (0/1) of each of a dialogue's first n sentences: turns of 1-3 sentences, the model first."""
    rng = np.random.default_rng([*seed, 0])
    out: list[int] = []
    while len(out) < n:
        out += [1 - out[-1] if out else 0] * int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
    return out[:n]


def layout_reading(durations: list[float], paragraphs: list[int], timing: Timing, rec: Recording) -> Layout:
    """Place a reading's first len(durations) sentences (and its repeats); see the module docstring.

    paragraphs: the paragraph of each sentence, one more than durations (the pause after the last depends on it).
    """
    rng = np.random.default_rng([*rec.seed, 1])
    out = Layout()
    t = LEAD_IN
    next_repeat = timing.repeat_gap + timing.repeat * (1 + rng.uniform()) if rec.repeats else math.inf
    i = 0
    while t < timing.target or not out.placements:
        t = _sample(t)
        if t >= next_repeat:
            span = _repeat_span(out.placements, durations, t - timing.repeat_gap, timing.repeat, rng)
            if span:
                a, b = span
                first, last = out.placements[a], out.placements[b - 1]
                s0, s1 = first.start, last.start + durations[last.sentence]
                out.placements += [Placement(p.sentence, t + p.start - s0, 0, len(out.repeats))
                                   for p in out.placements[a:b]]
                out.repeats.append({"first": [round(s0, 3), round(s1, 3)],
                                    "again": [round(t, 3), round(t + s1 - s0, 3)],
                                    "sentences": [first.sentence, last.sentence + 1]})
                t += s1 - s0 + rng.uniform(0.7, 1.2)
            next_repeat = t + timing.repeat_every
            continue
        if i >= len(durations):
            return out
        out.placements.append(Placement(i, t, 0))
        out.end = t + durations[i]
        new_paragraph = paragraphs[i + 1] != paragraphs[i]
        t = out.end + (rng.uniform(0.7, 1.2) if new_paragraph else rng.uniform(0.25, 0.6))
        i += 1
    out.end = max(out.end, max(p.start + durations[p.sentence] for p in out.placements))
    out.done = True
    return out


def _repeat_span(placed: list[Placement], durations: list[float], limit: float, length: float,
                 rng: np.random.Generator) -> tuple[int, int] | None:
    """Placement indices [a, b) of first readings that end by `limit`, about `length` seconds, unbroken by repeats."""
    def ok(j: int) -> bool:
        return placed[j].repeat is None and placed[j].start + durations[placed[j].sentence] <= limit

    starts = [j for j in range(len(placed)) if ok(j)]
    if not starts:
        return None
    a = starts[int(rng.integers(len(starts)))]
    b = a + 1
    while b < len(placed) and ok(b) and placed[b].start + durations[placed[b].sentence] - placed[a].start <= length:
        b += 1
    return a, b


def layout_dialogue(durations: list[float], speakers: list[int], timing: Timing, rec: Recording) -> Layout:
    """Place a dialogue's first len(durations) sentences: alternating turns, nobody speaking over anybody.

    speakers: turn_speakers(), one more than durations (the pause after the last depends on it).
    """
    rng = np.random.default_rng([*rec.seed, 1])
    out = Layout()
    t = LEAD_IN
    for i, d in enumerate(durations):
        t = _sample(t)
        out.placements.append(Placement(i, t, speakers[i]))
        out.end = t + d
        if out.end >= timing.target:
            out.done = True
            return out
        same = speakers[i + 1] == speakers[i]
        t = out.end + (rng.uniform(0.2, 0.5) if same else rng.uniform(0.3, 1.0))
    return out
