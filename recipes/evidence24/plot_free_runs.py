"""Free runs side by side, per minute, from several eval-long reports (each with one `--minutes` run).

    python plot_free_runs.py OUT.png [LABEL=]EVAL_DIR [[LABEL=]EVAL_DIR ...]   (LABEL: the legend's name, default the run's)

eval-long plots the runs of one report; the arms' 60-minute runs were separate reports (one CPU core each),
and whether the memory arm drifts where the no-memory arm does not is read best on the same axes.
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

out, *dirs = sys.argv[1:]
panels = [("pad_ratio", "pad ratio (silence)"), ("entropy_bits", "text entropy, bits"),
          ("repetition", "4-gram repetition"), ("own_ppl", "own text perplexity")]
fig, axes = plt.subplots(1, len(panels), figsize=(14, 3.2), sharex=True)
for spec in dirs:
    name, _, d = spec.rpartition("=")
    for run in json.load(open(f"{d}/results.json"))["free_runs"]:
        minutes = [m["minute"] + 1 for m in run["minutes"]]
        for ax, (key, label) in zip(axes, panels):
            ax.plot(minutes, [m[key] for m in run["minutes"]], marker="o", ms=2, label=name or run["name"])
            ax.set_title(label, fontsize=9)
for ax in axes:
    ax.set_xlabel("minute of free-running generation")
axes[0].legend(fontsize=8)
fig.tight_layout()
fig.savefig(out, dpi=110)
