"""convert(..., ttt=InPlaceConfig) on transformers Llama/Qwen2: the layers' own MLPs get in-place fast weights.
Identical logits until the memory writes, a chunked forward equal to token-by-token decoding through the
MemoryCache, generate carrying the state, save/load with one key per weight, and convert-hf --branch inplace."""

import copy
import json

import pytest
import torch

pytest.importorskip("transformers", minversion="5.23")  # pyproject's hf extra

from helpers.hf import FAMILIES, HIDDEN, VOCAB, tiny_model, ttt_config  # noqa: E402
from safetensors import safe_open  # noqa: E402
from ttt_speech.cli import main as cli_main  # noqa: E402
from ttt_speech.config import InPlaceConfig  # noqa: E402
from ttt_speech.hf import MemoryCache, convert  # noqa: E402
from ttt_speech.hf.compat import cache_kwargs, output_cache  # noqa: E402
from ttt_speech.layers import InPlaceLayer, InPlaceState  # noqa: E402

CHUNK, W = 4, 32


def inplace(family: str = "llama", layers=(1, 2), base_lr: float = 100.0, decay: float = 1.0):
    """Converted with a large write step (the target projection still starts at zero: see open_memory)."""
    return convert(tiny_model(family), layers=layers,
                   ttt=InPlaceConfig(HIDDEN, 128, chunk=CHUNK, base_lr=base_lr, decay=decay), attention_window=W)


@torch.no_grad()
def open_memory(model) -> None:
    """A trained-looking target projection, so the writes move the logits."""
    for i, layer in enumerate(model.model.layers):
        if hasattr(layer.mlp, "memory"):
            w = layer.mlp.memory.target_proj.weight
            w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(i)))


def ids(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x: torch.Tensor) -> torch.Tensor:
    return model(x, use_cache=False).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_model_is_the_windowed_original_bit_for_bit(family):
    original = tiny_model(family)
    model = convert(copy.deepcopy(original), layers=[1, 2], ttt=InPlaceConfig(HIDDEN, 128, chunk=CHUNK, base_lr=100.0),
                    attention_window=W)
    gate0 = convert(copy.deepcopy(original), layers=[1, 2], ttt=ttt_config(0.0), attention_window=W)
    x = ids(2, W)
    assert torch.equal(logits(model, x), logits(gate0, x))  # the same windowed attention, the MLPs unchanged
    assert (logits(model, x) - logits(original, x)).abs().max().item() <= 1e-5
    mlp = model.model.layers[1].mlp
    assert isinstance(mlp.memory, InPlaceLayer) and mlp.memory.mlp.down is mlp.down_proj and not hasattr(model.model.layers[0].mlp, "memory")
    open_memory(model)  # the comparison above must be able to fail
    opened = logits(model, x)
    assert torch.equal(opened[:, :CHUNK], logits(gate0, x)[:, :CHUNK])  # chunk 0 reads W_down itself
    assert (opened[:, CHUNK:] - logits(gate0, x)[:, CHUNK:]).abs().max().item() > 1e-2


@pytest.mark.parametrize("decay", [1.0, 0.6])
def test_chunked_forward_equals_token_by_token_decoding_and_generate_carries_the_state(decay):
    model = inplace(decay=decay)
    open_memory(model)
    x = ids(2, 21)
    full = logits(model, x)
    for bounds in (list(range(22)), [0, 5, 6, 13, 21]):
        cache, out = MemoryCache(model.config), []
        with torch.no_grad():
            for s, e in zip(bounds, bounds[1:]):
                out.append(model(x[:, s:e], use_cache=True, **cache_kwargs(cache)).logits)
        assert (torch.cat(out, 1) - full).abs().max().item() <= 1e-4
        assert sorted(cache.memory_states) == [1, 2] and isinstance(cache.memory_states[1], InPlaceState)
    gen = model.generate(x[:, :5], max_new_tokens=12, min_new_tokens=12, do_sample=False,
                         return_dict_in_generate=True, output_logits=True)
    cache = output_cache(gen)
    assert isinstance(cache, MemoryCache) and cache.memory_states[2]["offset"].tolist() == [(5 + 11) % CHUNK] * 2
    replay = logits(model, gen.sequences[:, :-1])[:, 4:]
    assert (torch.stack(gen.logits, 1) - replay).abs().max().item() <= 1e-4
    assert model.model.layers[1].mlp.memory_context == (None, None)  # no cache outlives a forward


@pytest.mark.parametrize("decay", [1.0, 0.6])
def test_save_and_load_round_trip_with_one_key_per_weight(tmp_path, decay):
    model = inplace("qwen2", base_lr=10.0, decay=decay)
    open_memory(model)
    model.save_pretrained(tmp_path)
    section = json.loads((tmp_path / "config.json").read_text())["memory"]
    assert section["branch"] == "inplace" and section["config"]["chunk"] == CHUNK and section["config"]["base_lr"] == 10
    assert section["config"]["decay"] == decay
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    mlp_keys = {k for k in keys if k.startswith("model.layers.1.mlp.")}
    assert mlp_keys == {f"model.layers.1.mlp.{n}" for n in ("gate_proj.weight", "up_proj.weight", "down_proj.weight",
                        "memory.target_conv_weight", "memory.target_conv_bias", "memory.target_proj.weight", "memory.lr_weight",
                        "memory.lr_bias", *(["memory.decay_logit"] if decay < 1 else []))}
    loaded = convert.load(tmp_path)
    x = ids(2, 19)
    assert torch.equal(logits(loaded, x), logits(model, x))
    assert (logits(loaded, x) - logits(tiny_model("qwen2"), x))[:, CHUNK:].abs().max() > 1e-2  # the memory is on


def test_convert_hf_command_with_an_inplace_branch(tmp_path, capsys):
    src, out = tmp_path / "llama", tmp_path / "out"
    original = tiny_model("llama")
    original.save_pretrained(src)
    base = ["convert-hf", "--model", str(src), "--layers", "1-2", "--attention-window", str(W), "--dtype", "float32"]
    cli_main([*base, "--out", str(out), "--chunk", "8"])  # in-place: the default branch
    printed = capsys.readouterr().out
    model = convert.load(out)
    assert model.model.layers[2].mlp.memory.config == InPlaceConfig(HIDDEN, 128, chunk=8)
    state = model.model.layers[2].mlp.memory.init_state(1)
    assert "inplace branch" in printed and f"{2 * state.nbytes / 2**20:.0f} MiB per session" in printed
    assert "MiB per layer x 2, fp32)" in printed
    assert (logits(model, ids(2, W)) - logits(original, ids(2, W))).abs().max().item() <= 1e-5
    named = [*base, "--branch", "inplace"]
    for argv, msg in (([*named, "--mini-batch", "4"], "--mini-batch is an option of --branch ttt; it does not apply to "
                                                      "--branch inplace"),
                      ([*named, "--mode", "replace"], "--mode replace is an option of --branch ttt; it does not apply"),
                      ([*base, "--mini-batch", "4"], "--mini-batch is an option of --branch ttt, not of --branch "
                                                     "inplace (the default branch since issue 23): add --branch ttt"),
                      ([*base, "--branch", "ttt", "--chunk", "8"], "--chunk is an option of --branch inplace; it does "
                                                                   "not apply to --branch ttt")):
        with pytest.raises(SystemExit) as e:
            cli_main([*argv, "--out", str(tmp_path / "bad")])
        assert e.value.code == 2 and msg in capsys.readouterr().err
    with pytest.raises(ValueError, match="mode='replace' is not supported with an in-place branch"):
        convert(tiny_model("llama"), layers=[1], mode="replace", ttt=InPlaceConfig(HIDDEN, 128))
    with pytest.raises(ValueError, match="InPlaceConfig.hidden=96 but layer 1's MLP has width 128"):
        convert(tiny_model("llama"), layers=[1], ttt=InPlaceConfig(HIDDEN, 96))


def test_left_padding_never_reaches_the_fast_weights():
    """A left-padded batch gives each stream the state and tokens it has alone: pads neither write nor advance."""
    model = inplace()
    open_memory(model)
    long, short = ids(1, 9, seed=4), ids(1, 6, seed=5)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)])
    mask = torch.tensor([[1] * 9, [0, 0, 0] + [1] * 6])
    cache, alone = MemoryCache(model.config), MemoryCache(model.config)
    with torch.no_grad():
        model(batch, attention_mask=mask, use_cache=True, **cache_kwargs(cache))
        model(short, use_cache=True, **cache_kwargs(alone))
    for layer in (1, 2):
        got, ref = cache.memory_states[layer], alone.memory_states[layer]
        assert got["offset"][1].item() == 6 % CHUNK and ref["delta"].abs().max() > 0
        assert max((got[k][1] - ref[k][0]).abs().max().item() for k in ref) <= 1e-5
    out = model.generate(batch, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    single = model.generate(short, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(out[1, -8:], single[0, -8:])
