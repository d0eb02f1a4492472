"""Does a memory design store? The known-answer stream of `ttt_speech.eval.recall` (docs/ttt.md, "Does it
store?"): every design trained from scratch on the same stream and seed, for the same number of steps, then
asked at several gaps.

    python benchmarks/synthetic_recall.py                          # all designs, 200 steps, 2-frame context
    python benchmarks/synthetic_recall.py --designs inplace,ttt --steps 600 --gaps 16,640
    # issue 23 item 4: a 16-frame attention window, gaps 1x/4x/10x/40x of it, the curve at 10x every 100 steps
    python benchmarks/synthetic_recall.py --window 16 --gaps-windows 1,4,10,40 --train-gaps 0,48 --steps 600 \\
        --every 100 --out recall_windows.json

Prints markdown rows: value loss at the query vs at its first showing (change, % [bootstrap 95 %]; < 0:
stored) and accuracy; with --every, the change at the curve gap (10x the window, or the largest gap
below it) during training. --out writes the rows as JSON and a plot beside it (.png).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ttt_speech.eval.recall import DESIGNS, RecallTask, compare


def plot(rows: list[dict], curve: list[dict], path: Path, window: int) -> None:
    """Change vs gap per design (bootstrap bars) and, if there is one, change vs training step."""
    from ttt_speech.eval.plots import _pyplot, _save

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2 if curve else 1, figsize=(12 if curve else 7, 4.2), squeeze=False)
    designs = list(dict.fromkeys(r["design"] for r in rows))
    for i, design in enumerate(designs):
        mine = [r for r in rows if r["design"] == design]
        x = [r["distance"] / window if window else r["gap"] for r in mine]
        mid = [r["change_pct"] for r in mine]
        err = [[m - r["low_pct"] for m, r in zip(mid, mine)], [r["high_pct"] - m for m, r in zip(mid, mine)]]
        axes[0, 0].errorbar(x, mid, yerr=err, marker="o", capsize=3, color=f"C{i}", label=design)
        if curve:
            steps = [c for c in curve if c["design"] == design]
            axes[0, 1].plot([c["step"] for c in steps], [c["change_pct"] for c in steps], marker="o", color=f"C{i}",
                            label=design)
    axes[0, 0].set_xscale("log")
    ticks = sorted({r["distance"] / window if window else r["gap"] for r in rows})
    axes[0, 0].set_xticks(ticks, [f"{t:g}" for t in ticks])
    axes[0, 0].minorticks_off()
    axes[0, 0].set_xlabel("distance of the query block (attention windows)" if window else "filler frames G")
    axes[0, 0].set_ylabel("query vs first-showing loss (%)")
    axes[0, 0].set_title("after training: recall against the gap")
    if curve:
        axes[0, 1].set_xlabel("training step")
        axes[0, 1].set_title(f"during training: at {curve[0]['distance'] / window if window else curve[0]['gap']:g}"
                             f"{'x the window' if window else ' filler frames'}")
    for ax in axes[0]:
        ax.axhline(0, color="k", lw=0.6)
        ax.axhline(-20, color="r", ls="--", lw=0.8)
        ax.legend(fontsize=7)
    _save(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--designs", default=",".join(DESIGNS))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--gaps", default="16,64,160,640", help="filler frames G between the shown and asked blocks")
    p.add_argument("--window", type=int, default=0, help="frames of the attention head (0: none, a 2-frame context)")
    p.add_argument("--gaps-windows", help="instead of --gaps: the asked block's distance in windows, e.g. 1,4,10,40")
    p.add_argument("--train-gaps", default="8,48", help="filler frames drawn per training step (lo,hi)")
    p.add_argument("--every", type=int, default=0, help="evaluate at 10x the window (or the largest gap) every N steps")
    p.add_argument("--out", type=Path, help="JSON of every row; the plot beside it (.png)")
    args = p.parse_args()
    torch.set_num_threads(1)
    task = RecallTask()
    if args.gaps_windows:
        if not args.window:
            p.error("--gaps-windows needs --window")
        distances = [round(float(m) * args.window) for m in args.gaps_windows.split(",")]
        if min(distances) < 2 * task.pairs:
            p.error(f"the asked block starts after the {2 * task.pairs} shown frames: distances >= {2 * task.pairs}")
        gaps = [d - 2 * task.pairs for d in distances]
    else:
        gaps = [int(g) for g in args.gaps.split(",")]
    ten = [g for g in gaps if g + 2 * task.pairs <= 10 * args.window] if args.window else []
    curve_gap = (ten or gaps)[-1] if args.every else None
    lo, hi = (int(g) for g in args.train_gaps.split(","))
    start = time.perf_counter()
    rows, curve = compare(tuple(args.designs.split(",")), tuple(gaps), task, curve_gap, args.every, steps=args.steps,
                          window=args.window, gaps=(lo, hi))
    for r in rows + curve:
        r["distance"] = r["gap"] + 2 * task.pairs
    print("| design | steps | train s | gap G | distance | first-showing loss | query loss | change % [95 %] | "
          "accuracy |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['design']} | {args.steps} | {r['train_s']} | {r['gap']} | {r['distance']} | {r['loss_first']:.3f} | "
              f"{r['loss_query']:.3f} | {r['change_pct']:+.1f} [{r['low_pct']:+.1f}, {r['high_pct']:+.1f}] | "
              f"{r['accuracy']:.3f} |")
    if curve:
        print(f"\nchange % at G = {curve_gap} (distance {curve_gap + 2 * task.pairs}) during training\n\n| design | "
              + " | ".join(f"step {c['step']}" for c in curve if c["design"] == curve[0]["design"]) + " |")
        for design in dict.fromkeys(c["design"] for c in curve):
            print(f"| {design} | " + " | ".join(f"{c['change_pct']:+.1f}" for c in curve if c["design"] == design) + " |")
    print(f"\n{time.perf_counter() - start:.0f} s in all (one thread)")
    if args.out:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows, "curve": curve},
                                       indent=1) + "\n")
        plot(rows, curve, args.out.with_suffix(".png"), args.window)


if __name__ == "__main__":
    main()
