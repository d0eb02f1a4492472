"""Command-line implementations for `ttt-speech generate` and `ttt-speech convert-moshi`.

cli.py adds a subparser, calls `add_*_arguments(parser)` and dispatches to `run_*(args)`; each
module can also run alone: `python -m ttt_speech.moshi.commands generate --minutes 1`.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing as tp
from pathlib import Path

import torch
from moshi.models.lm import LMModel
from moshi.models.loaders import get_mimi, get_moshi_lm

from ttt_speech.moshi.checkpoint import CONFIG_NAME, companion, copy_companions, load_hybrid
from ttt_speech.moshi.config import lm_kwargs
from ttt_speech.moshi.convert import BRANCHES, convert, default_branch_config
from ttt_speech.moshi.generate import FRAME_RATE, WavSink, stream, wav_paths, write_outputs
from ttt_speech.moshi.scratch import SHIPPED_DIR
from ttt_speech.moshi.tiny import build_tiny_hybrid, build_tiny_mimi, tiny_mimi_config
from ttt_speech.quantize import MODES as QUANT_MODES
from ttt_speech.quantize import Mode as QuantMode
from ttt_speech.quantize import quantize_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def _ttt_overrides(args: argparse.Namespace) -> dict[str, tp.Any]:
    over: dict[str, tp.Any] = json.loads(Path(args.ttt_config).read_text()) if args.ttt_config else {}
    branch = getattr(args, "branch", "ttt")
    for key in (*TTT_ONLY_FLAGS, "gate_init"):
        if getattr(args, key) is not None:
            if branch != "ttt" and key in TTT_ONLY_FLAGS:
                raise SystemExit(f"--{key.replace('_', '-')} is a TTT option; it does not apply to --branch {branch}")
            over[key] = getattr(args, key)
    return over


def add_ttt_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layers", type=parse_layers, default="all",
                   help="temporal-transformer layers to convert: all, 24-31, 0,2,5-7 (default: all)")
    p.add_argument("--mode", choices=("hybrid", "replace"), default="hybrid",
                   help="hybrid: attention + gated TTT branch (default); replace: TTT instead of attention")
    p.add_argument("--branch", choices=tuple(BRANCHES), default="ttt",
                   help="memory branch: ttt (default) or gdn (Gated DeltaNet; --mode hybrid only)")
    p.add_argument("--ttt-config", help="JSON file of TTTConfig (or, with --branch gdn, GatedDeltaNetConfig) "
                                        "fields (dim/num_heads default to the model's)")
    p.add_argument("--inner", choices=("linear", "mlp"), help="TTT inner model")
    p.add_argument("--mini-batch", type=int, help="TTT mini-batch size")
    p.add_argument("--variant", choices=("ttt-lm", "fla"), help="TTT update rule")
    p.add_argument("--gate-init", type=float, help="initial gate alpha (hybrid: 0 keeps the logits unchanged)")
    p.add_argument("--shared-qkv", action="store_true", default=None,
                   help="TTT reads the attention's own q/k/v projection and joins its heads before the output "
                        "projection: no extra weights per layer, the fast hybrid (hybrid mode, TTT only)")


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--moshi-weights", required=True, help="Moshi model.safetensors")
    p.add_argument("--config", required=True, help="Moshi config.json")
    p.add_argument("--out", required=True, help="output directory (model.safetensors + config.json)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    add_ttt_arguments(p)


def run_convert(args: argparse.Namespace) -> Path:
    """Load a released Moshi, convert it, save the hybrid checkpoint."""
    raw = json.loads(Path(args.config).read_text())
    lm = get_moshi_lm(args.moshi_weights, lm_kwargs=lm_kwargs(raw), dtype=DTYPES[args.dtype])
    branch = getattr(args, "branch", "ttt")
    try:
        cfg = default_branch_config(lm, args.mode, branch, **_ttt_overrides(args))
    except ValueError as e:
        raise SystemExit(f"convert-moshi: {e}") from None
    hybrid = convert(lm, args.layers, args.mode, cfg, moshi_config=raw)
    out = hybrid.save_pretrained(args.out)
    carried = copy_companions(Path(args.config).parent, out, raw)  # generate / serve on `out` then decode and speak as is
    for key, what, flag in (("mimi_name", "Mimi", "--mimi-weights / serve --mimi"),
                            ("tokenizer_name", "tokenizer", "serve --tokenizer")):
        if companion(out, json.loads((out / CONFIG_NAME).read_text()), key) is None:
            print(f"convert-moshi: no {what} beside {args.config}; generate/serve on {out} need {flag}",
                  file=sys.stderr)
    n = sum(p.numel() for layer in hybrid.ttt_layers() for p in layer.ttt.parameters())
    print(f"converted layers {list(hybrid.ttt_spec.layers)} ({args.mode}, {n / 1e6:.1f}M {branch.upper()} "
          f"parameters) -> {out} (with {', '.join(carried) or 'no codec or tokenizer'})")
    return out


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("model (default: the small TTT hybrid + codec shipped in the package)")
    src.add_argument("--hybrid", help="directory written by convert-moshi / save_pretrained")
    src.add_argument("--tiny", action="store_true", help="a tiny random TTT hybrid built in code (tests, speed)")
    src.add_argument("--moshi-weights", help="vanilla Moshi model.safetensors (needs --config)")
    src.add_argument("--config", help="Moshi config.json for --moshi-weights")
    src.add_argument("--mimi-weights", help="Mimi checkpoint: decode the generated audio to a wav")
    src.add_argument("--mimi-config", help="Mimi config JSON (default: the released Mimi's)")
    src.add_argument("--tiny-mimi", action="store_true", help="decode with a tiny random Mimi (demo of the audio path)")
    p.add_argument("--minutes", type=float, default=1.0, help="minutes of audio to stream (12.5 frames/s)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--out", default="generate_out", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    p.add_argument("--temp", type=float, default=0.8)
    p.add_argument("--temp-text", type=float, default=0.7)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="default: bfloat16 on CUDA for real weights or int4, float32 otherwise")
    add_quantize_argument(p)


def add_quantize_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", choices=QUANT_MODES,
                   help="weight-only quantization of the linear layers with torchao (int4: CUDA + bfloat16); "
                        'TTT states stay fp32. Needs pip install -e ".[quant]"')


def quantize_or_exit(lm: LMModel, mode: str) -> str:
    """`quantize_weights` for a command: a missing torchao or an unsupported setup ends it with the reason."""
    try:
        return quantize_weights(lm, tp.cast(QuantMode, mode)).summary()
    except (ImportError, ValueError) as e:
        raise SystemExit(f"--quantize {mode}: {e}") from None


def run_generate(args: argparse.Namespace) -> dict[str, Path]:
    device = torch.device(args.device)
    bf16 = bool(args.hybrid or args.moshi_weights) or args.quantize == "int4"
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if bf16 and device.type == "cuda" else torch.float32)
    mimi_weights, mimi_config = args.mimi_weights, args.mimi_config
    model_dir: Path | None = None  # a checkpoint directory: its config.json names the Mimi to decode with
    if args.hybrid or not (args.moshi_weights or args.tiny):
        model_dir = Path(args.hybrid) if args.hybrid else SHIPPED_DIR
        lm, raw = load_hybrid(model_dir, device=device, dtype=dtype), json.loads((model_dir / CONFIG_NAME).read_text())
        name = f"hybrid {args.hybrid}" if args.hybrid else f"small TTT hybrid ({SHIPPED_DIR})"
    elif args.moshi_weights:
        if not args.config:
            raise SystemExit("--moshi-weights needs --config")
        model_dir, raw = Path(args.config).parent, json.loads(Path(args.config).read_text())
        lm = get_moshi_lm(args.moshi_weights, lm_kwargs=lm_kwargs(raw), device=device, dtype=dtype)
        name = f"vanilla Moshi {args.moshi_weights}"
    else:
        lm, name = build_tiny_hybrid(args.seed, device, dtype), "tiny TTT hybrid (built in code)"
    if model_dir is not None and not (mimi_weights or args.tiny_mimi):  # the Mimi the checkpoint names
        mimi_weights = companion(model_dir, raw, "mimi_name")
        mimi_config = mimi_config or companion(model_dir, raw, "mimi_config_name")
        if mimi_weights is None:
            print(f"no Mimi beside {model_dir}: writing tokens only (--mimi-weights FILE decodes them to audio)",
                  file=sys.stderr)
    if args.quantize:
        print(quantize_or_exit(lm, args.quantize), file=sys.stderr)
        name += f", {args.quantize} weights"
    mimi = None
    if mimi_weights:
        mimi_cfg = json.loads(Path(mimi_config).read_text()) if mimi_config else None
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
    files = write_outputs(result, out, title=f"{name}: {frames} frames, batch {args.batch_size}")
    files |= {p.stem: p for p in (sink.paths if sink is not None else [])}
    s = result.stats()
    print(f"{s['frames_per_s']:.1f} frames/s, RTF {s['rtf']:.3f}, p50 {s['p50_ms']:.2f} ms, p90 {s['p90_ms']:.2f} ms, "
          f"state {s['state_bytes_last'] / 2**20:.2f} MiB -> {', '.join(str(f) for f in files.values())}")
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
