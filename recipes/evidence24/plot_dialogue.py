"""Text loss by position on two-voice dialogues, one line per model and condition, from dialogue_memory.py's logs.

    python plot_dialogue.py OUT.png "LABEL=LOG" ["LABEL=LOG" ...]

Each LOG line "<condition>, text loss by position: {start: loss, ...}" becomes a line "LABEL, <condition>".
Section 22: where a memory breaks a conversation, and where training on conversations mends it, is a shape
across positions, read faster from a plot than from a table.
"""

import ast
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MARK = ", text loss by position: "


def curves(log: str) -> list[tuple[str, dict[int, float]]]:
    """(condition, {bucket start: loss}) for every loss-by-position line of a dialogue_memory.py log."""
    return [(line.split(MARK)[0], ast.literal_eval(line.split(MARK)[1]))
            for line in Path(log).read_text().splitlines() if MARK in line]


def main(out: str, *specs: str) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for spec in specs:
        label, _, log = spec.partition("=")
        for condition, loss in curves(log):
            starts = sorted(loss)
            ax.plot(starts, [loss[s] for s in starts], marker="o", label=f"{label}, {condition}",
                    linestyle="--" if "lambda" in condition else "-")
    ax.axhline(math.log(1000), color="grey", linewidth=0.8, linestyle=":")
    ax.text(512, math.log(1000) + 0.2, "uniform over the 1000 text tokens", fontsize=7, color="grey")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in the dialogue (frames, bucket start; 12.5 per second)")
    ax.set_ylabel("text loss (nats)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main(*sys.argv[1:])
