"""recipes/evidence24/tok24.py's pack plumbing for tokens encoded in parallel parts: PART=i/n takes every n-th
recording, merge joins disjoint parts into the pack that unpack reads, and refuses parts that overlap."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

TOK24 = Path(__file__).parents[1] / "recipes" / "evidence24" / "tok24.py"


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    src = str(Path(__file__).parents[1] / "src")
    return subprocess.run([sys.executable, str(TOK24), *args], capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": src} | env)


def part(root: Path, name: str, keys: dict[str, list[str]]) -> Path:
    """A pack holding [9, frames] int16 rows per recording key (frames = a number derived from the key)."""
    d = root / name
    d.mkdir()
    save_file({"silence": np.zeros((8, 40), np.int16)}, str(d / "silence.safetensors"))
    for split, names in keys.items():
        save_file({k: np.full((9, 3 + len(k)), len(k), np.int16) for k in names}, str(d / f"{split}.safetensors"))
    return d


def test_merge_joins_disjoint_parts_and_unpack_reads_the_result(tmp_path: Path) -> None:
    a = part(tmp_path, "a", {"train": ["kjv/r0.wav", "kjv/r2.wav"], "val": ["kjv/r4.wav"]})
    b = part(tmp_path, "b", {"train": ["kjv/r1.wav"], "val": ["jargon/r0.wav", "devil/r0.wav"]})
    out = run("merge", str(tmp_path / "pack"), str(a), str(b))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["train 3 recordings 39 frames", "val 3 recordings 44 frames"]
    train = load_file(str(tmp_path / "pack" / "train.safetensors"))
    assert sorted(train) == ["kjv/r0.wav", "kjv/r1.wav", "kjv/r2.wav"] and train["kjv/r1.wav"].shape == (9, 13)
    out = run("unpack", str(tmp_path / "pack"), str(tmp_path / "tok"))
    assert out.returncode == 0, out.stderr
    assert "train 3 documents 39 frames" in out.stdout and (tmp_path / "tok" / "val" / "index.json").exists()


def test_merge_refuses_a_recording_in_two_parts(tmp_path: Path) -> None:
    a = part(tmp_path, "a", {"train": ["kjv/r0.wav"], "val": []})
    b = part(tmp_path, "b", {"train": ["kjv/r0.wav", "kjv/r1.wav"], "val": []})
    out = run("merge", str(tmp_path / "pack"), str(a), str(b))
    assert out.returncode != 0 and "recordings ['kjv/r0.wav'] are in another part" in out.stderr


def load_tok24():
    spec = importlib.util.spec_from_file_location("tok24", TOK24)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("spec, picked", [("0/1", [0, 1, 2, 3, 4]), ("0/2", [0, 2, 4]), ("1/2", [1, 3]),
                                          ("2/3", [2])])
def test_part_takes_every_nth_recording(spec: str, picked: list[int]) -> None:
    assert load_tok24().part_of(list(range(5)), spec) == picked


@pytest.mark.parametrize("spec", ["2/2", "1", "a/b", "-1/2"])
def test_a_bad_part_says_how_to_write_it(spec: str) -> None:
    with pytest.raises(SystemExit, match=f"PART={spec}: give i/n with 0 <= i < n"):
        load_tok24().part_of([1, 2], spec)
