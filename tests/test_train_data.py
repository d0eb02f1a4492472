"""Data: Moshi-style tokenization (tiny Mimi), generic shards, bad input, the split by file, chunks."""

from __future__ import annotations

import dataclasses

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import yaml
from safetensors.numpy import save_file

pytest.importorskip("moshi")
sphn = pytest.importorskip("sphn")

from ttt_speech.moshi.tiny import TinyCheckpoint, write_tiny_checkpoint  # noqa: E402
from ttt_speech.train.commands import main as train_main  # noqa: E402
from ttt_speech.train.config import RepeatConfig, config_from_dict, load_config  # noqa: E402
from ttt_speech.train.data import (  # noqa: E402
    PAD,
    BadInputError,
    Document,
    SkipLog,
    TokenData,
    check_streams,
    copy_span,
    copy_spans,
    far_mask,
    find_documents,
    free_layout,
    make_chunks,
    split_by_source,
)
from ttt_speech.train.tokenize import MoshiTokenizer, Word, text_stream, tokenize  # noqa: E402

SR = 24000
FRAME = 1920  # Mimi: 24 kHz / 12.5 Hz
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_text_stream_follows_moshis_interleaving() -> None:
    """One token per frame from the frame a word starts in; a later word cuts pending tokens;
    the padding frame right before a word becomes end-of-padding (0); padding is 3."""
    words = [Word((10, 11), 0.0, 0.2), Word((12,), 0.25, 0.3), Word((13, 14, 15), 0.5, 0.55),
             Word((16,), 0.6, 0.7), Word((17,), 0.9, 0.9)]  # the last has no duration: dropped
    assert text_stream(words, 12, 12.5, pad=3, end_pad=0).tolist() == [10, 11, 0, 12, 3, 0, 13, 16, 3, 3, 3, 3]


# -- tokenization of stereo conversations -----------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpoint:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_moshi"))


@pytest.fixture(scope="module")
def tokenizer(checkpoint: TinyCheckpoint) -> MoshiTokenizer:
    return MoshiTokenizer.from_checkpoint(str(checkpoint.root), str(checkpoint.mimi_config))


def write_conversation(root: Path, name: str, seconds: float, sr: int = SR, channels: int = 2,
                       words: list | None = None) -> str:
    g = np.random.default_rng(abs(hash(name)) % 2**32)
    wav = (0.1 * g.standard_normal((channels, int(seconds * sr)))).astype(np.float32)
    path = root / "audio" / f"{name}.wav"
    path.parent.mkdir(parents=True, exist_ok=True)
    sphn.write_wav(str(path), wav, sr)
    words = words if words is not None else [["moshi", [0.1, 0.4], "SPEAKER_MAIN"],
                                             ["hello", [0.3, 0.6], "SPEAKER_OTHER"],
                                             ["speaks", [0.9, 1.2], "SPEAKER_MAIN"]]
    path.with_suffix(".json").write_text(json.dumps({"alignments": words}))
    return f"audio/{name}.wav"


def write_manifest(root: Path, rels: list[str]) -> Path:
    manifest = root / "data.jsonl"
    manifest.write_text("".join(json.dumps({"path": r, "duration": 1.0}) + "\n" for r in rels))
    return manifest


def test_tokenize_writes_text_and_both_voices_per_frame(tmp_path: Path, tokenizer: MoshiTokenizer) -> None:
    rels = [write_conversation(tmp_path, n, s) for n, s in (("a", 2.0), ("b", 3.3), ("c", 1.5))]
    report = tokenize(write_manifest(tmp_path, rels), tmp_path / "tokens", tokenizer, shard_frames=60)
    assert (report.documents, report.skipped) == (3, [])
    docs = find_documents([str(tmp_path / "tokens")], SkipLog())
    assert [d.source for d in docs] == rels
    assert [d.length for d in docs] == [math.ceil(s * SR / FRAME) for s in (2.0, 3.3, 1.5)] == [25, 42, 19]
    assert {d.path.name for d in docs} == {"tokens_00000.safetensors", "tokens_00001.safetensors"}
    assert all(d.streams == 5 for d in docs)  # text + 2 model + 2 user codebooks (tiny Moshi)

    data = TokenData(docs, 5, seed=0, pack=False, min_chunk=1.0)
    codes = data.load([(1, 0, 42)], 42).numpy()
    wav, _ = sphn.read(str(tmp_path / rels[1]))
    with torch.no_grad():
        audio = tokenizer.mimi.encode(torch.from_numpy(wav)[:, None]).numpy()  # offline, both channels at once
    assert np.array_equal(codes[1:3], audio[0]) and np.array_equal(codes[3:5], audio[1])  # left = model voice
    ids = [tokenizer.text.encode(w) for w in ("moshi", "speaks")]
    expected = text_stream([Word(tuple(ids[0]), 0.1, 0.4), Word(tuple(ids[1]), 0.9, 1.2)], 42, 12.5, 3, 0)
    assert np.array_equal(codes[0], expected)
    assert codes[0, 1] == ids[0][0] and codes[0, 0] == 0  # "moshi" starts in frame 1 (0.1 s * 12.5 = 1.25)
    index = json.loads((tmp_path / "tokens" / "index.json").read_text())
    assert index["streams"] == 5 and index["frame_rate"] == 12.5


def test_a_silent_channel_takes_the_cached_codes_of_silence(tokenizer: MoshiTokenizer) -> None:
    voice = np.random.default_rng(0).normal(0, 0.1, (1, 37 * FRAME)).astype(np.float32)
    zeros = np.zeros_like(voice)
    tokenizer._silence = None
    for wav in (np.concatenate([voice, zeros]), np.concatenate([zeros, voice])):
        got = tokenizer.encode_audio(wav)
        with torch.no_grad(), tokenizer.mimi.streaming(2):  # what encoding both channels gives
            want = tokenizer.mimi.encode(torch.from_numpy(wav)[:, None]).numpy()
        assert np.array_equal(got, want)
    short = tokenizer.encode_audio(np.zeros((2, 5 * FRAME), np.float32))  # a prefix of the cached silence
    assert tokenizer._silence.shape[-1] == 37 and np.array_equal(short[1], tokenizer._silence[:, :5])


def test_every_chunk_reaches_the_codec_in_one_shape(tokenizer: MoshiTokenizer,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA, Mimi's streaming encoder replays one CUDA graph: a shorter last chunk failed there (2026-12-03,
    300 eight-minute dialogues on an H200). The padded chunks give the unpadded codes."""
    wav = np.random.default_rng(1).normal(0, 0.1, (2, 37 * FRAME - 100)).astype(np.float32)
    whole = torch.nn.functional.pad(torch.from_numpy(wav)[:, None], (0, 100))  # Mimi streams whole frames
    with torch.no_grad(), tokenizer.mimi.streaming(2):
        want = tokenizer.mimi.encode(whole).numpy()
    shapes, encode = [], tokenizer.mimi.encode
    monkeypatch.setattr(tokenizer, "chunk_frames", 10)
    monkeypatch.setattr(tokenizer.mimi, "encode", lambda x: shapes.append(tuple(x.shape)) or encode(x))
    got = tokenizer.encode_audio(wav)
    assert shapes == [(2, 1, 10 * FRAME)] * 4 and got.shape == (2, want.shape[1], 37)
    assert np.array_equal(got, want)


def test_tokenize_command(tmp_path: Path, checkpoint: TinyCheckpoint, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write_manifest(tmp_path, [write_conversation(tmp_path, "a", 2.0), "audio/missing.wav"])
    args = ["tokenize", str(manifest), "--out", str(tmp_path / "tokens"), "--checkpoint", str(checkpoint.root),
            "--mimi-config", str(checkpoint.mimi_config)]
    with pytest.raises(SystemExit) as exit_:  # a bad input file: one line, exit 2, as the ttt-speech command
        train_main(args)
    assert exit_.value.code == 2 and "missing.wav: missing wav" in capsys.readouterr().err
    assert train_main([*args, "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "1 conversation(s), 25 frames" in out and "skipped 1 bad file(s)" in out


BAD = {
    "missing": ("missing wav", lambda root: "audio/nowhere.wav"),
    "rate": ("sample rate 16000 Hz", lambda root: write_conversation(root, "rate", 1.5, sr=16000)),
    "mono": ("expected stereo", lambda root: write_conversation(root, "mono", 1.5, channels=1)),
    "late": ("late.json: alignment 0 ('late', 0.50-2.50 s) runs past the audio (1.50 s)",
             lambda root: write_conversation(root, "late", 1.5, words=[["late", [0.5, 2.5], "SPEAKER_MAIN"]])),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_conversation_is_an_error_naming_the_file(tmp_path: Path, tokenizer: MoshiTokenizer, case: str) -> None:
    why, make = BAD[case]
    rel = make(tmp_path)
    manifest = write_manifest(tmp_path, [write_conversation(tmp_path, "good", 1.5), rel])
    with pytest.raises(BadInputError) as err:
        tokenize(manifest, tmp_path / "tokens", tokenizer)
    assert str(tmp_path / rel) in str(err.value) and why in str(err.value)


def test_skip_bad_logs_and_counts_every_bad_file(tmp_path: Path, tokenizer: MoshiTokenizer) -> None:
    rels = [write_conversation(tmp_path, "good1", 1.5)] + [make(tmp_path) for _, make in BAD.values()]
    rels.append(write_conversation(tmp_path, "good2", 1.2))
    manifest = write_manifest(tmp_path, rels)
    with manifest.open("a") as f:
        f.write("not json\n")
    report = tokenize(manifest, tmp_path / "tokens", tokenizer, skip_bad=True)
    assert report.documents == 2 and len(report.skipped) == 5
    assert any("data.jsonl:7" in path for path, _ in report.skipped)
    assert len(json.loads((tmp_path / "tokens" / "index.json").read_text())["skipped"]) == 5


# -- generic shards ---------------------------------------------------------------------------------
def test_generic_shards_and_their_bad_forms(tmp_path: Path) -> None:
    save_file({"x": np.arange(20, dtype=np.int32).reshape(2, 10), "y": np.ones((2, 7), np.int16)},
              str(tmp_path / "two.safetensors"))
    np.save(tmp_path / "flat.npy", np.arange(9, dtype=np.int64))
    docs = find_documents([str(tmp_path)], SkipLog())
    assert [(d.path.name, d.key, d.length, d.streams) for d in docs] == [
        ("flat.npy", None, 9, 0), ("two.safetensors", "x", 10, 2), ("two.safetensors", "y", 7, 2)]
    assert TokenData(docs, 2, 0, False, 1.0).load([(1, 3, 6)], 4).tolist() == [[3, 4, 5, PAD], [13, 14, 15, PAD]]
    with pytest.raises(BadInputError, match=r"flat.npy: token array is \[T\]; this model reads 2"):
        check_streams(docs, 2, "this model", SkipLog())

    bad = tmp_path / "bad"
    bad.mkdir()
    save_file({}, str(bad / "empty.safetensors"))
    np.save(bad / "zero.npy", np.zeros((2, 0), np.int16))
    np.save(bad / "float.npy", np.zeros(5, np.float32))
    (bad / "torn.safetensors").write_bytes(b"\x10\x00\x00")
    for name, why in (("empty.safetensors", "empty shard"), ("zero.npy", "empty token array"),
                      ("float.npy", "must be integers"), ("torn.safetensors", "cannot read shard")):
        with pytest.raises(BadInputError, match=f"{name}.*{why}"):
            find_documents([str(bad / name)], SkipLog())
    skips = SkipLog(skip_bad=True)
    assert find_documents([str(bad), str(tmp_path / "flat.npy")], skips)[0].length == 9
    assert len(skips.skipped) == 4
    with pytest.raises(BadInputError, match="no such file"):
        find_documents([str(tmp_path / "nope")], SkipLog())


def docs_of(lengths: list[int], sources: list[str] | None = None) -> list[Document]:
    return [Document(src, Path(f"{i}.npy"), None, n, 0)
            for i, (n, src) in enumerate(zip(lengths, sources or [f"f{i}" for i in range(len(lengths))]))]


def test_validation_is_held_out_by_file_never_by_chunk() -> None:
    sources = [f"conv{i // 3}.wav" for i in range(30)]  # 10 files, 3 documents each
    train, val = split_by_source(docs_of([50] * 30, sources), 0.2)
    assert len({d.source for d in val}) == 2 and len(val) == 6
    assert not {d.source for d in train} & {d.source for d in val}
    assert split_by_source(docs_of([50] * 30, sources), 0.2)[1] == val  # stable


def test_chunks_crop_pad_and_pack() -> None:
    docs = docs_of([10, 25, 3])
    assert make_chunks(docs, 8, pack=False, min_len=2) == [
        [(0, 0, 8)], [(0, 8, 10)], [(1, 0, 8)], [(1, 8, 16)], [(1, 16, 24)], [(2, 0, 3)]]  # (1, 24, 25) < min_len
    packed = make_chunks(docs, 8, pack=True, min_len=2)
    assert packed[1] == [(0, 8, 10), (1, 0, 6)] and len(packed) == 5 and packed[-1] == [(1, 22, 25), (2, 0, 3)]


def test_sample_order_is_a_function_of_the_position_only(tmp_path: Path) -> None:
    for i in range(6):
        np.save(tmp_path / f"d{i}.npy", np.full(16, i, np.int64))
    data = TokenData(find_documents([str(tmp_path)], SkipLog()), 1, seed=3, pack=False, min_chunk=1.0)
    whole = data.batch(0, 12, 8, stage=0)[:, 0, 0].tolist()  # 12 chunks: one epoch, each document twice
    assert sorted(whole) == sorted(list(range(6)) * 2)
    halves = data.batch(0, 6, 8, 0)[:, 0, 0].tolist() + data.batch(6, 6, 8, 0)[:, 0, 0].tolist()
    assert halves == whole  # two processes reading half each = one reading all
    assert data.batch(12, 12, 8, 0)[:, 0, 0].tolist() != whole  # the next epoch is reshuffled


# -- memory-targeted data: spans copied beyond the attention window ---------------------------------
def random_tokens(g: np.random.Generator, length: int, real: int, streams: int = 3) -> np.ndarray:
    """[streams, length] of distinct-looking tokens (a large vocabulary: no accidental repeats), PAD after `real`."""
    tokens = g.integers(0, 2**40, (streams, length))
    tokens[:, real:] = PAD
    return tokens


def copied_span(before: np.ndarray, after: np.ndarray) -> tuple[int, int, int] | None:
    """(source start, copy start, length) of the one span copied from `before` into `after`; None if unchanged."""
    changed = np.flatnonzero((before != after).any(axis=0))
    if not changed.size:
        return None
    dst, n = int(changed[0]), int(changed[-1] - changed[0] + 1)
    sources = [s for s in range(before.shape[1] - n + 1) if np.array_equal(before[:, s:s + n], after[:, dst:dst + n])]
    assert len(sources) == 1, f"copy [{dst}, {dst + n}) is not one earlier span of all streams: sources {sources}"
    return sources[0], dst, n


@pytest.mark.parametrize("cfg", [RepeatConfig(1.0, 30, 5, 40), RepeatConfig(1.0, 2, 10, 60), RepeatConfig(1.0, 10, 5, 12, 20)],
                         ids=["gap>len", "gap<len", "max_gap"])
def test_a_copied_span_repeats_all_streams_between_min_and_max_gap_later_without_overlap(cfg: RepeatConfig) -> None:
    for seed in range(300):
        g = np.random.default_rng(seed)
        length = int(g.integers(20, 130))
        real = length if seed % 3 else int(g.integers(1, length + 1))  # a third end in padding
        before = random_tokens(g, length, real)
        after = copy_span(before, np.random.default_rng([seed, 1]), cfg)
        span = copied_span(before, after)
        if real < max(cfg.min_gap, cfg.min_len) + cfg.min_len:  # no room for a span after its source
            assert span is None, (seed, real)
            continue
        assert span is not None, (seed, real)  # prob 1: every sequence with room gets one
        src, dst, n = span
        assert cfg.min_len <= n <= cfg.max_len, (seed, span)
        assert dst - src >= cfg.min_gap and src + n <= dst and dst + n <= real, (seed, span, real)
        assert cfg.max_gap is None or dst - src <= cfg.max_gap, (seed, span)
        assert np.array_equal(after[:, dst:dst + n], before[:, src:src + n])


def test_a_shuffled_source_holds_the_same_frames_reordered_and_its_copy_repeats_it() -> None:
    base = RepeatConfig(1.0, min_gap=16, min_len=16, max_len=32, max_gap=60)
    shuffled = dataclasses.replace(base, source="shuffled")
    for seed in range(50):
        before = random_tokens(np.random.default_rng(seed), 120, 120)
        plain, after = (copy_span(before, np.random.default_rng([seed, 1]), c) for c in (base, shuffled))
        src, dst, n = copied_span(before, plain)  # same draws: the same place, length and gap as without
        changed = np.flatnonzero((before != after).any(axis=0))
        assert src <= changed[0] and changed[-1] < dst + n and src + n <= dst
        assert np.array_equal(after[:, dst:dst + n], after[:, src:src + n])  # the copy repeats what is there now
        frames = lambda a: sorted(map(tuple, a.T.tolist()))  # noqa: E731
        assert frames(after[:, src:src + n]) == frames(before[:, src:src + n])  # the source's own frames, reordered
        assert not np.array_equal(after[:, src:src + n], before[:, src:src + n])
        assert np.array_equal(np.delete(after, np.r_[src:src + n, dst:dst + n], 1),
                              np.delete(before, np.r_[src:src + n, dst:dst + n], 1))
    with pytest.raises(ValueError, match="data.repeat.source"):
        RepeatConfig(1.0, 16, 16, 32, source="random")


def test_too_short_sequences_and_their_padding_are_left_unchanged() -> None:
    cfg = RepeatConfig(1.0, min_gap=12, min_len=4, max_len=8)
    g = np.random.default_rng(0)
    for length, real, copied in ((15, 15, False), (16, 16, True), (40, 15, False), (40, 16, True)):
        before = random_tokens(g, length, real)
        span = copied_span(before, copy_span(before, np.random.default_rng(length + real), cfg))
        assert (span is not None) == copied, (length, real)
        if span:
            assert span == (0, 12, 4)  # the only place: the copy ends at the real end
    before = random_tokens(g, 7, 7)  # min_gap < min_len: two non-overlapping spans need 2 x min_len
    assert copy_span(before, np.random.default_rng(0), RepeatConfig(1.0, 1, 4, 4)) is before
    before = random_tokens(g, 8, 8)
    assert copied_span(before, copy_span(before, np.random.default_rng(0), RepeatConfig(1.0, 1, 4, 4))) == (0, 4, 4)


@pytest.mark.parametrize("copies", [2, 3, 5])
def test_k_copies_each_repeat_their_own_block_and_no_copy_overwrites_a_source(copies: int) -> None:
    cfg = RepeatConfig(1.0, min_gap=16, min_len=16, max_len=48, max_gap=60, copies=copies)
    found = 0
    for seed in range(100):
        g = np.random.default_rng(seed)
        real = int(g.integers(100, 300))
        before = random_tokens(g, 320, real)
        after = copy_spans(before, np.random.default_rng([seed, 1]), cfg)
        assert np.array_equal(after[:, real:], before[:, real:])  # padding untouched
        for b in range(copies):
            lo, hi = b * real // copies, (b + 1) * real // copies
            span = copied_span(before[:, lo:hi], after[:, lo:hi])
            if hi - lo < 2 * cfg.min_len:  # too short a block for a span after its source
                assert span is None, (seed, b)
                continue
            assert span is not None, (seed, b)
            src, dst, n = span
            assert 16 <= n <= 48 and 16 <= dst - src <= 60 and src + n <= dst, (seed, b, span)
            found += 1
    assert found > 100 * copies // 2


def test_far_gap_puts_every_second_copy_beyond_the_window_and_the_others_inside() -> None:
    cfg = RepeatConfig(1.0, min_gap=16, min_len=16, max_len=48, max_gap=60, copies=4, far_gap=[96, 1536])
    seen = {0: [], 1: []}
    for seed in range(60):
        before = random_tokens(np.random.default_rng(seed), 6400, 6400)
        after = copy_spans(before, np.random.default_rng([seed, 1]), cfg)
        for b in range(4):
            lo, hi = b * 1600, (b + 1) * 1600
            src, dst, n = copied_span(before[:, lo:hi], after[:, lo:hi])
            seen[b % 2].append(dst - src)
            assert 16 <= n <= 48
    assert 16 <= min(seen[0]) and max(seen[0]) <= 60  # inside a 64-frame window
    assert 96 <= min(seen[1]) and max(seen[1]) <= 1536 and max(seen[1]) > 1000  # 1.5x to 24x beyond it


def test_far_len_lengthens_only_the_far_copies() -> None:
    cfg = RepeatConfig(1.0, min_gap=16, min_len=16, max_len=48, max_gap=60, copies=2, far_gap=[96, 700],
                       far_len=[64, 256])
    lengths: dict[int, list[int]] = {0: [], 1: []}
    for seed in range(60):
        before = random_tokens(np.random.default_rng(seed), 1536, 1536)
        after = copy_spans(before, np.random.default_rng([seed, 1]), cfg)
        for b in range(2):
            src, dst, n = copied_span(before[:, b * 768:(b + 1) * 768], after[:, b * 768:(b + 1) * 768])
            lengths[b].append(n)
            assert (16 <= dst - src <= 60) if b == 0 else (max(96, n) <= dst - src <= 700)
    assert 16 <= min(lengths[0]) and max(lengths[0]) <= 48
    assert 64 <= min(lengths[1]) and max(lengths[1]) <= 256 and max(lengths[1]) > 200
    assert sum(lengths[1]) / (60 * 1536) > 0.08  # ~4x the far targets of 16-48-frame spans (~2 %)


def test_random_far_blocks_put_far_sources_in_either_half_and_odd_keeps_the_old_draws() -> None:
    odd = RepeatConfig(1.0, min_gap=16, min_len=16, max_len=48, max_gap=60, copies=2, far_gap=[96, 700])
    rand = dataclasses.replace(odd, far_blocks="random")
    far_sources = []
    for seed in range(80):
        before = random_tokens(np.random.default_rng(seed), 1536, 1536)
        g = np.random.default_rng([seed, 1])  # "odd" draws as before far_blocks existed: inside, then far
        by_hand = np.concatenate([copy_span(before[:, :768], g, odd), copy_span(before[:, 768:], g, odd.far())], 1)
        assert np.array_equal(copy_spans(before, np.random.default_rng([seed, 1]), odd), by_hand)
        after = copy_spans(before, np.random.default_rng([seed, 1]), rand)
        for b in range(2):
            src, dst, n = copied_span(before[:, b * 768:(b + 1) * 768], after[:, b * 768:(b + 1) * 768])
            if dst - src > 60:
                far_sources.append(b * 768 + src)
    first_half = sum(s < 768 for s in far_sources)
    assert 0.3 < first_half / len(far_sources) < 0.7 and 50 < len(far_sources) < 110  # ~80 far of 160 blocks


FREE = RepeatConfig(1.0, min_gap=16, min_len=16, max_len=48, max_gap=60, copies=8, far_gap=[96, 1000],
                    far_len=[16, 320], far_blocks="random", placement="free")


@settings(max_examples=150, deadline=None)
@given(real=st.integers(0, 2500), copies=st.integers(2, 10), seed=st.integers(0, 2**32 - 1),
       far_blocks=st.sampled_from(["odd", "random"]), source=st.sampled_from(["speech", "shuffled"]))
def test_free_placement_copies_in_range_and_no_frame_read_or_written_twice(real: int, copies: int, seed: int,
                                                                           far_blocks: str, source: str) -> None:
    cfg = dataclasses.replace(FREE, copies=copies, far_blocks=far_blocks, source=source)
    before = random_tokens(np.random.default_rng(seed), real + 7, real)
    after = copy_spans(before, np.random.default_rng(seed), cfg)
    layout = free_layout(real, np.random.default_rng(seed), cfg)  # what copy_spans drew with the same generator
    far = [d - s > 60 for s, d, _ in layout]
    wanted_far = int(far_mask(np.random.default_rng(seed), cfg).sum())
    assert sum(far) <= wanted_far and len(far) - sum(far) <= copies - wanted_far
    spans = sorted(iv for s, d, n in layout for iv in ((s, s + n), (d, d + n)))
    assert all(e <= b for (_, e), (b, _) in zip(spans, spans[1:])), spans  # pairwise disjoint
    untouched = np.ones(real + 7, bool)
    for (s, d, n), f in zip(layout, far):
        assert 0 <= s and d + n <= real and d - s >= n
        assert (96 <= d - s <= 1000 and 16 <= n <= 320) if f else (16 <= d - s <= 60 and 16 <= n <= 48)
        assert np.array_equal(after[:, d:d + n], after[:, s:s + n])  # verbatim, as the model reads both
        source_frames = sorted(map(tuple, before[:, s:s + n].T))
        assert sorted(map(tuple, after[:, d:d + n].T)) == source_frames  # shuffled or not, the source's frames
        untouched[s:s + n] = untouched[d:d + n] = False
    if source == "speech":
        for s, _, n in layout:
            assert np.array_equal(after[:, s:s + n], before[:, s:s + n])
    assert np.array_equal(after[:, untouched], before[:, untouched])


def test_free_placement_keeps_far_gaps_that_blocks_shorten() -> None:
    blocks = dataclasses.replace(FREE, placement="blocks")
    free_gaps, block_gaps, placed = [], [], 0
    for seed in range(200):
        before = random_tokens(np.random.default_rng(seed), 2048, 2048)
        layout = free_layout(2048, np.random.default_rng(seed), FREE)
        placed += len(layout)
        free_gaps += [d - s for s, d, _ in layout if d - s > 60]
        after = copy_spans(before, np.random.default_rng(seed), blocks)
        for b in range(8):
            span = copied_span(before[:, b * 256:(b + 1) * 256], after[:, b * 256:(b + 1) * 256])
            if span and span[1] - span[0] > 60:
                block_gaps.append(span[1] - span[0])
    assert placed / 200 > 7.5  # 8 asked; a copy with no room is left out
    assert max(block_gaps) < 256 and np.median(free_gaps) > 450 and max(free_gaps) > 950


def test_free_placement_draws_nothing_when_prob_is_zero_and_at_most_copies_in_a_short_sequence() -> None:
    before = random_tokens(np.random.default_rng(0), 300, 300)
    assert np.array_equal(copy_spans(before, np.random.default_rng(1), dataclasses.replace(FREE, prob=0.0)), before)
    assert 3 <= len(free_layout(300, np.random.default_rng(1), FREE)) <= 8
    assert free_layout(31, np.random.default_rng(1), FREE) == []  # two 16-frame spans need 32 frames


def test_one_copy_draws_exactly_as_copy_span() -> None:
    cfg = RepeatConfig(1.0, min_gap=8, min_len=4, max_len=12)
    before = random_tokens(np.random.default_rng(0), 64, 50)
    assert np.array_equal(copy_spans(before, np.random.default_rng(5), cfg),
                          copy_span(before, np.random.default_rng(5), cfg))


def random_token_data(tmp_path: Path, repeat: RepeatConfig | None, docs: int = 6, length: int = 64) -> TokenData:
    g = np.random.default_rng(0)
    for i in range(docs):
        np.save(tmp_path / f"d{i}.npy", g.integers(0, 2**40, (3, length)))
    return TokenData(find_documents([str(tmp_path)], SkipLog()), 3, seed=3, pack=False, min_chunk=1.0, repeat=repeat)


def test_no_repeat_or_prob_zero_reads_the_sequences_as_before(tmp_path: Path) -> None:
    plain = random_token_data(tmp_path, None).batch(0, 24, 32, stage=1)
    assert torch.equal(random_token_data(tmp_path, RepeatConfig(0.0, 8, 2, 8)).batch(0, 24, 32, 1), plain)
    assert not torch.equal(random_token_data(tmp_path, RepeatConfig(1.0, 8, 2, 8)).batch(0, 24, 32, 1), plain)


@pytest.mark.parametrize("copies", [1, 2])
def test_copied_spans_are_a_function_of_the_position_only(tmp_path: Path, copies: int) -> None:
    cfg = RepeatConfig(0.5, min_gap=8, min_len=2, max_len=8, copies=copies)
    data = random_token_data(tmp_path, cfg)
    whole = data.batch(0, 24, 32, stage=1)  # two epochs
    assert torch.equal(data.sample(5, 32, 1), data.sample(5, 32, 1)) and torch.equal(data.sample(5, 32, 1), whole[5])
    assert torch.equal(torch.cat([data.batch(0, 8, 32, 1), data.batch(8, 16, 32, 1)]), whole)  # processes split
    assert torch.equal(random_token_data(tmp_path, cfg).batch(16, 8, 32, 1), whole[16:])  # a fresh (resumed) run
    plain = random_token_data(tmp_path, None).batch(0, 24, 32, 1)
    copied = [not torch.equal(a, b) for a, b in zip(whole, plain)]
    assert 0 < sum(copied) < 24  # prob 0.5: some sequences get a span, some do not


def test_eval_batches_never_get_copied_spans(tmp_path: Path) -> None:
    data = random_token_data(tmp_path, RepeatConfig(1.0, 8, 2, 8))
    plain = random_token_data(tmp_path, None)
    assert torch.equal(data.eval_batch(0, 12, 32), plain.eval_batch(0, 12, 32))
    assert not torch.equal(data.batch(0, 12, 32, 0), plain.batch(0, 12, 32, 0))


@pytest.mark.parametrize(("values", "why"), [
    ((-0.1, 300, 100, 400), r"data.repeat.prob must be in \[0, 1\], got -0.1"),
    ((1.5, 300, 100, 400), r"data.repeat.prob must be in \[0, 1\], got 1.5"),
    ((0.5, 0, 100, 400), "data.repeat.min_gap must be >= 1, got 0"),
    ((0.5, 300, 0, 400), "data.repeat.min_len must be >= 1, got 0"),
    ((0.5, 300, 100, 99), r"data.repeat.max_len must be >= min_len \(100\), got 99"),
    ((0.5, 100, 50, 150, 120), "data.repeat.max_gap must be >= min_gap and max_len .* got 120"),
    ((0.5, 10, 5, 20, None, 0), "data.repeat.copies must be >= 1, got 0"),
    ((0.5, 10, 5, 20, None, 1, [100, 200]), "data.repeat.far_gap needs copies >= 2"),
    ((0.5, 10, 5, 20, None, 2, [100, 10]), r"data.repeat.far_gap must be \[lo, hi\] .* got \[100, 10\]"),
    ((0.5, 10, 5, 20, None, 2, None, [20, 40]), "data.repeat.far_len needs far_gap"),
    ((0.5, 10, 5, 20, None, 2, None, None, "random"), "data.repeat.far_blocks needs far_gap"),
    ((0.5, 10, 5, 20, None, 2, [100, 200], None, "even"), "data.repeat.far_blocks must be odd or random, got 'even'"),
    ((0.5, 10, 5, 20, None, 2, [100, 200], [40, 20]), r"data.repeat.far_len must be \[lo, hi\] .* got \[40, 20\]"),
    ((0.5, 10, 5, 20, None, 2, [100, 200], [40, 300]), r"far_gap's hi \(200\), got \[40, 300\]"),
    ((0.5, 10, 5, 20, None, 2, None, None, "odd", "loose"), "data.repeat.placement must be blocks or free, got 'lo"),
    ((0.5, 10, 5, 20, None, 1, None, None, "odd", "free"), "data.repeat.placement: free needs copies >= 2"),
])
def test_repeat_config_rejects_bad_values_naming_the_field(values: tuple, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        RepeatConfig(*values)


def test_repeat_config_loads_from_yaml_and_set_and_round_trips() -> None:
    assert load_config(CONFIGS / "small_moshi.yaml").data.repeat is None
    cfg = load_config(CONFIGS / "small_moshi.yaml",
                      ["data.repeat={prob: 0.5, min_gap: 300, min_len: 100, max_len: 400}"])
    assert cfg.data.repeat == RepeatConfig(prob=0.5, min_gap=300, min_len=100, max_len=400)
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg  # the run dir's config.yaml
    assert load_config(CONFIGS / "small_moshi.yaml", ["data.repeat={prob: 1, min_gap: 1, min_len: 1, max_len: 1}"]
                       ).data.repeat.prob == 1.0
    mixed = load_config(CONFIGS / "small_moshi.yaml", ["data.repeat={prob: 1, min_gap: 16, max_gap: 60, min_len: 16, "
                                                       "max_len: 48, copies: 4, far_gap: [96, 1536]}"])
    assert mixed.data.repeat.far() == RepeatConfig(1.0, 96, 16, 48, 1536)
    longer = load_config(CONFIGS / "small_moshi.yaml", ["data.repeat={prob: 1, min_gap: 16, max_gap: 60, min_len: 16, "
                                                        "max_len: 48, copies: 2, far_gap: [96, 700], far_len: [64, 256]}"])
    assert longer.data.repeat.far() == RepeatConfig(1.0, 96, 64, 256, 700)
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(longer.to_dict()))) == longer
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(mixed.to_dict()))) == mixed
    with pytest.raises(ValueError, match=r"data.repeat: unknown keys \['gap'\]"):
        load_config(CONFIGS / "small_moshi.yaml", ["data.repeat={prob: 0.5, gap: 300, min_len: 100, max_len: 400}"])
    with pytest.raises(ValueError, match="data.repeat: .*missing 1 required positional argument: 'max_len'"):
        load_config(CONFIGS / "small_moshi.yaml", ["data.repeat={prob: 0.5, min_gap: 300, min_len: 100}"])
    with pytest.raises(ValueError, match="data.repeat.prob must be in"):
        load_config(CONFIGS / "small_moshi.yaml", ["data.repeat={prob: 2, min_gap: 300, min_len: 100, max_len: 400}"])
