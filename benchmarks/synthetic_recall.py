"""Does a memory design store? The known-answer stream of `ttt_speech.eval.recall` (docs/ttt.md, "Does it
store?"): every design trained from scratch on the same stream and seed, then asked at several gaps.

    python benchmarks/synthetic_recall.py                          # all designs, 200 steps (CPU, ~2 min)
    python benchmarks/synthetic_recall.py --designs inplace,ttt --steps 600 --gaps 16,640

Prints markdown rows: value loss at the query vs at its first showing (change, %; < 0: stored) and accuracy.
"""

from __future__ import annotations

import argparse

import torch

from ttt_speech.eval.recall import DESIGNS, compare


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--designs", default=",".join(DESIGNS))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--gaps", default="16,64,160,640")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"| design | steps | train s | gap | first-showing loss | query loss | change % | accuracy |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in compare(tuple(args.designs.split(",")), tuple(int(g) for g in args.gaps.split(",")), steps=args.steps):
        print(f"| {r['design']} | {args.steps} | {r['train_s']} | {r['gap']} | {r['loss_first']:.3f} | "
              f"{r['loss_query']:.3f} | {r['change_pct']:+.1f} | {r['accuracy']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
