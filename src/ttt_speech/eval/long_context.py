"""Teacher-forced long-context evaluation: per-position loss, where quality degrades, what it costs.

One streaming pass per batch of held-out sequences, up to the longest requested length, gives the
loss of every position of every stream; everything else is read off those per-position losses:

- buckets: mean loss per stream over positions [0, 1), [1, 2), [2, 4), [4, 8), ... (log2 buckets,
  the x axis of the TTT paper's loss-vs-position figure);
- quality at a length L: exp(-mean loss over positions [L/2, L)) of the quality streams (text by
  default), i.e. the per-token probability the model gives the truth at depth L, geometric mean;
- degradation rule (the seeds' Phase 2): the model's own short-context baseline is the quality at
  `baseline_length` B (positions [B/2, B)); the first requested length whose quality is below
  `threshold` (0.9) x baseline is reported as where the model degrades;
- inside vs beyond the attention window W: mean loss over positions [W/2, W) (attention sees most of
  their past; the start-up positions, which see almost nothing, are left out) against t >= W;
- cost: step time (ms per position) and peak memory over [L/2, L) of each length.

An out-of-memory error ends the pass for that model: the lengths it had reached keep their
numbers, the rest are reported as OOM, and the evaluation goes on with the next model.
"""

from __future__ import annotations

import gc
import itertools
import math
import time
import typing as tp
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from ttt_speech.errors import UsageError
from ttt_speech.eval.data import Sequence
from ttt_speech.eval.models import Scorer
from ttt_speech.eval.copies import ProbeLosses, summarize
from ttt_speech.eval.spans import Span, SpanLosses

OOM_ERRORS: tuple[type[BaseException], ...] = (torch.cuda.OutOfMemoryError, MemoryError)


def bucket_edges(length: int) -> list[int]:
    """[0, 1, 2, 4, 8, ..., length]: log2 buckets of positions, the last one cut at `length`."""
    edges, e = [0], 1
    while e < length:
        edges.append(e)
        e *= 2
    return edges + [length] if length > 0 else edges


def window(length: int) -> tuple[int, int]:
    """Positions whose loss defines the quality at `length`: [length // 2, length)."""
    return length // 2, length


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocator memory since the last reset on CUDA; process RSS (a proxy) on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    from ttt_speech.moshi.generate import rss_bytes

    return rss_bytes()


class Meter:
    """Per-position wall time and peak memory, kept per requested-length window as the stream passes it."""

    def __init__(self, lengths: list[int], device: torch.device) -> None:
        self.windows = {L: window(L) for L in lengths}
        self.device = device
        self.seconds = {L: 0.0 for L in lengths}
        self.steps = {L: 0 for L in lengths}
        self.peak = {L: 0 for L in lengths}
        self.last_step = 0
        self.last_time = time.perf_counter()
        self._sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def start(self) -> None:
        self._sync()
        self.last_step, self.last_time = 0, time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def __call__(self, step: int) -> None:
        """`tick` of a scorer: the stream has run `step` positions."""
        self._sync()
        now = time.perf_counter()
        memory = peak_memory_bytes(self.device)
        for L, (lo, hi) in self.windows.items():
            overlap = min(step, hi) - max(self.last_step, lo)
            if overlap > 0:
                self.seconds[L] += (now - self.last_time) * overlap / (step - self.last_step)
                self.steps[L] += overlap
                self.peak[L] = max(self.peak[L], memory)
        self.last_step, self.last_time = step, now


@dataclass
class LengthResult:
    """Quality and cost of one model at one requested length."""

    length: int
    status: str  # "ok", "oom" (ran out of memory before reaching it), "no data" (sequences too short)
    loss: float | None = None  # mean loss (nats) of the quality streams over [L/2, L)
    quality: float | None = None  # exp(-loss)
    ratio: float | None = None  # quality / baseline quality
    step_ms: float | None = None  # wall time per position over [L/2, L), batch included
    peak_memory_bytes: int | None = None
    positions: int = 0  # scored (sequence, position) pairs in [L/2, L)


@dataclass
class ModelResult:
    """Everything the teacher-forced evaluation found for one model."""

    name: str
    kind: str
    streams: list[str]
    quality_streams: list[str]
    attention_window: int | None
    baseline_length: int
    baseline_loss: float | None
    baseline_quality: float | None
    threshold: float
    lengths: list[LengthResult]
    degraded_at: int | None  # first length with quality < threshold x baseline
    oom_at: int | None  # first length not reached for lack of memory
    oom_message: str | None
    bucket_edges: list[int]
    bucket_loss: dict[str, list[float | None]]  # stream -> mean loss per bucket
    bucket_count: dict[str, list[int]]  # stream -> scored tokens per bucket
    loss_inside_window: float | None  # quality streams, positions [W/2, W) of the attention window W
    loss_beyond_window: float | None  # quality streams, positions t >= attention window
    sequences: int = 0
    notes: list[str] = field(default_factory=list)
    span_loss: dict[str, dict[str, float | None]] = field(default_factory=dict)  # label -> text/audio mean loss
    copy_loss: dict[int, dict[str, tp.Any]] = field(default_factory=dict)  # gap -> copies.summarize's entry
    quote_loss: dict[int, dict[str, tp.Any]] = field(default_factory=dict)  # quote_bucket -> the same

    @property
    def window_gap(self) -> float | None:
        """Loss beyond the attention window minus inside it (nats; > 0: worse out of reach of attention)."""
        if self.loss_inside_window is None or self.loss_beyond_window is None:
            return None
        return self.loss_beyond_window - self.loss_inside_window

    def to_dict(self) -> dict[str, tp.Any]:
        return asdict(self) | {"window_gap": self.window_gap}


@dataclass
class PositionLosses:
    """Sum and count of token losses per (stream, position), over all evaluated sequences."""

    total: Tensor  # [S, T] float64
    count: Tensor  # [S, T] int64

    @classmethod
    def empty(cls, streams: int, length: int) -> PositionLosses:
        return cls(torch.zeros(streams, length, dtype=torch.float64), torch.zeros(streams, length, dtype=torch.int64))

    def add(self, losses: Tensor) -> None:
        """Accumulate a [B, S, T'] batch of losses (NaN = not scored), T' <= T."""
        ok = ~torch.isnan(losses)
        T = losses.shape[-1]
        self.total[:, :T] += torch.where(ok, losses.double(), 0.0).sum(0)
        self.count[:, :T] += ok.sum(0)

    def mean(self, streams: list[int], lo: int, hi: int) -> tuple[float | None, int]:
        """Mean loss over tokens of `streams` at positions [lo, hi) (each token weighs the same)."""
        total = float(self.total[streams, lo:hi].sum())
        count = int(self.count[streams, lo:hi].sum())
        return (total / count if count else None), count

    def buckets(self, stream: int, edges: list[int]) -> tuple[list[float | None], list[int]]:
        means, counts = [], []
        for lo, hi in itertools.pairwise(edges):
            m, c = self.mean([stream], lo, hi)
            means.append(m)
            counts.append(c)
        return means, counts


def quality_indices(streams: tuple[str, ...], which: str) -> list[int]:
    """Streams the quality number averages: "text", "audio" (all codebooks) or "all"."""
    if which == "all":
        return list(range(len(streams)))
    picked = [i for i, s in enumerate(streams) if (s == "text") == (which == "text")]
    if not picked:
        raise ValueError(f"quality stream {which!r}: the model has only {list(streams)}")
    return picked


def batches(sequences: list[Sequence], rows: int, length: int, batch_size: int,
            pad: int) -> tp.Iterator[tuple[list[Sequence], Tensor]]:
    """(sequences, [B, rows, <=length] tokens) batches, each cut at `length`, short ones padded with `pad`."""
    for i in range(0, len(sequences), batch_size):
        group = sequences[i:i + batch_size]
        for seq in group:
            if seq.tokens.shape[0] < rows:
                raise UsageError(f"{seq.name}: has {seq.tokens.shape[0]} rows, the model reads {rows} "
                                 "(text + every audio codebook, model's then user's)")
        T = min(length, max(seq.length for seq in group))
        out = torch.full((len(group), rows, T), pad, dtype=torch.long)
        for b, seq in enumerate(group):
            n = min(T, seq.length)
            out[b, :, :n] = seq.tokens[:rows, :n]
        yield group, out


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def evaluate(scorer: Scorer, sequences: list[Sequence], lengths: list[int], *, baseline_length: int | None = None,
             threshold: float = 0.9, quality_stream: str = "text", batch_size: int = 1,
             progress: bool = True, spans: dict[str, list[Span]] | None = None) -> ModelResult:
    """Teacher-forced streaming evaluation of one model at `lengths` (positions, i.e. frames or tokens).

    `spans` (source -> labelled position ranges, e.g. `repeat_spans`) adds the mean loss per label.
    """
    lengths = sorted(set(lengths))
    if not lengths or lengths[0] < 2:
        raise ValueError(f"lengths must be >= 2, got {lengths}")
    base = baseline_length or max(2, lengths[0] // 4)
    longest = max(lengths[-1], base)
    S = len(scorer.streams)
    acc = PositionLosses.empty(S, longest)
    meter = Meter(lengths, scorer.device)
    reached, oom_message, notes = longest, None, []
    total = sum(min(longest + scorer.lookahead, s.length) for s in sequences)
    bar = tqdm(total=total, unit="pos", disable=not progress, dynamic_ncols=True, desc=scorer.name)
    span_acc = SpanLosses(S)
    for group, tokens in batches(sequences, scorer.rows(), longest + scorer.lookahead, batch_size,
                                 scorer.pad_value()):
        B, _, T = tokens.shape
        out = torch.full((B, S, T), torch.nan)
        meter.start()

        def tick(step: int, _B: int = B) -> None:
            meter(step)
            bar.update(_B)

        try:
            scorer.score(tokens, out, tick)
        except OOM_ERRORS as e:  # a result, not a crash: keep what was scored before it
            reached = min(reached, meter.last_step)
            oom_message = f"{type(e).__name__} at position {meter.last_step} (batch {B}): {str(e)[:200]}"
            acc.add(out[:, :, :min(meter.last_step, longest)])
            del out
            _free_memory(scorer.device)
            break
        acc.add(out[:, :, :longest])
        for seq, losses in zip(group, out):
            span_acc.add(losses[:, :longest], (spans or {}).get(seq.source, []))
    bar.close()

    q = quality_indices(scorer.streams, quality_stream)
    base_loss = acc.mean(q, *window(base))[0]
    base_quality = math.exp(-base_loss) if base_loss is not None else None
    if base_loss is None:
        notes.append(f"no scored tokens in the baseline window {window(base)}: no degradation verdict")
    results, degraded_at, oom_at = [], None, None
    for L in lengths:
        if L > reached:
            oom_at = L if oom_at is None else oom_at
            results.append(LengthResult(L, "oom"))
            continue
        loss, count = acc.mean(q, *window(L))
        if loss is None:
            results.append(LengthResult(L, "no data"))
            continue
        quality = math.exp(-loss)
        ratio = quality / base_quality if base_quality else None
        steps = meter.steps[L]
        results.append(LengthResult(
            L, "ok", loss, quality, ratio, 1e3 * meter.seconds[L] / steps if steps else None,
            meter.peak[L] or None, count))
        if degraded_at is None and ratio is not None and ratio < threshold:
            degraded_at = L
    edges = bucket_edges(min(reached, longest))
    bucket_loss, bucket_count = {}, {}
    for i, s in enumerate(scorer.streams):
        bucket_loss[s], bucket_count[s] = acc.buckets(i, edges)
    W = scorer.attention_window
    inside = acc.mean(q, *window(W))[0] if W else None
    beyond = acc.mean(q, W, longest)[0] if W is not None else None
    return ModelResult(
        scorer.name, scorer.kind, list(scorer.streams), [scorer.streams[i] for i in q], W, base, base_loss,
        base_quality, threshold, results, degraded_at, oom_at, oom_message, edges, bucket_loss, bucket_count,
        inside, beyond, len(sequences), notes,
        span_acc.means({"text": [0], "audio": list(range(1, S))} if S > 1 else {"text": [0]}))


def text_pads(scorer: Scorer) -> tuple[int, ...]:
    """Text ids that are not words (Moshi: padding, end of padding); none for a flat token stream."""
    lm = scorer.model
    return (lm.text_padding_token_id, lm.end_of_text_padding_id) if scorer.kind == "moshi" else ()


def score_copy_probes(scorer: Scorer, probes: list[Sequence], spans: dict[str, list[Span]], *, batch_size: int = 1,
                      reset_after: int | None = None, progress: bool = True) -> ProbeLosses:
    """Each probe's loss per group on its source and copy spans (`copy_probes`' [first, again] per probe).

    reset_after: restart every memory branch's state once the stream has run that many positions
    (attention keeps its window): the memory-reset control (`Scorer.score`'s `reset_at`).
    """
    pads = text_pads(scorer)
    acc = ProbeLosses.empty()
    longest = max(p.length for p in probes)
    bar = tqdm(total=len(probes), unit="probe", disable=not progress, dynamic_ncols=True, desc=scorer.name)
    for group, tokens in batches(probes, scorer.rows(), longest + scorer.lookahead, batch_size, scorer.pad_value()):
        out = torch.full((tokens.shape[0], len(scorer.streams), tokens.shape[-1]), torch.nan)

        scorer.score(tokens, out, lambda step: None, reset_at=reset_after)
        for seq, losses in zip(group, out):
            first, again = spans[seq.source]
            acc.add(losses[:, :seq.length], seq.tokens[:, :seq.length], first, again, pads)
        bar.update(len(group))
    bar.close()
    return acc


def evaluate_copies(scorer: Scorer, probes: list[Sequence], spans: dict[str, list[Span]], *,
                    replaced: tuple[list[Sequence], dict[str, list[Span]]] | None = None, reset: bool = False,
                    batch_size: int = 1, progress: bool = True, boot: int = 2000) -> dict[int, dict[str, tp.Any]]:
    """Recall on copy probes per gap and group, with bootstrap intervals (`copies.summarize`).

    Controls, paired with `probes` one by one: `replaced`, `copy_probes` with the same arguments and
    `replace_source=True` (the sources replaced by other speech); `reset`, the memory states restarted
    once the source has streamed in (for the gaps where that is before the copy).
    """
    main = score_copy_probes(scorer, probes, spans, batch_size=batch_size, progress=progress)
    controls = {}
    if replaced is not None:
        controls["replaced"] = score_copy_probes(scorer, *replaced, batch_size=batch_size, progress=progress)
    if reset:
        ends = {spans[p.source][0].end for p in probes}
        if len(ends) != 1:
            raise ValueError(f"memory-reset control: copy probes' sources end at {sorted(ends)}; expected one place")
        after = ends.pop() + 1 + scorer.lookahead  # the source's last (delayed) frame has streamed in
        late = [p for p in probes if spans[p.source][1].start >= after]
        if late:
            controls["reset"] = score_copy_probes(scorer, late, spans, batch_size=batch_size, reset_after=after,
                                                  progress=progress)
    return summarize(main, controls, boot)


def quote_bucket(gap: int) -> int:
    """A quote's distance (frames from the user's sentence to the model's quote) to its power-of-two bucket: quotes
    fall where the dialogue put them, so they are pooled by scale (16, 32, ..., 2048 frames) rather than by gap."""
    return 1 << max(int(gap), 1).bit_length() - 1


def evaluate_quotes(scorer: Scorer, probes: list[Sequence], spans: dict[str, list[Span]], *,
                    replaced: tuple[list[Sequence], dict[str, list[Span]]] | None = None, reset: bool = False,
                    batch_size: int = 1, progress: bool = True, boot: int = 2000) -> dict[int, dict[str, tp.Any]]:
    """Does the model recall what the user said? Its loss on its quotes (`spans.quote_probes`) against the
    controls, per `quote_bucket`, with bootstrap intervals (`copies.summarize`; its "first" is the model's own
    streams while the user speaks, so only the "again/<control>" ratios mean recall here).

    `replaced`: `quote_probes(..., replace_source=True)`, the user's sentence replaced by another; `reset`: every
    memory state restarted once the user's sentence has streamed in (or at the quote, if that comes sooner), one
    probe at a time since each has its own place.
    """
    main = score_copy_probes(scorer, probes, spans, batch_size=batch_size, progress=progress)
    controls = {}
    if replaced is not None:
        controls["replaced"] = score_copy_probes(scorer, *replaced, batch_size=batch_size, progress=progress)
    if reset:
        parts = []
        for p in tqdm(probes, unit="probe", disable=not progress, dynamic_ncols=True, desc=f"{scorer.name} reset"):
            said, quoted = spans[p.source]
            after = min(said.end + 1 + scorer.lookahead, quoted.start)
            parts.append(score_copy_probes(scorer, [p], spans, reset_after=after, progress=False))
        controls["reset"] = ProbeLosses(*(np.concatenate([getattr(x, f) for x in parts])
                                          for f in ("gaps", "sums", "counts")))
    for acc in (main, *controls.values()):
        acc.gaps = np.array([quote_bucket(g) for g in acc.gaps], dtype=np.int64)
    return summarize(main, controls, boot)
