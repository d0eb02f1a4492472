"""TTTState files: round trip, and every kind of wrong file named in its error."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from ttt_speech import TTTConfig, TTTState


def stepped_state(cfg: TTTConfig):
    torch.manual_seed(0)
    layer = cfg.build()
    _, state = layer(torch.randn(2, 7, cfg.dim))
    return layer, state


def test_save_load_round_trip_continues_identically(tmp_path):
    cfg = TTTConfig(dim=16, num_heads=2, mini_batch=4, gate_init=0.5, share_qk=True)
    layer, state = stepped_state(cfg)
    state.save(tmp_path / "conv.safetensors")
    loaded = TTTState.load(tmp_path / "conv.safetensors", config=cfg)
    x = torch.randn(2, 5, 16)
    y1, s1 = layer(x, state)
    y2, s2 = layer(x, loaded)
    assert torch.equal(y1, y2) and all(torch.equal(s1[k], s2[k]) for k in s1)
    layer.reset_state(loaded, torch.tensor([True, False]))  # a loaded state can be rebound for resets
    assert loaded.offset.tolist() == [0, 3]


def test_state_moves_between_devices_and_keeps_size():
    _, state = stepped_state(TTTConfig(dim=16, num_heads=2))
    moved = state.to("meta")
    assert moved.device.type == "meta" and moved.nbytes == state.nbytes


def _rewrite(path, out, tensors=None, **meta_changes):
    tensors = load_file(str(path)) if tensors is None else tensors
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    meta.update(meta_changes)
    save_file(tensors, str(out), metadata=meta)
    return out


def test_wrong_files_are_named(tmp_path):
    cfg = TTTConfig(dim=16, num_heads=2, mini_batch=4)
    _, state = stepped_state(cfg)
    good = tmp_path / "s.safetensors"
    state.save(good)
    with pytest.raises(ValueError, match="state version '99'"):
        TTTState.load(_rewrite(good, tmp_path / "v.st", version="99"))
    with pytest.raises(ValueError, match="not a ttt-speech state file"):
        TTTState.load(_rewrite(good, tmp_path / "f.st", format="other"))
    t = load_file(str(good))
    t["W1"] = t["W1"][:, :, :4].contiguous()
    with pytest.raises(ValueError, match=r"'W1' expected shape \(2, 2, 8, 8\), got \(2, 2, 4, 8\)"):
        TTTState.load(_rewrite(good, tmp_path / "s.st", tensors=t))
    t = load_file(str(good))
    t["grad_b1"] = t["grad_b1"].half()
    with pytest.raises(TypeError, match="'grad_b1' expected dtype torch.float32, got torch.float16"):
        TTTState.load(_rewrite(good, tmp_path / "d.st", tensors=t))
    other = TTTConfig(dim=16, num_heads=2, mini_batch=8)
    with pytest.raises(ValueError, match=r"another config.*'mini_batch': \(4, 8\)"):
        TTTState.load(good, config=other)
    bad_cfg = dict(json.loads(json.dumps(cfg.to_dict())), inner="mlp")
    with pytest.raises(ValueError, match="expected tensors"):
        TTTState.load(_rewrite(good, tmp_path / "c.st", config=json.dumps(bad_cfg)))
