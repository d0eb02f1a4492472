"""PNG figures of an eval-long report: loss vs position (log x, one figure per stream), quality vs
length against the 0.9x rule, and the per-minute curves of free runs and conversations."""

from __future__ import annotations

import typing as tp
from pathlib import Path

import numpy as np

from ttt_speech.eval.conversation import ConversationResult
from ttt_speech.eval.free_run import FreeRunResult
from ttt_speech.eval.long_context import ModelResult


def _pyplot() -> tp.Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: tp.Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def loss_vs_position(results: list[ModelResult], out_dir: Path) -> list[Path]:
    """One PNG per stream: mean loss per log2 position bucket, a line per model, its attention window dashed."""
    plt = _pyplot()
    streams = list(dict.fromkeys(s for r in results for s in r.streams))
    paths = []
    for stream in streams:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for i, r in enumerate(results):
            if stream not in r.bucket_loss:
                continue
            pts = [((lo + hi - 1) / 2 + 1, m) for lo, hi, m in zip(r.bucket_edges[:-1], r.bucket_edges[1:],
                                                                   r.bucket_loss[stream]) if m is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, color=f"C{i}", label=r.name)
            if r.attention_window:
                ax.axvline(r.attention_window, color=f"C{i}", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("position (1-based; frames for Moshi, tokens for HF)")
        ax.set_ylabel("loss (nats)")
        ax.set_title(f"teacher-forced loss vs position: {stream} (dashed: attention window)")
        ax.legend(fontsize=8)
        paths.append(_save(fig, out_dir / f"loss_vs_position_{stream}.png"))
    return paths


def recall_vs_gap(results: list[ModelResult], out_dir: Path) -> Path:
    """Loss on a copied span relative to its first occurrence (bootstrap 95 % bars), against the copy's
    distance (one panel per stream group); below 0 the model recalls content, at 0 it predicts the copy as
    if new."""
    plt = _pyplot()
    groups = list(dict.fromkeys(grp for r in results for d in r.copy_loss.values() for grp in d["again"]))
    gaps = sorted({g for r in results for g in r.copy_loss})
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, group in zip(axes[0], groups):
        for i, r in enumerate(results):
            pts = [(g, *(100 * (x - 1) for x in d["ratio"][group])) for g, d in sorted(r.copy_loss.items())
                   if d["ratio"].get(group) and d["ratio"][group][0] is not None]
            if pts:
                g, mid, lo, hi = map(np.array, zip(*pts))
                ax.errorbar(g, mid, yerr=np.stack([mid - lo, hi - mid]), marker="o", capsize=3, color=f"C{i}",
                            label=r.name)
            if r.attention_window:
                ax.axvline(r.attention_window, color=f"C{i}", ls="--", lw=0.8)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xscale("log")
        ax.set_xticks(gaps, [str(g) for g in gaps])  # the measured gaps, not log-scale minor labels
        ax.minorticks_off()
        ax.set_xlabel("distance of the copy from its source (positions)")
        ax.set_ylabel("loss on copy vs first occurrence (%)")
        ax.set_title(f"{group} (dashed: attention window)")
        ax.legend(fontsize=8)
    return _save(fig, out_dir / "recall_vs_gap.png")


def degradation(results: list[ModelResult], out_dir: Path) -> Path:
    """Quality / baseline quality per requested length, with the 0.9 threshold and OOM marks."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, r in enumerate(results):
        ok = [(x.length, x.ratio) for x in r.lengths if x.ratio is not None]
        if ok:
            ax.plot(*zip(*ok), marker="o", color=f"C{i}", label=r.name)
        for x in r.lengths:
            if x.status == "oom":
                ax.plot(x.length, 0.0, marker="x", ms=9, color=f"C{i}")
    threshold = results[0].threshold if results else 0.9
    ax.axhline(threshold, color="r", ls="--", lw=0.8, label=f"{threshold}x baseline")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("length (positions)")
    ax.set_ylabel("quality / short-context quality")
    ax.set_title("degradation with length (x at 0: out of memory)")
    ax.legend(fontsize=8)
    return _save(fig, out_dir / "degradation.png")


def free_runs(runs: list[FreeRunResult], out_dir: Path, file_name: str = "free_run.png") -> Path:
    """Per-minute statistics of each free run; the degraded minute marked."""
    plt = _pyplot()
    panels = [("entropy_bits", "text entropy (bits)"), ("repetition", "4-gram repetition"),
              ("pad_ratio", "pad / silence ratio"), ("own_ppl", "own text perplexity")]
    extra = [("wer", "ASR WER vs own text"), ("speaker_similarity", "voice similarity to minute 1")]
    extra = [p for p in extra if any(getattr(a, p[0]) is not None for r in runs for a in r.audio)]
    fig, axes = plt.subplots(len(panels) + len(extra), 1, figsize=(7, 2.0 * (len(panels) + len(extra))), sharex=True)
    for i, r in enumerate(runs):
        minutes = [m.minute + 1 for m in r.minutes]
        for ax, (key, label) in zip(axes, panels):
            ys = [getattr(m, key) for m in r.minutes]
            ax.plot(minutes, [float("nan") if y is None else y for y in ys], marker="o", ms=3, color=f"C{i}",
                    label=r.name)
            ax.set_ylabel(label, fontsize=8)
            if r.degraded_minute is not None:
                ax.axvline(r.degraded_minute + 1, color=f"C{i}", ls=":", lw=1)
        for ax, (key, label) in zip(axes[len(panels):], extra):
            ys = [getattr(a, key) for a in r.audio]
            ax.plot([a.minute + 1 for a in r.audio], [float("nan") if y is None else y for y in ys], marker="o",
                    ms=3, color=f"C{i}")
            ax.set_ylabel(label, fontsize=8)
    axes[0].legend(fontsize=8)
    axes[0].set_title("free-running generation per minute (dotted: first degraded minute)")
    axes[-1].set_xlabel("minute")
    return _save(fig, out_dir / file_name)


def conversations(results: list[ConversationResult], out_dir: Path) -> Path:
    """User-stream loss and voice similarity per minute, a line per (model, dialogue)."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    models = list(dict.fromkeys(r.name for r in results))
    for r in results:
        color = f"C{models.index(r.name)}"
        xs = range(1, len(r.user_loss) + 1)
        ax1.plot(xs, [float("nan") if y is None else y for y in r.user_loss], marker="o", ms=3, color=color,
                 label=f"{r.name}: {r.dialogue}")
        if r.speaker_similarity:
            ax2.plot(range(1, len(r.speaker_similarity) + 1),
                     [float("nan") if y is None else y for y in r.speaker_similarity], marker="o", ms=3, color=color)
    ax1.set_ylabel("user-stream loss (nats)")
    ax2.set_ylabel("voice similarity to minute 1")
    ax2.set_xlabel("minute")
    ax1.legend(fontsize=7)
    ax1.set_title("long conversations")
    return _save(fig, out_dir / "conversation.png")
