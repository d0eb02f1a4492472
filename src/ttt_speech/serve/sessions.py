"""Sessions and the engine: one task steps every session that has a frame ready, in one batch.

Each websocket connection gets a `Session` bound to one row ("slot") of `BatchedStreams`. The
connection's handler decodes Opus into 80 ms frames and queues them; the engine task takes one frame
from every session that has one, runs one batched step on a single worker thread (all model work is
serialized there, so slot resets, snapshots and steps never interleave and the event loop stays
free), and queues each session's audio and text. Opus coding (`opus.OpusCoding`) runs on the event
loop or in worker processes; a frame's output is encoded while the next frame is stepped. Input queues are bounded, so a client sending
faster than real time is slowed down by TCP back-pressure; a client that does not read its output
is closed.
"""

from __future__ import annotations

import asyncio
import logging
import time
import typing as tp
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ttt_speech.serve import protocol
from ttt_speech.serve.opus import Load, OpusCoding, worker_lost
from ttt_speech.serve.protocol import Close, ProtocolError
from ttt_speech.serve.store import StateStore
from ttt_speech.serve.streams import BatchedStreams, StepResult

log = logging.getLogger("ttt_speech.serve")

PENDING_PCM = "session.pending_pcm"  # decoded input that was not yet a whole frame, saved with a slot
T = tp.TypeVar("T")


class Tokenizer(tp.Protocol):
    def id_to_piece(self, id: int) -> str: ...
    def vocab_size(self) -> int: ...


@dataclass(frozen=True)
class Limits:
    """What one client may cost the server."""

    max_queued_frames: int = 25  # 2 s of input queued per session before its socket stops being read
    max_outbox: int = 250  # queued output messages (~10 s) before a client that does not read is closed
    max_message_bytes: int | None = 1 << 16  # one websocket message (moshi's clients send ~20-80 ms of Opus)
    idle_timeout_s: float | None = 30.0  # a client silent this long gives its slot back (moshi's clients always stream)

    def __post_init__(self) -> None:
        """None turns a limit off; zero or a negative is a mistake, not a way to say "off"."""
        for name, value in vars(self).items():
            if value is not None and value <= 0:
                raise ValueError(f"Limits.{name} must be > 0 (None: no limit), got {value}")


@dataclass(frozen=True)
class Admission:
    """When the server refuses a new session (1013, try again later) that it could not serve in real time.

    Two things must keep up with every 80 ms frame. The batched step: every slot is stepped in each batch
    whether or not a session holds it, so the step time measured over the last seconds is what a new
    session would get: while its p90 is at or above `max_load` x the frame, the sessions already connected
    are falling behind and a new one would too. And Opus: the coder a new session would be pinned to (the
    event loop, or the Opus worker with the fewest sessions) spends wall-clock time per session and frame;
    when its coding time per frame stepped over the metrics window, as a fraction of the frame and scaled
    by (sessions + 1) / sessions, reaches `max_load`, one more session would leave it no time to code every
    frame, and the engine would wait on it (`opus.Load`). Both rules wait for `min_steps` steps.
    """

    max_load: float | None = 1.0  # step p90 / frame, Opus busy fraction: sessions refused at this (None: never)
    min_steps: int = 25  # steps measured in the metrics window (2 s of frames) before the rule applies

    def __post_init__(self) -> None:
        if self.max_load is not None and self.max_load <= 0:
            raise ValueError(f"Admission.max_load must be > 0 (None: never refuse), got {self.max_load}")
        if self.min_steps < 1:
            raise ValueError(f"Admission.min_steps must be >= 1, got {self.min_steps}")


@dataclass(frozen=True)
class Ending:
    """How a session ends: websocket close code, metrics name, reason; `notify` sends an ERROR message first."""

    code: Close
    slug: str
    reason: str
    notify: bool = True

    @classmethod
    def of(cls, e: ProtocolError) -> Ending:
        return cls(e.code, e.slug, e.reason)


INTERNAL = Ending(Close.INTERNAL_ERROR, "internal", "internal server error")


class Session:
    """One conversation: its slot, its queued input frames and its queued output messages."""

    def __init__(self, slot: int, opus: OpusCoding, limits: Limits) -> None:
        self.slot = slot
        self.opus, self.opus_key = opus, opus.open()  # its Ogg reader and writer, on the event loop or a worker
        self.frames = 0  # frames stepped: this conversation's generator offset
        self.pending = np.zeros(0, np.float32)
        self.inbox: asyncio.Queue[np.ndarray] = asyncio.Queue(limits.max_queued_frames)
        self.outbox: asyncio.Queue[bytes | Ending] = asyncio.Queue()
        self.settled = asyncio.Event()  # set while no frame of this session is queued, stepped or being coded
        self.settled.set()
        self.in_flight = 0  # frames taken by the engine whose output is not delivered yet
        self.ending: Ending | None = None
        self.ended = asyncio.Event()
        self.live = True  # holds its slot

    async def decode(self, opus: bytes) -> np.ndarray:
        """The client's audio; ProtocolError (1007, bad_audio) when it is not Ogg/Opus."""
        return await self.opus.decode(self.opus_key, opus)

    def end(self, ending: Ending, flush: bool) -> None:
        """Queue the end of the session (the first ending wins); without `flush`, queued output is dropped."""
        if self.ending is not None:
            return
        self.ending = ending
        self.ended.set()
        while not flush and not self.outbox.empty():
            self.outbox.get_nowait()
        self.outbox.put_nowait(ending)


class Metrics:
    """Counters, and a sliding window of recent steps for rates."""

    def __init__(self, frame_s: float, window_s: float = 10.0) -> None:
        self.frame_s, self.window_s = frame_s, window_s
        self.started = time.monotonic()
        self.frames_total = self.steps_total = self.opened = self.resumed = self.suspended = self.discarded = 0
        self.ended: Counter[str] = Counter()
        self._recent: deque[tuple[float, int, float]] = deque()  # (end time, frames, step seconds)

    def _forget_before(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - self.window_s:
            self._recent.popleft()

    def record(self, step_s: float, frames: int) -> None:
        self.frames_total += frames
        self.steps_total += 1
        now = time.monotonic()
        self._recent.append((now, frames, step_s))
        self._forget_before(now)

    def step_p90(self) -> tuple[float, int]:
        """(p90 of the batched step's seconds, steps) over the last `window_s`."""
        self._forget_before(time.monotonic())
        steps = [s for _, _, s in self._recent]
        return (float(np.percentile(steps, 90)), len(steps)) if steps else (0.0, 0)

    def rates(self) -> tuple[float, float]:
        """(session frames stepped per second, real-time factor = mean step time / frame duration)
        over the last `window_s`; RTF < 1 means every session keeps real time."""
        now = time.monotonic()
        self._forget_before(now)
        if not self._recent:
            return 0.0, 0.0
        span = min(self.window_s, now - self.started)
        frames = sum(f for _, f, _ in self._recent)
        step_s = sum(s for _, _, s in self._recent) / len(self._recent)
        return frames / span, step_s / self.frame_s


class SessionManager:
    """Owns the slots, the model worker thread and the engine task."""

    def __init__(self, streams: BatchedStreams, store: StateStore, tokenizer: Tokenizer,
                 limits: Limits = Limits(), admission: Admission = Admission(), opus_workers: int = 0) -> None:
        self.streams, self.store, self.tokenizer, self.limits = streams, store, tokenizer, limits
        self.admission = admission
        self.sample_rate = streams.mimi.sample_rate
        self.frame_size = streams.mimi.frame_size
        self.slots: list[Session | None] = [None] * streams.batch_size
        self.metrics = Metrics(1.0 / streams.mimi.frame_rate)
        lm = streams.lm
        self._silent_text = {lm.existing_text_end_padding_id, lm.existing_text_padding_id}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ttt-serve-model")
        self._work = asyncio.Event()
        self._engine: asyncio.Task[None] | None = None
        self._delivery: asyncio.Task[None] | None = None  # the last stepped frame's output, being coded
        self.opus = OpusCoding(self.sample_rate, opus_workers, lost=self._opus_lost)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._engine = asyncio.get_running_loop().create_task(self._run_engine(), name="ttt-serve-engine")

    async def stop(self) -> None:
        if self._engine is not None:
            self._engine.cancel()
            await asyncio.gather(self._engine, return_exceptions=True)
        if self._delivery is not None:
            self._delivery.cancel()
            await asyncio.gather(self._delivery, return_exceptions=True)
        await self.opus.aclose()
        self._pool.shutdown(wait=True)
        self.streams.close()

    @property
    def healthy(self) -> bool:
        return self._engine is not None and not self._engine.done()

    @property
    def sessions(self) -> int:
        return sum(s is not None for s in self.slots)

    async def _call(self, fn: tp.Callable[..., T], *args: tp.Any) -> T:
        """Run model work on the single model thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # -- sessions ----------------------------------------------------------------------------
    def _admit(self) -> None:
        """Refuse a new session the server cannot serve in real time (see `Admission`)."""
        max_load = self.admission.max_load
        if max_load is None:
            return
        p90_s, steps = self.metrics.step_p90()
        if steps < self.admission.min_steps:  # both rules wait for enough measured steps
            return
        budget_s = max_load * self.metrics.frame_s
        if p90_s >= budget_s:
            raise ProtocolError(Close.TRY_AGAIN_LATER, "not_real_time",
                                f"server behind real time (step p90 {p90_s * 1e3:.0f} ms, budget "
                                f"{budget_s * 1e3:.0f} ms per frame); try again later")
        opus = self.opus_load(steps)
        if opus.with_one_more >= max_load:
            raise ProtocolError(Close.TRY_AGAIN_LATER, "opus_not_real_time",
                                f"Opus coding behind real time ({opus.coder}: {opus.busy:.0%} of each frame, "
                                f"{opus.sessions} sessions; {opus.with_one_more:.0%} with one more); "
                                "try again later")

    def opus_load(self, steps: int | None = None) -> Load:
        """The Opus coder a new session would join: its coding time per frame the engine stepped over the metrics
        window (`steps`: those frames, when the caller has just counted them)."""
        if steps is None:
            _, steps = self.metrics.step_p90()
        return self.opus.load(self.metrics.window_s, steps * self.metrics.frame_s)

    def _claim(self) -> Session:
        free = next((i for i, s in enumerate(self.slots) if s is None), None)
        if free is None:
            raise ProtocolError(Close.TRY_AGAIN_LATER, "server_full",
                                f"server full ({len(self.slots)} sessions); try again later")
        self._admit()
        session = self.slots[free] = Session(free, self.opus, self.limits)
        return session

    async def open(self, seed: int) -> Session:
        """A new conversation sampling from `seed`; ProtocolError when every slot is taken."""
        session = self._claim()
        try:
            await self._call(self.streams.start, session.slot, seed)
        except BaseException:
            self.release(session, None)
            raise
        self.metrics.opened += 1
        return session

    async def resume(self, token: str) -> Session:
        """The conversation kept under `token`, where it stopped. A full server refuses before the
        token is used up."""
        session = self._claim()
        try:
            tensors, meta = await asyncio.to_thread(self.store.take, token)
            pending = tensors.pop(PENDING_PCM, None)
            try:
                frames = int(meta["frames"])
                await self._call(self.streams.restore, session.slot, tensors)
            except (KeyError, ValueError):
                raise ProtocolError(Close.POLICY_VIOLATION, "foreign_state",
                                    "the kept conversation does not fit this model") from None
        except BaseException:
            self.release(session, None)
            raise
        session.frames = frames
        if pending is not None:
            session.pending = pending.numpy().astype(np.float32)
        self.metrics.opened += 1
        self.metrics.resumed += 1
        return session

    async def suspend(self, session: Session) -> str:
        """Step what the session already sent, save its slot, and return the resume token."""
        await session.settled.wait()
        tensors = await self._call(self.streams.snapshot, session.slot)
        tensors[PENDING_PCM] = torch.from_numpy(session.pending.copy())
        token = await asyncio.to_thread(self.store.save, tensors, {"frames": str(session.frames)})
        self.metrics.suspended += 1
        return token

    def release(self, session: Session, slug: str | None) -> None:
        """Free the session's slot (its row is reset when the next session starts in it)."""
        if not session.live:
            return
        session.live = False
        self.slots[session.slot] = None
        self.opus.close(session.opus_key)
        while not session.inbox.empty():
            session.inbox.get_nowait()
        if slug is not None:
            self.metrics.ended[slug] += 1

    async def feed(self, session: Session, pcm: np.ndarray) -> None:
        """Queue decoded input as whole frames; waits while the session's input queue is full."""
        pcm = np.concatenate([session.pending, pcm.astype(np.float32, copy=False)])
        n = len(pcm) // self.frame_size
        session.pending = pcm[n * self.frame_size:].copy()
        for i in range(n):
            session.settled.clear()
            await session.inbox.put(pcm[i * self.frame_size:(i + 1) * self.frame_size])
            self._work.set()

    def _opus_lost(self, keys: set[int]) -> None:
        """A worker died with these sessions' Opus streams: they cannot go on."""
        for s in self.slots:
            if s is not None and s.opus_key in keys:
                s.end(Ending.of(worker_lost()), flush=False)

    # -- the engine --------------------------------------------------------------------------
    async def _run_engine(self) -> None:
        B, F = len(self.slots), self.frame_size
        while True:
            await self._work.wait()
            self._work.clear()
            batch = [s for s in self.slots if s is not None and not s.inbox.empty()]
            if not batch:
                continue
            pcm = np.zeros((B, F), np.float32)
            active, first = np.zeros(B, bool), np.zeros(B, bool)
            for s in batch:
                pcm[s.slot] = s.inbox.get_nowait()
                active[s.slot], first[s.slot] = True, s.frames == 0
                s.in_flight += 1
            t0 = time.perf_counter()
            try:
                result = await self._call(self.streams.step, pcm, active, first)
            except Exception:
                log.exception("batched step failed; ending the sessions in it")
                for s in batch:
                    s.end(INTERNAL, flush=False)
                    self._settle(s)
            else:
                self.metrics.record(time.perf_counter() - t0, len(batch))
                for s in batch:
                    s.frames += 1
                if self._delivery is not None:  # the previous frame's output was coded while this one stepped
                    await self._delivery
                self._delivery = asyncio.get_running_loop().create_task(self._deliver_frame(batch, result))
            if any(s is not None and not s.inbox.empty() for s in self.slots):
                self._work.set()

    def _settle(self, s: Session) -> None:
        s.in_flight -= 1
        if s.in_flight == 0 and s.inbox.empty():
            s.settled.set()

    async def _deliver_frame(self, batch: list[Session], result: StepResult) -> None:
        """Encode the frame's audio of every generating session at once, then queue each one's messages."""
        speaking = [s for s in batch if s.live and s.ending is None and result.generated[s.slot]]
        try:
            coded = await self.opus.encode({s.opus_key: result.pcm[s.slot] for s in speaking})
        except Exception:
            log.exception("encoding a frame's audio failed; ending the sessions in it")
            coded = {}
        for s in batch:
            try:
                if s in speaking:
                    self._deliver(s, coded.get(s.opus_key), result)
            except Exception:
                log.exception("output of the session in slot %d failed", s.slot)
                s.end(INTERNAL, flush=False)
            finally:
                self._settle(s)

    def _text(self, token: int) -> str | None:
        if token in self._silent_text or not 0 <= token < self.tokenizer.vocab_size():
            return None
        return self.tokenizer.id_to_piece(token).replace("\u2581", " ")

    def _deliver(self, s: Session, opus: bytes | ProtocolError | None, result: StepResult) -> None:
        if not s.live or s.ending is not None:
            return
        if isinstance(opus, ProtocolError):
            s.end(Ending.of(opus), flush=False)
            return
        if opus is None:
            raise RuntimeError("no encoded audio for a session that spoke")
        messages = []
        if opus:
            messages.append(protocol.audio(opus))
        piece = self._text(int(result.tokens[s.slot, 0]))
        if piece:
            messages.append(protocol.text(piece))
        if s.outbox.qsize() + len(messages) > self.limits.max_outbox:
            s.end(Ending(Close.POLICY_VIOLATION, "slow_client", "client does not read its output"), flush=False)
            return
        for m in messages:
            s.outbox.put_nowait(m)
