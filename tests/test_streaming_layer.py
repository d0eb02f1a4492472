"""What `StreamingLayer` does for every memory layer: the dtype and device of new states, and resets of a state
that came from a file (TTT's restart from its learned start weights, the others' from zeros)."""

import pytest
import torch

from ttt_speech.config import GatedDeltaNetConfig, InPlaceConfig, TTTConfig

CONFIGS = {
    "ttt": TTTConfig(dim=16, num_heads=2, mini_batch=4, gate_init=0.5, share_qk=True),
    "ttt-mlp": TTTConfig(dim=16, num_heads=2, inner="mlp", mini_batch=3, gate_init=0.5, target="next"),
    "gdn": GatedDeltaNetConfig(dim=16, num_heads=2, gate_init=0.5),
    "inplace": InPlaceConfig(dim=16, hidden=24, chunk=3, target_init_std=0.3),
}


def build(name: str):
    """Every parameter moved off its init, so start weights and zeros differ."""
    torch.manual_seed(0)
    layer = CONFIGS[name].build()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return layer


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("model_dtype,state_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                     (torch.float64, torch.float64)])
def test_new_states_are_fp32_or_fp64_and_live_where_the_layer_does(name, model_dtype, state_dtype):
    layer = build(name).to(model_dtype)
    assert layer.state_dtype == state_dtype
    for state in (layer.init_state(2), layer(torch.randn(2, 5, 16, dtype=model_dtype))[1]):
        dtypes = {k: t.dtype for k, t in state.tensors.items()}
        assert dtypes == {k: torch.int64 if k == "offset" else state_dtype for k in dtypes}
    assert {t.device.type for t in layer.init_state(2, "meta").tensors.values()} == {"meta"}
    assert {t.device.type for t in layer.to("meta").init_state(2).tensors.values()} == {"meta"}


@pytest.mark.parametrize("name", CONFIGS)
def test_a_loaded_state_resets_to_exactly_a_fresh_one(name, tmp_path):
    layer = build(name)
    state = layer.init_state(2)
    layer.step(torch.randn(2, 7, 16), state)
    state.save(tmp_path / "s.safetensors")
    fresh = layer.init_state(2)
    loaded = type(state).load(tmp_path / "s.safetensors", config=layer.config)
    layer.reset_state(loaded, torch.tensor([True, False]))
    for k, t in loaded.tensors.items():
        assert torch.equal(t[0], fresh[k][0]) and torch.equal(t[1], state[k][1]), k
    assert any(not torch.equal(fresh[k][0], torch.zeros_like(fresh[k][0])) for k in fresh) == name.startswith("ttt")
    assert all(torch.equal(t, fresh[k]) for k, t in layer.reset_state(loaded).tensors.items())
