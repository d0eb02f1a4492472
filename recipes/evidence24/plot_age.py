"""Issue 24, section 9: recall against the memory's age, and the loss the memory costs past its training length.

    python plot_age.py OUT.png SWEEP.json EVAL_LONG_DIR[,EVAL_LONG_DIR...] TRAIN_LEN
(SWEEP.json: recall_age.py's rows at one gap; EVAL_LONG_DIR: eval-long reports with per-position buckets.)

Left: text words, copy / source replaced at one gap, against the frames the memory had streamed before the
source, per model; the copy ends at context + gap + span, shaded past the training sequence length.
Right: mean text loss per position bucket (teacher-forced, streamed frame by frame), per model.
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

out, sweep, eval_dirs, train_len = sys.argv[1], sys.argv[2], sys.argv[3].split(","), int(sys.argv[4])
rows = json.load(open(sweep))
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
gap = rows[0]["gap"]
for name in dict.fromkeys(r["model"] for r in rows):
    mine = [r for r in rows if r["model"] == name and r["gap"] == gap]
    x = [r["context"] + gap + 32 for r in mine]  # where the copy ends: the state's age when it is read
    mid, lo, hi = zip(*(r["copy/replaced"]["text words"] for r in mine))
    left.errorbar(x, mid, yerr=[[m - a for m, a in zip(mid, lo)], [b - m for m, b in zip(mid, hi)]],
                  marker="o", capsize=3, label=name)
left.axhline(1.0, color="gray", lw=0.8, ls="--", label="no memory (D: 1.000)")
left.axvspan(train_len, max(r["context"] + gap + 32 for r in rows) * 1.1, color="red", alpha=0.08,
             label=f"past the training length ({train_len})")
left.set_xscale("log")
left.set_xlabel("frames streamed when the copy ends (context + gap + span)")
left.set_ylabel(f"text words: copy / source replaced, gap {gap}")
left.set_title(f"recall at {gap} frames against the memory's age", fontsize=9)
left.legend(fontsize=8)
for model in (m for d in eval_dirs for m in json.load(open(f"{d}/results.json"))["long_context"]):
    ends, losses = model["bucket_edges"][1:], model["bucket_loss"]["text"]
    keep = [(e, v) for e, v in zip(ends, losses) if e > 64 and v is not None]  # past the first window
    right.plot(*zip(*keep), marker="o", label=model["name"])
right.axvline(train_len, color="red", lw=0.8, ls="--")
right.set_xscale("log")
right.set_xlabel("position (frames)")
right.set_ylabel("text loss, nats (bucket mean)")
right.set_title("teacher-forced held-out speech, streamed frame by frame", fontsize=9)
right.legend(fontsize=8)
fig.tight_layout()
fig.savefig(out, dpi=110)
