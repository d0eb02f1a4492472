"""Per-span losses (re-read passages): token means over exactly their positions, from corpus.json."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("moshi")

from ttt_speech.eval.data import Sequence  # noqa: E402
from ttt_speech.eval.long_context import evaluate  # noqa: E402
from ttt_speech.eval.models import MoshiScorer  # noqa: E402
from ttt_speech.eval.report import Report, write  # noqa: E402
from ttt_speech.eval.spans import Span, repeat_spans  # noqa: E402
from ttt_speech.moshi.tiny import build_tiny_hybrid  # noqa: E402


@pytest.fixture(autouse=True)
def _threads(one_thread: None) -> None:
    pass


def _codes(lm: torch.nn.Module, n: int, T: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    text = torch.randint(0, lm.text_card, (n, 1, T), generator=g)
    audio = torch.randint(0, lm.card, (n, lm.num_audio_codebooks, T), generator=g)
    return list(torch.cat([text, audio], 1))


def _weighted(means: list[float | None], counts: list[int]) -> float:
    return sum(m * c for m, c in zip(means, counts) if c) / sum(counts)


def test_span_losses_are_token_means_over_their_positions(tmp_path) -> None:
    lm = build_tiny_hybrid(0)
    a, b = _codes(lm, 2, 40)
    seqs = [Sequence("a", a, "readings/a.wav"), Sequence("b", b, "readings/b.wav")]
    spans = {"readings/a.wav": [Span("first", 0, 16), Span("again", 16, 32)],
             "readings/b.wav": [Span("again", 32, 40)]}  # past the longest length (32): nothing to score
    scorer = MoshiScorer(lm, "tiny")
    res = evaluate(scorer, seqs, [16, 32], batch_size=2, progress=False, spans=spans)
    alone = evaluate(scorer, seqs[:1], [32], progress=False)  # a's own per-position losses
    edges = alone.bucket_edges  # [0, 1, 2, 4, 8, 16, 32]
    first_buckets, again_buckets = slice(0, edges.index(16)), slice(edges.index(16), None)
    for label, part in (("first", first_buckets), ("again", again_buckets)):
        want_text = _weighted(alone.bucket_loss["text"][part], alone.bucket_count["text"][part])
        assert res.span_loss[label]["text"] == pytest.approx(want_text, rel=1e-6)  # batch of 2 vs 1: fp32 rounding
        audio = [s for s in alone.streams if s != "text"]
        total = sum(m * c for s in audio for m, c in zip(alone.bucket_loss[s][part], alone.bucket_count[s][part]) if c)
        count = sum(sum(alone.bucket_count[s][part]) for s in audio)
        assert res.span_loss[label]["audio"] == pytest.approx(total / count, rel=1e-6)  # batch of 2 vs 1: fp32 rounding
    assert res.span_loss["first"]["text"] != pytest.approx(res.span_loss["again"]["text"], rel=1e-6)
    no_spans = evaluate(scorer, seqs, [16, 32], batch_size=2, progress=False)
    assert no_spans.span_loss == {}
    report = Report({"test": True}, long_context=[res, no_spans])
    md = write(report, tmp_path).get("report").read_text()
    assert "Re-read passages" in md and "again vs tiny" in md


def test_repeat_spans_read_corpus_json_in_frames(tmp_path) -> None:
    recs = [{"path": "readings/r0.wav", "repeats": [{"first": [10.0, 20.0], "again": [700.0, 710.08]}]},
            {"path": "readings/r1.wav", "repeats": []}]
    (tmp_path / "corpus.json").write_text(json.dumps({"recordings": recs}))
    assert repeat_spans(tmp_path) == {"readings/r0.wav": [Span("first", 125, 250), Span("again", 8750, 8876)]}
    with pytest.raises(FileNotFoundError, match="make-corpus"):
        repeat_spans(tmp_path / "nowhere")
