"""TTTConfig(target="next"): token t's inner loss pairs the key of token t-1 with the value of token t.
Causal, one semantics across chunked forward and steps for any split, carried across segments."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from helpers.layers import Host, assert_splits_equal_one_shot
from helpers.numerics import REASSOCIATION

from ttt_speech import TTTConfig, TTTLayer, TTTState

CONFIGS = {
    "linear": dict(),
    "mlp-pre-conv": dict(inner="mlp", pre_conv=True, conv_kernel=3),
    "fla": dict(variant="fla"),
}


def build(name: str = "linear", target: str = "next", **kw) -> TTTLayer:
    torch.manual_seed(0)
    cfg = TTTConfig(dim=16, num_heads=2, mini_batch=4, gate_init=0.7, target=target, **{**CONFIGS[name], **kw})
    layer = cfg.build()
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if n in ("ttt_norm_weight", "ttt_norm_bias", "token_idx", "lr_bias", "b1", "b2"):
                p.add_(torch.randn_like(p) * 0.1)
    return layer


@pytest.mark.parametrize("name", CONFIGS)
@settings(max_examples=10, deadline=None)
@given(T=st.integers(1, 30), cuts=st.lists(st.tuples(st.integers(0, 30), st.booleans()), max_size=6))
def test_any_mix_of_prefill_and_steps_equals_one_shot(name, T, cuts):
    assert_splits_equal_one_shot(build(name), T, cuts)


@settings(max_examples=8, deadline=None)
@given(T=st.integers(1, 20), cuts=st.lists(st.tuples(st.integers(0, 20), st.booleans()), max_size=4))
def test_shared_qkv_splits_equal_one_shot(T, cuts):
    torch.manual_seed(0)
    assert_splits_equal_one_shot(Host(TTTConfig(dim=16, num_heads=2, mini_batch=4, gate_init=0.7, shared_qkv=True,
                                                target="next").build()), T, cuts)


def test_keys_are_the_previous_tokens_keys():
    """Same weights, no RoPE: the inner inputs of "next" are those of "same" with k moved one token later."""
    same, nxt = build(target="same", use_rope=False), build(target="next", use_rope=False)
    nxt.load_state_dict(same.state_dict())
    seen = []
    for layer in (same, nxt):
        layer.register_inner_hook(lambda lay, *inputs: seen.append(inputs))
    x = torch.randn(2, 9, 16)
    y_same, _ = same(x)
    y_next, state = nxt(x)
    (q0, k0, v0, a0, c0), (q1, k1, v1, a1, c1) = seen
    assert torch.equal(q0, q1) and torch.equal(v0, v1) and torch.equal(a0, a1) and torch.equal(c0, c1)
    assert torch.equal(k1[:, :, 1:], k0[:, :, :-1]) and k1[:, :, 0].abs().max() == 0  # nothing before the stream
    torch.testing.assert_close(state["k_prev"], nxt.k_proj(x[:, -1]), **REASSOCIATION)  # one row, not the batch
    assert not torch.allclose(y_same[:, 1:], y_next[:, 1:], atol=1e-3)


def test_causal_outputs_never_see_later_tokens():
    layer = build("mlp-pre-conv")
    x = torch.randn(2, 13, 16)
    y, _ = layer(x)
    for t in (0, 4, 7, 12):
        x2 = x.clone()
        x2[:, t:] = torch.randn_like(x2[:, t:])
        y2, _ = layer(x2)
        assert torch.equal(y2[:, :t], y[:, :t]) and not torch.equal(y2[:, t], y[:, t])


def test_state_files_name_the_target():
    layer = build()
    assert set(layer.init_state(1).tensors) == {"W1", "b1", "grad_W1", "grad_b1", "offset", "k_prev"}
    with pytest.raises(ValueError, match="target must be 'same' or 'next', got 'prev'"):
        TTTConfig(dim=16, num_heads=2, target="prev")
    old = TTTConfig.from_dict({k: v for k, v in build(target="same").config.to_dict().items() if k != "target"})
    assert old.target == "same"  # files written before the option read as before
    with pytest.raises(ValueError, match=r"expected tensors \[.*'k_prev'.*\] for this config"):
        layer(torch.randn(1, 3, 16), TTTState.zeros(old, 1, torch.float32, "cpu"))
