"""Proof it learns: the trainer teaches a tiny Moshi TTT hybrid to recall values heard further back than
its attention window; the same model without TTT, trained the same way, stays at chance."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("moshi")
pytestmark = pytest.mark.slow  # 50 s on a shared 2-core CPU

from ttt_speech.train.config import config_from_dict  # noqa: E402
from ttt_speech.train.loop import Trainer  # noqa: E402
from ttt_speech.train.synthetic import RecallTask  # noqa: E402

TASK = RecallTask()  # 8 pairs, then 12 padding frames, then 8 questions: 36 frames; attention sees 8


def recall_loss(trainer: Trainer, segment: int | None) -> float:
    """Cross-entropy on the answers of 64 held-out sequences (forward in segments of `segment` frames)."""
    codes = trainer.val_data.eval_batch(0, 64, TASK.length)
    batch = TASK.recall_batch(trainer.seg.prepare(codes), codes)
    with torch.no_grad():
        sums, total, carry = torch.zeros(1), batch.weights.sum(), None
        for a in range(0, TASK.length, segment or TASK.length):
            part, carry = trainer.seg(batch.segment(a, min(a + (segment or TASK.length), TASK.length)), carry)
            sums += part[0]
    return float(sums / total)


def train(tmp: Path, layers: list[int]) -> Trainer:
    model = {"family": "moshi", "tiny": True, "layers": layers}
    if layers:
        model |= {"branch": "ttt", "memory": {"gate_init": 0.5, "mini_batch": 8}}
    cfg = config_from_dict({
        "run_dir": str(tmp / f"run_{bool(layers)}"), "model": model,
        "data": {"train": [str(tmp / "train.safetensors")], "eval": [str(tmp / "val.safetensors")]},
        "train": {"trainable": "all", "batch_size": 16, "weight_decay": 0.0},
        "stages": [{"seq_len": TASK.length, "steps": 300, "lr": 6e-3, "min_lr_ratio": 1.0}],
        "checkpoint": {"every": 1000}, "log": {"progress": False}})
    trainer = Trainer(cfg)
    assert trainer.run().finished
    return trainer


def test_ttt_hybrid_learns_recall_beyond_the_attention_window(tmp_path: Path, one_thread: None) -> None:
    TASK.write(tmp_path / "train.safetensors", 4096, seed=0)
    TASK.write(tmp_path / "val.safetensors", 64, seed=1)
    ttt, attention_only = train(tmp_path, [0]), train(tmp_path, [])  # TTT in the first of the 2 layers
    assert attention_only.seg.memory_layer_count() == 0 and ttt.seg.memory_layer_count() == 1
    assert ttt.seg.window == 8 < TASK.gap + 2  # every answer lies further back than attention sees
    chance = math.log(TASK.card)
    base, learned = recall_loss(attention_only, None), recall_loss(ttt, None)
    assert base > 0.95 * chance  # 3.47 nats: attention alone cannot recall
    assert learned < 0.5 * base  # measured: 1.12 vs 3.51
    # the memory is the carried TTT state: cut into segments of 18 frames (the pairs in the first,
    # the questions in the second), the recall is the same
    assert recall_loss(ttt, 18) == pytest.approx(learned, abs=1e-4)
