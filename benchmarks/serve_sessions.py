"""Sessions per GPU in real time: milliseconds per batched step, vanilla Moshi vs its TTT hybrid.

For each batch size, the time of one batched `LMGen` step (moshi's own generator) and of one full
server step (`BatchedStreams.step`: Mimi encode + per-session-seeded LMGen + Mimi decode). A batch
keeps real time while a step takes under 80 ms (12.5 frames/s). Vanilla rows first, then the same
weights converted in place into the hybrid (one process, one set of weights in memory). Random
weights, bf16 LM, fp32 Mimi, CUDA graphs (moshi's CUDAGraphed, on by default on CUDA).

    python benchmarks/serve_sessions.py                   # 7B-shaped Moshi (released config) on CUDA
    python benchmarks/serve_sessions.py --layers 16-31    # TTT in the upper half only
    python benchmarks/serve_sessions.py --tiny            # tiny models on CPU: checks that it runs

Prints markdown table rows.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("NO_TORCH_COMPILE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from moshi.models.compression import MimiModel  # noqa: E402
from moshi.models.lm import LMGen, LMModel  # noqa: E402
from moshi.models.loaders import get_mimi, get_moshi_lm  # noqa: E402

from ttt_speech.moshi import convert, default_ttt_config  # noqa: E402
from ttt_speech.moshi.commands import parse_layers  # noqa: E402
from ttt_speech.moshi.compat import default_lm_config  # noqa: E402
from ttt_speech.moshi.tiny import build_tiny_lm, build_tiny_mimi, tiny_mimi_config  # noqa: E402
from ttt_speech.serve.streams import BatchedStreams  # noqa: E402

FRAME_MS = 80.0


def timed(step, warmup: int, iters: int, sync) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Milliseconds of each of `iters` calls of step(i), after `warmup` calls (CUDA graphs are captured
    on the second call)."""
    for i in range(warmup):
        step(i)
    sync()
    ms = np.zeros(iters)
    for i in range(iters):
        t0 = time.perf_counter()
        step(warmup + i)
        sync()
        ms[i] = (time.perf_counter() - t0) * 1e3
    return ms


@torch.no_grad()
def measure(lm: LMModel, mimi: MimiModel, batch: int, warmup: int, iters: int) -> dict[str, float]:
    device = lm.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n_user = lm.n_q - lm.dep_q
    codes = torch.randint(0, lm.card, (batch, n_user, 1), device=device)
    gen = LMGen(lm)
    with gen.streaming(batch):
        lmgen = timed(lambda i: gen.step(codes), warmup, iters, sync)
    streams = BatchedStreams(lm, mimi, batch)
    try:
        rng = np.random.default_rng(0)
        pcm = (0.1 * rng.standard_normal((batch, mimi.frame_size))).astype(np.float32)
        active = np.ones(batch, bool)
        for slot in range(batch):
            streams.start(slot, seed=slot)
        server = timed(lambda i: streams.step(pcm, active, np.full(batch, i == 0)), warmup, iters, sync)
        slot_mib = streams.slot_bytes / 2**20
    finally:
        streams.close()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"lmgen_p50": np.percentile(lmgen, 50), "lmgen_p90": np.percentile(lmgen, 90),
            "server_p50": np.percentile(server, 50), "server_p90": np.percentile(server, 90), "state_mib": slot_mib}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny random models on the CPU (a smoke run)")
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--layers", type=parse_layers, default="all", help="layers given a TTT branch")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=50)
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.tiny:
        device = torch.device("cpu")
        lm = build_tiny_lm(0)
        mimi = build_tiny_mimi(0, tiny_mimi_config(2, lm.card), num_codebooks=2)
        shape = "tiny"
    else:
        if not torch.cuda.is_available():
            raise SystemExit("the 7B-shaped benchmark needs CUDA; use --tiny on a CPU")
        device = torch.device("cuda")
        torch.manual_seed(0)
        lm = get_moshi_lm(None, lm_kwargs=default_lm_config(), device=device, dtype=torch.bfloat16)
        mimi = get_mimi(None, device=device, num_codebooks=lm.dep_q)
        shape = "7B-shaped"
    lm.eval()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{shape} Moshi, {name}, torch {torch.__version__}, {args.iters} steps after {args.warmup} warm-up; "
          f"real time = server step p90 < {FRAME_MS:.0f} ms\n")
    print("| model | batch | LMGen step ms p50 / p90 | server step ms p50 / p90 | real time | state MiB/session |")
    print("|---|---|---|---|---|---|")
    for model in ("vanilla", "hybrid"):
        if model == "hybrid":  # the same weights, TTT branches added in place
            lm = convert(lm, args.layers, "hybrid", default_ttt_config(lm, "hybrid"))
        for batch in batches:
            r = measure(lm, mimi, batch, args.warmup, args.iters)
            ok = "yes" if r["server_p90"] < FRAME_MS else "no"
            print(f"| {model} | {batch} | {r['lmgen_p50']:.2f} / {r['lmgen_p90']:.2f} | "
                  f"{r['server_p50']:.2f} / {r['server_p90']:.2f} | {ok} | {r['state_mib']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
