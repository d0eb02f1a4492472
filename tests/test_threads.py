"""CPU thread defaults: one thread unless asked (a flag, then OMP_NUM_THREADS), torch's own on CUDA machines;
and the recall demo's data command writes exactly the files configs/tiny_recall.yaml trains on."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.numpy import load_file

from ttt_speech.threads import add_threads_argument, cpu_threads, use_cpu_threads
from ttt_speech.train import synthetic

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("requested,env,cuda,expected", [
    (3, "2", False, 3),       # the flag wins
    (None, "2", True, 2),     # then the environment, CUDA or not
    (None, None, False, 1),   # then one thread on a CPU machine
    (None, "0", False, 1),    # an unusable OMP_NUM_THREADS counts as unset
    (None, "x", False, 1),
    (None, None, True, None),  # torch's own default where CUDA does the work
])
def test_thread_count_precedence(monkeypatch, requested, env, cuda, expected) -> None:
    if env is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", env)
    assert cpu_threads(requested, cuda) == expected


def test_the_flag_sets_torch_threads_and_refuses_zero() -> None:
    p = argparse.ArgumentParser()
    add_threads_argument(p)
    before = torch.get_num_threads()
    try:
        assert use_cpu_threads(p.parse_args(["--threads", "2"]).threads) == 2 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    with pytest.raises(SystemExit):
        p.parse_args(["--threads", "0"])


def test_recall_data_command_writes_what_tiny_recall_trains_on(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    synthetic.main(["--train", "5", "--val", "3"])
    data = yaml.safe_load((CONFIGS / "tiny_recall.yaml").read_text())["data"]
    for key, count in (("train", 5), ("eval", 3)):
        (path,) = data[key]
        shards = load_file(path)
        assert len(shards) == count
        assert all(a.shape == (5, synthetic.RecallTask().length) for a in shards.values())
