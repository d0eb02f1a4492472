"""Sessions per GPU in real time: vanilla Moshi vs TTT hybrids with shorter attention windows, one process.

Ramps concurrent sessions through the server's own batched step (`BatchedStreams.step`: Mimi encode,
per-session-seeded LMGen, Mimi decode; `ttt_speech.serve.capacity`) until the step's p90 or p99 reaches
80 ms, for vanilla Moshi first, then the same random weights converted in place into a hybrid (`--hybrid`,
named explicitly: the default branch of convert-moshi is in-place in all layers, 5.6 GiB of state per session
at 7B, no serving design) and run at each attention window in the order given (each window allocates only
its KV: `set_attention_window`). Random weights, bf16 LM, fp32 Mimi, moshi's CUDA graphs, NO_TORCH_COMPILE=1
(as benchmarks/serve_sessions.py).

    python benchmarks/serve_capacity.py --out capacity/                  # Moshi-7B shape on CUDA (H200)
    python benchmarks/serve_capacity.py --out capacity/ --models vanilla --append   # one model per call
    python benchmarks/serve_capacity.py --tiny --frames 20 --counts 1,2,4 --out /tmp/capacity   # CPU check
    bash recipes/capacity21/device.sh                                    # the device call (its header: budgets)

At 7B shape each count first runs a 150-frame probe; the gap between the last passing and the first failing
probe is halved to within 1/8, and the largest passing count is confirmed over --frames (1500 = 2 min of
audio), stepping down by 1/8 until one holds (--probe-frames 0: every count runs --frames). A row takes about
(probes x 150 + confirmations x 1500) x step time. --seconds and --row-seconds bound the wall clock: a row
skips what would not end in its time (`capacity.search`) and a row with no time left is not started (listed
under the table). capacity.json and capacity.md (the table) in --out are rewritten after every count, so a run
killed mid-row keeps what it measured; capacity.png (sessions vs window) after every row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
import typing as tp
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import torch  # noqa: E402
from moshi.models.loaders import get_mimi, get_moshi_lm  # noqa: E402

from ttt_speech.moshi import convert, default_inplace_config, default_ttt_config, set_attention_window  # noqa: E402
from ttt_speech.moshi.commands import QUANT_MODES, parse_layers, quantize_or_exit  # noqa: E402
from ttt_speech.moshi.compat import default_lm_config  # noqa: E402
from ttt_speech.moshi.tiny import build_tiny_lm, build_tiny_mimi, tiny_lm_config, tiny_mimi_config  # noqa: E402
from ttt_speech.quantize import linear_layers  # noqa: E402
from ttt_speech.serve.capacity import (  # noqa: E402
    FRAME_MS, Point, Ramp, Timer, opus_cpu_ms, plot, ramp, row_deadline, table)

# coarse: bisection closes the gap to 1/8 and each probe costs seconds of set-up (state, CUDA graphs)
COUNTS_7B = "1,32,64,128,192,256,320,384"
WINDOWS_7B, WINDOWS_TINY = "750,1500,3000", "6,12,24"  # the order rows run in: the one that can win first
VANILLA = "vanilla"
CALL = ("device", "torch", "date", "command")  # what identifies a call whose rows a later --append keeps
PROBE_FRAMES_7B = 150  # 12 s of frames per probe: a 1500-frame run only at the count that decides


def ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random models on the CPU (a smoke run)")
    p.add_argument("--counts", type=ints, help=f"session counts to ramp through (default 7B: {COUNTS_7B}; tiny: 1,2,4)")
    p.add_argument("--windows", type=ints, help=f"hybrid attention windows, frames, run in this order (default "
                                                f"{WINDOWS_7B}; tiny {WINDOWS_TINY})")
    p.add_argument("--hybrid", type=hybrid_spec, default="all:shared",
                   help="hybrid design: layers (all, 28-31, ...) then the branch: ':shared' TTT reading the "
                        "attention's q/k/v (129 MiB of state per session at 7B), ':inplace' in-place fast weights "
                        "(188.5 MB per layer), nothing: TTT with its own projections (default all:shared)")
    p.add_argument("--models", help="comma list of what to run: vanilla and/or windows (default: all of them)")
    p.add_argument("--frames", type=int, default=1500, help="timed steps per count (1500 = 2 min of audio)")
    p.add_argument("--probe-frames", type=int,
                   help="locate the limit with runs of this many frames, then confirm the largest passing count "
                        f"over --frames (default: {PROBE_FRAMES_7B} at 7B shape, off with --tiny; 0: off)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per count (CUDA graphs: the 2nd)")
    p.add_argument("--budget-ms", type=float, default=FRAME_MS, help="p90 and p99 must stay under this")
    p.add_argument("--out", required=True, help="directory for capacity.json / .md / .png")
    p.add_argument("--append", action="store_true",
                   help="merge into an existing capacity.json (rows of the same model and window are replaced)")
    p.add_argument("--seconds", type=float, help="wall-clock budget of the whole run from its start, model build "
                                                 "included (default: none)")
    p.add_argument("--quantize", choices=QUANT_MODES,
                   help="quantize each row's linears before it runs (ttt_speech.quantize; the hybrid's after its "
                        "conversion): fewer weight bytes leave memory for more sessions; rows are named with it")
    p.add_argument("--row-seconds", type=floats,
                   help="budget of each row in the order they run (vanilla first), comma-separated; a row ends "
                        "by min(its start + this, --seconds)")
    return p


def hybrid_spec(text: str) -> str:
    """LAYERS[:shared|:inplace], checked before minutes go into building the model."""
    layers, _, kind = text.partition(":")
    if kind not in ("", "shared", "inplace"):
        raise argparse.ArgumentTypeError(f"{text!r}: the branch is ':shared', ':inplace' or nothing (TTT with its "
                                         "own projections), e.g. all:shared or 28-31:inplace")
    parse_layers(layers)
    return text


def floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated seconds, got {text!r}") from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive seconds, got {text!r}")
    return values


def build(tiny: bool, windows: list[int]):  # type: ignore[no-untyped-def]
    """(vanilla LM, Mimi): tiny on the CPU (its context the largest window), else Moshi-7B shape on CUDA."""
    if tiny:
        lm = build_tiny_lm(0, tiny_lm_config(context=max(windows)))
        return lm, build_tiny_mimi(0, tiny_mimi_config(2, lm.card), num_codebooks=2)
    if not torch.cuda.is_available():
        raise SystemExit("serve_capacity: the 7B-shaped benchmark needs CUDA; use --tiny on a CPU")
    torch.manual_seed(0)
    lm = get_moshi_lm(None, lm_kwargs=default_lm_config(), device="cuda", dtype=torch.bfloat16)
    return lm, get_mimi(None, device="cuda", num_codebooks=lm.dep_q)


def hybridize(lm, spec: str):  # type: ignore[no-untyped-def]
    """The same weights with memory branches added in place, their outputs used (TTT gate open; in-place
    target projections random, std 0.02, as after training; benchmarks/moshi_stream.py builds them alike)."""
    layers, _, kind = spec.partition(":")
    if kind == "inplace":
        cfg = default_inplace_config(lm, target_init_std=0.02)
    else:
        cfg = default_ttt_config(lm, "hybrid", gate_init=0.1, shared_qkv=kind == "shared")
    return convert(lm, parse_layers(layers), "hybrid", cfg)


def write(out: Path, ramps: list[Ramp], meta: dict, frames: int, budget_ms: float, figure: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "capacity.json").write_text(json.dumps({**meta, "ramps": [r.to_dict() for r in ramps]}, indent=1) + "\n")
    title = f"{meta['shape']}, {meta['device']}, {meta['date']}"
    opus_ms = meta["opus_cpu_ms_per_session_frame"]
    opus = (f"Host Opus encode + decode: {opus_ms:.3f} ms of CPU per session-frame: one core codes at most "
            f"{int(budget_ms // opus_ms)} sessions in real time, whatever the GPU does; `serve --opus-workers N` "
            "spreads it over N processes (benchmarks/opus_pool.py)." if opus_ms is not None else
            "Host Opus cost not measured (sphn missing or failing: see the log).")
    skipped = "".join(f"\nNot run, out of time (--seconds, --row-seconds): {name}." for name in meta.get("not_run", []))
    earlier = "".join(f"\nEarlier call, rows kept unless measured again: {c.get('device')}, {c.get('date')}; "
                      f"`{c.get('command')}`" for c in meta.get("earlier", []))
    (out / "capacity.md").write_text(f"{title}; `{meta['command']}`\n\n{table(ramps, frames, budget_ms)}\n{opus}\n"
                                     f"{skipped}{earlier}")
    if figure:
        plot(ramps, out / "capacity.png", title)


def host_opus_ms(sample_rate: int, frame_size: int) -> float | None:
    """`opus_cpu_ms` on this host, or None without a working sphn (the device image has none unless its wheel is
    carried): one line under the table, not worth losing the GPU rows for."""
    try:
        return round(opus_cpu_ms(sample_rate, frame_size), 3)
    except Exception as e:  # noqa: BLE001
        print(f"host Opus not measured: {type(e).__name__}: {e}", flush=True)
        return None


def main(argv: list[str] | None = None, timer: Timer | None = None,
         clock: tp.Callable[[], float] = time.monotonic) -> list[Ramp]:
    t0 = clock()
    args = parser().parse_args(argv)
    counts = args.counts or ints("1,2,4" if args.tiny else COUNTS_7B)
    probe_frames = args.probe_frames or None  # 0: off
    if args.probe_frames is None and not args.tiny:
        probe_frames = PROBE_FRAMES_7B
    windows = args.windows or ints(WINDOWS_TINY if args.tiny else WINDOWS_7B)
    wanted = set(args.models.split(",")) if args.models else {VANILLA, *map(str, windows)}
    unknown = wanted - {VANILLA, *map(str, windows)}
    if unknown:
        raise SystemExit(f"serve_capacity: --models {args.models}: {sorted(unknown)} is neither vanilla nor one "
                         f"of --windows {','.join(map(str, windows))}")
    if args.tiny:
        torch.set_num_threads(1)
    lm, mimi = build(args.tiny, windows)
    lm.eval()
    device = torch.cuda.get_device_name() if lm.device.type == "cuda" else "CPU"
    command = shlex.join(["python", "benchmarks/serve_capacity.py", *(sys.argv[1:] if argv is None else argv)])
    meta = {"shape": "tiny" if args.tiny else "Moshi-7B shape", "device": device, "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "frames": args.frames, "probe_frames": probe_frames,
            "budget_ms": args.budget_ms, "hybrid": args.hybrid, "command": command,
            "opus_cpu_ms_per_session_frame": host_opus_ms(mimi.sample_rate, mimi.frame_size), "not_run": []}
    print(f"{meta['shape']}, {device}, torch {torch.__version__}: {args.frames} frames per count, "
          f"real time = step p90 and p99 < {args.budget_ms:g} ms", flush=True)
    out = Path(args.out)
    kept: list[Ramp] = []
    if args.append and (out / "capacity.json").exists():
        before = json.loads((out / "capacity.json").read_text())
        kept = [Ramp.from_dict(d) for d in before["ramps"]]
        # where the kept rows come from: each earlier call's device, date and command
        meta["earlier"] = before.get("earlier", []) + [{k: before[k] for k in CALL if k in before}]
    ramps: list[Ramp] = []

    def save(figure: bool, current: Ramp | None = None) -> list[Ramp]:
        """Every row so far (kept rows of the same model and window replaced), written to --out."""
        new = ramps + ([current] if current is not None else [])  # the row being measured
        rows = [r for r in kept if (r.model, r.window) not in {(n.model, n.window) for n in new}] + new
        # vanilla first (the baseline; "vanilla int8" with --quantize)
        rows.sort(key=lambda r: (not r.model.startswith(VANILLA), r.model, -(r.window or 0)))
        write(out, rows, meta, args.frames, args.budget_ms, figure)
        return rows

    def progress(current: Ramp, point: Point) -> None:
        verdict = "real time" if point.real_time else point.failure
        print(f"{current.model}, window {current.window}{', probe' if point.probe else ''}: {point.sessions} sessions, "
              f"{point.frames} frames, step p50/p90/p99 {point.p50_ms:.1f}/{point.p90_ms:.1f}/{point.p99_ms:.1f} ms: "
              f"{verdict}", flush=True)
        save(False, current)

    rows = [VANILLA] * (VANILLA in wanted) + [str(w) for w in windows if str(w) in wanted]
    row_seconds = args.row_seconds or []
    end = t0 + args.seconds if args.seconds is not None else None
    converted = False
    for i, row in enumerate(rows):
        name = (VANILLA if row == VANILLA else f"hybrid {args.hybrid}") + (f" {args.quantize}" if args.quantize else "")
        label = name if row == VANILLA else f"{name}, window {row}"
        deadline = row_deadline(clock(), end, row_seconds[i] if i < len(row_seconds) else None)
        if deadline is not None and clock() >= deadline:
            meta["not_run"].append(label)
            continue
        if row != VANILLA:
            if not converted:
                lm, converted = hybridize(lm, args.hybrid), True
            set_attention_window(lm, int(row))
        if args.quantize and linear_layers(lm):  # the vanilla weights once, a conversion's new linears after it
            print(quantize_or_exit(lm, args.quantize), flush=True)
        done = ramp(name, lm, mimi, counts, args.frames, args.warmup, args.budget_ms, timer, progress, probe_frames,
                    deadline, clock)
        if done.points:
            ramps.append(done)
        else:  # not even its first count fitted in the time left
            meta["not_run"].append(f"{label} ({done.note})")
        save(True)
    rows_written = save(True)
    print(f"\n{(out / 'capacity.md').read_text()}\nwrote {out}/capacity.json, capacity.md, capacity.png")
    return rows_written


if __name__ == "__main__":
    main()
