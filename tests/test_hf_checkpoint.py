"""save_pretrained / convert.load round trips, LLaMA-Omni-style directories, and `ttt-speech convert-hf`."""

import copy
import json
import logging

import pytest
import torch
from safetensors import safe_open
from torch import nn

pytest.importorskip("transformers", minversion="5.23")  # pyproject's hf extra

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from helpers.hf import HIDDEN, VOCAB, perturb_ttt, tiny_config, tiny_model, ttt_config, ttt_modules  # noqa: E402
from ttt_speech.hf import convert  # noqa: E402
from ttt_speech.cli import main as cli_main  # noqa: E402
from ttt_speech.hf.cli import LEFT_ALONE_FILE, parse_layers  # noqa: E402

SPEECH_CONFIG = dict(
    speech_encoder="models/speech_encoder/large-v3.pt", speech_encoder_type="whisper", speech_encoder_ds_rate=5,
    speech_encoder_hidden_size=32, speech_projector_type="linear", speech_generator_type="ctc",
)


class TinyOmniConfig(LlamaConfig):
    model_type = "tiny_omni_speech2s_llama"


class TinyOmniForCausalLM(LlamaForCausalLM):
    """A LLaMA-Omni look-alike: a user subclass of LlamaForCausalLM with speech modules in and beside `model`."""

    config_class = TinyOmniConfig

    def __init__(self, config: TinyOmniConfig) -> None:
        super().__init__(config)
        self.model.speech_encoder = nn.Linear(16, config.speech_encoder_hidden_size)
        self.model.speech_projector = nn.Sequential(
            nn.Linear(config.speech_encoder_hidden_size, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN))
        self.speech_generator = nn.Linear(HIDDEN, 50)


def tiny_omni(seed: int = 0) -> TinyOmniForCausalLM:
    torch.manual_seed(seed)
    base = tiny_config("llama").to_dict()
    base = {k: v for k, v in base.items() if k in tiny_config("llama").to_diff_dict() and k != "model_type"}
    return TinyOmniForCausalLM(TinyOmniConfig(**base, **SPEECH_CONFIG)).eval()


SPEECH_GROUPS = {"model.speech_encoder": 2, "model.speech_projector": 4, "speech_generator": 2}


def text(T: int = 20) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, T), generator=torch.Generator().manual_seed(7))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def file_keys(path) -> set[str]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("family,mode", [("llama", "hybrid"), ("qwen2", "replace")])
def test_save_pretrained_and_load_round_trip(tmp_path, family, mode):
    model = convert(tiny_model(family), layers=[1, 2], mode=mode, ttt=ttt_config(0.5), attention_window=8)
    perturb_ttt(model)  # a loader that re-initialised the TTT layers would not reproduce the logits
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["memory"]["mode"] == mode and cfg["memory"]["layers"] == [1, 2] and cfg["memory"]["attention_window"] == 8
    assert cfg["memory"]["config"]["mini_batch"] == 4 and cfg["sliding_window"] == 8
    keys = file_keys(tmp_path)
    assert {"model.layers.1.self_attn.memory.W1", "model.layers.2.self_attn.memory.gate_alpha"} <= keys
    assert ("model.layers.1.self_attn.q_proj.weight" in keys) == (mode == "hybrid")

    loaded, report = convert.load(tmp_path, output_loading_info=True)
    assert report.left_alone_keys == [] and report.left_alone_config_keys == []
    assert torch.equal(logits(loaded, text()), logits(model, text()))
    assert len(ttt_modules(loaded)) == 2


def test_llama_omni_object_converts_saves_and_loads(tmp_path, caplog):
    """A user subclass of LlamaForCausalLM converts; its directory loads as a Llama hybrid + a report."""
    omni = tiny_omni()
    model = convert(copy.deepcopy(omni), layers=[1, 2], ttt=ttt_config(0.0), attention_window=32)
    assert (logits(model, text()) - logits(omni, text())).abs().max().item() <= 1e-5
    for m in ttt_modules(model):
        m.gate_alpha.data.fill_(0.5)
    perturb_ttt(model)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "tiny_omni_speech2s_llama" and cfg["memory"]["llm_model_type"] == "llama"

    with caplog.at_level(logging.INFO, logger="ttt_speech.hf.checkpoint"):
        llm, report = convert.load(tmp_path, output_loading_info=True)
    assert type(llm) is LlamaForCausalLM
    assert report.groups() == SPEECH_GROUPS
    assert report.left_alone_config_keys == sorted(SPEECH_CONFIG)
    assert "left alone 8 tensors" in caplog.text and "model.speech_encoder.* (2 tensors)" in caplog.text
    assert torch.equal(logits(llm, text()), logits(model, text()))

    fresh = tiny_omni(seed=5)  # LLaMA-Omni's own object: everything in the directory has a place in it
    fresh, report = convert.load(tmp_path, model=fresh, output_loading_info=True)
    assert report.left_alone_keys == []
    assert torch.equal(fresh.speech_generator.weight, model.speech_generator.weight)
    assert torch.equal(logits(fresh, text()), logits(model, text()))


def test_load_refuses_an_unconverted_directory(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no 'memory' section"):
        convert.load(tmp_path)


def test_cli_converts_a_llama_omni_directory(tmp_path, capsys):
    src, out = tmp_path / "omni", tmp_path / "out"
    omni = tiny_omni()
    omni.save_pretrained(src)
    (src / "tokenizer_config.json").write_text("{}")
    cli_main(["convert-hf", "--model", str(src), "--layers", "1-2", "--out", str(out), "--attention-window", "32",
              "--branch", "ttt", "--mini-batch", "4", "--dtype", "float32"])
    printed = capsys.readouterr().out
    assert "left alone 8 tensors" in printed and "speech_encoder_ds_rate" in printed

    model = convert.load(out)
    assert json.loads((out / "config.json").read_text())["memory"]["config"]["mini_batch"] == 4
    assert len(ttt_modules(model)) == 2
    assert (logits(model, text()) - logits(omni, text())).abs().max().item() <= 1e-5  # gate 0, T <= window
    with safe_open(str(out / LEFT_ALONE_FILE), framework="pt") as f:
        assert torch.equal(f.get_tensor("speech_generator.weight"), omni.speech_generator.weight)
        assert len(list(f.keys())) == 8
    assert (out / "tokenizer_config.json").exists()


def test_parse_layers():
    assert parse_layers("24-31") == list(range(24, 32))
    assert parse_layers("1,3,5-6") == [1, 3, 5, 6]
