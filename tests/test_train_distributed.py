"""torchrun with 2 CPU processes over gloo (DDP and FSDP2 fully_shard) == 1 process with the same global
batch: the same loss at every step, the same validation loss and the same trained weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("moshi")
pytestmark = pytest.mark.slow  # 2 gloo processes per test: 20-30 s on a shared 2-core CPU

from helpers.train import ROOT, env, tiny_config  # noqa: E402

from ttt_speech.engine.checkpoint import latest_checkpoint, load_trainable  # noqa: E402
from ttt_speech.train.config import config_from_dict  # noqa: E402
from ttt_speech.train.loop import build_segment_lm  # noqa: E402
from ttt_speech.engine.metrics import read_metrics  # noqa: E402


def run(tmp: Path, name: str, procs: int, parallel: str) -> Path:
    cfg = tiny_config(tmp, **{"train.batch_size": 4, "train.parallel": parallel, "data.val_fraction": 0.34,
                              "train.grad_checkpointing": parallel == "fsdp",
                              "stages": [{"seq_len": 24, "steps": 3, "lr": 3e-3}]})
    cfg["run_dir"] = str(tmp / name)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"] if procs > 1 else []
    done = subprocess.run([sys.executable, *launcher, "-m", "ttt_speech.train", str(path)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return tmp / name


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run(tmp_path_factory.mktemp("dist"), "single", 1, "none")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path: Path, single: Path, parallel: str) -> None:
    two = run(tmp_path, parallel, 2, parallel)
    a, b = read_metrics(single), read_metrics(two)
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b] == [
        (1, "train"), (2, "train"), (3, "train"), (3, "val")]
    for ra, rb in zip(a, b):
        for key in ("loss", "loss_text", "loss_audio"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra["step"], key)
    assert a[1]["loss"] != pytest.approx(a[0]["loss"], abs=1e-4)  # the steps do train (different batches, weights)
    wa, wb = load_trainable(latest_checkpoint(single)), load_trainable(latest_checkpoint(two))
    fresh = build_segment_lm(config_from_dict(tiny_config(tmp_path)), torch.device("cpu"), torch.float32)
    init = {n: p.detach() for n, p in fresh.named_parameters() if p.requires_grad}
    assert wa.keys() == wb.keys() == init.keys()  # the TTT parameters of both layers
    assert max((wa[k] - init[k]).abs().max() for k in wa) > 1e-3  # they trained
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6), k
    assert (two / "export" / "model.safetensors").exists()
