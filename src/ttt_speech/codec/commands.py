"""`ttt-speech train-codec CONFIG` and `ttt-speech eval-codec CKPT_DIR --data ...` (cli.py wires them in)."""

from __future__ import annotations

import argparse
import os
import sys

from ttt_speech.devices import torch_device
from ttt_speech.errors import (DEBUG_FLAG, OneLineParser, UsageError, debug_requested, int_list, one_line_errors,
                               output_dir, positive_float, positive_int)
from ttt_speech.threads import add_threads_argument, use_cpu_threads

# moshi compiles lazily unless told not to, which costs seconds per first forward on a CPU
os.environ.setdefault("NO_TORCH_COMPILE", "1")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    from ttt_speech.engine.commands import add_run_arguments

    add_run_arguments(p, "codec training config (YAML); see configs/codec_small.yaml",
                      "--set data.train=[corpus/train.jsonl]", "unreadable audio files")


def run_train(args: argparse.Namespace) -> int:
    """Train or resume; 0 when all stages are done and the codec is exported to RUN_DIR/export."""
    from ttt_speech.codec.config import load_codec_config
    from ttt_speech.codec.loop import train_codec
    from ttt_speech.engine.commands import config_overrides, end_run

    use_cpu_threads(args.threads)
    result = train_codec(load_codec_config(args.config, config_overrides(args)))
    end_run(result, "audio")
    print(f"codec exported to {result.export}")
    return 0


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="exported codec directory (mimi.safetensors + mimi_config.json) or its run dir")
    p.add_argument("--data", action="append", required=True,
                   help="held-out audio: jsonl manifest, wav directory or wav file (repeatable)")
    p.add_argument("--seconds", type=positive_float, default=20.0, help="seconds per clip")
    p.add_argument("--clips", type=positive_int, default=1,
                   help="clips per file and channel, evenly spaced from start to end (default: 1, the start)")
    p.add_argument("--max-clips", type=positive_int, default=50, help="evaluate at most this many channels of files")
    p.add_argument("--codebooks", type=int_list, default=None,
                   help="codebook counts to compare, e.g. 2,4,8 (default: all)")
    p.add_argument("--no-asr", action="store_true", help="skip pocketsphinx WER even when it is installed")
    p.add_argument("--out", help="write codec_eval.json (summary + every clip) to this directory")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is one)")
    add_threads_argument(p)


def run_eval(args: argparse.Namespace) -> int:
    from ttt_speech.codec.data import find_audio
    from ttt_speech.codec.evaluate import evaluate_codec, format_table, summarize, write_report
    from ttt_speech.codec.model import check_codec_dir, load_codec
    from ttt_speech.engine.skips import SkipLog

    device = torch_device(args.device)
    use_cpu_threads(args.threads)
    n_q = check_codec_dir(args.checkpoint)["quantizer"]["n_q"]
    if args.codebooks and args.codebooks[-1] > n_q:
        raise UsageError(f"--codebooks {','.join(map(str, args.codebooks))}: the codec has {n_q} codebooks")
    if args.out:
        output_dir(args.out)
    examples = find_audio(args.data, SkipLog())[: args.max_clips]
    mimi = load_codec(args.checkpoint, device)
    scores = evaluate_codec(mimi, examples, args.seconds, args.codebooks, asr=not args.no_asr, clips=args.clips)
    print(format_table(summarize(scores)))
    if args.out:
        print(f"wrote {write_report(scores, args.out)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m ttt_speech.codec [train] CONFIG ...` or `python -m ttt_speech.codec eval CKPT_DIR --data ...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != DEBUG_FLAG]
    evaluating = bool(argv) and argv[0] == "eval"
    if argv and argv[0] in ("train", "eval"):
        argv = argv[1:]
    prog = "python -m ttt_speech.codec" + (" eval" if evaluating else "")
    with one_line_errors(prog, debug):
        p = OneLineParser(prog=prog)
        (add_eval_arguments if evaluating else add_train_arguments)(p)
        return (run_eval if evaluating else run_train)(p.parse_args(argv))
