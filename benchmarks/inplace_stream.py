"""The in-place hybrid at Moshi-7B shape beside vanilla Moshi, in one process (issue 23 item 5).

    python benchmarks/inplace_stream.py --out inplace23/                        # 7B shape, bf16, one GPU
    python benchmarks/inplace_stream.py --layers all 28-31 --frames 256 --warmup 8 --train-T 4096 --out inplace23/
    python benchmarks/inplace_stream.py --tiny --chunk 4 --frames 24 --train-T 64 --out /tmp/ip   # CPU check

Random weights (moshi's 7B config, `moshi.compat.default_lm_config`), bf16 on CUDA. Written to `--out` (inplace_stream.json and
.md) after every part, and the parts run most wanted first, so a run cut short by the device's clock
keeps what it measured:

1. **Capture check**: one converted layer's `InPlaceLayer.step` captured alone in a CUDA graph and
   replayed over a chunk and two frames (one write), against eager steps on the same inputs. A failure
   is reported in one line, and the hybrids then stream eager only.
2. **Streaming, CUDA graphs**: vanilla and one in-place hybrid per `--layers` entry (like
   `convert-moshi --branch inplace`: `all`, or `A-B`), all resident at once, each stepped through
   moshi's real `LMGen.step` frame by frame (sampling, depformer included) and timed one frame at a
   time with a device sync around it: after `--warmup` eager frames, with moshi's own CUDA graphs
   (`CUDAGraphed`, captured on the second graphed frame; the serving path). The timed frames are
   split into `--rounds` windows that alternate between models (clock drift hits all alike). Frame f
   (counted from the stream's start) is a chunk-end frame when f % chunk == chunk − 1: the frame whose
   step adds the chunk's pairs to the delta. Its times are reported apart (vanilla's frames at the same
   positions are the control), and the hybrids' chunk offsets are checked against that count. Per
   model: weights, streaming state per session (all of it, and the in-place part), peak memory.
3. **Training** (`--train-T`, 0 skips): tokens/s of one forward+backward of a single 7B-shape Moshi
   transformer layer (attention + gated MLP; all parameters trainable): as is (attention only), with
   the in-place branch (chunked form), and with the TTT branch (`ttt-lm`, own Q/K/V/O and shared
   q/k/v), B = `--train-B`.
4. **Streaming, eager**: the same streams without CUDA graphs (`moshi.utils.compile.no_cuda_graph`),
   `--eager-frames` each, reported like part 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import typing as tp
from pathlib import Path

import numpy as np
import torch

from moshi_stream import Stream, build, lm_config  # beside this script; first: it sets NO_TORCH_COMPILE on CPU before moshi loads
from layer import cuda_graph, peak_gib, timeit  # benchmarks/layer.py

from moshi.utils.compile import no_cuda_graph
from ttt_speech.layers.inplace import InPlaceLayer, InPlaceState
from ttt_speech.moshi.compat import streaming_state
from ttt_speech.moshi.generate import streaming_state_bytes
from ttt_speech.moshi.layer import HybridLayerState

PATHS = ("cuda_graph", "eager")
START = time.perf_counter()
FRAME_MS = 80.0  # Moshi's frame: 12.5 Hz


def log(*what: object) -> None:
    """Progress with seconds since start: the device call has a wall-clock budget to fit."""
    print(f"[{time.perf_counter() - START:6.1f} s]", *what, flush=True)


def layer_spec(text: str) -> str:
    """`all` or `A-B` / `A`: the layer syntax of moshi_stream.build."""
    first, _, last = text.partition("-")
    if text != "all" and not (first.isdigit() and (last.isdigit() or not last)):
        raise argparse.ArgumentTypeError(f"bad layer spec {text!r}; use all, 28-31 or 5")
    return text


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def stats(ms: list[float]) -> dict[str, float | int]:
    if not ms:
        return {"n": 0}
    return {"n": len(ms), "p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
            "max": float(max(ms))}


def is_chunk_end(frame: int, chunk: int) -> bool:
    """The frame whose step writes its chunk's pairs into the delta (offsets count from the stream's start)."""
    return frame % chunk == chunk - 1


def split(frames: list[int], ms: list[float], chunk: int) -> dict[str, tp.Any]:
    ends = [t for f, t in zip(frames, ms) if is_chunk_end(f, chunk)]
    rest = [t for f, t in zip(frames, ms) if not is_chunk_end(f, chunk)]
    out: dict[str, tp.Any] = {"all": stats(ms), "chunk_end": stats(ends), "other": stats(rest),
                              "every_frame_within_80ms": bool(ms) and max(ms) < FRAME_MS}
    if ends and rest:  # 1.0: the frame whose write lands costs what the others cost
        out["chunk_end_over_other_p50"] = out["chunk_end"]["p50"] / out["other"]["p50"]
    return out


def inplace_states(lm) -> list[InPlaceState]:
    """The in-place states of a streaming model's converted layers (none for vanilla)."""
    out = []
    for layer in getattr(lm, "memory_layers", lambda: [])():
        state = streaming_state(layer)
        if isinstance(state, HybridLayerState) and isinstance(state.memory, InPlaceState):
            out.append(state.memory)
    return out


def capture_check(layer: InPlaceLayer, batch: int, frames: int,
                  capture: tp.Callable[[tp.Callable[[], object]], tp.Callable[[], object]] = cuda_graph) -> dict[str, tp.Any]:
    """Capture `layer.step` alone (`capture`: benchmarks/layer.py's CUDA-graph recipe), then replay it for
    `frames` frames beside eager steps on the same inputs, both from a fresh state."""
    device, dtype = layer.lr_weight.device, layer.target_proj.weight.dtype
    torch.manual_seed(1)
    xs = torch.randn(frames, batch, 1, layer.config.dim, device=device, dtype=dtype)
    x, out = torch.zeros_like(xs[0]), torch.zeros_like(xs[0])
    graph_state, eager_state = layer.init_state(batch), layer.init_state(batch)
    try:
        replay = capture(lambda: out.copy_(layer.step(x, graph_state)[0]))
    except Exception as e:  # noqa: BLE001 - any failure is the finding, reported in one line
        return {"capturable": False, "reason": one_line(e)}
    layer.reset_state(graph_state)  # the capture's warm-up stepped it; in place, so the graph keeps its tensors
    diff = 0.0
    for t in range(frames):
        x.copy_(xs[t])
        replay()
        ref = layer.step(xs[t], eager_state)[0]
        diff = max(diff, (out.float() - ref.float()).abs().max().item())
    return {"capturable": True, "reason": "", "frames": frames, "max_abs_diff_out": diff,
            "max_abs_diff_delta": (graph_state["delta"] - eager_state["delta"]).abs().max().item(),
            "delta_written": bool(eager_state["delta"].abs().max().item() > 0)}


class Memory:
    """CUDA memory in GiB (zeros on CPU): what is allocated now, and the peak since `reset`."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def now(self) -> float:
        return torch.cuda.memory_allocated() / 2**30 if self.cuda else 0.0

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> float:
        return torch.cuda.max_memory_allocated() / 2**30 if self.cuda else 0.0


def run_phase(streams: list[Stream], path: str, frames: int, rounds: int) -> None:
    """Time `frames` frames of every stream under `path`, in `rounds` windows alternating between streams."""
    per = max(1, frames // rounds)
    for r in range(rounds):
        n = per if r < rounds - 1 else frames - per * (rounds - 1)
        for stream in streams:
            with no_cuda_graph() if path == "eager" else contextlib.nullcontext():
                stream.time(path, n)


def summarize(streams: list[Stream], rows: list[dict[str, tp.Any]], chunk: int) -> None:
    """Fill each row's per-path statistics (all / chunk-end / other frames) and its check of the chunk offsets."""
    for stream, row in zip(streams, rows):
        for path in PATHS:
            if path in stream.times:
                row["paths"][path] = split(stream.at[path], stream.times[path], chunk) | {
                    "series": {"frame": stream.at[path], "ms": stream.times[path]}}  # raw, for plots and re-checks
        row["frames_stepped"] = stream.frame
        states = inplace_states(stream.lm)
        offsets = {int(o) for s in states for o in s.tensors["offset"].tolist()}
        row["chunk_offset_ok"] = offsets == {stream.frame % chunk} if states else None
        row["delta_finite"] = all(bool(torch.isfinite(s["delta"]).all()) for s in states)
    for path in PATHS:
        base = rows[0]["paths"].get(path)
        for row in rows:
            cell = row["paths"].get(path)
            if base and cell:
                cell["ratio_p50_vs_vanilla"] = cell["all"]["p50"] / base["all"]["p50"]


def stream_graphed(args, kwargs: dict, device: str, dtype: torch.dtype, report: dict,
                   save) -> tuple[list[Stream], list[dict[str, tp.Any]]]:
    """Build vanilla + the hybrids, warm them up eager, capture moshi's CUDA graphs and time graphed frames
    (the serving path). Returns the streams, still streaming, and their report rows."""
    cuda = device == "cuda"
    mem = Memory(cuda)
    streams: list[Stream] = []
    rows: list[dict[str, tp.Any]] = []
    report["streaming"] = rows
    for model in ["none"] + [f"{spec}:inplace" for spec in args.layers]:
        before = mem.now()
        torch.manual_seed(0)
        lm = build(kwargs, model, device, dtype, args.mini_batch, args.chunk)
        weights = mem.now() - before
        stream = Stream("vanilla" if model == "none" else f"in-place {model.partition(':')[0]}", lm, args.batch)
        mem.reset()
        stream.gen.streaming_forever(args.batch)
        with no_cuda_graph():
            stream.advance(args.warmup)
        states = inplace_states(lm)
        rows.append({
            "model": stream.name, "layers": list(lm.memory_spec.layers) if hasattr(lm, "memory_spec") else [],
            "weights_gib": weights, "resident_gib": mem.now() - before, "peak_eager_gib": mem.peak() - before,
            "state_bytes_per_session": streaming_state_bytes(stream.gen, lm) // args.batch,
            "inplace_state_bytes_per_session": sum(s.nbytes for s in states) // args.batch,
            "paths": {}, "graph_error": None,
        })
        streams.append(stream)
        log(f"built and warmed up {stream.name}: {rows[-1]['state_bytes_per_session'] / 2**20:.1f} MiB state/session")
    if not cuda:
        for row in rows:
            row["graph_error"] = "no CUDA device: moshi streams eager"
    elif report["capture_check"].get("capturable") is False:
        for row in rows[1:]:
            row["graph_error"] = f"in-place step not capturable alone ({report['capture_check']['reason']})"
    graphed = []
    for stream, row in zip(streams, rows):
        if row["graph_error"]:
            continue
        base = mem.now()
        mem.reset()
        try:
            stream.advance(max(2, args.warmup))  # moshi: one eager call, then capture + replay
        except Exception as e:  # noqa: BLE001 - reported, the model keeps its eager numbers
            row["graph_error"] = f"moshi CUDA-graph capture failed: {one_line(e)}"
            log(f"{stream.name}: {row['graph_error']}; it streams eager only")
            continue
        row["graph_pool_gib"] = mem.now() - base
        row["peak_graph_gib"] = row["resident_gib"] + mem.peak() - base
        graphed.append(stream)
        log(f"captured {stream.name}")
    if graphed:
        run_phase(graphed, "cuda_graph", args.frames, args.rounds)
        summarize(streams, rows, args.chunk)
        save()
        log("CUDA-graph frames timed")
    return streams, rows


def stream_eager(args, streams: list[Stream], rows: list[dict[str, tp.Any]], save) -> None:
    """Time eager frames of the same streams (moshi's graphs bypassed, `no_cuda_graph`)."""
    run_phase(streams, "eager", args.eager_frames or args.frames, args.rounds)
    summarize(streams, rows, args.chunk)
    save()
    log("eager frames timed")


def train_row(args, kwargs: dict, name: str, model: str, T: int, device: str, dtype: torch.dtype) -> dict[str, tp.Any]:
    """One row: fwd+bwd tokens/s and peak of the temporal transformer of a one-layer Moshi built as `model`."""
    torch.manual_seed(0)
    lm = build(kwargs | {"num_layers": 1, "depformer_num_layers": 1}, model, device, dtype, args.mini_batch,
               args.chunk)
    x = torch.randn(args.train_B, T, lm.dim, device=device, dtype=dtype, requires_grad=True)
    if model.endswith(":inplace"):  # which chunked form InPlaceLayer.forward takes at this length
        name += " (attention form)" if T <= lm.memory_layers()[0].memory.parallel_max else " (chunk loop)"

    def once() -> None:
        lm.transformer(x).float().square().mean().backward()

    try:
        seconds = timeit(once, warmup=1, iters=args.train_iters)
        return {"layer": name, "T": T, "tokens_per_s": args.train_B * T / seconds, "peak_gib": peak_gib(once)}
    except Exception as e:  # noqa: BLE001 - e.g. out of memory at a long T: one line, next row
        return {"layer": name, "T": T, "error": one_line(e)}


def bench_train(args, kwargs: dict, device: str, dtype: torch.dtype, report: dict, save) -> None:
    """fwd+bwd tokens/s of one 7B-shape Moshi transformer layer: attention only, + in-place, + TTT."""
    rows: list[dict[str, tp.Any]] = []
    report["training"] = {"B": args.train_B, "rows": rows}
    layers = (("attention only (vanilla layer)", "none"), (f"in-place, chunk {args.chunk}", "all:inplace"),
              ("TTT ttt-lm, own Q/K/V/O", "all"), ("TTT ttt-lm, shared q/k/v", "all:shared"))
    for T in args.train_T:
        for name, model in layers:
            rows.append(train_row(args, kwargs, name, model, T, device, dtype))
            log("training:", rows[-1])
            if device == "cuda":
                torch.cuda.empty_cache()
        base = next((r for r in rows if r["T"] == T and "tokens_per_s" in r and r["layer"].startswith("attention")), None)
        for r in rows:
            if base and r["T"] == T and "tokens_per_s" in r:
                r["vs_attention_only"] = r["tokens_per_s"] / base["tokens_per_s"]
        save()


def fmt(s: dict[str, float | int] | None) -> str:
    if not s or not s.get("n"):
        return "-"
    return f"{s['p50']:.2f} / {s['p90']:.2f} / {s['max']:.2f}"


def gib(x: float, cuda: bool) -> str:
    return f"{x:.2f}" if cuda else "-"


def markdown(report: dict[str, tp.Any]) -> str:
    cap, cuda = report["capture_check"], report["device"] == "cuda"
    lines = [report["header"], "", f"Command: `{report['command']}`", "",
             "In-place step alone in a CUDA graph: " + (
                 "not checked (" + cap["reason"] + ")" if cap["capturable"] is None else
                 f"capturable; graph vs eager over {cap['frames']} frames (one write): max |Δ out| "
                 f"{cap['max_abs_diff_out']:.3g}, max |Δ delta| {cap['max_abs_diff_delta']:.3g}" if cap["capturable"]
                 else "NOT capturable: " + cap["reason"]), ""]
    rows = report.get("streaming", [])
    if rows:
        chunk = report["chunk"]
        lines += [f"| model | path | ms/frame p50 / p90 / max | chunk-end frames (f % {chunk} = {chunk - 1}): n, "
                  "p50 / p90 / max | other frames p50 / p90 / max | p50 vs vanilla | state MiB/session (in-place) "
                  "| weights GiB | peak GiB while streaming |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in rows:
            for path in PATHS:
                cell = row["paths"].get(path)
                if cell is None:
                    if path == "cuda_graph" and row["graph_error"]:
                        lines.append(f"| {row['model']} | CUDA graph | not run: {row['graph_error']} |||||||")
                    continue
                peak = row.get("peak_graph_gib") if path == "cuda_graph" else row["peak_eager_gib"]
                lines.append(
                    f"| {row['model']} | {'eager' if path == 'eager' else 'CUDA graph'} | {fmt(cell['all'])} | "
                    f"{cell['chunk_end']['n']}: {fmt(cell['chunk_end'])} | {fmt(cell['other'])} | "
                    f"{cell.get('ratio_p50_vs_vanilla', float('nan')):.3f} | "
                    f"{row['state_bytes_per_session'] / 2**20:.4g} ({row['inplace_state_bytes_per_session'] / 2**20:.4g}) | "
                    f"{gib(row['weights_gib'], cuda)} | {gib(peak, cuda)} |")
        lines.append("")
    train = report.get("training", {}).get("rows", [])
    if train:
        lines += [f"| one {'tiny' if report['tiny'] else '7B'}-shape Moshi layer, fwd+bwd, B={report['training']['B']} | T | ktok/s | "
                  "vs attention only | peak GiB |", "|---|---|---|---|---|"]
        for r in train:
            if "error" in r:
                lines.append(f"| {r['layer']} | {r['T']} | {r['error']} | | |")
            else:
                lines.append(f"| {r['layer']} | {r['T']} | {r['tokens_per_s'] / 1e3:.1f} | "
                             f"{r.get('vs_attention_only', float('nan')):.3f} | {gib(r['peak_gib'], cuda)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, tp.Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the tiny Moshi config (CPU check)")
    p.add_argument("--layers", nargs="+", type=layer_spec, default=["all"],
                   help="one in-place hybrid per entry: all (convert-moshi's default) or A-B (default: all)")
    p.add_argument("--chunk", type=int, default=64, help="frames per delta write (convert-moshi --chunk)")
    p.add_argument("--frames", type=int, default=256, help="timed frames per model and path")
    p.add_argument("--eager-frames", type=int, help="timed eager frames per model (default: --frames)")
    p.add_argument("--warmup", type=int, default=8, help="untimed frames before each path (graphs: at least 2)")
    p.add_argument("--rounds", type=int, default=4, help="timed windows alternating between models, per path")
    p.add_argument("--batch", type=int, default=1, help="streams per model")
    p.add_argument("--mini-batch", type=int, default=16, help="TTT mini-batch (training rows)")
    p.add_argument("--train-T", type=int, nargs="+", default=[4096], help="training lengths (0: no training part)")
    p.add_argument("--train-B", type=int, default=1)
    p.add_argument("--train-iters", type=int, default=3)
    p.add_argument("--no-stream", action="store_true", help="skip the streaming part")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (the in-place state is fp32)")
    p.add_argument("--out", type=Path, help="directory for inplace_stream.json and inplace_stream.md")
    args = p.parse_args(argv)
    args.train_T = [t for t in args.train_T if t > 0]
    if args.chunk < 1 or args.frames < 1 or args.rounds < 1:
        p.error("--chunk, --frames and --rounds must be positive")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    kwargs = lm_config(args.tiny)
    compiled = not os.environ.get("NO_TORCH_COMPILE")
    header = (f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}, "
              f"{'tiny' if args.tiny else 'Moshi-7B'} shape, random weights, {dtype}, batch {args.batch}, "
              f"chunk {args.chunk}, fp32 in-place state, TF32 {'on' if args.tf32 else 'off'}, "
              f"torch.compile {'on' if compiled else 'off'}, {time.strftime('%Y-%m-%d', time.gmtime())}")
    report: dict[str, tp.Any] = {
        "header": header, "command": "python benchmarks/inplace_stream.py " + " ".join(argv or sys.argv[1:]),
        "device": device, "torch": torch.__version__, "tiny": args.tiny, "dtype": str(dtype), "batch": args.batch,
        "chunk": args.chunk, "tf32": args.tf32, "torch_compile": compiled, "frames": args.frames,
        "warmup": args.warmup, "rounds": args.rounds, "capture_check": {"capturable": None, "reason": "not run"},
    }

    def save() -> None:
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "inplace_stream.json").write_text(json.dumps(report, indent=1))
            (args.out / "inplace_stream.md").write_text(markdown(report))

    print(header, flush=True)
    streams: list[Stream] = []
    if not args.no_stream:  # most wanted first: a run cut short by the device's clock keeps the rest
        torch.manual_seed(0)
        probe = build(kwargs | {"num_layers": 1, "depformer_num_layers": 1}, "all:inplace", device, dtype,
                      args.mini_batch, args.chunk)
        report["capture_check"] = (capture_check(probe.memory_layers()[0].memory, args.batch, args.chunk + 2)
                                   if device == "cuda" else {"capturable": None, "reason": "no CUDA device"})
        del probe
        log("capture check:", report["capture_check"])
        save()
        streams, rows = stream_graphed(args, kwargs, device, dtype, report, save)
    if args.train_T:
        bench_train(args, kwargs, device, dtype, report, save)
    if streams:
        stream_eager(args, streams, rows, save)
    save()
    print(markdown(report), flush=True)
    return report


if __name__ == "__main__":
    main()
