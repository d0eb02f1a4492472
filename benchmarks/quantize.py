"""INT8 / W8A8 / INT4 quantization of a Moshi-7B-shape TTT hybrid: step time, memory, logit error.

    python benchmarks/quantize.py                    # 7B shape, bf16, CUDA graphs (moshi's own), TTT in all 32 layers
    python benchmarks/quantize.py --compile          # + each mode with its quantized linears torch.compile'd
    python benchmarks/quantize.py --layers 24-31     # TTT in the top 8 layers only
    python benchmarks/quantize.py --tiny             # tiny config (CPU where there is no GPU): checks that it runs
    python benchmarks/quantize.py --shipped          # CPU, no timing: logit error of the shipped small hybrid
                                                     # (trained) beside a random-weight model of its config

Rows: vanilla bf16, hybrid bf16, hybrid int8, w8a8, int4 (CUDA + bf16 only), then with --compile the
same modes compiled (`quantize_weights(..., compile=True)`: the first step compiles). Every model is built
by moshi_stream.py's `build` from the same seed (same random weights, TTT gate 0.1); the quantized
rows are then quantized in place by `ttt_speech.quantize.quantize_weights` (torchao). Step time is
moshi_stream.py's `measure`: LMGen.step up to frame --frames, then p50/p90 over --window frames.
Weights: bytes of the model's tensors (quantized ones at their real size) and what the CUDA
allocator holds; peak: the most allocated while streaming. Logit error: one teacher-forced
`LMModel.forward` on a fixed random batch (4 x 32 frames), each quantized hybrid against the bf16
hybrid, over the valid positions of the text and audio logits. Needs `pip install -e ".[quant]"`.
Prints markdown table rows.
"""

from __future__ import annotations

import argparse
import gc
import os
import traceback
from importlib.metadata import version

import torch
from torch import Tensor

if not torch.cuda.is_available():
    os.environ.setdefault("NO_TORCH_COMPILE", "1")

from moshi.models import loaders  # noqa: E402
from moshi.models.lm import LMModel  # noqa: E402
from moshi_stream import Stream, build  # noqa: E402  (this directory: the same models and timing)

from ttt_speech.moshi import convert, load_hybrid  # noqa: E402
from ttt_speech.moshi.config import lm_kwargs  # noqa: E402
from ttt_speech.moshi.files import SHIPPED_DIR  # noqa: E402
from ttt_speech.moshi.tiny import tiny_lm_config  # noqa: E402
from ttt_speech.quantize import MODES, format_bytes, quantize_weights, torchao_quantization, weight_bytes  # noqa: E402

LOGIT_BATCH, LOGIT_FRAMES = 4, 32  # two TTT mini-batches of 16 frames per sequence


def random_codes(lm: LMModel, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, lm.card, (LOGIT_BATCH, lm.num_codebooks, LOGIT_FRAMES), generator=g)
    codes[:, 0] = torch.randint(0, lm.text_card, (LOGIT_BATCH, LOGIT_FRAMES), generator=g)
    return codes.to(lm.device)


@torch.no_grad()
def teacher_forced_logits(lm: LMModel, codes: Tensor) -> list[Tensor]:
    """[positions, vocab] text and audio logits of one forward, at the positions that have a prediction."""
    out = lm(codes)
    parts = []
    for x in (out.text_logits, out.logits):
        x = x.reshape(-1, x.shape[-1]).float()
        parts.append(x[x.isfinite().all(-1)])  # LMModel.forward fills positions a delay leaves empty with NaN
    return parts


def logit_error(ref: list[Tensor], got: list[Tensor]) -> tuple[float, float, float]:
    """(max |Δ|, ‖Δ‖ / ‖ref‖, fraction of positions with the same argmax) over all parts."""
    deltas = [g - r for r, g in zip(ref, got, strict=True)]
    max_abs = max(float(d.abs().max()) for d in deltas)
    rel = (sum(float(d.square().sum()) for d in deltas) / sum(float(r.square().sum()) for r in ref)) ** 0.5
    same = sum(int((g.argmax(-1) == r.argmax(-1)).sum()) for r, g in zip(ref, got, strict=True))
    return max_abs, rel, same / sum(r.shape[0] for r in ref)


def measure(lm: LMModel, frame: int, window: int, batch: int) -> tuple[float, float]:
    """(p50, p90) ms of LMGen.step over `window` frames from frame `frame` (moshi_stream.py's timing)."""
    stream = Stream("model", lm, batch)
    with stream.gen.streaming(batch):
        stream.reach(frame)
        stream.time(frame, window)
    return stream.p50_p90(frame)


@torch.no_grad()
def shipped_errors(modes: list[str]) -> None:
    """Logit error of each mode on the shipped (trained) small hybrid and on a random-weight model of the same
    config and TTT layers (moshi's initialisation, seed 0), fp32 on the CPU, the same random input codes."""
    shipped = load_hybrid(SHIPPED_DIR, dtype=torch.float32)
    spec, raw = shipped.memory_spec, shipped.moshi_config

    def fresh(trained: bool) -> LMModel:
        if trained:
            return load_hybrid(SHIPPED_DIR, dtype=torch.float32)
        torch.manual_seed(0)
        lm = loaders.get_moshi_lm(None, lm_kwargs=lm_kwargs(raw), device="cpu", dtype=torch.float32)
        return convert(lm, spec.layers, spec.mode, spec.config, moshi_config=raw).eval()

    print(f"shipped small hybrid ({SHIPPED_DIR.name}: {sum(p.numel() for p in shipped.parameters()) / 1e6:.1f}M "
          f"parameters, TTT layers {list(spec.layers)}), fp32 on the CPU, logit error vs its fp32 self on "
          f"{LOGIT_BATCH} x {LOGIT_FRAMES} random frames")
    row("weights", "mode", "max abs Δ logits", "rel Δ logits", "same argmax")
    print("|---" * 5 + "|")
    for trained in (True, False):
        codes = random_codes(fresh(trained))
        ref = teacher_forced_logits(fresh(trained), codes)
        for mode in modes:
            lm = fresh(trained)
            quantize_weights(lm, mode)  # type: ignore[arg-type]
            error = logit_error(ref, teacher_forced_logits(lm, codes))
            row("shipped (trained)" if trained else "random, same config", mode, *(f"{x:.4f}" for x in error))


def row(*cells: str) -> None:
    print("| " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny config (CPU check)")
    p.add_argument("--layers", default="all", help="TTT layers of the hybrid: all, or A-B (default: all)")
    p.add_argument("--frames", type=int, default=100, help="frame at which the timed window starts")
    p.add_argument("--window", type=int, default=50, help="frames timed")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--mini-batch", type=int, default=16)
    p.add_argument("--modes", default=",".join(MODES), help=f"quantized rows, comma list of {','.join(MODES)}")
    p.add_argument("--group-size", type=int, help="int4 group size (default 128; 32 with --tiny)")
    p.add_argument("--compile", action="store_true", help="also each mode with its quantized linears compiled")
    p.add_argument("--shipped", action="store_true",
                   help="only the logit error of the shipped small hybrid vs a random-weight twin (CPU)")
    args = p.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if not set(modes) <= set(MODES):
        p.error(f"--modes: choose from {MODES}")
    torchao_quantization()  # fail now, with the install hint, if torchao is missing
    if args.shipped:
        torch.set_num_threads(min(2, torch.get_num_threads()))
        return shipped_errors([m for m in modes if m != "int4"])  # int4: CUDA only
    group_size = args.group_size or (32 if args.tiny else 128)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    kwargs = tiny_lm_config() if args.tiny else dict(loaders._lm_kwargs)
    dtype_name = str(dtype).removeprefix("torch.")
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, torchao "
          f"{version('torchao')}, {'tiny' if args.tiny else 'Moshi-7B'} shape, {dtype_name}, batch {args.batch}, "
          f"hybrid TTT layers {args.layers}, int4 group {group_size}, step time from frame {args.frames} over "
          f"{args.window} frames, logit error vs hybrid {dtype_name} on {LOGIT_BATCH} x {LOGIT_FRAMES} frames")
    row("model", "p50 / p90 ms", "p50 vs vanilla", "p50 vs hybrid", "weight tensors", "allocated",
        "peak while streaming", "max abs Δ logits", "rel Δ logits", "same argmax")
    print("|---" * 10 + "|")
    models = [("vanilla", "none", None, False), ("hybrid", args.layers, None, False)]
    models += [("hybrid", args.layers, m, c) for c in ([False, True] if args.compile else [False]) for m in modes]
    times: dict[str, float] = {}
    ref: list[Tensor] = []
    for kind, layers, mode, compiled in models:
        name = f"{kind} {mode or dtype_name}{' compiled' if compiled else ''}"
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated() if cuda else 0  # what earlier models' graphs still hold
        torch.manual_seed(0)
        lm = build(kwargs, layers, device, dtype, args.mini_batch)
        try:
            if mode is not None:
                quantize_weights(lm, mode, group_size=group_size, compile=compiled)
            allocated = format_bytes(torch.cuda.memory_allocated() - before) if cuda else "n/a"
            logits = teacher_forced_logits(lm, random_codes(lm))
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            p50, p90 = measure(lm, args.frames, args.window, args.batch)
        except Exception as e:  # a mode this stack cannot run (int4 off CUDA, ...) is a result, not the end
            if mode is None:
                raise
            if not isinstance(e, ValueError):  # ValueError: refused by quantize_weights, which says why
                traceback.print_exc()
            row(name, f"failed: {type(e).__name__}: {str(e).splitlines()[0]}", *[""] * 8)
            del lm
            continue
        peak = format_bytes(torch.cuda.max_memory_allocated() - before) if cuda else "n/a"
        times.setdefault(kind, p50)
        if kind == "hybrid" and mode is None:
            ref = logits
        error = ["", "", ""] if kind == "vanilla" else [f"{x:.4f}" for x in logit_error(ref, logits)]
        row(name, f"{p50:.2f} / {p90:.2f}", f"{p50 / times['vanilla']:.3f}",
            f"{p50 / times['hybrid']:.3f}" if "hybrid" in times else "", format_bytes(weight_bytes(lm)), allocated, peak,
            *error)
        del lm, logits


if __name__ == "__main__":
    main()
