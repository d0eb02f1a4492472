"""Free runs saved as tokens and scored later: the saved tokens are what LMGen returned (undelayed), scoring
them offline gives the live run's per-minute audio scores, and eval-long -> score-free-run works end to end."""

from __future__ import annotations

import hashlib
import json
import wave

import numpy as np
import pytest
import torch

pytest.importorskip("moshi")
sentencepiece = pytest.importorskip("sentencepiece")

from helpers.moshi import random_codes

from ttt_speech import cli
from ttt_speech.eval import asr
from ttt_speech.eval.data import save_sequence
from ttt_speech.eval.free_run import AudioScoring, FreeRunResult, free_run_moshi, score_saved_run
from ttt_speech.eval.speaker import SpeakerEmbedder
from ttt_speech.moshi.tiny import (
    build_tiny_lm,
    build_tiny_mimi,
    tiny_mimi_config,
    write_tiny_checkpoint,
    write_tiny_tokenizer,
)

WORDS = "the a moshi speaks and listens at twelve frames per second while memory grows".split()
FRAME_SAMPLES = 1920  # 24 kHz / 12.5 Hz


class HashRecognizer:
    """A stand-in ASR whose transcript is a function of the exact samples: equal audio, equal words."""

    def transcribe(self, audio: np.ndarray, rate: int) -> str:
        digest = hashlib.sha256(np.ascontiguousarray(audio, np.float32).tobytes()).digest()
        return " ".join(WORDS[b % len(WORDS)] for b in digest[:8])


def test_saved_tokens_are_what_lmgen_returned(one_thread, monkeypatch):
    """Column j holds generated frame j's text and audio in the undelayed layout: codebook k of frame j is
    what the depformer sampled delays[k] steps after frame j's text; the last max-delay columns are padding."""
    from moshi.models import lm as lm_module

    from ttt_speech.moshi import generate

    sampled: list[torch.Tensor] = []  # the depformer's tokens per step (delayed coordinates)

    class SpyGen(lm_module.LMGen):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.on_audio_hook = lambda tokens: sampled.append(tokens[0].clone())

    monkeypatch.setattr(generate, "LMGen", SpyGen)  # where generate_frames (free runs) finds it
    lm = build_tiny_lm(0)
    P, frames = 3, 20
    run = free_run_moshi(lm, "tiny", frames, prompt=random_codes(lm, 1, P, seed=1)[0], progress=False,
                         frames_per_minute=8)
    assert run.tokens is not None and run.tokens.dtype == np.int16 and run.tokens.shape == (1 + lm.dep_q, frames)
    assert np.array_equal(run.tokens[0], run.text) and "tokens" not in run.to_dict()
    steps = torch.stack(sampled).numpy()  # [P + frames, dep_q]
    delays, D = lm.delays[1:1 + lm.dep_q], max(lm.delays)
    assert D == 1 and len(steps) == P + frames
    for k, d in enumerate(delays):
        assert np.array_equal(run.tokens[1 + k, :frames - D], steps[P + d:P + d + frames - D, k]), k
    assert (run.tokens[1:, frames - D:] == 0).all()


def test_scoring_saved_tokens_gives_the_live_scores(one_thread, tmp_path):
    """The key equivalence: the per-minute ASR, WER and voice scores of a live run come back from its saved
    tokens alone (same Mimi, same tools), and the WAV holds every frame's audio."""
    lm = build_tiny_lm(0)
    mimi = build_tiny_mimi(0, tiny_mimi_config(2, lm.card), num_codebooks=2)
    tokenizer = sentencepiece.SentencePieceProcessor(
        model_file=str(write_tiny_tokenizer(tmp_path / "tokenizer.model", lm.text_card)))

    def scoring() -> AudioScoring:
        return AudioScoring(mimi, tokenizer, HashRecognizer(), SpeakerEmbedder(prefer_resemblyzer=False))

    live = free_run_moshi(lm, "tiny", 50, prompt=random_codes(lm, 1, 4, seed=2)[0], scoring=scoring(),
                          progress=False, frames_per_minute=20)
    assert len(live.audio) == 3 and all(a.asr and a.model_text is not None and a.wer is not None for a in live.audio)
    assert len({a.asr for a in live.audio}) == 3 and live.audio[0].speaker_similarity == pytest.approx(1.0)
    np.save(tmp_path / "run.npy", live.tokens)
    pad_ids = (lm.text_padding_token_id, lm.end_of_text_padding_id)
    offline = score_saved_run(np.load(tmp_path / "run.npy"), scoring(), pad_ids, 20, wav=tmp_path / "run.wav")
    assert offline == live.audio
    with wave.open(str(tmp_path / "run.wav")) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 24000)
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    assert len(pcm) == 50 * FRAME_SAMPLES and np.abs(pcm).max() > 0
    with pytest.raises(ValueError, match="Mimi"):
        score_saved_run(live.tokens, AudioScoring(), pad_ids, 20)
    # a report's results.json reads back into the same run (what recipes draw several reports with)
    back = FreeRunResult.from_dict(json.loads(json.dumps(live.to_dict())))
    assert back.minutes == live.minutes and back.audio == live.audio and back.to_dict() == live.to_dict()


def test_eval_long_saves_the_run_and_score_free_run_rescores_it(one_thread, tmp_path, monkeypatch, capsys):
    """eval-long on a checkpoint directory saves free_run_<name>.npy/.txt; score-free-run on the saved tokens
    and the directory writes the scores eval-long itself reported (json), a table and the audio."""
    monkeypatch.setattr(asr, "Recognizer", HashRecognizer)  # eval-long imports them when it runs
    monkeypatch.setattr(asr, "asr_available", lambda: None)
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt")
    save_sequence(tmp_path / "held_out" / "s0.npy", random_codes(build_tiny_lm(0), 1, 24, seed=3)[0])
    report = tmp_path / "report"
    cli.main(["eval-long", "--model", f"m={ckpt.root}", "--data", str(tmp_path / "held_out"), "--lengths", "8,16",
              "--out", str(report), "--minutes", "2", "--frames-per-minute", "15", "--prompt-frames", "4",
              "--speaker", "mfcc", "--device", "cpu", "--no-progress"])
    tokens = np.load(report / "free_run_m.npy")
    assert tokens.shape == (3, 30) and tokens.dtype == np.int16
    text = (report / "free_run_m.txt").read_text().splitlines()
    assert [t.split(":")[0] for t in text] == ["minute 1", "minute 2"]
    live = json.loads((report / "results.json").read_text())["free_runs"][0]
    assert any("free_run_m.npy" in n for n in live["notes"]) and len(live["audio"]) == 2

    scored = tmp_path / "scored"
    cli.main(["score-free-run", str(report / "free_run_m.npy"), "--model", str(ckpt.root), "--out", str(scored),
              "--wav", "--frames-per-minute", "15", "--speaker", "mfcc", "--device", "cpu"])
    assert json.loads((scored / "free_run_m_audio.json").read_text()) == live["audio"]
    md = (scored / "free_run_m_audio.md").read_text()
    assert "| minute | WER | voice sim. | ASR text | model text |" in md and "\n| 2 | " in md
    with wave.open(str(scored / "free_run_m.wav")) as w:
        assert w.getnframes() == 30 * FRAME_SAMPLES
    np.save(tmp_path / "bad.npy", tokens[:2])  # not this model's layout
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.main(["score-free-run", str(tmp_path / "bad.npy"), "--model", str(ckpt.root), "--device", "cpu"])
    assert exit_.value.code == 2 and "bad.npy: (2, " in capsys.readouterr().err
