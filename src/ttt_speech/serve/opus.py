"""Every session's Opus coding, on the event loop (0 workers) or spread over worker processes.

Opus costs ~0.8 ms of CPU per session-frame (`capacity.opus_cpu_ms`), so one process codes at most
~100 sessions in real time whatever the GPU does. With `workers` > 0 each session is pinned to one
worker process for its whole life (Opus streams are stateful: its Ogg reader and writer live there),
and the event loop only moves bytes and arrays. Requests to a worker are batched: at most one round
trip per worker is in flight, and everything asked meanwhile (the engine's encodes of a whole frame,
the handlers' decodes) goes in the next, so a frame costs one or two round trips per worker, not one
per session. The same `OpusStreams.run` codes a batch in a worker and on the event loop, so the two
modes give the same bytes and samples (tests/test_serve_opus.py holds them equal).

A worker that dies, or does not answer a batch within `ROUND_TRIP_S`, ends only its own sessions
(`lost` is called with their keys; they close with 1011 and one line) and is replaced for new sessions;
`aclose` leaves no process behind.

Each coder (the event loop, or each worker) keeps the wall-clock seconds it spent coding (`Busy`): a coder
that needs nearly a frame's 80 ms per frame falls behind real time for every session it holds, however fast
the GPU steps. `load` says how busy the coder a new session would join is, for admission control
(`sessions.Admission`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing as mp
import signal
import time
import typing as tp
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import numpy as np

from ttt_speech.serve.protocol import Close, ProtocolError

log = logging.getLogger("ttt_speech.serve")

DECODE, ENCODE, CLOSE = "decode", "encode", "close"
Op = tuple[str, int, tp.Any]  # (kind, session key, Ogg bytes to decode | pcm frame to encode | None)
SESSIONS_PER_WORKER = 64  # 64 x 0.8 ms = 51 ms of the 80 ms frame: headroom for pickling and a busy host
JOIN_S = 5.0  # how long shutdown waits for a worker before killing it
ROUND_TRIP_S = 5.0  # a worker that takes longer to code one batch (~1 ms per op) is stuck: it is killed


@dataclass(frozen=True)
class Failed:
    """A decode the client's bytes made fail (the message of sphn's ValueError)."""

    message: str


class Busy:
    """Seconds one coder spent coding (an inline batch, or a worker's round trip), over a sliding window."""

    def __init__(self) -> None:
        self._spans: deque[tuple[float, float]] = deque()  # (end time, seconds)

    def record(self, seconds: float) -> None:
        self._spans.append((time.monotonic(), seconds))

    def seconds(self, window_s: float) -> float:
        """Seconds spent coding over the last `window_s` of wall clock."""
        now = time.monotonic()
        while self._spans and self._spans[0][0] < now - window_s:
            self._spans.popleft()
        return sum(s for _, s in self._spans)


@dataclass(frozen=True)
class Load:
    """The coder a new session would join: which, how busy over the window, with how many sessions."""

    coder: str  # "the event loop" or "Opus worker N"
    busy: float  # seconds coding per second of audio stepped: 1.0 is a coder that needs all of every frame
    sessions: int

    @property
    def with_one_more(self) -> float:
        """The busy fraction after one more session: coding time grows with the sessions coded."""
        return self.busy * (self.sessions + 1) / self.sessions if self.sessions else self.busy


def worker_lost() -> ProtocolError:
    return ProtocolError(Close.INTERNAL_ERROR, "opus_worker_lost", "the server's audio worker stopped; reconnect")


def bad_audio(message: str) -> ProtocolError:
    return ProtocolError(Close.INVALID_PAYLOAD, "bad_audio", f"invalid Ogg/Opus audio: {message}")


class OpusStreams:
    """The Ogg/Opus readers (client audio in) and writers (model audio out) of some sessions, by key."""

    def __init__(self, sample_rate: int) -> None:
        import sphn

        self.sample_rate, self._sphn = sample_rate, sphn
        self.readers: dict[int, tp.Any] = {}
        self.writers: dict[int, tp.Any] = {}

    def _one(self, kind: str, key: int, data: tp.Any) -> tp.Any:
        if kind == CLOSE:
            self.readers.pop(key, None)
            self.writers.pop(key, None)
            return None
        if kind == ENCODE:
            if key not in self.writers:
                self.writers[key] = self._sphn.OpusStreamWriter(self.sample_rate)
            return self.writers[key].append_pcm(data)
        if key not in self.readers:
            self.readers[key] = self._sphn.OpusStreamReader(self.sample_rate)
        try:
            return self.readers[key].append_bytes(data)
        except ValueError as e:
            return Failed(str(e))

    def run(self, batch: list[Op]) -> list[tp.Any]:
        """Code a batch in order: encoded bytes, decoded pcm, Failed, or None (a close) per op."""
        return [self._one(*op) for op in batch]


def _serve(conn: Connection, sample_rate: int) -> None:
    """A worker process: code batches until the server sends None or goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the server stops us
    streams = OpusStreams(sample_rate)
    while True:
        try:
            batch = conn.recv()
        except (EOFError, OSError):
            return
        if batch is None:
            return
        conn.send(streams.run(batch))


def _round_trip(conn: Connection, batch: list[Op]) -> list[tp.Any]:
    conn.send(batch)
    return conn.recv()


@dataclass(eq=False)
class _Worker:
    proc: tp.Any  # multiprocessing.Process (spawn context)
    conn: Connection
    queue: list[tuple[Op, asyncio.Future | None]] = field(default_factory=list)
    keys: set[int] = field(default_factory=set)
    flushing: asyncio.Task | None = None
    alive: bool = True
    busy: Busy = field(default_factory=Busy)


def auto_workers(max_sessions: int, cpus: int | None) -> int:
    """0 (code on the event loop) up to `SESSIONS_PER_WORKER` sessions, else one worker per that many,
    leaving two cores for the event loop and the model thread."""
    if max_sessions <= SESSIONS_PER_WORKER:
        return 0
    return max(1, min(math.ceil(max_sessions / SESSIONS_PER_WORKER), (cpus or 1) - 2))


class OpusCoding:
    """Opus for all sessions of a server: `open` a key per session, `decode` its input, `encode` a frame
    of every generating session's output at once, `close` the key when the session ends."""

    def __init__(self, sample_rate: int, workers: int = 0,
                 lost: tp.Callable[[set[int]], None] | None = None) -> None:
        if workers < 0:
            raise ValueError(f"opus workers must be >= 0, got {workers}")
        self.sample_rate, self.lost = sample_rate, lost
        self._inline = OpusStreams(sample_rate) if workers == 0 else None
        self._inline_busy, self._inline_keys = Busy(), set[int]()
        self._ctx = mp.get_context("spawn")  # not fork: the server holds threads (torch, the model thread)
        self._workers = [self._spawn() for _ in range(workers)]
        self._threads = ThreadPoolExecutor(max(1, workers), thread_name_prefix="ttt-serve-opus")
        self._pinned: dict[int, _Worker] = {}
        self._next_key = 0
        self._closed = False  # after `aclose`: nothing is sent or respawned any more

    @property
    def workers(self) -> int:
        return len(self._workers)

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def _spawn(self) -> _Worker:
        ours, theirs = self._ctx.Pipe()
        proc = self._ctx.Process(target=_serve, args=(theirs, self.sample_rate), daemon=True,
                                 name="ttt-serve-opus")
        proc.start()
        theirs.close()
        return _Worker(proc, ours)

    def _next_worker(self) -> _Worker:
        return min(self._workers, key=lambda w: len(w.keys))

    def open(self) -> int:
        """A key for a new session, pinned to the worker with the fewest sessions."""
        key, self._next_key = self._next_key, self._next_key + 1
        if self._workers:
            worker = self._next_worker()
            worker.keys.add(key)
            self._pinned[key] = worker
        else:
            self._inline_keys.add(key)
        return key

    def load(self, window_s: float, audio_s: float) -> Load:
        """How busy the coder that the next `open` pins to was over the last `window_s`, in which the engine
        stepped `audio_s` seconds of frames, and its sessions. Per frame stepped, not per second of wall
        clock: an idle spell (no frames, no coding) does not dilute it, and a coder that slows the engine
        down (fewer frames) reads higher, as it should."""
        if not self._workers:
            busy, coder, sessions = self._inline_busy, "the event loop", len(self._inline_keys)
        else:
            worker = self._next_worker()
            busy, coder, sessions = worker.busy, f"Opus worker {self._workers.index(worker)}", len(worker.keys)
        return Load(coder, busy.seconds(window_s) / audio_s if audio_s > 0 else 0.0, sessions)

    def _run_inline(self, batch: list[Op]) -> list[tp.Any]:
        assert self._inline is not None
        t0 = time.perf_counter()
        try:
            return self._inline.run(batch)
        finally:
            self._inline_busy.record(time.perf_counter() - t0)

    def close(self, key: int) -> None:
        """Forget the session's streams (no answer awaited)."""
        if self._inline is not None:
            self._inline_keys.discard(key)
            self._inline.run([(CLOSE, key, None)])
            return
        worker = self._pinned.pop(key, None)
        if worker is not None and worker.alive and not self._closed:
            worker.keys.discard(key)
            self._queue(worker, (CLOSE, key, None), None)

    async def decode(self, key: int, opus: bytes) -> np.ndarray:
        """The pcm in the client's Ogg/Opus bytes; ProtocolError (1007) when they are not Ogg/Opus."""
        if self._inline is not None:
            out = self._run_inline([(DECODE, key, opus)])[0]
        else:
            out = await self._submit(key, (DECODE, key, opus))
        if isinstance(out, Failed):
            raise bad_audio(out.message)
        return out

    async def encode(self, frames: dict[int, np.ndarray]) -> dict[int, bytes | ProtocolError]:
        """Each session's next Ogg/Opus bytes (b"" while a page fills), or the error that ends it."""
        if self._inline is not None:
            keys = list(frames)
            return dict(zip(keys, self._run_inline([(ENCODE, k, frames[k]) for k in keys])))
        pending = {k: self._submit(k, (ENCODE, k, pcm)) for k, pcm in frames.items()}
        done = await asyncio.gather(*pending.values(), return_exceptions=True)
        out: dict[int, bytes | ProtocolError] = {}
        for k, r in zip(pending, done):
            if isinstance(r, BaseException) and not isinstance(r, ProtocolError):
                raise r
            out[k] = r
        return out

    # -- the workers -------------------------------------------------------------------------
    def _submit(self, key: int, op: Op) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        worker = self._pinned.get(key)
        if worker is None or not worker.alive or self._closed:
            future.set_exception(worker_lost())
        else:
            self._queue(worker, op, future)
        return future

    def _queue(self, worker: _Worker, op: Op, future: asyncio.Future | None) -> None:
        worker.queue.append((op, future))
        if worker.flushing is None:  # started now, it runs after the caller's loop step: a frame's ops batch up
            worker.flushing = asyncio.get_running_loop().create_task(self._flush(worker))

    async def _flush(self, worker: _Worker) -> None:
        loop = asyncio.get_running_loop()
        try:
            while worker.queue and worker.alive:
                batch, worker.queue = worker.queue, []
                trip = loop.run_in_executor(self._threads, _round_trip, worker.conn, [op for op, _ in batch])
                t0 = time.perf_counter()
                try:
                    results = await asyncio.wait_for(trip, ROUND_TRIP_S)
                except (EOFError, OSError, asyncio.TimeoutError):
                    worker.proc.kill()  # a stuck worker; its pipe thread then sees the end of the pipe
                    self._lose(worker, [f for _, f in batch])
                    return
                worker.busy.record(time.perf_counter() - t0)
                for (_, future), result in zip(batch, results):
                    if future is not None and not future.done():
                        future.set_result(result)
        finally:
            worker.flushing = None

    def _lose(self, worker: _Worker, futures: list[asyncio.Future | None]) -> None:
        """The worker died: fail what waits on it, replace it, and tell the owner which sessions ended."""
        worker.alive = False
        log.error("opus worker %s exited (code %s); ending its %d sessions", worker.proc.pid,
                  worker.proc.exitcode, len(worker.keys))
        for future in futures + [f for _, f in worker.queue]:
            if future is not None and not future.done():
                future.set_exception(worker_lost())
        worker.queue = []
        worker.conn.close()
        worker.proc.join(0.1)
        if not self._closed:
            self._workers[self._workers.index(worker)] = self._spawn()
        keys, worker.keys = worker.keys, set()
        if self.lost is not None and keys:
            self.lost(keys)

    async def aclose(self) -> None:
        """Stop every worker: finish the round trips in flight, ask them to exit, kill any that do not."""
        self._closed = True
        flushing = [w.flushing for w in self._workers if w.flushing is not None]
        if flushing:
            await asyncio.wait(flushing, timeout=JOIN_S)
        for w in self._workers:
            try:
                w.conn.send(None)
            except OSError:
                pass
        for w in self._workers:
            await asyncio.to_thread(w.proc.join, JOIN_S)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join()
            w.conn.close()
        self._threads.shutdown(wait=True)
