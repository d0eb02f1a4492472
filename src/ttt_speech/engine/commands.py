"""What every resumable run's command line shares (`ttt-speech train`, `ttt-speech train-codec`).

Imports nothing heavy, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
import typing as tp

from ttt_speech.threads import add_threads_argument

EXIT_INTERRUPTED = 143  # 128 + SIGTERM: the run stopped early after writing its checkpoint


def add_run_arguments(p: argparse.ArgumentParser, config_help: str, set_example: str, bad_files: str) -> None:
    """The arguments every resumable run takes (LM trainer, codec trainer): config, --set, --run-dir, --skip-bad."""
    p.add_argument("config", help=config_help)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config value, e.g. {set_example} (repeatable)")
    p.add_argument("--run-dir", help="override run_dir (resumes from its newest checkpoint if it has one)")
    p.add_argument("--skip-bad", action="store_true",
                   help=f"skip {bad_files} (logged, counted at the end) instead of stopping on the first")
    add_threads_argument(p)


def config_overrides(args: argparse.Namespace) -> list[str]:
    """`--set` overrides plus the shortcuts `--run-dir` and `--skip-bad`, as override strings."""
    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    if args.skip_bad:
        overrides.append("data.skip_bad=true")
    return overrides


def end_run(result: tp.Any, what: str) -> None:
    """Report skipped files; a run stopped by SIGTERM (checkpoint written) exits with EXIT_INTERRUPTED."""
    if result.skipped:
        print(f"skipped {result.skipped} bad {what} file(s); see the log", file=sys.stderr)
    if not result.finished:
        raise SystemExit(EXIT_INTERRUPTED)
