"""GatedDeltaNetLayer: TTTLayer's contracts (one semantics across prefill and steps, zero gate, masks,
resets, fixed-size state files, gradients, errors) for the linear-memory rival branch."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from helpers.layers import BAD_INPUTS, assert_exec_mask_freezes_streams, assert_forward_leaves_state, assert_reset_mask_restarts_stream, assert_splits_equal_one_shot
from safetensors.torch import load_file, save_file

from ttt_speech.config import GatedDeltaNetConfig, TTTConfig
from ttt_speech.layers import GatedDeltaNetLayer, GatedDeltaNetState, TTTState

CONFIGS = {
    "conv": dict(),
    "no-conv": dict(use_short_conv=False),
    "wide-v": dict(head_dim_k=4, head_dim_v=12, conv_kernel=2),
}


def build(name: str = "conv", seed: int = 0, **kw) -> GatedDeltaNetLayer:
    """A small layer with every learnable moved off its init, so nothing hides behind zeros/ones."""
    torch.manual_seed(seed)
    cfg = GatedDeltaNetConfig(dim=16, num_heads=2, chunk_size=4, gate_init=0.7, **{**CONFIGS[name], **kw})
    layer = cfg.build()
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if n.endswith("bias") or n in ("o_norm_weight", "A_log"):
                p.add_(torch.randn_like(p) * 0.1)
    return layer


@pytest.mark.parametrize("name", CONFIGS)
@settings(max_examples=12, deadline=None)
@given(T=st.integers(1, 30), cuts=st.lists(st.tuples(st.integers(0, 30), st.booleans()), max_size=6))
def test_any_mix_of_prefill_and_steps_equals_one_shot(name, T, cuts):
    """Random splits (not aligned to chunks) through forward and step agree with one forward."""
    assert_splits_equal_one_shot(build(name), T, cuts)


@pytest.mark.parametrize("name", CONFIGS)
def test_fresh_layer_outputs_exact_zero(name):
    layer = GatedDeltaNetConfig(dim=16, num_heads=2, **CONFIGS[name]).build()
    y, _ = layer(torch.randn(2, 9, 16))
    assert torch.equal(y, torch.zeros_like(y))
    y, _ = layer.step(torch.randn(2, 16), layer.init_state(2))
    assert torch.equal(y, torch.zeros_like(y))


def test_forward_does_not_mutate_input_state():
    assert_forward_leaves_state(build(), warm=3)


def test_exec_mask_keeps_masked_streams_unchanged():
    assert_exec_mask_freezes_streams(build())


def test_reset_mask_restarts_only_chosen_streams():
    assert_reset_mask_restarts_stream(build(), T=11)


def test_state_size_constant_over_10k_tokens():
    layer = GatedDeltaNetConfig(dim=8, num_heads=2, gate_init=0.5).build()
    _, s10 = layer(torch.randn(1, 10, 8))
    y, s10k = layer(torch.randn(1, 10_000, 8))
    assert s10.nbytes == s10k.nbytes == layer.init_state(1).nbytes
    assert torch.isfinite(y).all() and all(torch.isfinite(s10k[k]).all() for k in s10k)


def test_save_load_round_trip_and_mismatches_are_named(tmp_path):
    layer = build("wide-v")
    _, state = layer(torch.randn(2, 7, 16))
    path = tmp_path / "gdn.safetensors"
    state.save(path)
    loaded = GatedDeltaNetState.load(path, config=layer.config)
    x = torch.randn(2, 5, 16)
    (y1, s1), (y2, s2) = layer(x, state), layer(x, loaded)
    assert torch.equal(y1, y2) and all(torch.equal(s1[k], s2[k]) for k in s1)
    layer.reset_state(loaded, torch.tensor([True, False]))  # a loaded state resets without rebinding
    assert torch.equal(loaded["S"][0], torch.zeros_like(loaded["S"][0]))

    other = GatedDeltaNetConfig(dim=16, num_heads=2, head_dim_k=4, head_dim_v=12, conv_kernel=3)
    with pytest.raises(ValueError, match=r"another config.*'conv_kernel': \(2, 3\)"):
        GatedDeltaNetState.load(path, config=other)
    with pytest.raises(ValueError, match=r"holds a 'gated-deltanet' state, expected 'ttt'"):
        TTTState.load(path)
    t = load_file(str(path))
    t["S"] = t["S"][:, :, :2].contiguous()
    meta = {"format": "ttt-speech/state", "version": "1", "kind": "gated-deltanet",
            "config": json.dumps(layer.config.to_dict())}
    save_file(t, str(tmp_path / "bad.st"), metadata=meta)
    with pytest.raises(ValueError, match=r"'S' expected shape \(2, 2, 4, 12\), got \(2, 2, 2, 12\)"):
        GatedDeltaNetState.load(tmp_path / "bad.st")


@pytest.mark.parametrize("name", CONFIGS)
def test_gradients_reach_every_parameter(name):
    layer = build(name)
    _, carried = layer(torch.randn(2, 5, 16))
    y, s = layer(torch.randn(2, 9, 16), carried)
    (y.square().sum() + s["S"].square().sum()).backward()
    for n, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


def test_gradcheck_through_layer_with_carried_state():
    layer = build().to(torch.float64)
    _, carried = layer(torch.randn(1, 5, 16, dtype=torch.float64))
    names = ["k_proj.weight", "a_proj.weight", "b_proj.weight", "A_log", "dt_bias", "conv_q_weight", "o_norm_weight"]
    params = dict(layer.named_parameters())
    leaves = [torch.randn(1, 6, 16, dtype=torch.float64, requires_grad=True)]
    leaves += [params[n].detach().clone().requires_grad_() for n in names]

    def f(x, *ps):
        y, s = torch.func.functional_call(layer, dict(zip(names, ps)), (x, carried))
        return y, s["S"]

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-5, fast_mode=True)


def test_bf16_input_keeps_fp32_state():
    layer = build().to(torch.bfloat16)
    y, state = layer(torch.randn(2, 9, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and state["S"].dtype == torch.float32


@pytest.mark.parametrize("x, err, msg", BAD_INPUTS)
def test_bad_input(x, err, msg):
    with pytest.raises(err, match=msg):
        build()(x)


def test_bad_config_and_foreign_state():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        GatedDeltaNetConfig(dim=10, num_heads=3)
    layer = build()
    with pytest.raises(ValueError, match=r"'S' expected shape \(2, 2, 8, 8\), got \(3, 2, 8, 8\)"):
        layer(torch.randn(2, 3, 16), layer.init_state(3))
    with pytest.raises(ValueError, match=r"expected tensors \['S', 'conv_k', 'conv_q', 'conv_v'\] for this config, got \['S'\]"):
        layer(torch.randn(2, 3, 16), build("no-conv").init_state(2))
    with pytest.raises(TypeError, match="state must be a GatedDeltaNetState, got TTTState"):
        layer(torch.randn(2, 3, 16), TTTConfig(dim=16, num_heads=2).build().init_state(2))
