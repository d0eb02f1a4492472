"""The server's batch of streams: a session's tokens do not depend on its slot or its neighbours, and a
conversation suspended to a state file and resumed in another slot of a fresh model replays the
uninterrupted run token for token; each saved part (TTT, attention window, Mimi, generator) matters."""

from __future__ import annotations

import typing as tp
from dataclasses import dataclass

import numpy as np
import pytest
import torch

pytest.importorskip("moshi")

from helpers.serve import audio, listening_mimi  # noqa: E402
from ttt_speech import TTTConfig  # noqa: E402
from ttt_speech.moshi import convert  # noqa: E402
from ttt_speech.moshi.tiny import build_tiny_lm, tiny_lm_config  # noqa: E402
from ttt_speech.serve.store import StateStore, fingerprint  # noqa: E402
from ttt_speech.serve.streams import BatchedStreams  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
B = 4
CONTEXT = tiny_lm_config()["context"]  # attention window of the tiny model: 8 frames
MINI_BATCH = 16  # TTT mini-batch of build_tiny_hybrid


def make_streams() -> BatchedStreams:
    """A fresh tiny hybrid + Mimi (same weights every time, as a restarted server would load). The TTT
    branch is made loud (open gate, larger projections) so that its state visibly decides tokens."""
    lm = build_tiny_lm(0)
    torch.manual_seed(0)
    loud = TTTConfig(dim=32, num_heads=4, mini_batch=MINI_BATCH, gate_init=1.0, init_std=0.1)
    lm = convert(lm, "all", "hybrid", loud)
    return BatchedStreams(lm, listening_mimi(0), B)


class Driver:
    """Steps `BatchedStreams` as the session manager does: one frame for each slot that has one."""

    def __init__(self, streams: BatchedStreams) -> None:
        self.streams = streams
        self.frames = [0] * B  # frames stepped per slot (the manager's Session.frames)

    def start(self, slot: int, seed: int) -> None:
        self.streams.start(slot, seed)
        self.frames[slot] = 0

    def step(self, pcm: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """pcm: slot -> one frame; returns slot -> tokens [1 + dep_q] for the slots that generated."""
        x = np.zeros((B, 1920), np.float32)
        active, first = np.zeros(B, bool), np.zeros(B, bool)
        for slot, frame in pcm.items():
            x[slot], active[slot], first[slot] = frame, True, self.frames[slot] == 0
            self.frames[slot] += 1
        out = self.streams.step(x, active, first)
        return {s: out.tokens[s] for s in pcm if out.generated[s]}

    def run(self, slot: int, frames: np.ndarray, neighbours: dict[int, np.ndarray] | None = None,
            record: dict[int, list[np.ndarray]] | None = None) -> np.ndarray:
        """Tokens [n, 1 + dep_q] of `slot` over `frames`. Each neighbour steps on every other frame
        (idle in between); their tokens go to `record`."""
        got = []
        for t, frame in enumerate(frames):
            pcm = {slot: frame}
            for other, their in (neighbours or {}).items():
                if (t + other) % 2:
                    pcm[other] = their[t]
            tokens = self.step(pcm)
            if slot in tokens:
                got.append(tokens[slot])
            for other, tok in tokens.items():
                if record is not None and other != slot:
                    record.setdefault(other, []).append(tok)
        return np.array(got)


@torch.no_grad()
def test_a_session_does_not_depend_on_its_slot_or_its_neighbours() -> None:
    T = 2 * CONTEXT
    mine = audio(1, T)
    streams = make_streams()
    try:
        d = Driver(streams)
        d.start(0, seed=42)
        alone = d.run(0, mine)
        for slot in (1, 2, 3):
            d.start(slot, seed=100 + slot)
        d.start(2, seed=42)
        theirs: dict[int, list[np.ndarray]] = {}
        crowded = d.run(2, mine, {1: audio(5, T), 3: audio(6, T), 0: audio(7, T)}, theirs)
        d.start(1, seed=101)
        idle_half = d.run(1, audio(5, T)[0::2])  # slot 1's frames alone, without the steps it sat out
        d.start(1, seed=43)
        reseeded = d.run(1, mine)
        d.start(3, seed=42)
        other_audio = d.run(3, audio(9, T))
    finally:
        streams.close()
    assert alone.shape == (T - 1, 3)  # one frame of acoustic delay
    np.testing.assert_array_equal(crowded, alone)
    np.testing.assert_array_equal(np.array(theirs[1]), idle_half)  # an idle step leaves a session as it was
    assert (reseeded != alone).any(axis=1).mean() > 0.5  # the tokens are sampled, and the seed decides them
    assert (other_audio != alone).any(axis=1).mean() > 0.3  # and the user's audio reaches the model


K, TOTAL = MINI_BATCH + 5, 2 * MINI_BATCH  # suspended mid TTT mini-batch, after the KV ring wrapped twice
MINE = audio(1, TOTAL)


@dataclass
class Suspended:
    """A conversation run whole, and the same one run up to frame K and saved to a state file."""

    whole: np.ndarray  # uninterrupted tokens
    before: np.ndarray  # tokens up to the suspend
    snapshot: dict[str, torch.Tensor]
    store: StateStore
    token: str


@pytest.fixture(scope="module")
@torch.no_grad()
def suspended(tmp_path_factory: pytest.TempPathFactory) -> tp.Iterator[Suspended]:
    others = {1: audio(2, TOTAL), 2: audio(3, TOTAL)}
    streams = make_streams()
    try:
        d = Driver(streams)
        for slot in (0, 1, 2):
            d.start(slot, seed=[42, 7, 8][slot])
        whole = d.run(0, MINE, others)
        d.start(0, seed=42)
        d.start(1, seed=7)
        before = d.run(0, MINE[:K], {1: others[1][:K]})
        snapshot = streams.snapshot(0)
        store = StateStore(tmp_path_factory.mktemp("kept"), fingerprint("tiny", streams.layout))
        token = store.save(snapshot, {"frames": str(K)})
    finally:
        streams.close()
    yield Suspended(whole, before, snapshot, store, token)


@pytest.fixture(scope="module")
def restarted() -> tp.Iterator[BatchedStreams]:
    """A restarted server: new model objects (same weights); state comes only from what was saved."""
    streams = make_streams()
    yield streams
    streams.close()


def resume(streams: BatchedStreams, tensors: dict[str, torch.Tensor]) -> np.ndarray:
    """Tokens after restoring `tensors` into slot 3, with other conversations running around it."""
    d = Driver(streams)
    for slot in (0, 1, 2):
        d.start(slot, seed=slot)
        d.run(slot, audio(10 + slot, 3))
    d.start(3, seed=42)
    streams.restore(3, tensors)
    d.frames[3] = K
    return d.run(3, MINE[K:], {0: audio(20, TOTAL), 2: audio(21, TOTAL)})


@torch.no_grad()
def test_resumed_conversation_replays_the_uninterrupted_run(suspended: Suspended, restarted: BatchedStreams) -> None:
    tensors, meta = suspended.store.take(suspended.token)
    after = resume(restarted, tensors)
    assert suspended.whole.shape == (TOTAL - 1, 3) and meta["frames"] == str(K)
    np.testing.assert_array_equal(np.concatenate([suspended.before, after]), suspended.whole)
    assert not list(suspended.store.root.iterdir())  # taken: single use


@pytest.mark.parametrize("part", [".memory.", ".kv_cache.", "mimi.", "gen."])
@torch.no_grad()
def test_every_saved_part_of_the_state_matters(suspended: Suspended, restarted: BatchedStreams, part: str) -> None:
    restarted.start(3, seed=42)
    fresh = restarted.snapshot(3)
    after = resume(restarted, {n: fresh[n] if part in n else t for n, t in suspended.snapshot.items()})
    want = suspended.whole[K - 1:]
    n = min(len(want), len(after))  # a fresh generator restarts its acoustic delay: one token fewer
    mismatch = (after[:n] != want[:n]).any(axis=1).mean()
    assert mismatch > 0.3, f"leaving out {part} changed only {mismatch:.0%} of the frames after the resume"


@torch.no_grad()
def test_slot_state_is_fixed_size_and_restored_in_place() -> None:
    streams = make_streams()
    try:
        d = Driver(streams)
        d.start(1, seed=3)
        snap0 = streams.snapshot(1)
        d.run(1, audio(4, 5 * CONTEXT))
        snap1 = streams.snapshot(1)
        ptrs = {n: t.data_ptr() for n, (t, _) in streams._tensors().items()}
        streams.restore(2, snap1)
        assert ptrs == {n: t.data_ptr() for n, (t, _) in streams._tensors().items()}
        for name, t in streams.snapshot(2).items():
            torch.testing.assert_close(t, snap1[name], rtol=0, atol=0)
        bad = dict(snap1)
        bad["lm.transformer.layers.0.memory.W1"] = bad["lm.transformer.layers.0.memory.W1"][:, :4]
        with pytest.raises(ValueError, match="memory.W1"):
            streams.restore(2, bad)
        with pytest.raises(ValueError, match="missing"):
            streams.restore(2, {n: t for n, t in snap1.items() if "mimi" not in n})
    finally:
        streams.close()
    sizes = {n: t.numel() * t.element_size() for n, t in snap1.items()}
    assert sizes == {n: t.numel() * t.element_size() for n, t in snap0.items()}  # 40 frames later: same size
    assert sum(sizes.values()) == streams.slot_bytes
    assert any(".memory.W1" in n for n in sizes) and any(".kv_cache.cache" in n for n in sizes)
    assert snap1["gen.offsets"].item() == 5 * CONTEXT and snap1["gen.seeds"].item() == 3


def test_starting_slots_together_equals_starting_them_one_by_one() -> None:
    """`start_many` (one masked reset, what the capacity ramp uses for hundreds of slots) leaves every row's
    state exactly as `start` slot by slot does, the rows it does not name included."""
    pcm = audio(3, 6)
    together, one_by_one = make_streams(), make_streams()
    for streams in (together, one_by_one):
        for slot in range(B):
            streams.start(slot, 100 + slot)
        for frame in pcm[:5]:  # every row has state worth resetting
            streams.step(np.repeat(frame[None], B, 0), np.ones(B, bool), np.zeros(B, bool))
    before = together.snapshot(0)
    together.start_many({0: 7, 2: 9})
    assert any(not torch.equal(before[k], v) for k, v in together.snapshot(0).items() if k != "gen.seeds")
    one_by_one.start(0, 7)
    one_by_one.start(2, 9)
    for slot in range(B):
        a, b = together.snapshot(slot), one_by_one.snapshot(slot)
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), (slot, name)
    reset = one_by_one.snapshot(0)
    assert int(reset["gen.seeds"]) == 7 and int(together.snapshot(2)["gen.seeds"]) == 9
    assert not torch.equal(reset["gen.seeds"], together.snapshot(1)["gen.seeds"])  # row 1 kept its seed
    together.close()
    one_by_one.close()


@torch.no_grad()
def test_listening_streams_write_only_frames_with_a_voice() -> None:
    """`listen_db`: a slot fed silence reads its in-place memory and never writes it (its deltas stay exactly
    zero), a slot fed a voice (-20 dBFS noise) writes as without the gate; without the gate the silent slot writes
    too (so the first check can fail); a model without in-place memory is refused."""
    from ttt_speech.moshi import default_inplace_config
    from ttt_speech.serve.streams import quiet_frames

    def deltas(listen_db: float | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        lm = build_tiny_lm(0)
        lm = convert(lm, "all", ttt=default_inplace_config(lm, chunk=4))
        for i, layer in enumerate(lm.memory_layers()):
            layer.memory.target_proj.weight.copy_(torch.randn(layer.memory.target_proj.weight.shape,
                                                              generator=torch.Generator().manual_seed(i)))
        streams = BatchedStreams(lm, listening_mimi(0), 2, listen_db=listen_db)
        pcm = np.stack([np.zeros(1920, np.float32), audio(1, 1)[0]])
        on = np.ones(2, bool)
        for t in range(12):
            streams.step(pcm, on, on if t == 0 else ~on)
        states = [t for n, (t, _) in streams._tensors().items() if n.endswith(".memory.delta")]
        mutes = [t for n, (t, _) in streams._tensors().items() if n.endswith(".memory.mute")]
        streams.close()
        return states, mutes

    gated, mutes = deltas(-40.0)
    assert len(gated) == 2 and all(torch.equal(m, torch.tensor([1.0, 0.0])) for m in mutes)
    assert all(d[0].abs().max() == 0 and d[1].abs().max() > 0 for d in gated)
    plain, _ = deltas(None)
    assert all(d[0].abs().max() > 0 for d in plain)
    torch.testing.assert_close(gated[0][1], plain[0][1])  # the speaking slot wrote as without the gate
    assert quiet_frames(np.stack([np.full(4, 0.01), np.full(4, 0.1)]), -30.0).tolist() == [1.0, 0.0]  # -40, -20 dB
    with pytest.raises(ValueError, match="needs an in-place memory"):
        BatchedStreams(build_tiny_lm(0), listening_mimi(0), 2, listen_db=-40.0)
