"""Issue 23 item 4 on the issue-24 arms: `probe-memory` on every arm's export at 1x/4x/10x/40x the attention
window, one table. recipes/evidence24/probe_arms.sh runs it with the section-7 settings.

    python recipes/evidence24/probe_arms.py ARMS_DIR VAL_DIR OUT_DIR [--gaps-windows 1,4,10,40] [--span 32]
        [--context 64] [--excerpts 1] [--max-sequences N] [--device cpu] [--threads N]

ARMS_DIR holds any of arm_d, arm_b, arm_a, arm_c, each with export/ (what export_last.py writes: a Moshi
hybrid directory) or being such a directory itself; arm_d's plain model has no memory to probe and gets
a row saying so. VAL_DIR: the
held-out tokens. Writes OUT_DIR/probe_arms.md (the table: per arm and gap the mean over memory layers of
"copy vs never seen" with its bootstrap 95 % interval, and the layer that keeps most), probe_arms.json
(every row of every layer) and probe_arms.png (change vs gap per arm). Issue 23's bar: a design that
stores shows <= -20 % at 10x the window.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from ttt_speech.errors import UsageError, nonnegative_int, positive_float_list, positive_int
from ttt_speech.eval.data import load_sequences
from ttt_speech.eval.memory_probe import MEMORY_LAYERS, ProbeRow, plot, probe
from ttt_speech.eval.models import check_spec, load_model
from ttt_speech.threads import add_threads_argument, use_cpu_threads

ARMS = {"d": "no memory", "b": "in-place", "a": "TTT-Linear", "c": "Gated DeltaNet"}
BAR = -0.20  # issue 23: a design that stores keeps >= 20 % at 10x the window


def export_of(arm: Path) -> Path | None:
    """An arm's model directory: its export/ (a trainer run directory), or the arm directory itself when it
    holds the model (config.json: an export carried back on its own)."""
    for path in (arm / "export", arm):
        if (path / "config.json").is_file():
            return path
    return None


def cell(rows: list[ProbeRow]) -> str:
    """One gap of one arm: the mean row's change [interval], and the strongest layer's change."""
    mean = next(r for r in rows if r.layer is None)
    best = min((r for r in rows if r.layer is not None), key=lambda r: r.change)
    return (f"{mean.change:+.1%} [{mean.low:+.1%}, {mean.high:+.1%}]"
            + (f" (layer {best.layer}: {best.change:+.1%})" if len(rows) > 2 else ""))


def table(results: dict[str, list[ProbeRow] | None], windows: list[float], args: argparse.Namespace) -> str:
    head = " | ".join(f"{w:g}x" for w in windows)
    lines = ["Memory loss on a copied span vs the same span never seen (probe-memory; mean over memory layers, "
             f"bootstrap 95 % interval over excerpts; in brackets the layer that keeps most). Span {args.span}, "
             f"context {args.context}, {args.excerpts} excerpts per held-out sequence.", "",
             f"| arm | design | gap (frames) | {head} | 10x <= -20 %? |", "|---|---|---|" + "---|" * len(windows) + "---|"]
    for arm, rows in results.items():
        if rows is None:
            lines.append(f"| {arm} | none (no memory layers to probe) | | " + " | " * len(windows) + " |")
            continue
        by_gap = {g: [r for r in rows if r.gap == g] for g in dict.fromkeys(r.gap for r in rows)}
        ten = [r for r in rows if r.layer is None and r.windows == 10]
        verdict = ("yes" if ten[0].high <= BAR else "no") if ten else ""
        lines.append(f"| {arm} | {rows[0].design} | {', '.join(map(str, by_gap))} | "
                     + " | ".join(cell(r) for r in by_gap.values()) + f" | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("arms", type=Path)
    p.add_argument("val", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--gaps-windows", type=positive_float_list, default="1,4,10,40")
    p.add_argument("--span", type=positive_int, default=32)
    p.add_argument("--context", type=nonnegative_int, default=64)
    p.add_argument("--excerpts", type=positive_int, default=1)
    p.add_argument("--max-sequences", type=positive_int)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--device", default="cpu")
    add_threads_argument(p)
    args = p.parse_args(argv)
    try:
        found = {f"arm_{a}": path for a in ARMS if (path := export_of(args.arms / f"arm_{a}")) is not None}
        if not found:
            raise UsageError(f"{args.arms}: no arm_d, arm_b, arm_a or arm_c with an export/ directory (or a "
                             "config.json of its own)")
        use_cpu_threads(args.threads)
        sequences = load_sequences(args.val, args.max_sequences)
        results: dict[str, list[ProbeRow] | None] = {}
        for arm, path in found.items():
            start = time.perf_counter()
            scorer = load_model(f"{arm}={check_spec(str(path)).path}", args.device).scorer
            if not any(isinstance(m, MEMORY_LAYERS) for m in scorer.model.modules()):
                results[arm] = None
                continue
            if not scorer.attention_window:
                raise UsageError(f"{path}: no attention window to take multiples of")
            gaps = [round(w * scorer.attention_window) for w in args.gaps_windows]
            results[arm] = probe(scorer, sequences, gaps, args.span, args.context, args.excerpts, args.batch_size)
            print(f"{arm}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    except UsageError as e:
        print(f"probe_arms: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(results, args.gaps_windows, args)
    (args.out / "probe_arms.md").write_text(text)
    (args.out / "probe_arms.json").write_text(json.dumps(
        {arm: rows and [dataclasses.asdict(r) | {"change": r.change} for r in rows] for arm, rows in results.items()},
        indent=1) + "\n")
    probed = {arm: rows for arm, rows in results.items() if rows}
    if probed:
        plot(probed, args.out / "probe_arms.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
