"""convert(): hybrid with a closed gate is the original model exactly; the training path (chunked TTT,
windowed attention) equals one-step-per-call streaming; replace mode drops attention and its cache."""

from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
import torch

pytest.importorskip("moshi")

from moshi.models.lm import LMModel  # noqa: E402
from moshi.modules.transformer import StreamingTransformer, StreamingTransformerLayer  # noqa: E402

from helpers.moshi import assert_same_model, greedy_generate, open_gates, random_codes, streamed_logits  # noqa: E402
from ttt_speech import TTTConfig  # noqa: E402
from ttt_speech.branches import DEFAULT_BRANCH  # noqa: E402
from ttt_speech.config import InPlaceConfig  # noqa: E402
from ttt_speech.layers.inplace import InPlaceLayer  # noqa: E402
from ttt_speech.moshi import (  # noqa: E402
    HybridTransformerLayer,
    convert,
    default_branch_config,
    default_ttt_config,
    infer_moshi_config,
    memory_parameters,
)
from ttt_speech.moshi.generate import streaming_state_bytes  # noqa: E402
from ttt_speech.moshi.tiny import build_tiny_lm, tiny_lm_config  # noqa: E402

CONTEXT = tiny_lm_config()["context"]


def test_infer_moshi_config_recovers_the_config() -> None:
    lm = build_tiny_lm(0)
    assert infer_moshi_config(lm) == tiny_lm_config() | {"existing_text_end_padding_id": 0}
    other = tiny_lm_config(gating="none", norm="layer_norm", layer_scale=0.01, hidden_scale=3.0,
                           depformer_gating="gelu", depformer_dim_feedforward=40, kv_repeat=2)
    inferred = infer_moshi_config(build_tiny_lm(0, other))  # raises if the rebuilt model differs
    assert inferred["gating"] == "none" and inferred["norm"] == "layer_norm" and inferred["kv_repeat"] == 2
    assert inferred["depformer_gating"] == "gelu" and inferred["depformer_kv_repeat"] == 2  # leaked from main


@pytest.mark.parametrize("shared_qkv", [False, True])
def test_hybrid_with_closed_gate_is_the_original_exactly(shared_qkv: bool) -> None:
    lm = build_tiny_lm(0)
    ref = copy.deepcopy(lm)
    hybrid = convert(lm, layers="all", mode="hybrid",
                     ttt=TTTConfig(dim=32, num_heads=4, mini_batch=4, shared_qkv=shared_qkv))
    assert hybrid is lm and all(isinstance(layer, HybridTransformerLayer) for layer in hybrid.transformer.layers)
    assert not any(isinstance(layer, HybridTransformerLayer) for layer in hybrid.depformer.layers)
    logits_ref = assert_same_model(ref, hybrid, 4 * CONTEXT)
    open_gates(hybrid)  # the comparison above must be able to fail: an open gate changes the logits
    assert not torch.equal(greedy_generate(hybrid, 4 * CONTEXT)[1], logits_ref)


@pytest.mark.parametrize("mode,layers,shared_qkv", [("hybrid", "all", False), ("hybrid", [1], False),
                                                    ("hybrid", "all", True), ("replace", range(0, 2), False)])
def test_training_path_equals_step_by_step_streaming(mode: str, layers, shared_qkv: bool) -> None:
    lm = build_tiny_lm(0)
    ref_logits = lm(random_codes(lm, 2, 5 * CONTEXT)).logits.detach()
    model = convert(lm, layers=layers, mode=mode, ttt=default_ttt_config(lm, mode, mini_batch=4, shared_qkv=shared_qkv))
    open_gates(model)
    codes = random_codes(model, 2, 5 * CONTEXT)  # 40 frames: 5x the attention context, 10 TTT mini-batches
    with torch.no_grad():
        train = model(codes)
    logits, text_logits = streamed_logits(model, codes)
    assert train.logits.shape == logits.shape == (2, model.dep_q, 5 * CONTEXT, model.card)
    assert torch.isfinite(train.logits[train.mask]).all()
    torch.testing.assert_close(logits, train.logits, rtol=1e-5, atol=2e-5, equal_nan=True)
    torch.testing.assert_close(text_logits, train.text_logits, rtol=1e-5, atol=2e-5, equal_nan=True)
    assert (train.logits - ref_logits).nan_to_num().abs().max() > 1e-2  # TTT changed the model


@pytest.mark.parametrize("shared_qkv", [False, True])
def test_training_path_backpropagates_into_ttt(shared_qkv: bool) -> None:
    model = convert(build_tiny_lm(0), layers=[0], ttt=TTTConfig(dim=32, num_heads=4, mini_batch=4, gate_init=0.3,
                                                                shared_qkv=shared_qkv))
    model.train()
    out = model(random_codes(model, 2, 3 * CONTEXT))
    loss = out.logits[out.mask].logsumexp(-1).mean() + out.text_logits[out.text_mask].logsumexp(-1).mean()
    loss.backward()
    names = dict(memory_parameters(model))
    assert names and all(n.startswith("transformer.layers.0.memory.") for n in names)
    own = () if shared_qkv else ("q_proj.weight", "v_proj.weight", "o_proj.weight")
    for name in (*own, "gate_alpha", "lr_weight", "ttt_norm_weight", "W1"):
        grad = names[f"transformer.layers.0.memory.{name}"].grad
        assert grad is not None and grad.abs().max() > 0, name


def test_replace_mode_starts_from_attention_and_drops_the_kv_cache() -> None:
    lm = build_tiny_lm(0)
    attn_in = [layer.self_attn.in_projs[0].weight.detach().clone() for layer in lm.transformer.layers]
    attn_out = [layer.self_attn.out_projs[0].weight.detach().clone() for layer in lm.transformer.layers]
    hybrid_bytes = _state_bytes(convert(copy.deepcopy(lm), layers=[0], memory=default_ttt_config(lm)))
    model = convert(lm, layers=[0], mode="replace", memory=default_ttt_config(lm, "replace"))
    layer = model.transformer.layers[0]
    assert not hasattr(layer, "self_attn") and hasattr(model.transformer.layers[1], "self_attn")
    assert not any(k.startswith("transformer.layers.0.self_attn.") for k in model.state_dict())
    torch.testing.assert_close(torch.cat([layer.memory.q_proj.weight, layer.memory.k_proj.weight, layer.memory.v_proj.weight]),
                               attn_in[0], rtol=0, atol=0)
    torch.testing.assert_close(layer.memory.o_proj.weight, attn_out[0], rtol=0, atol=0)
    assert float(torch.tanh(layer.memory.gate_alpha.detach()).min()) == 1.0
    kv_bytes = 2 * 1 * CONTEXT * 32 * 4  # one layer's ring cache (k and v), batch 1, fp32
    assert _state_bytes(model) < hybrid_bytes - kv_bytes + 64
    with pytest.raises(ValueError, match="gate_init=0"):
        convert(build_tiny_lm(0), mode="replace", ttt=TTTConfig(dim=32, num_heads=4))


def _state_bytes(model: LMModel) -> int:
    with model.streaming(1):
        return streaming_state_bytes(model)


def test_layer_selection_and_errors() -> None:
    assert convert(build_tiny_lm(0), layers=[-1]).memory_spec.layers == (1,)
    assert convert(build_tiny_lm(0), layers=range(0, 2)).memory_spec.layers == (0, 1)
    for bad in ([2], [], [0, 0], "some"):
        with pytest.raises(ValueError):
            convert(build_tiny_lm(0), layers=bad)
    with pytest.raises(ValueError, match="dim"):
        convert(build_tiny_lm(0), ttt=TTTConfig(dim=64, num_heads=4))
    model = convert(build_tiny_lm(0))
    with pytest.raises(TypeError):
        convert(model)
    shared = TTTConfig(dim=32, num_heads=4, shared_qkv=True)
    with pytest.raises(ValueError, match="shared_qkv is a hybrid-mode branch"):
        convert(build_tiny_lm(0), mode="replace", ttt=dataclasses.replace(shared, gate_init=10.0))
    with pytest.raises(ValueError, match="shared_qkv is a hybrid-mode branch"):
        convert(build_tiny_lm(0), ttt=shared, init_from_attention=True)
    with pytest.raises(ValueError, match="TTTConfig.num_heads must be 4, got 2"):
        convert(build_tiny_lm(0), ttt=TTTConfig(dim=32, num_heads=2, shared_qkv=True))


def test_without_memory_the_branch_is_the_commands_default() -> None:
    """One default for one thing: convert(lm, layers) builds what convert-moshi builds without --branch (in-place,
    shaped like the gated MLPs); what only TTT does, asked without memory=, is one error naming memory=TTTConfig."""
    model = convert(build_tiny_lm(0), layers=[1])
    assert model.memory_spec.branch == DEFAULT_BRANCH == "inplace"
    assert model.memory_spec.config == default_branch_config(build_tiny_lm(0)) == InPlaceConfig(dim=32, hidden=88)
    assert [isinstance(getattr(layer, "memory", None), InPlaceLayer) for layer in model.transformer.layers] == [
        False, True]
    for asked in ({"mode": "replace"}, {"init_from_attention": True}):
        lm = build_tiny_lm(0)
        with pytest.raises(ValueError, match=r"needs a TTT branch, and the default branch is inplace .*: pass "
                                             r"memory=TTTConfig\(\.\.\.\)"):
            convert(lm, layers=[0], **asked)
        assert not hasattr(lm, "memory_spec")  # refused before anything changed
    with pytest.raises(ValueError, match=r"one gated MLP \(gating\); for this model pass memory=TTTConfig"):
        convert(build_tiny_lm(0, tiny_lm_config(gating="none")), layers=[0])
    lm = build_tiny_lm(0)  # named, the same asks keep their meaning
    assert convert(lm, [0], "replace", default_ttt_config(lm, "replace")).memory_spec.branch == "ttt"


def test_layer_class_hook_of_streaming_transformer() -> None:
    """moshi's `StreamingTransformer(layer_class=...)` builds TTT layers directly (moshi-finetune path)."""
    torch.manual_seed(0)
    cfg = TTTConfig(dim=32, num_heads=4, mini_batch=4, gate_init=0.5)
    tr = StreamingTransformer(d_model=32, num_heads=4, num_layers=2, dim_feedforward=64, causal=True,
                              context=CONTEXT, positional_embedding="rope",
                              layer_class=functools.partial(HybridTransformerLayer, ttt=cfg))
    assert all(isinstance(layer, StreamingTransformerLayer) for layer in tr.layers)
    x = torch.randn(2, 3 * CONTEXT, 32)
    with torch.no_grad():
        full = tr(x)
        with tr.streaming(2):
            steps = torch.cat([tr(x[:, t:t + 1]) for t in range(x.shape[1])], dim=1)
    torch.testing.assert_close(steps, full, rtol=1e-5, atol=1e-5)
