"""`ttt-speech eval-long`: compare models on long held-out sequences; write report.md, results.json, PNGs.

    ttt-speech eval-long --model A --model B --data held_out/ --lengths 4096,8192,16384,32768,65536 --out report/

For each model: the teacher-forced pass (`long_context.py`), a free run of `--minutes` after a
prompt taken from the first held-out sequence (`free_run.py`), and with `--dialogues` the long
conversation scores (`conversation.py`). Models are loaded one at a time and freed after their turn.
"""

from __future__ import annotations

import argparse
import gc
import sys
import typing as tp
from pathlib import Path

import torch

from ttt_speech.eval.asr import Recognizer, asr_available
from ttt_speech.eval.conversation import score_conversation
from ttt_speech.eval.data import load_sequences
from ttt_speech.eval.free_run import AudioScoring, free_run_hf, free_run_moshi
from ttt_speech.eval.gibberish import FRAMES_PER_MINUTE, GibberishThresholds
from ttt_speech.eval.long_context import OOM_ERRORS, evaluate
from ttt_speech.eval.models import HFScorer, Loaded, MoshiScorer, load_model
from ttt_speech.eval.report import Report, write
from ttt_speech.eval.speaker import SpeakerEmbedder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_LENGTHS = "4096,8192,16384,32768,65536"


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad length list {text!r}; use e.g. 4096,8192,16384") from None
    if not lengths or lengths[0] < 2:
        raise argparse.ArgumentTypeError(f"lengths must be integers >= 2, got {text!r}")
    return lengths


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", required=True, metavar="[NAME=]SPEC",
                   help="tiny | tiny-vanilla | Moshi hybrid dir | vanilla Moshi dir | transformers dir (repeatable)")
    p.add_argument("--data", required=True, type=Path, help="held-out token shards ([K, T] .npy/.safetensors)")
    p.add_argument("--dialogues", type=Path, help="held-out two-speaker dialogue shards (Moshi's layout)")
    p.add_argument("--out", type=Path, default=Path("report"), help="output directory")
    p.add_argument("--lengths", type=parse_lengths, default=parse_lengths(DEFAULT_LENGTHS),
                   help=f"positions (Moshi frames, HF tokens) to test (default {DEFAULT_LENGTHS})")
    p.add_argument("--baseline-length", type=int, help="short-context baseline B, scored on [B/2, B) "
                   "(default: a quarter of the shortest length)")
    p.add_argument("--threshold", type=float, default=0.9, help="degraded below this x the baseline quality")
    p.add_argument("--quality-stream", choices=("text", "audio", "all"), default="text",
                   help="streams whose loss defines quality (default: text)")
    p.add_argument("--batch-size", type=int, default=1, help="held-out sequences streamed together")
    p.add_argument("--max-sequences", type=int, help="use only the first N held-out sequences")
    p.add_argument("--minutes", type=float, default=5.0, help="free-run length in minutes (0: no free run)")
    p.add_argument("--prompt-frames", type=int, default=250, help="prompt taken from the first held-out sequence")
    p.add_argument("--frames-per-minute", type=int, default=FRAMES_PER_MINUTE,
                   help=argparse.SUPPRESS)  # tests shorten "minutes"
    p.add_argument("--conversation-minutes", type=float, help="score only the first N minutes of each dialogue")
    p.add_argument("--mimi", help="Mimi weights for decoding audio, or 'tiny' (default: the model dir's, if any)")
    p.add_argument("--mimi-config", type=Path, help="Mimi config JSON for --mimi (default: the released Mimi's)")
    p.add_argument("--tokenizer", type=Path, help="SentencePiece model of the text stream (for WER)")
    p.add_argument("--no-asr", action="store_true", help="skip pocketsphinx even when installed")
    p.add_argument("--speaker", choices=("auto", "mfcc"), default="auto",
                   help="voice measure: auto (Resemblyzer if installed, else MFCC statistics) or mfcc")
    p.add_argument("--temp", type=float, default=0.8)
    p.add_argument("--temp-text", type=float, default=0.7)
    p.add_argument("--hf-chunk", type=int, default=256, help="tokens per forward call for HF models")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _audio_scoring(args: argparse.Namespace, loaded: Loaded, device: torch.device, notes: list[str]) -> AudioScoring:
    """Mimi, tokenizer, ASR and speaker embedder for a Moshi model, each only if available."""
    lm = loaded.scorer.model
    n = max(lm.dep_q, lm.n_q - lm.dep_q)
    mimi = None
    if args.mimi == "tiny":
        from ttt_speech.moshi.tiny import build_tiny_mimi, tiny_mimi_config

        mimi = build_tiny_mimi(args.seed, tiny_mimi_config(n, lm.card), device=device, num_codebooks=n)
    elif args.mimi or loaded.mimi_path:
        import json

        from moshi.models.loaders import get_mimi

        path = args.mimi or str(loaded.mimi_path)
        cfg = json.loads(args.mimi_config.read_text()) if args.mimi_config else (None if args.mimi else loaded.mimi_config)
        mimi = get_mimi(path, cfg, device=device, num_codebooks=n)
    scoring = AudioScoring(mimi=mimi)
    if mimi is None:
        return scoring
    tokenizer = args.tokenizer or loaded.tokenizer_path
    if tokenizer:
        import sentencepiece

        scoring.tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer))
    reason = "--no-asr" if args.no_asr else asr_available()
    if reason is None:
        scoring.recognizer = Recognizer()
    elif reason not in notes:
        notes.append(reason)
    scoring.embedder = SpeakerEmbedder(prefer_resemblyzer=args.speaker == "auto")
    return scoring


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(args: argparse.Namespace) -> dict[str, Path]:
    """Evaluate every --model in turn and write the report; returns the written files."""
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    progress = not args.no_progress
    sequences = load_sequences(args.data, args.max_sequences)
    dialogues = load_sequences(args.dialogues) if args.dialogues else []
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not callable(v)}
    report = Report(settings | {"device": str(device), "dtype": str(dtype), "sequences": [s.name for s in sequences]})
    report.thresholds = GibberishThresholds()
    for spec in args.model:
        print(f"eval-long: {spec}", file=sys.stderr)
        loaded = load_model(spec, device, dtype, args.seed, args.hf_chunk)
        scorer = loaded.scorer
        report.long_context.append(evaluate(
            scorer, sequences, args.lengths, baseline_length=args.baseline_length, threshold=args.threshold,
            quality_stream=args.quality_stream, batch_size=args.batch_size, progress=progress))
        _free(device)
        frames = round(args.minutes * args.frames_per_minute)
        if frames > 0:
            try:
                report.free_runs.append(_free_run(args, loaded, sequences[0].tokens, frames, device, report,
                                                  progress))
            except OOM_ERRORS as e:
                report.notes.append(f"{scorer.name}: free run ran out of memory ({type(e).__name__}: {str(e)[:200]})")
            _free(device)
        if dialogues and isinstance(scorer, MoshiScorer):
            scoring = _audio_scoring(args, loaded, device, report.notes)
            for dialogue in dialogues:
                report.conversations.append(score_conversation(
                    scorer, dialogue, minutes=args.conversation_minutes, scoring=scoring, seed=args.seed,
                    progress=progress, frames_per_minute=args.frames_per_minute))
        elif dialogues:
            report.notes.append(f"{scorer.name}: conversations need a Moshi model (two audio streams); skipped")
        del loaded, scorer
        _free(device)
    files = write(report, args.out)
    for r in report.long_context:
        verdict = f"degrades at {r.degraded_at}" if r.degraded_at else "holds"
        print(f"{r.name}: baseline loss {r.baseline_loss}, {verdict}" + (f", OOM at {r.oom_at}" if r.oom_at else ""),
              file=sys.stderr)
    print(f"report -> {files['report']}", file=sys.stderr)
    return files


def _free_run(args: argparse.Namespace, loaded: Loaded, first: torch.Tensor, frames: int, device: torch.device,
              report: Report, progress: bool) -> tp.Any:
    scorer = loaded.scorer
    P = min(args.prompt_frames, first.shape[-1])
    if isinstance(scorer, HFScorer):
        prompt = first[0, :max(P, 1)].clamp(min=0)
        return free_run_hf(scorer.model, scorer.name, frames, prompt=prompt, cache=scorer.new_cache(),
                           thresholds=report.thresholds, temp=args.temp, seed=args.seed, progress=progress,
                           frames_per_minute=args.frames_per_minute)
    scoring = _audio_scoring(args, loaded, device, report.notes)
    return free_run_moshi(scorer.model, scorer.name, frames, prompt=first[:, :P] if P else None, scoring=scoring,
                          thresholds=report.thresholds, temp=args.temp, temp_text=args.temp_text, seed=args.seed,
                          progress=progress, frames_per_minute=args.frames_per_minute)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ttt_speech.eval.commands", description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
