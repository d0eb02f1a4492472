"""Weight-only INT8 / INT4 quantization of a Moshi LM or TTT hybrid's linear layers, with torchao.

At batch 1 a streaming step reads every weight once per frame, so the bytes of the linear layers
are what weight memory (and, with a fused kernel, step time) are made of. `quantize_weights`
replaces the weights of `nn.Linear` layers with torchao's quantized tensors in place; nothing
else changes type. The TTT fast weights are never quantized: their learned initial values (W1, b1,
...) are plain parameters copied into every stream's fp32 state, and that state is trained at
every token, where int8 rounding would be noise added to each update.

Uncompiled, torchao's int8 weight-only matmul casts each int8 weight to the activations' dtype before
a plain matmul, so it moves more bytes than bf16 (2.05x slower on the device, docs/benchmarks.md).
Ways past that, all here, measured or to be measured on the device (docs/benchmarks.md): `compile=True`
torch.compiles every quantized linear with torchao's recommended inductor settings (at one row inductor fuses
the cast into a GEMV; `compile="max-autotune-no-cudagraphs"` also lets it fuse the cast into its Triton matmul
template at more rows), mode "w8a8" quantizes each activation row to int8 as well, so the matmul is torch's
int8 GEMM (`torch._int_mm`, 17 rows or more), and mode "int8pack" keeps int8's weights but multiplies with
core PyTorch's fused weight-only kernel `torch._weight_int8pack_mm` (CPU, CUDA, MPS, XPU): no bf16 copy of the
weight, but on CUDA (torch 2.11-2.13) a one-thread-per-output loop without tensor cores. Mode "int8triton" keeps
int8's weights and multiplies with our own Triton kernel (`ops/int8/triton_mm.py`: the codes read once, converted
in registers, a GEMV at one row and tensor-core tiles from two; CUDA, autotuned at the first call of each shape).

torchao is an optional extra: `pip install -e ".[quant]"`.
"""

from __future__ import annotations

import contextlib
import logging
import types
import typing as tp
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ttt_speech.compat import allow_recompiles, weight_int8pack_mm
from ttt_speech.deps import require
from ttt_speech.layers.inplace import GatedMLP
from ttt_speech.ops.triton_env import TRITON_INTERPRET, triton_installed

Mode = tp.Literal["int8", "int8pack", "int8triton", "w8a8", "int4"]
MODES: tuple[str, ...] = ("int8", "int8pack", "int8triton", "w8a8", "int4")
# distinct (input, weight) shapes one compiled linear sees: a Moshi step has ~10 per batch size
COMPILE_SPECIALISATIONS = 64
INT4_GROUP_SIZE = 128
INSTALL_HINT = 'pip install -e ".[quant]"  (torchao==0.18.0)'


@dataclass(frozen=True)
class QuantizeReport:
    """What `quantize_weights` did: which linear layers, and their weight bytes before and after."""

    mode: Mode
    quantized: tuple[str, ...]  # module names whose weight is now a torchao tensor
    skipped: tuple[str, ...]  # linear layers left as they were (int4: in_features not a multiple of the group)
    bytes_before: int
    bytes_after: int
    compiled: bool = False  # the quantized linears run torch.compile'd

    def summary(self) -> str:
        skipped = f", {len(self.skipped)} skipped" if self.skipped else ""
        compiled = ", compiled" if self.compiled else ""
        return (f"{self.mode}{compiled}: {len(self.quantized)} linear layers{skipped}, their weights "
                f"{format_bytes(self.bytes_before)} -> {format_bytes(self.bytes_after)}")


def format_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


@contextlib.contextmanager
def _quiet(*loggers: str) -> tp.Iterator[None]:
    """Raise the given loggers to ERROR for the duration (restored after)."""
    saved = [(log, log.level) for log in map(logging.getLogger, loggers)]
    for log, _ in saved:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in saved:
            log.setLevel(level)


def torchao_quantization() -> types.ModuleType:
    """`torchao.quantization`, or an ImportError that names the extra to install.

    torchao's import warns that its CUDA-only extension libraries do not load on a CPU machine and
    that it registers an Enum the way torch 2.13 deprecates; neither matters here (the kernels used
    are torch's own), so those two loggers are quiet during the import.
    """
    try:
        with _quiet("torchao", "torch.utils._pytree"):
            import torchao.quantization as ao
    except ImportError as e:
        raise ImportError(f"weight quantization needs torchao: {INSTALL_HINT}") from e
    require("torchao")  # its tensor subclasses' layouts change between releases
    return ao


def is_quantized(t: Tensor) -> bool:
    """A torchao tensor subclass (it flattens into inner tensors; a plain tensor does not)."""
    return hasattr(t, "__tensor_flatten__")


def tensor_bytes(t: Tensor) -> int:
    """Bytes held by `t`; for a torchao tensor subclass, by its inner tensors (codes, scales, zero points)."""
    if is_quantized(t):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers of `model`, quantized ones at their real size."""
    return sum(tensor_bytes(t) for t in (*model.parameters(), *model.buffers()))


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The `nn.Linear` layers `quantize_weights` may touch: not inside an embedding, not quantized yet."""
    embeddings = [name for name, m in model.named_modules() if isinstance(m, nn.Embedding)]
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not is_quantized(m.weight)
            and not any(name.startswith(e + ".") for e in embeddings)}


Linear = tp.Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(x, weight, bias)


def int8_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Mode int8's matmul (torchao's weight-only path) written out for torch.compile, with the scale applied in
    fp32. Why: torchao's own `mm(x, w.to(bf16).t()) * scale.to(bf16)` is a pattern inductor rewrites into
    `torch._weight_int8pack_mm` (fx_passes/quantization.py, CUDA included), whose CUDA kernel is a loop of one
    thread per output (14x the bf16 step at batch 64 on an H200); an fp32 scale does not match it, so inductor
    keeps its GEMV reduction at one row and a matmul at more rows. In fp32 it computes exactly what
    torchao's does (tests); in bf16 only the scale's rounding differs."""
    rows = x.reshape(-1, x.shape[-1])
    return _unflatten(x, (torch.mm(rows, weight.qdata.t().to(x.dtype)) * weight.scale.reshape(-1)).to(x.dtype), bias)


def int8pack_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`F.linear` with an int8 weight-only torchao weight (mode "int8"'s codes and per-channel scales) through
    `torch._weight_int8pack_mm`: one kernel reads the int8 codes, where torchao's eager path first writes a
    bf16 copy of the whole weight. Its reference is mode "int8" itself (same weights, tests hold them equal)."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()  # the kernels take a contiguous 2D input
    return _unflatten(x, weight_int8pack_mm(rows, weight.qdata, weight.scale.reshape(-1).to(x.dtype)), bias)


def _unflatten(x: Tensor, y: Tensor, bias: Tensor | None) -> Tensor:
    """A matmul's [rows, N] result back to x's leading dimensions, plus the bias."""
    y = y.reshape(*x.shape[:-1], y.shape[-1])
    return y if bias is None else y + bias


def int8_triton_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`F.linear` with mode "int8"'s torchao weight (its int8 codes and fp32 per-channel scales) through our Triton
    kernel (`ttt_speech.ops.int8.triton_mm`), which reads each code once. Its reference is mode "int8" itself
    (tests/test_int8_triton.py holds them equal); the kernel's own is `ops.int8.int8_mm_naive`."""
    from ttt_speech.ops.int8.triton_mm import int8_mm_triton

    return int8_mm_triton(x, weight.qdata, weight.scale, bias)


def int8_triton_refusal(devices: tp.Iterable[torch.device]) -> str | None:
    """Why mode "int8triton" cannot run on weights on `devices`, or None: it needs triton and CUDA (or Triton's
    CPU interpreter, TRITON_INTERPRET=1, how the tests run it)."""
    found = sorted({d.type for d in devices})
    if not triton_installed():
        return "int8triton needs triton (it comes with torch's CUDA wheels); use int8 or int8pack"
    if found != ["cuda"] and not TRITON_INTERPRET:
        return (f"int8triton needs the weights on CUDA (our Triton kernel), found {', '.join(found)}; "
                "use int8 or int8pack off CUDA")
    return None


def route_linears(linears: tp.Iterable[nn.Linear], linear: Linear = _linear, compile: bool | str = False,
                  backend: tp.Any = "inductor") -> None:
    """Run each layer's matmul through `linear`, torch.compile'd when `compile` (a string: the torch.compile
    mode) as one compiled function: a specialisation per shape, shared by all layers of that shape. Compilation
    happens at the first call: before CUDA graph capture in moshi's streaming, whose first step runs eagerly."""
    if compile:
        allow_recompiles(COMPILE_SPECIALISATIONS)
        mode = compile if isinstance(compile, str) else None
        linear = torch.compile(linear, backend=backend, mode=mode, dynamic=False, fullgraph=True)
    for m in linears:
        m.forward = lambda x, m=m: linear(x, m.weight, m.bias)  # type: ignore[method-assign]


def route_gatings(model: nn.Module, routed: tp.Iterable[nn.Module]) -> int:
    """Make each moshi `ActivationGating` whose linear_in and linear_out are both in `routed` call them (their
    routed forward) instead of `F.linear` on their weights; returns how many gatings that is.

    Why: moshi's gating multiplies with `F.linear(x, self.linear_in.weight)` (one compiled kernel for the MLP), so
    `route_linears` alone left every gated MLP on torchao's own matmul: at Moshi-7B shape half the hybrid's weight
    bytes (32 x (22528 x 4096 + 4096 x 11264) + the depformer's 48 gatings, 4.5 of 8.9 GiB of int8 codes). It now
    runs as `GatedMLP` (the same ops, held bit-equal to moshi's gating by tests/test_inplace_layer.py). Matched by
    class name: moshi is an optional extra, not imported here."""
    ids = {id(m) for m in routed}
    gatings = [m for m in model.modules() if type(m).__name__ == "ActivationGating"
               and id(getattr(m, "linear_in", None)) in ids and id(getattr(m, "linear_out", None)) in ids]
    for m in gatings:
        m.forward = GatedMLP.moshi(m).forward  # type: ignore[method-assign]
    return len(gatings)


def int4_round_trip(weight: Tensor, group_size: int = INT4_GROUP_SIZE) -> Tensor:
    """`weight` ([out, in]) rounded as mode "int4" rounds it, back in its own dtype: the slow reference of the
    tinygemm path (a GPU test holds the two equal), and int4's error measurable on a CPU, where no kernel runs.

    torchao's tinygemm recipe, written out: per group of `group_size` input channels, in bf16, scale =
    (max - min) / 15 and a float zero point min + 8 * scale; each weight becomes one of 16 levels
    (q - 8) * scale + zero point, q = round((w - min) / scale) in 0..15.
    """
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"int4: in_features {in_features} is not a multiple of group_size={group_size}")
    w = weight.detach().to(torch.bfloat16).reshape(out_features, in_features // group_size, group_size)
    low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=torch.finfo(torch.bfloat16).smallest_normal)
    zero = low + scale * 8
    q = ((w - (zero - scale * 8)) / scale).round().clamp(0, 15)
    return ((q - 8) * scale + zero).reshape(weight.shape).to(weight.dtype)


def quantize_weights(model: nn.Module, mode: Mode = "int8", *, group_size: int = INT4_GROUP_SIZE,
                     compile: bool | str = False, backend: tp.Any = "inductor") -> QuantizeReport:
    """Quantize the weights of `model`'s `nn.Linear` layers in place (torchao, weight-only); for inference.

    For a Moshi LMModel or TTT hybrid these are the temporal transformer's and the depformer's
    attention and gating projections, the input/output heads, and each TTT branch's q/k/v/o
    projections. Embeddings, norms and the TTT layers' other parameters (initial fast weights,
    step-size weights, gate) keep their dtype; TTT states stay fp32. Activations stay in the model's
    dtype: each matmul dequantizes its weight (int8) or runs a mixed kernel (int4).

    int8: symmetric, one scale per output channel; any device and dtype.
    int8pack: int8's weights, multiplied by `torch._weight_int8pack_mm` (`int8pack_linear`), fused.
    int8triton: int8's weights, multiplied by our Triton kernel (`int8_triton_linear`): CUDA; not compiled (the
        kernel is the fusion); each new shape is autotuned at its first call, which must not be inside a CUDA
        graph capture (moshi's streaming runs its first step eagerly).
    w8a8: int8 as above, and each activation row quantized to int8 (symmetric, per token) at every
        matmul: the GEMM runs in int8 (torch._int_mm on CUDA). Not weight-only: adds activation error.
    int4: asymmetric, one scale and zero point per `group_size` input channels, torchao's tinygemm
        layout: CUDA and bfloat16 only. Layers whose in_features is not a multiple of `group_size`
        are skipped (listed in the report).
    compile: torch.compile the quantized linears (`route_linears`; int8 through `int8_linear`; a string is
        the torch.compile mode, e.g. "max-autotune-no-cudagraphs"; `backend` for tests) and apply
        torchao's recommended inductor settings (process-wide inductor flags: only when asked).
    Quantize before streaming: moshi's CUDA graphs capture the weights they were made with.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if getattr(model, "is_streaming", False):
        raise RuntimeError("quantize the model before entering streaming mode")
    ao = torchao_quantization()
    linears = linear_layers(model)
    if not linears:
        raise ValueError("no unquantized nn.Linear layer in the model")
    if mode == "int8triton":
        if compile:
            raise ValueError("int8triton runs its own Triton kernel: give it without compile")
        refusal = int8_triton_refusal(m.weight.device for m in linears.values())
        if refusal:
            raise ValueError(refusal)
    if mode == "int4":
        found = {(m.weight.device.type, m.weight.dtype) for m in linears.values()}
        if found != {("cuda", torch.bfloat16)}:
            found_text = ", ".join(sorted(f"{d} {str(t).removeprefix('torch.')}" for d, t in found))
            raise ValueError(f"int4 needs bfloat16 weights on CUDA (torchao's tinygemm kernel), found {found_text}; "
                             "use int8, or load the model in bfloat16 on a GPU")
        chosen = {n: m for n, m in linears.items() if m.in_features % group_size == 0}
        if not chosen:
            raise ValueError(f"int4: no linear layer has in_features divisible by group_size={group_size}")
        config = ao.Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d",
                                         set_inductor_config=bool(compile))
    elif mode == "w8a8":
        chosen = linears
        config = ao.Int8DynamicActivationInt8WeightConfig(set_inductor_config=bool(compile))
    else:  # int8, int8pack, int8triton
        chosen = linears
        config = ao.Int8WeightOnlyConfig(set_inductor_config=bool(compile))  # False: the process's inductor flags stay
    before = sum(tensor_bytes(m.weight) for m in chosen.values())
    ids = {id(m) for m in chosen.values()}
    ao.quantize_(model, config, filter_fn=lambda m, _name: id(m) in ids)
    missed = [n for n, m in chosen.items() if not is_quantized(m.weight)]
    if missed:
        raise RuntimeError(f"torchao left these layers unquantized: {missed}")
    if compile or mode in ("int8pack", "int8triton"):
        linear = {"int8pack": int8pack_linear, "int8triton": int8_triton_linear, "int8": int8_linear}.get(mode, _linear)
        route_linears(chosen.values(), linear, compile, backend)
        route_gatings(model, chosen.values())
    return QuantizeReport(mode, tuple(chosen), tuple(n for n in linears if n not in chosen), before,
                          sum(tensor_bytes(m.weight) for m in chosen.values()), bool(compile))
