"""benchmarks/inplace_stream.py end to end at tiny shape on the CPU: the report has every field the device run
fills, chunk-end frames are counted where the in-place writes land, state bytes are the spec's, and the
CUDA-graph check compares replay with eager steps (here with the "graph" being the step itself)."""

from __future__ import annotations

import importlib
import json
import sys
import typing as tp
from pathlib import Path

import pytest

pytest.importorskip("moshi")

import torch  # noqa: E402

from ttt_speech.config import InPlaceConfig  # noqa: E402
from ttt_speech.layers.inplace import InPlaceState  # noqa: E402
from ttt_speech.moshi.tiny import tiny_lm_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench() -> tp.Any:
    sys.path.insert(0, str(BENCHMARKS))  # the script imports its neighbours (layer.py, moshi_stream.py)
    try:
        yield importlib.import_module("inplace_stream")
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_chunk_end_frames_are_the_last_frame_of_each_chunk(bench: tp.Any) -> None:
    frames, ms = list(range(3, 13)), [float(f) for f in range(3, 13)]
    out = bench.split(frames, ms, 4)
    assert out["chunk_end"]["n"] == 3 and out["chunk_end"]["max"] == 11.0 and out["chunk_end"]["p50"] == 7.0
    assert out["other"]["n"] == 7 and out["all"]["n"] == 10 and out["all"]["max"] == 12.0
    assert out["chunk_end_over_other_p50"] == 7.0 / 8.0 and out["every_frame_within_80ms"]
    assert not bench.split([0, 1], [1.0, 80.0], 4)["every_frame_within_80ms"]


def test_the_tiny_run_reports_every_field(bench: tp.Any, tmp_path: Path) -> None:
    chunk, warmup, frames = 4, 3, 10
    report = bench.main(["--tiny", "--chunk", str(chunk), "--frames", str(frames), "--warmup", str(warmup),
                         "--rounds", "3", "--layers", "all", "1", "--train-T", "32", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "inplace_stream.json").read_text()) == json.loads(json.dumps(report))
    assert report["capture_check"] == {"capturable": None, "reason": "no CUDA device"}
    rows = {r["model"]: r for r in report["streaming"]}
    assert list(rows) == ["vanilla", "in-place all", "in-place 1"]
    assert [rows[m]["layers"] for m in rows] == [[], [0, 1], [1]]
    cfg = bench.build(tiny_lm_config(), "all:inplace", "cpu", torch.float32, 16, chunk).memory_layers()[0].memory.config
    per_layer = sum(torch.empty(shape, dtype=dt).nbytes for shape, dt in InPlaceState.spec(cfg, 1).values())
    assert per_layer == 4 * (32 * 88 + chunk * 88 + chunk * 32 + 88 + 32 + 1) + 8  # delta, buffers, z_prev, conv, mute, offset
    for name, layers in (("vanilla", 0), ("in-place all", 2), ("in-place 1", 1)):
        row = rows[name]
        assert row["inplace_state_bytes_per_session"] == layers * per_layer
        # the hybrid's session state is vanilla's (KV caches, LMGen) plus the in-place states, nothing else
        assert row["state_bytes_per_session"] == rows["vanilla"]["state_bytes_per_session"] + layers * per_layer
        assert "cuda_graph" not in row["paths"] and row["graph_error"].startswith("no CUDA device")
        eager = row["paths"]["eager"]
        # timed frames 3..12 (after 3 warm-up frames): the writes land at frames 3, 7 and 11
        assert (eager["all"]["n"], eager["chunk_end"]["n"], eager["other"]["n"]) == (10, 3, 7)
        assert eager["series"]["frame"] == list(range(warmup, warmup + frames)) and len(eager["series"]["ms"]) == 10
        assert 0 < eager["all"]["p50"] <= eager["all"]["p90"] <= eager["all"]["max"]
        assert row["frames_stepped"] == warmup + frames
        assert row["chunk_offset_ok"] is (None if name == "vanilla" else True) and row["delta_finite"]
    assert rows["vanilla"]["paths"]["eager"]["ratio_p50_vs_vanilla"] == 1.0
    train = report["training"]["rows"]
    assert [r["layer"] for r in train] == ["attention only (vanilla layer)", f"in-place, chunk {chunk} (attention form)",
                                           "TTT ttt-lm, own Q/K/V/O", "TTT ttt-lm, shared q/k/v"]
    assert all(r["T"] == 32 and r["tokens_per_s"] > 0 for r in train) and train[0]["vs_attention_only"] == 1.0
    md = (tmp_path / "inplace_stream.md").read_text()
    assert md.startswith("cpu, torch ") and "| in-place 1 | eager | " in md and "| TTT ttt-lm, own Q/K/V/O | 32 | " in md
    assert f"| in-place all | eager | {bench.fmt(rows['in-place all']['paths']['eager']['all'])} | 3: " in md


def test_capture_check_compares_replay_with_eager_and_names_a_failure(bench: tp.Any) -> None:
    torch.manual_seed(0)
    layer = bench.build(tiny_lm_config(num_layers=1), "all:inplace", "cpu", torch.float32, 16, 4).memory_layers()[0].memory
    ok = bench.capture_check(layer, 2, 6, capture=lambda fn: fn)  # replaying = calling: equal by construction
    assert ok == {"capturable": True, "reason": "", "frames": 6, "max_abs_diff_out": 0.0, "max_abs_diff_delta": 0.0,
                  "delta_written": True}

    def fails(fn: tp.Callable[[], object]) -> tp.Callable[[], object]:
        raise RuntimeError("operation not permitted when stream is capturing\nCUDA kernel errors ...")

    assert bench.capture_check(layer, 2, 6, capture=fails) == {
        "capturable": False, "reason": "RuntimeError: operation not permitted when stream is capturing"}


def decaying_layer(device: str) -> tp.Any:
    """A layer whose writes matter and whose delta fades by 0.8 per chunk (the decay's scale runs in the graph)."""
    torch.manual_seed(0)
    return InPlaceConfig(dim=16, hidden=32, chunk=4, decay=0.8, target_init_std=0.5, base_lr=10.0).build().to(device)


def test_capture_check_of_a_decaying_layer_writes_and_fades(bench: tp.Any) -> None:
    assert bench.capture_check(decaying_layer("cpu"), 2, 10, capture=lambda fn: fn)["delta_written"]


@pytest.mark.gpu
def test_a_decaying_inplace_step_replays_from_a_cuda_graph_as_it_steps_eager(bench: tp.Any) -> None:
    out = bench.capture_check(decaying_layer("cuda"), 2, 10)  # two writes, each after a fade
    assert out["capturable"] and out["delta_written"], out
    assert out["max_abs_diff_out"] <= 1e-5 and out["max_abs_diff_delta"] <= 1e-6, out


@pytest.mark.gpu
def test_the_inplace_step_replays_from_a_cuda_graph_as_it_steps_eager(bench: tp.Any) -> None:
    torch.manual_seed(0)
    lm = bench.build(tiny_lm_config(num_layers=1), "all:inplace", "cuda", torch.bfloat16, 16, 4)
    out = bench.capture_check(lm.memory_layers()[0].memory, 2, 10)  # two writes
    assert out["capturable"] and out["delta_written"], out
    assert out["max_abs_diff_out"] <= 2e-2 and out["max_abs_diff_delta"] <= 1e-6, out
