"""Checks every streaming layer (TTT, Gated DeltaNet, in-place) must pass, shared by their test files, and a
stand-in host attention for `shared_qkv` TTT layers."""

import torch
from torch import nn

from helpers.numerics import REASSOCIATION


def assert_splits_equal_one_shot(layer, T: int, cuts: list[tuple[int, bool]], dim: int = 16) -> None:
    """Feed x through `layer` in pieces cut at `cuts` (True: that piece token by token through the
    in-place step, False: one chunked forward) and require the one-shot output and final state."""
    x = torch.randn(2, T, dim, generator=torch.Generator().manual_seed(T))
    y_ref, s_ref = layer(x)
    bounds = sorted({0, T, *[c for c, _ in cuts if c < T]})
    as_steps = dict(cuts)
    state, ys = layer.init_state(2), []
    for s, e in zip(bounds, bounds[1:]):
        if as_steps.get(s, False):
            for t in range(s, e):
                y, state = layer.step(x[:, t], state)
                ys.append(y[:, None])
        else:
            y, state = layer(x[:, s:e], state)
            ys.append(y)
    # fp32 reassociation (helpers/numerics.py), relative too: outputs reach ~30, where 1e-5 absolute is 3e-7
    torch.testing.assert_close(torch.cat(ys, 1), y_ref, **REASSOCIATION)
    for k in s_ref:
        torch.testing.assert_close(state[k], s_ref[k], **REASSOCIATION)


def assert_forward_leaves_state(layer, warm: int = 0, dim: int = 16) -> None:
    """The chunked forward returns a new state: the one it was given (after `warm` streamed frames) stays bit for bit."""
    state = layer.init_state(2)
    if warm:
        layer.step(torch.randn(2, warm, dim), state)
    before = {k: t.clone() for k, t in state.tensors.items()}
    layer(torch.randn(2, 7, dim), state)
    assert all(torch.equal(state[k], before[k]) for k in before)


def assert_exec_mask_freezes_streams(layer, dim: int = 16) -> dict:
    """Steps (one frame and a run) with stream 1 masked off: its state stays bit for bit, stream 0's moves.
    Returns the state (for layer-specific checks)."""
    state = layer.init_state(3)
    layer.step(torch.randn(3, 5, dim), state)
    before = {k: t.clone() for k, t in state.tensors.items()}
    mask = torch.tensor([True, False, True])
    layer.step(torch.randn(3, dim), state, exec_mask=mask)
    layer.step(torch.randn(3, 2, dim), state, exec_mask=mask)
    for k, t in state.tensors.items():
        assert torch.equal(t[1], before[k][1]), k
        assert k in getattr(state, "settings", ()) or not torch.equal(t[0], before[k][0]), k
    return state


def assert_reset_mask_restarts_stream(layer, T: int = 15, dim: int = 16) -> None:
    """Reset stream 0 of two after 6 frames: stream 0's state is zeros and it continues like a fresh
    stream; stream 1 is untouched and continues its own history."""
    x = torch.randn(2, T, dim)
    state = layer.init_state(2)
    layer.step(x[:, :6], state)
    kept = {k: t[1].clone() for k, t in state.tensors.items()}
    layer.reset_state(state, torch.tensor([True, False]))
    for k, t in state.tensors.items():
        assert torch.equal(t[1], kept[k]) and torch.equal(t[0], torch.zeros_like(t[0])), k
    y, _ = layer.step(x[:, 6:], state)
    torch.testing.assert_close(y[:1], layer(x[:1, 6:])[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(y[1:], layer(x[1:])[0][:, 6:], rtol=0, atol=1e-6)


# (x, error, message) for x [B, T, 16] inputs every streaming layer of width 16 must refuse
BAD_INPUTS = [
    (torch.randn(2, 16), ValueError, r"expected shape \[B, T, 16\], got \[2, 16\]"),
    (torch.randn(2, 3, 15), ValueError, r"expected shape \[B, T, 16\], got \[2, 3, 15\]"),
    (torch.ones(2, 3, 16, dtype=torch.long), TypeError, "floating point"),
]


class Host(nn.Module):
    """Stands in for an attention: a fused q/k/v projection, and 'heads' a fixed linear map of x."""

    def __init__(self, ttt: nn.Module) -> None:
        super().__init__()
        C = ttt.config.dim
        self.ttt, self.in_proj, self.mix = ttt, nn.Linear(C, 3 * C, bias=False), nn.Linear(C, C, bias=False)

    def host(self, x):
        return {"qkv": self.in_proj(x), "heads": self.mix(x)}

    def forward(self, x, state=None):
        return self.ttt(x, state, **self.host(x))

    def step(self, x, state, exec_mask=None):
        return self.ttt.step(x, state, exec_mask, **self.host(x))

    def init_state(self, batch_size):
        return self.ttt.init_state(batch_size)
