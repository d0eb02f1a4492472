"""benchmarks/step_kernels.py at tiny shape on the CPU (there it lists top-level CPU ops, not kernels): every linear
of a step appears once per step, as nn.Linear's op unquantized and as int8's matmul quantized; the modes alternate
by rounds; busy time is the union of the events' intervals."""

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


def _bench():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module("step_kernels")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_busy_time_is_the_union_of_intervals() -> None:
    busy = _bench().busy_us
    assert busy([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17  # overlaps count once, the gap 12-20 not at all
    assert busy([(20, 25), (0, 10)]) == 15 and busy([]) == 0


def test_each_linear_is_counted_once_per_step() -> None:
    bench = _bench()
    args = argparse.Namespace(tiny=True, layers="all", batch=2, frames=4, steps=2, wall_steps=3)
    (plain, (wall, busy)), (int8, _) = bench.kernel_times("none", args, "cpu"), bench.kernel_times("int8", args, "cpu")
    assert 0 < busy and 0 < wall  # ms: a step between syncs, and the union of its top-level ops
    linears = plain["aten::linear"][1]
    assert linears >= 20 and linears == int(linears)  # the tiny hybrid's temporal + depformer linears, every step
    assert "aten::linear" not in int8 and int8["aten::mm"][1] == linears
    assert all(us > 0 for us, _ in plain.values())


def test_the_modes_alternate_by_rounds(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    bench = _bench()
    order = []

    def fake(mode: str, args: argparse.Namespace, device: str):
        order.append(mode)
        return {"k": (10.0, 1.0)}, (2.0 if mode == "none" else 3.0, 1.0)

    monkeypatch.setattr(bench, "kernel_times", fake)
    monkeypatch.setattr(sys, "argv", ["step_kernels", "--tiny", "--modes", "none,int8", "--rounds", "2"])
    bench.main()
    assert order == ["none", "int8", "none", "int8"]
    out = capsys.readouterr().out
    assert "| int8 | 3.00 / 3.00 | 3.00 | 1.500 | 1.00 | 1.000 |" in out and "2 round(s)" in out
