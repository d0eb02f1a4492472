"""In-place fast weights: the chunked reference against the frame-by-frame oracle, the step against both."""

import pytest
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


# -- the decay lambda (issue 24): Delta_{c+1} = lambda Delta_c + the chunk's pairs ------------------------------

FORMS = (inplace_chunked, inplace_parallel, inplace_naive)


def test_decay_hand_computed_example():
    """Scalars, C = 2, q = k = v = 1, lambda = 0.5: Delta goes 0 -> 2 -> 0.5*2 + 2 = 3 -> 3.5; each chunk reads it."""
    one = torch.ones(1, 6, 1, dtype=torch.float64)
    z = torch.zeros(1, 2, 1, dtype=torch.float64)
    for fn in FORMS:
        o, delta, *_ = fn(one, one, one, torch.zeros(1, 1, 1, dtype=torch.float64), z, z, torch.tensor([0]), 2, 0.5)
        assert o.flatten().tolist() == [0, 0, 2, 2, 3, 3] and delta.item() == 3.5, fn.__name__
        # a start delta of 8 and one buffered pair: chunk 0 reads 8, then 0.5*8 + 2 = 6, the run ends inside chunk 1
        o, delta, *_ = fn(one[:, :3], one[:, :3], one[:, :3], torch.full((1, 1, 1), 8.0, dtype=torch.float64),
                          z + 1, z + 1, torch.tensor([1]), 2, 0.5)
        assert o.flatten().tolist() == [8, 6, 6] and delta.item() == 5, fn.__name__


@settings(max_examples=30, deadline=None)
@given(T=st.integers(1, 17), C=st.integers(1, 5), o0=st.integers(0, 4), o1=st.integers(0, 4),
       lam=st.floats(0.05, 1.0), cut=st.integers(0, 17), seed=st.integers(0, 99))
def test_decay_forms_equal_naive_across_splits(T, C, o0, o1, lam, cut, seed):
    """Any length, chunk, offsets and lambda in (0, 1]: the chunk loop and the attention form equal the oracle
    (outputs, Delta, buffer, offset), in one run and cut in two anywhere with the state carried."""
    x = make(T=T, C=C, offsets=(o0 % C, o1 % C), seed=seed)
    lam = torch.tensor(lam, dtype=torch.float64)
    nai = inplace_naive(**x, decay=lam)
    for fn in (inplace_chunked, inplace_parallel):
        assert_same(fn(**x, decay=lam), nai, 1e-12)
        s = min(cut, T - 1)  # both pieces nonempty
        o1_, *state = fn(x["q"][:, :s], x["k"][:, :s], x["v"][:, :s], x["delta"], x["buf_k"], x["buf_v"], x["offset"],
                         C, lam) if s else (x["q"][:, :0, :0], x["delta"], x["buf_k"], x["buf_v"], x["offset"])
        o2_, *state = fn(x["q"][:, s:], x["k"][:, s:], x["v"][:, s:], *state, C, lam)
        outs = torch.cat([o1_, o2_], 1) if s else o2_
        assert_same([outs, *state[:3]], nai[:4], 1e-12)
        assert torch.equal(state[3], nai[4])


@pytest.mark.parametrize("lam", [None, 1.0, 0.7])
def test_gradients_equal_naive(lam):
    """Autograd through the chunked and the attention form equals autograd through the oracle, for every input and,
    with a decay, for lambda itself (a leaf, as the layer's is)."""
    x = make(T=11, C=3, offsets=(1, 2))
    names = ["q", "k", "v", "delta", "buf_k", "buf_v"]
    grads = []
    for fn in FORMS:
        leaves = {n: x[n].clone().requires_grad_() for n in names}
        if lam is not None:
            leaves["decay"] = torch.tensor(lam, dtype=torch.float64, requires_grad=True)
        o, delta, bk, bv, _ = fn(**{**x, **leaves})
        w = torch.Generator().manual_seed(1)
        loss = sum((t * torch.randn(t.shape, generator=w, dtype=t.dtype)).sum() for t in (o, delta, bk, bv))
        grads.append(torch.autograd.grad(loss, list(leaves.values())))
    assert_same(grads[0], grads[2], 1e-12)
    assert_same(grads[1], grads[2], 1e-12)
    assert grads[0][4][0, 2:].abs().max() == 0  # buffer rows at/after the offset are not read
    if lam is not None:
        assert grads[2][-1].abs() > 1e-3  # d loss / d lambda is not zero: the check above can fail


@pytest.mark.parametrize("fn", [inplace_chunked, inplace_parallel])
def test_decay_gradcheck(fn):
    """Finite differences in fp64 on a tiny shape, lambda included: the analytic gradients are the true ones."""
    x = make(B=2, T=7, F=3, D=2, C=2, offsets=(1, 0))
    leaves = [x[n].clone().requires_grad_() for n in ("q", "k", "v", "delta", "buf_k", "buf_v")]
    lam = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)

    def f(q, k, v, delta, buf_k, buf_v, lam):
        return fn(q, k, v, delta, buf_k, buf_v, x["offset"], x["chunk"], lam)[:4]

    assert torch.autograd.gradcheck(f, (*leaves, lam))


@settings(max_examples=20, deadline=None)
@given(T=st.integers(1, 15), C=st.integers(1, 5), o0=st.integers(0, 4), lam=st.floats(0.05, 0.999),
       cut=st.integers(0, 15), seed=st.integers(0, 99))
def test_decay_step_equals_chunked_cut_anywhere(T, C, o0, lam, cut, seed):
    """The first `cut` frames through the chunked form, the rest frame by frame in place (fp32): the outputs and
    the state equal one chunked run; buffers bit for bit."""
    x = make(T=T, C=C, offsets=(o0 % C, 0), seed=seed, dtype=torch.float32)
    x["buf_k"], x["buf_v"] = valid_rows(x["buf_k"], x["offset"]), valid_rows(x["buf_v"], x["offset"])
    lam = torch.tensor(lam)
    o_r, d_r, bk_r, bv_r, off_r = inplace_chunked(**x, decay=lam)
    s = min(cut, T)
    outs, d, bk, bv, off = [o_r[:, :0]], x["delta"].clone(), x["buf_k"].clone(), x["buf_v"].clone(), x["offset"].clone()
    if s:
        o, d, bk, bv, off = inplace_chunked(x["q"][:, :s], x["k"][:, :s], x["v"][:, :s], d, bk, bv, off, C, lam)
        outs.append(o)
    outs += [inplace_step_(x["q"][:, t], x["k"][:, t], x["v"][:, t], d, bk, bv, off, C, decay=lam)[:, None]
             for t in range(s, T)]
    torch.testing.assert_close(torch.cat(outs, 1), o_r, rtol=0, atol=1e-5)
    torch.testing.assert_close(d, d_r, rtol=0, atol=1e-5)
    assert torch.equal(bk, bk_r) and torch.equal(bv, bv_r) and torch.equal(off, off_r)


def test_decay_step_masked_streams_untouched_and_only_chunk_ends_fade():
    """lambda = 0.5: a stream held by exec_mask keeps every bit; one mid-chunk keeps its delta (no fade); one at
    its chunk end gets 0.5 Delta + its chunk's pairs."""
    x = make(B=3, T=1, C=3, offsets=(2, 1, 2), dtype=torch.float64)
    x["offset"] = torch.tensor([2, 1, 2])
    before = {n: x[n].clone() for n in ("delta", "buf_k", "buf_v", "offset")}
    inplace_step_(x["q"][:, 0], x["k"][:, 0], x["v"][:, 0], x["delta"], x["buf_k"], x["buf_v"], x["offset"], 3,
                  exec_mask=torch.tensor([False, True, True]), decay=torch.tensor(0.5))
    for n, t in before.items():
        assert torch.equal(x[n][0], t[0]), n
    assert torch.equal(x["delta"][1], before["delta"][1]) and x["offset"].tolist() == [2, 2, 0]
    pairs = torch.cat([before["buf_v"][2, :2], x["v"][2]]).T @ torch.cat([before["buf_k"][2, :2], x["k"][2]])
    torch.testing.assert_close(x["delta"][2], 0.5 * before["delta"][2] + pairs, rtol=0, atol=1e-12)


def test_decay_one_is_bit_identical_to_no_decay():
    """lambda = 1, as the float or as a tensor, computes exactly the numbers of the forms without a decay."""
    x = make(T=13, C=4, dtype=torch.float32)
    for fn in FORMS:
        plain = fn(**x)
        for lam in (1.0, torch.tensor(1.0)):
            assert all(torch.equal(a, b) for a, b in zip(plain, fn(**x, decay=lam))), fn.__name__
    states = [[x[n].clone() for n in ("delta", "buf_k", "buf_v", "offset")] for _ in range(3)]
    for t in range(13):
        o = [inplace_step_(x["q"][:, t], x["k"][:, t], x["v"][:, t], *s, 4, decay=lam)
             for s, lam in zip(states, (1.0, torch.tensor(1.0), 1.0))]
        assert torch.equal(o[0], o[1]) and torch.equal(o[0], o[2])
    assert all(torch.equal(a, b) for a, b in zip(states[0], states[1]))


def test_decay_bounds_the_delta_over_a_long_stream():
    """200 chunks of random pairs with a common part (a stream that keeps sounding alike) streamed through the
    step: with lambda = 0.9 the delta's norm stays under max ||chunk write|| / (1 - lambda) and stops growing;
    with lambda = 1 it grows linearly, past that bound by far (what broke the issue-24 model at 3x its length)."""
    B, C, F, D, n = 1, 4, 8, 6, 200
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(B, n * C, F, generator=g) + 1, torch.randn(B, n * C, D, generator=g) + 1
    writes = torch.stack([torch.linalg.matrix_norm(v[0, s:s + C].T @ k[0, s:s + C]) for s in range(0, n * C, C)])
    norms = {}
    for lam in (0.9, 1.0):
        d, bk, bv, off = torch.zeros(B, D, F), torch.zeros(B, C, F), torch.zeros(B, C, D), torch.zeros(B, dtype=torch.int64)
        norms[lam] = []
        for t in range(n * C):
            inplace_step_(k[:, t], k[:, t], v[:, t], d, bk, bv, off, C, decay=torch.tensor(lam))
            if off.item() == 0:
                norms[lam].append(torch.linalg.matrix_norm(d[0]).item())
    bound = writes.max().item() / (1 - 0.9)
    assert max(norms[0.9]) < bound and max(norms[0.9][100:]) < 1.5 * max(norms[0.9][:100])
    assert norms[1.0][-1] > 5 * bound and norms[1.0][-1] > 1.8 * norms[1.0][99]
