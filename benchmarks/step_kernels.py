"""Where a streaming step's GPU time goes: the Moshi-7B hybrid's kernels by GPU time per step (torch.profiler),
unquantized and quantized, side by side, and each model's wall-clock step beside its GPU-busy time. Why: `int8_mm.py`
sums the linears alone; when the model step moves by more than that sum (int8triton at batch 64, docs/benchmarks.md)
the difference is somewhere else in the step, or not on the GPU at all.

    python benchmarks/step_kernels.py --modes none,int8triton --batch 64 --rounds 3
    python benchmarks/step_kernels.py --tiny --modes none,int8 --batch 2 --frames 4 --steps 2   # CPU check

Kernels are grouped by name (the first 70 characters); µs per step is their GPU time over `--steps` steps from
frame `--frames` (random weights, bf16 on CUDA), from the last round. The profiler sees the kernels inside moshi's
CUDA graphs too (on the H200, torch 2.11); NO_CUDA_GRAPH=1 shows the eager step instead. The modes alternate
`--rounds` times in this one process, because a model's wall-clock step at batch 64 moves by up to 4 ms with the
process's history (a model built after others is slower) while its GPU-busy time does not: compare modes by rounds.
"""

from __future__ import annotations

import argparse
import collections
import gc
import os

import torch
from moshi_stream import Stream, build, lm_config  # this directory
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from ttt_speech.quantize import quantize_weights


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Time covered by the union of (start, end) intervals: how long the device was doing anything."""
    busy, reach = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > reach:
            busy += b - max(a, reach)
            reach = b
    return busy


def kernel_times(mode: str, args: argparse.Namespace, device: str
                 ) -> tuple[dict[str, tuple[float, float]], tuple[float, float]]:
    """name -> (µs per step, launches per step) of one model's `--steps` streaming steps, and (wall-clock p50 of
    `--wall-steps` steps, each between two syncs, in ms; busy ms per step: the profiled events' union)."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lm = build(lm_config(args.tiny), args.layers, device, dtype, 16)
    if mode != "none":
        quantize_weights(lm, mode)  # type: ignore[arg-type]
    stream = Stream(mode, lm, args.batch)
    cuda = device == "cuda"
    activity = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU
    with stream.gen.streaming(args.batch):
        stream.reach(args.frames)
        stream.time("wall", args.wall_steps)
        with profile(activities=[activity]) as prof:
            stream.advance(args.steps)
            if cuda:
                torch.cuda.synchronize()
    total: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.defaultdict(int)
    spans = []
    for e in prof.events():
        if (e.device_type == DeviceType.CUDA) == cuda and (cuda or e.cpu_parent is None):  # kernels; top CPU ops
            total[e.name[:70]] += e.time_range.elapsed_us()
            count[e.name[:70]] += 1
            spans.append((e.time_range.start, e.time_range.end))
    wall = (stream.p50_p90("wall")[0], busy_us(spans) / args.steps / 1e3)
    del stream, lm
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {k: (total[k] / args.steps, count[k] / args.steps) for k in total}, wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="none,int8triton", help="comma list: none (unquantized) or quantize modes")
    p.add_argument("--layers", default="all", help="TTT layers of the hybrid (moshi_stream.py's build)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--frames", type=int, default=100, help="frame at which profiling starts")
    p.add_argument("--steps", type=int, default=10, help="steps profiled")
    p.add_argument("--wall-steps", type=int, default=40, help="steps timed on the wall clock before profiling")
    p.add_argument("--rounds", type=int, default=1, help="times the modes alternate in this process")
    p.add_argument("--top", type=int, default=30, help="kernels listed (by the largest time in any mode)")
    p.add_argument("--tiny", action="store_true", help="tiny config on the CPU (top-level CPU ops instead)")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    modes = args.modes.split(",")
    walls: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    times: dict[str, dict[str, tuple[float, float]]] = {}
    for _ in range(args.rounds):
        for m in modes:
            times[m], wall = kernel_times(m, args, device)
            walls[m].append(wall)
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"batch {args.batch}, {args.steps} steps from frame {args.frames}, TTT layers {args.layers}, "
          f"CUDA graphs {device == 'cuda' and not os.environ.get('NO_CUDA_GRAPH')}, {args.rounds} round(s)")
    print("| mode | wall p50 ms per round | mean | vs first mode | busy ms per step (mean) | vs first mode |")
    print("|---|---|---|---|---|---|")
    mean = {m: (sum(w for w, _ in walls[m]) / args.rounds, sum(b for _, b in walls[m]) / args.rounds) for m in modes}
    for m in modes:
        print(f"| {m} | {' / '.join(f'{w:.2f}' for w, _ in walls[m])} | {mean[m][0]:.2f} | "
              f"{mean[m][0] / mean[modes[0]][0]:.3f} | {mean[m][1]:.2f} | {mean[m][1] / mean[modes[0]][1]:.3f} |")
    print()
    print("| kernel | " + " | ".join(f"{m} µs/step (launches)" for m in modes) + " |")
    print("|---" * (len(modes) + 1) + "|")
    names = sorted({k for t in times.values() for k in t}, key=lambda k: -max(t.get(k, (0, 0))[0] for t in
                                                                              times.values()))
    for name in names[:args.top]:
        cells = [f"{times[m][name][0]:.0f} ({times[m][name][1]:.0f})" if name in times[m] else "-" for m in modes]
        print(f"| `{name.replace('|', '/')}` | " + " | ".join(cells) + " |")
    rest = [sum(v[0] for k, v in times[m].items() if k not in names[:args.top]) for m in modes]
    print("| (the rest) | " + " | ".join(f"{r:.0f}" for r in rest) + " |")
    print("| **all** | " + " | ".join(f"**{sum(v[0] for v in times[m].values()):.0f}**" for m in modes) + " |")


if __name__ == "__main__":
    main()
