"""Admission control against the server in-process on loopback: a new session is refused with 1013 and a
one-line reason while the measured batched step is over its budget, or while the Opus coder it would join would
be over it with one more session, and admitted again once it is not; a --max-sessions whose streaming state
cannot fit in device memory is refused at start with the most that do."""

from __future__ import annotations

import asyncio
import typing as tp
from pathlib import Path

import pytest
import sentencepiece

pytest.importorskip("moshi")
pytest.importorskip("sphn")  # not on the GPU device image (serve tests run on CI)
aiohttp = pytest.importorskip("aiohttp")

from aiohttp import WSMsgType, web  # noqa: E402
from helpers.serve import listening_mimi  # noqa: E402

from ttt_speech.errors import UsageError  # noqa: E402
from ttt_speech.moshi.tiny import build_tiny_hybrid, write_tiny_tokenizer  # noqa: E402
from ttt_speech.serve.capacity import check_fits  # noqa: E402
from ttt_speech.serve.opus import Load  # noqa: E402
from ttt_speech.serve.protocol import Close, Kind, ProtocolError  # noqa: E402
from ttt_speech.serve.server import build_app, render_metrics  # noqa: E402
from ttt_speech.serve.sessions import Admission, SessionManager  # noqa: E402
from ttt_speech.serve.store import StateStore  # noqa: E402
from ttt_speech.serve.streams import BatchedStreams  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
WAIT_S = 30.0  # bound on every network wait


def tiny_manager(tmp_path: Path, admission: Admission, **kwargs: object) -> SessionManager:
    """A server's session manager over the tiny hybrid (4 slots) whose metrics window is 1 s."""
    lm = build_tiny_hybrid(0)
    tokenizer = sentencepiece.SentencePieceProcessor(
        model_file=str(write_tiny_tokenizer(tmp_path / "tok.model", lm.text_card)))
    manager = SessionManager(BatchedStreams(lm, listening_mimi(0), 4), StateStore(tmp_path / "kept", "fp"),
                             tokenizer, admission=admission, **kwargs)
    manager.metrics.window_s = 1.0  # steps older than 1 s no longer count
    return manager


def serve_on_loopback(manager: SessionManager, body: tp.Callable[[int], tp.Awaitable[None]]) -> None:
    """Run `body(port)` against the manager's app on a free loopback port, then shut the server down."""
    async def main() -> None:
        runner = web.AppRunner(build_app(manager), handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        try:
            await body(runner.addresses[0][1])
        finally:
            await runner.cleanup()

    asyncio.run(asyncio.wait_for(main(), 4 * WAIT_S))


async def first_reply(session: aiohttp.ClientSession, port: int) -> tuple[bytes, int | None, str]:
    """(first binary message, close code, close reason) of one connection; an admitted one is closed by us."""
    async with session.ws_connect(f"http://127.0.0.1:{port}/api/chat?seed=1") as ws:
        first = await asyncio.wait_for(ws.receive(), WAIT_S)
        assert first.type == WSMsgType.BINARY
        if first.data[0] == Kind.ERROR:
            closing = await asyncio.wait_for(ws.receive(), WAIT_S)
            assert closing.type == WSMsgType.CLOSE
            return first.data, closing.data, closing.extra
        return first.data, None, ""


def test_a_server_behind_real_time_refuses_new_sessions_with_1013(tmp_path: Path) -> None:
    manager = tiny_manager(tmp_path, Admission(max_load=0.5, min_steps=25))  # budget: 40 ms per frame

    async def body(port: int) -> None:
        async with aiohttp.ClientSession() as client:
            first, code, _ = await first_reply(client, port)  # nothing measured yet: admitted
            assert first[0] == Kind.HANDSHAKE and code is None
            for _ in range(24):  # the engine's record of 24 steps of 50 ms: too few to judge
                manager.metrics.record(0.050, 1)
            first, code, _ = await first_reply(client, port)
            assert first[0] == Kind.HANDSHAKE and code is None
            manager.metrics.record(0.050, 1)  # the 25th: p90 50 ms >= 40 ms
            first, code, reason = await first_reply(client, port)
            want = "server behind real time (step p90 50 ms, budget 40 ms per frame); try again later"
            assert code == Close.TRY_AGAIN_LATER and reason == want and first[1:].decode() == want
            await asyncio.sleep(1.1)  # the slow steps leave the window; fast ones come in
            for _ in range(30):
                manager.metrics.record(0.030, 1)
            first, code, _ = await first_reply(client, port)
            assert first[0] == Kind.HANDSHAKE and code is None
            assert manager.metrics.ended["not_real_time"] == 1
            assert "ttt_serve_step_p90_seconds 0.03" in render_metrics(manager)

    serve_on_loopback(manager, body)


def test_a_session_the_opus_coder_could_not_keep_up_with_is_refused_with_1013(tmp_path: Path) -> None:
    manager = tiny_manager(tmp_path, Admission(max_load=0.5), opus_workers=0)  # codes on the event loop
    busy = manager.opus._inline_busy  # what the event loop's Opus calls record, written here as a known series

    async def body(port: int) -> None:
        async with aiohttp.ClientSession() as client:
            async with client.ws_connect(f"http://127.0.0.1:{port}/api/chat?seed=1") as held:  # stays connected
                assert (await asyncio.wait_for(held.receive(), WAIT_S)).data[0] == Kind.HANDSHAKE
                busy.record(0.4)  # no steps measured yet (fewer than min_steps): not judged
                first, code, _ = await first_reply(client, port)
                assert first[0] == Kind.HANDSHAKE and code is None
                for _ in range(25):  # 25 fast steps: 2 s of frames, 0.4 s of coding = 20 % of each frame for
                    manager.metrics.record(0.010, 1)  # its 1 session, 40 % with a 2nd: under 50 %
                first, code, _ = await first_reply(client, port)
                assert first[0] == Kind.HANDSHAKE and code is None
                busy.record(0.2)  # 30 % of each frame: 60 % with a 2nd
                first, code, reason = await first_reply(client, port)
                want = ("Opus coding behind real time (the event loop: 30% of each frame, 1 sessions; 60% with "
                        "one more); try again later")
                assert code == Close.TRY_AGAIN_LATER and reason == want and first[1:].decode() == want
                assert "ttt_serve_opus_busy_fraction 0.3" in render_metrics(manager)
                await asyncio.sleep(1.1)  # the steps and the busy spell leave the window
                first, code, _ = await first_reply(client, port)
                assert first[0] == Kind.HANDSHAKE and code is None
            assert manager.metrics.ended["opus_not_real_time"] == 1

    serve_on_loopback(manager, body)
    manager.metrics.window_s = 10.0
    for _ in range(25):
        manager.metrics.record(0.010, 1)
    manager.opus.load = lambda window_s, audio_s: Load("Opus worker 13", 1.0, 256)  # type: ignore[method-assign]
    with pytest.raises(ProtocolError) as e:
        manager._admit()
    assert e.value.slug == "opus_not_real_time" and e.value.code == Close.TRY_AGAIN_LATER
    assert len(e.value.reason.encode()) <= 123  # a websocket close reason's limit: the whole line reaches the client


def test_admission_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="max_load must be > 0"):
        Admission(max_load=0.0)
    with pytest.raises(ValueError, match="min_steps must be >= 1"):
        Admission(min_steps=0)


def test_a_batch_whose_state_does_not_fit_is_refused_with_the_most_that_do() -> None:
    per_session = 1_589_340_160  # vanilla Moshi-7B: 3000-frame KV (1.57 GB) + Mimi and offsets (~1515.7 MiB, issue 4)
    check_fits(78, per_session, 116 * 2**30)
    with pytest.raises(UsageError) as e:
        check_fits(100, per_session, 116 * 2**30)
    assert str(e.value) == ("--max-sessions 100: 100 sessions need 148.0 GiB of streaming state (1516 MiB each), "
                            "116.0 GiB of device memory is free: give --max-sessions 78 or fewer (a shorter attention "
                            "window, convert-moshi --attention-window, makes each session smaller)")
