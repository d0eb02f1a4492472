"""TTT layer throughput: reference vs our Triton kernel vs FLA vs SDPA (flash) attention, and
per-token layer-step latency.

    python benchmarks/layer.py                 # H=32, D=128, bf16, T = 4k/16k/64k (CUDA)
    python benchmarks/layer.py --impls triton,fla,sdpa --T 65536   # skip the (slow) reference
    python benchmarks/layer.py --T 1024 --H 4  # smaller, also runs on CPU

Prints markdown table rows; speeds are tokens/s measured in this process (ratios are what matter).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from ttt_speech.ops.ttt.fla import fla_chunk_ttt_linear
from ttt_speech.ops.ttt.reference import ttt_chunked


def timeit(fn, warmup: int = 2, iters: int = 5) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def inputs(B: int, H: int, T: int, D: int, device: str, dtype: torch.dtype, grad: bool):
    g = torch.Generator(device=device).manual_seed(0)
    r = lambda *s, sc=1.0: (torch.randn(*s, device=device, generator=g) * sc).to(dtype).requires_grad_(grad)
    q, k, v = r(B, T, H, D, sc=D**-0.5), r(B, T, H, D, sc=D**-0.5), r(B, T, H, D)
    eta = (torch.rand(B, T, H, 1, device=device, generator=g) * 0.01).to(dtype)
    w = torch.ones(H, D, device=device, dtype=dtype, requires_grad=grad)
    b = torch.zeros(H, D, device=device, dtype=dtype, requires_grad=grad)
    return q, k, v, eta, w, b


def heads_first(q, k, v, eta):
    """FLA's [B, T, H, *] problem in our layout: q, k, v [B, H, T, D], a = eta, c = 1, zero initial W, b."""
    B, T, H, D = q.shape
    a = eta[..., 0].transpose(1, 2).float()
    W0, b0 = torch.zeros(B, H, D, D, device=q.device), torch.zeros(B, H, 1, D, device=q.device)
    return [t.transpose(1, 2) for t in (q, k, v)], a, torch.ones_like(a), W0, b0


def run_reference(q, k, v, eta, w, b, K: int):
    qkv, a, c, W0, b0 = heads_first(q, k, v, eta)
    out, *_ = ttt_chunked(*(t.float() for t in qkv), a, c, w.float(), b.float(), [W0, b0],
                          [torch.zeros_like(W0), torch.zeros_like(b0)],
                          torch.zeros(q.shape[0], dtype=torch.long, device=q.device), K, residual="z")
    return out


def run_triton(q, k, v, eta, w, b, K: int):
    """Our kernel on FLA's problem: same inputs, step size per query (c = 1), residual z + LN(z)."""
    from ttt_speech.ops.ttt.triton_chunk import ttt_linear_chunked_triton

    qkv, a, c, W0, b0 = heads_first(q, k, v, eta)
    return ttt_linear_chunked_triton(*qkv, a, c, w, b, W0, b0, K, residual="z")[0]


def run_fla(q, k, v, eta, w, b, K: int):
    return fla_chunk_ttt_linear()(q, k, v, w, b, eta, scale=1.0, chunk_size=K)[0]


def run_sdpa(q, k, v, *_):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)


def peak_gib(fn) -> float:
    """Peak CUDA memory one call adds on top of what is allocated before it (0 on CPU)."""
    if not torch.cuda.is_available():
        fn()
        return 0.0
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def bench_throughput(name, fn, B, H, T, D, K, device, dtype, backward: bool) -> tuple[float, float]:
    """(tokens/s, peak GiB of one call beyond its inputs)."""
    args = inputs(B, H, T, D, device, dtype, backward)

    def once():
        out = fn(*args, K)
        if backward:
            out.float().sum().backward()

    iters = 3 if T >= 65536 else 5
    return B * T / timeit(once, warmup=1, iters=iters), peak_gib(once)


def bench_layer(variant: str, kernel: bool, B: int, T: int, dim: int, H: int, K: int, device: str) -> float:
    """tokens/s of forward+backward through a whole TTTLayer (own projections, bf16 weights on CUDA):
    through its kernel (ours; FLA's for variant fla) or, kernel=False, the PyTorch reference."""
    from ttt_speech import TTTConfig

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    layer = TTTConfig(dim=dim, num_heads=H, mini_batch=K, variant=variant, gate_init=0.1).build().to(device, dtype)
    if not kernel:
        layer._chunk_kernel = lambda *a: None
    x = torch.randn(B, T, dim, device=device, dtype=dtype, requires_grad=True)
    return B * T / timeit(lambda: layer(x)[0].float().square().mean().backward(), warmup=1, iters=3)


def cuda_graph(fn):
    """`fn` captured in a CUDA graph (after warm-up on a side stream); returns the graph's replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def bench_step(B: int, H: int, D: int, device: str, graphed: bool, shared: bool, fused: bool) -> float:
    """Milliseconds for one token through one TTT-Linear layer's `step` (bf16 weights on CUDA, fp32 state):
    its own Q/K/V/O projections, or a shared_qkv layer given the host attention's qkv and heads."""
    from ttt_speech import TTTConfig
    from ttt_speech.layers.ttt import use_triton

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    layer = TTTConfig(dim=H * D, num_heads=H, gate_init=0.1, shared_qkv=shared).build().to(device, dtype)
    state = layer.init_state(B, device)
    x = torch.randn(B, 1, H * D, device=device, dtype=dtype)
    host = {"qkv": torch.randn(B, 1, 3 * H * D, device=device, dtype=dtype), "heads": x} if shared else {}
    with use_triton(fused):
        fn = lambda: layer.step(x, state, **host)
        run = cuda_graph(fn) if graphed else fn
        n = 200
        return timeit(lambda: [run() for _ in range(n)], warmup=1, iters=5) / n * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--H", type=int, default=32)
    p.add_argument("--D", type=int, default=128)
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--K", type=int, default=16, help="mini-batch")
    p.add_argument("--impls", default="reference,triton,fla,sdpa", help="comma-separated throughput rows")
    p.add_argument("--step-only", action="store_true", help="only the per-token step table")
    p.add_argument("--no-step", action="store_true", help="skip the per-token step table")
    p.add_argument("--layer", type=int, nargs="*", default=[], metavar="T",
                   help="also time forward+backward of a whole TTTLayer of width H*D at these lengths")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    impls = {"reference": run_reference, "sdpa": run_sdpa}
    if device == "cuda":
        impls["triton"] = run_triton
        if fla_chunk_ttt_linear() is not None:
            impls["fla"] = run_fla
    impls = {name: impls[name] for name in args.impls.split(",") if name in impls}
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"B={args.B} H={args.H} D={args.D} K={args.K} {dtype}")
    print("| T | impl | fwd Mtok/s | fwd+bwd Mtok/s | fwd+bwd peak GiB |\n|---|---|---|---|---|")
    for T in [] if args.step_only else args.T:
        for name, fn in impls.items():
            f, _ = bench_throughput(name, fn, args.B, args.H, T, args.D, args.K, device, dtype, False)
            fb, mem = bench_throughput(name, fn, args.B, args.H, T, args.D, args.K, device, dtype, True)
            print(f"| {T} | {name} | {f / 1e6:.3f} | {fb / 1e6:.3f} | {mem:.2f} |", flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
    if args.layer:
        print(f"\n| TTTLayer dim {args.H * args.D}, {args.H} heads, B={args.B} | T | path | fwd+bwd ktok/s |"
              "\n|---|---|---|---|")
    for T in args.layer:
        for variant in ("ttt-lm", "fla"):
            for kernel in (False, True) if device == "cuda" else (False,):
                path = ("FLA" if variant == "fla" else "Triton (ours)") if kernel else "PyTorch reference"
                tps = bench_layer(variant, kernel, args.B, T, args.H * args.D, args.H, args.K, device)
                print(f"| {variant} | {T} | {path} | {tps / 1e3:.1f} |", flush=True)
    if args.no_step:
        return
    print("\n| layer step (one token) | projections | B | ms |\n|---|---|---|---|")
    for B in (1, 16):
        for shared in (False, True):
            for fused in (False, True) if device == "cuda" else (False,):
                for graphed in (False, True) if device == "cuda" else (False,):
                    ms = bench_step(B, args.H, args.D, device, graphed, shared, fused)
                    print(f"| {'fused Triton' if fused else 'torch'}, {'CUDA graph' if graphed else 'eager'} | "
                          f"{'shared (attention)' if shared else 'own Q/K/V/O'} | {B} | {ms:.4f} |", flush=True)

if __name__ == "__main__":
    main()
