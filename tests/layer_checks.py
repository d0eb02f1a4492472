"""Checks every streaming layer (TTT, Gated DeltaNet) must pass, shared by their test files."""

import torch


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
    torch.testing.assert_close(torch.cat(ys, 1), y_ref, rtol=0, atol=1e-5)
    for k in s_ref:
        torch.testing.assert_close(state[k], s_ref[k], rtol=0, atol=1e-5)
