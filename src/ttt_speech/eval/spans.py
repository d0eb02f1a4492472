"""Loss on labelled spans of held-out sequences: does the model remember content it saw long ago?

A corpus reading that re-reads a passage from >= 10 minutes earlier (`make-corpus`, "repeats") gives
two spans per passage: "first" (the passage the first time, only its own short past to go on) and
"again" (the same words, far beyond any attention window). A model with memory predicts "again"
better than "first"; a sliding-window model cannot tell them apart.

`copy_probes` makes the same test at chosen distances: held-out excerpts with a span copied verbatim
`gap` frames after its source, so recall can be plotted against how far back the content lies.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ttt_speech.audio import FRAME_RATE
from ttt_speech.errors import UsageError
from ttt_speech.eval.data import Sequence


@dataclass(frozen=True)
class Span:
    label: str
    start: int  # position (frame), inclusive
    end: int  # exclusive


def repeat_spans(corpus_dir: str | Path, frame_rate: float = FRAME_RATE) -> dict[str, list[Span]]:
    """source wav (as in the manifest / token index) -> its "first" and "again" spans, in frames.

    `corpus_dir` is one make-corpus directory, or a directory of them: token shards packed from several
    corpora name each source under its corpus's folder ("devil/readings/r0.wav"), so that is the key here too.
    """
    return _corpus_spans(corpus_dir, frame_rate, "repeats", ("first", "again"))


def quote_spans(corpus_dir: str | Path, frame_rate: float = FRAME_RATE) -> dict[str, list[Span]]:
    """dialogue wav -> its quotes' spans in frames, in pairs: "said" (the user's sentence, on the user's channel)
    then "quoted" (the model saying the same words again later; `make-corpus --quote-fraction`)."""
    return _corpus_spans(corpus_dir, frame_rate, "quotes", ("said", "quoted"))


def _corpus_spans(corpus_dir: str | Path, frame_rate: float, key: str, labels: tuple[str, str]
                  ) -> dict[str, list[Span]]:
    root = Path(corpus_dir)
    path = root / "corpus.json"
    if path.exists():
        return _spans(path, "", frame_rate, key, labels)
    nested = sorted(root.glob("*/corpus.json"))
    if not nested:
        raise FileNotFoundError(f"{corpus_dir}: no corpus.json in it or its folders "
                                "(expected a `ttt-speech make-corpus` directory, or a directory of them)")
    return {k: v for p in nested for k, v in _spans(p, p.parent.name + "/", frame_rate, key, labels).items()}


def _spans(path: Path, prefix: str, frame_rate: float, key: str, labels: tuple[str, str]) -> dict[str, list[Span]]:
    out: dict[str, list[Span]] = {}
    for rec in json.loads(path.read_text())["recordings"]:
        spans = [Span(label, round(entry[label][0] * frame_rate), round(entry[label][1] * frame_rate))
                 for entry in rec.get(key, []) for label in labels]
        if spans:
            out[prefix + rec["path"]] = spans
    return out


def quotes_in(sequences: list[Sequence], spans: dict[str, list[Span]]) -> list[tuple[int, Span, Span]]:
    """(sequence index, said, quoted) of every quote (`quote_spans`) that lies whole inside its sequence: what
    `quote_probes` excerpts, and what a caller counts before building any probe."""
    return [(i, said, quoted) for i, seq in enumerate(sequences) for said, quoted in
            zip(spans.get(seq.source, [])[::2], spans.get(seq.source, [])[1::2]) if quoted.end <= seq.length]


def quote_probes(sequences: list[Sequence], spans: dict[str, list[Span]], context: int, user_rows: slice,
                 replace_source: bool = False) -> tuple[list[Sequence], dict[str, list[Span]]]:
    """One excerpt per quote of the held-out dialogues: `context` frames before the user's sentence, to the end of
    the model's quote, with its spans [said, quoted] (`quote_spans`, shifted into the excerpt).

    The model says again what the user said: only the user's channel (`user_rows` of the tokens) carries the
    source, so `replace_source` puts another quote's user sentence (from another dialogue where there is one,
    tiled if shorter) on those rows at the same place, the model's own rows unchanged: the control with nothing
    to recall and the same amount of speech heard.
    """
    if context < 0:
        raise UsageError(f"quote probes: context {context} >= 0")
    found = quotes_in(sequences, spans)
    probes, out = [], {}
    for n, (i, said, quoted) in enumerate(found):
        lo = max(0, said.start - context)
        tokens = sequences[i].tokens[:, lo:quoted.end].clone()
        if replace_source:
            others = [f for f in found[n + 1:] + found[:n] if f[0] != i] or found[n + 1:] + found[:n]
            if not others:
                raise UsageError("source-replaced quote probes need at least two quotes in the held-out data")
            j, other, _ = others[0]
            source = sequences[j].tokens[user_rows, other.start:other.end]
            length = said.end - said.start
            tokens[user_rows, said.start - lo:said.end - lo] = source.repeat(1, -(-length // source.shape[-1]))[:,
                                                                                                              :length]
        name = f"{sequences[i].name}@quote{said.start}"
        probes.append(Sequence(name, tokens, name))
        out[name] = [Span("said", said.start - lo, said.end - lo), Span("quoted", quoted.start - lo, quoted.end - lo)]
    return probes, out


def copy_label(kind: str, gap: int) -> str:
    """The span label of a copy probe's source ("first") or copy ("again") at distance `gap`."""
    return f"{kind}@{gap}"


def copy_probes(sequences: list[Sequence], gaps: list[int], span: int, context: int, per_sequence: int,
                replace_source: bool = False) -> tuple[list[Sequence], dict[str, list[Span]]]:
    """Excerpts of `sequences` with a span copied `gap` frames after its source, and their spans.

    Each probe is `context` frames, the source span (label "first"), then more of the sequence with
    the copy ("again") starting `gap` frames after the source's start: every copied frame lies exactly
    `gap` frames after its original, so with gap > attention window only a memory can recall it. Up to
    `per_sequence` non-overlapping excerpts per sequence and gap, probes of one gap listed together
    (they have one length, so they batch without padding). `replace_source`: the same probes with the
    source span replaced by other speech (from the next sequence) and the copy unchanged, the control
    with nothing to recall at the same place.
    """
    if span < 1 or context < 0 or per_sequence < 1:
        raise UsageError(f"copy probes: span {span} >= 1, context {context} >= 0, per sequence {per_sequence} >= 1")
    probes, spans = [], {}
    for gap in sorted(gaps):
        if gap < span:
            raise UsageError(f"copy gap {gap} < copied span {span}: the copy would overlap its source")
        length = context + gap + span
        made = 0
        for i, seq in enumerate(sequences):
            for k in range(min(per_sequence, seq.length // length)):
                lo = k * length
                tokens = seq.tokens[:, lo:lo + length].clone()
                src = context
                tokens[:, src + gap:src + gap + span] = tokens[:, src:src + span]
                if replace_source:
                    tokens[:, src:src + span] = _other_speech(sequences, i, lo + src + seq.length // 2, span)
                name = f"{seq.name}@{lo}+copy{gap}"
                probes.append(Sequence(name, tokens, name))
                spans[name] = [Span(copy_label("first", gap), src, src + span),
                               Span(copy_label("again", gap), src + gap, src + gap + span)]
                made += 1
        if not made:
            raise UsageError(f"copy gap {gap}: no held-out sequence has the {length} frames a probe needs "
                             f"(context {context} + gap + span {span})")
    return probes, spans


def _other_speech(sequences: list[Sequence], i: int, at: int, span: int) -> Tensor:
    """`span` frames of the sequence after sequence i (itself when alone: half its length away)."""
    other = sequences[(i + 1) % len(sequences)]
    if other.length < 2 * span:
        raise ValueError(f"source-replaced probes: {other.name} has {other.length} frames, fewer than 2 x span {span}")
    start = at % (other.length - span + 1)
    return other.tokens[:, start:start + span]


class SpanLosses:
    """Sum and count of token losses per (label, stream) over the spans of the scored sequences."""

    def __init__(self, streams: int) -> None:
        self.total: dict[str, Tensor] = defaultdict(lambda: torch.zeros(streams, dtype=torch.float64))
        self.count: dict[str, Tensor] = defaultdict(lambda: torch.zeros(streams, dtype=torch.int64))

    def add(self, losses: Tensor, spans: list[Span]) -> None:
        """Accumulate one sequence's [S, T] losses (NaN = not scored) over `spans`."""
        for span in spans:
            part = losses[:, span.start:span.end]
            ok = ~torch.isnan(part)
            self.total[span.label] += torch.where(ok, part.double(), 0.0).sum(-1)
            self.count[span.label] += ok.sum(-1)

    def means(self, groups: dict[str, list[int]]) -> dict[str, dict[str, float | None]]:
        """label -> {group name: mean loss over the group's streams} (each token weighs the same)."""
        out: dict[str, dict[str, float | None]] = {}
        for label in sorted(self.total):
            out[label] = {}
            for name, idx in groups.items():
                n = int(self.count[label][idx].sum())
                out[label][name] = float(self.total[label][idx].sum()) / n if n else None
        return out
