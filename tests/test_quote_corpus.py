"""recipes/evidence24/quote_corpus.sh end to end at a few seconds of speech (flite, the shipped codec on the CPU):
dialogues that quote the user become tokenized directories with the user's codebooks, whose quotes eval-long finds."""

from __future__ import annotations

import json
import lzma
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("moshi")
pytestmark = [pytest.mark.skipif(shutil.which("flite") is None, reason="flite (Debian) not installed to make speech"),
              pytest.mark.usefixtures("one_thread")]
ROOT = Path(__file__).parents[1]


def test_quote_dialogues_are_tokenized_with_the_users_codebooks(tmp_path: Path) -> None:
    words = "the cat sat on a mat while rain fell over the old town and nobody said a word".split()
    paragraphs = [" ".join(f"{' '.join(words[(i + j) % 8:(i + j) % 8 + 5]).capitalize()}." for j in range(3))
                  for i in range(60)]
    texts = tmp_path / "texts.json.xz"
    texts.write_bytes(lzma.compress(json.dumps({n: paragraphs for n in ("kjv", "devil", "jargon")}).encode()))
    env = {**os.environ, "PY": sys.executable, "DIALOGUES": "1", "MINUTES": "0.4", "JOBS": "1", "VAL": "0",
           "VOICES": "flite:slt,flite:awb", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(["bash", "recipes/evidence24/quote_corpus.sh", str(tmp_path / "w"), str(texts)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    corpus = json.loads((tmp_path / "w/c/quotes/corpus.json").read_text())
    (dialogue,) = corpus["recordings"]
    assert dialogue["quotes"] and all(q["sentences"][1] - q["sentences"][0] in (1, 2) for q in dialogue["quotes"])
    from ttt_speech.eval.data import load_sequences
    from ttt_speech.eval.spans import quote_probes, quote_spans

    (seq,) = load_sequences(tmp_path / "w/tok/train")
    assert seq.tokens.shape[0] == 17 and seq.source == "quotes/" + dialogue["path"]
    probes, _ = quote_probes([seq], quote_spans(tmp_path / "w/c"), 8, slice(9, 17))
    assert len(probes) == len(dialogue["quotes"])  # every quote found in the tokens, by source
