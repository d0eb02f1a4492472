"""The Moshi hybrid with an in-place branch: chosen layers' own gated MLPs get per-stream fast weights.
Converted, it is the original model bit for bit; with the memory open, the training path equals frame-by-
frame streaming, the first chunk still equals the original, checkpoints round trip, and convert-moshi
--branch inplace --chunk N makes one."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("moshi")

from helpers.numerics import REASSOCIATION  # noqa: E402
from helpers.moshi import (  # noqa: E402
    assert_same_model, convert_moshi, greedy_generate, random_codes, sample, streamed_logits,
)
from ttt_speech.config import InPlaceConfig  # noqa: E402
from ttt_speech.errors import UsageError  # noqa: E402
from ttt_speech.branches import inplace_cost  # noqa: E402
from ttt_speech.layers import InPlaceLayer, InPlaceState  # noqa: E402
from ttt_speech.layers.inplace import writes_scaled  # noqa: E402
from ttt_speech.moshi.layer import mute_writes_  # noqa: E402
from ttt_speech.moshi import HybridLMModel, HybridTransformerLayer, convert, default_inplace_config, load_hybrid  # noqa: E402
from ttt_speech.moshi.tiny import TinyCheckpoint, build_tiny_lm, tiny_lm_config, write_tiny_checkpoint  # noqa: E402

CONTEXT = tiny_lm_config()["context"]
CHUNK = 4


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoint:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("moshi"), seed=0)


def open_memory(model: HybridLMModel, lr: float = 300.0) -> None:
    """A nonzero target projection and a large step: what training would give, so writes change logits."""
    with torch.no_grad():
        for i, layer in enumerate(model.memory_layers()):
            g = torch.Generator().manual_seed(i)
            layer.memory.target_proj.weight.copy_(torch.randn(layer.memory.target_proj.weight.shape, generator=g))
            layer.memory.config.base_lr = lr


def inplace_hybrid(layers="all") -> HybridLMModel:
    lm = build_tiny_lm(0)
    return convert(lm, layers=layers, ttt=default_inplace_config(lm, chunk=CHUNK))


def test_converted_model_is_the_original_bit_for_bit() -> None:
    lm = build_tiny_lm(0)
    ref = copy.deepcopy(lm)
    hybrid = convert(lm, layers="all", ttt=default_inplace_config(lm, chunk=CHUNK))
    assert hybrid.memory_spec.branch == "inplace" and hybrid.memory_spec.config.hidden == lm.transformer.layers[0].gating.linear_out.weight.shape[1]
    assert all(isinstance(layer, HybridTransformerLayer) and isinstance(layer.memory, InPlaceLayer) and layer.memory_in_mlp
               for layer in hybrid.transformer.layers)
    assert hybrid.transformer.layers[0].memory.mlp.down is hybrid.transformer.layers[0].gating.linear_out  # no copy
    logits_ref = assert_same_model(ref, hybrid, 4 * CONTEXT)
    open_memory(hybrid)  # the comparisons above must be able to fail
    opened = greedy_generate(hybrid, 4 * CONTEXT)[1]
    assert torch.equal(opened[:, :, :CHUNK], logits_ref[:, :, :CHUNK])  # chunk 0 reads W_down itself
    assert (opened - logits_ref).abs().max() > 1e-2


@pytest.mark.parametrize("layers", ["all", [1]])
def test_training_path_equals_frame_by_frame_streaming(layers) -> None:
    model = inplace_hybrid(layers)
    open_memory(model)
    codes = random_codes(model, 2, 5 * CONTEXT)
    ref = build_tiny_lm(0)
    with torch.no_grad():
        train, plain = model(codes), ref(codes)
    logits, text_logits = streamed_logits(model, codes)
    assert torch.isfinite(train.logits[train.mask]).all()
    torch.testing.assert_close(logits, train.logits, rtol=1e-5, atol=2e-5, equal_nan=True)
    torch.testing.assert_close(text_logits, train.text_logits, rtol=1e-5, atol=2e-5, equal_nan=True)
    assert (train.logits - plain.logits).nan_to_num().abs().max() > 1e-2  # the memory changed the model


def test_a_muted_stream_writes_nothing_from_that_frame_and_its_neighbour_is_untouched() -> None:
    """`mute_writes_` mid-stream, per stream: stream 0 muted from frame k equals the training path with its writes
    scaled to 0 from position k (`writes_scaled`, the reference), stream 1 (not muted) equals the model as trained,
    and the mute changed stream 0 (so the comparison can fail)."""
    model = inplace_hybrid()
    open_memory(model)
    codes = random_codes(model, 2, 5 * CONTEXT)
    T, k = codes.shape[-1], 2 * CONTEXT + 1

    def mute(t: int) -> None:
        if t == k:
            assert mute_writes_(model, torch.tensor([1.0, 0.0])) == len(model.memory_layers())

    logits, text_logits = streamed_logits(model, codes, before_frame=mute)
    scale = torch.ones(2, T)
    scale[0, k:] = 0.0
    with torch.no_grad():
        with writes_scaled(model, scale):
            ref = model(codes)
        plain = model(codes)
    torch.testing.assert_close(text_logits, ref.text_logits, rtol=1e-5, atol=2e-5, equal_nan=True)
    torch.testing.assert_close(logits, ref.logits, rtol=1e-5, atol=2e-5, equal_nan=True)
    torch.testing.assert_close(text_logits[1], plain.text_logits[1], rtol=1e-5, atol=2e-5, equal_nan=True)
    assert (text_logits[0] - plain.text_logits[0]).nan_to_num().abs().max() > 1e-2
    assert mute_writes_(build_tiny_lm(0), 1.0) == 0  # no in-place memory: nothing to mute


def test_save_then_load_gives_identical_logits_and_one_key_per_weight(tiny_ckpt: TinyCheckpoint, tmp_path: Path) -> None:
    info = tiny_ckpt.checkpoint_info()
    lm = info.get_moshi(dtype=torch.float32)
    model = convert(lm, ttt=default_inplace_config(lm, chunk=CHUNK), moshi_config=info.raw_config)
    open_memory(model, lr=30.0)
    keys = model.state_dict().keys()
    assert {k.split(".memory.")[1] for k in keys if ".memory." in k} == {
        "target_conv_weight", "target_conv_bias", "target_proj.weight", "lr_weight", "lr_bias"}
    out = model.save_pretrained(tmp_path / "inplace")
    raw = json.loads((out / "config.json").read_text())
    assert raw["memory"]["branch"] == "inplace" and InPlaceConfig.from_dict(raw["memory"]["config"]) == model.memory_spec.config
    loaded = load_hybrid(out, dtype=torch.float32)
    assert loaded.memory_spec == model.memory_spec and loaded.state_dict().keys() == keys
    assert loaded.transformer.layers[0].memory.mlp.down is loaded.transformer.layers[0].gating.linear_out
    codes = random_codes(model, 1, 3 * CONTEXT)
    with torch.no_grad():
        torch.testing.assert_close(loaded(codes).logits, model(codes).logits, equal_nan=True, **REASSOCIATION)
    torch.testing.assert_close(sample(loaded)[1], sample(model.eval())[1], **REASSOCIATION)


def test_convert_moshi_command_with_an_inplace_branch(tiny_ckpt: TinyCheckpoint, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--moshi-weights", str(tiny_ckpt.moshi_weights), "--config", str(tiny_ckpt.config), "--dtype", "float32"]
    out = convert_moshi(*base, "--out", str(tmp_path / "out"), "--layers", "1", "--chunk", "8")  # the default branch
    lm = load_hybrid(out, dtype=torch.float32)
    assert lm.memory_spec.branch == "inplace" and lm.memory_spec.layers == (1,) and lm.memory_spec.config.chunk == 8
    assert isinstance(lm.transformer.layers[1].memory, InPlaceLayer)
    assert "MiB per layer x 1, fp32); at Moshi-7B all 32 layers cost 1.85x" in capsys.readouterr().out
    state = lm.transformer.layers[1].memory.init_state(3)
    assert InPlaceState.spec_nbytes(lm.memory_spec.config, 3) == state.nbytes > 0  # told before allocating
    # what convert-moshi --layers all prints at Moshi-7B shape: the measured 5754 MiB (docs/benchmarks.md)
    assert inplace_cost(32, InPlaceState.spec_nbytes(InPlaceConfig(4096, 11264))).startswith(
        "in-place state: 5754 MiB per session (179.8 MiB per layer x 32, fp32)")
    vanilla = tiny_ckpt.checkpoint_info().get_moshi(dtype=torch.float32)
    codes = random_codes(vanilla, 1, 3 * CONTEXT)
    with torch.no_grad():
        torch.testing.assert_close(lm(codes).logits, vanilla(codes).logits, rtol=0, atol=0, equal_nan=True)
    named = [*base, "--branch", "inplace"]
    for argv, msg in (([*named, "--mini-batch", "8"], "--mini-batch is an option of --branch ttt; it does not apply to "
                                                      "--branch inplace"),
                      ([*named, "--gate-init", "0.1"], "--gate-init is an option of --branch ttt/gdn; it does not"),
                      ([*named, "--mode", "replace"], "--mode replace is an option of --branch ttt; it does not"),
                      # commands written when TTT was the default: one line naming the option and its branch
                      ([*base, "--mini-batch", "8"], r"--mini-batch is an option of --branch ttt, not of --branch "
                                                     r"inplace \(the default branch since issue 23\): add --branch ttt"),
                      ([*base, "--mode", "replace"], r"--mode replace is an option of --branch ttt, not of --branch "
                                                     r"inplace \(the default"),
                      ([*base, "--branch", "ttt", "--chunk", "8"], "--chunk is an option of --branch inplace; it does "
                                                                   "not apply to --branch ttt")):
        with pytest.raises(UsageError, match=msg):
            convert_moshi(*argv, "--out", str(tmp_path / "bad"))
    ttt_json = tmp_path / "ttt.json"
    ttt_json.write_text('{"mini_batch": 8}')
    with pytest.raises(UsageError, match=r"ttt.json: mini_batch is an option of --branch ttt, not of --branch inplace"):
        convert_moshi(*base, "--memory-config", str(ttt_json), "--out", str(tmp_path / "bad"))


def test_decay_converts_trains_through_set_and_round_trips(tiny_ckpt: TinyCheckpoint, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """model.memory.decay (a --set override) and convert-moshi --decay make layers with a learned lambda; the
    hybrid saves it (config and decay_logit), loads strictly and computes the same logits; streaming equals
    the training path with the decay; a bad value is one line naming it."""
    from ttt_speech.train.config import ModelConfig, load_config
    from ttt_speech.train.moshi_model import load_moshi

    assert load_config(Path(__file__).parents[1] / "configs" / "moshi_long.yaml",
                       ["model.memory.decay=0.95"]).model.memory == {"chunk": 64, "decay": 0.95}
    model = load_moshi(ModelConfig(tiny=True, memory={"chunk": CHUNK, "decay": 0.95}), torch.device("cpu"),
                       torch.float32)
    assert model.memory_spec.config.decay == 0.95
    for layer in model.memory_layers():
        torch.testing.assert_close(layer.memory.decay(torch.float32), torch.tensor(0.95), rtol=0, atol=1e-6)
    open_memory(model)
    with torch.no_grad():  # lambdas of their own per layer, as training would leave them
        for i, layer in enumerate(model.memory_layers()):
            layer.memory.decay_logit.fill_(0.5 + i)
    codes = random_codes(model, 2, 5 * CONTEXT)
    with torch.no_grad():
        train = model(codes)
    logits, _ = streamed_logits(model, codes)
    torch.testing.assert_close(logits, train.logits, rtol=1e-5, atol=2e-5, equal_nan=True)
    out = model.save_pretrained(tmp_path / "decay")
    raw = json.loads((out / "config.json").read_text())
    assert raw["memory"]["config"]["decay"] == 0.95
    loaded = load_hybrid(out, dtype=torch.float32)  # strict: decay_logit is in the file and in the rebuilt model
    assert loaded.memory_spec == model.memory_spec
    assert [layer.memory.decay_logit.item() for layer in loaded.memory_layers()] == [0.5 + i for i in range(
        len(list(model.memory_layers())))]
    with torch.no_grad():
        torch.testing.assert_close(loaded(codes).logits, train.logits, rtol=0, atol=0, equal_nan=True)
        ref = convert(build_tiny_lm(0), "all", "hybrid", default_inplace_config(build_tiny_lm(0), chunk=CHUNK))
        ref.load_state_dict({k: v for k, v in model.state_dict().items() if "decay_logit" not in k})
        assert (ref(codes).logits - train.logits).nan_to_num().abs().max() > 1e-3  # the decay changed the model

    base = ["--moshi-weights", str(tiny_ckpt.moshi_weights), "--config", str(tiny_ckpt.config), "--dtype", "float32"]
    out = convert_moshi(*base, "--out", str(tmp_path / "cli"), "--layers", "1", "--decay", "0.9")
    lm = load_hybrid(out, dtype=torch.float32)
    assert lm.memory_spec.config.decay == 0.9 and hasattr(lm.transformer.layers[1].memory, "decay_logit")
    with pytest.raises(UsageError, match="--decay is an option of --branch inplace; it does not apply to --branch ttt"):
        convert_moshi(*base, "--branch", "ttt", "--decay", "0.9", "--out", str(tmp_path / "bad"))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        convert_moshi(*base, "--decay", "1.5", "--out", str(tmp_path / "bad"))
    assert "error: argument --decay: 1.5 is not a number in (0, 1]" in capsys.readouterr().err
