"""convert(): hybrid keeps the logits at gate 0, attention is windowed, replace inits from attention and trains.

Tiny Llama/Qwen2 models are built from config (tests/helpers/hf.py), never downloaded.
"""

import argparse
import copy
import dataclasses

import pytest
import torch
from torch import nn

pytest.importorskip("transformers", minversion="5.23")  # pyproject's hf extra

from transformers.models.llama.modeling_llama import repeat_kv  # noqa: E402

from ttt_speech import TTTConfig  # noqa: E402
from helpers.hf import FAMILIES, HEADS, HIDDEN, KV_HEADS, VOCAB, perturb_ttt, tiny_model, ttt_config, ttt_modules  # noqa: E402
from ttt_speech.branches import DEFAULT_BRANCH  # noqa: E402
from ttt_speech.hf import convert, default_inplace_config  # noqa: E402
from ttt_speech.hf.cli import add_arguments, memory_config  # noqa: E402
from ttt_speech.hf.section import section_of  # noqa: E402
from ttt_speech.hf.modules import TTTAttention, expand_kv_heads  # noqa: E402


def hybrid(family: str = "llama", gate: float = 0.0, window: int = 8, layers=(1, 2), seed: int = 0, **kw):
    model = tiny_model(family, seed=seed, **kw)
    return convert(model, layers=layers, mode="hybrid", ttt=ttt_config(gate), attention_window=window)


@pytest.mark.parametrize("family", FAMILIES)
def test_hybrid_at_gate_zero_gives_the_original_logits(family):
    original = tiny_model(family)
    model = convert(copy.deepcopy(original), layers=[1, 2], ttt=ttt_config(0.0), attention_window=32)
    ids = torch.randint(3, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = original(ids).logits, model(ids).logits
    assert (out - ref).abs().max().item() <= 1e-5
    # the branch is really there: open the gate and the logits move
    for m in ttt_modules(model):
        m.gate_alpha.data.fill_(0.5)
    perturb_ttt(model)
    with torch.no_grad():
        assert (model(ids).logits - ref).abs().max().item() > 1e-2
    assert type(model.model.layers[1].self_attn).__name__.startswith("Hybrid")
    assert not hasattr(model.model.layers[0].self_attn, "memory")


def band_mask(T: int, window: int) -> torch.Tensor:
    """Independent oracle: query i sees keys j with i - window < j <= i."""
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    return ((j <= i) & (j > i - window))[None, None]


@pytest.mark.parametrize("family,attn", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa")])
def test_attention_is_windowed_in_a_full_forward(family, attn):
    """T = 3 x window in one forward (prefill/training): logits equal the original under a band mask."""
    W, T = 8, 24
    original = tiny_model(family, attn=attn)
    model = convert(copy.deepcopy(original), layers=[1], ttt=ttt_config(0.0), attention_window=W)
    ids = torch.randint(3, VOCAB, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids).logits
        full = original(ids).logits
        mask = band_mask(T, W).expand(2, 1, T, T)
        if attn == "eager":
            mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
        banded = original(ids, attention_mask=mask).logits
    assert (out - banded).abs().max().item() <= 1e-5
    assert (out[:, :W] - full[:, :W]).abs().max().item() <= 1e-5  # inside the window nothing changes
    assert (out[:, W:] - full[:, W:]).abs().amax(-1).min().item() > 1e-3  # beyond it every position does


def test_expand_kv_heads_matches_repeat_kv():
    torch.manual_seed(0)
    for bias in (False, True):
        k = nn.Linear(HIDDEN, KV_HEADS * 16, bias=bias)
        x = torch.randn(2, 5, HIDDEN)
        expanded = expand_kv_heads(k, KV_HEADS, HEADS)
        ref = repeat_kv(k(x).view(2, 5, KV_HEADS, 16).transpose(1, 2), HEADS // KV_HEADS)
        got = expanded(x).view(2, 5, HEADS, 16).transpose(1, 2)
        assert torch.equal(got, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_replace_initialises_from_the_attention_projections(family):
    original = tiny_model(family)
    model = convert(copy.deepcopy(original), layers=[1], mode="replace", ttt=ttt_config(1.0), attention_window=16)
    attn, new = original.model.layers[1].self_attn, model.model.layers[1].self_attn
    assert isinstance(new, TTTAttention)
    x = torch.randn(3, HIDDEN)
    with torch.no_grad():
        assert torch.equal(new.memory.q_proj(x), attn.q_proj(x))
        assert torch.equal(new.memory.o_proj.weight, attn.o_proj.weight)
        k_ref = attn.k_proj(x).view(3, KV_HEADS, 1, 16).expand(3, KV_HEADS, 2, 16).reshape(3, HEADS * 16)
        assert torch.equal(new.memory.k_proj(x), k_ref)
    assert not any(".layers.1.self_attn.q_proj" in k for k in model.state_dict())


def test_replace_mode_trains():
    """30 Adam steps on a fixed batch: the loss of a model with a replaced layer falls by more than half."""
    model = convert(tiny_model("llama", layers=2), layers=[1], mode="replace", ttt=ttt_config(1.0),
                    attention_window=16).train()
    ids = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(ids, labels=ids, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    ttt_grads = [p.grad for p in model.model.layers[1].self_attn.memory.parameters() if p.grad is not None]
    assert ttt_grads and all(torch.isfinite(g).all() for g in ttt_grads)
    assert losses[-1] < 0.5 * losses[0], losses


def test_convert_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="already converted"):
        convert(hybrid(), layers=[0])
    with pytest.raises(ValueError, match="layers must be"):
        convert(tiny_model(), layers=[3])
    with pytest.raises(ValueError, match="hidden_size"):
        convert(tiny_model(), layers=[0], ttt=TTTConfig(dim=32, num_heads=2))
    with pytest.raises(ValueError, match="num_heads"):
        convert(tiny_model(), layers=[0], mode="replace", ttt=TTTConfig(dim=HIDDEN, num_heads=2))
    with pytest.raises(ValueError, match="at least one attention layer"):
        convert(tiny_model(), layers=[0, 1, 2], mode="replace", ttt=ttt_config())
    with pytest.raises(ValueError, match="shared_qkv .* Moshi hybrids only"):
        convert(tiny_model(), layers=[0], ttt=dataclasses.replace(ttt_config(), shared_qkv=True))
    model = tiny_model()
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(NotImplementedError, match="flex_attention"):
        convert(model, layers=[0])
    with pytest.raises(TypeError, match="model.model.layers"):
        convert(nn.Linear(2, 2), layers=[0])


def test_without_memory_the_branch_is_convert_hfs_default():
    """One default for one thing: convert(model, layers) builds what convert-hf builds without --branch (in-place,
    shaped like the MLPs); replace mode, TTT's only, asked without memory= is one error naming memory=TTTConfig."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cli = memory_config(parser.parse_args(["--model", "m", "--layers", "1", "--out", "o"]), HIDDEN, HEADS, 128)
    model = convert(tiny_model(), layers=[1])
    section = section_of(model.config)
    assert section.branch == DEFAULT_BRANCH == "inplace"
    assert section.memory == cli == default_inplace_config(HIDDEN, 128)
    assert [hasattr(layer.mlp, "memory") for layer in model.model.layers] == [False, True, False]
    assert not any(hasattr(layer.self_attn, "memory") for layer in model.model.layers)
    model = tiny_model()
    with pytest.raises(ValueError, match=r"mode='replace' needs a TTT branch, and the default branch is inplace .*"
                                         r"pass memory=TTTConfig\(dim=64, num_heads=4\)"):
        convert(model, layers=[0], mode="replace")
    assert section_of(model.config) is None  # refused before anything changed
    assert section_of(convert(model, layers=[0], mode="replace", memory=ttt_config(10.0)).config).branch == "ttt"
    args = ["--model", "m", "--layers", "1", "--out", "o", "--decay", "0.9", "--chunk", "8"]
    assert memory_config(parser.parse_args(args), HIDDEN, HEADS, 128) == default_inplace_config(HIDDEN, 128, decay=0.9,
                                                                                               chunk=8)
    with pytest.raises(ValueError, match="--decay is an option of --branch inplace; it does not apply to --branch ttt"):
        memory_config(parser.parse_args([*args[:-2], "--branch", "ttt"]), HIDDEN, HEADS, 128)
    decayed = convert(tiny_model(), layers=[1], memory=default_inplace_config(HIDDEN, 128, decay=0.9))
    assert "model.layers.1.mlp.memory.decay_logit" in dict(decayed.named_parameters())
