"""`ttt-speech eval-long`: compare models on long held-out sequences; write report.md, results.json, PNGs.

    ttt-speech eval-long --model A --model B --data held_out/ --lengths 4096,8192,16384,32768,65536 --out report/

For each model: the teacher-forced pass (`long_context.py`; with `--copy-gaps`, also recall of
spans copied verbatim G frames later, `spans.copy_probes`), a free run of `--minutes` after a
prompt taken from the first held-out sequence (`free_run.py`), and with `--dialogues` the long
conversation scores (`conversation.py`). Models are loaded one at a time and freed after their turn.
A Moshi free run's tokens are saved as free_run_<name>.npy (its words per minute as free_run_<name>.txt),
so a machine without ASR or codec files can generate and another score the audio later:

    ttt-speech score-free-run report/free_run_NAME.npy --model MOSHI_DIR [--wav]
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import typing as tp
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ttt_speech.eval.asr import Recognizer, asr_available
from ttt_speech.eval.conversation import score_conversation
from ttt_speech.eval.data import load_sequences
from ttt_speech.eval.free_run import (
    AudioScoring,
    FreeRunResult,
    audio_notes,
    decode_text,
    free_run_hf,
    free_run_moshi,
    score_saved_run,
)
from ttt_speech.eval.gibberish import FRAMES_PER_MINUTE, GibberishThresholds
from ttt_speech.eval.long_context import OOM_ERRORS, evaluate, evaluate_copies
from ttt_speech.eval.models import HFScorer, Loaded, MoshiScorer, moshi_extras, load_model
from ttt_speech.eval.report import Report, saved_run_md, write
from ttt_speech.eval.speaker import SpeakerEmbedder
from ttt_speech.eval.spans import copy_probes, repeat_spans

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
    p.add_argument("--repeats", type=Path, metavar="CORPUS_DIR",
                   help="make-corpus directory: also score its re-read passages, first time vs again")
    p.add_argument("--copy-gaps", type=parse_lengths, metavar="G1,G2,...",
                   help="also score spans copied verbatim G frames after their source in held-out excerpts "
                        "(recall vs distance; e.g. 300,1000,3000,7500)")
    p.add_argument("--copy-span", type=int, default=200, help="frames per copied span (default 200)")
    p.add_argument("--copy-context", type=int, default=250, help="frames before each source span (default 250)")
    p.add_argument("--copy-probes", type=int, default=4, help="excerpts per held-out sequence and gap (default 4)")
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
    _add_audio_arguments(p)
    p.add_argument("--temp", type=float, default=0.8)
    p.add_argument("--temp-text", type=float, default=0.7)
    p.add_argument("--hf-chunk", type=int, default=256, help="tokens per forward call for HF models")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_audio_arguments(p: argparse.ArgumentParser) -> None:
    """The audio tools' options, shared by eval-long and score-free-run."""
    p.add_argument("--mimi", help="Mimi weights for decoding audio, or 'tiny' (default: the model dir's, if any)")
    p.add_argument("--mimi-config", type=Path, help="Mimi config JSON for --mimi (default: the released Mimi's)")
    p.add_argument("--tokenizer", type=Path, help="SentencePiece model of the text stream (for WER)")
    p.add_argument("--no-asr", action="store_true", help="skip pocketsphinx even when installed")
    p.add_argument("--speaker", choices=("auto", "mfcc"), default="auto",
                   help="voice measure: auto (Resemblyzer if installed, else MFCC statistics) or mfcc")


def _audio_scoring(args: argparse.Namespace, device: torch.device, notes: list[str], *, n_codebooks: int, card: int,
                   mimi_path: Path | None = None, mimi_config: dict[str, tp.Any] | None = None,
                   tokenizer_path: Path | None = None) -> AudioScoring:
    """Mimi, tokenizer, ASR and speaker embedder, each only if available (--mimi, --tokenizer over a model
    directory's files); ASR and embedder only with a Mimi, as they need its audio."""
    n = n_codebooks
    mimi = None
    if args.mimi == "tiny":
        from ttt_speech.moshi.tiny import build_tiny_mimi, tiny_mimi_config

        mimi = build_tiny_mimi(args.seed, tiny_mimi_config(n, card), device=device, num_codebooks=n)
    elif args.mimi or mimi_path:
        from moshi.models.loaders import get_mimi

        path = args.mimi or str(mimi_path)
        cfg = json.loads(args.mimi_config.read_text()) if args.mimi_config else (None if args.mimi else mimi_config)
        mimi = get_mimi(path, cfg, device=device, num_codebooks=n)
    scoring = AudioScoring(mimi=mimi)
    tokenizer = args.tokenizer or tokenizer_path
    if tokenizer:
        import sentencepiece

        scoring.tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer))
    if mimi is None:
        return scoring
    reason = "--no-asr" if args.no_asr else asr_available()
    if reason is None:
        scoring.recognizer = Recognizer()
    elif reason not in notes:
        notes.append(reason)
    scoring.embedder = SpeakerEmbedder(prefer_resemblyzer=args.speaker == "auto")
    return scoring


def _model_scoring(args: argparse.Namespace, loaded: Loaded, device: torch.device, notes: list[str]) -> AudioScoring:
    """`_audio_scoring` for a loaded Moshi model and the files its directory provides."""
    lm = loaded.scorer.model
    return _audio_scoring(args, device, notes, n_codebooks=max(lm.dep_q, lm.n_q - lm.dep_q), card=lm.card,
                          mimi_path=loaded.mimi_path, mimi_config=loaded.mimi_config,
                          tokenizer_path=loaded.tokenizer_path)


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
    spans = repeat_spans(args.repeats) if args.repeats else None
    if spans is not None and not any(s.source in spans for s in sequences):
        raise ValueError(f"{args.repeats}: none of its re-read passages is in {args.data}")
    probes, probe_spans = (copy_probes(sequences, args.copy_gaps, args.copy_span, args.copy_context, args.copy_probes)
                           if args.copy_gaps else ([], {}))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not callable(v)}
    report = Report(settings | {"device": str(device), "dtype": str(dtype), "sequences": [s.name for s in sequences]})
    report.thresholds = GibberishThresholds()
    for spec in args.model:
        print(f"eval-long: {spec}", file=sys.stderr)
        loaded = load_model(spec, device, dtype, args.seed, args.hf_chunk)
        scorer = loaded.scorer
        report.long_context.append(evaluate(
            scorer, sequences, args.lengths, baseline_length=args.baseline_length, threshold=args.threshold,
            quality_stream=args.quality_stream, batch_size=args.batch_size, progress=progress, spans=spans))
        if probes:
            report.long_context[-1].copy_loss = evaluate_copies(scorer, probes, probe_spans, args.copy_gaps,
                                                                batch_size=args.batch_size, progress=progress)
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
            scoring = _model_scoring(args, loaded, device, report.notes)
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
    scoring = _model_scoring(args, loaded, device, report.notes)
    result = free_run_moshi(scorer.model, scorer.name, frames, prompt=first[:, :P] if P else None, scoring=scoring,
                            thresholds=report.thresholds, temp=args.temp, temp_text=args.temp_text, seed=args.seed,
                            progress=progress, frames_per_minute=args.frames_per_minute)
    lm = scorer.model
    _save_free_run(args.out, result, scoring, (lm.text_padding_token_id, lm.end_of_text_padding_id),
                   args.frames_per_minute)
    return result


def _save_free_run(out: Path, run: FreeRunResult, scoring: AudioScoring, pad_ids: tuple[int, ...],
                   frames_per_minute: int) -> None:
    """free_run_<name>.npy (the run's tokens) and, with a tokenizer, free_run_<name>.txt (its words per
    minute), so the audio can be scored later where ASR and the codec are (`ttt-speech score-free-run`)."""
    assert run.tokens is not None and run.text is not None
    out.mkdir(parents=True, exist_ok=True)
    stem = "free_run_" + re.sub(r"[^\w.-]", "_", run.name)
    np.save(out / f"{stem}.npy", run.tokens)
    if scoring.tokenizer is not None:
        (out / f"{stem}.txt").write_text("".join(
            f"minute {m + 1}: {decode_text(scoring.tokenizer, run.text[lo:lo + frames_per_minute], pad_ids)}\n"
            for m, lo in enumerate(range(0, run.frames, frames_per_minute))))
    run.notes.append(f"tokens saved: {stem}.npy (`ttt-speech score-free-run {out / stem}.npy --model DIR` "
                     "scores their audio)")


def add_score_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("tokens", type=Path, help="free_run_<name>.npy saved by eval-long: [1 + dep_q, frames] tokens")
    p.add_argument("--model", required=True, type=Path, metavar="DIR",
                   help="the run's Moshi directory: config.json (pad ids, codebooks) and the Mimi and tokenizer "
                        "files it names")
    p.add_argument("--out", type=Path, metavar="DIR", help="output directory (default: the tokens' directory)")
    p.add_argument("--wav", action="store_true", help="also write the decoded audio as <stem>.wav (24 kHz mono)")
    p.add_argument("--frames-per-minute", type=int, default=FRAMES_PER_MINUTE,
                   help=argparse.SUPPRESS)  # as given to eval-long; tests shorten "minutes"
    _add_audio_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="seed of --mimi tiny (as given to eval-long)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def run_score(args: argparse.Namespace) -> dict[str, Path]:
    """Decode a saved free run and score its audio per minute: writes <stem>_audio.json, <stem>_audio.md and,
    with --wav, <stem>.wav; returns the written files."""
    config = args.model / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{args.model}: no config.json (a Moshi checkpoint directory is needed)")
    raw = json.loads(config.read_text())
    tokens = np.load(args.tokens)
    if tokens.ndim != 2 or tokens.shape[0] != 1 + raw["dep_q"]:
        raise ValueError(f"{args.tokens}: {tokens.shape} tokens, {args.model} generates [1 + {raw['dep_q']}, frames]")
    notes: list[str] = []
    scoring = _audio_scoring(args, torch.device(args.device), notes, card=raw["card"],
                             n_codebooks=max(raw["dep_q"], raw["n_q"] - raw["dep_q"]), **moshi_extras(args.model, raw))
    if scoring.mimi is None:
        raise FileNotFoundError(f"{args.model}: no Mimi weights ({raw.get('mimi_name', 'mimi.safetensors')}); "
                                "give --mimi")
    pad_ids = (raw.get("existing_text_padding_id", 3), raw.get("existing_text_end_padding_id", 0))  # LMModel's defaults
    out = args.out or args.tokens.parent
    out.mkdir(parents=True, exist_ok=True)
    stem = args.tokens.stem
    files = {"json": out / f"{stem}_audio.json", "md": out / f"{stem}_audio.md"}
    if args.wav:
        files["wav"] = out / f"{stem}.wav"
    minutes = score_saved_run(tokens, scoring, pad_ids, args.frames_per_minute, files.get("wav"))
    notes += audio_notes(scoring)
    files["json"].write_text(json.dumps([asdict(m) for m in minutes], indent=1) + "\n")
    files["md"].write_text(saved_run_md(stem, minutes, scoring.embedder.method if scoring.embedder else None, notes))
    print(f"{stem}: {len(minutes)} minutes scored -> {files['md']}", file=sys.stderr)
    return files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ttt_speech.eval.commands", description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
