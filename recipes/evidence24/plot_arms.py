"""Issue 24 arms side by side: copy / source-replaced loss ratio against the gap, per arm and stream group.

    python plot_arms.py OUT.png TITLE NAME=EVAL_DIR ...   (EVAL_DIR: an eval-long --copy-controls report)

Below 1 beyond the window means the model used what it saw of that very source: recall, with the
adaptation to the recording held equal by the control. One figure, so the arms are read at a glance.
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

out, title, *arms = sys.argv[1:]
every_gap: set[int] = set()
groups = ("text words", "codebook 0")
fig, axes = plt.subplots(1, len(groups), figsize=(10, 3.8), sharex=True)
for arm in arms:
    name, path = arm.split("=", 1)
    result = json.load(open(f"{path}/results.json"))["long_context"][0]
    window = result["attention_window"]
    gaps = sorted(int(g) for g in result["copy_loss"] if int(g) > window)  # inside it every arm copies
    every_gap.update(gaps)
    for ax, group in zip(axes, groups):
        mid, lo, hi = zip(*(result["copy_loss"][str(g)]["again/replaced"][group] for g in gaps))
        ax.errorbar(gaps, mid, yerr=[[m - a for m, a in zip(mid, lo)], [b - m for m, b in zip(mid, hi)]],
                    marker="o", capsize=3, label=name)
for ax, group in zip(axes, groups):
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_xticks(sorted(every_gap), [f"{g}\n({g / window:g}x)" for g in sorted(every_gap)])
    ax.minorticks_off()
    ax.set_ylim(min(0.96, ax.get_ylim()[0]), 1.01)
    ax.set_title(f"{group}: copy / source replaced")
    ax.set_xlabel("gap between source and copy: frames (x the attention window)")
axes[0].set_ylabel("loss ratio (95 % interval)")
axes[0].legend(fontsize=8)
fig.suptitle(f"{title}: below 1 beyond the window = recall")
fig.tight_layout()
fig.savefig(out, dpi=110)
print(out)
