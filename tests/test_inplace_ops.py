"""In-place fast weights: the chunked reference against the frame-by-frame oracle, the step against both."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ttt_speech.ops.inplace.naive import inplace_naive
from ttt_speech.ops.inplace.parallel import inplace_parallel
from ttt_speech.ops.inplace.reference import inplace_chunked
from ttt_speech.ops.inplace.step import inplace_step_


def make(B=2, T=13, F=6, D=5, C=4, offsets=(0, 3), seed=0, dtype=torch.float64):
    """Random inputs and a carried state whose buffer rows < offset hold pairs (rows after: junk, ignored)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    offset = torch.tensor(list(offsets)[:B], dtype=torch.int64)
    return dict(q=r(B, T, F), k=r(B, T, F), v=r(B, T, D) * 0.3, delta=r(B, D, F) * 0.1, buf_k=r(B, C, F),
                buf_v=r(B, C, D) * 0.3, offset=offset, chunk=C)


def valid_rows(buf, offset):
    return buf * (torch.arange(buf.shape[1]) < offset[:, None])[..., None]


def assert_same(a, b, atol):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


def test_hand_computed_example():
    """Scalars, C = 2, q = k = v = 1: each full chunk adds 2 to Delta; a chunk reads what chunks before wrote."""
    one = torch.ones(1, 6, 1, dtype=torch.float64)
    z = torch.zeros(1, 2, 1, dtype=torch.float64)
    o, delta, bk, bv, off = inplace_chunked(one, one, one, torch.zeros(1, 1, 1, dtype=torch.float64), z, z,
                                            torch.tensor([0]), 2)
    assert o.flatten().tolist() == [0, 0, 2, 2, 4, 4] and delta.item() == 6 and off.item() == 0
    o, delta, bk, bv, off = inplace_chunked(one[:, :3], one[:, :3], one[:, :3], torch.zeros(1, 1, 1, dtype=torch.float64),
                                            z + 1, z + 1, torch.tensor([1]), 2)  # one pair (1, 1) already waiting
    assert o.flatten().tolist() == [0, 2, 2] and delta.item() == 4 and off.item() == 0


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 17), C=st.integers(1, 5), o0=st.integers(0, 4), o1=st.integers(0, 4), seed=st.integers(0, 99))
def test_reference_equals_naive(T, C, o0, o1, seed):
    """Any length, chunk and (different) starting offsets: outputs, Delta, buffer and offset agree."""
    x = make(T=T, C=C, offsets=(o0 % C, o1 % C), seed=seed)
    ref, nai = inplace_chunked(**x), inplace_naive(**x)
    assert_same(ref, nai, 1e-12)
    assert torch.equal(ref[4], (x["offset"] + T) % C)


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 17), C=st.integers(1, 5), o0=st.integers(0, 4), o1=st.integers(0, 4), seed=st.integers(0, 99))
def test_parallel_equals_reference(T, C, o0, o1, seed):
    """The attention form (training's fast path) == the chunk loop: outputs, Delta, buffer, offset."""
    x = make(T=T, C=C, offsets=(o0 % C, o1 % C), seed=seed)
    assert_same(inplace_parallel(**x), inplace_chunked(**x), 1e-12)


def test_gradients_equal_naive():
    """Autograd through the chunked and the attention form equals autograd through the oracle, for every input."""
    x = make(T=11, C=3, offsets=(1, 2))
    names = ["q", "k", "v", "delta", "buf_k", "buf_v"]
    grads = []
    for fn in (inplace_chunked, inplace_parallel, inplace_naive):
        leaves = {n: x[n].clone().requires_grad_() for n in names}
        o, delta, bk, bv, _ = fn(**{**x, **leaves})
        w = torch.Generator().manual_seed(1)
        loss = sum((t * torch.randn(t.shape, generator=w, dtype=t.dtype)).sum() for t in (o, delta, bk, bv))
        grads.append(torch.autograd.grad(loss, list(leaves.values())))
    assert_same(grads[0], grads[2], 1e-12)
    assert_same(grads[1], grads[2], 1e-12)
    assert grads[0][4][0, 2:].abs().max() == 0  # buffer rows at/after the offset are not read


def test_split_anywhere_equals_one_shot():
    x = make(T=23, C=4)
    full = inplace_chunked(**x)
    state = [x["delta"], x["buf_k"], x["buf_v"], x["offset"]]
    outs = []
    for s, e in [(0, 1), (1, 6), (6, 7), (7, 19), (19, 23)]:
        o, *state = inplace_chunked(x["q"][:, s:e], x["k"][:, s:e], x["v"][:, s:e], *state, chunk=4)
        outs.append(o)
    assert_same([torch.cat(outs, 1), *state[:3]], [full[0], *full[1:4]], 1e-12)
    assert torch.equal(state[3], full[4])


def test_step_equals_chunked():
    """Frame by frame, in place (fp32), equals the chunked form; buffers match bit for bit."""
    x = make(T=14, C=4, dtype=torch.float32)
    x["buf_k"], x["buf_v"] = valid_rows(x["buf_k"], x["offset"]), valid_rows(x["buf_v"], x["offset"])
    o_r, d_r, bk_r, bv_r, off_r = inplace_chunked(**x)
    d, bk, bv, off = x["delta"].clone(), x["buf_k"].clone(), x["buf_v"].clone(), x["offset"].clone()
    outs = [inplace_step_(x["q"][:, t], x["k"][:, t], x["v"][:, t], d, bk, bv, off, 4) for t in range(14)]
    torch.testing.assert_close(torch.stack(outs, 1), o_r, rtol=0, atol=1e-5)
    torch.testing.assert_close(d, d_r, rtol=0, atol=1e-5)
    assert torch.equal(bk, bk_r) and torch.equal(bv, bv_r) and torch.equal(off, off_r)


def test_step_exec_mask_freezes_streams_and_first_chunk_reads_nothing():
    x = make(T=1, C=2, offsets=(1, 1), dtype=torch.float32)
    before = {n: x[n].clone() for n in ("delta", "buf_k", "buf_v", "offset")}
    inplace_step_(x["q"][:, 0], x["k"][:, 0], x["v"][:, 0], x["delta"], x["buf_k"], x["buf_v"], x["offset"], 2,
                  exec_mask=torch.tensor([False, True]))
    for n, t in before.items():
        assert torch.equal(x[n][0], t[0]), n
        assert not torch.equal(x[n][1], t[1]), n
    assert x["offset"].tolist() == [1, 0] and x["buf_k"][1].abs().max() == 0  # chunk written, buffer cleared
    # Delta = 0: the whole first chunk reads exact zeros (the pretrained MLP, unchanged)
    y = make(T=7, C=8, offsets=(0, 0), dtype=torch.float32)
    o, *_ = inplace_chunked(**{**y, "delta": torch.zeros_like(y["delta"])})
    assert torch.equal(o, torch.zeros_like(o))
