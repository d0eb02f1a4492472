"""The codec trainer on CPU: the small config's shapes, losses that fall, identical resume, export, bad files."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("moshi")
pytest.importorskip("sphn")

from ttt_speech.audio import FRAME_SIZE  # noqa: E402
from ttt_speech.codec.config import load_codec_config  # noqa: E402
from ttt_speech.codec.loop import CodecTrainer, train_codec  # noqa: E402
from ttt_speech.codec.model import build_codec, load_codec, size_report  # noqa: E402
from ttt_speech.codec.synthetic import write_synthetic_audio  # noqa: E402
from ttt_speech.engine.checkpoint import latest_checkpoint  # noqa: E402
from ttt_speech.engine.skips import BadInputError  # noqa: E402
from ttt_speech.engine.metrics import read_metrics  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"



pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def audio(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four stereo files of 3 s of synthetic tones, chirps and noise bursts at 24 kHz."""
    return write_synthetic_audio(tmp_path_factory.mktemp("audio"), files=4, seconds=3.0)


def tiny(run_dir: Path, manifest: Path, *over: str):
    return load_codec_config(CONFIGS / "codec_tiny.yaml", [f"run_dir={run_dir}", f"data.train=[{manifest}]",
                                                           "log.progress=false", *over])


def test_small_config_is_mimi_at_12_5_hz_with_8_codebooks() -> None:
    cfg = load_codec_config(CONFIGS / "codec_small.yaml")
    mimi = build_codec(cfg.model, 0).eval()
    assert (mimi.sample_rate, mimi.frame_rate, mimi.frame_size, mimi.total_codebooks) == (24000, 12.5, 1920, 8)
    with torch.no_grad():
        codes = mimi.encode(torch.zeros(2, 1, 25 * FRAME_SIZE))
    assert codes.shape == (2, 8, 25) and codes.dtype == torch.int64
    assert size_report(mimi)["fp16_mb"] <= 10.0


def test_losses_finite_and_falling(tmp_path: Path, audio: Path) -> None:
    cfg = tiny(tmp_path / "run", audio, "quantizer.dropout=0.0")
    trainer = CodecTrainer(cfg)
    from ttt_speech.codec.data import Crops

    crops = Crops(trainer.train_audio, 4 * FRAME_SIZE, [0, 0])
    batch = torch.stack([crops[i] for i in range(4)])  # one batch, so the curve is not data noise
    losses = [trainer.train_step(batch, step) for step in range(50)]
    assert all(math.isfinite(r[k]) for r in losses for k in ("loss", "wave_l1", "mel_l1", "mel_l2", "commitment"))
    first, last = np.mean([r["loss"] for r in losses[:5]]), np.mean([r["loss"] for r in losses[-5:]])
    assert last < 0.8 * first, (first, last)


def test_resume_after_kill_repeats_the_loss_curve(tmp_path: Path, audio: Path) -> None:
    over = ["stages=[{seq_len: 4, steps: 6, lr: 3.0e-3}, {seq_len: 6, steps: 6, lr: 1.0e-3}]",
            "checkpoint.every=4", "quantizer.replace_every=3"]
    whole = train_codec(tiny(tmp_path / "whole", audio, *over))
    assert whole.finished
    cut = tmp_path / "cut"
    train_codec(tiny(cut, audio, *over))
    # what a kill after step 9 leaves: checkpoints up to step 8, metrics and a half-written checkpoint past it
    for ckpt in sorted((cut / "checkpoints").glob("step_*")):
        if int(ckpt.name[5:]) > 8:
            shutil.rmtree(ckpt)
    (cut / "checkpoints" / ".tmp-step_00000012").mkdir()
    shutil.rmtree(cut / "export")
    assert latest_checkpoint(cut).name == "step_00000008"
    resumed = train_codec(tiny(cut, audio, *over))
    assert resumed.finished and not (cut / "checkpoints" / ".tmp-step_00000012").exists()
    curve = [[(r["step"], r["split"], r["loss"]) for r in read_metrics(d)] for d in (tmp_path / "whole", cut)]
    assert curve[0] == curve[1] and len([c for c in curve[0] if c[1] == "train"]) == 12
    a, b = (load_codec(d) for d in (whole.export, resumed.export))
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_export_loads_where_tokenize_loads_mimi(tmp_path: Path, audio: Path) -> None:
    from ttt_speech.moshi.tiny import tiny_lm_config, write_tiny_checkpoint
    from ttt_speech.moshi.files import MIMI_CONFIG_NAME, MIMI_WEIGHTS_NAME
    from ttt_speech.train.tokenize import MoshiTokenizer

    result = train_codec(tiny(tmp_path / "run", audio, "stages=[{seq_len: 4, steps: 3, lr: 1.0e-3}]"))
    # a Moshi checkpoint directory whose config.json names the codec's files (4 + 4 audio codebooks)
    lm = tiny_lm_config(n_q=8, dep_q=4, card=64, delays=[0, 0, 1, 1, 1, 0, 1, 1, 1])
    ckpt = write_tiny_checkpoint(tmp_path / "moshi", lm_config=lm)
    for name in (MIMI_WEIGHTS_NAME, MIMI_CONFIG_NAME):
        shutil.copy(result.export / name, ckpt.root / name)
    assert json.loads((ckpt.root / MIMI_CONFIG_NAME).read_text())["seanet"]["norm"] == "none"
    tok = MoshiTokenizer.from_checkpoint(str(ckpt.root))
    wav = np.random.default_rng(0).standard_normal((2, 3 * FRAME_SIZE + 100)).astype(np.float32) * 0.1
    codes = tok.encode_audio(wav)
    assert codes.shape == (2, 4, 4) and codes.max() < 64
    with torch.no_grad():
        out = tok.mimi.decode(torch.from_numpy(codes))
    assert out.shape == (2, 1, 4 * FRAME_SIZE)
    trained = load_codec(result.export)
    with torch.no_grad():
        x = torch.from_numpy(wav[:, None, : 3 * FRAME_SIZE])
        assert torch.equal(trained.encode(x), tok.mimi.encode(x))


def test_bad_audio_files_are_named(tmp_path: Path, audio: Path) -> None:
    missing = tmp_path / "m.jsonl"
    missing.write_text(json.dumps({"path": "nope.wav", "duration": 1.0}) + "\n")
    with pytest.raises(BadInputError, match="nope.wav"):
        CodecTrainer(tiny(tmp_path / "a", missing))
    (tmp_path / "broken.wav").write_bytes(b"RIFF not really audio")
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"path": "broken.wav", "duration": 1.0}) + "\n")
    with pytest.raises(BadInputError, match=r"broken\.wav: cannot read audio"):
        CodecTrainer(tiny(tmp_path / "b", bad))
    mixed = audio.parent / "with_broken.jsonl"
    mixed.write_text(audio.read_text() + json.dumps({"path": str(tmp_path / "broken.wav"), "duration": 1.0}) + "\n")
    trainer = CodecTrainer(tiny(tmp_path / "c", mixed, "data.skip_bad=true"))
    assert [p for p, _ in trainer.skips.skipped] == [str(tmp_path / "broken.wav")]
