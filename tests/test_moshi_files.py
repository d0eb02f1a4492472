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
    shipped = MoshiDir.read(SHIPPED_DIR)
    assert shipped.hybrid and shipped.mimi is not None and shipped.tokenizer is not None


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
