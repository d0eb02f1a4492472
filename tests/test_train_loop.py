"""The trainer in one process: stages, schedule, metrics, checkpoints, export, what trains, plots, config."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.numpy import save_file

pytest.importorskip("moshi")

from helpers.train import tiny_config  # noqa: E402
from ttt_speech.moshi import load_hybrid  # noqa: E402
from ttt_speech.engine.checkpoint import load_trainable  # noqa: E402
from ttt_speech.train.commands import main as train_main  # noqa: E402
from ttt_speech.train.config import Stage, config_from_dict, load_config  # noqa: E402
from ttt_speech.engine.skips import BadInputError  # noqa: E402
from ttt_speech.engine.loop import lr_at  # noqa: E402
from ttt_speech.train.loop import Trainer  # noqa: E402
from ttt_speech.engine.metrics import read_metrics  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_run_through_stages_writes_metrics_checkpoints_and_a_loadable_export(tmp_path: Path) -> None:
    cfg = config_from_dict(tiny_config(tmp_path, **{"data.val_fraction": 0.5}))
    trainer = Trainer(cfg)
    result = trainer.run()
    assert result.finished and result.state.step == 7 and result.state.stage == 2
    records = read_metrics(cfg.run_dir)
    train = [r for r in records if r["split"] == "train"]
    assert [(r["step"], r["stage"], r["seq_len"]) for r in train] == [
        (1, 0, 24), (2, 0, 24), (3, 0, 24), (4, 0, 24), (5, 1, 40), (6, 1, 40), (7, 1, 40)]
    assert [r["lr"] for r in train] == pytest.approx([lr_at(cfg.stages, s) for s in range(7)])
    assert all(r["tokens"] == 2 * r["seq_len"] and r["tokens_per_s"] > 0 for r in train)
    assert all(math.isfinite(r["loss"]) and r["loss"] == pytest.approx(r["loss_text"] + r["loss_audio"]) for r in train)
    assert [(r["step"], r["stage"]) for r in records if r["split"] == "val"] == [(4, 0), (7, 1)]

    ckpts = sorted(p.name for p in (Path(cfg.run_dir) / "checkpoints").iterdir())
    assert ckpts == ["step_00000006", "step_00000007"]  # keep=2 (3, 4 = end of stage 0, 6, 7 = the end)
    state = json.loads((Path(cfg.run_dir) / "checkpoints/step_00000007/state.json").read_text())
    assert state == {"step": 7, "stage": 2, "stage_step": 0, "samples": 0, "world_size": 1}

    exported = load_hybrid(result.export, dtype=torch.float32)
    trained = dict(trainer.seg.model.named_parameters())
    saved = load_trainable(result.checkpoint)
    assert set(saved) == {f"model.{n}" for n, p in trained.items() if ".memory." in f".{n}"}
    for name, p in exported.named_parameters():
        assert torch.equal(p, trained[name].float()), name


@pytest.mark.parametrize("what", ["memory", "lora", "all"])
def test_what_trains(tmp_path: Path, what: str) -> None:
    cfg = config_from_dict(tiny_config(tmp_path, **{"train.trainable": what, "train.lora": {"rank": 4, "scaling": 2.0},
                                                    "stages": [{"seq_len": 24, "steps": 2, "lr": 1e-2}]}))
    trainer = Trainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.seg.named_parameters()}
    result = trainer.run()
    changed = {n for n, p in trainer.seg.named_parameters() if not torch.equal(p, before[n])}
    ttt = {n for n in before if ".memory." in n}
    lora = {n for n in before if ".lora_" in n}
    if what == "memory":
        assert changed == ttt and not lora
    elif what == "lora":
        assert len(lora) == 2 * 2 * 4  # 2 layers x (in/out projection + 2 gating linears) x (A, B)
        assert {n for n in changed if ".lora_b." in n} == {n for n in lora if ".lora_b." in n}
        assert changed <= ttt | lora and ttt <= changed
    else:
        assert "model.text_emb.weight" in changed and "model.depformer.layers.0.norm1.alpha" in changed
    # the export (LoRA merged into plain linears) computes what the trained model computes
    exported = load_hybrid(result.export, dtype=torch.float32)
    codes = trainer.train_data.sample(0, 24, 0)[None]
    with torch.no_grad():
        ref = trainer.seg.model(codes)
        out = exported(codes)
    assert (out.text_logits - ref.text_logits)[ref.text_mask[..., None].expand_as(ref.text_logits)].abs().max() < 1e-5


def test_memory_lr_scale_moves_the_memory_branch_that_much_faster(tmp_path: Path) -> None:
    # Adam's first step moves each weight by ~lr (g / |g|): memory weights by lr x scale, the host's by lr
    cfg = config_from_dict(tiny_config(tmp_path, **{"train.trainable": "all", "train.memory_lr_scale": 10.0,
                                                    "train.weight_decay": 0.0,
                                                    "stages": [{"seq_len": 24, "steps": 1, "lr": 1e-4, "warmup": 0.0}]}))
    trainer = Trainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.seg.named_parameters()}
    trainer.run()
    moved = {n: (p.detach() - before[n]).abs() for n, p in trainer.seg.named_parameters()}
    memory = torch.cat([d[d > 0] for n, d in moved.items() if ".memory." in n])
    host = torch.cat([d[d > 0] for n, d in moved.items() if ".memory." not in n])
    assert abs(memory.median().item() / 1e-3 - 1) < 0.05 and abs(host.median().item() / 1e-4 - 1) < 0.05
    with pytest.raises(ValueError, match="memory_lr_scale"):
        config_from_dict(tiny_config(tmp_path, **{"train.memory_lr_scale": 0.0}))


def test_a_transformers_hybrid_trains_on_flat_token_streams(tmp_path: Path) -> None:
    pytest.importorskip("transformers", minversion="5.23")  # pyproject's hf extra
    from ttt_speech.hf import convert

    (tmp_path / "tokens").mkdir()
    for i in range(3):
        np.save(tmp_path / "tokens" / f"doc{i}.npy", np.random.default_rng(i).integers(0, 64, 50))
    cfg = config_from_dict({
        "run_dir": str(tmp_path / "run"), "model": {"family": "hf", "tiny": True, "layers": [1], "branch": "ttt",
                                     "memory": {"mini_batch": 4}},
        "data": {"train": [str(tmp_path / "tokens")]}, "train": {"batch_size": 2, "segment_len": 10, "device": "cpu"},
        "stages": [{"seq_len": 25, "steps": 3, "lr": 1e-2}], "log": {"progress": False}})
    trainer = Trainer(cfg)
    result = trainer.run()
    losses = [r["loss_tokens"] for r in read_metrics(cfg.run_dir)]
    assert len(losses) == 3 and 3.5 < losses[0] < 4.7  # ~log(64) at the start
    exported = convert.load(result.export)
    trained = dict(trainer.seg.model.named_parameters())
    for name, p in exported.named_parameters():
        assert torch.equal(p, trained[name]), name
    assert any(".memory." in n for n, _ in exported.named_parameters())


def test_segmented_and_whole_sequences_give_the_same_first_loss(tmp_path: Path) -> None:
    losses = []
    for segment in (None, 5):
        cfg = config_from_dict(tiny_config(tmp_path / str(segment), **{
            "train.segment_len": segment, "stages": [{"seq_len": 40, "steps": 1, "lr": 1e-3}]}))
        Trainer(cfg).run()
        losses.append(read_metrics(cfg.run_dir)[0]["loss"])
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_a_stage_no_longer_than_the_window_warns(tmp_path: Path) -> None:
    cfg = config_from_dict(tiny_config(tmp_path, stages=[{"seq_len": 8, "steps": 1, "lr": 1e-3}]))
    with pytest.warns(UserWarning, match=r"sequences of 8 steps are no longer than the attention window \(8\)"):
        Trainer(cfg).run()


@pytest.mark.parametrize("variant", ["fla", "ttt-lm"])
def test_segments_off_the_kernel_mini_batch_grid_warn(tmp_path: Path, variant: str) -> None:
    cfg = tiny_config(tmp_path, stages=[{"seq_len": 24, "steps": 1, "lr": 1e-3}])
    cfg["model"]["memory"]["variant"] = variant
    cfg["train"]["segment_len"] = 6
    with pytest.warns(UserWarning, match=r"segments of 6 steps are not a multiple of the TTT mini-batch \(4\)"):
        Trainer(config_from_dict(cfg)).run()
    cfg["train"]["segment_len"] = 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Trainer(config_from_dict(cfg | {"run_dir": str(tmp_path / "aligned")})).run()


def test_empty_shard_stops_the_run_naming_it_or_is_skipped_and_counted(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, stages=[{"seq_len": 24, "steps": 1, "lr": 1e-3}])
    save_file({}, str(tmp_path / "data" / "empty.safetensors"))
    with pytest.raises(BadInputError, match=r"empty.safetensors: empty shard"):
        Trainer(config_from_dict(cfg))
    cfg["data"]["skip_bad"] = True
    assert Trainer(config_from_dict(cfg)).run().skipped == 1


def test_a_stage_longer_than_every_document_fails_before_step_one(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, stages=[{"seq_len": 24, "steps": 1, "lr": 1e-3}, {"seq_len": 400, "steps": 1, "lr": 1e-3}])
    with pytest.raises(BadInputError, match=r"stage 1, .*no sequence of 400 steps: every document is shorter than 0.25"):
        Trainer(config_from_dict(cfg))  # documents have 80 frames


def test_lr_schedule_warms_up_then_follows_a_cosine_per_stage() -> None:
    stages = [Stage(seq_len=8, steps=10, lr=1.0, warmup=0.2, min_lr_ratio=0.1), Stage(seq_len=16, steps=4, lr=0.5)]
    lrs = [lr_at(stages, s) for s in range(14)]
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])  # 2 warmup steps, then the cosine starts at lr
    assert lrs[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert lrs[10] == pytest.approx(0.5)  # stage 2: warmup of ceil(0.05 * 4) = 1 step
    assert lrs[13] == pytest.approx(0.05 + 0.45 * 0.5 * (1 + math.cos(math.pi * 2 / 3)))


def test_config_files_parse_and_typos_are_errors(tmp_path: Path) -> None:
    for path in sorted(set(CONFIGS.glob("*.yaml")) - set(CONFIGS.glob("codec_*.yaml"))):  # codec: its own loader
        cfg = load_config(path)
        assert cfg.stages and cfg.total_steps > 0, path
    moshi = load_config(CONFIGS / "moshi_long.yaml", ["train.batch_size=4", "stages=[{seq_len: 100, steps: 2, lr: 1}]"])
    assert moshi.train.batch_size == 4 and moshi.stages == [Stage(100, 2, 1.0)]
    assert [s.seq_len for s in load_config(CONFIGS / "moshi_long.yaml").stages] == [8192, 16384, 32768, 65536]
    # moshi_long shows the default branch (in-place, named nowhere in it); the configs with TTT options name ttt
    assert "branch" not in yaml.safe_load((CONFIGS / "moshi_long.yaml").read_text())["model"]
    assert (moshi.model.branch, moshi.model.memory, moshi.model.layers) == ("inplace", {"chunk": 64}, [28, 29, 30, 31])
    assert {p.name: load_config(p).model.branch for p in CONFIGS.glob("*.yaml") if "memory:" in p.read_text()
            and not p.name.startswith("codec_")} == {"moshi_long.yaml": "inplace", "tiny_recall.yaml": "ttt",
                                                    "hf_long.yaml": "ttt", "small_moshi_convert.yaml": "ttt"}
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS / "tiny_recall.yaml").read_text().replace("batch_size", "batch_sise"))
    with pytest.raises(ValueError, match=r"train: unknown keys \['batch_sise'\]"):
        load_config(bad)
    with pytest.raises(ValueError, match="train.trainable: must be one of"):
        load_config(CONFIGS / "tiny_recall.yaml", ["train.trainable=everything"])


def test_plot_run_writes_one_png_per_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config_from_dict(tiny_config(tmp_path))
    Trainer(cfg).run()
    assert train_main(["plot-run", cfg.run_dir]) == 0
    printed = capsys.readouterr().out.split()
    assert [Path(p).name for p in printed] == ["loss.png", "loss_stage0.png", "loss_stage1.png"]
    assert all(Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(p).stat().st_size > 5000 for p in printed)
