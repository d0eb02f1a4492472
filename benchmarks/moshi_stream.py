"""Moshi-7B-shape streaming: vanilla `LMGen.step` vs TTT hybrids, in one process, random weights.

    python benchmarks/moshi_stream.py                       # 7B shape, bf16, CUDA graphs (moshi's own)
    python benchmarks/moshi_stream.py --tiny --frames 40    # tiny config, runs on CPU

For each model: p50/p90 ms per frame around frame ~100, ~3000 and ~45 000, and peak GPU memory.
Reaching frame 45 000 by stepping would take ~10 min per model, so after frame ~3000 (when the
3000-frame ring KV cache is full) the streaming offsets (transformer, attention, KV ring, LMGen)
are advanced in place by 42 000: the state is then shaped and costed exactly as a stream at
frame 45 000 (full ring, positions 45k), only its cache contents are those of frame 3000.
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("NO_TORCH_COMPILE", "1")

from moshi.models import loaders  # noqa: E402
from moshi.models.lm import LMGen  # noqa: E402
from moshi.modules.transformer import RingKVCache  # noqa: E402

from ttt_speech.moshi import convert, default_ttt_config  # noqa: E402
from ttt_speech.moshi.generate import streaming_state_bytes  # noqa: E402
from ttt_speech.moshi.tiny import tiny_lm_config  # noqa: E402


def advance_offsets(gen: LMGen, n: int) -> None:
    """Move every streaming position counter forward by n frames, in place (graph-safe)."""
    for module in (gen, gen.lm_model):
        for state in module.get_streaming_state().values():
            for name, value in vars(state).items():
                if name in ("offset", "offsets") and isinstance(value, torch.Tensor):
                    value.add_(n)
                elif name == "offset_cpu":
                    setattr(state, name, value + n)
                elif isinstance(value, RingKVCache):
                    value.end_offset.add_(n)


def build(kwargs: dict, layers: str, device: str, dtype: torch.dtype, mini_batch: int):
    lm = loaders.get_moshi_lm(None, lm_kwargs=kwargs, device=device, dtype=dtype)
    if layers != "none":
        first, _, last = layers.partition("-")
        spec = "all" if layers == "all" else range(int(first), int(last or first) + 1)
        lm = convert(lm, spec, "hybrid", default_ttt_config(lm, "hybrid", mini_batch=mini_batch, gate_init=0.1))
    return lm.eval()


@torch.no_grad()
def measure(lm, marks: list[int], window: int, batch: int) -> dict:
    """Step to each mark (jumping with advance_offsets past the first full ring) and time `window` frames."""
    gen = LMGen(lm, temp=0.8, temp_text=0.7)
    n_user = lm.n_q - lm.dep_q
    user = torch.randint(0, lm.card, (batch, n_user, 1), device=lm.device)
    sync = torch.cuda.synchronize if lm.device.type == "cuda" else (lambda: None)
    context = lm.transformer.layers[0].self_attn.context or 0
    out: dict = {}
    with gen.streaming(batch):
        frame = 0
        for mark in marks:
            if mark > frame and frame > context:
                advance_offsets(gen, mark - frame)
                frame = mark
            while frame < mark:  # plain stepping (fills the ring KV cache on the way to ~3000)
                gen.step(user)
                frame += 1
            times = []
            for _ in range(window):
                sync()
                t0 = time.perf_counter()
                gen.step(user)
                sync()
                times.append((time.perf_counter() - t0) * 1e3)
                frame += 1
            out[mark] = (float(np.percentile(times, 50)), float(np.percentile(times, 90)))
        out["state_bytes"] = streaming_state_bytes(gen, lm)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny config (CPU check)")
    p.add_argument("--models", default="none,all,24-31", help="comma list: none (vanilla), all, A-B (layers)")
    p.add_argument("--frames", type=int, nargs="+", default=[100, 3010, 45000])
    p.add_argument("--window", type=int, default=50, help="frames timed at each mark")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--mini-batch", type=int, default=16)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    kwargs = tiny_lm_config() if args.tiny else dict(loaders._lm_kwargs)
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"{'tiny' if args.tiny else 'Moshi-7B'} shape, {dtype}, batch {args.batch}, "
          f"CUDA graphs: {device == 'cuda' and not os.environ.get('NO_CUDA_GRAPH')}")
    head = " | ".join(f"p50/p90 ms @{m}" for m in args.frames)
    print(f"| TTT layers | {head} | ratio p50 vs vanilla @{args.frames[-1]} | state MiB | weights GiB | "
          "peak while streaming GiB |")
    print("|---" * (len(args.frames) + 5) + "|")
    base = None
    for layers in args.models.split(","):
        gc.collect()
        cuda = device == "cuda"
        if cuda:
            torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated() if cuda else 0  # what earlier models' graphs still hold
        torch.manual_seed(0)
        lm = build(kwargs, layers, device, dtype, args.mini_batch)
        weights = (torch.cuda.memory_allocated() - before) / 2**30 if cuda else float("nan")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        res = measure(lm, args.frames, args.window, args.batch)
        peak = (torch.cuda.max_memory_allocated() - before) / 2**30 if cuda else float("nan")
        last = res[args.frames[-1]][0]
        base = last if base is None else base
        cells = " | ".join(f"{res[m][0]:.2f} / {res[m][1]:.2f}" for m in args.frames)
        print(f"| {layers} | {cells} | {last / base:.3f} | {res['state_bytes'] / 2**20:.1f} | {weights:.2f} | "
              f"{peak:.2f} |",
              flush=True)
        del lm


if __name__ == "__main__":
    main()
