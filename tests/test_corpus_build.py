"""The corpus builder with a fake engine (a tone per word) and a fake text: layout, stereo, split, repeats, quotes,
seeds."""

from __future__ import annotations

import argparse
import json
import wave
from pathlib import Path

import numpy as np
import pytest

from ttt_speech.corpus import CorpusConfig, build, commands
from ttt_speech.corpus import engines as engines_mod
from ttt_speech.corpus import texts as texts_mod
from ttt_speech.corpus.engines import Engine, Speech
from ttt_speech.corpus.plan import Recording, Timing, layout_reading, quote_sources, random_words, turn_speakers
from ttt_speech.corpus.texts import TextSource
from ttt_speech.train.tokenize import read_alignments

RATE = 24000
LETTER, GAP, EDGE = 0.05, 0.05, 0.1  # fake speech: seconds per letter, between words, before/after a sentence
VOCAB = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima"]


class Tones(Engine):
    """A word is a tone whose pitch comes from the voice and the word, LETTER s per letter; 16 kHz."""

    def __init__(self, times: bool) -> None:
        self.times = times

    def missing(self, voice: str) -> str | None:
        return None

    def synthesize(self, voice: str, sentences: list[str]) -> list[Speech]:
        rate, out = 16000, []
        for s in sentences:
            parts, words, t = [np.zeros(int(EDGE * rate), np.float32)], [], EDGE
            for w in s.split():
                n = int(LETTER * sum(c.isalpha() for c in w) * rate)
                f = 150 + 20 * (sum(map(ord, voice)) % 7) + 15 * (sum(map(ord, w)) % 11)
                parts += [0.5 * np.sin(2 * np.pi * f * np.arange(n) / rate).astype(np.float32),
                          np.zeros(int(GAP * rate), np.float32)]
                words.append((t, t + n / rate))
                t += n / rate + GAP
            parts.append(np.zeros(int(EDGE * rate), np.float32))
            out.append(Speech(np.concatenate(parts), rate, words if self.times else None))
        return out


def fake_paragraphs() -> list[str]:
    rng = np.random.default_rng(0)
    return [" ".join(" ".join(rng.choice(VOCAB, int(rng.integers(4, 9)))).capitalize() + "."
                     for _ in range(int(rng.integers(2, 6)))) for _ in range(400)]


@pytest.fixture
def fakes(monkeypatch):
    monkeypatch.setitem(engines_mod.ENGINES, "tones", Tones(times=True))
    monkeypatch.setitem(engines_mod.ENGINES, "guess", Tones(times=False))
    monkeypatch.setitem(texts_mod.SOURCES, "fake", TextSource("fake", "Fake text", "none", fake_paragraphs))
    monkeypatch.setitem(texts_mod.SOURCES, "fake2", TextSource("fake2", "Fake text 2", "none",
                                                               lambda: fake_paragraphs()[::-1]))


CFG = CorpusConfig(recordings=4, dialogues=2, minutes=0.5, voices=("tones:a", "tones:b", "guess:c"),
                   texts=("fake", "fake2"), repeat_fraction=0.5, repeat_gap_minutes=0.15, repeat_minutes=0.05,
                   repeat_every_minutes=0.1, val_fraction=0.25, jobs=1, batch=4, progress=False)


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        assert w.getframerate() == RATE and w.getnchannels() == 2 and w.getsampwidth() == 2
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, 2).T.astype(np.float32) / 32768


@pytest.fixture
def corpus(fakes, tmp_path):
    build(tmp_path / "c", CFG)
    return tmp_path / "c"


def test_recordings_durations_timestamps_and_channels(corpus):
    meta = json.loads((corpus / "corpus.json").read_text())
    assert len(meta["recordings"]) == 6
    for e in meta["recordings"]:
        audio = read_wav(corpus / e["path"])
        duration = audio.shape[1] / RATE
        assert e["duration"] == pytest.approx(duration, abs=1e-3)
        assert duration >= (CFG.minutes * 60)
        align = json.loads((corpus / e["path"]).with_suffix(".json").read_text())["alignments"]
        assert len(align) == e["words"] > 0
        assert read_alignments((corpus / e["path"]).with_suffix(".json"), duration, 12.5, "SPEAKER_MAIN")
        starts = [s for _, (s, _), _ in align]
        assert starts == sorted(starts)
        for word, (s, t), speaker in align:
            assert 0 <= s < t <= duration
            ch, other = (0, 1) if speaker == "SPEAKER_MAIN" else (1, 0)
            a, b = round(s * RATE), round(t * RATE)
            assert np.abs(audio[other, a:b]).max() == 0, "the other channel is silent during a word"
            if e["voices"][speaker].startswith("tones:"):  # engine times: the word's own tone is there
                mid = audio[ch, a + (b - a) // 4:b - (b - a) // 4]
                assert np.sqrt((mid ** 2).mean()) > 0.05, (word, s, t)
        assert not np.any((audio[0] != 0) & (audio[1] != 0)), "nobody talks over anybody"
        if e["kind"] == "reading":
            assert not audio[1].any() and len(e["voices"]) == 1
        else:
            assert {sp for *_, sp in align} == {"SPEAKER_MAIN", "SPEAKER_OTHER"}
            assert len(set(e["voices"].values())) == 2


def test_estimated_word_times_land_on_the_words(fakes, tmp_path):
    build(tmp_path / "g", CorpusConfig(recordings=1, dialogues=0, minutes=0.3, voices=("guess:c",),
                                       texts=("fake",), jobs=1, progress=False))
    audio = read_wav(tmp_path / "g/readings/reading_000.wav")[0]
    align = json.loads((tmp_path / "g/readings/reading_000.json").read_text())["alignments"]
    centres = [round((s + t) / 2 * RATE) for _, (s, t), _ in align]
    voiced = np.mean([np.abs(audio[c - 48:c + 48]).max() > 0.05 for c in centres])
    assert voiced > 0.9  # the middle of an estimated word is nearly always inside its tone


def test_split_by_recording(corpus):
    meta = json.loads((corpus / "corpus.json").read_text())
    lines = {name: [json.loads(x) for x in (corpus / f"{name}.jsonl").read_text().splitlines()]
             for name in ("train", "val")}
    train, val = ({x["path"] for x in lines[n]} for n in ("train", "val"))
    assert train and val and not train & val
    assert train | val == {e["path"] for e in meta["recordings"]}
    assert {e["path"] for e in meta["recordings"] if e["split"] == "val"} == val
    assert {e["kind"] for e in meta["recordings"] if e["path"] in val} == {"reading", "dialogue"}
    assert any(e["repeats"] for e in meta["recordings"] if e["path"] in val)  # held-out repeats to score
    for x in lines["train"] + lines["val"]:
        assert (corpus / x["path"]).exists() and x["duration"] > 0


def test_repeats_are_exact_copies_after_the_gap(corpus):
    meta = json.loads((corpus / "corpus.json").read_text())
    readings = [e for e in meta["recordings"] if e["kind"] == "reading"]
    assert sum(bool(e["repeats"]) for e in readings) == 2
    gap = CFG.repeat_gap_minutes * 60
    for e in readings:
        audio = read_wav(corpus / e["path"])[0]
        align = json.loads((corpus / e["path"]).with_suffix(".json").read_text())["alignments"]
        for r in e["repeats"]:
            (f0, f1), (a0, a1) = r["first"], r["again"]
            assert a0 - f1 >= gap and r["gap"] == pytest.approx(a0 - f1, abs=2e-3)
            first = [(w, s - f0) for w, (s, _), _ in align if f0 - 1e-3 <= s < f1]
            again = [(w, s - a0) for w, (s, _), _ in align if a0 - 1e-3 <= s < a1]
            assert [w for w, _ in first] == [w for w, _ in again] and first
            assert np.allclose([t for _, t in first], [t for _, t in again], atol=2e-3)
            n, i, j = round((f1 - f0) * RATE), round(f0 * RATE), round(a0 * RATE)
            assert any(np.array_equal(audio[i:i + n], audio[j + k:j + k + n]) for k in range(-30, 31))


def test_same_seed_same_corpus_other_seed_other_corpus(fakes, corpus, tmp_path):
    build(tmp_path / "again", CorpusConfig(**{**CFG.__dict__, "batch": 9}))  # batching does not matter
    build(tmp_path / "other", CorpusConfig(**{**CFG.__dict__, "seed": 1}))
    files = sorted(p.relative_to(corpus) for p in corpus.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file())
    for f in files:
        if f.name != "corpus.json":
            assert (corpus / f).read_bytes() == (tmp_path / "again" / f).read_bytes(), f
    def described(d: Path) -> dict:
        return {**json.loads((d / "corpus.json").read_text()), "settings": None}  # batch is a setting

    assert described(corpus) == described(tmp_path / "again")
    other = tmp_path / "other/readings/reading_000.wav"
    assert (corpus / "readings/reading_000.wav").read_bytes() != other.read_bytes()


def test_layout_grows_by_prefix():
    rec = Recording("reading", 0, ("x",), "fake", 0, True, (0, 1, 0))
    timing = Timing(target=120, repeat_gap=20, repeat=5, repeat_every=10)
    durations = list(np.random.default_rng(0).uniform(1, 6, 80))
    paragraphs = [i // 5 for i in range(81)]
    full = layout_reading(durations, paragraphs, timing, rec)
    assert full.done and full.repeats and full.end >= 120
    for n in (5, 12, 20):
        part = layout_reading(durations[:n], paragraphs[:n + 1], timing, rec)
        assert not part.done and part.placements == full.placements[:len(part.placements)]


def test_quotes_open_model_turns_with_a_user_sentence_and_grow_by_prefix():
    speakers = turn_speakers((0, 2, 0), 400)
    quotes = quote_sources((0, 2, 0), speakers, 0.5, 10)
    opens = [k for k in range(1, 400) if speakers[k] == 0 and speakers[k - 1] == 1]  # the model's turns
    assert 0.3 < len(quotes) / len(opens) < 0.7
    for k, j in quotes.items():
        assert k in opens and speakers[j] == 1 and 10 <= k - j <= 20
    assert quote_sources((0, 2, 0), speakers[:150], 0.5, 10) == {k: j for k, j in quotes.items() if k < 150}
    assert quote_sources((0, 2, 0), speakers, 0.0, 10) == {}


def test_a_quote_is_the_users_words_again_in_the_models_voice(fakes, tmp_path):
    cfg = CorpusConfig(recordings=0, dialogues=1, minutes=0.5, voices=("tones:a", "tones:b"), texts=("fake",),
                       quote_fraction=0.5, quote_gap_sentences=3, val_fraction=0, jobs=1, batch=4, progress=False)
    build(tmp_path / "q", cfg)
    (e,) = json.loads((tmp_path / "q/corpus.json").read_text())["recordings"]
    align = json.loads((tmp_path / "q" / e["path"]).with_suffix(".json").read_text())["alignments"]
    assert len(e["quotes"]) >= 2
    for q in e["quotes"]:
        (s0, s1), (q0, q1) = q["said"], q["quoted"]
        said = [(w, sp) for w, (s, _), sp in align if s0 - 1e-3 <= s < s1]
        quoted = [(w, sp) for w, (s, _), sp in align if q0 - 1e-3 <= s < q1]
        assert said and [w for w, _ in said] == [w for w, _ in quoted]
        assert {sp for _, sp in said} == {"SPEAKER_OTHER"} and {sp for _, sp in quoted} == {"SPEAKER_MAIN"}
        assert q["gap"] == pytest.approx(q0 - s1, abs=2e-3) and q["gap"] > 0
    # the text reads on past a quote: the words outside the quotes are the text's, in order, none left out
    sentences = texts_mod.load_sources(["fake"])["fake"]
    first, read = e["text"]["first_sentence"], e["text"]["sentences"]
    quoted = [q["quoted"] for q in e["quotes"]]
    spoken = [w for w, (s, _), _ in align if not any(q0 - 1e-3 <= s < q1 for q0, q1 in quoted)]
    assert spoken == [w for i in range(read) for w in sentences[(first + i) % len(sentences)].text.split()]


def test_random_user_words_are_heard_once_and_quoted_as_said(fakes, tmp_path):
    """--random-user-words: every user sentence is fresh random words of the text (as many as the sentence it
    stands for), a quote says them again, and the model's other sentences still read the text in order."""
    cfg = CorpusConfig(recordings=0, dialogues=1, minutes=0.5, voices=("tones:a", "tones:b"), texts=("fake",),
                       quote_fraction=0.5, quote_gap_sentences=3, random_user_words=True, val_fraction=0, jobs=1,
                       batch=4, progress=False)
    build(tmp_path / "r", cfg)
    meta = json.loads((tmp_path / "r/corpus.json").read_text())
    (e,) = meta["recordings"]
    assert meta["settings"]["random_user_words"] is True and len(e["quotes"]) >= 2
    align = json.loads((tmp_path / "r" / e["path"]).with_suffix(".json").read_text())["alignments"]
    sentences = texts_mod.load_sources(["fake"])["fake"]
    first, read = e["text"]["first_sentence"], e["text"]["sentences"]
    quoted = [q["quoted"] for q in e["quotes"]]
    heard = [w for w, (s, _), sp in align if sp == "SPEAKER_OTHER"]
    own = [w for w, (s, _), sp in align if sp == "SPEAKER_MAIN" and not any(q0 - 1e-3 <= s < q1 for q0, q1 in quoted)]
    said = {k: j for j, k in (q["sentences"] for q in e["quotes"])}
    speakers = turn_speakers((0, 2, 0), read + len(said))  # dialogue 0's seed
    text = {k: sentences[(first + k - sum(q < k for q in said)) % len(sentences)].text.split()
            for k in range(read + len(said)) if k not in said}  # what sentence k would read
    assert own == [w for k, ws in text.items() if speakers[k] == 0 for w in ws]
    users = [k for k in text if speakers[k] == 1]
    assert len(heard) == sum(len(text[k]) for k in users) > 20  # each as long as the sentence it stands for
    assert {w.strip(".").lower() for w in heard} <= set(VOCAB)
    assert heard != [w for k in users for w in text[k]]
    for q in e["quotes"]:
        (s0, s1), (q0, q1) = q["said"], q["quoted"]
        said = [w for w, (s, _), sp in align if s0 - 1e-3 <= s < s1]
        assert said == [w for w, (s, _), sp in align if q0 - 1e-3 <= s < q1]
    assert random_words((0, 2, 0), 5, 6, VOCAB) == random_words((0, 2, 0), 5, 6, VOCAB) != \
        random_words((0, 2, 0), 6, 6, VOCAB)
    assert len(random_words((0, 2, 0), 5, 6, VOCAB).split()) == 6


def test_cli_builds_and_reports_a_missing_voice(fakes, tmp_path, capsys):
    p = argparse.ArgumentParser()
    commands.add_arguments(p)
    args = p.parse_args(["--out", str(tmp_path / "cli"), "--recordings", "2", "--dialogues", "1",
                         "--minutes-per-recording", "0.2", "--voices", "tones:a,tones:b", "--texts", "fake",
                         "--quote-fraction", "1", "--quote-gap-sentences", "2", "--jobs", "1", "--no-progress"])
    assert commands.run(args) == 0
    assert "3 recordings" in capsys.readouterr().out
    meta = json.loads((tmp_path / "cli/corpus.json").read_text())
    assert meta["settings"]["quote_fraction"] == 1 and meta["settings"]["quote_gap_sentences"] == 2
    assert [bool(e.get("quotes")) for e in meta["recordings"]] == [True, False, False]  # the dialogue quotes
    assert len((tmp_path / "cli/train.jsonl").read_text().splitlines()) == 2  # 1 reading + 1 dialogue held out
    assert commands.run(args) == 2  # the directory holds a corpus now
    assert "already holds a corpus" in capsys.readouterr().err
    args = p.parse_args(["--out", str(tmp_path / "x"), "--voices", "nosuch:a", "--texts", "fake"])
    assert commands.run(args) == 2
    assert "bad voice 'nosuch:a'" in capsys.readouterr().err


def test_only_rebuilds_named_recordings_exactly(fakes, corpus, tmp_path):
    only = ("reading_002", "dialogue_001")
    build(tmp_path / "some", CorpusConfig(**{**CFG.__dict__, "only": only, "val_fraction": 0}))
    meta = json.loads((tmp_path / "some/corpus.json").read_text())
    assert [e["path"] for e in meta["recordings"]] == ["dialogues/dialogue_001.wav", "readings/reading_002.wav"]
    for name in ("dialogues/dialogue_001", "readings/reading_002"):
        for ext in (".wav", ".json"):
            assert (tmp_path / "some" / (name + ext)).read_bytes() == (corpus / (name + ext)).read_bytes(), name
    with pytest.raises(ValueError, match="--only names reading_004, not in this plan"):
        build(tmp_path / "bad", CorpusConfig(**{**CFG.__dict__, "only": ("reading_004",)}))
