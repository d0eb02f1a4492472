"""The compat modules: one test per private attribute of moshi, transformers and torch that they use,
so a release that renames one fails here; and a scan of src/ for private access anywhere else."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from ttt_speech.compat import allow_recompiles, fold_weight_norm, retype, share_module_contents, weight_int8pack_mm

SRC = Path(__file__).resolve().parents[1] / "src" / "ttt_speech"
COMPAT = {SRC / "compat.py", SRC / "moshi" / "compat.py", SRC / "hf" / "compat.py"}


# -- torch --------------------------------------------------------------------------------------
def test_share_module_contents_shares_parameters_buffers_and_children():
    layer = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    unit = nn.Module()
    share_module_contents(unit, layer)
    assert [id(p) for p in unit.parameters()] == [id(p) for p in layer.parameters()]
    assert list(unit.state_dict()) == list(layer.state_dict())
    assert unit.get_submodule("0") is layer[0]
    unit.register_buffer("extra", torch.ones(1), persistent=False)  # one dict: the layer sees it too
    assert "extra" in dict(layer.named_buffers()) and "extra" not in layer.state_dict()


def test_fold_weight_norm_matches_weight_norm():
    torch.manual_seed(0)
    conv = nn.utils.weight_norm(nn.Conv1d(3, 5, 2), dim=0)
    v, g = conv.weight_v.detach(), conv.weight_g.detach()
    expected = v * (g / v.flatten(1).norm(dim=1).view(-1, 1, 1))
    torch.testing.assert_close(fold_weight_norm(v, g), expected)
    torch.testing.assert_close(fold_weight_norm(v, g), conv.weight.detach())


def test_retype_only_to_a_subclass():
    class Wider(nn.Linear):
        def double(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * self(x)

    lin = nn.Linear(2, 2)
    wide = retype(lin, Wider)
    assert wide is lin and isinstance(lin, Wider)
    torch.testing.assert_close(wide.double(torch.ones(1, 2)), 2 * lin(torch.ones(1, 2)))
    with pytest.raises(TypeError, match="does not subclass"):
        retype(nn.Linear(2, 2), nn.Conv1d)


# -- transformers -------------------------------------------------------------------------------
def test_weight_int8pack_mm_is_a_scaled_matmul_with_int8_weights():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, generator=g)
    w = torch.randint(-128, 128, (5, 64), generator=g, dtype=torch.int8)
    scales = torch.rand(5, generator=g) / 100
    want = (x @ w.float().T) * scales
    torch.testing.assert_close(weight_int8pack_mm(x, w, scales), want, rtol=1e-5, atol=1e-5)
    assert want.abs().max() > 0.1  # integer codes up to 127 over 64 terms: not a near-zero comparison


def test_allow_recompiles_raises_dynamo_s_limit_and_never_lowers_it():
    import torch._dynamo.config as dynamo_config

    before = dynamo_config.recompile_limit
    try:
        allow_recompiles(before + 40)
        assert dynamo_config.recompile_limit == before + 40
        allow_recompiles(1)
        assert dynamo_config.recompile_limit == before + 40
    finally:
        dynamo_config.recompile_limit = before


def test_attention_implementation_reads_the_config():
    transformers = pytest.importorskip("transformers")
    from ttt_speech.hf.compat import attention_implementation

    assert attention_implementation(transformers.LlamaConfig(attn_implementation="sdpa")) == "sdpa"
    assert attention_implementation(transformers.LlamaConfig(attn_implementation="eager")) == "eager"


def test_attention_implementation_as_switches_the_attention_function_and_back():
    transformers = pytest.importorskip("transformers")
    from ttt_speech.hf.compat import attention_implementation, attention_implementation_as

    calls = []

    def recorded(module, query, key, value, attention_mask, **kwargs):
        calls.append(query.shape)
        return transformers.integrations.sdpa_attention.sdpa_attention_forward(module, query, key, value,
                                                                                attention_mask, **kwargs)

    transformers.AttentionInterface.register("ttt_speech_test_recorded", recorded)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 16, (1, 5))
    with torch.no_grad():
        expected = model(ids).logits
        with attention_implementation_as(model.config, "ttt_speech_test_recorded"):
            assert attention_implementation(model.config) == "ttt_speech_test_recorded"
            torch.testing.assert_close(model(ids).logits, expected)
    assert calls == [(1, 2, 5, 8)]  # the layer's attention went through the registered function
    assert attention_implementation(model.config) == "sdpa"
    composite = transformers.Qwen2AudioConfig()
    composite.text_config._attn_implementation, composite.audio_config._attn_implementation = "eager", "sdpa"
    with attention_implementation_as(composite, "ttt_speech_test_recorded"):
        assert attention_implementation(composite.text_config) == "ttt_speech_test_recorded"
    assert [attention_implementation(c) for c in (composite.text_config, composite.audio_config)] == ["eager", "sdpa"]


# -- moshi --------------------------------------------------------------------------------------
moshi_compat = pytest.importorskip("ttt_speech.moshi.compat")


@pytest.fixture
def tiny_lm():
    from ttt_speech.moshi.tiny import build_tiny_lm

    return build_tiny_lm(0)


def test_layer_hooks_are_called_by_moshis_layer(tiny_lm):
    calls = []

    class Counted(moshi_compat.HookedTransformerLayer):
        def attention_block(self, x):
            calls.append("attention")
            return super().attention_block(x)

        def init_streaming_state(self, batch_size):
            calls.append("state")
            return super().init_streaming_state(batch_size)

    layer = tiny_lm.transformer.layers[0]
    x = torch.randn(1, 3, tiny_lm.dim)
    expected = layer(x)
    retype(layer, Counted)
    torch.testing.assert_close(layer(x), expected)
    assert calls == ["attention"]
    with layer.streaming(1):
        assert isinstance(moshi_compat.streaming_state(layer), moshi_compat.LayerStreamingState)
    assert calls == ["attention", "state"]
    assert moshi_compat.streaming_state(layer) is None


def test_temporal_transformer_stands_in_inside_forward_text(tiny_lm):
    """forward_text sums the embeddings, calls `self.transformer`, then out_norm and the text head: with a
    stand-in it sees exactly the embedding sum and its output is what the heads read."""
    class Double(nn.Module):
        def forward(self, x, cross_attention_src=None):
            seen.append(x)
            return 2 * x

    seen: list[torch.Tensor] = []
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, tiny_lm.card, (2, tiny_lm.num_codebooks, 5), generator=g)
    own = tiny_lm.transformer
    with torch.no_grad():
        with moshi_compat.temporal_transformer(tiny_lm, Double()):
            out, text = tiny_lm.forward_text(codes)
        assert tiny_lm.transformer is own
        summed = tiny_lm.text_emb(codes[:, 0]) + sum(tiny_lm.emb[k](codes[:, k + 1]) for k in range(tiny_lm.n_q))
        assert len(seen) == 1
        torch.testing.assert_close(seen[0], summed)
        torch.testing.assert_close(out, tiny_lm.out_norm(2 * summed))
        torch.testing.assert_close(text, tiny_lm.text_linear(out)[:, None])
    with pytest.raises(RuntimeError, match="did not call lm.transformer"):
        with moshi_compat.temporal_transformer(tiny_lm, Double()):
            pass  # a forward that never reaches the stand-in
    with pytest.raises(KeyError):
        with moshi_compat.temporal_transformer(tiny_lm, Double()):
            raise KeyError("the caller's own error comes through")
    assert tiny_lm.transformer is own


def test_layer_streaming_state_resets_offsets():
    state = moshi_compat.LayerStreamingState(2, torch.device("cpu"), offset_cpu=5)
    state.offset_cpu = 5
    state.reset(torch.tensor([True, False]))
    assert state.offset_cpu == 0 and state.exec_mask.tolist() == [True, True]


def test_feed_forward_is_the_second_half_of_the_layer(tiny_lm):
    layer = tiny_lm.transformer.layers[0]
    h = torch.randn(1, 3, tiny_lm.dim)
    by_hand = h + layer.layer_scale_2(layer.gating(layer.norm2(h)))
    torch.testing.assert_close(moshi_compat.feed_forward(layer, h), by_hand)


def test_forget_streaming_children_clears_the_cache(tiny_lm):
    with tiny_lm.streaming(1):
        pass
    assert any(m._cached_children is not None for m in tiny_lm.modules() if hasattr(m, "_cached_children"))
    moshi_compat.forget_streaming_children(tiny_lm)
    assert all(m._cached_children is None for m in tiny_lm.modules() if hasattr(m, "_cached_children"))


def test_delay_sequence_shifts_each_stream():
    codes = torch.arange(1, 7).view(1, 2, 3)
    initial = torch.tensor([[[-1], [-2]]])
    out = moshi_compat.delay_sequence([0, 2], codes, initial)
    assert out.tolist() == [[[1, 2, 3], [-2, -2, 4]]]


def test_initial_token_is_text_then_audio_ids(tiny_lm):
    token = moshi_compat.initial_token(tiny_lm)
    assert token.shape == (1, tiny_lm.num_codebooks, 1)
    assert token[0, :, 0].tolist() == [tiny_lm.text_initial_token_id] + [tiny_lm.initial_token_id] * tiny_lm.n_q


def test_activation_by_name():
    assert moshi_compat.activation("silu") is torch.nn.functional.silu
    assert moshi_compat.activation("tanh") is torch.tanh


def test_default_lm_config_is_moshi_7b_and_a_copy():
    cfg = moshi_compat.default_lm_config()
    assert cfg["dim"] == 4096 and cfg["num_layers"] == 32 and cfg["context"] == 3000 and cfg["dep_q"] == 8
    cfg["dim"] = -1
    assert moshi_compat.default_lm_config()["dim"] == 4096


def test_default_mimi_config_is_the_released_layout_and_a_copy():
    cfg = moshi_compat.default_mimi_config()
    assert cfg["sample_rate"] == 24000 and cfg["frame_rate"] == 12.5
    assert {"seanet", "quantizer", "transformer"} <= set(cfg)
    cfg["seanet"]["n_filters"] = -1
    assert moshi_compat.default_mimi_config()["seanet"]["n_filters"] != -1


@pytest.fixture
def tiny_mimi():
    from ttt_speech.moshi.tiny import build_tiny_mimi

    return build_tiny_mimi(0)


def test_encode_latent_and_back_to_encoder_rate(tiny_mimi):
    x = torch.randn(1, 1, 1920 * 2)
    latent = moshi_compat.encode_latent(tiny_mimi, x)
    assert latent.shape[-1] == 2  # one latent per 12.5 Hz frame
    torch.testing.assert_close(tiny_mimi.quantizer.encode(latent), tiny_mimi.encode(x))
    up = moshi_compat.to_encoder_framerate(tiny_mimi, latent)
    ratio = tiny_mimi.encoder_frame_rate / tiny_mimi.frame_rate
    assert up.shape[-1] == round(2 * ratio)


def test_schedule_dead_code_check_counts_down(tiny_mimi):
    from moshi.quantization.core_vq import EuclideanCodebook

    cb = next(m for m in tiny_mimi.modules() if isinstance(m, EuclideanCodebook))
    moshi_compat.schedule_dead_code_check(cb, 2)
    assert cb._next_unused_check == 2
    tiny_mimi.train()
    tiny_mimi.quantizer(moshi_compat.encode_latent(tiny_mimi, torch.randn(1, 1, 1920 * 2)), tiny_mimi.frame_rate)
    assert cb._next_unused_check == 1  # one training forward: one count down


def test_hooked_lmgen_extends_its_state_and_force_text_token(tiny_lm):
    class Tagged(moshi_compat.HookedLMGen):
        def extend_streaming_state(self, state, batch_size):
            state.tag = batch_size

    gen = Tagged(tiny_lm, use_sampling=False)
    assert moshi_compat.streaming_state(gen) is None
    with gen.streaming(2):
        state = moshi_compat.streaming_state(gen)
        assert isinstance(state, moshi_compat.LMGenState) and state.tag == 2
        user = torch.zeros(2, tiny_lm.n_q - tiny_lm.dep_q, 1, dtype=torch.long)
        gen.step(user)
        moshi_compat.force_text_token(gen, 7)
        column = state.offsets % state.cache.shape[-1]
        assert state.cache[:, 0, column].tolist() == [[7, 7], [7, 7]]
        moshi_compat.force_text_token(gen, torch.tensor([3, 9]))  # one per stream (batched own-sample prefixes)
        assert state.cache[:, 0, column].tolist() == [[3, 3], [9, 9]]


# -- nothing else touches a library's privates --------------------------------------------------
LIBRARIES = ("moshi", "transformers", "torch")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _trees() -> dict[Path, ast.Module]:
    return {p: ast.parse(p.read_text(), str(p)) for p in sorted(SRC.rglob("*.py")) if p not in COMPAT}


def _own_private_names(trees: dict[Path, ast.Module]) -> set[str]:
    """Private names ttt_speech defines itself: functions, classes, `self._x = ...`, class fields."""
    own = set()
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                own.add(node.name)
            elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                  and isinstance(node.value, ast.Name) and node.value.id == "self"):
                own.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                own.add(node.target.id)
    return {n for n in own if _private(n)}


def _is_module_object(node: ast.expr) -> bool:
    """`sys.modules[__name__]`: giving a Python module a ModuleType subclass is the language's own hook."""
    return isinstance(node, ast.Subscript) and ast.unparse(node.value) == "sys.modules"


def test_kv_caches_follow_autocast_in_lmgen_and_the_depformer(tiny_lm):
    """float32 weights under bf16 autocast: moshi's own KV caches (float32) refuse the bf16 keys; within the
    context the main transformer's and the depformer's caches (made anew each step) are bf16, and after it
    moshi makes them in the weights' dtype again."""
    from moshi.models.lm import LMGen

    from ttt_speech.moshi.compat import kv_caches_follow_autocast

    lm = tiny_lm.float()
    user = torch.full((2, lm.n_q - lm.dep_q, 1), lm.zero_token_id, dtype=torch.long)

    def run() -> None:
        gen = LMGen(lm, temp=0.8, temp_text=0.7)
        with gen.streaming(2):
            for _ in range(3):
                gen.step(user)

    with torch.autocast("cpu", torch.bfloat16):
        with pytest.raises(RuntimeError, match="dtype"):
            run()
        with kv_caches_follow_autocast(lm):
            run()
    assert not any("_init_streaming_state" in vars(m) for m in lm.modules())
    run()  # no autocast: float32 caches, as moshi makes them


def test_no_private_access_outside_the_compat_modules():
    """`obj._x` where ttt_speech does not define `_x`, `from lib import _x`, or `obj.__class__ = ...` (but
    for a module's): only the compat modules may do these."""
    trees = _trees()
    own = _own_private_names(trees)
    found = []
    for path, tree in trees.items():
        where = path.relative_to(SRC.parent)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own:
                found.append(f"{where}:{node.lineno} .{node.attr}")
            elif (isinstance(node, ast.Attribute) and node.attr == "__class__" and isinstance(node.ctx, ast.Store)
                  and not _is_module_object(node.value)):
                found.append(f"{where}:{node.lineno} .__class__ =")
            elif isinstance(node, ast.ImportFrom) and not (node.module or "").startswith("ttt_speech"):
                found += [f"{where}:{node.lineno} import {a.name}" for a in node.names if _private(a.name)]
    assert not found, "private attributes of another library outside the compat modules:\n" + "\n".join(found)


def test_no_class_overrides_a_librarys_private_method():
    """A method named like a library base class's private one (`_sa_block`) is private access in disguise."""
    import importlib
    import pkgutil

    import ttt_speech

    compat = {"ttt_speech.compat", "ttt_speech.moshi.compat", "ttt_speech.hf.compat"}
    found = []
    for info in pkgutil.walk_packages(ttt_speech.__path__, "ttt_speech."):
        if info.name in compat or info.name.endswith("__main__"):
            continue
        try:
            module = importlib.import_module(info.name)
        except ImportError:  # an optional extra that is not installed (triton, ...)
            continue
        for cls in vars(module).values():
            if not isinstance(cls, type) or cls.__module__ != info.name:
                continue
            foreign = [b for b in cls.__mro__[1:] if b.__module__.split(".")[0] in LIBRARIES]
            # a class the library's metaclass made and set (torch's `Function._backward_cls`) is not ours
            found += [f"{info.name}.{cls.__name__}.{name}" for name, value in vars(cls).items()
                      if _private(name) and callable(value) and any(name in vars(b) for b in foreign)
                      and not (isinstance(value, type) and value.__module__.split(".")[0] in LIBRARIES)]
    assert not found, f"overrides of another library's private methods outside the compat modules: {found}"


def test_own_names_are_found_and_library_names_are_not():
    tree = ast.parse("class A:\n    _field: int\n    def _hook(self):\n        self._x = 1\n"
                     "def f(gen):\n    return gen._streaming_state\n")
    assert _own_private_names({Path("a.py"): tree}) == {"_field", "_hook", "_x"}
