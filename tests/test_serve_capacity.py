"""benchmarks/serve_capacity.py at tiny shape on the CPU, the clock injected: each count runs the server's real
batched step, but the step's time is a known function of the session count, so where the ramp stops is
exact; and the p99 rule on a known series of frame times."""

from __future__ import annotations

import importlib.util
import json
import typing as tp
from collections import Counter
from pathlib import Path

import pytest
import torch

pytest.importorskip("moshi")

from helpers.serve import listening_mimi  # noqa: E402

from ttt_speech.moshi.tiny import build_tiny_lm  # noqa: E402
from ttt_speech.serve import capacity  # noqa: E402
from ttt_speech.serve.capacity import measure, ramp, session_bytes  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
SCRIPT = Path(__file__).parents[1] / "benchmarks" / "serve_capacity.py"


def benchmark() -> tp.Any:
    spec = importlib.util.spec_from_file_location("serve_capacity", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def thirty_ms_per_session(step: tp.Callable[[], object], sessions: int) -> float:
    step()  # the real batched step runs; its time is made up
    return 30.0 * sessions


def test_the_ramp_stops_at_the_first_failing_count_and_writes_the_table(tmp_path: Path) -> None:
    bench = benchmark()
    common = ["--tiny", "--counts", "1,2,4,8", "--frames", "10", "--warmup", "2", "--windows", "12,6", "--out",
              str(tmp_path)]
    bench.main([*common, "--models", "vanilla,12"], timer=thirty_ms_per_session)
    ramps = bench.main([*common, "--models", "6", "--append"], timer=thirty_ms_per_session)
    assert [(r.model, r.window) for r in ramps] == [("vanilla", 12), ("hybrid all:shared", 12),
                                                    ("hybrid all:shared", 6)]
    for r in ramps:
        # 30, 60 ms keep real time; 120 ms fails at its first frame (1 over budget of 10 already breaks p99);
        # 8 sessions never run
        assert [(p.sessions, p.frames, p.p90_ms) for p in r.points] == [(1, 10, 30.0), (2, 10, 60.0), (4, 1, 120.0)]
        assert r.capacity == 2 and r.first_failure.failure == "p99 >= 80 ms (1 of the first 1 frames over)"
    state = {r.window: (r.state_bytes, r.kv_bytes) for r in ramps[1:]}
    assert state[12][1] == 2 * state[6][1] == 12 * 512  # KV per session: window x layers x 2 x dim x 4 bytes
    assert state[12][0] - state[6][0] == 6 * 512  # the rest of a session's state does not depend on the window
    saved = json.loads((tmp_path / "capacity.json").read_text())
    assert [r["capacity"] for r in saved["ramps"]] == [2, 2, 2] and saved["frames"] == 10
    lines = (tmp_path / "capacity.md").read_text().splitlines()
    assert lines[0].startswith("tiny, CPU, ") and "--append" in lines[0]
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header[0] == "model" and header[4].startswith("real-time sessions (p90 & p99 < 80 ms over 10 frames)")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[4:7]]
    assert [(r[0], r[1], r[4], r[7], r[8]) for r in rows] == [
        ("vanilla", "12", "2", "1.00x", "4 (p99 >= 80 ms (1 of the first 1 frames over))"),
        ("hybrid all:shared", "12", "2", "1.00x", "4 (p99 >= 80 ms (1 of the first 1 frames over))"),
        ("hybrid all:shared", "6", "2", "1.00x", "4 (p99 >= 80 ms (1 of the first 1 frames over))")]
    assert rows[0][5] == "60.0 / 60.0 / 60.0"  # p50 / p90 / p99 at 2 sessions
    assert (tmp_path / "capacity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    opus_ms = saved["opus_cpu_ms_per_session_frame"]
    assert 0 < opus_ms < 80 and lines[7:] == [
        "", f"Host Opus encode + decode: {opus_ms:.3f} ms of CPU per session-frame: one core codes at most "
        f"{int(80 // opus_ms)} sessions in real time, whatever the GPU does; `serve --opus-workers N` spreads it "
        "over N processes (benchmarks/opus_pool.py).", "",
        f"Earlier call, rows kept unless measured again: CPU, {saved['date']}; `python benchmarks/serve_capacity.py "
        f"{' '.join(common)} --models vanilla,12`"]  # the first call's rows, kept by the --append


def test_quantize_names_the_rows_and_quantizes_each_model_before_it_runs(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torchao")
    from ttt_speech.quantize import is_quantized

    bench, models, summaries = benchmark(), [], []

    def recorded(lm: tp.Any, mode: str) -> str:
        models.append(lm)
        summaries.append(quantize(lm, mode))
        return summaries[-1]

    quantize = bench.quantize_or_exit
    monkeypatch.setattr(bench, "quantize_or_exit", recorded)
    ramps = bench.main(["--tiny", "--counts", "1,4", "--frames", "3", "--warmup", "1", "--windows", "12",
                        "--hybrid", "0-1:inplace", "--quantize", "int8", "--out", str(tmp_path)],
                       timer=thirty_ms_per_session)
    assert [(r.model, r.capacity) for r in ramps] == [("vanilla int8", 1), ("hybrid 0-1:inplace int8", 1)]
    # the vanilla weights before the first row, then only the in-place memories' new target projections
    assert len(models) == 2 and models[0] is models[1]
    assert summaries[0].startswith("int8: 21 linear layers") and summaries[1].startswith("int8: 2 linear layers")
    linears = [m for m in models[1].modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 23 and all(is_quantized(m.weight) for m in linears)


def test_p99_allows_one_slow_frame_in_a_hundred_and_stops_at_the_second() -> None:
    lm, mimi = build_tiny_lm(0), listening_mimi(0)

    def slow_every(period: int, first: int) -> tp.Callable[[tp.Callable[[], object], int], float]:
        frame = iter(range(1, 10**6))
        return lambda step, sessions: 100.0 if (next(frame) - first) % period == 0 else 20.0

    one = measure(lm, mimi, 1, 100, warmup=0, timer=slow_every(100, 51))  # frame 51 only
    assert one.real_time and one.frames == 100 and one.p90_ms == 20.0 and one.max_ms == 100.0
    assert one.p99_ms == pytest.approx(20.0 + 0.01 * 80.0)  # linear interpolation between 20 and 100
    two = measure(lm, mimi, 1, 150, warmup=0, timer=slow_every(50, 50))  # frames 50, 100, 150: stops at 100
    assert not two.real_time and two.frames == 100 and two.failure == "p99 >= 80 ms (2 of the first 100 frames over)"


def test_probes_locate_the_limit_and_only_the_deciding_counts_run_in_full() -> None:
    lm, mimi = build_tiny_lm(0), listening_mimi(0)
    calls: Counter[int] = Counter()

    def ten_ms_per_session_and_7_has_rare_spikes(step: tp.Callable[[], object], sessions: int) -> float:
        calls[sessions] += 1
        return 100.0 if sessions == 7 and calls[sessions] % 40 == 0 else 10.0 * sessions

    r = ramp("m", lm, mimi, [1, 2, 4, 8, 16], frames=100, warmup=0, timer=ten_ms_per_session_and_7_has_rare_spikes,
             probe_frames=10)
    assert [(p.sessions, p.probe, p.frames, p.real_time) for p in r.points] == [
        (1, True, 10, True), (2, True, 10, True), (4, True, 10, True),
        (8, True, 1, False),  # 80 ms is not under 80: one frame over of 10 already breaks p99
        (6, True, 10, True), (7, True, 10, True),  # 4..8 halved to within max(1, 4 // 8)
        (7, False, 70, False),  # the full run meets its 2nd spike at frame 70: p99 over budget
        (6, False, 100, True)]  # one count lower (steps of max(1, 7 // 8)) holds over the full run
    assert r.capacity == 6 and r.best.p90_ms == 60.0 and r.first_failure.sessions == 7


class Clock:
    """A wall clock that advances only by the step times the injected timer reports (set-up costs nothing)."""

    def __init__(self, ms_per_session: float) -> None:
        self.now, self.ms_per_session = 0.0, ms_per_session

    def __call__(self) -> float:
        return self.now

    def timer(self, step: tp.Callable[[], object], sessions: int) -> float:
        ms = self.ms_per_session * sessions
        self.now += ms / 1e3
        return ms


def test_a_deadline_stops_probing_where_the_confirmation_would_not_fit_and_still_confirms() -> None:
    lm, mimi = build_tiny_lm(0), listening_mimi(0)
    clock = Clock(10.0)
    # probe 1 runs alone (nothing measured to plan with); then probe + confirmation on the line through the
    # passing probes: 2 -> 20 ms (10 + 100 frames: 2.2 s), 4 -> 40 ms (4.4 s), 8 -> 80 ms: 8.8 s from t = 0.7 is past 9
    r = ramp("m", lm, mimi, [1, 2, 4, 8, 16], frames=100, warmup=0, timer=clock.timer, probe_frames=10, deadline=9.0,
             clock=clock)
    assert [(p.sessions, p.probe, p.frames) for p in r.points] == [(1, True, 10), (2, True, 10), (4, True, 10),
                                                                   (4, False, 100)]
    assert r.capacity == 4 and clock.now == pytest.approx(0.7 + 4.0)
    assert r.note == "time budget: stopped before probing 8 sessions (~8.8 s more needed)"
    unlimited = ramp("m", lm, mimi, [1, 2, 4, 8, 16], frames=100, warmup=0, timer=Clock(10.0).timer, probe_frames=10)
    assert unlimited.capacity == 7 and unlimited.note == ""  # 8 fails (80 ms), 6 and 7 pass their probes
    assert ramp("m", lm, mimi, [1, 2], frames=100, warmup=0, timer=clock.timer, probe_frames=10, deadline=0.7,
                clock=Clock(10.0)).points == []  # not even the first probe fits: 10 frames costed at 80 ms


def test_under_a_deadline_counts_refused_for_memory_cost_nothing_and_a_lone_baseline_is_not_confirmed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    lm, mimi = build_tiny_lm(0), listening_mimi(0)
    state = session_bytes(lm, mimi)[0]
    monkeypatch.setattr(capacity, "free_bytes", lambda device: int(3.5 * state))  # 3 sessions fit, 4 do not
    clock = Clock(10.0)
    # 4 is refused at once (costed, probe + confirmation would need 4.4 s from t = 0.3: past 3); bisecting to 3
    # would need 3.3 s; the confirmation of 2 (2 s) fits
    r = ramp("m", lm, mimi, [1, 2, 4, 8], frames=100, warmup=0, timer=clock.timer, probe_frames=10, deadline=3.0,
             clock=clock)
    assert [(p.sessions, p.probe, p.frames, p.real_time) for p in r.points] == [
        (1, True, 10, True), (2, True, 10, True), (4, True, 0, False), (2, False, 100, True)]
    assert r.points[2].failure.startswith("out of memory (") and r.capacity == 2
    assert r.note == "time budget: stopped before probing 3 sessions (~3.3 s more needed)"
    monkeypatch.undo()
    clock = Clock(10.0)  # 2 would need 2.2 s from t = 0.1: past 2; a capacity of 1 is not worth a full run
    lone = ramp("m", lm, mimi, [1, 2, 4], frames=100, warmup=0, timer=clock.timer, probe_frames=10, deadline=2.0,
                clock=clock)
    assert [(p.sessions, p.probe) for p in lone.points] == [(1, True)] and lone.capacity == 0
    assert "| none confirmed (1 passed a probe) |" in capacity.table([lone], 100)


def test_rows_out_of_time_are_listed_and_a_killed_run_keeps_the_counts_it_measured(tmp_path: Path) -> None:
    bench = benchmark()
    common = ["--tiny", "--counts", "1,2,4", "--frames", "10", "--probe-frames", "5", "--warmup", "1",
              "--windows", "12,6", "--out", str(tmp_path)]
    clock = Clock(30.0)  # 30 ms per session: 1 and 2 keep real time, 4 does not
    # vanilla and window 12 have 100 s each; window 6 has 0.3 s, less than its first probe (5 x 80 ms)
    ramps = bench.main([*common, "--row-seconds", "100,100,0.3"], timer=clock.timer, clock=clock)
    assert [(r.model, r.window, r.capacity) for r in ramps] == [("vanilla", 12, 2), ("hybrid all:shared", 12, 2)]
    md = (tmp_path / "capacity.md").read_text()
    assert md.endswith("\nNot run, out of time (--seconds, --row-seconds): hybrid all:shared, window 6 (time "
                       "budget: stopped before probing 1 sessions (~0.4 s more needed)).")

    def killed_at_the_third_count(step: tp.Callable[[], object], sessions: int) -> float:
        if sessions == 4:
            raise KeyboardInterrupt  # what the device call's timeout does to a row in progress
        return 30.0 * sessions

    with pytest.raises(KeyboardInterrupt):
        bench.main([*common, "--models", "vanilla"], timer=killed_at_the_third_count)
    saved = json.loads((tmp_path / "capacity.json").read_text())
    assert [[(p["sessions"], p["probe"]) for p in r["points"]] for r in saved["ramps"]] == [[(1, True), (2, True)]]


def test_the_figure_leaves_out_a_row_cut_before_any_confirmed_count_and_keeps_a_measured_zero() -> None:
    def point(sessions: int, probe: bool, failure: str = "") -> capacity.Point:
        return capacity.Point(sessions, 150, 20.0, 21.0, 22.0, 23.0, None, failure, probe)

    vanilla = capacity.Ramp("vanilla", 3000, 1, 1, [point(1, True), point(80, False)])
    cut = capacity.Ramp("hybrid", 3000, 1, 1, [point(1, True)], note="time budget: stopped before probing 32")
    none_real_time = capacity.Ramp("hybrid", 6, 1, 1, [point(1, True, "p90 >= 80 ms")])  # measured: 0
    short = capacity.Ramp("hybrid", 750, 1, 1, [point(208, False), point(224, True, "p99 >= 80 ms")],
                          note="time budget: stopped before a full run of 216")
    assert capacity.plotted([vanilla, cut, none_real_time, short]) == {"vanilla": [(3000, 80)],
                                                                       "hybrid": [(6, 0), (750, 208)]}


def test_in_place_sessions_arrive_spread_over_a_chunk_and_vanilla_ones_together() -> None:
    """`start_sessions`: with an in-place memory (chunk 4) six sessions join one per frame over the chunk, so their
    memories' positions (and chunk ends) differ by their arrival frame; a vanilla model's all start on frame 0."""
    import numpy as np
    import torch

    from ttt_speech.moshi import convert, default_inplace_config
    from ttt_speech.serve.capacity import stagger_frames, start_sessions
    from ttt_speech.serve.streams import BatchedStreams

    lm = build_tiny_lm(0)
    assert stagger_frames(lm) == 0
    lm = convert(lm, "all", ttt=default_inplace_config(lm, chunk=4))
    assert stagger_frames(lm) == 4
    streams = BatchedStreams(lm, listening_mimi(0), 6)
    try:
        with torch.no_grad():
            start_sessions(streams, np.zeros((6, 1920), np.float32), warmup=2, stagger=stagger_frames(lm))
        offsets = [t for n, (t, _) in streams._tensors().items() if n.endswith(".memory.offset")]
        # frames stepped: 3 + 2 less the wait (5, 4, 3, 2, 5, 4), each memory's position in its chunk of 4 that mod 4
        assert offsets and all(o.tolist() == [1, 0, 3, 2, 1, 0] for o in offsets)
    finally:
        streams.close()
