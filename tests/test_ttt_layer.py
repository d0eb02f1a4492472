"""TTTLayer: one semantics across chunked prefill and streaming steps, gates, resets, gradients, errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from helpers.layers import assert_forward_leaves_state, assert_splits_equal_one_shot

from ttt_speech import TTTConfig, TTTLayer

CONFIGS = {
    "linear": dict(inner="linear"),
    "mlp": dict(inner="mlp"),
    "fla": dict(variant="fla"),
    "mamba-block": dict(pre_conv=True, share_qk=True, output_gate=True, conv_kernel=3),
}


def build(name: str, K: int = 4, seed: int = 0, dtype=torch.float32) -> TTTLayer:
    torch.manual_seed(seed)
    layer = TTTConfig(dim=16, num_heads=2, mini_batch=K, gate_init=0.7, **CONFIGS[name]).build().to(dtype)
    with torch.no_grad():  # move every learnable off its init so nothing hides behind zeros/ones
        for n, p in layer.named_parameters():
            if n in ("ttt_norm_weight", "ttt_norm_bias", "token_idx", "lr_bias", "b1", "b2"):
                p.add_(torch.randn_like(p) * 0.1)
    return layer


@pytest.mark.parametrize("name", CONFIGS)
@settings(max_examples=12, deadline=None)
@given(T=st.integers(1, 30), cuts=st.lists(st.tuples(st.integers(0, 30), st.booleans()), max_size=6))
def test_any_mix_of_prefill_and_steps_equals_one_shot(name, T, cuts):
    """Random splits (lengths not multiples of the mini-batch) through forward and step agree."""
    assert_splits_equal_one_shot(build(name), T, cuts)


@pytest.mark.parametrize("name", CONFIGS)
def test_fresh_layer_outputs_exact_zero(name):
    layer = TTTConfig(dim=16, num_heads=2, mini_batch=4, **CONFIGS[name]).build()
    y, _ = layer(torch.randn(2, 9, 16))
    assert torch.equal(y, torch.zeros_like(y))
    y, _ = layer.step(torch.randn(2, 16), layer.init_state(2))
    assert torch.equal(y, torch.zeros_like(y))


def test_forward_does_not_mutate_input_state():
    assert_forward_leaves_state(build("linear"))


def test_reset_mask_restarts_only_chosen_streams():
    layer = build("mamba-block")
    x = torch.randn(2, 11, 16)
    state = layer.init_state(2)
    layer.step(x[:, :6], state)
    kept = {k: t[1].clone() for k, t in state.tensors.items()}
    state.reset(torch.tensor([True, False]))
    for k, t in state.tensors.items():
        assert torch.equal(t[1], kept[k])
    y, _ = layer.step(x[:, 6:], state)
    y_fresh, _ = layer(x[:1, 6:])
    y_cont, _ = layer(x[1:], None)
    torch.testing.assert_close(y[:1], y_fresh, rtol=0, atol=1e-6)
    torch.testing.assert_close(y[1:], y_cont[:, 6:], rtol=0, atol=1e-6)


def test_exec_mask_keeps_masked_streams_unchanged():
    layer = build("mamba-block")
    state = layer.init_state(3)
    layer.step(torch.randn(3, 5, 16), state)
    before = {k: t.clone() for k, t in state.tensors.items()}
    mask = torch.tensor([True, False, True])
    layer.step(torch.randn(3, 16), state, exec_mask=mask)
    layer.step(torch.randn(3, 2, 16), state, exec_mask=mask)
    for k, t in state.tensors.items():
        assert torch.equal(t[1], before[k][1]), k
    assert state.offset.tolist() == [(5 + 3) % 4, 5 % 4, (5 + 3) % 4]


def test_state_size_constant_over_100k_tokens():
    layer = TTTConfig(dim=8, num_heads=2, mini_batch=16).build()
    _, s10 = layer(torch.randn(1, 10, 8))
    _, s100k = layer(torch.randn(1, 100_000, 8) * 0.1)
    assert s10.nbytes == s100k.nbytes == layer.init_state(1).nbytes
    assert all(torch.isfinite(s100k[k].float()).all() for k in s100k)


@pytest.mark.parametrize("name", ["linear", "mlp", "mamba-block", "fla"])
def test_gradcheck_through_layer_with_carried_state(name):
    """float64 gradcheck for inputs, projections, eta, LN and inner init, across boundaries and a carried state."""
    layer = build(name, K=3, dtype=torch.float64)
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    _, carried = layer(torch.randn(1, 4, 16, dtype=torch.float64))  # offset 1, nonzero accumulated grads
    names = ["q_proj.weight", "v_proj.weight", "lr_weight", "lr_bias", "ttt_norm_weight", "ttt_norm_bias", "W1", "b1"]
    names += ["token_idx"] if name != "fla" else []
    names += ["conv_k_weight", "pre_conv_weight"] if name == "mamba-block" else []
    params = dict(layer.named_parameters())
    leaves = [x.requires_grad_()] + [params[n].detach().clone().requires_grad_() for n in names]

    def f(x, *ps):
        y, s = torch.func.functional_call(layer, dict(zip(names, ps)), (x, carried))
        return y, s["W1"], s["grad_W1"]

    # fast mode checks random projections of the Jacobian: as strict against a wrong gradient, minutes faster
    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-5, fast_mode=True)


def test_bf16_input_keeps_fp32_state():
    layer = build("linear").to(torch.bfloat16)
    y, state = layer(torch.randn(2, 9, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and state["W1"].dtype == torch.float32


@pytest.mark.parametrize(
    "x, err, msg",
    [
        (torch.randn(2, 16), ValueError, r"expected shape \[B, T, 16\], got \[2, 16\]"),
        (torch.randn(2, 3, 15), ValueError, r"expected shape \[B, T, 16\], got \[2, 3, 15\]"),
        (torch.ones(2, 3, 16, dtype=torch.long), TypeError, "floating point"),
        ([[1.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_input(x, err, msg):
    with pytest.raises(err, match=msg):
        build("linear")(x)


def test_bad_config_and_foreign_state():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        TTTConfig(dim=10, num_heads=3)
    with pytest.raises(ValueError, match="even head_dim"):
        TTTConfig(dim=6, num_heads=2)
    layer = build("linear")
    with pytest.raises(ValueError, match=r"'W1' expected shape \(2, 2, 8, 8\), got \(3, 2, 8, 8\)"):
        layer(torch.randn(2, 3, 16), layer.init_state(3))
    other = TTTConfig(dim=16, num_heads=4, mini_batch=4).build()
    with pytest.raises(ValueError, match=r"'W1' expected shape \(2, 2, 8, 8\), got \(2, 4, 4, 4\)"):
        layer(torch.randn(2, 3, 16), other.init_state(2))
    with pytest.raises(ValueError, match=r"k_proj: expected a 16->16 projection .* got weight shape \(8, 16\)"):
        TTTConfig(dim=16, num_heads=2).build(k_proj=torch.nn.Linear(16, 8, bias=False))
    mlp = build("mlp")
    with pytest.raises(ValueError, match="expected tensors"):
        layer(torch.randn(2, 3, 16), mlp.init_state(2))


def test_initial_fast_weights_learn_from_a_fresh_state():
    """W1/b1 are the weights every stream starts from: the loss must reach them."""
    layer = build("mlp")
    y, _ = layer(torch.randn(2, 9, 16))
    y.square().sum().backward()
    for name in ("W1", "b1", "W2", "b2", "token_idx"):
        assert getattr(layer, name).grad is not None and getattr(layer, name).grad.abs().sum() > 0, name
