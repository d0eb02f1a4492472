"""Nothing lost: a run killed with SIGKILL (or stopped by SIGTERM) and restarted gives the loss curve of a
run that was never interrupted, step for step (CPU, same process settings)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("moshi")
pytestmark = pytest.mark.slow  # trainer subprocesses killed and restarted: 30 s on a shared 2-core CPU

from helpers.train import ROOT, env, tiny_config  # noqa: E402

from ttt_speech.engine.checkpoint import latest_checkpoint  # noqa: E402
from ttt_speech.engine.commands import EXIT_INTERRUPTED  # noqa: E402
from ttt_speech.engine.metrics import read_metrics  # noqa: E402

STEPS = 30  # two stages of 15


def write_config(tmp: Path, name: str) -> Path:
    cfg = tiny_config(tmp, stages=[{"seq_len": 24, "steps": 15, "lr": 1e-3}, {"seq_len": 40, "steps": 15, "lr": 5e-4}],
                      checkpoint={"every": 5, "keep": 2})
    cfg["run_dir"] = str(tmp / name)
    cfg["log"]["progress"] = True
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start(config: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ttt_speech.train", str(config)], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(config: Path) -> str:
    done = subprocess.run([sys.executable, "-m", "ttt_speech.train", str(config)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stderr


def interrupt_after_first_checkpoint(config: Path, run_dir: Path, sig: int, steps_after: int = 0) -> subprocess.Popen:
    """Send `sig` once the first checkpoint exists and `steps_after` more steps are logged (then lost)."""
    proc = start(config)
    deadline = time.time() + 120
    while (ckpt := latest_checkpoint(run_dir)) is None or len(train_losses(run_dir)) < int(ckpt.name[5:]) + steps_after:
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(sig)
    proc.communicate(timeout=120)
    return proc


def train_losses(run_dir: Path) -> list[tuple[int, int, float]]:
    if not (run_dir / "metrics.jsonl").exists():
        return []
    return [(r["step"], r["stage"], r["loss"]) for r in read_metrics(run_dir) if r["split"] == "train"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[int, int, float]]:
    tmp = tmp_path_factory.mktemp("resume")
    finish(write_config(tmp, "whole"))
    losses = train_losses(tmp / "whole")
    assert len(losses) == STEPS
    return losses


def test_sigkill_then_restart_gives_the_uninterrupted_loss_curve(tmp_path: Path, uninterrupted: list) -> None:
    config = write_config(tmp_path, "killed")
    proc = interrupt_after_first_checkpoint(config, tmp_path / "killed", signal.SIGKILL, steps_after=2)
    assert proc.returncode == -signal.SIGKILL
    resumed_from = json.loads((latest_checkpoint(tmp_path / "killed") / "state.json").read_text())["step"]
    assert 5 <= resumed_from < len(train_losses(tmp_path / "killed")) < STEPS  # killed mid-run, 2+ steps lost
    log = finish(config)
    assert f"resumed from {latest_checkpoint(tmp_path / 'killed').parent}/step_{resumed_from:08d}" in log
    assert train_losses(tmp_path / "killed") == uninterrupted  # every step, bit for bit


def test_sigterm_checkpoints_the_current_step_and_resumes(tmp_path: Path, uninterrupted: list) -> None:
    config = write_config(tmp_path, "termed")
    proc = interrupt_after_first_checkpoint(config, tmp_path / "termed", signal.SIGTERM)
    assert proc.returncode == EXIT_INTERRUPTED
    state = json.loads((latest_checkpoint(tmp_path / "termed") / "state.json").read_text())
    logged = train_losses(tmp_path / "termed")
    assert state["step"] == logged[-1][0] < STEPS  # saved where it stopped, not at the last multiple of 5
    assert state["stage"] == logged[-1][1] + (state["stage_step"] == 0)
    log = finish(config)
    assert train_losses(tmp_path / "termed") == uninterrupted
    # the progress bar: steps done/total [elapsed<ETA, rate, loss, tokens/s]
    assert re.search(r"30/30 \[\d\d:\d\d<00:00, .*step/s, loss=\d+\.\d+, stage=1, tok_s=[\d,]+\]", log), log[-500:]


def test_resuming_with_another_memory_branch_is_one_line_naming_the_started_one(tmp_path: Path) -> None:
    from ttt_speech.errors import UsageError
    from ttt_speech.train.config import config_from_dict
    from ttt_speech.train.loop import Trainer

    one_step = {"stages": [{"seq_len": 24, "steps": 1, "lr": 1e-3}], "checkpoint": {"every": 1, "keep": 1}}
    Trainer(config_from_dict(tiny_config(tmp_path, **one_step))).run()  # started as a TTT hybrid
    assert latest_checkpoint(tmp_path / "run") is not None
    default = tiny_config(tmp_path, **one_step)
    default["model"] = {"family": "moshi", "tiny": True}  # an old config naming no branch: now in-place
    with pytest.raises(UsageError, match=r"started with model.branch ttt, this config builds inplace.*--set model.branch=ttt"):
        Trainer(config_from_dict(default))
