"""INT8 weight-only quantization (torchao) of the tiny TTT hybrid: what is quantized, what is not, how far
the logits move, and that the TTT state and streaming are untouched. INT4 needs CUDA: only its refusal here."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import typing as tp
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch._dynamo.utils import counters
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from ttt_speech.quantize import (Linear, _linear, int4_round_trip, int8_linear, int8pack_linear, is_quantized,
                                 quantize_weights, route_linears, weight_bytes)

needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason='torchao not installed: pip install -e ".[quant]"')

# Measured on the tiny fp32 hybrid (seeds 0-3, 2 x 48 frames), int8 / w8a8: relative logit error 1.5-1.7 % /
# 2.4-2.7 %, max |delta| 0.06-0.11 / 0.08-0.18 (logits up to ~4), argmax agreement 97-99 % / 95-99 %.
# (max relative error, max |delta|, min argmax agreement): margins of ~2.5x over the measured worst.
BOUNDS = {"int8": (0.04, 0.25, 0.9), "w8a8": (0.06, 0.45, 0.88)}


def test_missing_torchao_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchao", None)
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(ImportError, match=r"\.\[quant\]"):
        quantize_weights(nn.Linear(4, 4), "int8")


def test_int4_round_trip_keeps_levels_on_the_grid_and_moves_others_to_the_nearest() -> None:
    # one group of 16: min 0, max 15, so scale 1 and zero point 8: the levels are 0..15 themselves
    grid = torch.arange(16.0).reshape(1, 16)
    assert torch.equal(int4_round_trip(grid, 16), grid)
    off = grid + torch.tensor([0.0, 0.4, -0.3, 0.6] + [0.0] * 11 + [0.0])
    assert int4_round_trip(off, 16).tolist() == [[0.0, 1.0, 2.0, 4.0, *range(4, 16)]]
    with pytest.raises(ValueError, match="in_features 24 is not a multiple of group_size=16"):
        int4_round_trip(torch.zeros(2, 24), 16)


@settings(max_examples=40, deadline=None)
@given(out=st.integers(1, 6), groups=st.integers(1, 4), group=st.sampled_from([8, 32, 128]),
       scale=st.floats(1e-3, 10.0), seed=st.integers(0, 2**16))
def test_int4_round_trip_error_is_half_a_step_per_group_up_to_bf16_rounding(out: int, groups: int, group: int, scale: float,
                                                       seed: int) -> None:
    w = torch.randn(out, groups * group, generator=torch.Generator().manual_seed(seed)) * scale
    got = int4_round_trip(w, group).reshape(out, groups, group)
    w = w.reshape(out, groups, group)
    step = (w.amax(-1, keepdim=True) - w.amin(-1, keepdim=True)) / 15
    # bf16 arithmetic, as torchao's: the level index (up to 15) carries 2^-5 of a step of rounding twice, and the
    # weights, zero point and result 2^-9 of the group's largest weight each (3000 seeds: at most 0.9x of this
    # bound with 2^-4 steps; 2^-3 leaves a margin, and a level off by one or a scale of range / 16 still fails)
    slack = 2**-3 * step + 2**-6 * w.abs().amax(-1, keepdim=True)
    assert ((got - w).abs() <= step / 2 + slack).all()
    assert max(len(g.unique()) for g in got.reshape(-1, group)) <= 16


@pytest.mark.gpu
@needs_torchao
def test_int4_kernel_computes_what_its_rounding_reference_does() -> None:
    """The tinygemm int4 matmul (mode "int4") against F.linear with int4_round_trip's weights, bf16 on a GPU:
    equal to bf16 matmul rounding, while int4 itself moves a random layer's output by ~10 %."""
    torch.manual_seed(0)
    layer = nn.Linear(1024, 512, bias=False, device="cuda", dtype=torch.bfloat16)
    nn.init.normal_(layer.weight, std=0.02)
    x = torch.randn(8, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        exact = layer(x).float()
        want = nn.functional.linear(x, int4_round_trip(layer.weight)).float()
        quantize_weights(layer, "int4")
        got = layer(x).float()
    assert (got - want).norm() / want.norm() < 0.01
    assert 0.05 < (want - exact).norm() / exact.norm() < 0.2


pytest.importorskip("moshi")

from helpers.moshi import random_codes  # noqa: E402
from ttt_speech.errors import UsageError  # noqa: E402
from ttt_speech.eval.generate_command import add_generate_arguments, run_generate  # noqa: E402
from ttt_speech.moshi.convert import HybridLMModel  # noqa: E402
from ttt_speech.moshi.generate import stream  # noqa: E402
from ttt_speech.moshi.layer import HybridLayerState  # noqa: E402
from ttt_speech.moshi.tiny import build_tiny_hybrid  # noqa: E402


def ttt_state_layout(lm: HybridLMModel) -> list[dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    with lm.streaming(2):
        layout = []
        for layer in lm.memory_layers():
            state = layer._streaming_state
            assert isinstance(state, HybridLayerState) and state.memory is not None
            layout.append({name: (tuple(t.shape), t.dtype) for name, t in state.memory.tensors.items()})
        return layout


@needs_torchao
@pytest.mark.parametrize("mode", ["int8", "w8a8"])
def test_quantized_logits_stay_close_to_fp32(mode: str) -> None:
    max_rel, max_abs, min_agreement = BOUNDS[mode]
    lm = build_tiny_hybrid(0)
    codes = random_codes(lm, 2, 48, seed=1)
    with torch.no_grad():
        ref = lm(codes)
        quantize_weights(lm, mode)  # type: ignore[arg-type]
        out = lm(codes)
    for want, got in ((ref.text_logits, out.text_logits), (ref.logits, out.logits)):
        valid = want.isfinite()  # LMModel.forward fills the positions a delay makes invalid with NaN
        assert torch.equal(valid, got.isfinite())
        delta = (got - want)[valid]
        assert 0 < delta.abs().max() < max_abs
        assert delta.norm() / want[valid].norm() < max_rel
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() > min_agreement


@needs_torchao
def test_compiled_quantized_linears_compute_the_same_logits() -> None:
    """compile=True routes every quantized linear through one compiled int8_linear; a backend that records the
    graphs and runs them as traced shows the path is taken and computes exactly what the eager int8 model does."""
    graphs: list[torch.fx.GraphModule] = []

    def recording(gm: torch.fx.GraphModule, _inputs: list) -> tp.Callable:
        graphs.append(gm)
        return gm.forward

    eager, compiled = build_tiny_hybrid(0), build_tiny_hybrid(0)
    codes = random_codes(eager, 2, 48, seed=1)
    with torch.no_grad():
        quantize_weights(eager, "int8")
        report = quantize_weights(compiled, "int8", compile=True, backend=recording)
        want, got = eager(codes), compiled(codes)
    assert report.compiled and report.summary().startswith("int8, compiled: 29 linear layers")
    # one graph per distinct (input, weight) shape of the 29 layers: 11 at this model's shapes (7 before moshi's
    # gatings were routed too), each the int8 codes cast and multiplied, then scaled
    assert len(graphs) == 11 and all("qdata.t()" in gm.code and "torch.mm(rows" in gm.code for gm in graphs)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(got.text_logits, want.text_logits, rtol=0, atol=0, equal_nan=True)


@needs_torchao
@pytest.mark.parametrize(("linear", "rewrites"), [(_linear, 1), (int8_linear, 0)])
def test_inductor_rewrites_torchaos_int8_matmul_into_int8pack_but_not_int8_linear(linear: Linear, rewrites: int) -> None:
    """The H200's 14x at batch 64: inductor's weight-only-int8 pattern (bf16 activations, int8 weights, bf16 scales;
    CPU, CUDA and XPU alike) turns torchao's int8 matmul into torch._weight_int8pack_mm, on CUDA a one-thread-per-output
    loop. int8_linear scales in fp32, which the pattern does not match; both compute int8's bf16 result."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    layer = nn.Linear(64, 32, dtype=torch.bfloat16)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        quantize_weights(layer, "int8")
        want = layer(x).float()
        route_linears([layer], linear, compile=True)
        got = layer(x).float()
    assert counters["inductor"]["woq_matcher_count"] == rewrites
    torch.testing.assert_close(got, want, rtol=0.01, atol=0.01)  # bf16: one rounding of the scale or the sum


@needs_torchao
def test_int8pack_multiplies_int8s_weights_with_the_fused_kernel() -> None:
    """Mode int8pack (torch._weight_int8pack_mm) against its reference, eager int8: the same int8 codes and
    scales, logits equal to fp32 summation order (measured 2.4e-6 here), while int8 itself moves them by ~0.08."""
    fp32, eager, packed = build_tiny_hybrid(0), build_tiny_hybrid(0), build_tiny_hybrid(0)
    codes = random_codes(eager, 2, 48, seed=1)
    with torch.no_grad():
        ref = fp32(codes)
        quantize_weights(eager, "int8")
        report = quantize_weights(packed, "int8pack")
        want, got = eager(codes), packed(codes)
    assert report.summary().startswith("int8pack: 29 linear layers")
    for name in report.quantized:
        a, b = eager.get_submodule(name).weight, packed.get_submodule(name).weight
        assert torch.equal(a.qdata, b.qdata) and torch.equal(a.scale, b.scale), name
    for r, w, g in ((ref.logits, want.logits, got.logits), (ref.text_logits, want.text_logits, got.text_logits)):
        valid = w.isfinite()
        assert torch.equal(valid, g.isfinite())
        assert (w - r)[valid].abs().max() > 0.02  # quantized: the comparison below is not vacuous
        torch.testing.assert_close(g[valid], w[valid], rtol=0, atol=2e-5)


class QuantizedLinearCalls(TorchFunctionMode):
    """Counts `F.linear` calls whose weight is a torchao tensor: torchao's own matmul, which a routed mode avoids."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.calls += func is F.linear and is_quantized(args[1])
        return func(*args, **(kwargs or {}))


@needs_torchao
@pytest.mark.parametrize(("mode", "torchaos"), [("int8", 29), ("int8pack", 0)])
def test_a_routed_mode_routes_every_linear_moshis_gatings_included(mode: str, torchaos: int) -> None:
    """moshi's ActivationGating calls F.linear on its linears' weights, past their forward: without route_gatings
    the 8 gating linears of the tiny hybrid (half a Moshi-7B's weight bytes) stayed on torchao's matmul. Eager
    int8 (nothing routed) shows the count sees all 29; a routed mode leaves none, and its logits stay int8's."""
    eager, lm = build_tiny_hybrid(0), build_tiny_hybrid(0)
    codes = random_codes(lm, 2, 8, seed=1)
    quantize_weights(eager, "int8")
    quantize_weights(lm, mode)  # type: ignore[arg-type]
    counter = QuantizedLinearCalls()
    with torch.no_grad():
        with counter:
            got = lm(codes)
        want = eager(codes)
    # one teacher-forced pass calls each of the 29 linears once (the depformer's per codebook)
    assert counter.calls == torchaos
    valid = want.logits.isfinite()
    torch.testing.assert_close(got.logits[valid], want.logits[valid], rtol=0, atol=2e-5)


@needs_torchao
def test_int8pack_linear_takes_any_leading_shape_strides_and_bias() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(64, 24)
    x = torch.randn(3, 64, 5).transpose(1, 2)  # [3, 5, 64], not contiguous
    with torch.no_grad():
        quantize_weights(layer, "int8")
        want = layer(x)
        layer.forward = lambda x: int8pack_linear(x, layer.weight, layer.bias)  # type: ignore[method-assign]
        got = layer(x)
    assert got.shape == (3, 5, 24)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@needs_torchao
def test_int8triton_is_refused_where_its_kernel_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our Triton kernel runs on CUDA (tests/test_int8_triton.py runs it in Triton's interpreter): a CPU model, or
    compile (the kernel is the fusion), is one line naming the fix, and the model is left as it was."""
    layer = nn.Linear(64, 24)
    monkeypatch.setattr("ttt_speech.quantize.TRITON_INTERPRET", False)
    monkeypatch.setattr("ttt_speech.quantize.triton_installed", lambda: True)
    with pytest.raises(ValueError, match="int8triton needs the weights on CUDA .*, found cpu; use int8 or int8pack"):
        quantize_weights(layer, "int8triton")
    with pytest.raises(ValueError, match="int8triton runs its own Triton kernel: give it without compile"):
        quantize_weights(layer, "int8triton", compile=True)
    monkeypatch.setattr("ttt_speech.quantize.triton_installed", lambda: False)
    with pytest.raises(ValueError, match="int8triton needs triton"):
        quantize_weights(layer, "int8triton")
    assert not is_quantized(layer.weight)


@needs_torchao
def test_only_linear_weights_are_quantized() -> None:
    lm = build_tiny_hybrid(0)
    linears = [name for name, m in lm.named_modules() if isinstance(m, nn.Linear)]
    kept = {name: p for name, p in lm.named_parameters() if not (name.endswith(".weight") and name[:-7] in linears)}
    before = weight_bytes(lm)
    report = quantize_weights(lm, "int8")
    # temporal: 2 layers x (attn in/out, gating in/out, TTT q/k/v/o); depformer: 2 inputs, 1 layer with
    # weights per codebook (2 x 4), 2 heads; the text head
    assert len(report.quantized) == len(linears) == 29 and report.skipped == ()
    for i in range(2):
        assert {f"transformer.layers.{i}.memory.{p}_proj" for p in "qkvo"} <= set(report.quantized)
    assert all(is_quantized(lm.get_submodule(name).weight) for name in report.quantized)
    params = dict(lm.named_parameters())
    for name, p in kept.items():  # embeddings, norms, TTT initial fast weights, step sizes, gates: same tensors
        assert params[name] is p and not is_quantized(p), name
    for layer in lm.memory_layers():
        assert layer.memory.W1.dtype == layer.memory.b1.dtype == torch.float32
    # fp32 -> int8 codes + one fp32 scale per output channel
    assert report.bytes_after < 0.3 * report.bytes_before
    assert before - weight_bytes(lm) == report.bytes_before - report.bytes_after
    with pytest.raises(ValueError, match="no unquantized"):
        quantize_weights(lm, "int8")


@needs_torchao
def test_ttt_state_is_untouched_and_streaming_runs() -> None:
    lm = build_tiny_hybrid(0, dtype=torch.bfloat16)
    layout = ttt_state_layout(lm)
    assert {dtype for state in layout for _, dtype in state.values()} == {torch.float32, torch.int64}  # + offsets
    with lm.streaming(1), pytest.raises(RuntimeError, match="streaming"):
        quantize_weights(lm, "int8")
    quantize_weights(lm, "int8")
    assert ttt_state_layout(lm) == layout
    for layer in lm.memory_layers():
        assert layer.memory.W1.dtype == torch.bfloat16 and not is_quantized(layer.memory.W1)
    result = stream(lm.eval(), 40, progress=False)
    assert result.state_finite and result.state_bytes[0] > 0
    assert (result.state_bytes == result.state_bytes[0]).all()


def generate(*argv: str) -> dict[str, Path]:
    p = argparse.ArgumentParser()
    add_generate_arguments(p)
    return run_generate(p.parse_args([*argv, "--device", "cpu"]))


@needs_torchao
def test_generate_with_int8_weights(tmp_path: Path) -> None:
    files = generate("--minutes", "0.05", "--quantize", "int8", "--out", str(tmp_path))
    stats = json.loads(files["stats"].read_text())
    assert stats["state_finite"] is True and stats["state_bytes_first"] == stats["state_bytes_last"] > 0


@needs_torchao
def test_int4_is_refused_off_cuda(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--quantize int4 needs --device cuda and bfloat16 weights"):
        generate("--minutes", "0.05", "--quantize", "int4", "--dtype", "bfloat16", "--out", str(tmp_path))


def test_int8triton_is_refused_off_cuda(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--quantize int8triton needs --device cuda .*; use --quantize int8"):
        generate("--minutes", "0.05", "--quantize", "int8triton", "--out", str(tmp_path))


def test_quantize_compile_needs_quantize(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--quantize-compile compiles the quantized layers: give --quantize too"):
        generate("--minutes", "0.05", "--quantize-compile", "--out", str(tmp_path))
