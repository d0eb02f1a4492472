"""Command-line implementation of `ttt-speech convert-moshi`, and what the Moshi commands share (layers, quantization).

cli.py adds a subparser, calls `add_*_arguments(parser)` and dispatches to `run_*(args)`; the module can
also run alone: `python -m ttt_speech.moshi.commands convert-moshi ...`. `generate`, which also scores a
held-out passage with eval's copy probe, lives one floor up in `eval/generate_command.py`.
"""

from __future__ import annotations

import argparse
import sys
import typing as tp
from pathlib import Path

from ttt_speech.branches import BRANCH_NAMES, DEFAULT_BRANCH, inplace_cost, misplaced, wrong_branch
from ttt_speech.devices import DTYPE_NAMES, torch_dtype
from ttt_speech.errors import UsageError, output_dir, positive_int, read_json_object, unit_interval

if tp.TYPE_CHECKING:
    import torch
    from moshi.models.lm import LMModel

# Literal here (checked against their modules in tests/test_cli_errors.py): importing those modules costs
# seconds, which `--help` must not.
QUANT_MODES = ("int8", "int8pack", "int8triton", "w8a8", "int4")


def parse_layers(text: str) -> str | list[int]:
    """"all", or comma-separated indices and inclusive ranges: "24-31", "0,2,5-7"."""
    if text == "all":
        return "all"
    out: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            out += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad layer list {text!r}; use 'all', '24-31' or '0,2,5-7'") from None
    return out


TTT_ONLY_FLAGS = ("inner", "mini_batch", "variant", "shared_qkv")
# flag -> the branches it applies to (a flag not listed applies to every branch)
FLAG_BRANCHES = {**{k: ("ttt",) for k in TTT_ONLY_FLAGS}, "gate_init": ("ttt", "gdn"), "chunk": ("inplace",),
                 "decay": ("inplace",)}


def branch_of(args: argparse.Namespace) -> str:
    """The branch the options ask for: --branch, or the default (in-place) when none is named."""
    return getattr(args, "branch", None) or DEFAULT_BRANCH


def _memory_overrides(args: argparse.Namespace) -> dict[str, tp.Any]:
    """The branch config's fields the options set; an option of another branch than the one asked for is
    one line naming it and its branch (the default branch moved from TTT to in-place: old commands meet this)."""
    over: dict[str, tp.Any] = read_json_object(args.memory_config, "--memory-config file") if args.memory_config else {}
    branch, named = branch_of(args), getattr(args, "branch", None) is not None
    wrong = misplaced(over, branch)
    if wrong:
        raise UsageError(f"--memory-config {args.memory_config}: "
                         + wrong_branch(wrong[0], wrong[1], branch, "--branch", named))
    for key, branches in FLAG_BRANCHES.items():
        if getattr(args, key, None) is not None:
            if branch not in branches:
                raise UsageError(wrong_branch(f"--{key.replace('_', '-')}", branches, branch, "--branch", named))
            over[key] = getattr(args, key)
    if args.mode == "replace" and branch == "inplace":
        raise UsageError(wrong_branch("--mode replace", ("ttt",), branch, "--branch", named))
    return over


def add_memory_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=parse_layers, default="all",
                   help="temporal-transformer layers to convert: all, 24-31, 0,2,5-7 (default: all; in-place at 7B: "
                        "all 32 = 1.85x vanilla's ms/frame and 5754 MiB state per session, 28-31 = 1.115x and 719 MiB)")
    p.add_argument("--mode", choices=("hybrid", "replace"), default="hybrid",
                   help="hybrid: attention + memory branch (default); replace: TTT instead of attention (--branch ttt)")
    p.add_argument("--branch", choices=BRANCH_NAMES, default=None,
                   help="memory branch: inplace (default: the layer's own MLP becomes per-stream fast weights, "
                        "docs/ttt.md; the probe's pick), ttt or gdn (Gated DeltaNet); --mode replace: ttt only")
    p.add_argument("--memory-config", "--ttt-config", dest="memory_config",
                   help="JSON file of TTTConfig (or, with --branch gdn / inplace, GatedDeltaNetConfig / InPlaceConfig) "
                        "fields (dims default to the model's); --ttt-config is its old name")
    p.add_argument("--chunk", type=positive_int, help="in-place branch: frames per fast-weight write (default 64)")
    p.add_argument("--decay", type=unit_interval,
                   help="in-place branch: the delta's initial per-chunk decay, learned per layer (default 1: none; "
                        "< 1 bounds the state for streams of any length, e.g. 0.95)")
    p.add_argument("--inner", choices=("linear", "mlp"), help="TTT inner model")
    p.add_argument("--mini-batch", type=positive_int, help="TTT mini-batch size")
    p.add_argument("--variant", choices=("ttt-lm", "fla"), help="TTT update rule")
    p.add_argument("--gate-init", type=float, help="initial gate alpha (hybrid: 0 keeps the logits unchanged)")
    p.add_argument("--shared-qkv", action="store_true", default=None,
                   help="TTT reads the attention's own q/k/v projection and joins its heads before the output "
                        "projection: no extra weights per layer, the fast hybrid (hybrid mode, TTT only)")


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--moshi-weights", required=True, help="Moshi model.safetensors")
    p.add_argument("--config", required=True, help="Moshi config.json")
    p.add_argument("--out", required=True, help="output directory (model.safetensors + config.json)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="bfloat16")
    p.add_argument("--attention-window", type=positive_int,
                   help="frames each attention sees and caches per session (default: the config's context; "
                        "Moshi-7B 3000 = 4 min); a shorter window allocates only its KV, the memory carries the rest")
    add_memory_arguments(p)


def run_convert(args: argparse.Namespace) -> Path:
    """Load a released Moshi, convert it, save the hybrid checkpoint. Everything the options decide is tried
    first on a weightless (meta) copy of the model, so a bad option is refused before gigabytes are read."""
    import torch
    from moshi.models.loaders import get_moshi_lm

    from ttt_speech.moshi.config import lm_kwargs, read_moshi_config
    from ttt_speech.moshi.convert import convert, default_branch_config
    from ttt_speech.moshi.files import MoshiDir, check_moshi_weights, copy_companions

    raw = read_moshi_config(args.config)
    check_moshi_weights(args.moshi_weights, raw, args.config)
    output_dir(args.out)
    overrides = _memory_overrides(args)
    branch = branch_of(args)
    with torch.device("meta"):
        meta = get_moshi_lm(None, lm_kwargs=lm_kwargs(raw), device="meta", dtype=torch.float32)
    where = f"--memory-config {args.memory_config}: " if args.memory_config else ""
    try:
        convert(meta, args.layers, args.mode, default_branch_config(meta, args.mode, branch, **overrides),
                moshi_config=raw, attention_window=args.attention_window)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{where}{e}") from None
    del meta
    lm = get_moshi_lm(args.moshi_weights, lm_kwargs=lm_kwargs(raw), dtype=torch_dtype(args.dtype, torch.device("cpu")))
    cfg = default_branch_config(lm, args.mode, branch, **overrides)
    hybrid = convert(lm, args.layers, args.mode, cfg, moshi_config=raw, attention_window=args.attention_window)
    out = hybrid.save_pretrained(args.out)
    carried = copy_companions(Path(args.config).parent, out, raw)  # generate / serve on `out` decode and speak as is
    written = MoshiDir.read(out, "--out")
    for found, what, flag in ((written.mimi, "Mimi", "--mimi-weights / serve --mimi"),
                              (written.tokenizer, "tokenizer", "serve --tokenizer")):
        if found is None:
            print(f"convert-moshi: no {what} beside {args.config}; generate/serve on {out} need {flag}",
                  file=sys.stderr)
    n = sum(p.numel() for layer in hybrid.memory_layers() for p in layer.memory.parameters())
    print(f"converted layers {list(hybrid.memory_spec.layers)} ({args.mode}, {n / 1e6:.1f}M {branch.upper()} "
          f"memory parameters) -> {out} (with {', '.join(carried) or 'no codec or tokenizer'})")
    if branch == "inplace":
        from ttt_speech.layers.inplace import InPlaceState

        print(inplace_cost(len(hybrid.memory_spec.layers), InPlaceState.spec_nbytes(cfg)))
    return out


def add_quantize_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", choices=QUANT_MODES,
                   help="quantization of the linear layers with torchao: int8 / int4 weights (int4: CUDA + "
                        "bfloat16), int8pack (int8 weights through torch._weight_int8pack_mm, no bf16 copy), int8triton "
                        "(int8 weights through our Triton kernel: CUDA), or "
                        "w8a8 (int8 weights and activations, int8 GEMM); TTT states stay fp32. "
                        'Needs pip install -e ".[quant]"')
    p.add_argument("--quantize-compile", action="store_true",
                   help="torch.compile the quantized linear layers (fuses int8 dequantization into the matmul; "
                        "compiles at the first step)")


def quantize_or_exit(lm: LMModel, mode: str, compile: bool = False) -> str:
    """`quantize_weights` for a command: a missing torchao or an unsupported setup is a UsageError with the reason."""
    from ttt_speech.quantize import Mode, quantize_weights

    try:
        return quantize_weights(lm, tp.cast(Mode, mode), compile=compile).summary()
    except (ImportError, ValueError) as e:
        raise UsageError(f"--quantize {mode}: {e}") from None


def check_quantize(mode: str | None, device: torch.device, dtype: torch.dtype, compile: bool = False) -> None:
    """Refuse --quantize int4 / int8triton where there is no kernel for it, before the model is loaded."""
    import torch

    if compile and mode is None:
        raise UsageError("--quantize-compile compiles the quantized layers: give --quantize too")

    if mode == "int8triton" and device.type != "cuda":
        raise UsageError(f"--quantize int8triton needs --device cuda (our Triton kernel), not {device.type}; "
                         "use --quantize int8")
    if mode == "int4" and (device.type != "cuda" or dtype != torch.bfloat16):
        raise UsageError(f"--quantize int4 needs --device cuda and bfloat16 weights (torchao's int4 kernel), "
                         f"not {device.type} {str(dtype).removeprefix('torch.')}; use --quantize int8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ttt_speech.moshi.commands")
    sub = parser.add_subparsers(dest="command", required=True)
    add_convert_arguments(sub.add_parser("convert-moshi", help="convert a Moshi checkpoint to a memory hybrid"))
    run_convert(parser.parse_args(argv))


if __name__ == "__main__":
    main()
