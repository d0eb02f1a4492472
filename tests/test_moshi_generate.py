"""The `generate` job on its embedded default (the shipped small hybrid), a tiny hybrid built in code
and a saved hybrid."""

from __future__ import annotations

import argparse
import json
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("moshi")

from ttt_speech import TTTConfig  # noqa: E402
from ttt_speech.moshi import convert  # noqa: E402
from ttt_speech.moshi.commands import add_generate_arguments, run_generate  # noqa: E402
from moshi.models.lm import LMGen  # noqa: E402

from ttt_speech.moshi.generate import stream, streaming_state_finite  # noqa: E402
from ttt_speech.moshi.tiny import build_tiny_hybrid, build_tiny_lm, write_tiny_checkpoint  # noqa: E402


def generate(*argv: str) -> dict[str, Path]:
    parser = argparse.ArgumentParser()
    add_generate_arguments(parser)
    return run_generate(parser.parse_args(list(argv)))


def test_generate_on_the_embedded_default_speaks_with_its_own_codec(tmp_path: Path) -> None:
    files = generate("--minutes", "0.05", "--out", str(tmp_path), "--device", "cpu")
    frames = 38
    tokens = np.load(files["tokens"])
    assert tokens.shape == (1, 9, frames - 1)  # text + 8 codebooks of 1024, as Moshi
    assert tokens[:, 1:].max() < 1024 and tokens[:, 0].max() < 1000
    with wave.open(str(files["audio"])) as w:
        assert w.getframerate() == 24000 and w.getnframes() == (frames - 1) * 1920
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    assert np.abs(pcm).max() > 0  # the shipped codec decodes to sound, not silence
    assert json.loads(files["stats"].read_text())["state_finite"] is True


def test_generate_on_the_tiny_model(tmp_path: Path) -> None:
    files = generate("--minutes", "0.2", "--tiny", "--tiny-mimi", "--out", str(tmp_path), "--device", "cpu")
    frames = 150  # 0.2 min at 12.5 Hz
    tokens = np.load(files["tokens"])
    assert tokens.shape == (1, 3, frames - 1)  # text + 2 codebooks; the acoustic delay costs one frame
    assert tokens.min() >= 0 and tokens[:, 1:].max() < 32
    with wave.open(str(files["audio"])) as w:
        assert w.getframerate() == 24000 and w.getnchannels() == 1 and w.getnframes() == (frames - 1) * 1920
    assert files["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stats = json.loads(files["stats"].read_text())
    assert stats["frames"] == frames and stats["state_bytes_first"] == stats["state_bytes_last"] > 0
    assert stats["state_finite"] is True
    assert stats["frames_per_s"] > 0 and stats["rtf"] > 0 and stats["p90_ms"] >= stats["p50_ms"] > 0


def test_generate_is_deterministic_and_loads_real_weights(tmp_path: Path) -> None:
    a = generate("--minutes", "0.05", "--tiny", "--out", str(tmp_path / "a"), "--device", "cpu")
    b = generate("--minutes", "0.05", "--tiny", "--out", str(tmp_path / "b"), "--device", "cpu")
    assert np.array_equal(np.load(a["tokens"]), np.load(b["tokens"]))
    saved = build_tiny_hybrid(0).save_pretrained(tmp_path / "hybrid")
    c = generate("--minutes", "0.05", "--hybrid", str(saved), "--dtype", "float32", "--out", str(tmp_path / "c"),
                 "--device", "cpu")
    assert np.array_equal(np.load(a["tokens"]), np.load(c["tokens"]))
    ckpt = write_tiny_checkpoint(tmp_path / "vanilla", tokenizer=False)
    d = generate("--minutes", "0.05", "--moshi-weights", str(ckpt.moshi_weights), "--config", str(ckpt.config),
                 "--mimi-weights", str(ckpt.mimi_weights), "--mimi-config", str(ckpt.mimi_config),
                 "--batch-size", "2", "--out", str(tmp_path / "d"), "--device", "cpu")
    assert np.load(d["tokens"]).shape == (2, 3, 37)  # round(0.05 * 60 * 12.5) = 38 frames, one delay and d["audio_0"].exists() and d["audio_1"].exists()


def test_stream_state_is_constant_and_larger_than_vanillas_by_the_ttt_state() -> None:
    lm = build_tiny_lm(0)
    vanilla = stream(lm, 40, progress=False)
    cfg = TTTConfig(dim=32, num_heads=4, mini_batch=16, gate_init=0.5)
    hybrid = stream(convert(lm, ttt=cfg), 40, progress=False)
    assert len(set(vanilla.state_bytes)) == len(set(hybrid.state_bytes)) == 1
    ttt_bytes = 2 * (2 * 4 * 8 * 8 * 4 + 2 * 4 * 8 * 4 + 8)  # 2 layers x (W1, grad W1, b1, grad b1, offset)
    assert hybrid.state_bytes[0] - vanilla.state_bytes[0] == ttt_bytes
    assert not torch.equal(torch.as_tensor(vanilla.tokens), torch.as_tensor(hybrid.tokens))


def test_state_finite_flags_a_nan_in_the_ttt_memory():
    lm = build_tiny_hybrid(seed=0).eval()
    gen = LMGen(lm)
    with gen.streaming(1):
        assert streaming_state_finite(gen, lm)
        lm.ttt_layers()[0]._streaming_state.ttt["W1"][0, 0, 0, 0] = float("nan")
        assert not streaming_state_finite(gen, lm)
