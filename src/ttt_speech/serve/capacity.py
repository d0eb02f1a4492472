"""How many conversations one server keeps in real time: a ramp of concurrent sessions through the server's
own batched step (`BatchedStreams.step`, what the engine task runs once per 80 ms frame).

At each session count every slot holds a started conversation fed noise, and `frames` batched steps are
timed after a warm-up (moshi captures its CUDA graphs on the second step). A count keeps real time when
the step's p90 and p99 stay under the frame budget (80 ms); the ramp stops at the first count that does
not (or that does not fit in memory), so `Ramp.capacity` is the last count before it. A run that already
has more than 1 % of its frames over budget cannot end with p99 under it and stops early. At 7B shape a
full run per count takes minutes, so the ramp can locate the limit with short probes and confirm only
the largest passing count over the full run (`search(..., probe_frames=)`), and keep inside a wall-clock
deadline (`search(..., deadline=)`): a device call has minutes, and a row cut off by a kill reports nothing.
`search` takes the measurement as a function, so recipes/capacity21/plan.py replays it against a step model
to plan a device call's budgets on the CPU.
"""

from __future__ import annotations

import gc
import time
import typing as tp
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from moshi.models.compression import MimiModel
from moshi.models.lm import LMModel

from ttt_speech.errors import UsageError
from ttt_speech.serve.streams import BatchedStreams

FRAME_MS = 80.0  # one Moshi frame (12.5 Hz): a batched step slower than this falls behind every session
# timer(step, sessions) -> milliseconds one call of `step` took; injectable so that tests control the clock
Timer = tp.Callable[[tp.Callable[[], object], int], float]


def wall_timer(device: torch.device) -> Timer:
    """Wall time of one step, synchronised on CUDA so that the GPU's work is inside it."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timer(step: tp.Callable[[], object], sessions: int) -> float:
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        return (time.perf_counter() - t0) * 1e3

    return timer


@dataclass(frozen=True)
class Point:
    """One session count of a ramp."""

    sessions: int
    frames: int  # steps timed (fewer than asked when the count failed early)
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    peak_bytes: int | None  # most CUDA memory allocated while this count ran (None: CPU)
    failure: str = ""  # why it is not real time ("" when it is)
    probe: bool = False  # a short run that only located the limit; capacity counts full runs only
    wall_s: float | None = None  # the whole count's wall clock: set-up (state, slots, CUDA graphs) and frames

    @property
    def setup_s(self) -> float:
        """Seconds this count spent outside its timed frames (0 when its wall clock was not taken)."""
        timed_s = self.frames * self.p50_ms / 1e3 if self.frames else 0.0  # (a refused count has no frames)
        return 0.0 if self.wall_s is None else max(0.0, self.wall_s - timed_s)

    @property
    def real_time(self) -> bool:
        return not self.failure


@dataclass
class Ramp:
    """One model's ramp: its name, attention window, per-session state and the counts it ran."""

    model: str
    window: int | None
    state_bytes: int  # one session's streaming state (LM KV windows, memory branches, Mimi), fixed size
    kv_bytes: int  # of which the temporal transformer's ring KV caches
    points: list[Point] = field(default_factory=list)
    note: str = ""  # why the ramp ended before it was done (its time budget), "" when it was not cut short

    @property
    def best(self) -> Point | None:
        """The largest count that kept real time over a full run."""
        passing = [p for p in self.points if p.real_time and not p.probe]
        return max(passing, key=lambda p: p.sessions) if passing else None

    @property
    def capacity(self) -> int:
        return self.best.sessions if self.best else 0

    @property
    def first_failure(self) -> Point | None:
        """The smallest count that did not keep real time (in a probe or a full run)."""
        failing = [p for p in self.points if not p.real_time]
        return min(failing, key=lambda p: p.sessions) if failing else None

    def to_dict(self) -> dict[str, tp.Any]:
        return {"model": self.model, "window": self.window, "state_bytes": self.state_bytes,
                "kv_bytes": self.kv_bytes, "capacity": self.capacity, "points": [asdict(p) for p in self.points],
                "note": self.note}

    @classmethod
    def from_dict(cls, d: dict[str, tp.Any]) -> Ramp:
        return cls(d["model"], d["window"], d["state_bytes"], d["kv_bytes"], [Point(**p) for p in d["points"]],
                   d.get("note", ""))


def attention_window(lm: LMModel) -> int | None:
    """The temporal transformer's attention window in frames (None: no attention left)."""
    contexts = {layer.self_attn.context for layer in lm.transformer.layers if hasattr(layer, "self_attn")}
    return contexts.pop() if len(contexts) == 1 else None


def session_bytes(lm: LMModel, mimi: MimiModel) -> tuple[int, int]:
    """(streaming-state bytes of one session, of which ring KV caches of the temporal transformer)."""
    streams = BatchedStreams(lm, mimi, 1)
    try:
        kv = sum(int(np.prod(shape)) * dtype.itemsize for name, (shape, dtype) in streams.layout.items()
                 if name.startswith("lm.transformer.") and name.endswith(".kv_cache.cache"))
        return streams.slot_bytes, kv
    finally:
        streams.close()


def opus_cpu_ms(sample_rate: int, frame_size: int, frames: int = 250, seed: int = 0) -> float:
    """CPU milliseconds one session's Opus work costs per frame on this host: encoding the model's frame and
    decoding the client's (sphn, as the server does), measured on noise of RMS 0.1.

    One core codes at most frame / this many sessions in real time, whatever the GPU does: with
    `--opus-workers 0` that core is the server's event loop; `opus_sessions_per_frame` measures the pool.
    """
    import sphn

    rng = np.random.default_rng(seed)
    pcm = (0.1 * rng.standard_normal((frames, frame_size))).astype(np.float32)
    writer, reader = sphn.OpusStreamWriter(sample_rate), sphn.OpusStreamReader(sample_rate)
    t0 = time.process_time()
    for frame in pcm:
        opus = writer.append_pcm(frame)
        if opus:
            reader.append_bytes(opus)
    return (time.process_time() - t0) * 1e3 / frames


@dataclass(frozen=True)
class OpusRate:
    """What one server process makes of the host's cores for Opus (`opus_sessions_per_frame`)."""

    workers: int
    sessions_per_frame: float  # sessions coded per 80 ms of wall clock: the real-time ceiling of Opus
    loop_cpu_ms: float  # CPU ms of the server process (event loop and pipe threads) per session-frame


def opus_sessions_per_frame(workers: int, sample_rate: int, frame_size: int, sessions: int = 64, frames: int = 100,
                            warmup: int = 5, seed: int = 0) -> OpusRate:
    """Sessions whose Opus work one server codes per 80 ms frame in real time with `workers` processes
    (0: on the event loop), by wall clock: `sessions` sessions each encode a frame of output and decode a
    frame of client Ogg/Opus per frame, through the server's own `OpusCoding`, for `frames` frames.

    `opus_cpu_ms` is the cost of one session on one core; this is what the pool makes of the host's cores
    (pickling and pipes included). With workers, `loop_cpu_ms` is what stays on the server process: it
    bounds the sessions one process can feed to any number of workers (80 / loop_cpu_ms).
    """
    import asyncio

    import sphn

    from ttt_speech.serve.opus import OpusCoding

    rng = np.random.default_rng(seed)
    pcm = (0.1 * rng.standard_normal((warmup + frames, frame_size))).astype(np.float32)
    client = sphn.OpusStreamWriter(sample_rate)
    pages = [client.append_pcm(frame) for frame in pcm]  # what one client sends per frame

    async def run() -> float:
        coding = OpusCoding(sample_rate, workers)
        try:
            keys = [coding.open() for _ in range(sessions)]

            async def frame(i: int) -> None:
                decodes = [coding.decode(k, pages[i]) for k in keys] if pages[i] else []
                await asyncio.gather(coding.encode({k: pcm[i] for k in keys}), *decodes)

            for i in range(warmup):  # workers start and import sphn
                await frame(i)
            t0, cpu0 = time.perf_counter(), time.process_time()
            for i in range(warmup, warmup + frames):
                await frame(i)
            return time.perf_counter() - t0, time.process_time() - cpu0
        finally:
            await coding.aclose()

    wall_s, cpu_s = asyncio.run(run())
    return OpusRate(workers, sessions * frames * FRAME_MS / (wall_s * 1e3), cpu_s * 1e3 / (sessions * frames))


def check_fits(sessions: int, state_bytes: int, free_bytes: int) -> None:
    """Refuse (UsageError) a batch of `sessions` whose streaming state alone exceeds the free device memory."""
    if sessions * state_bytes > free_bytes:
        need = sessions * state_bytes / 2**30
        raise UsageError(f"--max-sessions {sessions}: {sessions} sessions need {need:.1f} GiB of streaming state "
                         f"({state_bytes / 2**20:.0f} MiB each), {free_bytes / 2**30:.1f} GiB of device memory is "
                         f"free: give --max-sessions {free_bytes // state_bytes} or fewer (a shorter attention window, "
                         "convert-moshi --attention-window, makes each session smaller)")


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def free_bytes(device: torch.device) -> int | None:
    """Device memory free for a batch's state once caches are released (None on a CPU: not checked)."""
    _free(device)
    return int(torch.cuda.mem_get_info(device)[0]) if device.type == "cuda" else None


def too_big(sessions: int, state_bytes: int | None, device: torch.device) -> str:
    """Why a batch of `sessions` cannot be allocated ("" when it may be): its state alone exceeds free memory."""
    free = free_bytes(device)
    if free is None or state_bytes is None or sessions * state_bytes <= free:
        return ""
    return f"out of memory ({sessions * state_bytes / 2**30:.1f} GiB of state, {free / 2**30:.1f} GiB free)"


def _summary(ms: list[float], sessions: int, peak: int | None, budget_ms: float, failure: str = "") -> Point:
    a = np.asarray(ms) if ms else np.full(1, np.nan)
    p50, p90, p99 = (float(np.percentile(a, q)) for q in (50, 90, 99))
    if not failure and p90 >= budget_ms:
        failure = f"p90 {p90:.1f} ms >= {budget_ms:g}"
    elif not failure and p99 >= budget_ms:
        failure = f"p99 {p99:.1f} ms >= {budget_ms:g}"
    return Point(sessions, len(ms), p50, p90, p99, float(a.max()), peak, failure)


def time_frames(step_ms: tp.Callable[[], float], sessions: int, frames: int, budget_ms: float = FRAME_MS,
                peak: tp.Callable[[], int | None] = lambda: None) -> Point:
    """`frames` steps (each call of `step_ms` runs one and returns its milliseconds), summarised. Stops once
    more than 1 % of `frames` are over budget: p99 over `frames` is then over budget whatever follows."""
    over_limit = int(0.01 * frames) + 1
    ms: list[float] = []
    over = 0
    for _ in range(frames):
        ms.append(step_ms())
        over += ms[-1] >= budget_ms
        if over >= over_limit:
            return _summary(ms, sessions, peak(), budget_ms,
                            f"p99 >= {budget_ms:g} ms ({over} of the first {len(ms)} frames over)")
    return _summary(ms, sessions, peak(), budget_ms)


def stagger_frames(lm: LMModel) -> int:
    """Frames over which `measure` spreads the sessions' arrivals: the longest in-place chunk (0 without in-place
    memory). An in-place session writes its memory only at its chunk's last frame, and sessions that all start on
    one frame would all write on the same frame every chunk, which real arrivals (at any frame) do not."""
    from ttt_speech.layers.inplace import InPlaceLayer

    return max((m.config.chunk for m in lm.modules() if isinstance(m, InPlaceLayer)), default=0)


def start_sessions(streams: BatchedStreams, pcm: np.ndarray, warmup: int, stagger: int, seed: int = 0) -> None:
    """Start every slot's conversation, slot s joining at frame s mod `stagger` (all at frame 0 when 0), then step
    `warmup` more frames with all of them (untimed: moshi captures its CUDA graphs on the second step)."""
    sessions = streams.batch_size
    join = np.arange(sessions) % stagger if stagger else np.zeros(sessions, int)
    streams.start_many({slot: seed + slot for slot in range(sessions)})
    for i in range(int(join.max()) + warmup):
        streams.step(pcm, join <= i, join == i)


@torch.no_grad()
def measure(lm: LMModel, mimi: MimiModel, sessions: int, frames: int, warmup: int = 3,
            budget_ms: float = FRAME_MS, timer: Timer | None = None, seed: int = 0,
            state_bytes: int | None = None) -> Point:
    """Time `frames` server steps with `sessions` conversations started (after `warmup` untimed steps; arrivals
    spread over `stagger_frames(lm)` frames before them).

    On CUDA a batch whose streaming state (`state_bytes` per session) exceeds the free memory is refused
    before allocating: moshi cannot leave streaming mode cleanly from an allocation that failed halfway.
    """
    device = lm.device
    timer = timer or wall_timer(device)
    cuda = device.type == "cuda"
    refused = too_big(sessions, state_bytes, device)
    if refused:
        return _summary([], sessions, None, budget_ms, refused)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    peak = (lambda: int(torch.cuda.max_memory_allocated())) if cuda else (lambda: None)
    streams = None
    try:
        streams = BatchedStreams(lm, mimi, sessions)
        rng = np.random.default_rng(seed)
        pcm = (0.1 * rng.standard_normal((sessions, mimi.frame_size))).astype(np.float32)
        active, later = np.ones(sessions, bool), np.zeros(sessions, bool)
        start_sessions(streams, pcm, warmup, stagger_frames(lm), seed)
        timed = streams  # the closure's own name: `streams` is unbound in `finally`
        return time_frames(lambda: timer(lambda: timed.step(pcm, active, later), sessions), sessions, frames,
                           budget_ms, peak)
    except torch.OutOfMemoryError:
        return _summary([], sessions, peak(), budget_ms, "out of memory")
    finally:
        if streams is not None:
            streams.close()
        del streams
        _free(device)


def step_estimate(points: tp.Sequence[Point], n: int, budget_ms: float) -> float:
    """The step p90 (ms) expected at `n` sessions: the line through the two largest passing counts measured
    (the step grows about linearly with the batch), capped at the budget (a count that is over it fails early)."""
    passing = sorted((p for p in points if p.real_time), key=lambda p: p.sessions)
    if not passing:
        return budget_ms
    last = passing[-1]
    if len(passing) == 1 or n <= last.sessions:
        return min(budget_ms, last.p90_ms * max(1.0, n / last.sessions))
    prev = passing[-2]
    slope = max(0.0, (last.p90_ms - prev.p90_ms) / (last.sessions - prev.sessions))
    return min(budget_ms, last.p90_ms + slope * (n - last.sessions))


Measure = tp.Callable[[int, int], Point]  # (sessions, frames) -> that count's Point


def row_deadline(now: float, end: float | None, budget_s: float | None) -> float | None:
    """When a row started at `now` must end: its own budget, and never past the run's `end` (None: no limit)."""
    limits = [t for t in (end, None if budget_s is None else now + budget_s) if t is not None]
    return min(limits) if limits else None


def ramp(name: str, lm: LMModel, mimi: MimiModel, counts: tp.Sequence[int], frames: int, warmup: int = 3,
         budget_ms: float = FRAME_MS, timer: Timer | None = None,
         progress: tp.Callable[[Ramp, Point], None] | None = None, probe_frames: int | None = None,
         deadline: float | None = None, clock: tp.Callable[[], float] = time.monotonic) -> Ramp:
    """`search` the session counts of `lm` + `mimi` through the server's batched step (`measure`)."""
    state, kv = session_bytes(lm, mimi)
    out = Ramp(name, attention_window(lm), state, kv)
    return search(out, counts, frames,
                  lambda n, f: measure(lm, mimi, n, f, warmup, budget_ms, timer, state_bytes=state), budget_ms,
                  probe_frames, deadline, clock, lambda n: not too_big(n, state, lm.device), progress)


def search(out: Ramp, counts: tp.Sequence[int], frames: int, measure: Measure, budget_ms: float = FRAME_MS,
           probe_frames: int | None = None, deadline: float | None = None,
           clock: tp.Callable[[], float] = time.monotonic, fits: tp.Callable[[int], bool] = lambda n: True,
           progress: tp.Callable[[Ramp, Point], None] | None = None) -> Ramp:
    """Measure ascending session counts until the first that is not real time, adding the points to `out`.

    With `probe_frames`, the ramp runs that many frames per count (a probe); the gap between the last
    passing and the first failing count is then halved with probes to within 1/8 of the passing count,
    and the largest passing count is confirmed over `frames`, stepping down by 1/8 until one holds.
    Without, every count runs `frames`.

    With `deadline` (a `clock()` time), a probe runs only if it and the confirmation after it are expected to
    end by then (the first probe only if it is: nothing is measured yet to plan with), and a full run only if
    it is: `step_estimate` x frames, plus the slowest set-up seen so far (allocating the batch, starting its
    slots, capturing CUDA graphs); a count that does not `fit` in memory is refused at once, so it costs
    nothing. What the deadline skipped goes in `note`; a ramp it cut before any count beyond 1 passed is not
    confirmed (a capacity of 1 says nothing about capacity; the time is the next row's).
    """
    def cost_s(n: int, f: int) -> float:  # plus the most set-up seen: the next count's is alike
        return f * step_estimate(out.points, n, budget_ms) / 1e3 + max((p.setup_s for p in out.points), default=0.0)

    def affordable(n: int, probe: bool) -> bool:
        if deadline is None or not fits(n):  # a count refused for memory costs nothing
            return True
        need = cost_s(n, probe_frames or frames) if probe else cost_s(n, frames)
        if probe and out.points:  # the first probe runs alone: nothing measured yet to plan with
            need += cost_s(n, frames)
        if clock() + need <= deadline:
            return True
        out.note = out.note or (f"time budget: stopped before {'probing' if probe else 'a full run of'} {n} "
                                f"sessions (~{need:.3g} s more needed)")
        return False

    def run(n: int, probe: bool) -> bool:
        t0 = clock()
        point = measure(n, probe_frames if probe and probe_frames else frames)
        point = replace(point, probe=probe, wall_s=round(clock() - t0, 3))
        out.points.append(point)
        if progress is not None:
            progress(out, point)
        return point.real_time

    probing = probe_frames is not None
    for n in sorted(counts):
        if not affordable(n, probing) or not run(n, probing):
            break
    if not probing:
        return out
    passed = [p.sessions for p in out.points if p.real_time]
    failed = out.first_failure
    if passed and failed is not None:
        lo, hi = passed[-1], failed.sessions
        while hi - lo > max(1, lo // 8) and affordable((lo + hi) // 2, True):
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if run(mid, True) else (lo, mid)
    n = max((p.sessions for p in out.points if p.real_time), default=0)
    if out.note and failed is None and n <= 1:  # cut before any count beyond the batch-1 baseline: no capacity
        return out
    # a failing full run stops early: stepping down is cheap
    while n >= 1 and affordable(n, False) and not run(n, False):
        n -= max(1, n // 8)
    return out


def _mib(b: float) -> str:
    return f"{b / 2**20:.4g}"


def table(ramps: tp.Sequence[Ramp], frames: int, budget_ms: float = FRAME_MS) -> str:
    """Markdown: one row per model, vanilla first, then hybrids by window."""
    head = (f"| model | attention window (frames) | state MiB/session | of which KV MiB | real-time sessions "
            f"(p90 & p99 < {budget_ms:g} ms over {frames} frames) | step ms p50 / p90 / p99 there | "
            "peak GiB there | vs first row | first failing count |")
    rows = [head, "|---" * 9 + "|"]
    base = ramps[0].capacity if ramps else 0
    for r in ramps:
        best, fail = r.best, r.first_failure
        steps = f"{best.p50_ms:.1f} / {best.p90_ms:.1f} / {best.p99_ms:.1f}" if best else "-"
        peak = f"{best.peak_bytes / 2**30:.1f}" if best and best.peak_bytes is not None else "-"
        ratio = f"{r.capacity / base:.2f}x" if base else "-"
        failing = "; ".join(filter(None, [f"{fail.sessions} ({fail.failure})" if fail else "", r.note]))
        capacity = f"{r.capacity}" if fail else f">= {r.capacity}"
        probed = max((p.sessions for p in r.points if p.real_time), default=0)
        if best is None and probed:
            capacity = f"none confirmed ({probed} passed a probe)"
        rows.append(f"| {r.model} | {r.window if r.window is not None else '-'} | {_mib(r.state_bytes)} | "
                    f"{_mib(r.kv_bytes)} | {capacity} | {steps} | {peak} | {ratio} | {failing or 'none: count more'} |")
    return "\n".join(rows) + "\n"


def plotted(ramps: tp.Sequence[Ramp]) -> dict[str, list[tuple[int, int]]]:
    """design -> [(window, real-time sessions)] by window: what `plot` draws. A ramp cut short by its time
    budget before any count was confirmed is left out: its capacity is unknown, not 0 (the table says where
    it stopped)."""
    series: dict[str, list[tuple[int, int]]] = {}
    for r in ramps:
        if r.window is not None and not (r.note and r.best is None):
            series.setdefault(r.model, []).append((r.window, r.capacity))
    return {design: sorted(points) for design, points in series.items()}


def plot(ramps: tp.Sequence[Ramp], path: Path, title: str) -> None:
    """Real-time sessions against the attention window, one series per design (vanilla a single point)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (design, points) in enumerate(plotted(ramps).items()):
        ax.plot(*zip(*points), marker="o", color=f"C{i}", label=design)
        for window, sessions in points:
            ax.annotate(str(sessions), (window, sessions), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("attention window (frames; 12.5 frames = 1 s)")
    ax.set_ylabel(f"sessions in real time (p90 & p99 < {FRAME_MS:g} ms)")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
