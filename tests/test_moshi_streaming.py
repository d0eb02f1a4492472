"""TTT state inside Moshi's streaming machinery: LMGen sessions, reset_streaming(mask), set_exec_mask,
in-place updates (what CUDA-graph replay needs), and streaming far past the attention context."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("moshi")

from moshi.models.lm import LMGen  # noqa: E402

from helpers.moshi import Session, ttt_states, user_stream  # noqa: E402
from ttt_speech import TTTConfig  # noqa: E402
from ttt_speech.moshi import HybridLMModel, convert  # noqa: E402
from ttt_speech.moshi.generate import streaming_state_bytes  # noqa: E402
from ttt_speech.moshi.tiny import build_tiny_lm, tiny_lm_config  # noqa: E402

CONTEXT = tiny_lm_config()["context"]


def tiny_hybrid(layers="all", shared_qkv: bool = False) -> HybridLMModel:
    """Gates open, so a TTT state that is wrong shows in the logits."""
    return convert(build_tiny_lm(0), layers=layers, ttt=TTTConfig(dim=32, num_heads=4, mini_batch=4, gate_init=0.7,
                                                                  shared_qkv=shared_qkv))


@pytest.mark.parametrize("shared_qkv", [False, True])
@torch.no_grad()
def test_reset_streaming_mask_restarts_only_the_masked_streams(shared_qkv: bool) -> None:
    lm = tiny_hybrid(shared_qkv=shared_qkv)
    k, m = 13, 3 * CONTEXT  # reset mid TTT mini-batch (13 % 4 != 0) and after the ring cache wrapped
    user = user_stream(lm, 2, k + m)
    with Session(lm, 1) as fresh:
        expect0 = fresh.run(user[:1, :, k:])
        fresh_state = [{n: t.clone() for n, t in s.items()} for s in ttt_states(lm)]
    with Session(lm, 1) as whole:
        expect1 = whole.run(user[1:])
    with Session(lm, 2) as both:
        before = [{n: t.data_ptr() for n, t in s.items()} for s in ttt_states(lm)]
        both.run(user[:, :, :k])
        both.gen.reset_streaming(torch.tensor([True, False]))
        got = both.run(user[:, :, k:])
        after = [{n: t.data_ptr() for n, t in s.items()} for s in ttt_states(lm)]
        end_state = ttt_states(lm)
    torch.testing.assert_close(got[0], expect0[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], expect1[0, k:], rtol=1e-5, atol=1e-5)
    assert before == after  # reset and steps write into the same tensors (CUDA graphs replay on them)
    for got_s, want_s in zip(end_state, fresh_state):
        for name, want in want_s.items():
            torch.testing.assert_close(got_s[name][:1], want, rtol=1e-5, atol=1e-5)
    assert (got[1] - expect0[0]).abs().max() > 1e-3  # the two streams do differ


@pytest.mark.parametrize("shared_qkv", [False, True])
@torch.no_grad()
def test_exec_mask_freezes_the_masked_streams(shared_qkv: bool) -> None:
    lm = tiny_hybrid(shared_qkv=shared_qkv)
    T = 4 * CONTEXT
    user = user_stream(lm, 2, T)
    skipped = {5, 6, 7, 8, 9, 17}  # includes a TTT mini-batch boundary (offset 3 -> 0 at step 7)
    kept = [t for t in range(T) if t not in skipped]
    with Session(lm, 1) as ref0:
        expect0 = ref0.run(user[:1])
    with Session(lm, 1) as ref1:
        expect1 = ref1.run(user[1:, :, kept])
        want_state = [{n: t.clone() for n, t in s.items()} for s in ttt_states(lm)]
    with Session(lm, 2) as both:
        got = []
        for t in range(T):
            both.gen.set_exec_mask(torch.tensor([True, t not in skipped]))
            got.append(both.run(user[:, :, t:t + 1]))
        got_state = ttt_states(lm)
    got_t = torch.cat(got, dim=1)
    torch.testing.assert_close(got_t[0], expect0[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_t[1, kept], expect1[0], rtol=1e-5, atol=1e-5)
    for got_s, want_s in zip(got_state, want_state):
        for name, want in want_s.items():
            torch.testing.assert_close(got_s[name][1:], want, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_streams_25x_the_context_in_constant_state_and_finite() -> None:
    lm = tiny_hybrid()
    steps = 25 * CONTEXT
    logits: list[torch.Tensor] = []
    gen = LMGen(lm, use_sampling=True, on_text_logits_hook=lambda x: logits.append(x.clone()))
    user = user_stream(lm, 2, steps)
    torch.manual_seed(0)
    sizes = []
    with gen.streaming(2):
        ptrs = [{n: t.data_ptr() for n, t in s.items()} for s in ttt_states(lm)]
        for t in range(steps):
            gen.step(user[:, :, t:t + 1])
            sizes.append(streaming_state_bytes(gen, lm))
        assert ptrs == [{n: t.data_ptr() for n, t in s.items()} for s in ttt_states(lm)]
        assert all(torch.isfinite(t).all() for s in ttt_states(lm) for t in s.values())
        ttt_bytes = sum(layer._streaming_state.memory.nbytes for layer in lm.memory_layers())
    assert len(set(sizes)) == 1, "streaming state grew"
    assert torch.isfinite(torch.cat(logits)).all()
    vanilla = build_tiny_lm(0)
    vgen = LMGen(vanilla, use_sampling=True)
    with vgen.streaming(2):
        vgen.step(user[:, :, :1])
        assert sizes[0] - streaming_state_bytes(vgen, vanilla) == ttt_bytes > 0


@torch.no_grad()
def test_each_streaming_session_starts_from_the_initial_state() -> None:
    lm = tiny_hybrid(layers=[0])
    user = user_stream(lm, 1, 2 * CONTEXT)
    with Session(lm, 1) as first:
        a = first.run(user)
    with Session(lm, 1) as second:
        b = second.run(user)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
