"""Every seed speech model with a transformers language model converts: Qwen2-Audio, VITA, Spirit-LM, Mini-Omni.

Tiny models built from transformers' own config classes (and, for VITA and Mini-Omni, tiny
look-alikes of their own model code), saved in the real save format; nothing is downloaded.
"""

import copy
import json
import os

import pytest
import torch
from safetensors import safe_open
from torch import nn

pytest.importorskip("transformers", minversion="5.23")  # pyproject's hf extra

from transformers import (  # noqa: E402
    LlamaForCausalLM, LogitsProcessorList, MixtralConfig, MixtralForCausalLM, Qwen2AudioConfig,
    Qwen2AudioEncoderConfig, Qwen2AudioForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM, Qwen2Model,
    Qwen2PreTrainedModel,
)

from helpers.hf import (  # noqa: E402
    HEADS, HIDDEN, KV_HEADS, VOCAB, BytesProbe, perturb_ttt, tiny_config, tiny_model, ttt_config, ttt_modules,
)
from ttt_speech.cli import main as cli_main  # noqa: E402
from ttt_speech.hf import MemoryCache, convert  # noqa: E402
from ttt_speech.hf.compat import cache_kwargs, output_cache  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

AUDIO_TOKEN, AUDIO_TOKENS, MEL_BINS, MEL_FRAMES = VOCAB - 1, 4, 16, 16  # 16 mel frames -> 4 audio tokens


@torch.no_grad()
def open_gates(model) -> None:
    """Gates at tanh(0.5) and every TTT parameter moved off its init: the TTT branch changes the logits."""
    perturb_ttt(model)
    for module in ttt_modules(model):
        module.gate_alpha.fill_(0.5)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def ids(B: int, T: int, seed: int = 0, high: int = AUDIO_TOKEN) -> torch.Tensor:
    return torch.randint(3, high, (B, T), generator=torch.Generator().manual_seed(seed))


# --- Qwen2-Audio: an audio tower + projector in front of a whole Qwen2 language model ---------------------

def tiny_qwen2_audio(seed: int = 0) -> Qwen2AudioForConditionalGeneration:
    torch.manual_seed(seed)
    audio = Qwen2AudioEncoderConfig(num_mel_bins=MEL_BINS, encoder_layers=1, encoder_attention_heads=2,
                                    encoder_ffn_dim=32, d_model=16, max_source_positions=MEL_FRAMES // 2)
    config = Qwen2AudioConfig(audio_config=audio, text_config=tiny_config("qwen2"), audio_token_index=AUDIO_TOKEN,
                              attn_implementation="sdpa")
    return Qwen2AudioForConditionalGeneration(config).eval()


def audio_inputs(B: int = 2, text: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """What Qwen2-Audio's processor makes: the audio placeholder expanded to one token per audio frame."""
    g = torch.Generator().manual_seed(seed)
    placeholder = torch.full((B, AUDIO_TOKENS), AUDIO_TOKEN)
    input_ids = torch.cat([torch.ones(B, 1, dtype=torch.long), placeholder, ids(B, text, seed)], dim=1)
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                input_features=torch.randn(B, MEL_BINS, MEL_FRAMES, generator=g),
                feature_attention_mask=torch.ones(B, MEL_FRAMES, dtype=torch.long))


def qwen2_audio_logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


def test_qwen2_audio_converts_its_language_model_and_leaves_the_audio_tower_alone():
    original = tiny_qwen2_audio()
    model = convert(copy.deepcopy(original), layers=[1, 2], ttt=ttt_config(0.0), attention_window=32)
    inputs = audio_inputs()
    assert max_diff(qwen2_audio_logits(model, inputs), qwen2_audio_logits(original, inputs)) <= 1e-5
    assert len(ttt_modules(model)) == 2 and model.config.text_config.sliding_window == 32
    untouched = {k: v for k, v in original.state_dict().items() if not k.startswith("model.language_model.")}
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in untouched.items())
    assert not any(".memory." in k for k in state if not k.startswith("model.language_model.layers."))
    open_gates(model)  # the branch is really there, and it reads the audio: other audio, other logits
    with_audio = qwen2_audio_logits(model, inputs)
    assert max_diff(with_audio, qwen2_audio_logits(original, inputs)) > 1e-2
    other = dict(inputs, input_features=torch.randn_like(inputs["input_features"]))
    assert max_diff(qwen2_audio_logits(model, other)[:, -1], with_audio[:, -1]) > 1e-3


def test_qwen2_audio_round_trip_in_its_own_save_format(tmp_path):
    model = convert(tiny_qwen2_audio(), layers=[1, 2], ttt=ttt_config(0.0), attention_window=8)
    open_gates(model)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["text_config"]["memory"]["layers"] == [1, 2] and "memory" not in cfg
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())  # Qwen2-Audio's released layout: language_model.model.*, audio_tower.*
    assert "language_model.model.layers.1.self_attn.memory.W1" in keys and "audio_tower.conv1.weight" in keys

    loaded, report = convert.load(tmp_path, output_loading_info=True)
    assert type(loaded) is Qwen2AudioForConditionalGeneration and report.left_alone_keys == []
    inputs = audio_inputs(text=12)  # 17 tokens: past the window of 8
    assert torch.equal(qwen2_audio_logits(loaded, inputs), qwen2_audio_logits(model, inputs))


def test_qwen2_audio_generate_with_audio_inputs():
    """Gate 0 inside the window: the original's tokens. Gates open, 3 windows: the tokens a teacher-forced
    forward picks, with the KV cache holding one window per layer and the TTT states carried."""
    original = tiny_qwen2_audio()
    model = convert(copy.deepcopy(original), layers=[1, 2], ttt=ttt_config(0.0), attention_window=64)
    inputs, P = audio_inputs(), 11  # prompt: bos + 4 audio tokens + 6 text tokens
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    out = model.generate(**inputs, **kw)
    assert torch.equal(out.sequences, original.generate(**inputs, **kw).sequences)

    W, B = 8, 2
    model = convert(copy.deepcopy(original), layers=[1, 2], ttt=ttt_config(0.0), attention_window=W)
    open_gates(model)
    out = model.generate(**inputs, **dict(kw, max_new_tokens=3 * W, min_new_tokens=3 * W))
    cache = output_cache(out)
    assert isinstance(cache, MemoryCache) and sorted(cache.memory_states) == [1, 2]
    assert cache.kv_nbytes == 3 * 2 * B * KV_HEADS * W * (HIDDEN // HEADS) * 4  # 3 layers, fp32 K and V, W tokens
    with torch.no_grad():  # teacher-forced over the generated tokens, the audio read once in the prefill
        full = model(**dict(inputs, input_ids=out.sequences, attention_mask=torch.ones_like(out.sequences)),
                     use_cache=False).logits
    assert torch.equal(full[:, P - 1:-1].argmax(-1), out.sequences[:, P:])


def test_convert_hf_cli_on_a_qwen2_audio_directory(tmp_path, capsys):
    src, out = tmp_path / "qwen2-audio", tmp_path / "out"
    original = tiny_qwen2_audio()
    original.save_pretrained(src)
    cli_main(["convert-hf", "--model", str(src), "--layers", "1-2", "--out", str(out), "--attention-window", "32",
              "--branch", "ttt", "--mini-batch", "4", "--dtype", "float32"])
    assert "converted layers [1, 2]" in capsys.readouterr().out
    model = convert.load(out)
    assert type(model) is Qwen2AudioForConditionalGeneration and len(ttt_modules(model)) == 2
    inputs = audio_inputs()
    assert max_diff(qwen2_audio_logits(model, inputs), qwen2_audio_logits(original, inputs)) <= 1e-5


# --- VITA: a Mixtral sparse-MoE decoder (VITA's own class subclasses MixtralForCausalLM) -------------------

def tiny_mixtral_config(**extra) -> MixtralConfig:
    return MixtralConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=3, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=1024,
        attn_implementation="sdpa", pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra,
    )


def tiny_mixtral(seed: int = 0) -> MixtralForCausalLM:
    torch.manual_seed(seed)
    return MixtralForCausalLM(tiny_mixtral_config()).eval()


def test_mixtral_without_memory_is_one_error_naming_ttt() -> None:
    """In-place (the default) needs one gated MLP per layer; Mixtral's are mixtures of experts."""
    model = tiny_mixtral()
    with pytest.raises(ValueError, match=r"this model's are MixtralSparseMoeBlock \(mixture of experts\): pass "
                                         r"memory=TTTConfig\(dim=64, num_heads=4\)"):
        convert(model, layers=[1])
    assert not hasattr(model.config, "memory")


class TinyVitaConfig(MixtralConfig):
    model_type = "tiny-vita-mixtral"


class TinyVitaForCausalLM(MixtralForCausalLM):
    """A VITA look-alike: a user subclass of MixtralForCausalLM with an audio encoder and projector in `model`."""

    config_class = TinyVitaConfig

    def __init__(self, config: TinyVitaConfig) -> None:
        super().__init__(config)
        self.model.audio_encoder = nn.Linear(MEL_BINS, 32)
        self.model.mm_projector = nn.Linear(32, HIDDEN)


def test_mixtral_hybrid_is_the_identity_at_gate_zero_and_leaves_the_moe_alone():
    original = tiny_mixtral()
    model = convert(copy.deepcopy(original), layers=[1, 2], ttt=ttt_config(0.0), attention_window=32)
    x = ids(2, 24)
    with torch.no_grad():
        ref = original(x, output_router_logits=True, use_cache=False)
        out = model(x, output_router_logits=True, use_cache=False)
    assert max_diff(out.logits, ref.logits) <= 1e-5
    assert all(torch.equal(a, b) for a, b in zip(out.router_logits, ref.router_logits, strict=True))
    for new, old in zip(model.model.layers, original.model.layers, strict=True):
        assert type(new.mlp) is type(old.mlp)
        assert all(torch.equal(a, b) for a, b in zip(new.mlp.state_dict().values(), old.mlp.state_dict().values()))
    assert type(model.model.layers[1].self_attn).__name__ == "HybridMixtralAttention"
    open_gates(model)
    with torch.no_grad():
        assert max_diff(model(x, use_cache=False).logits, ref.logits) > 1e-2


def test_mixtral_generate_is_bounded():
    """Ten windows of greedy decoding: cache + TTT state bytes stop growing once the window is full."""
    B, W, n = 2, 8, 80
    model = convert(tiny_mixtral(), layers=[1, 2], ttt=ttt_config(0.0), attention_window=W)
    open_gates(model)
    cache = MemoryCache(model.config)
    probe = BytesProbe(cache)
    out = model.generate(ids(B, 4), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         logits_processor=LogitsProcessorList([probe]), **cache_kwargs(cache))
    assert out.shape == (B, 4 + n)
    after_fill = [b for length, b in probe.rows if length > W]
    assert len(after_fill) >= 9 * W and len(set(after_fill)) == 1
    assert cache.kv_nbytes == 3 * 2 * B * KV_HEADS * W * (HIDDEN // HEADS) * 4  # 3 layers, fp32 K and V
    assert sorted(cache.memory_states) == [1, 2]


def test_mixtral_round_trip_in_its_own_save_format(tmp_path):
    model = convert(tiny_mixtral(), layers=[0, 2], ttt=ttt_config(0.0), attention_window=8)
    open_gates(model)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())  # Mixtral's released layout: one tensor per expert
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in keys and "model.layers.2.self_attn.memory.W1" in keys
    loaded, report = convert.load(tmp_path, output_loading_info=True)
    assert type(loaded) is MixtralForCausalLM and report.left_alone_keys == []
    x = ids(2, 20)
    with torch.no_grad():
        assert torch.equal(loaded(x, use_cache=False).logits, model(x, use_cache=False).logits)


def test_a_vita_object_converts_and_its_directory_loads_as_a_mixtral(tmp_path):
    torch.manual_seed(0)
    vita = TinyVitaForCausalLM(TinyVitaConfig(**tiny_mixtral_config().to_diff_dict())).eval()
    model = convert(copy.deepcopy(vita), layers=[1], ttt=ttt_config(0.0), attention_window=32)
    x = ids(2, 20)
    with torch.no_grad():
        assert max_diff(model(x, use_cache=False).logits, vita(x, use_cache=False).logits) <= 1e-5
    open_gates(model)
    model.save_pretrained(tmp_path)
    llm, report = convert.load(tmp_path, output_loading_info=True)
    assert type(llm) is MixtralForCausalLM
    assert report.groups() == {"model.audio_encoder": 2, "model.mm_projector": 2}
    fresh = convert.load(tmp_path, model=TinyVitaForCausalLM(TinyVitaConfig(**tiny_mixtral_config().to_diff_dict())))
    assert torch.equal(fresh.model.mm_projector.weight, model.model.mm_projector.weight)
    with torch.no_grad():
        ref = model(x, use_cache=False).logits
        assert torch.equal(llm(x, use_cache=False).logits, ref)
        assert torch.equal(fresh.eval()(x, use_cache=False).logits, ref)


# --- Spirit-LM: a Llama-2 whose vocabulary was extended with speech tokens -------------------------------

SPEECH_UNITS = 40  # Spirit-LM adds HuBERT units (and pitch/style tokens) after the text vocabulary


def tiny_spirit_lm() -> LlamaForCausalLM:
    model = tiny_model("llama")
    model.resize_token_embeddings(VOCAB + SPEECH_UNITS, mean_resizing=False)
    with torch.no_grad():  # trained speech-token rows, not copies of the mean
        g = torch.Generator().manual_seed(3)
        model.model.embed_tokens.weight[VOCAB:] = torch.randn(SPEECH_UNITS, HIDDEN, generator=g) * 0.5
        model.lm_head.weight[VOCAB:] = torch.randn(SPEECH_UNITS, HIDDEN, generator=g) * 0.5
    return model.eval()


def test_a_llama_with_speech_tokens_converts_generates_unchanged_and_round_trips(tmp_path):
    original = tiny_spirit_lm()
    model = convert(copy.deepcopy(original), layers=[1, 2], ttt=ttt_config(0.0), attention_window=64)
    prompt = ids(2, 8, high=VOCAB + SPEECH_UNITS)
    assert (prompt >= VOCAB).any()  # the prompt speaks in speech units
    kw = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False)
    out = model.generate(prompt, **kw)
    assert torch.equal(out, original.generate(prompt, **kw))
    with torch.no_grad():
        logits = model(out, use_cache=False).logits
    assert logits.shape[-1] == VOCAB + SPEECH_UNITS
    assert max_diff(logits, original(out, use_cache=False).logits) <= 1e-5

    open_gates(model)
    model.save_pretrained(tmp_path)
    loaded = convert.load(tmp_path)
    assert loaded.config.vocab_size == VOCAB + SPEECH_UNITS
    assert torch.equal(loaded.generate(prompt, **kw), model.generate(prompt, **kw))


def test_convert_hf_reads_a_spirit_lm_release_in_bin_shards(tmp_path, capsys):
    """Spirit-LM ships `pytorch_model-0000N-of-00002.bin` shards + an index, not safetensors."""
    src, out = tmp_path / "spirit-lm-base-7b", tmp_path / "out"
    original = tiny_spirit_lm()
    original.config.save_pretrained(src)
    state = original.state_dict()
    keys = sorted(state)
    shards = {f"pytorch_model-0000{i + 1}-of-00002.bin": keys[i::2] for i in range(2)}
    for name, part in shards.items():
        torch.save({k: state[k].clone() for k in part}, src / name)
    weight_map = {k: name for name, part in shards.items() for k in part}
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cli_main(["convert-hf", "--model", str(src), "--layers", "1-2", "--out", str(out), "--attention-window", "64",
              "--branch", "ttt", "--mini-batch", "4", "--dtype", "float32"])
    assert "converted layers [1, 2]" in capsys.readouterr().out
    assert "model.safetensors" in os.listdir(out)
    model, prompt = convert.load(out), ids(2, 12, high=VOCAB + SPEECH_UNITS)
    with torch.no_grad():
        assert max_diff(model(prompt).logits, original(prompt).logits) <= 1e-5


# --- Mini-Omni: a Qwen2 decoder inside its own model code, with parallel audio heads ----------------------

class TinyMiniOmniConfig(Qwen2Config):
    model_type = "tiny_mini_omni"


class TinyMiniOmni(Qwen2PreTrainedModel):
    """A Mini-Omni look-alike built by code outside transformers around a transformers `Qwen2Model`.

    Like Mini-Omni: 8 parallel token streams (text + 7 SNAC audio layers) share one embedding and are
    averaged into one input; an adapter maps Whisper features in; one head gives the text logits and
    a post-adapter head the 7 audio layers' logits, read in parallel.
    """

    config_class = TinyMiniOmniConfig
    STREAMS, AUDIO_VOCAB = 8, 12

    def __init__(self, config: TinyMiniOmniConfig) -> None:
        super().__init__(config)
        self.model = Qwen2Model(config)
        self.whisper_adapter = nn.Linear(MEL_BINS, config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.audio_head = nn.Linear(config.hidden_size, (self.STREAMS - 1) * self.AUDIO_VOCAB, bias=False)
        self.post_init()

    def forward(self, streams: torch.Tensor, cache=None, use_cache: bool = False):
        """streams [B, 8, T] -> text logits [B, T, V], audio logits [B, 7, T, AUDIO_VOCAB], the cache."""
        x = self.model.embed_tokens(streams).mean(1)
        out = self.model(inputs_embeds=x, use_cache=use_cache, **cache_kwargs(cache))
        h = out.last_hidden_state
        audio = self.audio_head(h).unflatten(-1, (self.STREAMS - 1, self.AUDIO_VOCAB)).transpose(1, 2)
        return self.lm_head(h), audio, output_cache(out)


def tiny_mini_omni(seed: int = 0) -> TinyMiniOmni:
    torch.manual_seed(seed)
    return TinyMiniOmni(TinyMiniOmniConfig(**tiny_config("qwen2").to_diff_dict())).eval()


def streams(T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, TinyMiniOmni.STREAMS, T), generator=torch.Generator().manual_seed(seed))


def test_a_mini_omni_object_converts_decodes_in_its_own_loop_and_round_trips(tmp_path):
    original = tiny_mini_omni()
    model = convert(copy.deepcopy(original), layers=[1, 2], ttt=ttt_config(0.0), attention_window=8)
    s = streams(8)
    with torch.no_grad():
        text, audio, _ = model(s)
        ref_text, ref_audio, _ = original(s)
    assert max_diff(text, ref_text) <= 1e-5 and max_diff(audio, ref_audio) <= 1e-5

    open_gates(model)
    s = streams(20)  # 2.5 windows, 5 TTT mini-batches
    with torch.no_grad():
        text, audio, _ = model(s)
        cache = MemoryCache(model.config)  # Mini-Omni's own decoding loop, one frame of 8 tokens at a time
        steps = [model(s[..., t : t + 1], cache=cache, use_cache=True) for t in range(20)]
    assert max_diff(torch.cat([o[0] for o in steps], 1), text) <= 1e-4
    assert max_diff(torch.cat([o[1] for o in steps], 2), audio) <= 1e-4
    assert sorted(cache.memory_states) == [1, 2]

    model.save_pretrained(tmp_path)
    fresh = convert.load(tmp_path, model=tiny_mini_omni(seed=5))
    with torch.no_grad():
        got_text, got_audio, _ = fresh.eval()(s)
    assert torch.equal(got_text, text) and torch.equal(got_audio, audio)
    llm, report = convert.load(tmp_path, output_loading_info=True)  # the text LM alone, as a Qwen2
    assert type(llm) is Qwen2ForCausalLM
    assert report.groups() == {"audio_head": 1, "whisper_adapter": 2}


def test_load_names_the_tensors_a_directory_lacks(tmp_path):
    """A converted directory missing one TTT tensor is refused by both loads, naming it, not filled at random."""
    from safetensors.torch import load_file, save_file

    model = convert(tiny_mini_omni(), layers=[1], ttt=ttt_config(0.0), attention_window=8)
    model.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.1.self_attn.memory.W1"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks parameters .*'model\.layers\.1\.self_attn\.memory\.W1'\]"):
        convert.load(tmp_path)
    with pytest.raises(ValueError, match=r"lacks parameters .*'model\.layers\.1\.self_attn\.memory\.W1'\]"):
        convert.load(tmp_path, model=tiny_mini_omni(seed=5))
