"""recipes/capacity21/device.sh, the issue-21 device call, run with TINY=1 on the CPU: the rows come out in the
order that matters (vanilla, then the shortest window), a previous call's rows (PREV) are kept beside the new
ones, and the host's Opus table is written, all in $OUT/capacity21."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("moshi")
pytest.importorskip("sphn")  # the Opus lines

ROOT = Path(__file__).parents[1]


def test_the_device_call_at_tiny_shape_appends_its_rows_to_the_previous_call(tmp_path: Path) -> None:
    prev = tmp_path / "prev.json"
    earlier = {"model": "hybrid all:shared", "window": 24, "state_bytes": 1, "kv_bytes": 1, "capacity": 9,
               "note": "", "points": [{"sessions": 9, "frames": 6, "p50_ms": 5.0, "p90_ms": 6.0, "p99_ms": 7.0,
                                       "max_ms": 7.0, "peak_bytes": None, "failure": "", "probe": False}]}
    prev.write_text(json.dumps({"ramps": [earlier]}))
    out = tmp_path / "out"
    env = {**os.environ, "TINY": "1", "OUT": str(out), "PYTHON": sys.executable, "MODELS": "vanilla,6",
           "PREV": str(prev), "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(["bash", "recipes/capacity21/device.sh"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    r = out / "capacity21"
    saved = json.loads((r / "capacity.json").read_text())
    assert [(x["model"], x["window"]) for x in saved["ramps"]] == [("vanilla", 24), ("hybrid all:shared", 24),
                                                                    ("hybrid all:shared", 6)]
    assert saved["ramps"][1] == earlier  # kept as the previous call measured it
    assert all(x["points"] for x in saved["ramps"]) and saved["not_run"] == []  # (real CPU step times: not asserted)
    assert "--append" in saved["command"] and "--row-seconds 180,300" in saved["command"]
    log = (r / "log.txt").read_text()
    assert "serve_capacity rc=0" in log and "opus_pool rc=0" in log
    assert "| opus workers | sessions |" in (r / "opus_pool.md").read_text()
    assert (r / "capacity.png").read_bytes()[:4] == b"\x89PNG"
