"""Sessions whose Opus audio one server process codes in real time, with 0, 1, 2, ... worker processes
(`ttt-speech serve --opus-workers`, issue 21). CPU only: no model, no GPU.

    python benchmarks/opus_pool.py --workers 0,1,2               # this host
    python benchmarks/opus_pool.py --workers 0,4,8,16 --rounds 3 # a device host's cores

Each round codes `--sessions-per-worker` x workers sessions (that many with 0 workers) for `--frames` frames
through the server's own `OpusCoding` (`capacity.opus_sessions_per_frame`): per frame every session encodes
80 ms of output and decodes 80 ms of client Ogg/Opus. Prints a markdown table: sessions coded per 80 ms of
wall clock (each round, then the median), and the server process's own CPU per session-frame, which bounds
what one process can feed to any number of workers.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics

from ttt_speech.serve.capacity import FRAME_MS, OpusRate, opus_cpu_ms, opus_sessions_per_frame

SR, FRAME = 24000, 1920  # Mimi's rate and frame


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", default="0,1,2", help="comma-separated worker counts (0: on the event loop)")
    p.add_argument("--sessions-per-worker", type=int, default=64)
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    return p


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> dict[int, list[OpusRate]]:
    args = parser().parse_args(argv)
    counts = [int(w) for w in args.workers.split(",")]
    if any(w < 0 for w in counts) or args.rounds < 1 or args.frames < 1 or args.sessions_per_worker < 1:
        raise SystemExit("opus_pool: --workers are integers >= 0; --rounds, --frames, --sessions-per-worker >= 1")
    cpu_ms = opus_cpu_ms(SR, FRAME)
    print(f"{datetime.date.today()}, {cpu_name()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}: "
          f"Opus encode + decode {cpu_ms:.3f} ms CPU per session-frame (one core: {FRAME_MS / cpu_ms:.0f} sessions "
          f"per {FRAME_MS:g} ms frame)\n", flush=True)
    rates: dict[int, list[OpusRate]] = {w: [] for w in counts}
    for _ in range(args.rounds):  # rounds interleave the counts, so a busy spell of the host hits them alike
        for w in counts:
            rates[w].append(opus_sessions_per_frame(w, SR, FRAME, args.sessions_per_worker * max(1, w), args.frames))
    base = statistics.median(r.sessions_per_frame for r in rates[counts[0]])
    print(f"| opus workers | sessions | sessions per {FRAME_MS:g} ms frame (rounds) | median | vs {counts[0]} workers "
          "| server process CPU ms per session-frame |\n|---|---|---|---|---|---|")
    for w, rs in rates.items():
        median = statistics.median(r.sessions_per_frame for r in rs)
        print(f"| {w} | {args.sessions_per_worker * max(1, w)} | {' / '.join(f'{r.sessions_per_frame:.0f}' for r in rs)} "
              f"| {median:.0f} | {median / base:.2f}x | {statistics.median(r.loop_cpu_ms for r in rs):.3f} |")
    return rates


if __name__ == "__main__":
    main()
