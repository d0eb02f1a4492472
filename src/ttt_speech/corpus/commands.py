"""`ttt-speech make-corpus`: public-domain texts read by local speech engines into a long-form training corpus.

    ttt-speech make-corpus --out DIR --minutes-per-recording 20 --recordings N --dialogues M \
        [--voices flite:slt,festival:ked_diphone,...] [--texts kjv,devil,jargon] --seed 0
"""

from __future__ import annotations

import argparse
import sys

from ttt_speech.corpus.engines import DEFAULT_VOICES, ENGINES
from ttt_speech.corpus.texts import SOURCES
from ttt_speech.errors import fraction, nonnegative_int, positive_float, positive_int


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_arguments(p: argparse.ArgumentParser) -> None:
    voices = ", ".join(f"{n}:{{{','.join(e.voices)}}}" for n, e in ENGINES.items())
    p.add_argument("--out", required=True, help="output directory (must not hold a corpus already)")
    p.add_argument("--recordings", type=nonnegative_int, default=4, help="single-voice readings (default 4)")
    p.add_argument("--dialogues", type=nonnegative_int, default=2, help="two-voice stereo dialogues (default 2)")
    p.add_argument("--minutes-per-recording", type=positive_float, default=20.0, help="length of each reading (default 20)")
    p.add_argument("--dialogue-minutes", type=positive_float, help="length of each dialogue (default: --minutes-per-recording)")
    p.add_argument("--voices", type=_names, default=(),
                   help=f"comma-separated ENGINE:VOICE list from {voices} "
                        f"(default: the installed ones of {','.join(DEFAULT_VOICES)})")
    p.add_argument("--texts", type=_names, default=tuple(SOURCES),
                   help=f"comma-separated text sources from {','.join(SOURCES)} (default: all)")
    p.add_argument("--repeat-fraction", type=fraction, default=0.5,
                   help="share of readings that re-read earlier passages (default 0.5)")
    p.add_argument("--repeat-gap-minutes", type=positive_float, default=10.0,
                   help="a re-read passage ended at least this long before (default 10)")
    p.add_argument("--repeat-minutes", type=positive_float, default=1.0, help="length of a re-read passage (default 1)")
    p.add_argument("--repeat-every-minutes", type=positive_float, default=5.0, help="time between re-reads (default 5)")
    p.add_argument("--quote-fraction", type=fraction, default=0.0,
                   help="share of the model's turns in a dialogue that open by saying again what the user said "
                        "(default 0)")
    p.add_argument("--quote-gap-sentences", type=positive_int, default=20,
                   help="a quoted user sentence was said this many to twice as many sentences before (default 20)")
    p.add_argument("--random-user-words", action="store_true",
                   help="in dialogues the user says random words of the text instead of its sentences (quotes "
                        "of them can only be predicted by hearing the user, never recited from training)")
    p.add_argument("--val-fraction", type=fraction, default=0.1, help="recordings held out, per kind (default 0.1)")
    p.add_argument("--only", type=_names, default=(),
                   help="comma-separated recording names (reading_027,dialogue_003): build just these, exactly as "
                        "the whole corpus of these settings has them (a held-out set without the rest)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=nonnegative_int, default=0, help="synthesis processes (default: one per CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ttt_speech.corpus.build import CorpusConfig, build
    from ttt_speech.corpus.texts import MissingTextError

    cfg = CorpusConfig(recordings=args.recordings, dialogues=args.dialogues, minutes=args.minutes_per_recording,
                       dialogue_minutes=args.dialogue_minutes, voices=args.voices, texts=args.texts, seed=args.seed,
                       repeat_fraction=args.repeat_fraction, repeat_gap_minutes=args.repeat_gap_minutes,
                       repeat_minutes=args.repeat_minutes, repeat_every_minutes=args.repeat_every_minutes,
                       quote_fraction=args.quote_fraction, quote_gap_sentences=args.quote_gap_sentences,
                       random_user_words=args.random_user_words,
                       val_fraction=args.val_fraction, only=args.only, jobs=args.jobs, progress=not args.no_progress)
    try:
        report = build(args.out, cfg)
    except (MissingTextError, RuntimeError, ValueError, FileExistsError) as e:
        print(f"make-corpus: {' '.join(str(e).split())}", file=sys.stderr)  # one line, as every command
        return 2
    for voice, why in report.voices_unavailable.items():
        print(f"voice {voice} skipped: {why}", file=sys.stderr)
    minutes, cpu_minutes = report.audio_seconds / 60, max(report.cpu_seconds / 60, 1e-9)
    print(f"{report.recordings} recordings, {minutes:.1f} min of audio in {report.out} "
          f"({report.wall_seconds:.0f} s wall, {minutes / cpu_minutes:.1f} audio min per CPU min)")
    return 0
