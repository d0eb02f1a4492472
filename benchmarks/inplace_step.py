"""In-place fast weights at Moshi-7B MLP shape: per-frame latency of one layer's step beside the plain gated
MLP it wraps (chunk-end frames reported apart), state bytes per stream, peak memory, and training throughput
of the chunked form beside the plain MLP and a TTT-Linear layer (docs/ttt.md, "Frame budget").

    python benchmarks/inplace_step.py                       # CUDA: dim 4096, hidden 11264, chunk 64, B 1 and 8
    python benchmarks/inplace_step.py --dim 64 --hidden 176 --frames 64 --train-T 128   # small, also on CPU
    python benchmarks/inplace_step.py --decay 0.95          # the same with a per-chunk decay (its extra scale pass)

Each frame is timed alone (CUDA: events around one graph replay / eager step), so the chunk-end frames,
where the delta is written, show in the max and in their own column. Prints markdown rows.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from layer import cuda_graph  # benchmarks/layer.py, beside this script

from ttt_speech.config import InPlaceConfig, TTTConfig
from ttt_speech.layers.inplace import GatedMLP, fresh_mlp


def timer(cuda: bool):
    """A function running `fn` once and returning its milliseconds (CUDA events on the GPU)."""
    def run(fn) -> float:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    return run


def graphed(fn, cuda: bool, use_graph: bool):
    """`fn` itself, or the replay of a CUDA graph of it."""
    return cuda_graph(fn) if cuda and use_graph else fn


def pct(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]


def bench_step(mlp: GatedMLP, cfg: InPlaceConfig, B: int, frames: int, device: torch.device, dtype: torch.dtype,
               use_graph: bool) -> tuple[dict[str, float], dict[str, float], int]:
    """Per-frame ms of the plain MLP and of the in-place step (all frames; chunk-end frames), state bytes."""
    cuda = device.type == "cuda"
    layer = cfg.build(mlp).to(device)
    layer.target_proj.to(dtype)
    with torch.no_grad():
        layer.target_proj.weight.normal_(std=0.02)  # writes are real work, as after training
    state = layer.init_state(B, device)
    x = torch.randn(B, 1, cfg.dim, device=device, dtype=dtype)
    run = timer(cuda)
    with torch.no_grad():
        plain = graphed(lambda: mlp(x), cuda, use_graph)
        step = graphed(lambda: layer.step(x, state), cuda, use_graph)
        for _ in range(cfg.chunk):  # warm-up, and every stream leaves at offset 0
            plain()
            step()
        t_plain = [run(plain) for _ in range(frames)]
        t_step = [run(step) for _ in range(frames)]
    ends = [t for i, t in enumerate(t_step) if i % cfg.chunk == cfg.chunk - 1]

    def row(ts: list[float]) -> dict[str, float]:
        return {"p50": statistics.median(ts), "p90": pct(ts, 0.9), "max": max(ts)}

    return row(t_plain), row(t_step) | {"chunk_end_max": max(ends) if ends else float("nan")}, state.nbytes // B


def bench_train(dim: int, hidden: int, chunk: int, decay: float, B: int, T: int, device: torch.device,
                dtype: torch.dtype) -> dict[str, float]:
    """Forward+backward tokens/s: the plain MLP, the in-place layer (chunked form), a TTT-Linear layer of the width."""
    torch.manual_seed(0)
    mlp = fresh_mlp(dim, hidden, dim**-0.5).to(device, dtype)
    inplace = InPlaceConfig(dim, hidden, chunk=chunk, target_init_std=0.02, decay=decay).build(mlp).to(device, dtype)
    ttt = TTTConfig(dim=dim, num_heads=max(1, dim // 128), gate_init=0.1).build().to(device, dtype)
    x = torch.randn(B, T, dim, device=device, dtype=dtype, requires_grad=True)
    run = timer(device.type == "cuda")
    out = {}
    for name, fn in (("mlp", lambda: mlp(x)), ("inplace", lambda: inplace(x)[0]), ("ttt-linear", lambda: ttt(x)[0])):
        def once(fn=fn) -> None:
            fn().float().square().mean().backward()
        once()
        ms = statistics.median(run(once) for _ in range(3))
        out[name] = B * T / ms * 1e3
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=11264)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--decay", type=float, default=1.0, help="InPlaceConfig.decay (1: none)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--frames", type=int, default=256, help="timed frames per row (several chunks)")
    p.add_argument("--train-T", type=int, default=2048, help="training sequence length (0: skip)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"dim {args.dim}, hidden {args.hidden}, chunk {args.chunk}, decay {args.decay}, {dtype}, delta fp32")
    print("| B | path | MLP ms p50/p90/max | in-place ms p50/p90/max | chunk-end max ms | state MB/stream | peak GiB |\n"
          "|---|---|---|---|---|---|---|")
    for B in args.batch:
        for use_graph in (False, True) if device.type == "cuda" else (False,):
            torch.manual_seed(0)
            mlp = fresh_mlp(args.dim, args.hidden, args.dim**-0.5).to(device, dtype)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            cfg = InPlaceConfig(args.dim, args.hidden, chunk=args.chunk, decay=args.decay)
            plain, step, nbytes = bench_step(mlp, cfg, B, args.frames, device, dtype, use_graph)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
            fmt = lambda r: f"{r['p50']:.3f} / {r['p90']:.3f} / {r['max']:.3f}"  # noqa: E731
            print(f"| {B} | {'CUDA graph' if use_graph else 'eager'} | {fmt(plain)} | {fmt(step)} | "
                  f"{step['chunk_end_max']:.3f} | {nbytes / 1e6:.1f} | {peak:.2f} |", flush=True)
            del mlp
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.train_T:
        tps = bench_train(args.dim, args.hidden, args.chunk, args.decay, 1, args.train_T, device, dtype)
        print(f"\n| training, B=1, T={args.train_T} | MLP | in-place | TTT-Linear |\n|---|---|---|---|\n"
              f"| fwd+bwd ktok/s | {tps['mlp'] / 1e3:.1f} | {tps['inplace'] / 1e3:.1f} | {tps['ttt-linear'] / 1e3:.1f} |")


if __name__ == "__main__":
    main()
