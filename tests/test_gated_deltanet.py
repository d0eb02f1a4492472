"""Gated DeltaNet: the chunked WY form against the per-token oracle, the step against both, and the
contracts a streaming layer will lean on (splits, gradients, fixed-size state, shape errors)."""

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ttt_speech.ops.gated_deltanet import gated_delta_chunked, gated_delta_step_
from ttt_speech.ops.gated_deltanet.naive import gated_delta_naive


def make_inputs(B=2, H=3, T=13, Dk=8, Dv=6, seed=0, dtype=torch.float32, normalize=True):
    """q, k, v, g (<= 0), beta in (0, 1), state; k unit-norm unless asked, as the layer will feed it."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)
    q, k, v = r(B, H, T, Dk), r(B, H, T, Dk), r(B, H, T, Dv)
    if normalize:
        k = torch.nn.functional.normalize(k, dim=-1)
    g = -torch.rand(B, H, T, generator=gen, dtype=dtype) * 0.5
    beta = torch.rand(B, H, T, generator=gen, dtype=dtype)
    return q, k, v, g, beta, r(B, H, Dk, Dv) * 0.3


@pytest.mark.parametrize(
    "B,H,T,Dk,Dv,C",
    [(2, 3, 13, 8, 6, 4), (1, 2, 64, 16, 16, 16), (2, 1, 37, 8, 8, 64), (1, 1, 1, 4, 4, 8), (2, 2, 50, 32, 8, 7)],
)
@pytest.mark.parametrize("with_state", [True, False])
def test_chunked_equals_naive(B, H, T, Dk, Dv, C, with_state):
    """WY/UT chunked form == per-token recurrence (outputs and final state), any T vs C, in fp32."""
    q, k, v, g, beta, S0 = make_inputs(B, H, T, Dk, Dv, seed=T + C)
    S0 = S0 if with_state else None
    o_c, S_c = gated_delta_chunked(q, k, v, g, beta, S0, chunk_size=C)
    o_n, S_n = gated_delta_naive(q, k, v, g, beta, S0)
    assert o_c.shape == (B, H, T, Dv) and S_c.shape == (B, H, Dk, Dv)
    torch.testing.assert_close(o_c, o_n, rtol=0, atol=1e-5)
    torch.testing.assert_close(S_c, S_n, rtol=0, atol=1e-5)


def test_l2_norm_option_and_strong_decay():
    """The l2_norm option normalises q and k inside; a near-total decay neither overflows nor drifts."""
    q, k, v, g, beta, S0 = make_inputs(T=40, normalize=False, seed=3)
    g = g * 40  # exp(g) down to ~e^-20 per token: cumulative decay underflows within a chunk
    o_c, S_c = gated_delta_chunked(q, k, v, g, beta, S0, chunk_size=16, l2_norm=True)
    o_n, S_n = gated_delta_naive(q, k, v, g, beta, S0, l2_norm=True)
    assert torch.isfinite(o_c).all() and torch.isfinite(S_c).all()
    torch.testing.assert_close(o_c, o_n, rtol=0, atol=1e-5)
    torch.testing.assert_close(S_c, S_n, rtol=0, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(1, 40),
    C=st.sampled_from([1, 3, 8, 16]),
    pieces=st.lists(st.one_of(st.just(0), st.integers(1, 20)), max_size=8),
    l2_norm=st.booleans(),
)
def test_any_split_into_prefills_and_steps_equals_one_shot(T, C, pieces, l2_norm):
    """Prefill segments (chunked) and single steps (0 = one in-place step), in any order, give the
    one-shot outputs and final state; whatever is left after `pieces` runs as one last prefill."""
    q, k, v, g, beta, S0 = make_inputs(B=2, H=2, T=T, Dk=4, Dv=3, seed=T, normalize=not l2_norm)
    o, S = gated_delta_chunked(q, k, v, g, beta, S0, chunk_size=C, l2_norm=l2_norm)
    state, outs, t = S0.clone(), [], 0
    for n in pieces + [T]:
        if t >= T:
            break
        e = t + 1 if n == 0 else min(T, t + n)
        seg = [x[:, :, t:e] for x in (q, k, v, g, beta)]
        if n == 0:
            outs.append(gated_delta_step_(*seg, state, l2_norm=l2_norm))
        else:
            y, state = gated_delta_chunked(*seg, state, chunk_size=C, l2_norm=l2_norm)
            outs.append(y)
        t = e
    torch.testing.assert_close(torch.cat(outs, 2), o, rtol=0, atol=1e-5)
    torch.testing.assert_close(state, S, rtol=0, atol=1e-5)


def test_step_updates_in_place_and_exec_mask_freezes_streams():
    q, k, v, g, beta, S0 = make_inputs(T=1)
    state = S0.clone()
    ptr = state.data_ptr()
    o = gated_delta_step_(q, k, v, g, beta, state, exec_mask=torch.tensor([False, True]))
    o_n, S_n = gated_delta_naive(q, k, v, g, beta, S0)
    assert state.data_ptr() == ptr
    assert torch.equal(state[0], S0[0])
    torch.testing.assert_close(state[1], S_n[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(o[1], o_n[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("l2_norm", [False, True])
def test_gradcheck_float64(l2_norm):
    """Backward through the triangular solve, the decays and the state hand-off, for every input."""
    q, k, v, g, beta, S0 = make_inputs(B=1, H=2, T=5, Dk=3, Dv=2, dtype=torch.float64, seed=7)
    inputs = tuple(x.clone().requires_grad_() for x in (q, k, v, g, beta, S0))
    fn = lambda *xs: gated_delta_chunked(*xs, chunk_size=2, l2_norm=l2_norm)
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def test_state_size_is_constant_over_a_long_stream():
    """The memory of a stream is [B, H, Dk, Dv] however long it runs; it stays finite and bounded."""
    B, H, Dk, Dv = 1, 2, 8, 8
    state = torch.zeros(B, H, Dk, Dv)
    nbytes = state.nbytes
    for seg in range(40):  # 4200 tokens: 40 prefills of 100 and 40 x 5 steps
        q, k, v, g, beta, _ = make_inputs(B, H, 105, Dk, Dv, seed=seg)
        _, state = gated_delta_chunked(q[:, :, :100], k[:, :, :100], v[:, :, :100], g[:, :, :100],
                                       beta[:, :, :100], state, chunk_size=32)
        assert state.shape == (B, H, Dk, Dv) and state.nbytes == nbytes
        ptr = state.data_ptr()
        for t in range(100, 105):
            s = slice(t, t + 1)
            gated_delta_step_(q[:, :, s], k[:, :, s], v[:, :, s], g[:, :, s], beta[:, :, s], state)
        assert state.data_ptr() == ptr  # steps write into the caller's tensor, never a new one
    # unit keys and beta in (0, 1) make each update a contraction plus a bounded write
    assert torch.isfinite(state).all() and state.abs().max() < 100


@pytest.mark.parametrize(
    "name,bad,expected",
    [
        ("k", lambda x: x[:, :, :-1], "(2, 3, 13, 8)"),
        ("v", lambda x: x[:1], "(2, 3, 13, 6)"),
        ("g", lambda x: x[..., None], "(2, 3, 13)"),
        ("beta", lambda x: x[:, :2], "(2, 3, 13)"),
        ("state", lambda x: x.transpose(-1, -2), "(2, 3, 8, 6)"),
    ],
)
def test_bad_shapes_raise_naming_expected_and_received(name, bad, expected):
    args = dict(zip(["q", "k", "v", "g", "beta", "state"], make_inputs()))
    args[name] = bad(args[name])
    got = str(tuple(args[name].shape))
    with pytest.raises(ValueError, match=rf"{name} expected shape {re.escape(expected)}.*got {re.escape(got)}"):
        gated_delta_chunked(**args)


def test_step_rejects_more_than_one_token_and_a_wrong_state_dtype():
    q, k, v, g, beta, S0 = make_inputs(T=2)
    with pytest.raises(ValueError, match="one token"):
        gated_delta_step_(q, k, v, g, beta, S0)
    one = [x[:, :, :1] for x in (q, k, v, g, beta)]
    with pytest.raises(ValueError, match="float32"):
        gated_delta_step_(*one, S0.half())
