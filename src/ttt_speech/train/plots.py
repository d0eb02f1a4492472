"""`ttt-speech plot-run RUN_DIR`: PNG loss curves of a training run, one per stage plus the whole run."""

from __future__ import annotations

from pathlib import Path

from ttt_speech.engine.metrics import read_metrics


def _curves(ax: object, train: list[dict], val: list[dict]) -> None:
    steps = [r["step"] for r in train]
    ax.plot(steps, [r["loss"] for r in train], lw=1.2, label="train loss")
    for key in sorted(k for k in (train[0] if train else {}) if k.startswith("loss_")):
        ax.plot(steps, [r[key] for r in train], lw=0.8, alpha=0.6, label=f"train {key[5:]}")
    if val:
        ax.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", ms=4, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write loss.png (all stages, boundaries marked) and loss_stage{i}.png; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{run_dir}: metrics.jsonl is empty (the run has not logged a step yet)")
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    stages = sorted({r["stage"] for r in records})
    seq = {r["stage"]: r["seq_len"] for r in records}
    paths = []

    fig, ax = plt.subplots(figsize=(8, 4.5))
    _curves(ax, [r for r in records if r["split"] == "train"], [r for r in records if r["split"] == "val"])
    for s in stages[1:]:
        ax.axvline(min(r["step"] for r in records if r["stage"] == s) - 0.5, color="gray", ls="--", lw=0.8)
    ax.set_title(f"{Path(run_dir).name}: {len(stages)} stage(s)")
    fig.tight_layout()
    paths.append(out / "loss.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    for s in stages:
        fig, ax = plt.subplots(figsize=(7, 4))
        _curves(ax, [r for r in records if r["stage"] == s and r["split"] == "train"],
                [r for r in records if r["stage"] == s and r["split"] == "val"])
        ax.set_title(f"stage {s}: sequences of {seq[s]} steps")
        fig.tight_layout()
        paths.append(out / f"loss_stage{s}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
