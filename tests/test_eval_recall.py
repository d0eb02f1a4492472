"""The synthetic known-answer stream: its answer is where it should be, the in-place memory trained by the
outer loss recalls pairs seen once far back, and a model without memory stays at chance."""

import math

import pytest
import torch

from ttt_speech.eval.recall import RecallModel, RecallTask, compare, evaluate, train


def test_stream_asks_each_shown_pair_once_in_a_new_order():
    task = RecallTask(pairs=5)
    tokens, first, query = task.sample(3, 7, torch.Generator().manual_seed(0))
    assert tokens.shape == (3, 10 + 7 + 10) and query.tolist() == [17, 19, 21, 23, 25]
    for b in range(3):
        shown = {int(tokens[b, f]): int(tokens[b, f + 1]) for f in first}
        asked = {int(tokens[b, f]): int(tokens[b, f + 1]) for f in query}
        assert shown == asked and len(shown) == 5
        assert all(k < task.n_keys <= v < task.n_keys + task.n_values for k, v in shown.items())
        assert (tokens[b, 10:17] >= task.n_keys + task.n_values).all()  # the gap is filler only


def test_inplace_memory_trained_by_the_outer_loss_stores(one_thread):
    """80 steps (~5 s): pairs seen once 160 frames back (80x the model's 2-frame context, 3x the
    longest training gap) are recalled (measured: 97 % accuracy, loss -90 %); the same block without
    memory stays at chance (1/32)."""
    task = RecallTask()
    stored = evaluate(train("inplace", task, steps=80), task, gap=160)
    assert stored["accuracy"] > 0.9 and stored["change_pct"] < -80
    none = evaluate(train("none", task, steps=80), task, gap=160)
    assert none["accuracy"] < 0.08 and abs(none["change_pct"]) < 3
    assert abs(none["loss_first"] - math.log(task.n_values)) < 0.1  # first showings are at chance for both
    assert abs(stored["loss_first"] - math.log(task.n_values)) < 0.4


def test_unknown_design_is_named():
    with pytest.raises(ValueError, match=r"design must be one of .*got 'lstm'"):
        RecallModel("lstm", 80)


def test_window_attention_reaches_exactly_its_window():
    """Frame t's attention output moves when frame t - W + 1 changes and not when frame t - W does."""
    from ttt_speech.eval.recall import WindowAttention

    torch.manual_seed(0)
    attn = WindowAttention(8, window=4)
    x = torch.randn(1, 12, 8)
    base = attn(x)[0, 9]
    inside, outside = x.clone(), x.clone()
    inside[0, 6] += 1.0
    outside[0, 5] += 1.0
    assert not torch.allclose(attn(inside)[0, 9], base) and torch.equal(attn(outside)[0, 9], base)


def test_compare_reports_the_training_curve(one_thread):
    rows, curve = compare(("inplace",), (32,), RecallTask(pairs=2), curve_gap=32, every=5, steps=10, window=4)
    assert [(r["design"], r["gap"]) for r in rows] == [("inplace", 32)]
    assert [(c["step"], c["gap"]) for c in curve] == [(5, 32), (10, 32)]
    assert all(c["low_pct"] <= c["change_pct"] <= c["high_pct"] for c in rows + curve)
