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

from ttt_speech.devices import DTYPE_NAMES, torch_device, torch_dtype
from ttt_speech.errors import (UsageError, check_safetensors, existing_dir, existing_file, int_list, nonnegative_float,
                               nonnegative_int, output_dir, positive_float, positive_float_list, positive_int,
                               read_json_object)
from ttt_speech.threads import add_threads_argument, use_cpu_threads

if tp.TYPE_CHECKING:
    import torch

    from ttt_speech.eval.data import Sequence
    from ttt_speech.eval.free_run import AudioScoring, FreeRunResult
    from ttt_speech.eval.models import Loaded, Spec
    from ttt_speech.eval.report import Report
    from ttt_speech.moshi.files import MoshiDir

DEFAULT_LENGTHS = "4096,8192,16384,32768,65536"
FRAMES_PER_MINUTE = 750  # eval/gibberish.py's, literal so that --help imports no numpy (a test holds them equal)


def parse_lengths(text: str) -> list[int]:
    """Comma-separated positions >= 2, sorted, repeats dropped (a window [L/2, L) must hold a position)."""
    lengths = int_list(text)
    if lengths[0] < 2:
        raise argparse.ArgumentTypeError(f"lengths must be integers >= 2, got {text!r}")
    return lengths


def parse_length(text: str) -> int:
    """One length >= 2 (its window [L/2, L) must hold a position)."""
    lengths = parse_lengths(text)
    if len(lengths) != 1:
        raise argparse.ArgumentTypeError(f"give one length, got {text!r}")
    return lengths[0]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", required=True, metavar="[NAME=]SPEC",
                   help="tiny | tiny-vanilla | Moshi hybrid dir | vanilla Moshi dir | transformers dir (repeatable)")
    p.add_argument("--data", required=True, type=Path, help="held-out token shards ([K, T] .npy/.safetensors)")
    p.add_argument("--repeats", type=Path, metavar="CORPUS_DIR",
                   help="make-corpus directory (or a directory of them, for shards packed from several): "
                        "also score its re-read passages, first time vs again")
    p.add_argument("--copy-gaps", type=parse_lengths, metavar="G1,G2,...",
                   help="also score spans copied verbatim G frames after their source in held-out excerpts "
                        "(recall vs distance; e.g. 300,1000,3000,7500)")
    p.add_argument("--copy-span", type=positive_int, default=200, help="frames per copied span (default 200)")
    p.add_argument("--copy-context", type=nonnegative_int, default=250,
                   help="frames before each source span (default 250)")
    p.add_argument("--copy-probes", type=positive_int, default=4,
                   help="excerpts per held-out sequence and gap (default 4)")
    p.add_argument("--copy-controls", action="store_true",
                   help="score the copy probes twice more: sources replaced by other speech, and memory states "
                        "reset right after the source (Moshi models)")
    p.add_argument("--quotes", type=Path, metavar="CORPUS_DIR",
                   help="make-corpus directory whose dialogues quote the user (`make-corpus --quote-fraction`): also "
                        "score the model saying again what the user said, against --copy-controls' controls "
                        "(Moshi models; --data must hold those dialogues with the user's codebooks)")
    p.add_argument("--dialogues", type=Path, help="held-out two-speaker dialogue shards (Moshi's layout)")
    p.add_argument("--out", type=Path, default=Path("report"), help="output directory")
    p.add_argument("--lengths", type=parse_lengths, default=parse_lengths(DEFAULT_LENGTHS),
                   help=f"positions (Moshi frames, HF tokens) to test (default {DEFAULT_LENGTHS})")
    p.add_argument("--baseline-length", type=parse_length, help="short-context baseline B, scored on [B/2, B) "
                   "(default: a quarter of the shortest length)")
    p.add_argument("--threshold", type=positive_float, default=0.9, help="degraded below this x the baseline quality")
    p.add_argument("--quality-stream", choices=("text", "audio", "all"), default="text",
                   help="streams whose loss defines quality (default: text)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="held-out sequences streamed together")
    p.add_argument("--max-sequences", type=positive_int, help="use only the first N held-out sequences")
    p.add_argument("--minutes", type=nonnegative_float, default=5.0, help="free-run length in minutes (0: no free run)")
    p.add_argument("--prompt-frames", type=nonnegative_int, default=250,
                   help="prompt taken from the first held-out sequence")
    p.add_argument("--frames-per-minute", type=positive_int, default=FRAMES_PER_MINUTE,
                   help=argparse.SUPPRESS)  # tests shorten "minutes"
    p.add_argument("--conversation-minutes", type=positive_float,
                   help="score only the first N minutes of each dialogue")
    _add_audio_arguments(p)
    p.add_argument("--temp", type=nonnegative_float, default=0.8, help="audio sampling temperature (0: argmax)")
    p.add_argument("--temp-text", type=nonnegative_float, default=0.7, help="text sampling temperature (0: argmax)")
    p.add_argument("--free-run-writes", type=nonnegative_float, metavar="SCALE",
                   help="the in-place memory's writes times SCALE once the prompt is read (0: it keeps the prompt "
                        "and never writes its own samples: a drift diagnostic, docs/results.md section 18)")
    p.add_argument("--hf-chunk", type=positive_int, default=256, help="tokens per forward call for HF models")
    p.add_argument("--segment", type=positive_int, metavar="FRAMES",
                   help="score Moshi models through the training path in segments of FRAMES (state and window "
                        "carried; the same losses as streaming frame by frame, ~20x faster on a CPU); "
                        "default: streamed frame by frame, the production form")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is one)")
    add_threads_argument(p)
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="default: bfloat16 on CUDA, float32 on CPU")
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
                   text_card: int, found: MoshiDir | None = None) -> AudioScoring:
    """Mimi, tokenizer, ASR and speaker embedder, each only if available (--mimi, --tokenizer over a model
    directory's files); ASR and embedder only with a Mimi, as they need its audio."""
    from ttt_speech.eval.asr import Recognizer, asr_available
    from ttt_speech.eval.free_run import AudioScoring
    from ttt_speech.eval.speaker import SpeakerEmbedder
    from ttt_speech.moshi.checkpoint import load_text_tokenizer

    n = n_codebooks
    mimi = None
    if args.mimi == "tiny":
        from ttt_speech.moshi.tiny import build_tiny_mimi, tiny_mimi_config

        mimi = build_tiny_mimi(args.seed, tiny_mimi_config(n, card), device=device, num_codebooks=n)
    elif args.mimi or (found is not None and found.mimi is not None):
        from moshi.models.loaders import get_mimi

        path, config = (args.mimi, args.mimi_config) if args.mimi else (found.mimi, found.mimi_config)
        cfg = read_json_object(config, "Mimi config") if config else None
        mimi = get_mimi(str(path), cfg, device=device, num_codebooks=n)
    scoring = AudioScoring(mimi=mimi)
    tokenizer = args.tokenizer or (found.tokenizer if found is not None else None)
    if tokenizer:
        scoring.tokenizer = load_text_tokenizer(tokenizer, text_card)
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
                          text_card=lm.text_card, found=loaded.moshi_dir)


def _free(device: torch.device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check_audio_options(args: argparse.Namespace) -> None:
    """--mimi, --mimi-config and --tokenizer name files that are there and whole."""
    if args.mimi not in (None, "tiny"):
        check_safetensors(args.mimi)
    if args.mimi_config:
        if not args.mimi or args.mimi == "tiny":
            raise UsageError("--mimi-config is the config of --mimi FILE; give both, or neither")
        read_json_object(args.mimi_config, "Mimi config")
    if args.tokenizer:
        existing_file(args.tokenizer, "SentencePiece tokenizer")


def check_data(specs: list[Spec], sequences: list[Sequence], args: argparse.Namespace) -> None:
    """Refuse held-out data that cannot answer the question before any model is loaded: lengths whose scored
    window [L/2, L) lies beyond every sequence (the report would say "holds" on no data), tokens a model's
    vocabulary does not have (an IndexError deep in the model, minutes in), a tokenizer smaller than the
    model's text vocabulary."""
    from ttt_speech.moshi.checkpoint import load_text_tokenizer

    longest = max(s.length for s in sequences)
    empty = [L for L in args.lengths if L // 2 >= longest]
    if empty:
        raise UsageError(f"--lengths {','.join(map(str, empty))}: the longest held-out sequence in {args.data} has "
                         f"{longest} positions and length L is scored on [L/2, L); give lengths below {2 * longest}")
    if args.baseline_length and args.baseline_length // 2 >= longest:
        raise UsageError(f"--baseline-length {args.baseline_length}: the longest held-out sequence has {longest} "
                         f"positions; give a baseline below {2 * longest}")
    for spec in specs:
        limits = spec.token_limits()
        if limits is None:
            continue
        text_card, card = limits
        tokenizer = args.tokenizer or (spec.moshi_dir.tokenizer if spec.moshi_dir is not None else None)
        if tokenizer:  # decoding a generated token the tokenizer lacks would end the run after the model's turn
            load_text_tokenizer(tokenizer, text_card)
        for seq in sequences:
            text_max = int(seq.tokens[0].max())
            if text_max >= text_card:
                raise UsageError(f"{args.data}/{seq.name}: text token {text_max} >= the vocabulary ({text_card}) of "
                                 f"--model {spec.name}; this data was tokenized for another model")
            rows = 1 + int(spec.config.get("n_q", 0)) if spec.kind == "moshi" else 1
            if seq.tokens.shape[0] < rows:
                raise UsageError(f"{args.data}/{seq.name}: {seq.tokens.shape[0]} token rows; --model {spec.name} "
                                 f"reads {rows} (text + every audio codebook, the model's then the user's)")
            audio = seq.tokens[1:rows]
            if card and audio.numel() and int(audio.max()) >= card:
                raise UsageError(f"{args.data}/{seq.name}: audio token {int(audio.max())} >= the codebook size "
                                 f"({card}) of --model {spec.name}; this data was tokenized for another codec")


def run(args: argparse.Namespace) -> dict[str, Path]:
    """Evaluate every --model in turn and write the report; returns the written files."""
    import torch

    from ttt_speech.eval.conversation import score_conversation
    from ttt_speech.eval.data import load_sequences
    from ttt_speech.eval.gibberish import GibberishThresholds
    from ttt_speech.eval.long_context import OOM_ERRORS, evaluate, evaluate_copies, evaluate_quotes
    from ttt_speech.eval.models import MoshiScorer, check_spec, load_model
    from ttt_speech.eval.report import Report, write
    from ttt_speech.eval.spans import copy_probes, quote_probes, quote_spans, quotes_in, repeat_spans

    device = torch_device(args.device)
    use_cpu_threads(args.threads)
    dtype = torch_dtype(args.dtype, device)
    specs = [check_spec(spec) for spec in args.model]
    check_audio_options(args)
    for corpus in (args.repeats, args.quotes):
        if corpus:
            existing_dir(corpus, "make-corpus directory")
    output_dir(args.out)
    for flag, path in (("--data", args.data), ("--dialogues", args.dialogues)):
        if path is not None and not path.exists():
            raise UsageError(f"{flag} {path}: no such file or directory (held-out token shards)")
    torch.manual_seed(args.seed)
    progress = not args.no_progress
    sequences = load_sequences(args.data, args.max_sequences)
    dialogues = load_sequences(args.dialogues) if args.dialogues else []
    check_data(specs, sequences, args)
    try:
        spans = repeat_spans(args.repeats) if args.repeats else None
    except FileNotFoundError as e:
        raise UsageError(f"--repeats {e}") from None
    if spans is not None and not any(s.source in spans for s in sequences):
        raise UsageError(f"--repeats {args.repeats}: none of its re-read passages is in {args.data}")
    try:
        quotes = quote_spans(args.quotes) if args.quotes else None
    except FileNotFoundError as e:
        raise UsageError(f"--quotes {e}") from None
    if quotes is not None and not quotes_in(sequences, quotes):
        raise UsageError(f"--quotes {args.quotes}: none of its quotes is in {args.data} (tokenize its dialogues, "
                         "user channel included: recipes/evidence24/tok24.py encode)")
    probes, probe_spans = (copy_probes(sequences, args.copy_gaps, args.copy_span, args.copy_context, args.copy_probes)
                           if args.copy_gaps else ([], {}))
    replaced = (copy_probes(sequences, args.copy_gaps, args.copy_span, args.copy_context, args.copy_probes,
                            replace_source=True) if args.copy_gaps and args.copy_controls else None)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not callable(v)}
    report = Report(settings | {"device": str(device), "dtype": str(dtype), "sequences": [s.name for s in sequences]})
    report.thresholds = GibberishThresholds()
    for spec in args.model:
        print(f"eval-long: {spec}", file=sys.stderr)
        loaded = load_model(spec, device, dtype, args.seed, args.hf_chunk, args.segment)
        scorer = loaded.scorer
        report.long_context.append(evaluate(
            scorer, sequences, args.lengths, baseline_length=args.baseline_length, threshold=args.threshold,
            quality_stream=args.quality_stream, batch_size=args.batch_size, progress=progress, spans=spans))
        if probes:
            report.long_context[-1].copy_loss = evaluate_copies(
                scorer, probes, probe_spans, replaced=replaced, reset=args.copy_controls and scorer.kind == "moshi",
                batch_size=args.batch_size, progress=progress)
        if quotes is not None and isinstance(scorer, MoshiScorer):
            user = slice(1 + scorer.model.dep_q, 1 + 2 * scorer.model.dep_q)  # the user's codebooks' rows
            report.long_context[-1].quote_loss = evaluate_quotes(
                scorer, *quote_probes(sequences, quotes, args.copy_context, user),
                replaced=quote_probes(sequences, quotes, args.copy_context, user, replace_source=True)
                if args.copy_controls else None, reset=args.copy_controls, batch_size=args.batch_size,
                progress=progress)
        elif quotes is not None:
            report.notes.append(f"{scorer.name}: quote probes need a Moshi model (the user's stream); skipped")
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
    from ttt_speech.eval.free_run import free_run_hf, free_run_moshi
    from ttt_speech.eval.models import HFScorer

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
                            progress=progress, frames_per_minute=args.frames_per_minute,
                            writes_after_prompt=args.free_run_writes)
    lm = scorer.model
    _save_free_run(args.out, result, scoring, (lm.text_padding_token_id, lm.end_of_text_padding_id),
                   args.frames_per_minute)
    return result


def _save_free_run(out: Path, run: FreeRunResult, scoring: AudioScoring, pad_ids: tuple[int, ...],
                   frames_per_minute: int) -> None:
    """free_run_<name>.npy (the run's tokens) and, with a tokenizer, free_run_<name>.txt (its words per
    minute), so the audio can be scored later where ASR and the codec are (`ttt-speech score-free-run`)."""
    import numpy as np

    from ttt_speech.eval.free_run import decode_text

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
    p.add_argument("--frames-per-minute", type=positive_int, default=FRAMES_PER_MINUTE,
                   help=argparse.SUPPRESS)  # as given to eval-long; tests shorten "minutes"
    _add_audio_arguments(p)
    p.add_argument("--seed", type=int, default=0, help="seed of --mimi tiny (as given to eval-long)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is one)")
    add_threads_argument(p)


def run_score(args: argparse.Namespace) -> dict[str, Path]:
    """Decode a saved free run and score its audio per minute: writes <stem>_audio.json, <stem>_audio.md and,
    with --wav, <stem>.wav; returns the written files."""
    import numpy as np

    from ttt_speech.eval.free_run import audio_notes, score_saved_run
    from ttt_speech.eval.report import saved_run_md
    from ttt_speech.moshi.files import MIMI_WEIGHTS_NAME, MoshiDir

    device = torch_device(args.device)
    use_cpu_threads(args.threads)
    existing_file(args.tokens, "free-run tokens file (free_run_<name>.npy)")
    found = MoshiDir.read(args.model, "--model", weights=False)  # only its config, Mimi and tokenizer are needed
    raw = found.config
    check_audio_options(args)
    if args.out:
        output_dir(args.out)
    try:
        tokens = np.load(args.tokens)
    except (OSError, ValueError):
        raise UsageError(f"{args.tokens}: not a .npy array (eval-long saves free_run_<name>.npy)") from None
    dep_q = raw.get("dep_q", 8)
    if tokens.ndim != 2 or tokens.shape[0] != 1 + dep_q:
        raise UsageError(f"{args.tokens}: {tokens.shape} tokens, {args.model} generates [1 + {dep_q}, frames]")
    notes: list[str] = []
    scoring = _audio_scoring(args, device, notes, card=raw.get("card", 1024), text_card=raw.get("text_card", 32000),
                             n_codebooks=max(dep_q, raw.get("n_q", 8) - dep_q), found=found)
    if scoring.mimi is None:
        raise UsageError(f"{args.model}: no Mimi weights beside it (its config.json names none, nor is there "
                         f"{MIMI_WEIGHTS_NAME}); give --mimi")
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


def add_probe_arguments(p: argparse.ArgumentParser) -> None:
    """`ttt-speech probe-memory` (memory_probe.py runs it)."""
    p.add_argument("models", nargs="+", metavar="[NAME=]DIR",
                   help="hybrid directories (TTT, TTT with next-frame targets, Gated DeltaNet or in-place; or 'tiny')")
    p.add_argument("--data", required=True, type=Path, help="held-out token shards")
    gaps = p.add_mutually_exclusive_group()
    gaps.add_argument("--gaps", type=int_list, default="300,1000,3000", help="frames between a span and its copy")
    gaps.add_argument("--gaps-windows", type=positive_float_list,
                      help="the gaps as multiples of each model's attention window, e.g. 1,4,10,40")
    p.add_argument("--span", type=positive_int, default=200, help="frames per copied span")
    p.add_argument("--context", type=nonnegative_int, default=250, help="frames before each span")
    p.add_argument("--excerpts", type=positive_int, default=2, help="excerpts per held-out sequence and gap")
    p.add_argument("--max-sequences", type=positive_int, help="use the first N held-out sequences (default: all)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="excerpts run at once")
    p.add_argument("--inner-lr-scale", type=positive_float, default=1.0,
                   help="multiply the TTT / in-place layers' inner learning rate (the model was not trained for it)")
    p.add_argument("--out", type=Path, help="also write the rows as JSON here, and their plot beside it (.png)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    add_threads_argument(p)


def run_probe(args: argparse.Namespace) -> tp.Any:
    from ttt_speech.eval.memory_probe import run as probe
    from ttt_speech.eval.models import check_spec

    for spec in args.models:
        check_spec(spec)
    if args.out and args.out.is_dir():
        raise UsageError(f"--out {args.out}: is a directory; give the JSON file to write")
    args.device = torch_device(args.device)
    use_cpu_threads(args.threads)
    return probe(args)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ttt_speech.eval.commands", description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
