"""Our Triton int8 weight-only matmul alone, against bf16 `F.linear` (cuBLAS), at every linear shape of the
Moshi-7B TTT hybrid: median microseconds per call with the L2 cache flushed before each (`triton.testing.do_bench`,
as its autotuning times: in a streaming step every weight comes from HBM; the host's launch time hides behind the
flush), the int8 kernel's read bandwidth, the config its autotuning chose, and per row count the sum over one
streaming step's linears (each shape times its count in the hybrid): the most the int8triton model row can gain.

    python benchmarks/int8_mm.py                       # CUDA: rows 1,64,4,16, both kernels forced too
    python benchmarks/int8_mm.py --rows 1,2,8 --seconds 60

Shapes come from the hybrid built on the meta device (moshi_stream.py's `build`, TTT with own projections in all
32 layers): no weights are made. Columns: auto (the kernel int8_mm_triton picks: up to 4 rows the faster of the two,
raced at the first call, else the tensor-core tiles), then each kernel forced (`--no-forced` skips them), then cuBLAS bf16. Prints markdown rows as it
goes (a cut run keeps what it printed); nothing new starts after `--seconds`.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
import typing as tp

import torch
import torch.nn.functional as F
import triton.testing
from moshi.models import loaders
from moshi_stream import build  # this directory

from ttt_speech.ops.int8 import int8_mm_naive
from ttt_speech.ops.int8.triton_mm import int8_mm_triton, settled
from ttt_speech.quantize import linear_layers


def hybrid_shapes(layers: str) -> dict[tuple[int, int], int]:
    """(out_features, in_features) -> how many linears of that shape the hybrid has (one call each per step)."""
    with torch.device("meta"):
        lm = build(dict(loaders._lm_kwargs), layers, "meta", torch.bfloat16, 16)
    count = collections.Counter((m.out_features, m.in_features) for m in linear_layers(lm).values())
    return dict(sorted(count.items(), key=lambda kv: -kv[0][0] * kv[0][1]))


def median_us(fn: tp.Callable[[], torch.Tensor]) -> float:
    """Median µs of `fn`, L2 flushed before each call; one call first (autotuning happens there)."""
    fn()
    return triton.testing.do_bench(fn, warmup=5, rep=30, return_mode="median") * 1e3


def row(*cells: str) -> None:
    print("| " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,64,4,16", help="comma list of M (batch size of a streaming step)")
    p.add_argument("--layers", default="all", help="TTT layers of the hybrid whose shapes are timed (all, A-B, none)")
    p.add_argument("--no-forced", action="store_true", help="time only the kernel int8_mm_triton picks")
    p.add_argument("--seconds", type=float, default=float("inf"), help="nothing new starts after this budget")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("int8_mm.py times CUDA kernels: run it on a GPU (tests/test_int8_triton.py checks them on the CPU)")
    start = time.perf_counter()
    shapes = hybrid_shapes(args.layers)
    kernels = [None] if args.no_forced else [None, "gemv", "dot"]
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, bf16 x, "
          f"shapes of the Moshi-7B hybrid (TTT layers {args.layers}): {len(shapes)} shapes, "
          f"{sum(shapes.values())} linears, {sum(n * k * c for (n, k), c in shapes.items()) / 2**30:.2f} GiB of int8 "
          "codes per step", flush=True)
    row("M", "N x K", "count", "auto µs", "gemv µs", "dot µs", "bf16 µs", "bf16 / auto", "auto GB/s", "auto config",
        "max rel err")
    print("|---" * 11 + "|", flush=True)
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
            times = {str(kern): median_us(lambda kern=kern: int8_mm_triton(x, codes, scale, kernel=kern))
                     for kern in kernels}
            chosen, best = settled(n, k, m, torch.bfloat16)
            bf16 = median_us(lambda: F.linear(x, w))
            want = int8_mm_naive(x, codes, scale).float()
            err = float((int8_mm_triton(x, codes, scale).float() - want).abs().max() / want.abs().max())
            auto = times["None"]
            total.update({"auto": auto * count, "bf16": bf16 * count})
            row(str(m), f"{n} x {k}", str(count), f"{auto:.1f}", f"{times.get('gemv', float('nan')):.1f}",
                f"{times.get('dot', float('nan')):.1f}", f"{bf16:.1f}", f"{bf16 / auto:.2f}",
                f"{n * k / auto / 1e3:.0f}", f"{chosen} {best.kwargs if best else '?'}", f"{err:.1e}")
        row(str(m), "**all linears of a step**", str(sum(shapes.values())), f"**{total['auto'] / 1e3:.2f} ms**", "", "",
            f"**{total['bf16'] / 1e3:.2f} ms**", f"**{total['bf16'] / total['auto']:.2f}**", "", "", "")


if __name__ == "__main__":
    main()
