"""Command-line implementations for `ttt-speech generate` and `ttt-speech convert-moshi`.

cli.py adds a subparser, calls `add_*_arguments(parser)` and dispatches to `run_*(args)`; each
module can also run alone: `python -m ttt_speech.moshi.commands generate --minutes 1`.
"""

from __future__ import annotations

import argparse
import sys
import typing as tp
from pathlib import Path

from ttt_speech.branches import BRANCH_NAMES, DEFAULT_BRANCH, inplace_cost, misplaced, wrong_branch
from ttt_speech.devices import DTYPE_NAMES, torch_device, torch_dtype
from ttt_speech.errors import (UsageError, check_safetensors, nonnegative_float, output_dir,
                               positive_float, positive_int, read_json_object, unit_interval)
from ttt_speech.threads import add_threads_argument, use_cpu_threads

if tp.TYPE_CHECKING:
    import torch
    from moshi.models.lm import LMModel

# Literal here (checked against their modules in tests/test_cli_errors.py): importing those modules costs
# seconds, which `--help` must not.
QUANT_MODES = ("int8", "w8a8", "int4")


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


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("model (default: the small TTT hybrid + codec shipped in the package)")
    one = src.add_mutually_exclusive_group()
    one.add_argument("--hybrid", help="directory written by convert-moshi / save_pretrained")
    one.add_argument("--tiny", action="store_true", help="a tiny random TTT hybrid built in code (tests, speed)")
    one.add_argument("--moshi-weights", help="vanilla Moshi model.safetensors (needs --config)")
    src.add_argument("--config", help="Moshi config.json for --moshi-weights")
    codec = src.add_mutually_exclusive_group()
    codec.add_argument("--mimi-weights", help="Mimi checkpoint: decode the generated audio to a wav")
    codec.add_argument("--tiny-mimi", action="store_true",
                       help="decode with a tiny random Mimi (demo of the audio path)")
    src.add_argument("--mimi-config", help="Mimi config JSON for --mimi-weights (default: the released Mimi's)")
    p.add_argument("--minutes", type=positive_float, default=1.0, help="minutes of audio to stream (12.5 frames/s)")
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--out", default="generate_out", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    p.add_argument("--temp", type=nonnegative_float, default=0.8, help="audio sampling temperature (0: argmax)")
    p.add_argument("--temp-text", type=nonnegative_float, default=0.7, help="text sampling temperature (0: argmax)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is one)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="default: bfloat16 on CUDA for real weights or int4, float32 otherwise")
    p.add_argument("--no-memory-check", action="store_true",
                   help="skip the line on the memory (a held-out passage heard again 10 attention windows later, "
                        "scored with the memory and with it reset: a few seconds)")
    add_quantize_argument(p)
    add_threads_argument(p)


def add_quantize_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", choices=QUANT_MODES,
                   help="quantization of the linear layers with torchao: int8 / int4 weights (int4: CUDA + "
                        "bfloat16), or w8a8 (int8 weights and activations, int8 GEMM); TTT states stay fp32. "
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
    """Refuse --quantize int4 where torchao has no kernel for it, before the model is loaded."""
    import torch

    if compile and mode is None:
        raise UsageError("--quantize-compile compiles the quantized layers: give --quantize too")

    if mode == "int4" and (device.type != "cuda" or dtype != torch.bfloat16):
        raise UsageError(f"--quantize int4 needs --device cuda and bfloat16 weights (torchao's int4 kernel), "
                         f"not {device.type} {str(dtype).removeprefix('torch.')}; use --quantize int8")


def check_generate(args: argparse.Namespace) -> None:
    """Refuse option combinations and files `run_generate` could not use, before any model is built."""
    if args.config and not args.moshi_weights:
        raise UsageError("--config is the config of --moshi-weights; give both, or neither")
    if args.moshi_weights and not args.config:
        raise UsageError("--moshi-weights needs --config (the model's config.json)")
    if args.mimi_config and not args.mimi_weights:
        raise UsageError("--mimi-config is the config of --mimi-weights; give both, or neither")
    if args.hybrid:
        from ttt_speech.moshi.checkpoint import check_hybrid_dir

        check_hybrid_dir(args.hybrid)
    if args.moshi_weights:
        from ttt_speech.moshi.config import read_moshi_config
        from ttt_speech.moshi.files import check_moshi_weights

        check_moshi_weights(args.moshi_weights, read_moshi_config(args.config), args.config)
    if args.mimi_weights:
        check_safetensors(args.mimi_weights)
    if args.mimi_config:
        read_json_object(args.mimi_config, "Mimi config")
    output_dir(args.out)


def run_generate(args: argparse.Namespace) -> dict[str, Path]:
    from moshi.models.loaders import get_mimi, get_moshi_lm

    from ttt_speech.audio import FRAME_RATE
    from ttt_speech.moshi.checkpoint import load_hybrid
    from ttt_speech.moshi.config import lm_kwargs, read_moshi_config
    from ttt_speech.moshi.files import SHIPPED_DIR, MoshiDir, companion
    from ttt_speech.moshi.generate import WavSink, stream, wav_paths, write_outputs
    from ttt_speech.moshi.tiny import build_tiny_hybrid, build_tiny_mimi, tiny_mimi_config

    check_generate(args)
    device = torch_device(args.device)
    use_cpu_threads(args.threads)
    bf16 = bool(args.hybrid or args.moshi_weights) or args.quantize == "int4"
    dtype = torch_dtype(args.dtype, device, bf16)
    check_quantize(args.quantize, device, dtype, args.quantize_compile)
    mimi_weights, mimi_config = args.mimi_weights, args.mimi_config
    model_dir: Path | None = None  # a checkpoint directory: its config.json names the Mimi to decode with
    if args.hybrid or not (args.moshi_weights or args.tiny):
        hybrid = MoshiDir.read(args.hybrid or SHIPPED_DIR, "hybrid checkpoint", hybrid=True)
        model_dir, raw = hybrid.root, hybrid.config
        lm = load_hybrid(model_dir, device=device, dtype=dtype)
        name = f"hybrid {model_dir.resolve().name}" if args.hybrid else "the shipped small TTT hybrid"
    elif args.moshi_weights:
        model_dir, raw = Path(args.config).parent, read_moshi_config(args.config)
        lm = get_moshi_lm(args.moshi_weights, lm_kwargs=lm_kwargs(raw), device=device, dtype=dtype)
        name = f"vanilla Moshi {Path(args.moshi_weights).name}"
    else:
        lm, name = build_tiny_hybrid(args.seed, device, dtype), "tiny TTT hybrid (built in code)"
    if model_dir is not None and not (mimi_weights or args.tiny_mimi):  # the Mimi the checkpoint names
        mimi_weights = companion(model_dir, raw, "mimi_name")
        mimi_config = mimi_config or companion(model_dir, raw, "mimi_config_name")
        if mimi_weights is None:
            print(f"no Mimi beside {model_dir}: writing tokens only (--mimi-weights FILE decodes them to audio)",
                  file=sys.stderr)
    if args.quantize:
        print(quantize_or_exit(lm, args.quantize, args.quantize_compile), file=sys.stderr)
        name += f", {args.quantize} weights"
    mimi = None
    if mimi_weights:
        mimi_cfg = read_json_object(mimi_config, "Mimi config") if mimi_config else None
        mimi = get_mimi(mimi_weights, mimi_cfg, device=device, num_codebooks=max(lm.dep_q, lm.n_q - lm.dep_q))
    elif args.tiny_mimi:
        n = max(lm.dep_q, lm.n_q - lm.dep_q)
        mimi = build_tiny_mimi(args.seed, tiny_mimi_config(n, lm.card), device=device, num_codebooks=n)
    frames = max(1, round(args.minutes * 60 * FRAME_RATE))
    print(f"streaming {frames} frames ({args.minutes:g} min) with {name} on {device}", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sink = WavSink(wav_paths(out, args.batch_size)) if mimi is not None else None
    try:
        result = stream(lm.eval(), frames, batch_size=args.batch_size, mimi=mimi, use_sampling=not args.greedy,
                        temp=args.temp, temp_text=args.temp_text, seed=args.seed, audio_sink=sink)
    finally:
        if sink is not None:
            sink.close()
    check = None
    if not args.no_memory_check:
        from ttt_speech.eval.memory_check import check_memory

        check = check_memory(lm, model_dir, raw if model_dir is not None else None)
    files = write_outputs(result, out, title=f"{name}: {frames} frames, batch {args.batch_size}",
                          extra={"memory_check": check.to_dict()} if check else None)
    files |= {p.stem: p for p in (sink.paths if sink is not None else [])}
    s = result.stats()
    print(f"{s['frames_per_s']:.1f} frames/s, RTF {s['rtf']:.3f}, p50 {s['p50_ms']:.2f} ms, p90 {s['p90_ms']:.2f} ms, "
          f"state {s['state_bytes_last'] / 2**20:.2f} MiB -> {', '.join(str(f) for f in files.values())}")
    if check:
        print(check.line())
    return files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ttt_speech.moshi.commands")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_arguments(sub.add_parser("generate", help="stream N minutes and plot latency/memory"))
    add_convert_arguments(sub.add_parser("convert-moshi", help="convert a Moshi checkpoint to a TTT hybrid"))
    args = parser.parse_args(argv)
    (run_generate if args.command == "generate" else run_convert)(args)


if __name__ == "__main__":
    main()
