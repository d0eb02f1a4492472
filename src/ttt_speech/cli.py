"""`ttt-speech <command>`: a thin front over the modules; each command's code lives in its package.

Only the chosen command's module is imported, and those modules import torch, moshi and transformers
inside their `run` functions, so `ttt-speech X --help` and a refused argument take well under a second.
A `UsageError` (a bad argument or file, see errors.py) ends the command with one line on stderr and
exit code 2; `--debug` or TTT_SPEECH_DEBUG=1 shows its traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from ttt_speech.errors import DEBUG_ENV, DEBUG_FLAG, OneLineParser, debug_requested, one_line_errors

# command -> (module, function adding its arguments, function running it, help)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "generate": ("ttt_speech.eval.generate_command", "add_generate_arguments", "run_generate",
                 "stream N minutes from a memory hybrid (default: the small in-place memory hybrid + codec shipped "
                 "in the package)"),
    "convert-moshi": ("ttt_speech.moshi.commands", "add_convert_arguments", "run_convert",
                      "convert a Moshi checkpoint into a memory hybrid (in-place fast weights by default; "
                      "--branch ttt|gdn)"),
    "init-moshi": ("ttt_speech.scratch.commands", "add_init_arguments", "run_init",
                   "write a new small Moshi-architecture LM (random weights) with a trained codec and a text tokenizer"),
    "convert-hf": ("ttt_speech.hf.cli", "add_arguments", "run",
                   "convert a local transformers Llama/Qwen2 (or LLaMA-Omni) checkpoint into a memory hybrid "
                   "(in-place by default; --branch ttt)"),
    "serve": ("ttt_speech.serve.commands", "add_arguments", "run",
              "serve Moshi's websocket protocol: sessions batched in one step, suspend/resume"),
    "talk": ("ttt_speech.serve.client", "add_arguments", "run",
             "talk to a Moshi-protocol server without a sound card: send a wav, write the reply's audio and text"),
    "eval-long": ("ttt_speech.eval.commands", "add_arguments", "run",
                  "compare models on long held-out sequences: per-position loss, where quality degrades, "
                  "free runs, conversations"),
    "score-free-run": ("ttt_speech.eval.commands", "add_score_arguments", "run_score",
                       "decode a free run eval-long saved (free_run_<name>.npy) and score its audio per minute: "
                       "ASR WER, voice similarity"),
    "probe-memory": ("ttt_speech.eval.commands", "add_probe_arguments", "run_probe",
                     "does a hybrid's memory store a span it has seen? its loss on copies vs never-seen controls"),
    "make-corpus": ("ttt_speech.corpus.commands", "add_arguments", "run",
                    "build an offline long-form English speech corpus: public-domain texts read by local TTS voices"),
    "train-codec": ("ttt_speech.codec.commands", "add_train_arguments", "run_train",
                    "train a small Mimi-architecture codec (24 kHz, 12.5 Hz, 8 codebooks) from wav files"),
    "eval-codec": ("ttt_speech.codec.commands", "add_eval_arguments", "run_eval",
                   "encode/decode held-out audio: mel distance, SI-SNR, ASR WER original vs reconstructed"),
    "tokenize": ("ttt_speech.train.commands", "add_tokenize_arguments", "run_tokenize",
                 "tokenize a moshi-finetune jsonl manifest of stereo wavs into sharded Mimi token files"),
    "train": ("ttt_speech.train.commands", "add_train_arguments", "run_train",
              "fine-tune a TTT hybrid through multi-stage context extension (also under torchrun)"),
    "plot-run": ("ttt_speech.train.commands", "add_plot_run_arguments", "run_plot_run",
                 "write PNG loss curves per stage for a training run directory"),
}


DEBUG_HELP = f"on an error in the input, show the Python traceback instead of one line (or set {DEBUG_ENV}=1)"


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = OneLineParser(prog="ttt-speech", description=__doc__.splitlines()[0])
    parser.add_argument(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, add, _, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == wanted:  # only the chosen command's module is imported
            getattr(importlib.import_module(module), add)(p)
            p.add_argument(DEBUG_FLAG, action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse `argv`, run the command; a UsageError exits 2 with its one line (the traceback with --debug)."""
    argv = sys.argv[1:] if argv is None else argv
    # moshi compiles lazily unless told not to, which costs 4-18 s per first forward on a CPU
    os.environ.setdefault("NO_TORCH_COMPILE", "1")
    prog = " ".join(["ttt-speech", *[a for a in argv if a in COMMANDS][:1]])
    with one_line_errors(prog, debug_requested(argv)):
        args = build_parser(argv).parse_args(argv)
        module, _, run, _ = COMMANDS[args.command]
        code = getattr(importlib.import_module(module), run)(args)
    if isinstance(code, int) and code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
