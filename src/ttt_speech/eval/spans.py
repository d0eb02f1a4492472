"""Loss on labelled spans of held-out sequences: does the model remember content it saw long ago?

A corpus reading that re-reads a passage from >= 10 minutes earlier (`make-corpus`, "repeats") gives
two spans per passage: "first" (the passage the first time, only its own short past to go on) and
"again" (the same words, far beyond any attention window). A model with memory predicts "again"
better than "first"; a sliding-window model cannot tell them apart.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

FRAME_RATE = 12.5  # Mimi frames per second


@dataclass(frozen=True)
class Span:
    label: str
    start: int  # position (frame), inclusive
    end: int  # exclusive


def repeat_spans(corpus_dir: str | Path, frame_rate: float = FRAME_RATE) -> dict[str, list[Span]]:
    """source wav (as in the manifest / token index) -> its "first" and "again" spans, in frames."""
    path = Path(corpus_dir) / "corpus.json"
    if not path.exists():
        raise FileNotFoundError(f"{corpus_dir}: no corpus.json (expected a `ttt-speech make-corpus` directory)")
    out: dict[str, list[Span]] = {}
    for rec in json.loads(path.read_text())["recordings"]:
        spans = [Span(label, round(rep[label][0] * frame_rate), round(rep[label][1] * frame_rate))
                 for rep in rec.get("repeats", []) for label in ("first", "again")]
        if spans:
            out[rec["path"]] = spans
    return out


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
