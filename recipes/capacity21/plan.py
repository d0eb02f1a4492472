"""Plan a call of recipes/capacity21/device.sh on the CPU, before device minutes go into it: the ramp's own
search (`ttt_speech.serve.capacity.search`, probes, bisection, confirmations and the time budgets) replayed
against a model of the batched step instead of the GPU. Says, per row, which counts it would run, how long it
would take, where the call's deadline cuts it, and what it would find if the model holds.

    python recipes/capacity21/plan.py                                # the model in device.sh's header
    python recipes/capacity21/plan.py --from capacity.json           # a model fitted to a device run's counts
    python recipes/capacity21/plan.py --from capacity.json --models 1500,3000 --row-seconds 240,240

The model of a row: step p90 = a + c x sessions ms (every 50th frame 8 % slower, so p99 can fail where p90
does not), at most `cap` sessions in memory (more are refused at once), `--setup` seconds per count outside
its timed frames (allocating, starting the slots, capturing CUDA graphs). `--from` fits a and c by least
squares to a row's real-time counts, takes cap from its smallest count refused for memory, and the set-up from
the slowest count's wall clock outside its frames (`Point.setup_s`).
"""

from __future__ import annotations

import argparse
import json
import sys
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ttt_speech.serve.capacity import FRAME_MS, Point, Ramp, row_deadline, search, time_frames

COUNTS_7B = [1, 32, 64, 128, 192, 256, 320, 384]  # benchmarks/serve_capacity.py's
SPIKE_EVERY, SPIKE = 50, 1.08


@dataclass(frozen=True)
class StepModel:
    """A row's step time and memory limit."""

    a_ms: float  # the step at no sessions
    c_ms: float  # each session's share
    cap: float  # most sessions whose state fits (float("inf"): no limit known)

    def step_ms(self, sessions: int) -> float:
        return self.a_ms + self.c_ms * sessions


# device.sh's header: issue 21's H200 step (22.4 ms + 0.45 ms per vanilla session, ~0.33 of it its 3000-frame
# KV); a shared-q/k/v hybrid session at window W ~0.12 + 0.33 W / 3000 + 0.06 ms; state vs ~124 GiB free
HEADER = {"vanilla": StepModel(22.4, 0.45, 83), "750": StepModel(23.5, 0.26, 240),
          "1500": StepModel(23.5, 0.35, 140), "3000": StepModel(23.5, 0.51, 77)}


def fitted(ramps: tp.Iterable[Ramp]) -> dict[str, StepModel]:
    """A model per measured row: the least-squares line through its real-time counts' p90 (a row with a
    single one gets the header's per-session share), cap below its smallest count refused for memory."""
    out = {}
    for r in ramps:
        key = "vanilla" if r.window is None or r.model == "vanilla" else str(r.window)
        ok = sorted({p.sessions: p.p90_ms for p in r.points if p.real_time}.items())
        if not ok:
            continue
        n, ms = np.array([k for k, _ in ok], float), np.array([v for _, v in ok])
        c = float(np.polyfit(n, ms, 1)[0]) if len(ok) > 1 else HEADER.get(key, HEADER["vanilla"]).c_ms
        a = float(np.mean(ms - c * n))
        refused = [p.sessions for p in r.points if p.failure.startswith("out of memory")]
        out[key] = StepModel(a, c, min(refused) - 1 if refused else float("inf"))
    return out


def measured_setup(ramps: tp.Iterable[Ramp]) -> float | None:
    """The most seconds a measured count spent outside its timed frames (None: no wall clocks recorded)."""
    return max((p.setup_s for r in ramps for p in r.points if p.wall_s is not None), default=None)


class Replay:
    """The device call's clock and measurements, made of a model."""

    def __init__(self, start_s: float, setup_s: float) -> None:
        self.now, self.setup_s = start_s, setup_s

    def __call__(self) -> float:
        return self.now

    def measure(self, model: StepModel, sessions: int, frames: int) -> Point:
        if sessions > model.cap:  # refused before allocating, as `capacity.measure` does
            return Point(sessions, 0, *[float("nan")] * 4, None, "out of memory (the model's cap)")
        self.now += self.setup_s
        step, frame = model.step_ms(sessions), iter(range(frames))

        def step_ms() -> float:
            ms = step * (SPIKE if next(frame) % SPIKE_EVERY == 0 else 1.0)
            self.now += ms / 1e3
            return ms

        return time_frames(step_ms, sessions, frames)


@dataclass(frozen=True)
class Planned:
    row: str
    ramp: Ramp | None  # None: not started, no time left
    seconds: float
    ends_s: float


def plan(models: dict[str, StepModel], rows: tp.Sequence[str], deadline_s: float = 570.0, start_s: float = 40.0,
         setup_s: float = 4.0, row_seconds: tp.Sequence[float] = (180, 300), counts: tp.Sequence[int] = COUNTS_7B,
         frames: int = 1500, probe_frames: int = 150) -> list[Planned]:
    """Replay device.sh's rows: `--seconds` is the deadline less its 25 s margin, rows in order."""
    clock = Replay(start_s, setup_s)
    end = deadline_s - 25
    out = []
    for i, row in enumerate(rows):
        t0 = clock()
        deadline = row_deadline(t0, end, row_seconds[i] if i < len(row_seconds) else None)
        if deadline is not None and t0 >= deadline:
            out.append(Planned(row, None, 0.0, t0))
            continue
        model = models[row]
        r = search(Ramp(row, None, 0, 0), counts, frames, lambda n, f: clock.measure(model, n, f), FRAME_MS,
                   probe_frames, deadline, clock, lambda n: n <= model.cap)
        out.append(Planned(row, r if r.points else None, clock() - t0, clock()))
    return out


def render(planned: tp.Sequence[Planned], models: dict[str, StepModel]) -> str:
    lines = ["| row | model: a + c x n ms, cap | counts run (p: 150-frame probe, f: full run, x: failed) | seconds | "
             "ends at s | finds | cut |", "|---|---|---|---|---|---|---|"]
    for p in planned:
        m = models[p.row]
        model = f"{m.a_ms:.1f} + {m.c_ms:.3f} n, {m.cap:g}"
        if p.ramp is None:
            lines.append(f"| {p.row} | {model} | not started: no time left | 0 | {p.ends_s:.0f} | - | - |")
            continue
        runs = " ".join(f"{q.sessions}{'p' if q.probe else 'f'}{'' if q.real_time else 'x'}" for q in p.ramp.points)
        lines.append(f"| {p.row} | {model} | {runs} | {p.seconds:.0f} | {p.ends_s:.0f} | {p.ramp.capacity} | "
                     f"{p.ramp.note or '-'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[Planned]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", help="capacity.json of a device run: fit the model to its rows")
    p.add_argument("--models", default="vanilla,750,1500,3000", help="rows in the order they run (device.sh MODELS)")
    p.add_argument("--deadline", type=float, default=570.0, help="device.sh DEADLINE, seconds")
    p.add_argument("--start", type=float, default=40.0, help="seconds of set-up before the first row")
    p.add_argument("--setup", type=float, help="seconds per count outside its timed frames (default: the most "
                                               "--from measured, else 4)")
    p.add_argument("--row-seconds", default="180,300", help="device.sh ROW_S ('' for none)")
    args = p.parse_args(argv)
    models, setup = dict(HEADER), args.setup
    if args.source:
        ramps = [Ramp.from_dict(d) for d in json.loads(Path(args.source).read_text())["ramps"]]
        models |= fitted(ramps)
        if setup is None:
            setup = measured_setup(ramps)
    rows = args.models.split(",")
    missing = [r for r in rows if r not in models]
    if missing:
        raise SystemExit(f"plan: --models {args.models}: no model for {missing}; known: {sorted(models)}")
    budgets = [float(s) for s in args.row_seconds.split(",") if s]
    planned = plan(models, rows, args.deadline, args.start, 4.0 if setup is None else setup, budgets)
    sys.stdout.write(render(planned, models))
    return planned


if __name__ == "__main__":
    main()
