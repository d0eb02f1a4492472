"""Tokenizing on CUDA, where moshi CUDA-graphs Mimi's streaming encoder. Apart from test_train_data.py, which needs
sphn for its wavs: the device image has no sphn, so there this test skipped with that module (2026-12-03)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("moshi")

from ttt_speech.moshi.tiny import TinyCheckpoint, write_tiny_checkpoint  # noqa: E402
from ttt_speech.train.tokenize import MoshiTokenizer  # noqa: E402

FRAME = 1920  # Mimi: 24 kHz / 12.5 Hz


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoint:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_moshi"))


@pytest.mark.gpu
def test_a_long_recording_tokenizes_on_cuda(checkpoint: TinyCheckpoint) -> None:
    """Three chunks and a short last one: a graph takes one shape, so the last chunk is padded
    (test_train_data.py holds the padding to the CPU's codes)."""
    cuda = MoshiTokenizer.from_checkpoint(str(checkpoint.root), str(checkpoint.mimi_config), device="cuda")
    cpu = MoshiTokenizer.from_checkpoint(str(checkpoint.root), str(checkpoint.mimi_config))
    cuda.chunk_frames = cpu.chunk_frames = 10
    wav = np.random.default_rng(2).normal(0, 0.1, (2, 37 * FRAME - 100)).astype(np.float32)
    got, want = cuda.encode_audio(wav), cpu.encode_audio(wav)
    assert got.shape == want.shape == (2, want.shape[1], 37) and (got == want).mean() > 0.95
