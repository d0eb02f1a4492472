"""recipes/quant21/device.sh, the issue-21 int8 device call, with TINY=1 on the CPU: its default rows come out in the
order that matters (bf16, our Triton int8 refused on the CPU, int8 compiled, int8pack, w8a8, int4 refused, at both
batches), refused modes are rows too, a row whose failure
would poison its process (the H200's failed CUDA graph capture) or kills it does not stop the rows after it,
and a cut-off run (benchmarks/quantize.py's SIGINT and time budget) still prints what it finished and names
what it did not."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("moshi")
if importlib.util.find_spec("torchao") is None:
    pytest.skip('torchao not installed: pip install -e ".[quant]"', allow_module_level=True)

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "benchmarks"),
                                                    os.environ.get("PYTHONPATH", "")]),
       "NO_TORCH_COMPILE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
BENCH = [sys.executable, "benchmarks/quantize.py", "--tiny", "--backend", "aot_eager"]


def table(text: str) -> list[list[str]]:
    """The body rows of the printed markdown table, cells stripped."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and not line.startswith("| model")]


def test_the_device_call_at_tiny_shape_runs_its_default_rows_in_order(tmp_path: Path) -> None:
    env = {**ENV, "TINY": "1", "OUT": str(tmp_path), "PYTHON": sys.executable, "PROFILE": "2"}
    done = subprocess.run(["bash", "recipes/quant21/device.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    r = tmp_path / "quant21"
    log = (r / "log.txt").read_text()
    assert "step_kernels batch 2 rc=0" in log and "quantize rc=0" in log and "gpu checks rc=0" in log
    profile = (r / "step_kernels_2.md").read_text()  # the step's top ops, unquantized and int8 side by side
    assert "| kernel | none µs/step (launches) | int8 µs/step (launches) |" in profile and "| **all** |" in profile
    assert "2 round(s)" in profile and profile.count("| int8 | ") == 1  # the modes alternated, one wall row each
    checks = (r / "gpu_checks.log").read_text()
    assert "SKIPPED [1] tests/test_quantize.py" in checks and "passed" not in checks  # no CUDA here
    rows = table((r / "quantize.md").read_text())
    assert [(c[0], c[1]) for c in rows] == [
        ("hybrid float32", "1"), ("hybrid float32", "3"), ("hybrid int8triton", ""), ("hybrid int8 compiled", "1"),
        ("hybrid int8 compiled", "3"), ("hybrid int8pack", "1"), ("hybrid int8pack", "3"), ("hybrid int8pack", "logits"),
        ("hybrid w8a8", "1"), ("hybrid w8a8", "3"), ("hybrid w8a8", "logits"),
        ("hybrid int4 compiled", "")]  # compiled rows: no logit pass (--logits eager)
    assert [c[3] for c in rows[:2]] == ["1.000", "1.000"]  # bf16 is its own reference at each batch
    assert all(float(c[3]) > 0 for c in rows[3:7] + rows[8:10])
    # refused on the CPU (without triton, or with it but no CUDA), one line each; the rows after them still run
    assert rows[2][2].startswith("failed: ValueError: int8triton needs")
    assert rows[11][2].startswith("failed: ValueError: int4 needs bfloat16 weights on CUDA")
    max_abs, rel, same = map(float, rows[7][-3:])  # tiny int8: ~0.085, ~1.7 %, ~98 % (tests/test_quantize.py)
    assert 0 < max_abs < 0.25 and 0 < rel < 0.04 and same > 0.9


def test_a_run_cut_by_sigint_keeps_its_finished_rows_and_names_the_rest() -> None:
    # 600 frames per batch (~2.5 s on the CPU): the SIGINT, sent when int8's batch-1 row is out, lands in its batch 3
    # SIGINT's default restored in the run: a suite started as a background job (`pytest &`) ignores it, and so
    # would every process it starts
    run = subprocess.Popen([*BENCH, "--rows", "bf16,int8,w8a8", "--batches", "1,3", "--frames", "600", "--window", "2"],
                           cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert run.stdout is not None
    lines = []
    for line in run.stdout:
        lines.append(line)
        if line.startswith("| hybrid int8 | 1 |"):
            run.send_signal(signal.SIGINT)
            break
    out = "".join(lines) + run.stdout.read()
    assert run.wait(timeout=60) == 0, out
    assert [(c[0], c[1]) for c in table(out)] == [("hybrid float32", "1"), ("hybrid float32", "3"), ("hybrid int8", "1")]
    assert "cut by SIGINT after" in out and "in hybrid int8\n" in out
    assert out.endswith("not run (time budget): hybrid w8a8\n")


def test_nothing_starts_after_the_time_budget() -> None:
    done = subprocess.run([*BENCH, "--rows", "bf16,int8", "--seconds", "0"], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert table(done.stdout) == [] and "not run (time budget): hybrid float32, hybrid int8" in done.stdout


# Loaded by every Python started with this folder first on PYTHONPATH: a stand-in for the H200's failure, where
# w8a8's failed CUDA graph capture left the process unable to build another model ("Offset increment outside
# graph capture encountered unexpectedly" in the next row's random init), and for a row whose process dies.
POISON = """
import sys
import torch
import torchao.quantization as ao

poisoned = []
quantize, seed = ao.quantize_, torch.manual_seed

def failing_quantize(model, config, *args, **kwargs):
    if type(config).__name__ == "Int8DynamicActivationInt8WeightConfig":
        poisoned.append(True)
        raise RuntimeError("simulated failed capture")
    return quantize(model, config, *args, **kwargs)

def manual_seed(s):
    if poisoned:
        raise RuntimeError("simulated: unusable after a failed capture")
    if "int8+compile" in sys.argv:  # only the process of that one row
        sys.exit(3)
    return seed(s)

ao.quantize_, torch.manual_seed = failing_quantize, manual_seed
"""


def test_a_row_that_fails_or_dies_does_not_stop_the_rows_after_it(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(POISON)
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path), ENV["PYTHONPATH"]])}
    done = subprocess.run([*BENCH, "--rows", "bf16,w8a8,int8+compile,int8", "--batches", "1", "--frames", "4",
                           "--window", "3"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = table(done.stdout)
    assert [(c[0], c[1]) for c in rows] == [("hybrid float32", "1"), ("hybrid w8a8", ""),
                                            ("hybrid int8 compiled", ""), ("hybrid int8", "1"), ("hybrid int8", "logits")]
    assert rows[1][2] == "failed: RuntimeError: simulated failed capture"
    assert rows[2][2] == "failed: its process exited with code 3 (output above)"
    assert float(rows[3][3]) > 0  # timed after both, against the bf16 row's step time
    max_abs, rel, same = map(float, rows[4][-3:])  # and its logits against the bf16 row's
    assert 0 < max_abs < 0.25 and 0 < rel < 0.04 and same > 0.9
