"""Pad ratio per minute of free runs, one panel per condition, one line per seed, the pad floor (0.15) drawn.

    python plot_pads.py OUT.png "TITLE=GLOB[,GLOB...]" ["TITLE=GLOB" ...]

GLOB finds eval-long `results.json` files (their free runs) or duplex_free_runs.py's `POLICY_sSEED.json`.
Section 19: which policies keep the model pausing is read across panels faster than from a table.
"""

import glob
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ttt_speech.eval.gibberish import PAD_FLOOR  # noqa: E402


def pads(path: str) -> list[tuple[str, list[float]]]:
    data = json.loads(Path(path).read_text())
    if "free_runs" in data:  # an eval-long report
        seed = data["settings"]["seed"]
        return [(f"seed {seed}", [m["pad_ratio"] for m in run["minutes"]]) for run in data["free_runs"]]
    return [(f"{data['policy']}, seed {data['seed']}", data["pad_ratio"])]


out, *specs = sys.argv[1:]
fig, axes = plt.subplots(1, len(specs), figsize=(3.6 * len(specs), 3.0), sharey=True, squeeze=False)
for ax, spec in zip(axes[0], specs):
    title, _, pattern = spec.partition("=")
    for path in sorted(p for one in pattern.split(",") for p in glob.glob(one)):
        for label, series in pads(path):
            ax.plot(range(len(series)), series, marker=".", label=label)
    ax.axhline(PAD_FLOOR, color="grey", linestyle="--", linewidth=0.8)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("minute")
    ax.legend(fontsize=7)
axes[0][0].set_ylabel("pad ratio (model pauses)")
fig.tight_layout()
fig.savefig(out, dpi=110)
print(out)
