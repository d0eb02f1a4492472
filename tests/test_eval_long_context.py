"""Teacher-forced long-context evaluation: streamed losses equal the model's definition, buckets add up,
a planted defect is flagged at the length where it bites and a healthy model is not, OOM is a result."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("moshi")

from moshi.models.lm import LMModel

from helpers.recall import GUESSES, recall_data, recall_model
from ttt_speech import TTTConfig
from ttt_speech.eval.data import Sequence
from ttt_speech.eval.long_context import bucket_edges, evaluate
from ttt_speech.eval.models import MoshiScorer, Tick, _cross_entropy
from ttt_speech.moshi import convert
from ttt_speech.moshi.tiny import build_tiny_hybrid, build_tiny_lm

pytestmark = pytest.mark.usefixtures("one_thread")
LENGTHS = [4, 8, 16, 32, 64]


def random_codes(lm: LMModel, B: int, T: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, lm.text_card, (B, 1, T), generator=g)
    return torch.cat([text, torch.randint(0, lm.card, (B, lm.n_q, T), generator=g)], dim=1)


def test_streamed_losses_equal_the_models_own_forward():
    """Frame-by-frame streaming through the ring cache (context 8) and TTT states, over 5x the context,
    gives the losses of LMModel.forward (which applies the same context mask in one pass)."""
    for lm in (build_tiny_lm(0), build_tiny_hybrid(0)):
        codes = random_codes(lm, 2, 40)
        scorer = MoshiScorer(lm, "m")
        out = torch.full((2, 3, 40), torch.nan)
        steps: list[int] = []
        scorer.score(codes, out, steps.append)
        with torch.no_grad():
            ref = lm(codes)
        want = torch.cat([_cross_entropy(ref.text_logits[:, 0], codes[:, 0])[:, None],
                          _cross_entropy(ref.logits, codes[:, 1:3])], dim=1)
        want = torch.where(torch.cat([ref.text_mask, ref.mask], dim=1), want, torch.nan)
        assert torch.equal(out.isnan(), want.isnan())
        assert out.isnan().sum() == 2  # the delayed codebook's last position in each sequence
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4, equal_nan=True)
        assert steps == list(range(1, 41))


def test_buckets_partition_positions_and_reproduce_the_mean():
    lm = build_tiny_hybrid(0)
    seqs = [Sequence(f"s{i}", c) for i, c in enumerate(random_codes(lm, 3, 50, seed=2))]
    seqs[2] = Sequence("short", seqs[2].tokens[:, :20])  # a shorter sequence: counted where it exists
    res = evaluate(MoshiScorer(lm, "tiny"), seqs, [16, 32], baseline_length=8, batch_size=2, progress=False)
    assert res.bucket_edges == [0, 1, 2, 4, 8, 16, 32] == bucket_edges(32)
    # text: 32 + 32 + 20 positions; audio0 (no delay) the same; audio1 (delay 1) is scored one frame late,
    # which the 50-frame sequences have past position 32 and the 20-frame one has not
    assert [sum(res.bucket_count[s]) for s in res.streams] == [84, 84, 84 - 1]
    assert res.bucket_count["text"] == [3, 3, 6, 12, 24, 36]
    # token-weighted bucket means give back the text loss of the length-32 window [16, 32)
    b = res.bucket_loss["text"]
    assert res.lengths[1].loss == pytest.approx(b[5], rel=1e-9)
    assert res.lengths[0].loss == pytest.approx(b[4], rel=1e-9)
    whole = sum(m * c for m, c in zip(b, res.bucket_count["text"])) / 84
    assert 0.5 * math.log(64) < whole < 1.5 * math.log(64)  # a random model: about uniform over 64 tokens
    # the attention window is 8: inside = positions [4, 8) (bucket 3), beyond = the rest
    assert res.attention_window == 8
    assert res.loss_inside_window == pytest.approx(b[3], rel=1e-9)
    beyond = sum(m * c for m, c in zip(b[4:], res.bucket_count["text"][4:])) / sum(res.bucket_count["text"][4:])
    assert res.loss_beyond_window == pytest.approx(beyond, rel=1e-9)


@pytest.mark.parametrize("window,flagged", [(1, 4), (4, 8), (8, 16)])
def test_planted_defect_is_flagged_at_the_first_length_past_its_window(window, flagged):
    lm = recall_model(window)
    res = evaluate(MoshiScorer(lm, f"w{window}"), recall_data(lm, 4, 64), LENGTHS, progress=False)
    by_length = {r.length: r for r in res.lengths}
    assert res.baseline_length == 2 and res.baseline_loss < 1e-3  # position 1 always recalls the key
    assert res.degraded_at == flagged
    for L in LENGTHS:
        good = L <= flagged // 2
        assert (by_length[L].ratio > 0.99) if good else (by_length[L].ratio < 0.5), (L, by_length[L])
    # past the window the model guesses uniformly over the 12 non-key tokens
    assert by_length[64].loss == pytest.approx(math.log(GUESSES), abs=0.01)
    if window > 1:  # inside [window/2, window) it recalls; beyond, mostly not
        assert res.loss_inside_window < 1e-3 and res.window_gap > 2.0


def test_healthy_models_are_not_flagged():
    """The recall wiring with attention over the whole sequence is not flagged, vanilla or with a live
    (gate tanh(0.5), random) TTT branch in its layer streaming its state alongside."""
    losses = []
    for hybrid in (False, True):
        lm = recall_model(64)
        if hybrid:
            lm = convert(lm, "all", "hybrid", TTTConfig(dim=lm.dim, num_heads=4, mini_batch=4, gate_init=0.5))
        res = evaluate(MoshiScorer(lm, "healthy"), recall_data(lm, 4, 64), LENGTHS, progress=False)
        assert res.degraded_at is None and res.oom_at is None
        assert all(r.status == "ok" and r.step_ms > 0 and r.positions == 4 * r.length // 2 for r in res.lengths)
        assert min(r.ratio for r in res.lengths) > 0.99
        losses.append(res.bucket_loss["text"])
    assert losses[0] != losses[1]  # the TTT branch does change the outputs


class OOMAfter(MoshiScorer):
    """Runs out of memory when the stream reaches position `limit` (like a KV cache that keeps growing)."""

    def __init__(self, lm: LMModel, limit: int, error: type[BaseException]) -> None:
        super().__init__(lm, "oom")
        self.limit, self.error = limit, error

    def score(self, tokens: torch.Tensor, out: torch.Tensor, tick: Tick) -> None:
        def guarded(step: int) -> None:
            if step > self.limit:
                raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB")
            tick(step)

        super().score(tokens, out, guarded)


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError, MemoryError])
def test_out_of_memory_is_reported_as_a_result(error):
    lm = recall_model(64)
    res = evaluate(OOMAfter(lm, 20, error), recall_data(lm, 2, 64), LENGTHS, batch_size=2, progress=False)
    assert [r.status for r in res.lengths] == ["ok", "ok", "ok", "oom", "oom"]
    assert res.oom_at == 32 and res.degraded_at is None
    assert error.__name__ in res.oom_message and "position 20" in res.oom_message
    assert res.bucket_edges[-1] == 20 and sum(res.bucket_count["text"]) == 2 * 20
