"""`ttt-speech talk`, the headless client, against our server in the same process on loopback: the server
runs `ttt-speech serve` on what `convert-moshi` wrote from a tiny released-format checkpoint (its Mimi and
tokenizer carried along), the client sends a wav and writes the reply. Bounded: every wait has a timeout
and the server is stopped with SIGTERM, as a user would."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import typing as tp
import wave
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("moshi")
pytest.importorskip("aiohttp")
sphn = pytest.importorskip("sphn")
import sentencepiece  # noqa: E402
from helpers.serve import listening_mimi  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from ttt_speech import cli  # noqa: E402
from ttt_speech.moshi.tiny import write_tiny_checkpoint  # noqa: E402
from ttt_speech.errors import UsageError  # noqa: E402
from ttt_speech.serve.client import FRAME, chat_url, read_input  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
DELAY = 1  # the tiny model's acoustic delay: the first frame of a conversation yields no audio


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def talk(port: int, wav: Path, out: Path, *extra: str) -> int:
    try:
        cli.main(["talk", "--url", f"ws://127.0.0.1:{port}", "--wav", str(wav), "--out", str(out),
                  "--linger", "2", "--timeout", "30", *extra])  # linger: a loaded CI machine can stall
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def read_wav(path: Path) -> tuple[int, np.ndarray]:
    with wave.open(str(path)) as w:
        assert w.getnchannels() == 1
        return w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), "<i2")


def test_chat_url() -> None:
    assert chat_url("ws://127.0.0.1:8998") == "ws://127.0.0.1:8998/api/chat"
    assert chat_url("127.0.0.1:8998", seed=3) == "ws://127.0.0.1:8998/api/chat?seed=3"
    assert chat_url("https://host/x/api/chat?a=1", seed=0) == "wss://host/x/api/chat?a=1&seed=0"
    with pytest.raises(UsageError, match="--url"):
        chat_url("ftp://host")


def test_talk_to_our_server_on_a_converted_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    released = write_tiny_checkpoint(tmp_path / "released")
    mimi = listening_mimi(0)  # a Mimi whose codebooks differ, so that other codes decode to other audio
    save_file({k: v.contiguous() for k, v in mimi.state_dict().items()}, str(released.mimi_weights))
    model = tmp_path / "hybrid"
    cli.main(["convert-moshi", "--moshi-weights", str(released.moshi_weights), "--config", str(released.config),
              "--out", str(model), "--dtype", "float32"])
    t = np.arange(int(3.0 * 16000)) / 16000  # 3 s of a warbling tone at 16 kHz: resampled to 24 kHz on the way
    wav = tmp_path / "in.wav"
    sphn.write_wav(str(wav), (0.3 * np.sin(2 * np.pi * (200 + 50 * np.sin(3 * t)) * t)).astype(np.float32), 16000)
    frames = len(read_input(wav)) // FRAME
    port = free_port()
    results: dict[str, tp.Any] = {}

    def client() -> None:  # waits for the server, talks three times, then stops it
        deadline = time.monotonic() + 120
        while not listening(port):
            if time.monotonic() > deadline:  # serve failed: the test thread reports it; no signal to send
                return
            time.sleep(0.2)
        try:
            results["a"] = talk(port, wav, tmp_path / "a.wav", "--text", str(tmp_path / "a.txt"), "--seed", "5")
            results["b"] = talk(port, wav, tmp_path / "b.wav", "--text", str(tmp_path / "b.txt"), "--seed", "5")
            results["c"] = talk(port, wav, tmp_path / "c.wav", "--text", str(tmp_path / "c.txt"), "--seed", "6")
        except BaseException as e:  # reported by the test thread
            results["error"] = e
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # the server's handler: close sessions, exit cleanly

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    cli.main(["serve", "--model", str(model), "--port", str(port), "--state-dir", str(tmp_path / "kept"),
              "--device", "cpu", "--shutdown-after", "300",
              "--max-load", "off"])  # a busy CI machine is behind real time: admit the three talks anyway
    thread.join(30)
    assert "error" not in results, results.get("error")
    assert results == {"a": 0, "b": 0, "c": 0}
    rate, a = read_wav(tmp_path / "a.wav")
    assert rate == 24000 and len(a) == (frames - DELAY) * FRAME  # one 80 ms frame back per frame sent
    assert np.abs(a).max() > 0  # the converted checkpoint's own Mimi decoded the reply
    _, b = read_wav(tmp_path / "b.wav")
    _, c = read_wav(tmp_path / "c.wav")
    assert np.array_equal(a, b) and not np.array_equal(a, c)  # the seed decides the reply, nothing else
    text = (tmp_path / "a.txt").read_text()
    assert text == (tmp_path / "b.txt").read_text() != (tmp_path / "c.txt").read_text()
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model / "tokenizer.model"))
    pieces = "".join(sp.id_to_piece(i).replace("\u2581", " ") for i in range(sp.vocab_size()))
    assert text.strip() and set(text.strip()) <= set(pieces)  # spelt with the carried tokenizer's pieces
    err = capsys.readouterr().err
    assert f"sent {frames} frames" in err and "Traceback" not in err


def test_talk_to_nobody_or_with_a_bad_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wav = tmp_path / "in.wav"
    sphn.write_wav(str(wav), np.zeros(FRAME, np.float32), 24000)
    port = free_port()
    assert talk(port, wav, tmp_path / "out.wav") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("talk: ws://127.0.0.1:") and "\n" not in err
    assert not (tmp_path / "out.wav").exists()
    assert talk(port, tmp_path / "missing.wav", tmp_path / "out.wav") == 2  # the user's mistake: exit 2
    assert "missing.wav: no such audio file (--wav)" in capsys.readouterr().err
    (tmp_path / "noise.wav").write_bytes(b"not audio")
    assert talk(port, tmp_path / "noise.wav", tmp_path / "out.wav") == 2
    err = capsys.readouterr().err
    assert "noise.wav: cannot read it as audio" in err and "Traceback" not in err and err.count("\n") == 1


def test_a_server_that_never_answers_or_refuses_is_a_talk_error() -> None:
    """A websocket that never sends Moshi's handshake, and one that refuses with an ERROR message (as our
    server does when full): both end the talk with the reason, bounded by --timeout."""
    import asyncio

    from aiohttp import web

    from ttt_speech.serve.client import TalkError, talk as talk_to
    from ttt_speech.serve.protocol import Close, error

    async def silent(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await asyncio.sleep(1.5)  # longer than the client waits
        return ws

    async def full(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_bytes(error("server full (4 sessions); try again later"))
        await ws.close(code=Close.TRY_AGAIN_LATER)
        return ws

    async def main() -> list[str]:
        app = web.Application()
        app.router.add_get("/silent", silent)
        app.router.add_get("/full", full)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        messages = []
        try:
            for path in ("silent", "full"):
                with pytest.raises(TalkError) as e:
                    await talk_to(f"ws://127.0.0.1:{port}/{path}", np.zeros(FRAME, np.float32), timeout_s=0.5)
                messages.append(str(e.value))
        finally:
            await runner.cleanup()
        return messages

    silent_msg, full_msg = asyncio.run(main())
    assert "no handshake within 0.5 s" in silent_msg
    assert full_msg.endswith("did not start a conversation: server full (4 sessions); try again later")
