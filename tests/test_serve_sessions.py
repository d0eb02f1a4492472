"""The session manager in-process (no sockets): what a network test cannot provoke cheaply. A client
that stops reading is ended once its output queue is full while its neighbour keeps streaming; a
failing batched step ends the sessions in it, and the engine goes on serving new ones."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
import torch

pytest.importorskip("moshi")
pytest.importorskip("sphn")  # not on the GPU device image (serve tests run on CI)

from helpers.serve import audio, listening_mimi  # noqa: E402

from ttt_speech.moshi.tiny import build_tiny_hybrid, write_tiny_tokenizer  # noqa: E402
from ttt_speech.serve.protocol import Kind  # noqa: E402
from ttt_speech.serve.sessions import Ending, Limits, Session, SessionManager  # noqa: E402
from ttt_speech.serve.store import StateStore  # noqa: E402
from ttt_speech.serve.streams import BatchedStreams  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def manager(tmp: Path, limits: Limits, opus_workers: int = 0) -> SessionManager:
    lm = build_tiny_hybrid(0)
    tokenizer = sentencepiece.SentencePieceProcessor(
        model_file=str(write_tiny_tokenizer(tmp / "tok.model", lm.text_card)))
    return SessionManager(BatchedStreams(lm, listening_mimi(0), 2), StateStore(tmp / "kept", "fp"), tokenizer, limits,
                          opus_workers=opus_workers)


async def drain(session: Session, into: list[bytes | Ending]) -> None:
    while not isinstance(item := await session.outbox.get(), Ending):
        into.append(item)
    into.append(item)


async def settle(*sessions: Session) -> None:
    await asyncio.wait_for(asyncio.gather(*(s.settled.wait() for s in sessions)), 30)


@pytest.mark.parametrize("opus_workers", [0, 1])
@torch.no_grad()
def test_a_client_that_does_not_read_is_ended_and_its_neighbour_is_not(tmp_path: Path, opus_workers: int) -> None:
    async def main() -> None:
        m = manager(tmp_path, Limits(max_outbox=20), opus_workers)
        m.start()
        try:
            lazy, reader = await m.open(1), await m.open(2)
            got: list[bytes | Ending] = []
            draining = asyncio.create_task(drain(reader, got))
            for frame in audio(3, 30):
                await m.feed(lazy, frame)
                await m.feed(reader, frame)
            await settle(lazy, reader)
            assert lazy.ending is not None and lazy.ending.slug == "slow_client"
            assert lazy.outbox.qsize() == 1 and isinstance(lazy.outbox.get_nowait(), Ending)  # output dropped
            assert reader.ending is None and reader.frames == 30
            assert sum(item[0] == Kind.AUDIO for item in got if isinstance(item, bytes)) == 30 - 1
            draining.cancel()
        finally:
            await m.stop()

    asyncio.run(main())


@torch.no_grad()
def test_a_failing_step_ends_its_sessions_and_the_engine_goes_on(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        m = manager(tmp_path, Limits())
        step = m.streams.step
        calls = 0

        def flaky(*args: object) -> object:
            nonlocal calls
            calls += 1
            if calls == 3:
                raise RuntimeError("simulated device failure")
            return step(*args)

        monkeypatch.setattr(m.streams, "step", flaky)
        m.start()
        try:
            victim = await m.open(1)
            for frame in audio(4, 5):
                await m.feed(victim, frame)
            await settle(victim)
            assert victim.ending is not None and victim.ending.slug == "internal"
            m.release(victim, victim.ending.slug)
            assert m.healthy and m.sessions == 0
            survivor = await m.open(2)
            out: list[bytes | Ending] = []
            for frame in audio(5, 4):
                await m.feed(survivor, frame)
            await settle(survivor)
            while not survivor.outbox.empty():
                out.append(survivor.outbox.get_nowait())
            assert survivor.ending is None and survivor.frames == 4
            assert sum(isinstance(x, bytes) and x[0] == Kind.AUDIO for x in out) == 3
            assert m.metrics.ended["internal"] == 1 and calls > 3
        finally:
            await m.stop()

    asyncio.run(main())


def test_metrics_rates_follow_the_recorded_steps() -> None:
    from ttt_speech.serve.sessions import Metrics

    m = Metrics(frame_s=0.08, window_s=10.0)
    assert m.rates() == (0.0, 0.0)
    m.started -= 2.0  # two seconds of uptime
    for _ in range(25):
        m.record(step_s=0.02, frames=3)
    fps, rtf = m.rates()
    assert np.isclose(fps, 75 / 2.0, rtol=0.01) and np.isclose(rtf, 0.25)
    assert (m.frames_total, m.steps_total) == (75, 25)
