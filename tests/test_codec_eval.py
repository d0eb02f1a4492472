"""Codec audio in and out: resampling crops to 24 kHz, scores, eval-codec end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("moshi")
sphn = pytest.importorskip("sphn")

from ttt_speech.codec.commands import add_eval_arguments, run_eval  # noqa: E402
from ttt_speech.codec.config import MimiSize  # noqa: E402
from ttt_speech.codec.data import Crops, find_audio, read_audio  # noqa: E402
from ttt_speech.codec.evaluate import evaluate_codec, summarize, transcript_text  # noqa: E402
from ttt_speech.codec.losses import ReconstructionLoss, si_snr  # noqa: E402
from ttt_speech.codec.model import build_codec, export_codec  # noqa: E402
from ttt_speech.codec.synthetic import write_synthetic_audio  # noqa: E402
from ttt_speech.engine.skips import SkipLog  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")

TINY = MimiSize(n_filters=4, dimension=16, codebooks=4, bins=64, codebook_dim=8, d_model=16, num_heads=2,
                num_layers=1, dim_feedforward=32, context=25)


def test_other_rates_are_resampled_and_channels_split(tmp_path: Path) -> None:
    manifest = write_synthetic_audio(tmp_path, files=1, seconds=2.0, sample_rate=16000, channels=2)
    (a, b) = find_audio([str(tmp_path)], SkipLog())  # a directory works as well as the manifest
    assert (a.channel, b.channel, a.sample_rate) == (0, 1, 16000) and find_audio([str(manifest)], SkipLog()) == [a, b]
    crop = read_audio(a, 0.5, 24000)
    assert crop.shape == (24000,) and np.abs(crop).max() > 0.01
    tail = read_audio(a, 1.5, 24000)  # past the end: zeros
    assert np.all(tail[14000:] == 0) and Crops([a, b], 1920, [0, 0])[3].shape == (1, 1920)


def test_scores_are_sane() -> None:
    x = torch.randn(2, 24000)
    loss = ReconstructionLoss([64, 256, 1024], 32, 24000)
    assert float(loss(x, x)["mel_l1"]) == 0.0 and float(loss(x, 0.5 * x)["mel_l1"]) > 0.1
    assert torch.all(si_snr(x, 3 * x) > 60) and torch.all(si_snr(x, torch.randn(2, 24000)) < -10)


def test_eval_codec_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    manifest = write_synthetic_audio(tmp_path / "audio", files=1, seconds=2.0)
    (tmp_path / "audio" / "synth_0000.json").write_text(json.dumps(
        {"alignments": [["hello", [0.1, 0.4], "SPEAKER_MAIN"], ["there", [0.5, 0.9], "SPEAKER_OTHER"]]}))
    export_codec(build_codec(TINY, 0).eval(), TINY, tmp_path / "codec")
    mimi = build_codec(TINY, 0)
    scores = evaluate_codec(mimi, find_audio([str(manifest)], SkipLog()), seconds=1.0, codebooks=[1, 4], asr=False)
    assert [(s.channel, s.codebooks) for s in scores] == [(0, 1), (0, 4), (1, 1), (1, 4)]
    assert all(np.isfinite(s.mel_distance) and s.seconds == 1.0 for s in scores)
    assert [r["codebooks"] for r in summarize(scores)] == [1, 4]
    p = argparse.ArgumentParser()
    add_eval_arguments(p)
    run_eval(p.parse_args([str(tmp_path / "codec"), "--data", str(manifest), "--seconds", "1", "--codebooks", "2,4",
                           "--out", str(tmp_path / "report"), "--device", "cpu"]))
    assert "mel_distance" in capsys.readouterr().out
    report = json.loads((tmp_path / "report" / "codec_eval.json").read_text())
    assert len(report["clips"]) == 4 and [r["codebooks"] for r in report["summary"]] == [2, 4]
    if report["clips"][0]["asr_original"] is not None:  # pocketsphinx installed: the transcript is used too
        assert report["clips"][0]["wer_original"] is not None


def test_clips_are_spread_over_each_file_and_silent_ones_skipped(tmp_path: Path) -> None:
    manifest = write_synthetic_audio(tmp_path / "audio", files=1, seconds=4.0)
    wav = tmp_path / "audio" / "synth_0000.wav"
    pcm, sr = sphn.read(str(wav))
    pcm[1] = 0.0  # an empty user channel, as in a single-voice reading
    sphn.write_wav(str(wav), pcm, sr)
    scores = evaluate_codec(build_codec(TINY, 0), find_audio([str(manifest)], SkipLog()), seconds=1.0,
                            codebooks=[2], asr=False, clips=3)
    assert [(s.channel, s.start) for s in scores] == [(0, 0.0), (0, 1.5), (0, 3.0)]
    (tmp_path / "audio" / "synth_0000.json").write_text(json.dumps(
        {"alignments": [["early", [0.2, 0.4], "SPEAKER_MAIN"], ["late", [3.2, 3.5], "SPEAKER_MAIN"]]}))
    assert transcript_text(wav, 0, 2, 1.0, start=3.0) == "late"
    assert transcript_text(wav, 0, 2, 1.0) == "early"
