"""Our Triton weight-only int8 matmul equals its fp32 reference (on CUDA, or in Triton's CPU interpreter).

Shapes are drawn by hypothesis: M from 0 to 70 rows (every kernel and config, all three row buckets, rows past a
tile, row tiles smaller than the bucket), N and K not multiples of any block, with and without bias, x contiguous, transposed, column-strided or with leading dims,
every autotune config. Tolerances: fp32 up to fp32 summation order; fp16 / bf16 up to one rounding of the output
(the reference rounds the same fp32 sum once: the two may land one unit in the last place apart). Through the
quantize path, a stack of linears and the tiny Moshi TTT hybrid in mode int8triton equal them in mode int8.
Triton 3.6's interpreter casts int8 to bf16 as raw bits and multiplies bf16 wrongly, so on the CPU the
half-precision path is checked in fp16 (same kernel code, 10 mantissa bits instead of 7); bf16 runs on CUDA.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import typing as tp
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

triton = pytest.importorskip("triton")

# |got - want| <= RTOL * |want| + ATOL, per dtype: fp32 summation order (measured <= ~2e-6 at |y| ~ 1 below);
# a half-precision output is one unit in the last place (2^-10 of |y| for fp16, 2^-7 for bf16) away at most
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (2**-10, 1e-4), torch.bfloat16: (2**-7, 1e-3)}


def operands(m: int, n: int, k: int, dtype: torch.dtype, layout: str, bias: bool, device: str,
             seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x [.., m, k] in `layout`, codes int8 [n, k] over the whole range, per-channel scales that make |y| ~ 1."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    scale = (torch.rand(n, 1, generator=g) + 0.5) / (74 * k**0.5)  # torchao's [N, 1] fp32; 74: rms of a code
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    if layout == "transposed":  # column-major rows: stride (1, m)
        x = torch.randn(k, m, generator=g).t()
    elif layout == "strided":  # every other column of a wider tensor
        x = torch.randn(m, 2 * k, generator=g)[:, ::2]
    elif layout == "leading":  # [2, m, k] (2m rows)
        x = torch.randn(2, m, k, generator=g)
    else:
        x = torch.randn(m, k, generator=g)
    return (x.to(device, dtype), codes.to(device), scale.to(device), None if b is None else b.to(device))


def check(m: int, n: int, k: int, dtype: torch.dtype, layout: str, bias: bool, kernel: str | None,
          config: int | None, device: str, seed: int = 0) -> float:
    """The kernel against `int8_mm_naive`; returns the max abs difference."""
    from ttt_speech.ops.int8 import int8_mm_naive
    from ttt_speech.ops.int8.triton_mm import int8_mm_triton

    x, codes, scale, b = operands(m, n, k, dtype, layout, bias, device, seed)
    want = int8_mm_naive(x, codes, scale, b)
    got = int8_mm_triton(x, codes, scale, b, kernel=kernel, config=config)  # type: ignore[arg-type]
    assert got.shape == (*x.shape[:-1], n) and got.dtype == dtype
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol)
    global largest
    largest = max(largest, float(want.float().abs().max()) if want.numel() else 0.0)
    return float((got.float() - want.float()).abs().max()) if got.numel() else 0.0


LAYOUTS = ("contiguous", "transposed", "strided", "leading")
worst: dict[str, float] = {}  # max abs difference per dtype, over the interpreted examples
covered: dict[str, int] = {}  # examples per kernel ("dot 16": the tensor-core kernel with 16-row tiles)
largest = 0.0  # max |y| of the reference


@settings(max_examples=150, deadline=None, derandomize=True)
@example(m=20, n=40, k=300, dtype=torch.float32, layout="strided", bias=True, which="auto", config=1, seed=1)
@example(m=32, n=17, k=512, dtype=torch.float16, layout="transposed", bias=False, which="auto", config=4, seed=2)
@example(m=40, n=130, k=700, dtype=torch.float32, layout="transposed", bias=True, which="dot", config=5, seed=5)
@example(m=1, n=70, k=256, dtype=torch.float16, layout="contiguous", bias=False, which="auto", config=5, seed=6)
@example(m=3, n=45, k=1100, dtype=torch.float16, layout="leading", bias=True, which="gemv", config=2, seed=3)
@example(m=1, n=9, k=2048, dtype=torch.float32, layout="strided", bias=False, which="gemv", config=3, seed=4)
@example(m=64, n=70, k=1000, dtype=torch.float16, layout="contiguous", bias=True, which="splitk", config=5, seed=7)
@example(m=5, n=33, k=40, dtype=torch.float32, layout="leading", bias=True, which="splitk", config=4, seed=8)
@example(m=64, n=100, k=600, dtype=torch.float16, layout="transposed", bias=True, which="dot", config=7, seed=9)
@example(m=45, n=70, k=256, dtype=torch.float32, layout="contiguous", bias=False, which="dot", config=8, seed=10)
@example(m=24, n=50, k=520, dtype=torch.float16, layout="strided", bias=True, which="splitk", config=1, seed=11)
@given(m=st.one_of(st.sampled_from([0, 1, 2, 16, 17, 20, 32, 33, 64, 65]), st.integers(0, 70)),
       n=st.integers(1, 150), k=st.one_of(st.sampled_from([128, 256, 512, 1024]), st.integers(1, 1100)),
       dtype=st.sampled_from([torch.float32, torch.float16]), layout=st.sampled_from(LAYOUTS),
       bias=st.booleans(), which=st.sampled_from(["auto", "gemv", "dot", "splitk"]), config=st.integers(0, 8),
       seed=st.integers(0, 2**16))
def interpreted(m: int, n: int, k: int, dtype: torch.dtype, layout: str, bias: bool, which: str, config: int,
                seed: int) -> None:
    """Run by the test below in a subprocess under TRITON_INTERPRET=1 (small shapes: it runs in Python)."""
    from ttt_speech.ops.int8.triton_mm import DOT_CONFIGS, GEMV_CONFIGS, SPLITK_CONFIGS, block_m

    kernel = None if which == "auto" else which
    if kernel == "gemv":
        m = min(m, 3)  # the GEMV interprets one program per row: keep it quick
    rows = m * (2 if layout == "leading" else 1)
    chosen = kernel or "dot"  # untimed (the interpreter), the choice is the tile kernel
    configs = {"gemv": GEMV_CONFIGS, "dot": DOT_CONFIGS, "splitk": SPLITK_CONFIGS}[chosen]
    err = check(m, n, k, dtype, layout, bias, kernel, config % len(configs), "cpu", seed)
    name = "gemv" if chosen == "gemv" else f"{chosen} {block_m(rows)}"
    covered[name] = covered.get(name, 0) + (rows > 0)
    worst[str(dtype)] = max(worst.get(str(dtype), 0.0), err)


digit_examples: list[tuple[float, float]] = []  # (fraction of digits equal, max abs difference) per example


@settings(max_examples=40, deadline=None, derandomize=True)
@example(m=64, n=40, k=1100, bias=True, kernel="digits", config=0, seed=1)
@example(m=17, n=70, k=256, bias=False, kernel="digits", config=6, seed=2)
@example(m=40, n=130, k=700, bias=True, kernel="digitsk", config=1, seed=3)
@example(m=5, n=33, k=40, bias=True, kernel="digitsk", config=5, seed=4)
@example(m=70, n=150, k=1024, bias=True, kernel="digitsk", config=6, seed=5)  # 2 x 3 tiles, each split's sums meet
@given(m=st.one_of(st.sampled_from([0, 1, 16, 17, 33, 64]), st.integers(0, 70)), n=st.integers(1, 150),
       k=st.one_of(st.sampled_from([256, 512]), st.integers(1, 1100)), bias=st.booleans(),
       kernel=st.sampled_from(["digits", "digitsk"]), config=st.integers(0, 6), seed=st.integers(0, 2**16))
def interpreted_digits(m: int, n: int, k: int, bias: bool, kernel: str, config: int, seed: int) -> None:
    """The digits routes in fp16 under the interpreter (see `check_digits`), every config, all row buckets."""
    from ttt_speech.ops.int8.triton_mm import _RAW, block_m

    digit_examples.append(check_digits(m, n, k, torch.float16, bias, kernel, config % len(_RAW[kernel][1]), "cpu",
                                       seed))
    covered[f"{kernel} {block_m(m)}"] = covered.get(f"{kernel} {block_m(m)}", 0) + (m > 0)


def routed_equals_int8(device: str, dtype: torch.dtype, widths: tuple[int, ...], rows: tuple[int, ...]) -> float:
    """A stack of Linear layers (bias on every other) quantized by mode int8triton against the same stack by mode
    int8 (same codes and scales; torchao's own matmul), on x [2, rows, in] transposed from [2, in, rows]: the max
    relative difference over `rows`. Routing, weights and strides are the quantize path's; the sums are the kernel's."""
    from torch import nn

    from ttt_speech.quantize import quantize_weights

    def stack() -> nn.Sequential:
        torch.manual_seed(0)
        layers = [nn.Linear(a, b, bias=i % 2 == 0) for i, (a, b) in enumerate(zip(widths, widths[1:]))]
        return nn.Sequential(*[m for layer in layers for m in (layer, nn.GELU())]).to(device, dtype)

    eager, routed = stack(), stack()
    assert quantize_weights(eager, "int8").summary() == quantize_weights(routed, "int8triton").summary().replace(
        "int8triton", "int8")
    assert all("forward" in vars(m) for m in routed if isinstance(m, nn.Linear))  # routed, not nn.Linear's own
    worst = 0.0
    with torch.no_grad():
        for m in rows:
            x = torch.randn(2, widths[0], m, device=device, dtype=dtype).transpose(1, 2)
            want, got = eager(x).float(), routed(x).float()
            assert got.shape == (2, m, widths[-1])
            worst = max(worst, float((got - want).abs().max() / want.abs().max()) if m else 0.0)
    return worst


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the gpu tests run the compiled kernel")
def test_int8_kernels_equal_the_reference_interpreter() -> None:
    # Triton's interpreter is chosen when kernels are defined, so it needs a fresh process
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, TRITON_INTERPRET="1", NO_TORCH_COMPILE="1", PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "max abs error vs reference" in done.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_kernels_equal_the_reference_cuda(dtype: torch.dtype) -> None:
    """Moshi-7B's shapes (attention in / out, gating in / out, the text head) at batch 1, 16 and 64, autotuned."""
    for n, k in ((12288, 4096), (4096, 4096), (22528, 4096), (4096, 11264), (32000, 4096)):
        for m in (1, 16, 64):
            check(m, n, k, dtype, "contiguous", False, None, None, "cuda", seed=m)
    check(64, 4096, 4096, dtype, "transposed", True, None, None, "cuda")


def check_digits(m: int, n: int, k: int, dtype: torch.dtype, bias: bool, kernel: str, config: int | None,
                 device: str, seed: int = 0) -> tuple[float, float]:
    """The digits route ("digits" or "digitsk", split over K): its digits kernel against `int8_digits_naive` (equal
    but for rare ties or one-unit low digits: fused multiply-adds, Triton's own float ops) and within the two
    digits' bound of x, then its int8 tensor-core kernel against `int8_mm_digits_naive` of those very digits
    (integer sums exact: only the fp32 epilogue and the output's rounding differ), and the whole against
    `int8_mm_naive` of x itself within the digits' error.
    Returns (fraction of digits equal to the reference's, max abs difference from the reference)."""
    from ttt_speech.ops.int8.naive import LO, int8_digits_naive, int8_mm_digits_naive, int8_mm_naive
    from ttt_speech.ops.int8.triton_mm import int8_digits_triton, int8_mm_triton

    x, codes, scale, b = operands(m, n, k, dtype, "contiguous", bias, device, seed)
    x[: m // 2, : k // 3] *= 40  # rows whose largest |x| is far from the rest: the low digit's job
    digits, unit = int8_digits_triton(x)
    want_digits, want_unit = int8_digits_naive(x)
    assert digits.dtype == torch.int8 and digits.shape == (2, m, k)
    torch.testing.assert_close(unit, want_unit, rtol=2**-22, atol=0)  # torch on CUDA divides by a reciprocal
    same = float((digits == want_digits).float().mean()) if x.numel() else 1.0
    def value(d: torch.Tensor) -> torch.Tensor:
        return d[0].float() + d[1].float() / LO  # x / unit; a tie may go high (-127 low) or low (+127 low): same

    assert float((value(digits) - value(want_digits)).abs().max() if x.numel() else 0) <= 1.01 / LO
    u = unit.reshape(-1, 1)
    rebuilt = u * (digits[0].float() + digits[1].float() / LO)
    assert bool(((rebuilt - x.float()).abs() <= u * (1 / (2 * LO) + 2**-14)).all())
    got = int8_mm_triton(x, codes, scale, b, kernel=kernel, config=config)  # type: ignore[arg-type]
    want = int8_mm_digits_naive(digits, unit, codes, scale, b, dtype)
    rtol, atol = TOLERANCE[dtype]
    if kernel == "digitsk":
        atol += 1e-5 * float(want.float().abs().max()) if want.numel() else 0  # fp32 partial sums in any order
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol)
    # against x itself: each |x| off by <= unit / 508, times the codes' scale (|y| ~ 1 per unit of |x|)
    exact = int8_mm_naive(x, codes, scale, b).float()
    off = (u.reshape(-1, 1) / (2 * LO)) @ (codes.float().abs() * scale.reshape(-1, 1)).sum(1, keepdim=True).t()
    assert bool(((got.float() - exact).abs() <= off + rtol * exact.abs() + atol).all())
    return same, float((got.float() - want.float()).abs().max()) if got.numel() else 0.0


@pytest.mark.gpu
def test_int8_digits_equal_their_reference_cuda() -> None:
    """The digits routes at Moshi-7B's shapes in bf16 at the serving batches, autotuned and each config forced."""
    from ttt_speech.ops.int8.triton_mm import DIGITS_CONFIGS, DIGITSK_CONFIGS

    for kernel, configs in (("digits", DIGITS_CONFIGS), ("digitsk", DIGITSK_CONFIGS)):
        for n, k in ((12288, 4096), (4096, 4096), (22528, 4096), (4096, 11264), (32000, 4096)):
            for m in (1, 16, 33, 64):
                check_digits(m, n, k, torch.bfloat16, m % 2 == 1, kernel, None, "cuda", seed=m)
        for config in range(len(configs)):
            check_digits(48, 4096, 4096, torch.bfloat16, True, kernel, config, "cuda", seed=config)


def test_an_untuned_capture_is_said_once_per_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """A graph keeps whatever launch it captured: the user hears of an untuned one, once per shape."""
    from ttt_speech.ops.int8 import triton_mm

    monkeypatch.setattr(triton_mm, "TRITON_INTERPRET", False)
    monkeypatch.setattr(triton_mm, "untuned", set())
    with pytest.warns(UserWarning, match=r"\(1000, 520, 3\) first ran inside a CUDA graph capture"):
        triton_mm._capture_untuned((1000, 520, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        triton_mm._capture_untuned((1000, 520, 3))  # said already
    assert triton_mm.untuned == {(1000, 520, 3)}


@pytest.mark.gpu
def test_a_shape_first_met_inside_a_cuda_graph_capture_runs_untuned() -> None:
    """Autotuning would time kernels on the capturing stream and break the capture: a new shape runs config 0."""
    from ttt_speech.ops.int8 import int8_mm_naive
    from ttt_speech.ops.int8.triton_mm import int8_mm_triton

    x, codes, scale, _ = operands(3, 1000, 520, torch.bfloat16, "contiguous", False, "cuda", seed=5)
    graph = torch.cuda.CUDAGraph()
    with pytest.warns(UserWarning, match="inside a CUDA graph capture"), torch.cuda.graph(graph):
        y = int8_mm_triton(x, codes, scale)
    x.copy_(torch.randn_like(x))
    graph.replay()
    want = int8_mm_naive(x, codes, scale)
    torch.testing.assert_close(y.float(), want.float(), rtol=TOLERANCE[torch.bfloat16][0], atol=1e-3)


@pytest.mark.gpu
def test_int8triton_model_equals_int8_cuda() -> None:
    """Moshi-7B's gating widths in bf16: the routed stack against torchao's int8, up to bf16 rounding (torchao
    rounds each product sum to bf16 before scaling; both use the same codes)."""
    pytest.importorskip("torchao")
    assert routed_equals_int8("cuda", torch.bfloat16, (4096, 11264, 4096), (1, 16, 64)) < 0.02


def tiny_hybrid_logits_delta() -> float:
    """The tiny Moshi TTT hybrid (fp32) quantized int8triton against int8: max |delta| of the logits of one
    teacher-forced pass (every linear routed, moshi's gatings included: tests/test_quantize.py counts them)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from helpers.moshi import random_codes

    from ttt_speech.moshi.tiny import build_tiny_hybrid
    from ttt_speech.quantize import quantize_weights

    eager, routed = build_tiny_hybrid(0), build_tiny_hybrid(0)
    codes = random_codes(eager, 2, 8, seed=1)
    quantize_weights(eager, "int8")
    quantize_weights(routed, "int8triton")
    with torch.no_grad():
        want, got = eager(codes), routed(codes)
    pairs = ((got.logits, want.logits), (got.text_logits, want.text_logits))
    return max(float((g - w)[w.isfinite()].abs().max()) for g, w in pairs)  # NaN: positions a delay leaves empty


def autotuned_launch() -> tuple[dict[str, list[tuple]], dict[tuple, str]]:
    """The timed launch path (what CUDA runs), on the CPU: the interpreter's untimed default lifted and Triton's
    timer replaced by one that runs the kernel once and reports ever shorter times, returned the way Triton's own
    `do_bench` returns them (its `_summarize_statistics`: a float for one quantile or a return mode, a list for
    several: the race once indexed a float, on the H200 2026-12-02). Every config then runs through the
    autotuners' own plumbing (heuristics, the row tile in the key) and must still equal the reference; at one row
    the three exact autotuned kernels are raced (at 20 rows the two tile kernels, in fp16 the digits route too),
    the last-timed one wins. Returns the
    autotuners' keys and the races."""
    import triton.testing

    from ttt_speech.ops.int8 import triton_mm

    timings = iter(range(100, 0, -1))

    def one_run(fn: tp.Callable[[], None], warmup: int = 25, rep: int = 100, grad_to_none: tp.Any = None,
                quantiles: tp.Sequence[float] | None = None, return_mode: str = "mean") -> tp.Any:
        fn()
        return triton.testing._summarize_statistics([float(next(timings))], quantiles, return_mode)

    saved = triton.testing.do_bench
    triton_mm.TRITON_INTERPRET, triton.testing.do_bench = False, one_run
    try:
        check(1, 70, 300, torch.float32, "contiguous", True, None, None, "cpu")  # gemv, tiles, split (row tile 16)
        check(20, 70, 300, torch.float32, "contiguous", True, None, None, "cpu")  # tiles vs split (row tile 32)
        check(20, 70, 300, torch.float16, "contiguous", True, None, None, "cpu")  # half precision: digits too
    finally:
        triton_mm.TRITON_INTERPRET, triton.testing.do_bench = True, saved
    assert all(t.best_config is t.configs[-1] for t in triton_mm._TUNED.values())  # the fastest timed config
    kernel, config = triton_mm.settled(70, 300, 1, torch.float32, torch.float32)
    assert kernel == "splitk" and config is triton_mm.SPLITK_CONFIGS[-1]  # what the race and the autotuner settled
    return {name: list(t.cache) for name, t in triton_mm._TUNED.items()}, dict(triton_mm._faster)


if __name__ == "__main__":
    keys, races = autotuned_launch()
    print("autotuned launch keys:", keys, "kernel races:", races)
    f32 = torch.float32
    # row tile 16 (fp32), 32 (fp32, then fp16)
    assert [k[:3] for k in keys["dot"]] == [(70, 300, 16), (70, 300, 32), (70, 300, 32)] == [
        k[:3] for k in keys["splitk"]]
    assert keys["gemv"][0][:2] == (70, 300)
    # (N, K, rows, dtypes): split K timed last, so fastest
    f16 = torch.float16  # the digits routes raced only there (split K timed last, so fastest)
    assert races == {(70, 300, 1, f32, f32): "splitk", (70, 300, 20, f32, f32): "splitk",
                     (70, 300, 20, f16, f16): "digitsk"}
    assert [k[:3] for k in keys["digits"]] == [(70, 300, 32)] == [k[:3] for k in keys["digitsk"]]
    # mode int8triton equals mode int8 in fp32 (both sum exactly-representable products: fp32 summation order)
    routed = routed_equals_int8("cpu", torch.float32, (48, 40, 33, 24), (0, 1, 5, 17))
    print(f"int8triton vs int8, fp32 stack of 3 linears: max relative difference {routed:.2e}")
    assert routed < 1e-5
    if importlib.util.find_spec("moshi") is not None:
        hybrid = tiny_hybrid_logits_delta()
        print(f"int8triton vs int8, tiny fp32 Moshi TTT hybrid: max abs logit difference {hybrid:.2e}")
        assert hybrid < 2e-5  # logits of size ~1-4; int8 itself moves them by ~0.08 (tests/test_quantize.py)
    interpreted_digits()
    from ttt_speech.ops.int8 import triton_mm

    for row in (triton_mm.DIGITS_ROW, 128):  # rows in registers; rows longer than DIGITS_ROW, in steps
        triton_mm.DIGITS_ROW = row
        digit_examples.append(check_digits(33, 70, 300, torch.float16, True, "digitsk", 0, "cpu", seed=row))
        x, codes, scale, _ = operands(3, 20, 300, torch.float16, "contiguous", False, "cpu", seed=1)
        x[1, 7] = float("nan")  # a NaN activation: its row's outputs NaN, as the exact kernels' (not finite garbage)
        for kernel in ("digits", "digitsk"):
            y = triton_mm.int8_mm_triton(x, codes, scale, kernel=kernel)  # type: ignore[arg-type]
            assert bool(y[1].isnan().all()) and bool(y[[0, 2]].isfinite().all())
    same, diff = min(e[0] for e in digit_examples), max(e[1] for e in digit_examples)
    print(f"digits route: {len(digit_examples)} examples, digits equal to the reference's >= {same:.5f}, "
          f"max abs difference from its reference {diff:.2e}")
    interpreted()
    print("max abs error vs reference:", worst)
    print("largest |y|:", largest, "examples per kernel and row tile:", dict(sorted(covered.items())))
    assert largest > 2  # outputs of size ~1: the tolerances are not vacuous
    assert {"gemv", "dot 16", "dot 32", "dot 64", "splitk 16", "splitk 32", "splitk 64"} <= covered.keys()
    assert all(covered.get(f"{kernel} {rows}", 0) > 0 for kernel in ("digits", "digitsk") for rows in (16, 32, 64))
