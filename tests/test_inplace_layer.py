"""InPlaceLayer: exact identity with the host MLP before any write, one semantics across chunked forward and
frame-by-frame step for any split, masks, resets, fixed-size state files, gradients, errors."""

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from helpers.layers import BAD_INPUTS, assert_exec_mask_freezes_streams, assert_forward_leaves_state, assert_reset_mask_restarts_stream, assert_splits_equal_one_shot
from helpers.numerics import REASSOCIATION
from safetensors.torch import load_file, save_file

from ttt_speech.config import InPlaceConfig, TTTConfig
from ttt_speech.layers import InPlaceLayer, InPlaceState, TTTState
from ttt_speech.layers.inplace import GatedMLP

CONFIGS = {"conv2": dict(), "conv3-chunk1": dict(conv_kernel=3, chunk=1, base_lr=0.5), "no-conv-chunk5": dict(conv_kernel=1, chunk=5),
           "decay": dict(chunk=3, decay=0.7)}


def build(name: str = "conv2", seed: int = 0, **kw) -> InPlaceLayer:
    """A small layer whose writes are large enough to matter, every learnable moved off its init."""
    torch.manual_seed(seed)
    cfg = InPlaceConfig(**{**dict(dim=16, hidden=24, chunk=4, base_lr=2.0, target_init_std=0.3, init_std=0.3), **CONFIGS[name], **kw})
    layer = cfg.build()
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if n.startswith(("target_conv", "lr_")):
                p.add_(torch.randn_like(p) * 0.3)
    return layer


def moshi_gating(dim=16, ff=64):
    from moshi.modules.gating import ActivationGating

    torch.manual_seed(3)
    return ActivationGating(dim, ff, F.silu)


@pytest.mark.parametrize("name", CONFIGS)
@settings(max_examples=10, deadline=None)
@given(T=st.integers(1, 30), cuts=st.lists(st.tuples(st.integers(0, 30), st.booleans()), max_size=6))
def test_any_mix_of_prefill_and_steps_equals_one_shot(name, T, cuts):
    """Random splits (not aligned to chunks) through forward and step agree with one forward."""
    assert_splits_equal_one_shot(build(name), T, cuts)


def test_both_chunked_forms_serve_the_layer():
    """Runs up to parallel_max frames take the attention form, longer ones the chunk loop: same result."""
    layer = build()
    assert layer.parallel_max == 2 * 16 * 24 // 40 == 19
    x = torch.randn(2, 40, 16)
    y_loop, s_loop = layer(x)  # 40 > 19: chunk loop
    y, s = layer(x[:, :19])  # attention form, then the rest carried (21 > 19: loop again)
    y2, s2 = layer(x[:, 19:], s)
    torch.testing.assert_close(torch.cat([y, y2], 1), y_loop, rtol=0, atol=1e-5)
    for k in s_loop:
        torch.testing.assert_close(s2[k], s_loop[k], rtol=0, atol=1e-5)


def test_writes_change_later_chunks_only():
    layer = build()
    x = torch.randn(2, 11, 16)
    y, state = layer(x)
    base = layer.mlp(x)
    assert torch.equal(y[:, :4], base[:, :4])  # chunk 0 reads W_down itself
    moved = (y[:, 4:] - base[:, 4:]).abs().amax() / base.abs().amax()
    assert moved > 0.1  # chunks 1, 2 read what chunk 0 (and 1) wrote
    assert state["delta"].abs().amax() > 0 and state["offset"].tolist() == [3, 3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moshi_gating_wrapped_is_exact_before_any_write(dtype):
    gating = moshi_gating().to(dtype)
    hidden = gating.linear_out.weight.shape[1]
    layer = InPlaceConfig(dim=16, hidden=hidden, chunk=4).build(GatedMLP.moshi(gating)).to(dtype)
    x = torch.randn(2, 13, 16, dtype=dtype)
    with torch.no_grad():
        ref = gating(x)
        y, state = layer(x)  # target projection starts at zero: nothing is ever written
        assert torch.equal(y, ref) and y.dtype == dtype and state["delta"].dtype == torch.float32
        assert state["delta"].abs().amax() == 0
        s = layer.init_state(2)
        ys = torch.stack([layer.step(x[:, t], s)[0] for t in range(13)], 1)
    # one frame at a time is another layout of the same products: equal up to reassociation (one bf16 unit)
    torch.testing.assert_close(ys, ref, **(REASSOCIATION if dtype == torch.float32 else {"rtol": 2**-7, "atol": 1e-3}))
    with torch.no_grad():  # with a trained projection, the first chunk is still exact and later ones move
        layer.target_proj.weight.normal_(std=1.0)
        layer.config.base_lr = 1e3
        y, _ = layer(x)
    assert torch.equal(y[:, :4], ref[:, :4]) and not torch.equal(y[:, 4:], ref[:, 4:])


def test_hf_mlp_wrapped_is_exact():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=40, num_attention_heads=2, hidden_act="silu"))
    layer = InPlaceConfig(dim=16, hidden=40, chunk=3).build(GatedMLP.hf(mlp))
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        assert torch.equal(layer(x)[0], mlp(x))
    assert layer.mlp.down is mlp.down_proj  # the host's modules, not copies


def test_forward_does_not_mutate_input_state():
    assert_forward_leaves_state(build(), warm=6)


def test_source_feeds_the_values_only():
    """A separate source (e.g. input embeddings) changes what is written, never the chunk-0 output."""
    layer = build()
    x, src = torch.randn(2, 9, 16), torch.randn(2, 9, 16)
    (y1, s1), (y2, s2) = layer(x), layer(x, source=src)
    assert torch.equal(y1[:, :4], y2[:, :4]) and not torch.equal(s1["delta"], s2["delta"])
    state = layer.init_state(2)
    ys = torch.stack([layer.step(x[:, t], state, source=src[:, t])[0] for t in range(9)], 1)
    torch.testing.assert_close(ys, y2, rtol=0, atol=1e-5)


def test_exec_mask_keeps_masked_streams_unchanged():
    assert_exec_mask_freezes_streams(build())


def test_reset_mask_restarts_only_chosen_streams():
    assert_reset_mask_restarts_stream(build(), T=15)


def test_state_size_constant_and_bytes_at_moshi_7b_shape():
    layer = InPlaceConfig(dim=8, hidden=12, chunk=4, target_init_std=0.1).build()
    _, s10 = layer(torch.randn(1, 10, 8))
    y, s5k = layer(torch.randn(1, 5000, 8))
    assert s10.nbytes == s5k.nbytes == layer.init_state(1).nbytes == 4 * (8 * 12 + 4 * 12 + 4 * 8 + 12 + 8 + 1) + 8
    assert torch.isfinite(y).all() and all(torch.isfinite(s5k[k]).all() for k in s5k)
    spec = InPlaceState.spec(InPlaceConfig(dim=4096, hidden=11264, chunk=64), 1)
    nbytes = sum(torch.Size(shape).numel() * (8 if dt == torch.int64 else 4) for shape, dt in spec.values())
    assert nbytes == 4 * (4096 * 11264 + 64 * (11264 + 4096) + 11264 + 4096 + 1) + 8  # 188.6 MB per layer and stream


def test_save_load_round_trip_and_mismatches_are_named(tmp_path):
    layer = build()
    _, state = layer(torch.randn(2, 7, 16))
    path = tmp_path / "inplace.safetensors"
    state.save(path)
    loaded = InPlaceState.load(path, config=layer.config)
    x = torch.randn(2, 6, 16)
    (y1, s1), (y2, s2) = layer(x, state), layer(x, loaded)
    assert torch.equal(y1, y2) and all(torch.equal(s1[k], s2[k]) for k in s1)
    layer.reset_state(loaded, torch.tensor([True, False]))
    assert torch.equal(loaded["delta"][0], torch.zeros_like(loaded["delta"][0]))

    other = InPlaceConfig(**{**layer.config.to_dict(), "chunk": 8})
    with pytest.raises(ValueError, match=r"another config.*'chunk': \(4, 8\)"):
        InPlaceState.load(path, config=other)
    with pytest.raises(ValueError, match=r"holds a 'inplace' state, expected 'ttt'"):
        TTTState.load(path)
    t = load_file(str(path))
    t["keys"] = t["keys"][:, :2].contiguous()
    meta = {"format": "ttt-speech/state", "version": "1", "kind": "inplace", "config": json.dumps(layer.config.to_dict())}
    save_file(t, str(tmp_path / "bad.st"), metadata=meta)
    with pytest.raises(ValueError, match=r"'keys' expected shape \(2, 4, 24\), got \(2, 2, 24\)"):
        InPlaceState.load(tmp_path / "bad.st")


@pytest.mark.parametrize("name", ["conv2", "decay"])
def test_gradients_reach_every_parameter(name):
    layer = build(name)
    _, carried = layer(torch.randn(2, 6, 16))
    y, s = layer(torch.randn(2, 9, 16), carried)
    (y.square().sum() + s["delta"].square().sum()).backward()
    for n, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("name", ["conv2", "decay"])
def test_gradcheck_through_layer_with_carried_state(name):
    layer = build(name, chunk=3).to(torch.float64)
    _, carried = layer(torch.randn(1, 5, 16, dtype=torch.float64))
    names = ["target_proj.weight", "target_conv_weight", "lr_weight", "lr_bias", "mlp.linear_in.weight"]
    names += ["decay_logit"] if name == "decay" else []
    params = dict(layer.named_parameters())
    leaves = [torch.randn(1, 7, 16, dtype=torch.float64, requires_grad=True)]
    leaves += [params[n].detach().clone().requires_grad_() for n in names]

    def f(x, *ps):
        y, s = torch.func.functional_call(layer, dict(zip(names, ps)), (x, carried))
        return y, s["delta"]

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize("x, err, msg", BAD_INPUTS)
def test_bad_input(x, err, msg):
    with pytest.raises(err, match=msg):
        build()(x)


def test_bad_config_mlp_source_and_foreign_state():
    with pytest.raises(ValueError, match="chunk must be >= 1 frame, got 0"):
        InPlaceConfig(dim=16, hidden=24, chunk=0)
    for bad in (0.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"decay must be in \(0, 1\] \(1.0: no decay.*got"):
            InPlaceConfig(dim=16, hidden=24, decay=bad)
    with pytest.raises(ValueError, match=r"weight shape \(16, 48\), the config says \(dim, hidden\) = \(16, 24\)"):
        InPlaceConfig(dim=16, hidden=24).build(GatedMLP.moshi(moshi_gating(16, 72)))
    layer = build()
    with pytest.raises(ValueError, match=r"source: expected the shape of x \[2, 3, 16\], got \[2, 4, 16\]"):
        layer(torch.randn(2, 3, 16), source=torch.randn(2, 4, 16))
    with pytest.raises(ValueError, match=r"'delta' expected shape \(2, 16, 24\), got \(3, 16, 24\)"):
        layer(torch.randn(2, 3, 16), layer.init_state(3))
    with pytest.raises(TypeError, match="state must be a InPlaceState, got TTTState"):
        layer(torch.randn(2, 3, 16), TTTConfig(dim=16, num_heads=2).build().init_state(2))


def test_forward_under_bf16_autocast_keeps_fp32_state_close_to_fp32():
    # autocast turns the value projection into bf16; the state (and its buffered values) must stay fp32
    layer = InPlaceLayer(InPlaceConfig(dim=16, hidden=32, chunk=4, target_init_std=0.3))
    x = torch.randn(2, 10, 16, generator=torch.Generator().manual_seed(0))
    y, state = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16, state16 = layer(x)
    assert state16["values"].dtype == state16["delta"].dtype == torch.float32
    assert (state16["delta"] - state["delta"]).abs().max() < 0.02 * state["delta"].abs().max()
    assert (y16.float() - y).abs().max() < 0.05 * y.abs().max()


def test_decay_is_a_learned_per_layer_parameter_only_below_one():
    """decay 1.0: no parameter, so state dicts of layers from before the decay load strictly and the numbers
    are the same; decay 0.9: lambda = sigmoid(decay_logit) starts at 0.9, and it fades what was written."""
    plain, decayed = build(), build(decay=0.9)
    assert "decay_logit" not in dict(plain.named_parameters()) and plain.decay(torch.float32) == 1.0
    assert set(decayed.state_dict()) == set(plain.state_dict()) | {"decay_logit"}
    torch.testing.assert_close(decayed.decay(torch.float64), torch.tensor(0.9, dtype=torch.float64), rtol=0, atol=1e-7)
    decayed.load_state_dict({**plain.state_dict(), "decay_logit": decayed.decay_logit.detach()}, strict=True)
    x = torch.randn(2, 11, 16)
    (y1, s1), (y2, s2) = plain(x), decayed(x)
    assert torch.equal(y1[:, :8], y2[:, :8])  # chunks 0 and 1 read a delta nothing faded yet
    assert not torch.equal(y1[:, 8:], y2[:, 8:])  # chunk 2 reads 0.9 x chunk 0's write + chunk 1's
    with torch.no_grad():  # the delta after two chunks: 0.9 (chunk 0) + chunk 1, so chunk 0 alone is the gap
        _, s_first = plain(x[:, :4])
    torch.testing.assert_close(s1["delta"] - s2["delta"], 0.1 * s_first["delta"], rtol=0, atol=1e-5)


def test_writes_scaled_is_the_target_projection_scaled_and_is_undone_on_exit():
    """Scale 0: the layer reads and never writes, as with `target_proj` zeroed (recipes/evidence24/write_scale.py
    edits the weights for the same effect); scale 1 is the layer as trained; a model without in-place layers is
    refused."""
    from torch import nn

    from ttt_speech.layers.inplace import writes_scaled

    layer = build()
    with torch.no_grad():
        layer.target_proj.weight.normal_(std=1.0)
    x = torch.randn(2, 11, 16)
    trained, _ = layer(x)
    off = build()
    off.load_state_dict(layer.state_dict())
    with torch.no_grad():
        off.target_proj.weight.zero_()
    want, _ = off(x)
    with writes_scaled(nn.Sequential(layer), 0.0):
        got, state = layer(x)
        s = layer.init_state(2)
        steps = torch.stack([layer.step(x[:, t], s)[0] for t in range(11)], 1)
    assert torch.equal(got, want) and state["delta"].abs().max() == 0
    torch.testing.assert_close(steps, want, **REASSOCIATION)
    assert layer.write_scale == 1.0 and torch.equal(layer(x)[0], trained)
    for per_position, expected in ((torch.zeros(11), want), (torch.ones(2, 11), trained)):  # [T] and [B, T]
        with writes_scaled(nn.Sequential(layer), per_position):
            assert torch.equal(layer(x)[0], expected)
    assert (trained - want).abs().max() > 0.1  # the writes matter: the test could fail
    with pytest.raises(ValueError, match="has no in-place memory layer"):
        with writes_scaled(nn.Linear(2, 2), 0.0):
            pass
