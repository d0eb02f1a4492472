"""Opus coding in worker processes (`serve/opus.py`) against the same coding on the event loop: equal bytes
and samples, one round trip per worker per frame, bad input refused the same way, a killed worker ending
only its own sessions, and no process left after `aclose`."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

sphn = pytest.importorskip("sphn")  # not on the GPU device image (serve tests run on CI)

from ttt_speech.serve import opus  # noqa: E402
from ttt_speech.serve.capacity import opus_sessions_per_frame  # noqa: E402
from ttt_speech.serve.opus import Busy, Load, OpusCoding, auto_workers  # noqa: E402
from ttt_speech.serve.protocol import Close, ProtocolError  # noqa: E402

SR, FRAME = 24000, 1920


def noise(frames: int, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal((frames, FRAME))).astype(np.float32)


def client_pages(frames: int, seed: int) -> list[bytes]:
    writer = sphn.OpusStreamWriter(SR)
    return [writer.append_pcm(f) for f in noise(frames, seed)]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = open(f"/proc/{pid}/stat").read().split()[2]
    return status != "Z"


async def code(coding: OpusCoding, sessions: int, frames: int) -> tuple[list[list[bytes]], list[list[np.ndarray]]]:
    """Each session's encoded output and decoded input per frame, every frame's ops issued together."""
    keys = [coding.open() for _ in range(sessions)]
    out = noise(frames, 1)
    pages = [client_pages(frames, 10 + s) for s in range(sessions)]
    encoded: list[list[bytes]] = [[] for _ in keys]
    decoded: list[list[np.ndarray]] = [[] for _ in keys]
    for f in range(frames):
        enc, *dec = await asyncio.gather(coding.encode({k: out[f] * (1 + s) for s, k in enumerate(keys)}),
                                         *(coding.decode(k, pages[s][f]) for s, k in enumerate(keys)))
        for s, k in enumerate(keys):
            encoded[s].append(enc[k])
            decoded[s].append(dec[s])
    return encoded, decoded


def test_workers_code_exactly_what_the_event_loop_codes_in_one_round_trip_per_worker_per_frame(
        monkeypatch: pytest.MonkeyPatch) -> None:
    trips: list[int] = []
    round_trip = opus._round_trip

    def counted(conn: object, batch: list) -> list:
        trips.append(len(batch))
        return round_trip(conn, batch)  # type: ignore[arg-type]

    monkeypatch.setattr(opus, "_round_trip", counted)

    async def main() -> None:
        inline = OpusCoding(SR, 0)
        pool = OpusCoding(SR, 2)
        try:
            want, got = await code(inline, 5, 6), await code(pool, 5, 6)
        finally:
            await asyncio.gather(inline.aclose(), pool.aclose())
        assert inline.workers == 0 and pool.workers == 2
        assert want[0] == got[0] and sum(len(b) for s in got[0] for b in s) > 5 * 6 * 100  # real pages
        for a, b in zip(want[1], got[1]):
            assert all(np.array_equal(x, y) for x, y in zip(a, b))
        assert sum(x.size for s in got[1] for x in s) >= 5 * 5 * FRAME  # decoded samples came back
        # 6 frames x 2 workers; each frame's 5 encodes + 5 decodes split 3 / 2 over the workers
        assert len(trips) == 12 and sorted(set(trips)) == [4, 6]

    asyncio.run(main())


def refusal(workers: int) -> ProtocolError:
    async def main() -> ProtocolError:
        coding = OpusCoding(SR, workers)
        try:
            key = coding.open()
            await coding.decode(key, client_pages(2, 0)[0])
            with pytest.raises(ProtocolError) as e:
                await coding.decode(key, np.random.default_rng(0).bytes(64))  # a whole page's worth, not Ogg
            return e.value
        finally:
            await coding.aclose()

    return asyncio.run(main())


def test_bad_audio_is_refused_the_same_way_with_and_without_workers() -> None:
    inline, pooled = refusal(0), refusal(1)
    assert (inline.code, inline.slug) == (Close.INVALID_PAYLOAD, "bad_audio")
    assert inline.reason.startswith("invalid Ogg/Opus audio: unexpected ogg capture pattern")
    assert (pooled.code, pooled.slug, pooled.reason) == (inline.code, inline.slug, inline.reason)


def test_a_dead_worker_ends_only_its_sessions_and_shutdown_leaves_no_process() -> None:
    async def main() -> None:
        lost: list[set[int]] = []
        coding = OpusCoding(SR, 2, lost=lost.append)
        try:
            a, b = coding.open(), coding.open()  # one per worker
            page = client_pages(1, 0)[0]
            await asyncio.gather(coding.decode(a, page), coding.decode(b, page))
            victim, spared = coding.pids()
            os.kill(victim, 9)
            with pytest.raises(ProtocolError) as e:
                await coding.decode(a, page)
            assert (e.value.code, e.value.slug) == (Close.INTERNAL_ERROR, "opus_worker_lost")
            assert lost == [{a}]
            assert (await coding.encode({b: noise(1, 0)[0]}))[b]  # the other session goes on
            with pytest.raises(ProtocolError):
                await coding.decode(a, page)  # still pinned to the dead worker
            c = coding.open()  # a new session lands on the replacement worker
            replaced = coding.pids()
            assert spared in replaced and victim not in replaced
            assert (await coding.decode(c, page)).dtype == np.float32
        finally:
            await coding.aclose()
        assert not any(alive(pid) for pid in replaced + [victim])

    asyncio.run(main())


def test_a_stuck_worker_is_killed_and_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(opus, "ROUND_TRIP_S", 0.5)

    async def main() -> None:
        lost: list[set[int]] = []
        coding = OpusCoding(SR, 1, lost=lost.append)
        try:
            key = coding.open()
            page = client_pages(1, 0)[0]
            await coding.decode(key, page)
            (stuck,) = coding.pids()
            os.kill(stuck, signal.SIGSTOP)
            with pytest.raises(ProtocolError, match="audio worker stopped"):
                await coding.decode(key, page)
            assert lost == [{key}] and coding.pids() != [stuck]
            assert (await coding.decode(coding.open(), page)).size > 0
            replaced = coding.pids()
        finally:
            await coding.aclose()
        deadline = time.monotonic() + 5
        while alive(stuck) or alive(replaced[0]):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)

    asyncio.run(main())


def test_auto_workers_keep_small_servers_on_the_event_loop() -> None:
    assert auto_workers(4, 64) == 0 and auto_workers(64, 64) == 0
    assert auto_workers(65, 64) == 2 and auto_workers(240, 128) == 4
    assert auto_workers(240, 4) == 2 and auto_workers(240, 2) == 1  # two cores kept for the loop and the model


def test_opus_sessions_per_frame_counts_sessions_coded_per_80_ms() -> None:
    rate = opus_sessions_per_frame(1, SR, FRAME, sessions=4, frames=5, warmup=2)
    assert rate.workers == 1 and 1 < rate.sessions_per_frame < 10_000
    inline = opus_sessions_per_frame(0, SR, FRAME, sessions=4, frames=5, warmup=2)
    assert 0.05 < inline.loop_cpu_ms < 50  # all of Opus on the server process
    assert rate.loop_cpu_ms < inline.loop_cpu_ms  # with a worker only pickling and pipes stay there


def test_opus_pool_benchmark_prints_a_row_per_worker_count(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("opus_pool", Path(__file__).parents[1] / "benchmarks" / "opus_pool.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rates = bench.main(["--workers", "0,1", "--sessions-per-worker", "3", "--frames", "4", "--rounds", "1"])
    assert [r.workers for r in rates[0] + rates[1]] == [0, 1]
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 0 |") or line.startswith("| 1 |")]
    assert len(rows) == 2 and rows[0].split(" | ")[4] == "1.00x"


def test_opus_workers_argument_takes_auto_or_a_count() -> None:
    from ttt_speech.serve.commands import opus_workers

    assert opus_workers("auto") is None and opus_workers("0") == 0 and opus_workers("3") == 3
    for bad in ("-1", "two"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"'{bad}' is not an integer >= 0 or 'auto'"):
            opus_workers(bad)


def test_load_is_the_coding_time_per_frame_and_sessions_of_the_coder_a_new_session_joins() -> None:
    async def main() -> None:
        inline, pool = OpusCoding(SR, 0), OpusCoding(SR, 2)
        try:
            t0 = time.perf_counter()
            await code(inline, 3, 4)
            elapsed = time.perf_counter() - t0
            loop = inline.load(10.0, 4 * 0.08)  # 4 frames stepped: 0.32 s of audio
            assert (loop.coder, loop.sessions) == ("the event loop", 3)
            assert 0 < loop.busy * 0.32 <= elapsed  # the seconds spent inside the coding calls, per 0.32 s
            assert inline.load(10.0, 2 * 0.32).busy == pytest.approx(loop.busy / 2)
            assert inline.load(10.0, 0.0).busy == 0.0  # nothing stepped: nothing to judge
            inline.close(0)
            assert inline.load(10.0, 0.32).sessions == 2
            await code(pool, 3, 2)  # keys 0 and 2 on worker 0, key 1 on worker 1: a new session joins worker 1
            worker = pool.load(10.0, 0.16)
            assert (worker.coder, worker.sessions) == ("Opus worker 1", 1) and worker.busy > 0
        finally:
            await asyncio.gather(inline.aclose(), pool.aclose())

    asyncio.run(main())


def test_busy_spans_leave_the_window_and_one_more_session_scales_the_load() -> None:
    busy = Busy()
    busy.record(0.03)
    busy.record(0.01)
    assert busy.seconds(0.1) == pytest.approx(0.04)
    time.sleep(0.06)
    assert busy.seconds(0.05) == 0.0 and busy.seconds(10.0) == 0.0  # forgotten once out of a window
    assert Load("w", 0.6, 3).with_one_more == pytest.approx(0.8) and Load("w", 0.6, 0).with_one_more == 0.6
