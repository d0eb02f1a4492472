"""INT8 / W8A8 / INT4 quantization of a Moshi-7B-shape TTT hybrid: step time, memory, logit error.

    python benchmarks/quantize.py                      # 7B shape, bf16, CUDA graphs (moshi's own), TTT in all 32 layers
    python benchmarks/quantize.py --rows bf16,int8+compile,w8a8+compile --batches 1,64 --seconds 500
    python benchmarks/quantize.py --layers 24-31       # TTT in the top 8 layers only
    python benchmarks/quantize.py --tiny               # tiny config (CPU where there is no GPU): checks that it runs
    python benchmarks/quantize.py --shipped            # CPU, no timing: logit error of the shipped small hybrid
                                                       # (trained) beside a random-weight model of its config

Rows (`--rows`, in the order given): vanilla, the bf16 hybrid, and the hybrid quantized int8 / int8pack /
int8triton (CUDA: our Triton int8 kernel, autotuned in its first step; a CPU run prints its refusal as its row) /
w8a8 / int4 (CUDA + bf16 only), each eager or with `+compile` (`quantize_weights(..., compile=True)`: its
first step compiles; `+autotune`: compile mode "max-autotune-no-cudagraphs"; not for int8triton). Each row runs in a process of its own (this script again, `--child`): a failed CUDA
graph capture leaves the CUDA context unusable, and on the H200 one such row kept every later row from
building its model. Each model is built once, by moshi_stream.py's `build` from the same seed (same random
weights, TTT gate 0.1), quantized in place by `ttt_speech.quantize.quantize_weights` (torchao), then timed at
every batch of `--batches` (a row each; ratios against the bf16 hybrid at the same batch, so put bf16 first:
its process leaves its step times and logits in a folder the later rows read), then its logit error (a row
of its own, after the timing: a compiled model compiles the teacher-forced shapes too). Step time is moshi_stream.py's `measure`: LMGen.step up to frame --frames (the seconds this
takes are printed: eager first step, CUDA graph capture, compilation), then p50/p90 over --window frames.
Weights: bytes of the model's tensors (quantized ones at their real size) and what the CUDA allocator holds
after the build; peak: the most allocated while streaming. Logit error: one teacher-forced `LMModel.forward`
on a fixed random batch (4 x 32 frames) against the bf16 hybrid, over the valid positions of the text and
audio logits. `--seconds`: nothing new starts after the budget, and a SIGINT ends the run with the rows so
far printed and the rest named (recipes/quant21/device.sh relies on both). Needs `pip install -e ".[quant]"`.
Prints markdown table rows.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import torch
from torch import Tensor

if not torch.cuda.is_available():
    os.environ.setdefault("NO_TORCH_COMPILE", "1")

from moshi.models import loaders  # noqa: E402
from moshi.models.lm import LMModel  # noqa: E402
from moshi_stream import Stream, build, lm_config  # noqa: E402  (this directory: the same models and timing)

from ttt_speech.moshi import convert, load_hybrid  # noqa: E402
from ttt_speech.moshi.config import lm_kwargs  # noqa: E402
from ttt_speech.moshi.files import SHIPPED_DIR  # noqa: E402
from ttt_speech.ops.int8.naive import int8_digits_naive, int8_mm_digits_naive  # noqa: E402
from ttt_speech.quantize import (MODES, format_bytes, int4_round_trip, linear_layers, quantize_weights,  # noqa: E402
                                 route_gatings, route_linears, torchao_quantization, weight_bytes)

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
    got = [g.to(r.device) for r, g in zip(ref, got, strict=True)]  # the reference comes back from disk on the CPU
    deltas = [g - r for r, g in zip(ref, got, strict=True)]
    max_abs = max(float(d.abs().max()) for d in deltas)
    rel = (sum(float(d.square().sum()) for d in deltas) / sum(float(r.square().sum()) for r in ref)) ** 0.5
    same = sum(int((g.argmax(-1) == r.argmax(-1)).sum()) for r, g in zip(ref, got, strict=True))
    return max_abs, rel, same / sum(r.shape[0] for r in ref)


def measure(lm: LMModel, frame: int, window: int, batch: int) -> tuple[float, float, float]:
    """(p50, p90) ms of LMGen.step over `window` frames from frame `frame` (moshi_stream.py's timing), and the
    seconds to reach `frame`: the eager first step, CUDA graph capture and, for compiled rows, compilation."""
    stream = Stream("model", lm, batch)
    with stream.gen.streaming(batch):
        t0 = time.perf_counter()
        stream.reach(frame)
        warm = time.perf_counter() - t0
        stream.time(frame, window)
    return *stream.p50_p90(frame), warm


@dataclass(frozen=True)
class Row:
    """One model of the table: vanilla, the bf16 (on the CPU fp32) hybrid, or the hybrid quantized by `mode`."""

    kind: str  # "vanilla" or "hybrid"
    mode: str | None = None
    compiled: bool | str = False  # quantize_weights' compile: True, or a torch.compile mode

    @staticmethod
    def parse(spec: str) -> Row:
        """vanilla, bf16 (the unquantized hybrid), or MODE[+compile | +autotune]."""
        if spec in ("vanilla", "bf16"):
            return Row("vanilla" if spec == "vanilla" else "hybrid")
        mode, plus, extra = spec.partition("+")
        if mode not in MODES or (plus and extra not in COMPILE_ROWS):
            raise ValueError(f"row {spec!r}: use vanilla, bf16, or one of {', '.join(MODES)} with optional "
                             f"{' or '.join('+' + k for k in COMPILE_ROWS)}")
        return Row("hybrid", mode, COMPILE_ROWS[extra] if plus else False)

    def name(self, dtype_name: str) -> str:
        compiled = {False: "", True: " compiled"}.get(self.compiled, f" compiled {self.compiled}")
        return f"{self.kind} {self.mode or dtype_name}{compiled}"


# +compile: torch.compile's default mode; +autotune: inductor also tries its Triton matmul templates (a cast of the
# int8 weight fused into them as a prologue: what replaced its int8 "mixed mm"), without its own CUDA graphs
COMPILE_ROWS: dict[str, bool | str] = {"compile": True, "autotune": "max-autotune-no-cudagraphs"}


def digits_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """int8triton's "digits" route in torch (x's two int8 digits against mode int8's codes): its logit error here."""
    rows = x.reshape(-1, x.shape[-1])
    y = int8_mm_digits_naive(*int8_digits_naive(rows), weight.qdata, weight.scale, bias, x.dtype)
    return y.reshape(*x.shape[:-1], -1)


@torch.no_grad()
def shipped_errors(modes: list[str], group_size: int) -> None:
    """Logit error of each mode on the shipped (trained) small hybrid and on a random-weight model of the same
    config and TTT layers (moshi's initialisation, seed 0), fp32 on the CPU, the same random input codes. int4's
    kernel is CUDA-only: here its rounding (`int4_round_trip`, held equal to the kernel by a GPU test) is applied
    to the weights of the linears whose in_features `group_size` divides, and the matmuls run in fp32."""
    shipped = load_hybrid(SHIPPED_DIR, dtype=torch.float32)
    spec, raw = shipped.memory_spec, shipped.moshi_config

    def fresh(trained: bool) -> LMModel:
        if trained:
            return load_hybrid(SHIPPED_DIR, dtype=torch.float32)
        torch.manual_seed(0)
        lm = loaders.get_moshi_lm(None, lm_kwargs=lm_kwargs(raw), device="cpu", dtype=torch.float32)
        return convert(lm, spec.layers, spec.mode, spec.config, moshi_config=raw).eval()

    def quantized(trained: bool, mode: str) -> tuple[LMModel, str]:
        lm = fresh(trained)
        if mode == "int8triton":
            linears = list(linear_layers(lm).values())
            quantize_weights(lm, "int8")
            route_linears(linears, digits_linear)
            route_gatings(lm, linears)
            return lm, "int8triton, x in two int8 digits (its reference in torch)"
        if mode != "int4":
            quantize_weights(lm, mode)  # type: ignore[arg-type]
            return lm, mode
        linears = linear_layers(lm).values()
        chosen = [m for m in linears if m.in_features % group_size == 0]
        for m in chosen:
            m.weight.data = int4_round_trip(m.weight, group_size)
        return lm, f"int4 (g{group_size}, rounding on the CPU; {len(linears) - len(chosen)} of {len(linears)} " \
                   "linears not divisible, left fp32)"

    print(f"shipped small hybrid ({SHIPPED_DIR.name}: {sum(p.numel() for p in shipped.parameters()) / 1e6:.1f}M "
          f"parameters, {spec.branch} memory in layers {list(spec.layers)}), fp32 on the CPU, logit error vs its "
          f"fp32 self on {LOGIT_BATCH} x {LOGIT_FRAMES} random frames")
    row("weights", "mode", "max abs Δ logits", "rel Δ logits", "same argmax")
    print("|---" * 5 + "|")
    for trained in (True, False):
        codes = random_codes(fresh(trained))
        ref = teacher_forced_logits(fresh(trained), codes)
        for mode in modes:
            lm, name = quantized(trained, mode)
            error = logit_error(ref, teacher_forced_logits(lm, codes))
            row("shipped (trained)" if trained else "random, same config", name, *(f"{x:.4f}" for x in error))


def row(*cells: str) -> None:
    print("| " + " | ".join(cells) + " |", flush=True)


DEFAULT_ROWS = "vanilla,bf16,int8triton,int8,int8pack,w8a8,int4,int8+compile,w8a8+compile,int4+compile"


@dataclass
class Reference:
    """What the bf16 hybrid's row leaves for the later rows, each in its own process: its p50 per batch (the
    ratios' reference) and its logits (the logit errors' reference), in `folder`."""

    folder: Path
    times: dict[int, float] = field(default_factory=dict)
    logits: list[Tensor] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.folder / "bf16_hybrid.pt"

    @classmethod
    def load(cls, folder: Path) -> Reference:
        empty = cls(folder)
        return cls(folder, **torch.load(empty.path)) if empty.path.exists() else empty

    def save(self) -> None:
        torch.save({"times": self.times, "logits": [x.cpu() for x in self.logits]}, self.path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny config (CPU check)")
    p.add_argument("--layers", default="all", help="TTT layers of the hybrid: all, or A-B (default: all)")
    p.add_argument("--frames", type=int, default=100, help="frame at which the timed window starts")
    p.add_argument("--window", type=int, default=50, help="frames timed")
    p.add_argument("--batches", default="1", help="comma list of batch sizes, each timed on every model")
    p.add_argument("--mini-batch", type=int, default=16)
    p.add_argument("--rows", default=DEFAULT_ROWS,
                   help="models in the order built: vanilla, bf16 (the unquantized hybrid, the ratios' and logit "
                        f"errors' reference), MODE or MODE+compile with MODE in {','.join(MODES)} "
                        f"(default {DEFAULT_ROWS})")
    p.add_argument("--group-size", type=int, help="int4 group size (default 128; 32 with --tiny, 64 with --shipped)")
    p.add_argument("--logits", choices=("all", "eager"), default="all",
                   help="eager: no logit pass for compiled rows (it compiles the teacher-forced shapes, ~as long as "
                        "a batch's warm-up; the eager row of the same mode measures the quantization's error)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend of +compile rows (aot_eager: a "
                   "quick CPU check of the path)")
    p.add_argument("--seconds", type=float, default=float("inf"),
                   help="time budget: nothing new starts after it (a SIGINT also ends the run, rows so far printed)")
    p.add_argument("--shipped", action="store_true",
                   help="only the logit error of the shipped small hybrid vs a random-weight twin (CPU; the "
                        "eager modes of --rows, int4 as its rounding, int8triton left out: int8's weights)")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # run the one row of --rows here; the reference's folder
    args = p.parse_args()
    specs = [spec for spec in args.rows.split(",") if spec]
    try:
        rows = [Row.parse(spec) for spec in specs]
        batches = [int(b) for b in args.batches.split(",") if b]
    except ValueError as e:
        p.error(f"--rows / --batches: {e}")
    torchao_quantization()  # fail now, with the install hint, if torchao is missing
    if args.shipped:
        torch.set_num_threads(min(2, torch.get_num_threads()))
        # int8triton is CUDA-only: its row is its least exact route (x in two digits) in torch, on int8's weights
        return shipped_errors([r.mode for r in rows if r.mode and not r.compiled],
                              args.group_size or 64)
    group_size = args.group_size or (32 if args.tiny else 128)
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.child is not None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # cut: this process just ends; its finished rows are out
        kwargs = lm_config(args.tiny)
        run_row(rows[0], args, kwargs, "cuda" if cuda else "cpu", dtype, group_size, batches,
                Reference.load(args.child), time.perf_counter())
        return
    dtype_name = str(dtype).removeprefix("torch.")
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, torchao "
          f"{version('torchao')}, {'tiny' if args.tiny else 'Moshi-7B'} shape, {dtype_name}, batches {batches}, "
          f"hybrid TTT layers {args.layers}, int4 group {group_size}, step time from frame {args.frames} over "
          f"{args.window} frames, ratios vs the hybrid {dtype_name} at the same batch, logit error vs it on "
          f"{LOGIT_BATCH} x {LOGIT_FRAMES} frames (its own line per model, after the timing; {args.logits} rows), compile "
          f"backend {args.backend}, each row in its own process")
    row("model", "batch", "p50 / p90 ms", "p50 vs hybrid", "weight tensors", "allocated", "peak while streaming",
        "build + quantize s", "to frame s", "max abs Δ logits", "rel Δ logits", "same argmax")
    print("|---" * 12 + "|", flush=True)
    start = time.perf_counter()
    done = 0  # rows started
    with tempfile.TemporaryDirectory(prefix="quantize-") as folder:
        try:
            while done < len(rows) and time.perf_counter() - start < args.seconds:
                done += 1
                run_child(rows[done - 1], specs[done - 1], folder,
                          args.seconds - (time.perf_counter() - start), dtype_name)
        except KeyboardInterrupt:
            print(f"cut by SIGINT after {time.perf_counter() - start:.0f} s, in {rows[done - 1].name(dtype_name)}",
                  flush=True)
    if done < len(rows):
        print(f"not run (time budget): {', '.join(r.name(dtype_name) for r in rows[done:])}", flush=True)


def run_child(spec: Row, text: str, folder: str, seconds: float, dtype_name: str) -> None:
    """This script again, for the one row `text`, in a new process that prints to our stdout; a SIGINT here is
    passed on. A process that dies without printing its failure (a crash, an abort) gets a failed row here."""
    child = subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--rows", text, "--seconds", str(seconds),
                              "--child", folder])
    try:
        code = child.wait()
    except KeyboardInterrupt:
        child.send_signal(signal.SIGINT)
        child.wait()
        raise
    if code != 0:
        row(spec.name(dtype_name), "", f"failed: its process exited with code {code} (output above)", *[""] * 9)


def run_row(spec: Row, args: argparse.Namespace, kwargs: dict, device: str, dtype: torch.dtype, group_size: int,
            batches: list[int], ref: Reference, start: float) -> None:
    """Build one model, time it at every batch (a row each), then its logit error; the unquantized hybrid
    saves its step times and logits as the reference of the rows after it."""
    cuda = device == "cuda"
    name = spec.name(str(dtype).removeprefix("torch."))
    is_reference = spec == Row("hybrid")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    lm = build(kwargs, "none" if spec.kind == "vanilla" else args.layers, device, dtype, args.mini_batch)
    try:
        if spec.mode is not None:
            quantize_weights(lm, spec.mode, group_size=group_size, compile=spec.compiled,  # type: ignore[arg-type]
                             backend=args.backend)
    except Exception as e:  # a mode this stack cannot run (int4 off CUDA, ...) is a result, not the end
        failed(name, e)
        return
    setup = f"{time.perf_counter() - t0:.1f}"
    allocated = format_bytes(torch.cuda.memory_allocated()) if cuda else "n/a"
    for batch in batches:
        if time.perf_counter() - start >= args.seconds:
            row(name, str(batch), "not run: time budget", *[""] * 9)
            continue
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            p50, p90, warm = measure(lm, args.frames, args.window, batch)
        except Exception as e:  # out of memory at a large batch, a kernel refusing a shape: the next batch runs
            failed(name, e, str(batch))
            continue
        peak = format_bytes(torch.cuda.max_memory_allocated()) if cuda else "n/a"
        if is_reference:
            ref.times[batch] = p50
            ref.save()
        times = ref.times
        row(name, str(batch), f"{p50:.2f} / {p90:.2f}", f"{p50 / times[batch]:.3f}" if batch in times else "",
            format_bytes(weight_bytes(lm)), allocated, peak, setup, f"{warm:.1f}", "", "", "")
        setup = ""
    if (spec.kind == "vanilla" or (spec.compiled and args.logits == "eager")
            or time.perf_counter() - start >= args.seconds):
        return
    logits = teacher_forced_logits(lm, random_codes(lm))
    if is_reference:
        ref.logits = logits
        ref.save()
        return
    error = [f"{x:.4f}" for x in logit_error(ref.logits, logits)] if ref.logits else ["no bf16 row"] * 3
    row(name, "logits", *[""] * 7, *error)


def failed(name: str, e: Exception, batch: str = "") -> None:
    if not isinstance(e, ValueError):  # ValueError: refused by quantize_weights, which says why
        traceback.print_exc()
    row(name, batch, f"failed: {type(e).__name__}: {str(e).splitlines()[0]}", *[""] * 9)


if __name__ == "__main__":
    main()
