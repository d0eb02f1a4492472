"""The memory branch's one name (`memory`), and files written under its old name (`ttt`) before issue 20.

Each reader of a saved thing gets one old-layout file, made here by renaming a fresh one's keys back: a
Moshi hybrid directory, a transformers hybrid directory, a training checkpoint (engine resume), a kept
conversation (serve), a training config. Each must load to exactly what the new layout loads to."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

from ttt_speech.errors import UsageError
from ttt_speech.names import LEGACY, MEMORY, current_keys, current_name, current_section, is_memory, legacy_name

COMPONENTS = st.sampled_from(["model", "layers", "3", "self_attn", "mlp", "ttt", "ttt_norm_weight", "W1", "weight",
                              "memory_in_mlp"])


@given(st.lists(COMPONENTS, min_size=1, max_size=6))
def test_old_names_map_to_new_component_by_component(parts: list[str]) -> None:
    old = ".".join(parts)
    new = current_name(old)
    assert new.split(".") == [MEMORY if p == LEGACY else p for p in parts]  # only whole `ttt` components
    assert current_name(new) == new and legacy_name(new) == old
    assert is_memory(new) == (LEGACY in parts)


def test_current_section_moves_the_old_section_and_refuses_both() -> None:
    old = {"dim": 4, "ttt": {"mode": "hybrid"}, "n_q": 2}
    assert current_section(old) == {"dim": 4, "memory": {"mode": "hybrid"}, "n_q": 2} and "ttt" in old  # a copy
    assert current_section({"memory": {}}) == {"memory": {}}
    with pytest.raises(ValueError, match="both a 'memory' section and its old name 'ttt'"):
        current_section({"memory": {}, "ttt": {}})


def to_old_layout(directory: Path) -> None:
    """Rewrite a hybrid directory as written before issue 20: `.ttt.` tensors, a "ttt" config section."""
    weights = directory / "model.safetensors"
    tensors = load_file(str(weights))
    assert any(is_memory(k) for k in tensors)
    save_file({legacy_name(k): v for k, v in tensors.items()}, str(weights), metadata={"format": "pt"})
    raw = json.loads((directory / "config.json").read_text())
    raw[LEGACY] = raw.pop(MEMORY)
    (directory / "config.json").write_text(json.dumps(raw))


def test_a_moshi_hybrid_directory_in_the_old_layout_loads_identically(tmp_path: Path) -> None:
    pytest.importorskip("moshi")
    from ttt_speech.moshi import load_hybrid
    from ttt_speech.moshi.tiny import build_tiny_hybrid

    model = build_tiny_hybrid(seed=3)
    with torch.no_grad():
        for layer in model.memory_layers():
            layer.memory.gate_alpha.fill_(0.4)
    new = model.save_pretrained(tmp_path / "new")
    old = model.save_pretrained(tmp_path / "old")
    to_old_layout(old)
    assert "ttt" in json.loads((old / "config.json").read_text())
    a, b = load_hybrid(new, dtype=torch.float32), load_hybrid(old, dtype=torch.float32)
    assert a.memory_spec == b.memory_spec == model.memory_spec
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and any(".memory." in k for k in sa)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert float(sb["transformer.layers.0.memory.gate_alpha"].flatten()[0]) == pytest.approx(0.4)


def test_a_transformers_hybrid_directory_in_the_old_layout_loads_identically(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from helpers.hf import tiny_model, ttt_config
    from ttt_speech.hf import convert

    model = convert(tiny_model("llama"), layers=[1, 2], mode="hybrid", ttt=ttt_config(0.5), attention_window=8)
    model.save_pretrained(tmp_path / "new")
    model.save_pretrained(tmp_path / "old")
    to_old_layout(tmp_path / "old")
    a, _ = convert.load(tmp_path / "new", output_loading_info=True)
    b, report = convert.load(tmp_path / "old", output_loading_info=True)
    assert report.left_alone_keys == [] and report.missing_keys == []
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and "model.layers.1.self_attn.memory.W1" in sa
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.randint(3, 90, (2, 13))
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)


class Host(nn.Module):
    """A layer with a memory branch, as a trainer sees it."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.memory = nn.Linear(4, 4)


def test_a_training_checkpoint_in_the_old_layout_resumes_identically(tmp_path: Path) -> None:
    from ttt_speech.engine.checkpoint import TrainState, load_checkpoint, save_checkpoint

    def trained() -> tuple[Host, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        torch.manual_seed(0)
        host = Host()
        opt = torch.optim.AdamW(host.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        return host, opt, sched

    host, opt, sched = trained()
    for _ in range(2):
        host.memory(host.proj(torch.randn(3, 4))).square().sum().backward()
        opt.step()
        opt.zero_grad()
    path = save_checkpoint(tmp_path, TrainState(step=2), host, opt, sched, 0, 1, lambda: None, keep=2)
    sd = torch.load(path / "optimizer.pt", weights_only=False)
    assert set(sd["state"]) == {"proj.weight", "proj.bias", "memory.weight", "memory.bias"}
    save_file({legacy_name(k): v for k, v in load_file(str(path / "model.safetensors")).items()},
              str(path / "model.safetensors"))
    sd = {**sd, "state": {legacy_name(k): v for k, v in sd["state"].items()},
          "param_groups": [{**g, "params": [legacy_name(n) for n in g["params"]]} for g in sd["param_groups"]]}
    torch.save(sd, path / "optimizer.pt")
    assert "ttt.weight" in sd["state"]

    fresh, fresh_opt, fresh_sched = trained()
    state = load_checkpoint(path, fresh, fresh_opt, fresh_sched, [n for n, _ in fresh.named_parameters()], 0)
    assert state.step == 2
    for (name, p), q in zip(host.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name
        assert torch.equal(opt.state[p]["exp_avg"], fresh_opt.state[q]["exp_avg"]), name


def test_a_conversation_kept_before_the_rename_resumes_under_todays_names(tmp_path: Path) -> None:
    from ttt_speech.serve.protocol import ProtocolError
    from ttt_speech.serve.store import StateStore, fingerprint, legacy_fingerprint
    from ttt_speech.serve.streams import check_layout

    layout = {"lm.transformer.layers.0.memory.W1": ((4, 8, 8), torch.float32),
              "lm.transformer.layers.1.self_attn.kv_cache.cache": ((2, 4, 8), torch.bfloat16)}
    tensors = {legacy_name(k): torch.full(shape, 0.5, dtype=dt) for k, (shape, dt) in layout.items()}
    old_server = StateStore(tmp_path, legacy_fingerprint("m", layout))  # the old server fingerprinted old names
    token = old_server.save(tensors, {"frames": "7"})
    assert legacy_fingerprint("m", layout) != fingerprint("m", layout)
    new_server = StateStore(tmp_path, fingerprint("m", layout), legacy_fingerprint=legacy_fingerprint("m", layout))
    got, meta = new_server.take(token)
    check_layout(got, layout)
    assert meta["frames"] == "7" and got["lm.transformer.layers.0.memory.W1"].sum().item() == 0.5 * 256
    other = StateStore(tmp_path, fingerprint("m", layout), legacy_fingerprint=legacy_fingerprint("other", layout))
    with pytest.raises(ProtocolError, match="different model"):
        other.take(old_server.save(tensors, {"frames": "7"}))
    assert current_keys(tensors).keys() == layout.keys()


def test_training_configs_written_with_ttt_still_load(tmp_path: Path) -> None:
    from ttt_speech.train.config import config_from_dict, load_config

    path = tmp_path / "old.yaml"
    path.write_text("run_dir: r\nmodel: {tiny: true, branch: ttt, ttt: {gate_init: 0.5, mini_batch: 4}}\n"
                    "data: {train: [d]}\nstages: [{seq_len: 8, steps: 1, lr: 0.001}]\ntrain: {trainable: ttt}\n")
    cfg = load_config(path, ["model.ttt.gate_init=0.25"])
    assert cfg.model.memory == {"gate_init": 0.25, "mini_batch": 4} and cfg.train.trainable == "memory"
    assert load_config(path, ["model.memory.mini_batch=8"]).model.memory == {"gate_init": 0.5, "mini_batch": 8}
    new = config_from_dict({"run_dir": "r", "model": {"tiny": True, "branch": "ttt", "memory": {"gate_init": 0.5}},
                            "data": {"train": ["d"]}, "stages": [{"seq_len": 8, "steps": 1, "lr": 1e-3}]})
    assert new.model.memory == {"gate_init": 0.5} and new.train.trainable == "memory"
    unnamed = tmp_path / "unnamed.yaml"  # TTT options and no branch: TTT is no longer the default (issue 23)
    unnamed.write_text(path.read_text().replace("branch: ttt, ", ""))
    with pytest.raises(UsageError, match=r"unnamed.yaml: model.memory.gate_init is an option of model.branch: ttt/gdn, "
                                         r"not of model.branch: inplace \(the default branch since issue 23\): add "
                                         r"model.branch: ttt"):
        load_config(unnamed)
    both = tmp_path / "both.yaml"
    both.write_text(path.read_text().replace("model: {", "model: {memory: {}, "))
    with pytest.raises(UsageError, match="give model.memory or its old name model.ttt, not both"):
        load_config(both)


def test_the_converters_take_memory_and_their_old_keyword_ttt() -> None:
    pytest.importorskip("moshi")
    pytest.importorskip("transformers")
    from helpers.hf import tiny_model, ttt_config
    from ttt_speech.hf import convert as convert_hf
    from ttt_speech.moshi import convert, default_gdn_config
    from ttt_speech.moshi.layer import HybridTransformerLayer
    from ttt_speech.moshi.tiny import build_tiny_lm

    lm = build_tiny_lm(0)
    cfg = default_gdn_config(lm, gate_init=0.3)
    torch.manual_seed(1)
    new = convert(build_tiny_lm(0), "all", "hybrid", memory=cfg)
    torch.manual_seed(1)
    old = convert(build_tiny_lm(0), "all", "hybrid", ttt=cfg)
    assert new.memory_spec == old.memory_spec and new.memory_spec.branch == "gdn"
    assert all(torch.equal(a, b) for a, b in zip(new.state_dict().values(), old.state_dict().values()))
    with pytest.raises(TypeError, match="give memory= or its old name ttt=, not both"):
        convert(build_tiny_lm(0), memory=cfg, ttt=cfg)
    with pytest.raises(TypeError, match="give memory= or its old name ttt=, not both"):
        convert_hf(tiny_model("llama"), layers=[1], memory=ttt_config(), ttt=ttt_config())
    assert hasattr(convert_hf(tiny_model("llama"), layers=[1], memory=ttt_config()).model.layers[1].self_attn, "memory")
    with pytest.raises(TypeError, match="needs memory="):
        HybridTransformerLayer(d_model=32, num_heads=4, dim_feedforward=64, causal=True)


@pytest.mark.parametrize("package, old, new", [
    ("ttt_speech.moshi", "TTTLMModel", "HybridLMModel"),
    ("ttt_speech.moshi", "TTTLayerState", "HybridLayerState"),
    ("ttt_speech.moshi", "TTTTransformerLayer", "HybridTransformerLayer"),
    ("ttt_speech.hf", "TTTCache", "MemoryCache"),
    ("ttt_speech.hf", "TTTSection", "MemorySection"),
])
def test_class_names_before_the_rename_still_import_as_the_new_classes(package: str, old: str, new: str) -> None:
    pytest.importorskip(package.split(".")[1].replace("hf", "transformers"))
    module = importlib.import_module(package)
    cls = getattr(module, new)
    assert isinstance(cls, type) and cls.__name__ == new and getattr(module, old) is cls
    assert old not in module.__all__  # importable, not advertised
