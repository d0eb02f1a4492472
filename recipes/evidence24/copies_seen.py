"""Issue 24: recall at a gap against the far copies a continuation trained on (docs/results.md section 28).

    python recipes/evidence24/copies_seen.py OUT.png

Counts, with the trainer's own `copy_spans`, the far copies (beyond the 64-frame window) each recipe put
in its sequences, by gap, and plots the recorded clean5 ratios against them: recall at 640 frames
follows how many far copies a model saw more than whether any lay that far back. Sequences
are taken as full (the training chunks are, but for each document's tail).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import matplotlib
import numpy as np

from ttt_speech.train.config import RepeatConfig
from ttt_speech.train.data import copy_spans

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

WINDOW = 64


@dataclass(frozen=True)
class Recipe:
    """One continuation of the shipped model: its data.repeat and how many sequences it trained on."""

    seq: int
    copies: int
    far: tuple[int, int]
    placement: str = "blocks"

    def repeat(self) -> RepeatConfig:
        return RepeatConfig(1.0, min_gap=16, min_len=16, max_len=48, max_gap=60, copies=self.copies,
                            far_gap=list(self.far), far_len=[16, 320], far_blocks="random", placement=self.placement)

    def far_gaps(self, samples: int = 2000) -> np.ndarray:
        """The gaps of the far copies in `samples` sequences: every frame holds its own position in the
        sequence, so a copied frame says where it came from."""
        cfg, gaps = self.repeat(), []
        positions = np.tile(np.arange(self.seq), (2, 1))
        for seed in range(samples):
            after = copy_spans(positions, np.random.default_rng(seed), cfg)[0]
            back = np.arange(self.seq) - after  # 0 where nothing was copied
            starts = np.flatnonzero((back > 0) & (np.diff(back, prepend=0) != 0))
            gaps += [int(back[s]) for s in starts if back[s] > WINDOW]
        return np.array(gaps)


BM, BL = Recipe(1024, 2, (96, 700)), Recipe(2048, 2, (96, 1000))
# model: (recipe, steps, batch), then the recorded clean5 text-word ratios [95 %] (sections 25, 28; 100 probes a
# gap): copy / source replaced at 640 and copy / first at 96
POINTS = {
    "shipped": (None, 0, 0, (0.853, 0.845, 0.861), (0.772, 0.735, 0.811)),
    "BM-1300": (BM, 1300, 64, (0.753, 0.741, 0.766), (0.495, 0.453, 0.541)),
    "BM-2630": (BM, 2630, 64, (0.712, 0.698, 0.727), (0.434, 0.391, 0.480)),
    "BL-1300": (BL, 1300, 32, (0.806, 0.796, 0.817), (0.736, 0.692, 0.781)),
    "BL-1946": (BL, 1946, 32, (0.784, 0.773, 0.797), (0.699, 0.653, 0.748)),
}


def main(out: str) -> None:
    gaps = {r: r.far_gaps() for r in (BM, BL)}
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, (recipe, steps, batch, at640, at96) in POINTS.items():
        g = gaps[recipe] if recipe else np.zeros(0)
        per_seq = len(g) / 2000 if recipe else 0.0
        seen = steps * batch * per_seq / 1e3
        near96 = steps * batch * per_seq * float(np.mean((g >= 96) & (g < 200))) / 1e3 if recipe else 0.0
        beyond500 = steps * batch * per_seq * float(np.mean(g >= 500)) / 1e3 if recipe else 0.0
        print(f"{name}: {seen:.0f}k far copies, {near96:.0f}k at 96-199 frames, {beyond500:.0f}k at >= 500")
        color = "C0" if name.startswith("BM") else "C1" if name.startswith("BL") else "k"
        for ax, x, (mid, lo, hi), label in ((left, seen, at640, f"{name}\n({beyond500:.0f}k at ≥ 500)"),
                                            (right, near96, at96, name)):
            ax.errorbar([x], [mid], yerr=[[mid - lo], [hi - mid]], marker="o", capsize=3, color=color)
            ax.annotate(label, (x, mid), textcoords="offset points", xytext=(6, 4), fontsize=8)
    left.set(xlabel="far copies trained (thousands, any gap > 64)", ylabel="copy / source replaced, gap 640",
             title="recall at 10x the window")
    right.set(xlabel="far copies trained 96-199 frames back (thousands)", ylabel="copy / first occurrence, gap 96",
              title="recall at 1.5x the window")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle("clean5, text words: the shipped model continued (BM: 1024-frame sequences, BL: 2048, 2 copies each)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1])
