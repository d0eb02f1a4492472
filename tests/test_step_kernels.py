"""benchmarks/step_kernels.py at tiny shape on the CPU (there it lists top-level CPU ops, not kernels): every linear
of a step appears once per step, as nn.Linear's op unquantized and as int8's matmul quantized."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import pytest

pytest.importorskip("moshi")
pytest.importorskip("torchao")

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
pytestmark = pytest.mark.usefixtures("one_thread")


def test_each_linear_is_counted_once_per_step() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        bench = importlib.import_module("step_kernels")
    finally:
        sys.path.remove(str(BENCHMARKS))
    args = argparse.Namespace(tiny=True, layers="all", batch=2, frames=4, steps=2)
    plain, int8 = bench.kernel_times("none", args, "cpu"), bench.kernel_times("int8", args, "cpu")
    linears = plain["aten::linear"][1]
    assert linears >= 20 and linears == int(linears)  # the tiny hybrid's temporal + depformer linears, every step
    assert "aten::linear" not in int8 and int8["aten::mm"][1] == linears
    assert all(us > 0 for us, _ in plain.values())
