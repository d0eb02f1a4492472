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

from helpers.moshi import convert_moshi, random_codes, user_stream  # noqa: E402
from ttt_speech import TTTConfig  # noqa: E402
from ttt_speech.moshi import convert  # noqa: E402
from ttt_speech.eval.generate_command import add_generate_arguments, run_generate  # noqa: E402
from ttt_speech.moshi.files import SHIPPED_DIR  # noqa: E402
from moshi.models.lm import LMGen  # noqa: E402

from ttt_speech.moshi.generate import generate_frames, stream, streaming_state_finite  # noqa: E402
from ttt_speech.moshi.tiny import build_tiny_hybrid, build_tiny_lm, write_tiny_checkpoint  # noqa: E402


def generate(*argv: str) -> dict[str, Path]:
    parser = argparse.ArgumentParser()
    add_generate_arguments(parser)
    return run_generate(parser.parse_args(list(argv)))


def test_generate_on_the_embedded_default_speaks_with_its_own_codec(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    files = generate("--minutes", "0.05", "--out", str(tmp_path), "--device", "cpu")
    frames = 38
    tokens = np.load(files["tokens"])
    assert tokens.shape == (1, 9, frames - 1)  # text + 8 codebooks of 1024, as Moshi
    assert tokens[:, 1:].max() < 1024 and tokens[:, 0].max() < 1000
    with wave.open(str(files["audio"])) as w:
        assert w.getframerate() == 24000 and w.getnframes() == (frames - 1) * 1920
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    assert np.abs(pcm).max() > 0  # the shipped codec decodes to sound, not silence
    stats = json.loads(files["stats"].read_text())
    assert stats["state_finite"] is True
    # the memory line: the shipped clip's passage heard again 10 windows later (the window read from the model)
    window = json.loads((SHIPPED_DIR / "config.json").read_text())["context"]
    check = stats["memory_check"]
    assert (check["status"], check["window"], check["gap"]) == ("ok", window, 10 * window)
    for group in ("text words", "codebook 0"):
        assert 0 < check["with_memory"][group] < 20 and 0 < check["reset"][group] < 20
        assert check["change"][group] == pytest.approx(check["with_memory"][group] / check["reset"][group] - 1)
    assert check["change"]["text words"] < -0.10  # the shipped memory recalls the passage (-15 % measured)
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("memory: a 2.6 s passage heard again ") and "frames/s" in lines[-2]
    assert f"{check['with_memory']['text words']:.2f} nats/word with the memory" in lines[-1]


def test_generate_hybrid_dir_gets_the_memory_line_when_it_reads_the_shipped_tokens(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--hybrid DIR: probed when its Mimi and tokenizer are the shipped ones; another tokenizer: a one-line reason."""
    hybrid = tmp_path / "hybrid"
    hybrid.mkdir()
    for f in SHIPPED_DIR.iterdir():
        (hybrid / f.name).symlink_to(f)
    files = generate("--minutes", "0.02", "--hybrid", str(hybrid), "--out", str(tmp_path / "a"), "--device", "cpu")
    assert json.loads(files["stats"].read_text())["memory_check"]["status"] == "ok"
    assert capsys.readouterr().out.splitlines()[-1].startswith("memory: a 2.6 s passage heard again")
    (hybrid / "tokenizer.model").unlink()
    (hybrid / "tokenizer.model").write_bytes(b"not the shipped tokenizer")
    generate("--minutes", "0.02", "--hybrid", str(hybrid), "--out", str(tmp_path / "b"), "--device", "cpu",
             "--tiny-mimi")
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"memory check skipped: the text tokenizer beside {hybrid} is not the shipped one, so its tokens are not the "
        "shipped clip's")


def test_generate_on_the_tiny_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = generate("--minutes", "0.2", "--tiny", "--tiny-mimi", "--out", str(tmp_path), "--device", "cpu")
    assert capsys.readouterr().out.splitlines()[-1] == ("memory check skipped: the model is built in code; the shipped "
                                                        "clip holds the shipped codec's tokens")
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
    assert stats["memory_check"]["status"] == "skipped"
    quiet = generate("--minutes", "0.05", "--tiny", "--no-memory-check", "--out", str(tmp_path / "q"), "--device", "cpu")
    assert not [line for line in capsys.readouterr().out.splitlines() if line.startswith("memory")]
    assert "memory_check" not in json.loads(quiet["stats"].read_text())


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
    assert np.load(d["tokens"]).shape == (2, 3, 37)  # round(0.05 * 60 * 12.5) = 38 frames, one delay
    for i in range(2):  # one wav per stream of the batch, each as long as its tokens
        with wave.open(str(d[f"audio_{i}"])) as w:
            assert w.getframerate() == 24000 and w.getnframes() == 37 * 1920


def test_a_converted_checkpoint_generates_audio_as_is(tmp_path: Path) -> None:
    """convert-moshi carries the Mimi and tokenizer its source config names: generate --hybrid OUT decodes
    with that Mimi (the tokens decode to the same audio as giving the Mimi explicitly) with no extra flag."""
    ckpt = write_tiny_checkpoint(tmp_path / "released")
    out = tmp_path / "hybrid"
    convert_moshi("--moshi-weights", str(ckpt.moshi_weights), "--config", str(ckpt.config), "--out", str(out),
                  "--dtype", "float32")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "mimi.safetensors", "mimi_config.json",
                                                     "model.safetensors", "tokenizer.model"]
    for name in ("mimi.safetensors", "tokenizer.model"):
        assert (out / name).read_bytes() == (ckpt.root / name).read_bytes()
    as_is = generate("--minutes", "0.05", "--hybrid", str(out), "--out", str(tmp_path / "a"), "--device", "cpu")
    explicit = generate("--minutes", "0.05", "--hybrid", str(out), "--mimi-weights", str(ckpt.mimi_weights),
                        "--mimi-config", str(ckpt.mimi_config), "--out", str(tmp_path / "b"), "--device", "cpu")
    assert as_is["audio"].read_bytes() == explicit["audio"].read_bytes()
    with wave.open(str(as_is["audio"])) as w:
        assert w.getnframes() == 37 * 1920


def test_a_checkpoint_without_a_mimi_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = write_tiny_checkpoint(tmp_path / "released")
    ckpt.mimi_weights.unlink()
    convert_moshi("--moshi-weights", str(ckpt.moshi_weights), "--config", str(ckpt.config),
                  "--out", str(tmp_path / "hybrid"), "--dtype", "float32")
    assert "no Mimi beside" in capsys.readouterr().err
    files = generate("--minutes", "0.05", "--hybrid", str(tmp_path / "hybrid"), "--out", str(tmp_path / "g"),
                     "--device", "cpu")
    assert "audio" not in files and "--mimi-weights" in capsys.readouterr().err


def test_latency_plot_shows_state_and_memory_apart_with_legends(tmp_path: Path, monkeypatch) -> None:
    """latency_memory.png: three panels, each with a legend; the state panel plots the measured state
    bytes and the memory panel the RSS, each on its own axis; the title names the model without a path."""
    from matplotlib.figure import Figure

    figures: list[Figure] = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figures.append(self))
    files = generate("--minutes", "0.05", "--out", str(tmp_path), "--device", "cpu")
    stats = json.loads(files["stats"].read_text())
    (fig,) = figures
    latency, state, rss = fig.axes
    assert all(ax.get_legend() is not None for ax in fig.axes)
    assert np.allclose(state.get_lines()[0].get_ydata(), stats["state_bytes_last"] / 2**10)  # flat: KiB
    assert np.max(rss.get_lines()[0].get_ydata()) == pytest.approx(stats["rss_bytes_max"] / 2**20)
    assert state.get_ylabel() == "state (KiB)" and rss.get_ylabel() == "RSS (MiB)"
    title = fig.get_suptitle()
    assert title.startswith("the shipped small in-place memory hybrid: 38 frames") and "/" not in title


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
        lm.memory_layers()[0]._streaming_state.memory["W1"][0, 0, 0, 0] = float("nan")
        assert not streaming_state_finite(gen, lm)


def own_stream(lm, prompt: torch.Tensor, user: torch.Tensor, seed: int, **kw) -> torch.Tensor:
    torch.manual_seed(seed)
    return generate_frames(lm, user, 12, prompt=prompt, **kw)


def test_generate_frames_forces_the_prompt_and_samples_reproducibly_per_sequence() -> None:
    lm = build_tiny_hybrid(0).eval()
    rows, P = 1 + lm.dep_q, 5
    prompt, user = random_codes(lm, 2, P, seed=1)[:, :rows], user_stream(lm, 2, 13)
    codes = own_stream(lm, prompt, user, seed=0)
    assert codes.shape == (2, rows, 12)
    for k in range(rows):  # each stream's prompt frames come back as forced, up to its acoustic delay:
        end = P - lm.delays[k]  # the step after the prompt samples the last frames' delayed codebooks
        assert torch.equal(codes[:, k, :end], prompt[:, k, :end]), k
    assert torch.equal(own_stream(lm, prompt, user, seed=0), codes)
    assert not torch.equal(own_stream(lm, prompt, user, seed=1)[..., P:], codes[..., P:])
    assert (codes[:, 1:, -1] != 0).any()  # flush: the last frame's audio is sampled, not left at 0
    with pytest.raises(ValueError, match="user stream has 12 frames, the run needs 13"):
        generate_frames(lm, user[..., :12], 12, prompt=prompt)


def test_generate_frames_keeps_each_sequence_to_its_own_row() -> None:
    """Near-greedy sampling (temperatures 1e-4) takes the RNG out: each row must come out as it does alone,
    whatever its batch position (a forced text or prompt frame landing in another row would show)."""
    lm = build_tiny_hybrid(0).eval()
    prompt, user = random_codes(lm, 2, 4, seed=2)[:, :1 + lm.dep_q], user_stream(lm, 2, 13, seed=4)
    greedy = {"temp": 1e-4, "temp_text": 1e-4}
    both = own_stream(lm, prompt, user, seed=0, **greedy)
    swapped = own_stream(lm, prompt.flip(0), user.flip(0), seed=1, **greedy)
    alone = own_stream(lm, prompt[1:], user[1:], seed=2, **greedy)
    assert not torch.equal(both[0, :, 4:], both[1, :, 4:])
    assert torch.equal(swapped, both.flip(0)) and torch.equal(alone[0], both[1])
