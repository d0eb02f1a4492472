"""Per-span losses (re-read passages): token means over exactly their positions, from corpus.json; copy
probes (spans copied G frames later) and their recall-at-distance scores."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("moshi")

from ttt_speech.eval.data import Sequence  # noqa: E402
from ttt_speech.eval.long_context import evaluate, evaluate_copies, evaluate_quotes, quote_bucket  # noqa: E402
from ttt_speech.eval.models import MoshiScorer  # noqa: E402
from ttt_speech.eval.report import Report, write  # noqa: E402
from ttt_speech.eval.spans import Span, copy_probes, quote_probes, quote_spans, quotes_in, repeat_spans  # noqa: E402
from ttt_speech.moshi.compat import streaming_state  # noqa: E402
from ttt_speech.moshi.layer import reset_memories  # noqa: E402
from ttt_speech.moshi.tiny import build_tiny_hybrid, build_tiny_lm  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


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
    # a directory of corpora (shards packed from several): each source under its corpus's folder
    for name in ("b", "a"):
        (tmp_path / "many" / name).mkdir(parents=True)
        (tmp_path / "many" / name / "corpus.json").write_text(json.dumps({"recordings": recs}))
    assert list(repeat_spans(tmp_path / "many")) == ["a/readings/r0.wav", "b/readings/r0.wav"]
    assert repeat_spans(tmp_path / "many")["b/readings/r0.wav"] == repeat_spans(tmp_path)["readings/r0.wav"]


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 120), min_size=1, max_size=3), gaps=st.sets(st.integers(1, 40), min_size=1),
       span=st.integers(1, 10), context=st.integers(0, 12), per=st.integers(1, 3))
def test_copy_probes_copy_each_frame_exactly_gap_later(lengths, gaps, span, context, per) -> None:
    seqs = [Sequence(f"s{i}", torch.arange(2 * n).view(2, n) + 1000 * i) for i, n in enumerate(lengths)]
    gaps = sorted(gaps)
    if gaps[0] < span or max(lengths) < context + gaps[-1] + span:
        with pytest.raises(ValueError, match="overlap|needs"):
            copy_probes(seqs, gaps, span, context, per)
        return
    probes, spans = copy_probes(seqs, gaps, span, context, per)
    want = [(g, i, k) for g in gaps for i, n in enumerate(lengths) for k in range(min(per, n // (context + g + span)))]
    assert len(probes) == len(want)
    for probe, (g, i, k) in zip(probes, want):
        L = context + g + span
        first, again = spans[probe.source]
        assert (first, again) == (Span(f"first@{g}", context, context + span), Span(f"again@{g}", context + g, L))
        original = seqs[i].tokens[:, k * L:(k + 1) * L]  # a fresh excerpt: frames are distinct and increasing
        assert torch.equal(probe.tokens[:, again.start:again.end], original[:, first.start:first.end])
        assert torch.equal(probe.tokens[:, :again.start], original[:, :again.start])
    assert torch.equal(seqs[0].tokens, torch.arange(2 * lengths[0]).view(2, -1))  # the sources are untouched


class _PerfectMemory(MoshiScorer):
    """Loss 0 where the frame (every row) already occurred more than `attention_window` positions back and
    after the last memory reset, else 1: an ideal memory beyond the window, to check what the scores measure."""

    def score(self, tokens: torch.Tensor, out: torch.Tensor, tick, reset_at: int | None = None) -> None:
        W, forget = self.attention_window, 0
        for t in range(tokens.shape[-1]):
            seen = (tokens[:, :, forget:max(t - W, forget)] == tokens[:, :, t:t + 1]).all(1).any(-1)
            out[:, :, t] = (~seen).float()[:, None]
            if t + 1 == reset_at:
                forget = t + 1
            tick(t + 1)


GROUPS3 = ("text words", "codebook 0", "codebooks 1-7")


def test_copy_scores_show_recall_only_beyond_the_window_and_the_controls_remove_it(tmp_path) -> None:
    lm = build_tiny_hybrid(0)  # attention window 8
    seqs = [Sequence(f"s{i}", c) for i, c in enumerate(_codes(lm, 2, 120))]
    gaps = [6, 12, 30]
    probes, spans = copy_probes(seqs, gaps, span=6, context=4, per_sequence=2)
    replaced = copy_probes(seqs, gaps, span=6, context=4, per_sequence=2, replace_source=True)
    memory = evaluate_copies(_PerfectMemory(lm, "memory"), probes, spans, replaced=replaced, reset=True, batch_size=3,
                             progress=False)
    assert sorted(memory) == [6, 12, 30] and all(memory[g]["probes"] == 4 for g in gaps)
    for group in GROUPS3:
        assert memory[6]["ratio"][group] == [1.0, 1.0, 1.0]  # the source is inside the window: not memory
        assert memory[6]["again/replaced"][group] == [1.0, 1.0, 1.0]
        assert "again/reset" not in memory[6]  # the copy starts before the source has streamed in
        for gap in (12, 30):
            assert memory[gap]["first"][group] == 1.0 and memory[gap]["again"][group] == 0.0
            for key in ("ratio", "again/replaced", "again/reset"):  # recalled; nothing to recall; forgotten
                assert memory[gap][key][group] == [0.0, 0.0, 0.0], (gap, key)

    plain = evaluate_copies(MoshiScorer(lm, "tiny"), probes, spans, replaced=replaced, reset=True, batch_size=3,
                            progress=False)
    vanilla = evaluate_copies(MoshiScorer(build_tiny_lm(0), "vanilla"), probes, spans, reset=True, batch_size=3,
                              progress=False)
    for group in GROUPS3:  # no memory: resetting it changes nothing (up to fp32 reassociation: helpers/numerics.py)
        assert vanilla[30]["again/reset"][group] == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)
    assert any(plain[30]["again/reset"][g][0] != 1.0 for g in GROUPS3)  # the hybrid's TTT state does matter
    res = evaluate(MoshiScorer(lm, "tiny"), seqs, [16, 32], progress=False)
    res.copy_loss = plain
    ideal = evaluate(MoshiScorer(lm, "memory"), seqs, [16, 32], progress=False)
    ideal.copy_loss = memory
    files = write(Report({"test": True}, long_context=[res, ideal]), tmp_path)
    md = files["report"].read_text()
    assert "Recall at distance" in md and "| text words | gap 6 | gap 12 | gap 30 |" in md
    assert "| memory: copy / first | 1.000 [1.000, 1.000] | 0.000 [0.000, 0.000] | 0.000 [0.000, 0.000] |" in md
    assert "| memory: copy / memory reset | – | 0.000 [0.000, 0.000] |" in md
    assert "memory: copy vs tiny's copy | " in md and files["recall_vs_gap"].stat().st_size > 1000


def test_source_replaced_probes_keep_the_copy_and_replace_only_the_source() -> None:
    seqs = [Sequence(f"s{i}", torch.arange(2 * 60).view(2, 60) + 1000 * i) for i in range(2)]
    probes, spans = copy_probes(seqs, [10, 20], span=5, context=3, per_sequence=2)
    swapped, swapped_spans = copy_probes(seqs, [10, 20], span=5, context=3, per_sequence=2, replace_source=True)
    assert swapped_spans == spans and [p.name for p in swapped] == [p.name for p in probes]
    for p, q in zip(probes, swapped):
        first, again = spans[p.source]
        assert torch.equal(p.tokens[:, again.start:again.end], q.tokens[:, again.start:again.end])
        assert torch.equal(p.tokens[:, :first.start], q.tokens[:, :first.start])
        assert torch.equal(p.tokens[:, first.end:], q.tokens[:, first.end:])
        src = q.tokens[:, first.start:first.end]
        assert not (src[:, :, None] == p.tokens[:, None, first.end:]).all(0).any()  # nowhere else in the probe
        own = 1000 * int(p.name[1])
        assert ((src < own) | (src >= own + 1000)).all()  # it is the other sequence's speech


def test_reset_memories_restarts_only_the_memory_states() -> None:
    lm = build_tiny_hybrid(0)
    codes = torch.stack(_codes(lm, 2, 20))  # past one TTT mini-batch (16): the inner weights have moved
    with lm.streaming(2):
        fresh = [s.memory.clone() for s in _ttt_states(lm)]
        for t in range(codes.shape[-1]):
            lm.forward_text(codes[:, :, t:t + 1])
        assert all(any(not torch.equal(a[k], b.memory[k]) for k in a) for a, b in zip(fresh, _ttt_states(lm)))
        kv = [s.offset_cpu for s in _layer_states(lm)]
        assert reset_memories(lm) == lm.transformer.layers.__len__()
        assert all(torch.equal(a[k], b.memory[k]) for a, b in zip(fresh, _ttt_states(lm)) for k in a)
        assert [s.offset_cpu for s in _layer_states(lm)] == kv == [20] * len(kv)  # attention keeps its place
    assert reset_memories(build_tiny_lm(0)) == 0


def _layer_states(lm: torch.nn.Module) -> list:
    return [streaming_state(layer) for layer in lm.transformer.layers]


def _ttt_states(lm: torch.nn.Module) -> list:
    return [s for s in _layer_states(lm) if getattr(s, "memory", None) is not None]


def test_quote_spans_read_corpus_json_in_pairs(tmp_path) -> None:
    recs = [{"path": "dialogues/d0.wav", "quotes": [{"said": [10.0, 12.0], "quoted": [30.0, 32.4], "sentences": [3, 7],
                                                    "gap": 18.0}]},
            {"path": "readings/r0.wav", "repeats": [{"first": [1.0, 2.0], "again": [700.0, 701.0]}]}]
    (tmp_path / "corpus.json").write_text(json.dumps({"recordings": recs}))
    assert quote_spans(tmp_path) == {"dialogues/d0.wav": [Span("said", 125, 150), Span("quoted", 375, 405)]}
    assert list(repeat_spans(tmp_path)) == ["readings/r0.wav"]  # each reads its own key


USER = slice(3, 5)  # the tiny Moshi's rows: text, its 2 codebooks, the user's 2


class _QuotingMemory(MoshiScorer):
    """Loss 0 on every stream where the model's codebooks at t equal the user's codebooks somewhere more than
    `attention_window` positions back (after the last reset), else 1: an ideal memory of what the user said."""

    def score(self, tokens: torch.Tensor, out: torch.Tensor, tick, reset_at: int | None = None) -> None:
        W, forget = self.attention_window, 0
        for t in range(tokens.shape[-1]):
            heard = tokens[:, USER, forget:max(t - W, forget)]
            seen = (heard == tokens[:, 1:3, t:t + 1]).all(1).any(-1)
            out[:, :, t] = (~seen).float()[:, None]
            if t + 1 == reset_at:
                forget = t + 1
            tick(t + 1)


def _dialogues(lm: torch.nn.Module) -> tuple[list[Sequence], dict[str, list[Span]]]:
    """Three random dialogues; in each the model says again (its codebooks = the user's) a user span: 4 frames
    later (inside the window of 8: attention's) in d0, 40 frames later (beyond it) in d1 and d2."""
    seqs, spans = [], {}
    for i, (said, gap) in enumerate(((20, 4), (10, 40), (30, 40))):
        tokens = _codes(lm, 4, 120)[i]
        tokens[1:3, said + gap:said + gap + 6] = tokens[USER, said:said + 6]
        seqs.append(Sequence(f"d{i}", tokens, f"dialogues/d{i}.wav"))
        spans[f"dialogues/d{i}.wav"] = [Span("said", said, said + 6), Span("quoted", said + gap, said + gap + 6)]
    return seqs, spans


def test_quote_probes_replace_only_the_users_sentence() -> None:
    lm = build_tiny_hybrid(0)
    seqs, spans = _dialogues(lm)
    probes, pspans = quote_probes(seqs, spans, context=5, user_rows=USER)
    swapped, sspans = quote_probes(seqs, spans, context=5, user_rows=USER, replace_source=True)
    assert sspans == pspans and [p.name for p in probes] == ["d0@quote20", "d1@quote10", "d2@quote30"]
    for p, q, seq in zip(probes, swapped, seqs):
        said, quoted = pspans[p.source]
        assert said.start == 5 and p.length == quoted.end  # 5 frames of context, to the quote's end
        lo = spans[seq.source][0].start - 5
        assert torch.equal(p.tokens, seq.tokens[:, lo:lo + p.length])
        changed = (p.tokens != q.tokens).any(0).nonzero().flatten().tolist()
        assert changed == list(range(said.start, said.end))  # only the user's sentence's frames ...
        assert torch.equal(p.tokens[:3], q.tokens[:3])  # ... and only on the user's rows
    assert torch.equal(swapped[0].tokens[USER, 5:11], seqs[1].tokens[USER, 10:16])  # another dialogue's sentence
    assert [(i, said.start) for i, said, _ in quotes_in(seqs, spans)] == [(0, 20), (1, 10), (2, 30)]
    short = [Sequence("d2", seqs[2].tokens[:, :75], "dialogues/d2.wav")]  # d2's quote ends at frame 76: cut off
    assert quotes_in(short, spans) == [] and quote_probes(short, spans, context=5, user_rows=USER) == ([], {})


def test_quote_scores_show_recall_beyond_the_window_and_the_controls_remove_it(tmp_path) -> None:
    lm = build_tiny_hybrid(0)  # attention window 8
    seqs, spans = _dialogues(lm)
    probes, pspans = quote_probes(seqs, spans, context=5, user_rows=USER)
    replaced = quote_probes(seqs, spans, context=5, user_rows=USER, replace_source=True)
    memory = evaluate_quotes(_QuotingMemory(lm, "memory"), probes, pspans, replaced=replaced, reset=True,
                             progress=False)
    assert [quote_bucket(g) for g in (4, 40, 63, 64)] == [4, 32, 32, 64]
    assert sorted(memory) == [4, 32] and memory[4]["probes"] == 1 and memory[32]["probes"] == 2
    for group in GROUPS3:
        assert memory[4]["again"][group] == 1.0  # inside the window: a memory has nothing to do (attention's)
        assert memory[32]["again"][group] == 0.0 and memory[32]["again (replaced)"][group] == 1.0
        assert memory[32]["again/replaced"][group] == [0.0, 0.0, 0.0]  # recalled; nothing to recall
        assert memory[32]["again/reset"][group] == [0.0, 0.0, 0.0]  # forgotten once reset after the sentence
    plain = evaluate_quotes(MoshiScorer(lm, "tiny"), probes, pspans, replaced=replaced, reset=True, progress=False)
    res = evaluate(MoshiScorer(lm, "tiny"), seqs, [16, 32], progress=False)
    res.quote_loss = plain
    ideal = evaluate(MoshiScorer(lm, "memory"), seqs, [16, 32], progress=False)
    ideal.quote_loss = memory
    md = write(Report({"test": True}, long_context=[res, ideal]), tmp_path)["report"].read_text()
    assert "Recall of what the user said" in md and "| text words | gap 4 | gap 32 |" in md
    assert "| memory: quote / user replaced | 1.000 [1.000, 1.000] | 0.000 [0.000, 0.000] |" in md
    assert "memory: quote vs tiny's quote | " in md and "copy / first" not in md
