"""Command-line entry points: `ttt-speech train | tokenize | plot-run` (argparse; cli.py wires them in).

`python -m ttt_speech.train CONFIG.yaml` (alone, or under `torchrun --nproc-per-node N`) runs
`train`; `python -m ttt_speech.train tokenize ...` and `... plot-run RUN_DIR` the others.
"""

from __future__ import annotations

import argparse
import os
import sys

from ttt_speech.devices import torch_device
from ttt_speech.engine.commands import add_run_arguments, config_overrides, end_run
from ttt_speech.errors import (DEBUG_FLAG, OneLineParser, debug_requested, existing_dir, existing_file, one_line_errors,
                               output_dir, positive_int, read_json_object)
from ttt_speech.threads import add_threads_argument, use_cpu_threads

# moshi compiles lazily unless told not to, which costs seconds per first forward on a CPU
os.environ.setdefault("NO_TORCH_COMPILE", "1")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, "training config (YAML); see configs/*.yaml",
                      "--set train.batch_size=8 --set run_dir=runs/x", "unusable data files")


def run_train(args: argparse.Namespace) -> int:
    """Train or resume; returns 0 when all stages are done, exits with EXIT_INTERRUPTED after a SIGTERM stop."""
    from ttt_speech.train.config import load_config
    from ttt_speech.train.loop import train

    if args.run_dir:
        output_dir(args.run_dir)
    use_cpu_threads(args.threads)
    end_run(train(load_config(args.config, config_overrides(args))), "data")
    return 0


def add_tokenize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", help='jsonl manifest: one {"path": "rel/a.wav", "duration": 24.5} per line')
    p.add_argument("--out", required=True, help="output directory (index.json + safetensors shards)")
    p.add_argument("--checkpoint", required=True,
                   help="Moshi checkpoint directory (config.json naming Mimi and the text tokenizer) or hub repo")
    p.add_argument("--mimi-config", help="Mimi config JSON, when config.json does not name one (default: released)")
    p.add_argument("--main-speaker", default="SPEAKER_MAIN", help="speaker label whose words form the text stream")
    p.add_argument("--shard-frames", type=positive_int, default=1 << 20,
                   help="frames per output shard (12.5 per second)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is one)")
    add_threads_argument(p)
    p.add_argument("--skip-bad", action="store_true", help="skip (log and count) bad files instead of stopping")


def run_tokenize(args: argparse.Namespace) -> int:
    from ttt_speech.train.tokenize import MoshiTokenizer, tokenize

    device = str(torch_device(args.device))
    use_cpu_threads(args.threads)
    existing_file(args.manifest, "jsonl manifest")
    output_dir(args.out)
    if args.mimi_config:
        read_json_object(args.mimi_config, "Mimi config")
    tok = MoshiTokenizer.from_checkpoint(args.checkpoint, args.mimi_config, device, args.main_speaker)
    report = tokenize(args.manifest, args.out, tok, skip_bad=args.skip_bad, shard_frames=args.shard_frames)
    print(f"{report.documents} conversation(s), {report.frames} frames ({report.frames / 12.5 / 3600:.2f} h) "
          f"-> {report.out_dir}" + (f"; skipped {len(report.skipped)} bad file(s)" if report.skipped else ""))
    return 0


def add_plot_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="training run directory (holds metrics.jsonl)")
    p.add_argument("--out", help="output directory (default: RUN_DIR/plots)")


def run_plot_run(args: argparse.Namespace) -> int:
    from ttt_speech.engine.metrics import METRICS_NAME
    from ttt_speech.train.plots import plot_run

    existing_file(existing_dir(args.run_dir, "training run directory") / METRICS_NAME, "metrics file")
    if args.out:
        output_dir(args.out)

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0


COMMANDS = {
    "tokenize": (add_tokenize_arguments, run_tokenize, "tokenize stereo conversations with Mimi"),
    "plot-run": (add_plot_run_arguments, run_plot_run, "PNG loss curves of a training run"),
}


def main(argv: list[str] | None = None) -> int:
    """`python -m ttt_speech.train [train] CONFIG | tokenize ... | plot-run RUN_DIR` (also under torchrun): bad
    input ends with one line and exit code 2, as `ttt-speech` does."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != DEBUG_FLAG]
    name = argv[0] if argv and argv[0] in (*COMMANDS, "train") else "train"
    prog = "python -m ttt_speech.train" + (f" {name}" if name != "train" else "")
    with one_line_errors(prog, debug):
        if name in COMMANDS:
            add, run, help_ = COMMANDS[name]
            p = OneLineParser(prog=prog, description=help_)
            add(p)
            return run(p.parse_args(argv[1:]))
        p = OneLineParser(prog=prog, description="train a TTT hybrid (see configs/)")
        add_train_arguments(p)
        return run_train(p.parse_args(argv[1:] if argv and argv[0] == "train" else argv))
