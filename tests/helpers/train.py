"""Tiny trainer configs on random tiny-Moshi documents, and the environment of a trainer subprocess."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[2]


def env() -> dict[str, str]:
    """A subprocess that runs this checkout's code, one thread, no compiling."""
    return os.environ | {"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "NO_TORCH_COMPILE": "1"}


def write_codes(root: Path, docs: int = 6, length: int = 80, seed: int = 0) -> Path:
    """Random tiny-Moshi documents [5, length] (text 0..63, audio 0..31) in two shards."""
    root.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(seed)
    arrays = {}
    for i in range(docs):
        a = g.integers(0, 32, (5, length)).astype(np.int16)
        a[0] = g.integers(0, 64, length)
        arrays[f"doc{i}"] = a
    keys = sorted(arrays)
    save_file({k: arrays[k] for k in keys[: docs // 2]}, str(root / "a.safetensors"))
    save_file({k: arrays[k] for k in keys[docs // 2:]}, str(root / "b.safetensors"))
    return root


def tiny_config(tmp: Path, **over: object) -> dict:
    cfg = {
        "run_dir": str(tmp / "run"),
        "model": {"family": "moshi", "tiny": True, "branch": "ttt", "memory": {"gate_init": 0.5, "mini_batch": 4}},
        "data": {"train": [str(write_codes(tmp / "data"))]},
        "train": {"batch_size": 2, "segment_len": 12, "device": "cpu"},  # exact comparisons: fp32, not CUDA's bf16
        "stages": [{"seq_len": 24, "steps": 4, "lr": 1e-3, "warmup": 0.25}, {"seq_len": 40, "steps": 3, "lr": 5e-4}],
        "checkpoint": {"every": 3, "keep": 2},
        "log": {"progress": False},
    }
    for key, value in over.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return cfg
