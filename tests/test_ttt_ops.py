"""The chunked reference against the naive per-token oracle, and the step form against both."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ttt_speech.ops.ttt.naive import ttt_naive
from ttt_speech.ops.ttt.reference import layer_norm_l2_grad, gelu, gelu_grad, ttt_chunked
from ttt_speech.ops.ttt.step import ttt_step_


def make_inputs(B=2, H=3, T=13, D=8, depth=1, seed=0, dtype=torch.float64, offset=None):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=dtype) * scale)
    q, k, v = r(B, H, T, D), r(B, H, T, D), r(B, H, T, D)
    a = torch.rand(B, H, T, generator=g, dtype=dtype)
    c = torch.rand(B, H, T, generator=g, dtype=dtype) * 0.1  # lr = base_lr*sigmoid(.)/head_dim scale
    ln_w, ln_b = 1 + r(H, D, scale=0.1), r(H, D, scale=0.1)
    dims = [D, 4 * D, D][: depth + 1] if depth == 2 else [D, D]
    weights = []
    for i in range(depth):
        weights += [r(B, H, dims[i], dims[i + 1], scale=0.3), r(B, H, 1, dims[i + 1], scale=0.1)]
    grads = [r(*w.shape, scale=0.05) for w in weights]
    if offset is None:
        offset = torch.tensor([0, 3][:B] + [0] * max(0, B - 2))
    return (q, k, v, a, c, ln_w, ln_b), weights, grads, offset


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("residual", ["q", "z"])
def test_reference_equals_naive(depth, residual):
    """Dual form (closed-form gradients) == per-token autograd, across boundaries and offsets."""
    args, weights, grads, offset = make_inputs(depth=depth)
    out_r, w_r, g_r, off_r = ttt_chunked(*args, weights, grads, offset, 4, residual=residual)
    out_n, w_n, g_n, off_n = ttt_naive(*args, weights, grads, offset, 4, residual=residual)
    torch.testing.assert_close(out_r, out_n, rtol=0, atol=1e-10)
    for a, b in zip(w_r + g_r, w_n + g_n):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert torch.equal(off_r, off_n) and off_r.tolist() == [13 % 4, (3 + 13) % 4]


def test_closed_form_gradients_match_autograd():
    z = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    target, w, b = torch.randn(5, 8, dtype=torch.float64), torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    loss = 0.5 * (torch.nn.functional.layer_norm(z, (8,), w, b, eps=1e-6) - target).pow(2).sum()
    (auto,) = torch.autograd.grad(loss, z)
    torch.testing.assert_close(layer_norm_l2_grad(z, target, w, b, 1e-6), auto, rtol=0, atol=1e-12)
    x = torch.randn(100, dtype=torch.float64, requires_grad=True)
    (auto,) = torch.autograd.grad(gelu(x).sum(), x)
    torch.testing.assert_close(gelu_grad(x), auto, rtol=0, atol=1e-12)


@pytest.mark.parametrize("depth", [1, 2])
def test_step_equals_chunked(depth):
    """One token at a time, in place, equals the chunked form: outputs and final state."""
    args, weights, grads, offset = make_inputs(depth=depth, dtype=torch.float32)
    q, k, v, a, c, ln_w, ln_b = args
    out_r, w_r, g_r, off_r = ttt_chunked(*args, weights, grads, offset, 4)
    w_s, g_s, off_s = [w.clone() for w in weights], [g.clone() for g in grads], offset.clone()
    outs = []
    for t in range(q.shape[2]):
        s = slice(t, t + 1)
        outs.append(ttt_step_(q[:, :, s], k[:, :, s], v[:, :, s], a[:, :, s], c[:, :, s], ln_w, ln_b,
                              w_s, g_s, off_s, 4))
    torch.testing.assert_close(torch.cat(outs, 2), out_r, rtol=0, atol=1e-5)
    for x, y in zip(w_s + g_s, w_r + g_r):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5)
    assert torch.equal(off_s, off_r)


def test_step_exec_mask_freezes_streams():
    args, weights, grads, offset = make_inputs(depth=1, dtype=torch.float32, T=1)
    w0, g0, off0 = [w.clone() for w in weights], [g.clone() for g in grads], offset.clone()
    mask = torch.tensor([False, True])
    ttt_step_(*args, weights, grads, offset, 4, exec_mask=mask)
    for new, old in zip(weights + grads, w0 + g0):
        assert torch.equal(new[0], old[0]) and not torch.equal(new[1], old[1])
    assert offset.tolist() == [off0[0].item(), (off0[1].item() + 1) % 4]


@settings(max_examples=25, deadline=None)
@given(
    T=st.integers(1, 40),
    K=st.sampled_from([1, 3, 4, 16]),
    cuts=st.lists(st.integers(0, 40), max_size=5),
    depth=st.sampled_from([1, 2]),
    off=st.integers(0, 15),
)
def test_any_split_equals_one_shot(T, K, cuts, depth, off):
    """Any split of a stream into chunks gives the same outputs and state as one chunk.

    In float64: the property is exact, while fp32 rounding alone (a split changes the summation
    order) reached 2.4e-5 at T=31, K=3, cuts=[1], depth 2 (6e-15 in float64).
    """
    offset = torch.tensor([off % K, 0])
    args, weights, grads, offset = make_inputs(T=T, depth=depth, dtype=torch.float64, D=4, H=2, offset=offset)
    out, w, g, o = ttt_chunked(*args, weights, grads, offset, K)
    bounds = sorted({0, T, *[x for x in cuts if x < T]})
    outs, ws, gs, os_ = [], weights, grads, offset
    for s, e in zip(bounds, bounds[1:]):
        piece = [t[:, :, s:e] for t in args[:5]] + list(args[5:])
        y, ws, gs, os_ = ttt_chunked(*piece, ws, gs, os_, K)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 2), out, rtol=0, atol=1e-5)
    for x, y in zip(ws + gs, w + g):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5)
    assert torch.equal(os_, o)
