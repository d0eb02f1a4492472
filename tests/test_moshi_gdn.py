"""The Moshi hybrid with a Gated DeltaNet branch instead of TTT: a closed gate is the original model,
the training path equals step-by-step streaming (resets and exec masks included), checkpoints round
trip with the branch kind recorded, and a "memory" section written before the kind existed loads as TTT."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("moshi")

from helpers.numerics import REASSOCIATION  # noqa: E402
from helpers.moshi import (  # noqa: E402
    Session,
    convert_moshi,
    greedy_generate,
    hybrid_from,
    open_gates,
    random_codes,
    sample,
    streamed_logits,
    ttt_states,
    user_stream,
)
from ttt_speech import TTTConfig  # noqa: E402
from ttt_speech.config import GatedDeltaNetConfig  # noqa: E402
from ttt_speech.layers import GatedDeltaNetLayer, GatedDeltaNetState  # noqa: E402
from ttt_speech.moshi import HybridLMModel, HybridTransformerLayer, convert, default_gdn_config, load_hybrid  # noqa: E402
from ttt_speech.errors import UsageError  # noqa: E402
from ttt_speech.moshi.generate import streaming_state_bytes  # noqa: E402
from ttt_speech.moshi.tiny import TinyCheckpoint, build_tiny_lm, tiny_lm_config, write_tiny_checkpoint  # noqa: E402

CONTEXT = tiny_lm_config()["context"]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoint:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("moshi"), seed=0)


def gdn_config(**kw) -> GatedDeltaNetConfig:
    return GatedDeltaNetConfig(**({"dim": 32, "num_heads": 4, "chunk_size": 8} | kw))


def gdn_hybrid(layers="all", gate_init: float = 0.7) -> HybridLMModel:
    return convert(build_tiny_lm(0), layers=layers, ttt=gdn_config(gate_init=gate_init))


def test_gdn_hybrid_with_closed_gate_is_the_original_exactly() -> None:
    lm = build_tiny_lm(0)
    ref = copy.deepcopy(lm)
    hybrid = convert(lm, layers="all", mode="hybrid", ttt=default_gdn_config(lm))
    assert hybrid.memory_spec.branch == "gdn" and hybrid.memory_spec.config.gate_init == 0.0
    assert all(isinstance(layer, HybridTransformerLayer) and isinstance(layer.memory, GatedDeltaNetLayer)
               for layer in hybrid.transformer.layers)
    codes = random_codes(ref, 2, 4 * CONTEXT)
    with torch.no_grad():
        a, b = ref(codes), hybrid(codes)
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(b.text_logits, a.text_logits, rtol=0, atol=1e-6, equal_nan=True)
    tokens_ref, logits_ref = greedy_generate(ref, 4 * CONTEXT)
    tokens, logits = greedy_generate(hybrid, 4 * CONTEXT)
    assert torch.equal(tokens, tokens_ref)
    torch.testing.assert_close(logits, logits_ref, rtol=0, atol=1e-6)
    open_gates(hybrid)  # the comparison above must be able to fail
    assert (greedy_generate(hybrid, 4 * CONTEXT)[1] - logits_ref).abs().max() > 1e-3


@pytest.mark.parametrize("layers", ["all", [1]])
def test_gdn_training_path_equals_step_by_step_streaming(layers) -> None:
    lm = build_tiny_lm(0)
    ref_logits = lm(random_codes(lm, 2, 5 * CONTEXT)).logits.detach()
    model = gdn_hybrid(layers)  # chunk_size 8: 40 frames are 5 WY chunks and 5x the attention context
    codes = random_codes(model, 2, 5 * CONTEXT)
    with torch.no_grad():
        train = model(codes)
    logits, text_logits = streamed_logits(model, codes)
    assert torch.isfinite(train.logits[train.mask]).all()
    torch.testing.assert_close(logits, train.logits, rtol=1e-5, atol=2e-5, equal_nan=True)
    torch.testing.assert_close(text_logits, train.text_logits, rtol=1e-5, atol=2e-5, equal_nan=True)
    assert (train.logits - ref_logits).nan_to_num().abs().max() > 1e-2  # the branch changed the model


@torch.no_grad()
def test_gdn_state_follows_reset_streaming_masks_and_exec_mask() -> None:
    lm = gdn_hybrid()
    k, m = 13, 2 * CONTEXT
    user = user_stream(lm, 2, k + m)
    with Session(lm, 1) as fresh:
        expect0 = fresh.run(user[:1, :, k:])
    with Session(lm, 1) as whole:
        expect1 = whole.run(user[1:])
    with Session(lm, 2) as both:
        assert all(isinstance(layer._streaming_state.memory, GatedDeltaNetState) for layer in lm.memory_layers())
        before = [{n: t.data_ptr() for n, t in s.items()} for s in ttt_states(lm)]
        both.run(user[:, :, :k])
        both.gen.reset_streaming(torch.tensor([True, False]))
        got = both.run(user[:, :, k:])
        assert before == [{n: t.data_ptr() for n, t in s.items()} for s in ttt_states(lm)]  # in place
        size = streaming_state_bytes(both.gen, lm)
        gdn_bytes = sum(layer._streaming_state.memory.nbytes for layer in lm.memory_layers())
    torch.testing.assert_close(got[0], expect0[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], expect1[0, k:], rtol=1e-5, atol=1e-5)
    vanilla = build_tiny_lm(0)
    with Session(vanilla, 2) as v:
        v.run(user[:, :, :1])
        assert size - streaming_state_bytes(v.gen, vanilla) == gdn_bytes > 0  # the GDN state is counted

    skipped = {3, 4, 5, 11}
    kept = [t for t in range(k) if t not in skipped]
    with Session(lm, 1) as ref1:
        want = ref1.run(user[1:, :, kept])
    with Session(lm, 2) as masked:
        out = []
        for t in range(k):
            masked.gen.set_exec_mask(torch.tensor([True, t not in skipped]))
            out.append(masked.run(user[:, :, t:t + 1]))
    torch.testing.assert_close(torch.cat(out, dim=1)[1, kept], want[0], rtol=1e-5, atol=1e-5)


def test_gdn_hybrid_refuses_replace_and_init_from_attention() -> None:
    with pytest.raises(ValueError, match="replace.*Gated DeltaNet.*use mode='hybrid'"):
        convert(build_tiny_lm(0), mode="replace", ttt=gdn_config(gate_init=10.0))
    with pytest.raises(ValueError, match="init_from_attention=True is not supported with a Gated DeltaNet"):
        convert(build_tiny_lm(0), ttt=gdn_config(), init_from_attention=True)
    with pytest.raises(TypeError, match="TTTConfig, GatedDeltaNetConfig or InPlaceConfig"):
        convert(build_tiny_lm(0), ttt={"dim": 32})  # type: ignore[arg-type]


def test_gdn_save_then_load_hybrid_gives_identical_logits(tiny_ckpt: TinyCheckpoint, tmp_path: Path) -> None:
    info = tiny_ckpt.checkpoint_info()
    model = convert(info.get_moshi(dtype=torch.float32), ttt=gdn_config(gate_init=0.5), moshi_config=info.raw_config)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = model.save_pretrained(tmp_path / "gdn")
    raw = json.loads((out / "config.json").read_text())
    assert raw["memory"]["branch"] == "gdn" and raw["memory"]["mode"] == "hybrid"
    assert GatedDeltaNetConfig.from_dict(raw["memory"]["config"]) == model.memory_spec.config
    loaded = load_hybrid(out, dtype=torch.float32)
    assert loaded.memory_spec == model.memory_spec and isinstance(loaded.transformer.layers[0].memory, GatedDeltaNetLayer)
    want = model.state_dict()
    assert loaded.state_dict().keys() == want.keys()
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())
    tokens, logits = sample(loaded)
    tokens_ref, logits_ref = sample(model.eval())
    assert torch.equal(tokens, tokens_ref)
    torch.testing.assert_close(logits, logits_ref, **REASSOCIATION)
    codes = random_codes(model, 1, 3 * CONTEXT)
    with torch.no_grad():
        torch.testing.assert_close(loaded(codes).logits, model(codes).logits, rtol=0, atol=0, equal_nan=True)

    bf16 = load_hybrid(out)  # moshi's default dtype: the GDN state stays fp32
    gen_logits = sample(bf16, steps=5)[1]
    assert torch.isfinite(gen_logits).all()

    raw["memory"]["branch"] = "mamba"
    (out / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"memory.branch must be one of \('ttt', 'gdn', 'inplace'\), got 'mamba'"):
        load_hybrid(out, dtype=torch.float32)


def test_a_ttt_section_without_the_branch_field_loads_as_ttt(tiny_ckpt: TinyCheckpoint, tmp_path: Path) -> None:
    model = hybrid_from(tiny_ckpt)
    out = model.save_pretrained(tmp_path / "old")
    raw = json.loads((out / "config.json").read_text())
    assert raw["memory"].pop("branch") == "ttt"  # as written before Gated DeltaNet branches existed
    (out / "config.json").write_text(json.dumps(raw))
    loaded = load_hybrid(out, dtype=torch.float32)
    assert isinstance(loaded.memory_spec.config, TTTConfig) and loaded.memory_spec == model.memory_spec
    torch.testing.assert_close(sample(loaded)[1], sample(model.eval())[1], **REASSOCIATION)


def test_convert_moshi_command_with_a_gdn_branch(tiny_ckpt: TinyCheckpoint, tmp_path: Path) -> None:
    base = ["--moshi-weights", str(tiny_ckpt.moshi_weights), "--config", str(tiny_ckpt.config),
            "--dtype", "float32", "--branch", "gdn"]
    out = convert_moshi(*base, "--out", str(tmp_path / "out"), "--layers", "1")
    lm = load_hybrid(out, dtype=torch.float32)
    assert lm.memory_spec.branch == "gdn" and lm.memory_spec.layers == (1,) and lm.memory_spec.config.num_heads == 4
    assert isinstance(lm.transformer.layers[1].memory, GatedDeltaNetLayer)
    assert not isinstance(lm.transformer.layers[0], HybridTransformerLayer)
    for extra in (["--mini-batch", "8"], ["--mode", "replace"]):
        with pytest.raises(UsageError, match="--branch gdn|hybrid"):
            convert_moshi(*base, "--out", str(tmp_path / "bad"), *extra)
