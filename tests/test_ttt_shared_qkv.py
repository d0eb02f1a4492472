"""A `shared_qkv` TTT layer: q/k/v from its host attention's projection, output mixed into its heads."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from helpers.layers import Host, assert_splits_equal_one_shot
from torch import nn

from ttt_speech import TTTConfig


def build(variant: str, gate_init: float = 0.7, dtype=torch.float32) -> Host:
    torch.manual_seed(0)
    ttt = TTTConfig(dim=16, num_heads=2, mini_batch=4, gate_init=gate_init, shared_qkv=True, variant=variant).build()
    with torch.no_grad():
        for n, p in ttt.named_parameters():
            if n in ("ttt_norm_weight", "ttt_norm_bias", "token_idx", "lr_bias", "b1"):
                p.add_(torch.randn_like(p) * 0.1)
    return Host(ttt).to(dtype)


@pytest.mark.parametrize("variant", ["ttt-lm", "fla"])
@settings(max_examples=10, deadline=None)
@given(T=st.integers(1, 30), cuts=st.lists(st.tuples(st.integers(0, 30), st.booleans()), max_size=6))
def test_any_mix_of_prefill_and_steps_equals_one_shot(variant, T, cuts):
    assert_splits_equal_one_shot(build(variant), T, cuts)


def test_has_no_projections_of_its_own():
    ttt = build("ttt-lm").ttt
    names = {n for n, _ in ttt.named_parameters()}
    assert not names & {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "post_norm.weight"}
    own = TTTConfig(dim=16, num_heads=2, mini_batch=4).build()
    assert sum(p.numel() for p in own.parameters()) - sum(p.numel() for p in ttt.parameters()) == 4 * 16 * 16 + 2 * 16


def test_closed_gate_returns_the_heads_bit_for_bit():
    host = build("ttt-lm", gate_init=0.0, dtype=torch.bfloat16)
    x = torch.randn(2, 9, 16, dtype=torch.bfloat16)
    y, state = host(x)
    assert torch.equal(y, host.host(x)["heads"])
    y, _ = host.step(x[:, 0], state)
    assert torch.equal(y, host.host(x[:, 0])["heads"])


def test_gradients_reach_the_host_projection_and_the_ttt_parameters():
    host = build("fla").double()
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    leaves = [host.in_proj.weight, host.ttt.lr_weight, host.ttt.W1, host.ttt.gate_alpha]

    def f(*ps):
        y, s = torch.func.functional_call(host, dict(zip(["in_proj.weight", "ttt.lr_weight", "ttt.W1",
                                                          "ttt.gate_alpha"], ps)), (x,))
        return y, s["W1"]

    assert torch.autograd.gradcheck(f, [p.detach().clone().requires_grad_() for p in leaves], eps=1e-6,
                                    atol=1e-5, fast_mode=True)


def test_bad_host_inputs():
    host = build("ttt-lm")
    x = torch.randn(2, 3, 16)
    with pytest.raises(ValueError, match=r"expected host inputs \{'qkv': \[2, 3, 48\], 'heads': \[2, 3, 16\]\}.*got none"):
        host.ttt(x)
    with pytest.raises(ValueError, match=r"got \{'qkv': \[2, 3, 32\], 'heads': \[2, 3, 16\]\}"):
        host.ttt(x, qkv=torch.randn(2, 3, 32), heads=torch.randn(2, 3, 16))
    own = TTTConfig(dim=16, num_heads=2).build()
    with pytest.raises(ValueError, match="shared_qkv=False: expected host inputs none"):
        own(x, qkv=torch.randn(2, 3, 48), heads=x)
    with pytest.raises(ValueError, match="takes none of its own"):
        TTTConfig(dim=16, num_heads=2, shared_qkv=True).build(q_proj=nn.Linear(16, 16))
    with pytest.raises(ValueError, match="pre_conv, share_qk and output_gate"):
        TTTConfig(dim=16, num_heads=2, shared_qkv=True, pre_conv=True)
