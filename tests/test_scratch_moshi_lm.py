"""A from-scratch Moshi checkpoint: a released-layout directory that loads, streams and tokenizes."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("moshi")
pytest.importorskip("sentencepiece")

from moshi.models import LMGen  # noqa: E402

from ttt_speech.codec.config import MimiSize  # noqa: E402
from ttt_speech.codec.model import build_codec, export_codec  # noqa: E402
from ttt_speech.moshi.files import copy_companions, save_moshi_checkpoint  # noqa: E402
from ttt_speech.scratch.moshi_lm import SMALL_LM, write_scratch_checkpoint  # noqa: E402
from ttt_speech.moshi.tiny import build_tiny_lm  # noqa: E402

CODEC = MimiSize(n_filters=4, dimension=16, codebooks=8, bins=64, codebook_dim=8, d_model=16, num_heads=2,
                 num_layers=1, dim_feedforward=32)
LINES = [f"verse {i} and the word was spoken {i % 7} times in the beginning" for i in range(300)]
SMALL = {"dim": 32, "num_heads": 2, "num_layers": 2, "card": 64, "text_card": 120, "depformer_dim": 16,
         "depformer_dim_feedforward": 32}


@pytest.fixture(scope="module")
def codec(tmp_path_factory: pytest.TempPathFactory):
    return export_codec(build_codec(CODEC, 0).eval(), CODEC, tmp_path_factory.mktemp("codec"))


def test_scratch_checkpoint_loads_streams_and_names_its_files(codec, tmp_path) -> None:
    ckpt = write_scratch_checkpoint(tmp_path / "m", codec, LINES, SMALL)
    info = ckpt.checkpoint_info()
    lm = info.get_moshi(device="cpu", dtype=torch.float32)
    assert (lm.dim, lm.n_q, lm.dep_q, lm.card, lm.text_card) == (32, 16, 8, 64, 120)
    assert json.loads(ckpt.config.read_text())["delays"] == SMALL_LM["delays"]
    text = info.get_text_tokenizer()
    assert [text.id_to_piece(i) for i in (0, 1, 2, 3)] == ["<end_pad>", "<unk>", "</s>", "<pad>"]
    assert text.vocab_size() <= 120
    assert info.get_mimi(device="cpu").num_codebooks == 8
    gen = LMGen(lm, temp=0.8, temp_text=0.7)
    with gen.streaming(1):  # moshi streams a depformer only with weights per step (its KV capacity)
        outs = [gen.step(torch.zeros(1, 8, 1, dtype=torch.long)) for _ in range(4)]
    assert outs[-1] is not None and outs[-1].shape == (1, 9, 1)


def test_the_codec_must_match_the_lm(codec, tmp_path) -> None:
    with pytest.raises(ValueError, match="8 codebooks of 64"):
        write_scratch_checkpoint(tmp_path / "m", codec, LINES, SMALL | {"card": 1024})


def test_copy_companions_makes_an_export_self_contained(codec, tmp_path) -> None:
    src = write_scratch_checkpoint(tmp_path / "src", codec, LINES, SMALL).root
    out = save_moshi_checkpoint(build_tiny_lm(1), {"dim": 32}, tmp_path / "out")
    assert sorted(copy_companions(src, out)) == ["mimi.safetensors", "mimi_config.json", "tokenizer.model"]
    config = json.loads((out / "config.json").read_text())
    assert config["dim"] == 32 and config["tokenizer_name"] == "tokenizer.model"
    assert (out / "mimi.safetensors").read_bytes() == (src / "mimi.safetensors").read_bytes()
