"""recipes/evidence24/probe_arms.sh: probe-memory on every arm export of a directory, one table, on tiny exports
of the real formats (a plain Moshi for arm_d, converted hybrids for the memory arms)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("moshi")

from ttt_speech.eval.data import save_sequence  # noqa: E402

RECIPE = Path(__file__).parents[1] / "recipes" / "evidence24" / "probe_arms.sh"
BRANCHES = {"b": ("inplace", {"chunk": 8, "target_init_std": 0.5, "base_lr": 30.0}),
            "a": ("ttt", {"variant": "ttt-lm", "gate_init": 0.1, "use_rope": False, "mini_batch": 8}),
            "c": ("gdn", {"gate_init": 0.1})}


def arm_exports(root: Path) -> Path:
    """root/arm_{b,a,c}/export as the trainer exports them and arm_d's plain model in root/arm_d itself (as
    carried back from the device), from one tiny Moshi (attention window 8)."""
    from ttt_speech.moshi import convert
    from ttt_speech.moshi.config import infer_moshi_config
    from ttt_speech.moshi.convert import default_branch_config
    from ttt_speech.moshi.files import save_moshi_checkpoint
    from ttt_speech.moshi.tiny import build_tiny_lm

    save_moshi_checkpoint(build_tiny_lm(0), infer_moshi_config(build_tiny_lm(0)), root / "arm_d")  # carried alone
    for arm, (branch, overrides) in BRANCHES.items():
        lm = build_tiny_lm(0)
        torch.manual_seed(0)
        convert(lm, layers="all", ttt=default_branch_config(lm, "hybrid", branch, **overrides)).save_pretrained(
            root / f"arm_{arm}" / "export")
    lm = build_tiny_lm(0)
    g = torch.Generator().manual_seed(1)
    for i in range(2):
        save_sequence(root / "val" / f"s{i}.npy", torch.cat([torch.randint(0, lm.text_card, (1, 700), generator=g),
                      torch.randint(0, lm.card, (lm.num_audio_codebooks, 700), generator=g)]))
    return root


def test_probe_arms_writes_one_table_for_every_arm(tmp_path) -> None:
    root = arm_exports(tmp_path)
    env = os.environ | {"ARMS": str(root), "VAL": str(root / "val"), "SPAN": "8", "CONTEXT": "4", "EXCERPTS": "2",
                        "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(RECIPE)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    table = (root / "probe" / "probe_arms.md").read_text()
    lines = {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| arm_")}
    assert list(lines) == ["| arm_d", "| arm_b", "| arm_a", "| arm_c"]  # the order, every arm
    assert "no memory layers" in lines["| arm_d"]
    for arm, design in (("b", "in-place"), ("a", "TTT ttt-lm"), ("c", "Gated DeltaNet")):
        assert f"| arm_{arm} | {design} | 8, 32, 80, 320 |" in lines[f"| arm_{arm}"]  # 1/4/10/40 x the 8-frame window
        assert lines[f"| arm_{arm}"].endswith((" yes |", " no |"))
    rows = json.loads((root / "probe" / "probe_arms.json").read_text())
    assert rows["arm_d"] is None and {r["windows"] for r in rows["arm_c"]} == {1, 4, 10, 40}
    assert len(rows["arm_a"]) == 4 * (2 + 1)  # per gap: the tiny Moshi's 2 layers and their mean
    ten = {arm: next(r for r in rows[arm] if r["layer"] is None and r["windows"] == 10)
           for arm in ("arm_b", "arm_a", "arm_c")}
    # at 10x the window the opened in-place memory keeps the span (measured -18.1 % [-29.0, -10.8]), the random
    # TTT and GDN branches nothing (-0.2 % [-1.0, +0.6] and -0.2 % [-0.3, -0.1])
    assert ten["arm_b"]["change"] < -0.1 and ten["arm_b"]["high"] < 0
    assert abs(ten["arm_a"]["change"]) < 0.02 and abs(ten["arm_c"]["change"]) < 0.02
    assert (root / "probe" / "probe_arms.png").read_bytes()[:4] == b"\x89PNG"


def test_probe_arms_names_a_directory_without_arms(tmp_path) -> None:
    env = os.environ | {"ARMS": str(tmp_path), "VAL": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(RECIPE)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and done.stderr.strip().endswith(
        "no arm_d, arm_b, arm_a or arm_c with an export/ directory (or a config.json of its own)"), done.stderr
