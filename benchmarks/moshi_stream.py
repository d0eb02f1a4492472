"""Moshi-7B-shape streaming: vanilla `LMGen.step` vs TTT hybrids, in one process, random weights.

    python benchmarks/moshi_stream.py                       # 7B shape, bf16, CUDA graphs (moshi's own)
    python benchmarks/moshi_stream.py --tiny --frames 40    # tiny config, runs on CPU
    python benchmarks/moshi_stream.py --models none,all:shared --batch 16

Models: none (vanilla), all, or A-B (TTT layers), with ":shared" for TTT that reads the attention's
q/k/v projection and joins its heads before the output projection (`TTTConfig.shared_qkv`), or
":inplace" for the in-place fast-weight branch in those layers' own MLPs (`--chunk` frames per write;
`benchmarks/inplace_stream.py` times its chunk-end frames apart).

For each model: p50/p90 ms per frame around frame ~100, ~3000 and ~45 000, and peak GPU memory.
All models are resident at once and their timed windows alternate round-robin, so a slow drift of
the GPU clock or the host (seen on the device: the same vanilla model 16.4 then 18.3 ms/frame
when measured before and after others) hits every model alike; the first model is the baseline.
Reaching frame 45 000 by stepping would take ~10 min per model, so after frame ~3000 (when the
3000-frame ring KV cache is full) the streaming offsets (transformer, attention, KV ring, LMGen)
are advanced in place by 42 000: the state is then shaped and costed exactly as a stream at
frame 45 000 (full ring, positions 45k), only its cache contents are those of frame 3000.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("NO_TORCH_COMPILE", "1")

from moshi.models import loaders  # noqa: E402
from moshi.models.lm import LMGen  # noqa: E402
from moshi.modules.transformer import RingKVCache  # noqa: E402

from ttt_speech.moshi import convert, default_inplace_config, default_ttt_config  # noqa: E402
from ttt_speech.moshi.generate import streaming_state_bytes  # noqa: E402
from ttt_speech.moshi.compat import default_lm_config  # noqa: E402
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


def lm_config(tiny: bool) -> dict:
    """The LM config the benchmarks build: the tiny one (CPU checks), or Moshi-7B's."""
    return tiny_lm_config() if tiny else default_lm_config()


def build(kwargs: dict, model: str, device: str, dtype: torch.dtype, mini_batch: int, chunk: int = 64):
    """A random-weight Moshi (seeded by the caller) converted as `model` says: none, all or A-B, [:shared|:inplace].
    In-place target projections get random weights (std 0.02), so writes carry values as after training."""
    lm = loaders.get_moshi_lm(None, lm_kwargs=kwargs, device=device, dtype=dtype)
    layers, _, kind = model.partition(":")
    if layers != "none":
        first, _, last = layers.partition("-")
        spec = "all" if layers == "all" else range(int(first), int(last or first) + 1)
        if kind == "inplace":
            cfg = default_inplace_config(lm, chunk=chunk, target_init_std=0.02)
        else:
            cfg = default_ttt_config(lm, "hybrid", mini_batch=mini_batch, gate_init=0.1, shared_qkv=kind == "shared")
        lm = convert(lm, spec, "hybrid", cfg)
    return lm.eval()


def ttt_layer_count(lm) -> int:
    return len(lm.memory_spec.layers) if hasattr(lm, "memory_spec") else 0


class Stream:
    """One model streaming under LMGen, stepped to marks and timed a few frames at a time."""

    def __init__(self, name: str, lm, batch: int) -> None:
        self.name, self.lm = name, lm
        self.gen = LMGen(lm, temp=0.8, temp_text=0.7)
        self.user = torch.randint(0, lm.card, (batch, lm.n_q - lm.dep_q, 1), device=lm.device)
        self.context = lm.transformer.layers[0].self_attn.context or 0
        self.frame = 0
        self.times: dict[int | str, list[float]] = {}
        self.at: dict[int | str, list[int]] = {}

    def reach(self, mark: int) -> None:
        """Step to `mark` (jumping with advance_offsets once the ring KV cache is full)."""
        if mark > self.frame and self.frame > self.context:
            advance_offsets(self.gen, mark - self.frame)
            self.frame = mark
        self.advance(mark - self.frame)

    def advance(self, frames: int) -> None:
        """Step `frames` frames untimed."""
        for _ in range(frames):
            self.gen.step(self.user)
            self.frame += 1

    def time(self, mark: int | str, frames: int) -> None:
        """Step and time `frames` frames, one at a time, under `mark`; `self.at[mark]` keeps their frame indices."""
        sync = torch.cuda.synchronize if self.lm.device.type == "cuda" else (lambda: None)
        for _ in range(frames):
            sync()
            t0 = time.perf_counter()
            self.gen.step(self.user)
            sync()
            self.times.setdefault(mark, []).append((time.perf_counter() - t0) * 1e3)
            self.at.setdefault(mark, []).append(self.frame)
            self.frame += 1

    def p50_p90(self, mark: int) -> tuple[float, float]:
        return float(np.percentile(self.times[mark], 50)), float(np.percentile(self.times[mark], 90))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny config (CPU check)")
    p.add_argument("--models", default="none,all:shared,24-31:shared,all",
                   help="comma list: none (vanilla), all, A-B (layers), each optionally :shared")
    p.add_argument("--frames", type=int, nargs="+", default=[100, 3010, 45000])
    p.add_argument("--window", type=int, default=60, help="frames timed at each mark, per model")
    p.add_argument("--rounds", type=int, default=6, help="the window is split in this many interleaved rounds")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--mini-batch", type=int, default=16)
    p.add_argument("--chunk", type=int, default=64, help="frames per write of :inplace models")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    kwargs = lm_config(args.tiny)
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"{'tiny' if args.tiny else 'Moshi-7B'} shape, {dtype}, batch {args.batch}, "
          f"CUDA graphs: {device == 'cuda' and not os.environ.get('NO_CUDA_GRAPH')}")
    head = " | ".join(f"p50/p90 ms @{m}" for m in args.frames)
    print(f"| TTT layers | {head} | ratio p50 vs vanilla @{args.frames[-1]} | ms per TTT layer | state MiB | "
          "weights GiB | peak while streaming GiB |")
    print("|---" * (len(args.frames) + 6) + "|")

    cuda = device == "cuda"
    streams, memory = [], {}
    with contextlib.ExitStack() as stack:
        for name in args.models.split(","):  # all resident at once: their windows interleave below
            before = torch.cuda.memory_allocated() if cuda else 0
            torch.manual_seed(0)
            stream = Stream(name, build(kwargs, name, device, dtype, args.mini_batch, args.chunk), args.batch)
            weights = torch.cuda.memory_allocated() - before if cuda else 0
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            stack.enter_context(stream.gen.streaming(args.batch))
            stream.reach(min(args.frames[0], 20))
            # what this model holds at its peak: weights + state + graphs + step workspace
            peak = torch.cuda.max_memory_allocated() - before if cuda else 0
            memory[name] = (weights / 2**30, peak / 2**30) if cuda else (float("nan"), float("nan"))
            streams.append(stream)
        for mark in args.frames:
            for stream in streams:
                stream.reach(mark)
            for _ in range(args.rounds):  # round-robin windows: clock or host drift hits every model alike
                for stream in streams:
                    stream.time(mark, max(1, args.window // args.rounds))
        base = streams[0].p50_p90(args.frames[-1])[0]
        for stream in streams:
            last = stream.p50_p90(args.frames[-1])[0]
            n = ttt_layer_count(stream.lm)
            per_layer = f"{(last - base) / n:.3f}" if n else "-"
            cells = " | ".join("{:.2f} / {:.2f}".format(*stream.p50_p90(m)) for m in args.frames)
            state = streaming_state_bytes(stream.gen, stream.lm) / 2**20
            print(f"| {stream.name} | {cells} | {last / base:.3f} | {per_layer} | {state:.1f} | "
                  f"{memory[stream.name][0]:.2f} | {memory[stream.name][1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
