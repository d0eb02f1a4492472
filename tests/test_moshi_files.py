"""`MoshiDir.read`, the one reader of a Moshi checkpoint directory: the files it finds (named by config.json,
else ours, else moshi's default names), a hybrid's section under today's name, and the one-line refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("moshi")

from ttt_speech.errors import UsageError  # noqa: E402
from ttt_speech.moshi.files import (MOSHI_MIMI_NAME, MOSHI_TOKENIZER_NAME, SHIPPED_DIR, MoshiDir,  # noqa: E402
                                    checkpoint_info)
from ttt_speech.moshi.tiny import TinyCheckpoint, build_tiny_hybrid, write_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoint:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("moshi"), seed=0)


def rewrite(directory: Path, **changes: object) -> None:
    raw = json.loads((directory / "config.json").read_text())
    raw.update(changes)
    (directory / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if v is not None}))


def test_a_vanilla_directory_names_its_weights_codec_and_tokenizer(tiny: TinyCheckpoint) -> None:
    found = MoshiDir.read(tiny.root)
    assert not found.hybrid and found.config == json.loads(tiny.config.read_text())
    assert (found.weights, found.mimi, found.mimi_config, found.tokenizer) == (
        tiny.moshi_weights, tiny.mimi_weights, tiny.mimi_config, tiny.tokenizer)
    info = checkpoint_info(str(tiny.root))
    assert (Path(info.moshi_weights), Path(info.mimi_weights), Path(info.tokenizer)) == (
        tiny.moshi_weights, tiny.mimi_weights, tiny.tokenizer)
    assert info.mimi_config == json.loads(tiny.mimi_config.read_text())


def test_unnamed_companions_are_ours_then_moshis_and_absent_ones_none(tiny: TinyCheckpoint, tmp_path: Path) -> None:
    d = tmp_path / "released"
    shutil.copytree(tiny.root, d)
    rewrite(d, mimi_name=None, mimi_config_name=None, tokenizer_name=None)
    found = MoshiDir.read(d)
    assert (found.mimi, found.mimi_config, found.tokenizer) == (
        d / "mimi.safetensors", d / "mimi_config.json", d / "tokenizer.model")
    (d / "mimi.safetensors").rename(d / MOSHI_MIMI_NAME)  # as a released repository names them
    (d / "tokenizer.model").rename(d / MOSHI_TOKENIZER_NAME)
    (d / "mimi_config.json").unlink()
    found = MoshiDir.read(d)
    assert (found.mimi, found.mimi_config, found.tokenizer) == (d / MOSHI_MIMI_NAME, None, d / MOSHI_TOKENIZER_NAME)
    rewrite(d, tokenizer_name="elsewhere.model")  # named but not there: none, and the loader refuses it
    assert MoshiDir.read(d).tokenizer is None
    with pytest.raises(UsageError, match=r"elsewhere\.model: no such file \(tokenizer_name in .*config\.json\)"):
        checkpoint_info(str(d))


def test_a_hybrid_in_the_old_layout_reads_under_todays_name(tmp_path: Path) -> None:
    d = build_tiny_hybrid(seed=0).save_pretrained(tmp_path / "h")
    raw = json.loads((d / "config.json").read_text())
    raw["ttt"] = raw.pop("memory")
    (d / "config.json").write_text(json.dumps(raw))
    found = MoshiDir.read(d, hybrid=True)
    assert found.hybrid and found.config["memory"] == raw["ttt"] and "ttt" not in found.config
    assert found.weights == d / "model.safetensors" and found.mimi is None  # saved without its codec


def test_the_shipped_model_is_the_in_place_hybrid_with_a_learned_decay() -> None:
    """The embedded default (issue 24): all 5 layers in-place with a decay each layer learned away from its
    initial 0.9, a 64-frame (5.1 s) attention window, fp16 in today's layout, the folder within 25 MB."""
    import torch
    from safetensors import safe_open

    from ttt_speech.moshi import load_hybrid

    shipped = MoshiDir.read(SHIPPED_DIR)
    assert shipped.hybrid and shipped.mimi is not None and shipped.tokenizer is not None
    section = json.loads(shipped.config_path.read_text())["memory"]  # today's name, not the pre-issue-20 "ttt"
    assert (section["branch"], section["layers"], section["config"]["decay"]) == ("inplace", [0, 1, 2, 3, 4], 0.9)
    assert shipped.config["context"] == 64
    with safe_open(str(shipped.weights), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    assert sum(p.stat().st_size for p in SHIPPED_DIR.iterdir()) <= 25_000_000
    lm = load_hybrid(SHIPPED_DIR, dtype=torch.float32)
    decays = [torch.sigmoid(layer.memory.decay_logit).item() for layer in lm.memory_layers()]
    assert decays == pytest.approx([0.824, 0.868, 0.850, 0.896, 0.909], abs=1e-3)  # learned from 0.9 each


def test_refusals_name_the_file(tiny: TinyCheckpoint, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"/nope: no such --model directory"):
        MoshiDir.read(tmp_path / "nope")
    with pytest.raises(UsageError, match=r"config\.json: no such Moshi config\.json"):
        MoshiDir.read(tmp_path)
    with pytest.raises(UsageError, match=r"config\.json has no 'memory' section: it is a vanilla Moshi"):
        MoshiDir.read(tiny.root, "--hybrid", hybrid=True)
    d = tmp_path / "codec_only"
    shutil.copytree(tiny.root, d)
    (d / "model.safetensors").unlink()
    with pytest.raises(UsageError, match=r"model\.safetensors: no such file \(--model .*codec_only has no Moshi"):
        MoshiDir.read(d)
    assert MoshiDir.read(d, weights=False).mimi == d / "mimi.safetensors"  # a codec-only use reads it whole
    rewrite(d, dim=64)  # another model's weights
    shutil.copy(tiny.moshi_weights, d / "model.safetensors")
    with pytest.raises(UsageError, match=r"model\.safetensors: not the weights of the model .* describes"):
        MoshiDir.read(d)


def test_cast_checkpoint_keeps_every_tensor_and_the_learned_decay(tiny: TinyCheckpoint, tmp_path: Path) -> None:
    """bf16 -> fp16 (how the shipped model was made from its training export): the same tensors under the same
    names (an in-place branch's decay_logit included), each the bf16 value: exact down to fp16's smallest normal
    (2^-14), within its subnormal step (2^-24) below it."""
    import torch
    from safetensors.torch import load_file, save_file

    from ttt_speech.moshi import load_hybrid
    from ttt_speech.moshi.convert import convert, default_inplace_config
    from ttt_speech.moshi.files import cast_checkpoint, copy_companions
    from ttt_speech.moshi.tiny import build_tiny_lm

    lm = build_tiny_lm(0)
    model = convert(lm, "all", "hybrid", default_inplace_config(lm, chunk=8, decay=0.9)).to(torch.bfloat16)
    with torch.no_grad():
        model.transformer.layers[1].memory.decay_logit.fill_(1.55)  # as if learned: no longer the initial 0.9
    src = model.save_pretrained(tmp_path / "bf16")
    copy_companions(tiny.root, src)
    out = cast_checkpoint(src, tmp_path / "fp16")
    before, after = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys() and sum(k.endswith("memory.decay_logit") for k in after) == 2
    assert {v.dtype for v in before.values()} == {torch.bfloat16} and {v.dtype for v in after.values()} == {torch.float16}
    for k in before:
        a, b = before[k].float(), after[k].float()
        normal = a.abs() >= 2**-14
        assert torch.equal(a[normal], b[normal]) and (a - b).abs().max() <= 2**-25, k
    assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert all((out / n).read_bytes() == (src / n).read_bytes() for n in ("mimi.safetensors", "tokenizer.model"))
    loaded = load_hybrid(out, dtype=torch.float32)
    assert loaded.transformer.layers[1].memory.decay_logit.item() == 1.546875  # 1.55 in bf16, kept exactly
    assert loaded.memory_spec == model.memory_spec
    save_file({**before, "text_linear.weight": before["text_linear.weight"] * 1e6}, str(src / "model.safetensors"))
    with pytest.raises(UsageError, match=r"text_linear\.weight \(and 0 more\) exceeds float16's range"):
        cast_checkpoint(src, tmp_path / "overflow")
    with pytest.raises(UsageError, match=r"cast to 'int8': not a floating dtype"):
        cast_checkpoint(src, tmp_path / "int", "int8")
