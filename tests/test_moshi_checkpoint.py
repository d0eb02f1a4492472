"""Checkpoints in Moshi's real format: a tiny Moshi written with moshi's classes, loaded through
CheckpointInfo with local paths, converted, saved, reloaded by load_hybrid, generating identically;
a "memory" section that disagrees with the tensors is refused with a message naming the mismatch."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("moshi")

from moshi.models.lm import LMGen  # noqa: E402
from safetensors import safe_open  # noqa: E402

from helpers.moshi import convert_moshi, hybrid_from, sample  # noqa: E402
from helpers.numerics import REASSOCIATION  # noqa: E402
from ttt_speech import TTTConfig  # noqa: E402
from ttt_speech.moshi import HybridLMModel, load_hybrid  # noqa: E402
from ttt_speech.moshi.commands import parse_layers  # noqa: E402
from ttt_speech.moshi.tiny import TinyCheckpoint, build_tiny_lm, tiny_lm_config, write_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoint:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("moshi"), seed=0)


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def test_tiny_checkpoint_has_the_released_layout_and_loads_with_checkpoint_info(tiny_ckpt: TinyCheckpoint) -> None:
    shapes = safetensors_shapes(tiny_ckpt.moshi_weights)
    assert shapes["transformer.layers.0.self_attn.in_proj_weight"] == (3 * 32, 32)
    assert shapes["transformer.layers.0.self_attn.out_proj.weight"] == (32, 32)
    assert shapes["depformer.layers.0.self_attn.in_proj_weight"] == (2 * 3 * 16, 16)  # 2 weights per step
    assert not any("in_projs" in k or "out_projs" in k for k in shapes)
    raw = json.loads(tiny_ckpt.config.read_text())
    assert {k: v for k, v in raw.items() if k in tiny_lm_config()} == tiny_lm_config()
    info = tiny_ckpt.checkpoint_info()
    lm = info.get_moshi(dtype=torch.float32)
    built = build_tiny_lm(0).state_dict()
    assert lm.state_dict().keys() == built.keys()
    for k, v in lm.state_dict().items():
        assert torch.equal(v, built[k]), k
    mimi = info.get_mimi()
    assert mimi.num_codebooks == 2 and mimi.cardinality == lm.card and mimi.frame_size == 1920
    ids = info.get_text_tokenizer().encode("moshi speaks for hours")
    assert ids and max(ids) < lm.text_card


@pytest.mark.parametrize("shared_qkv", [False, True])
def test_save_pretrained_then_load_hybrid_generates_identically(tiny_ckpt: TinyCheckpoint, tmp_path: Path,
                                                                shared_qkv: bool) -> None:
    model = hybrid_from(tiny_ckpt, shared_qkv)
    out = model.save_pretrained(tmp_path / "hybrid")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    raw = json.loads((out / "config.json").read_text())
    original = json.loads(tiny_ckpt.config.read_text())
    assert {k: v for k, v in raw.items() if k != "memory"} == original  # Moshi's keys, untouched
    assert raw["memory"]["mode"] == "hybrid" and raw["memory"]["layers"] == [0, 1]
    assert TTTConfig.from_dict(raw["memory"]["config"]) == model.memory_spec.config
    shapes = safetensors_shapes(out / "model.safetensors")
    assert "transformer.layers.1.self_attn.in_proj_weight" in shapes and "transformer.layers.1.memory.W1" in shapes
    assert set(shapes) - set(safetensors_shapes(tiny_ckpt.moshi_weights)) == {
        k for k in shapes if ".memory." in k}

    loaded = load_hybrid(out, dtype=torch.float32)
    assert isinstance(loaded, HybridLMModel) and not loaded.training
    assert loaded.memory_spec == model.memory_spec
    want = model.state_dict()
    assert loaded.state_dict().keys() == want.keys()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, want[k]), k
    tokens, logits = sample(loaded)
    tokens_ref, logits_ref = sample(model.eval())
    assert torch.equal(tokens, tokens_ref)
    torch.testing.assert_close(logits, logits_ref, **REASSOCIATION)


def test_load_hybrid_in_bfloat16_keeps_a_float32_ttt_state(tiny_ckpt: TinyCheckpoint, tmp_path: Path) -> None:
    out = hybrid_from(tiny_ckpt).save_pretrained(tmp_path / "hybrid")
    lm = load_hybrid(out)  # moshi's default dtype
    assert lm.transformer.layers[0].memory.q_proj.weight.dtype == torch.bfloat16
    gen = LMGen(lm, use_sampling=True)
    with gen.streaming(1):
        for _ in range(5):
            gen.step(torch.zeros(1, 2, 1, dtype=torch.long))
        state = lm.transformer.layers[0]._streaming_state.memory
        assert all(t.dtype in (torch.float32, torch.int64) and torch.isfinite(t.float()).all()
                   for t in state.tensors.values())


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.update(layers=[0]), r"memory.layers is \[0\] but model.safetensors has memory tensors for layers \[0, 1\]"),
    (lambda s: s["config"].update(num_heads=2), r"shape mismatches.*transformer.layers.0.memory.W1: file \(4, 8, 8\) "
                                                r"vs config \(2, 16, 16\)"),
    (lambda s: s["config"].update(inner="mlp"), r"missing tensors.*transformer.layers.0.memory.W2"),
    (lambda s: s.update(mode="replace"), r"memory.mode is 'replace' but layers \[0, 1\] still have attention"),
])
def test_a_ttt_section_that_disagrees_with_the_tensors_is_refused(
        tiny_ckpt: TinyCheckpoint, tmp_path: Path, edit, message: str) -> None:
    out = hybrid_from(tiny_ckpt).save_pretrained(tmp_path / "hybrid")
    raw = json.loads((out / "config.json").read_text())
    edit(raw["memory"])
    (out / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"(?s)the 'memory' section of config.json disagrees with model.safetensors.*"
                       + message):
        load_hybrid(out, dtype=torch.float32)


def test_load_hybrid_refuses_a_vanilla_checkpoint(tiny_ckpt: TinyCheckpoint) -> None:
    with pytest.raises(ValueError, match="no 'memory' section"):
        load_hybrid(tiny_ckpt.root)


def test_convert_moshi_command(tiny_ckpt: TinyCheckpoint, tmp_path: Path) -> None:
    out = convert_moshi("--moshi-weights", str(tiny_ckpt.moshi_weights), "--config", str(tiny_ckpt.config),
                        "--out", str(tmp_path / "out"), "--layers", "1", "--mode", "replace",
                        "--branch", "ttt", "--mini-batch", "8", "--dtype", "float32")
    lm = load_hybrid(out, dtype=torch.float32)
    assert lm.memory_spec.mode == "replace" and lm.memory_spec.layers == (1,)
    assert lm.memory_spec.config.mini_batch == 8 and lm.memory_spec.config.num_heads == 4
    assert not hasattr(lm.transformer.layers[1], "self_attn")
    assert json.loads((out / "config.json").read_text())["mimi_name"] == "mimi.safetensors"
    shared = load_hybrid(convert_moshi("--moshi-weights", str(tiny_ckpt.moshi_weights), "--config",
                                       str(tiny_ckpt.config), "--out", str(tmp_path / "shared"), "--branch", "ttt",
                                       "--shared-qkv", "--dtype", "float32"), dtype=torch.float32)
    assert shared.memory_spec.config.shared_qkv and shared.transformer.layers[0].memory.q_proj is None
    assert not any(".memory.q_proj" in k for k in shared.state_dict())
    assert parse_layers("all") == "all" and parse_layers("24-27,3") == [24, 25, 26, 27, 3]
    with pytest.raises(argparse.ArgumentTypeError):
        parse_layers("x-y")
