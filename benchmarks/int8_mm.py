"""Our Triton int8 weight-only matmul alone, against bf16 `F.linear` (cuBLAS), at every linear shape of the
Moshi-7B TTT hybrid: microseconds per call as a streaming step sees them, the int8 kernel's read bandwidth, the
config its autotuning chose, and per row count the sum over one streaming step's linears (each shape times its
count in the hybrid): the most the int8triton model row can gain.

How a call is timed: like the model's step, inside a CUDA graph (no host launch time) and from HBM (nothing in
L2): one graph calls the kernel on enough distinct copies of the weight, back to back, that they span
4x the L2 cache, and a call's time is the graph's replay time over the number of calls (median of 5 replays).
Before 2026-12-02 13:30 UTC this script timed single eager calls with `triton.testing.do_bench` (L2 flushed
between): our autotuned kernel's Python launch path then outlasted the flush, so its small shapes measured the
host (a ~13-25 µs floor), and at 64 rows the sum over a step came out at 28.9 ms where the model row said ~10.

    python benchmarks/int8_mm.py                       # CUDA: rows 1,64,4,16, each kernel forced too
    python benchmarks/int8_mm.py --rows 1,2,8 --seconds 60
    python benchmarks/int8_mm.py --rows 64 --configs   # every config of every tile kernel at each shape, forced

Shapes come from the hybrid built on the meta device (moshi_stream.py's `build`, TTT with own projections in all
32 layers): no weights are made. Columns: auto (the kernel int8_mm_triton picks, raced at a shape's first call: the
GEMV up to 4 rows, the tensor-core tiles whole K or split, and for bf16 x x's two int8 digits on the int8 tensor
cores, whole K or split), then each kernel forced (`--no-forced` skips them), then cuBLAS bf16. Prints markdown
rows as it goes (a cut run keeps what it printed); nothing new starts after `--seconds`.
"""

from __future__ import annotations

import argparse
import collections
import math
import statistics
import sys
import time
import typing as tp

import torch
import torch.nn.functional as F
import triton.testing
from moshi_stream import build  # this directory

from ttt_speech.moshi.compat import default_lm_config
from ttt_speech.ops.int8 import int8_mm_naive
from ttt_speech.ops.int8.triton_mm import (DIGITS_CONFIGS, DIGITSK_CONFIGS, DOT_CONFIGS, SPLITK_CONFIGS, int8_mm_triton,
                                           settled)
from ttt_speech.quantize import linear_layers


def hybrid_shapes(layers: str) -> dict[tuple[int, int], int]:
    """(out_features, in_features) -> how many linears of that shape the hybrid has (one call each per step)."""
    with torch.device("meta"):
        lm = build(default_lm_config(), layers, "meta", torch.bfloat16, 16)
    count = collections.Counter((m.out_features, m.in_features) for m in linear_layers(lm).values())
    return dict(sorted(count.items(), key=lambda kv: -kv[0][0] * kv[0][1]))


def graph_us(call: tp.Callable[[int], torch.Tensor], copies: int) -> float:
    """Median µs of `call(i)` over copies i = 0..copies-1, run back to back in one CUDA graph (see the top). The
    first pass is eager: autotuning and the GEMV-or-tiles race happen there, outside the capture."""
    for i in range(copies):
        call(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            call(i)
    graph.replay()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / copies)
    return statistics.median(times)


def l2_bytes() -> int:
    props = torch.cuda.get_device_properties(0)
    return getattr(props, "L2_cache_size", 0) or 50 * 2**20


def row(*cells: str) -> None:
    print("| " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,64,4,16", help="comma list of M (batch size of a streaming step)")
    p.add_argument("--layers", default="all", help="TTT layers of the hybrid whose shapes are timed (all, A-B, none)")
    p.add_argument("--no-forced", action="store_true", help="time only the kernel int8_mm_triton picks")
    p.add_argument("--configs", action="store_true", help="also each tile and split-K config forced (a column per config)")
    p.add_argument("--seconds", type=float, default=float("inf"), help="nothing new starts after this budget")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("int8_mm.py times CUDA kernels: run it on a GPU (tests/test_int8_triton.py checks them on the CPU)")
    start = time.perf_counter()
    shapes = hybrid_shapes(args.layers)
    kernels = [None] if args.no_forced else [None, "gemv", "dot", "splitk", "digits", "digitsk"]
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, bf16 x, "
          f"shapes of the Moshi-7B hybrid (TTT layers {args.layers}): {len(shapes)} shapes, "
          f"{sum(shapes.values())} linears, {sum(n * k * c for (n, k), c in shapes.items()) / 2**30:.2f} GiB of int8 "
          "codes per step", flush=True)
    tiles = {"dot": DOT_CONFIGS, "splitk": SPLITK_CONFIGS, "digits": DIGITS_CONFIGS, "digitsk": DIGITSK_CONFIGS}
    configs = [(kern, j) for kern, cs in tiles.items() for j in range(len(cs))] if args.configs else []
    for kern, cs in tiles.items() if configs else ():
        print(f"{kern} configs: " + "; ".join(f"{j}: {c.kwargs}, warps {c.num_warps}, stages {c.num_stages}"
                                             for j, c in enumerate(cs)), flush=True)
    row("M", "N x K", "count", "auto µs", "gemv µs", "dot µs", "splitk µs", "digits µs", "digitsk µs", "bf16 µs",
        "bf16 / auto", "auto GB/s",
        "auto config", "max rel err", *[f"{kern} {j} µs" for kern, j in configs])
    print("|---" * (14 + len(configs)) + "|", flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    for m in (int(r) for r in args.rows.split(",") if r):
        total = collections.Counter()
        for (n, k), count in shapes.items():
            if time.perf_counter() - start > args.seconds:
                print(f"not run (time budget): M={m} from {n} x {k} on", flush=True)
                return
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
            scale = w.float().abs().amax(1, keepdim=True) / 127
            codes = (w.float() / scale).round().clamp(-128, 127).to(torch.int8)
            # distinct copies spanning 4x L2 (bf16's twice int8's count: the same bytes each), so each call reads HBM
            n8 = max(1, math.ceil(4 * l2_bytes() / codes.numel()))
            c8, w16 = [codes.clone() for _ in range(n8)], [w.clone() for _ in range(max(1, n8 // 2))]
            times = {str(kern): graph_us(lambda i, kern=kern: int8_mm_triton(x, c8[i], scale, kernel=kern), n8)
                     for kern in kernels}
            for kern, j in configs:
                times[f"{kern} {j}"] = graph_us(
                    lambda i, kern=kern, j=j: int8_mm_triton(x, c8[i], scale, kernel=kern, config=j), n8)
            chosen, best = settled(n, k, m, torch.bfloat16)
            bf16 = graph_us(lambda i: F.linear(x, w16[i]), len(w16))
            want = int8_mm_naive(x, codes, scale).float()
            err = float((int8_mm_triton(x, codes, scale).float() - want).abs().max() / want.abs().max())
            auto = times["None"]
            total.update({"auto": auto * count, "bf16": bf16 * count})
            row(str(m), f"{n} x {k}", str(count), f"{auto:.1f}", f"{times.get('gemv', float('nan')):.1f}",
                f"{times.get('dot', float('nan')):.1f}", f"{times.get('splitk', float('nan')):.1f}",
                f"{times.get('digits', float('nan')):.1f}", f"{times.get('digitsk', float('nan')):.1f}", f"{bf16:.1f}",
                f"{bf16 / auto:.2f}",
                f"{n * k / auto / 1e3:.0f}", f"{chosen} {best.kwargs if best else '?'}", f"{err:.1e}",
                *[f"{times[f'{kern} {j}']:.1f}" for kern, j in configs])
        row(str(m), "**all linears of a step**", str(sum(shapes.values())), f"**{total['auto'] / 1e3:.2f} ms**",
            "", "", "", "", "",
            f"**{total['bf16'] / 1e3:.2f} ms**", f"**{total['bf16'] / total['auto']:.2f}**", "", "", "",
            *[""] * len(configs))


if __name__ == "__main__":
    main()
