"""Command-line implementation of `ttt-speech generate`: stream N minutes from a Moshi model, then one line on its memory.

It sits on eval's floor because its last step is an evaluation (`eval.memory_check`: a held-out passage heard
again 10 attention windows later, scored with the memory and with it reset); the streaming itself is
`moshi.generate`. cli.py adds a subparser, calls `add_generate_arguments(parser)` and dispatches to
`run_generate(args)`; the module can also run alone: `python -m ttt_speech.eval.generate_command --minutes 1`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ttt_speech.devices import DTYPE_NAMES, torch_device, torch_dtype
from ttt_speech.errors import (UsageError, check_safetensors, nonnegative_float, output_dir, positive_float,
                               positive_int, read_json_object)
from ttt_speech.moshi.commands import add_quantize_argument, check_quantize, quantize_or_exit
from ttt_speech.threads import add_threads_argument, use_cpu_threads


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("model (default: the small in-place memory hybrid + codec shipped in the package)")
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
    from ttt_speech.eval.memory_check import check_memory
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
        name = f"hybrid {model_dir.resolve().name}" if args.hybrid else "the shipped small in-place memory hybrid"
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
    parser = argparse.ArgumentParser(prog="python -m ttt_speech.eval.generate_command")
    add_generate_arguments(parser)
    run_generate(parser.parse_args(argv))


if __name__ == "__main__":
    main()
