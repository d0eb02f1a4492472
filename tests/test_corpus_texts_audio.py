"""Corpus texts (sentence filter, missing packages) and audio helpers (resampling, word-time estimates)."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

from ttt_speech.corpus import texts
from ttt_speech.corpus.audio import RATE, estimate_word_times, trim
from ttt_speech.corpus.texts import MissingTextError, load_sources, split_sentences


def test_sentences_are_speakable():
    para = ('ABSOLUTE, adj.  Independent, irresponsible -- so _he_ said. "Quoted" {link} text [note] here. '
            "It cost 1611 pounds. Two words. " + "And the LORD spake " * 8 + "unto them; " + "and they went " * 6 + ".")
    out = split_sentences(para)
    assert out[0] == "Independent, irresponsible, so he said."  # "Absolute, adj." is too short
    assert out[1] == "Quoted link text here."
    assert not any("1611" in s or "Two words" in s for s in out)  # digits and < 3 words are dropped
    assert all(3 <= len(s.split()) <= texts.MAX_WORDS for s in out)
    assert out[2].startswith("And the Lord spake And the Lord")  # 54 words, cut at the ;
    assert out[2].endswith("unto them.")
    assert out[3].endswith("they went.")


def test_a_missing_text_names_its_package(monkeypatch, tmp_path):
    monkeypatch.setattr(texts, "DEVIL_DICT", tmp_path / "devil.dict.dz")
    monkeypatch.setattr(texts, "KJV_DATA", tmp_path / "bible.data")
    with pytest.raises(MissingTextError, match="apt-get install dict-devil"):
        load_sources(["devil"])
    with pytest.raises(MissingTextError, match="apt-get install bible-kjv-text"):
        load_sources(["kjv"])
    with pytest.raises(ValueError, match="unknown text source"):
        load_sources(["nope"])


@pytest.mark.parametrize("name", sorted(texts.SOURCES))
def test_installed_texts_are_long(name):
    try:
        sentences = texts.SOURCES[name].sentences()
    except MissingTextError as e:
        pytest.skip(str(e))
    assert sum(len(s.text.split()) for s in sentences) > 40_000  # > 4 hours of speech each
    assert all(texts._SPEAKABLE.fullmatch(s.text) for s in sentences[::50])


def test_trim_and_estimated_word_times():
    x = np.concatenate([np.zeros(RATE // 2), 0.5 * np.ones(RATE), np.zeros(RATE // 2)]).astype(np.float32)
    y, cut = trim(x)
    assert cut == pytest.approx(0.5 - 0.02, abs=0.011) and len(y) / RATE == pytest.approx(1.04, abs=0.02)
    times = estimate_word_times(["a", "word,", "longer", "words"], y)
    assert times[0][0] == 0 and times[-1][1] == pytest.approx(len(y) / RATE, abs=1e-3)
    assert all(s < e for s, e in times) and all(a[1] <= b[0] for a, b in pairwise(times))
    assert times[2][0] - times[1][1] > 0  # the pause after the comma
