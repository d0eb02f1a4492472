"""recipes/evidence24/tok24.py's pack plumbing for tokens encoded in parallel parts: PART=i/n takes every n-th
recording, merge joins disjoint parts into the pack that unpack reads, and refuses parts that overlap; a dialogue's
user channel is encoded and kept, a silent one rebuilt from the cached silence."""

from __future__ import annotations

import importlib.util
import json
import os
import wave
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

TOK24 = Path(__file__).parents[1] / "recipes" / "evidence24" / "tok24.py"


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    src = str(Path(__file__).parents[1] / "src")
    return subprocess.run([sys.executable, str(TOK24), *args], capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": src} | env)


def part(root: Path, name: str, keys: dict[str, list[str]]) -> Path:
    """A pack holding [9, frames] int16 rows per recording key (frames = a number derived from the key)."""
    d = root / name
    d.mkdir()
    save_file({"silence": np.zeros((8, 40), np.int16)}, str(d / "silence.safetensors"))
    for split, names in keys.items():
        save_file({k: np.full((9, 3 + len(k)), len(k), np.int16) for k in names}, str(d / f"{split}.safetensors"))
    return d


def test_merge_joins_disjoint_parts_and_unpack_reads_the_result(tmp_path: Path) -> None:
    a = part(tmp_path, "a", {"train": ["kjv/r0.wav", "kjv/r2.wav"], "val": ["kjv/r4.wav"]})
    b = part(tmp_path, "b", {"train": ["kjv/r1.wav"], "val": ["jargon/r0.wav", "devil/r0.wav"]})
    out = run("merge", str(tmp_path / "pack"), str(a), str(b))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["train 3 recordings 39 frames", "val 3 recordings 44 frames"]
    train = load_file(str(tmp_path / "pack" / "train.safetensors"))
    assert sorted(train) == ["kjv/r0.wav", "kjv/r1.wav", "kjv/r2.wav"] and train["kjv/r1.wav"].shape == (9, 13)
    out = run("unpack", str(tmp_path / "pack"), str(tmp_path / "tok"))
    assert out.returncode == 0, out.stderr
    assert "train 3 documents 39 frames" in out.stdout and (tmp_path / "tok" / "val" / "index.json").exists()


def test_merge_refuses_a_recording_in_two_parts(tmp_path: Path) -> None:
    a = part(tmp_path, "a", {"train": ["kjv/r0.wav"], "val": []})
    b = part(tmp_path, "b", {"train": ["kjv/r0.wav", "kjv/r1.wav"], "val": []})
    out = run("merge", str(tmp_path / "pack"), str(a), str(b))
    assert out.returncode != 0 and "recordings ['kjv/r0.wav'] are in another part" in out.stderr


def load_tok24():
    spec = importlib.util.spec_from_file_location("tok24", TOK24)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("spec, picked", [("0/1", [0, 1, 2, 3, 4]), ("0/2", [0, 2, 4]), ("1/2", [1, 3]),
                                          ("2/3", [2])])
def test_part_takes_every_nth_recording(spec: str, picked: list[int]) -> None:
    assert load_tok24().part_of(list(range(5)), spec) == picked


@pytest.mark.parametrize("spec", ["2/2", "1", "a/b", "-1/2"])
def test_a_bad_part_says_how_to_write_it(spec: str) -> None:
    with pytest.raises(SystemExit, match=f"PART={spec}: give i/n with 0 <= i < n"):
        load_tok24().part_of([1, 2], spec)


def test_unpack_keeps_a_speaking_users_codebooks_and_fills_a_silent_ones(tmp_path: Path) -> None:
    pack = tmp_path / "pack"
    pack.mkdir()
    silence = np.arange(8 * 40, dtype=np.int16).reshape(8, 40)
    save_file({"silence": silence}, str(pack / "silence.safetensors"))
    dialogue = np.full((17, 12), 7, np.int16)  # text + the model's 8 + the user's 8 (tok24 encode of a dialogue)
    save_file({"c/readings/r.wav": np.full((9, 10), 3, np.int16), "c/dialogues/d.wav": dialogue},
              str(pack / "train.safetensors"))
    out = run("unpack", str(pack), str(tmp_path / "tok"))
    assert out.returncode == 0, out.stderr
    index = json.loads((tmp_path / "tok/train/index.json").read_text())
    docs = {d["source"]: load_file(str(tmp_path / "tok/train" / d["shard"]))[d["key"]] for d in index["documents"]}
    np.testing.assert_array_equal(docs["c/dialogues/d.wav"], dialogue)
    np.testing.assert_array_equal(docs["c/readings/r.wav"][9:], silence[:, :10])


def test_encode_packs_the_user_channel_of_a_dialogue_only(tmp_path: Path) -> None:
    """The shipped codec on the CPU, two 2-second recordings: a reading (right channel silent) -> 9 rows, a
    dialogue (a tone on the right) -> 17, the user's rows unlike silence's codes."""
    rate = 24000
    corpus = tmp_path / "c"
    t = np.arange(2 * rate) / rate
    tone = (0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype(np.int16)
    for name, right in (("readings/r", np.zeros_like(tone)), ("dialogues/d", tone[::-1].copy())):
        path = corpus / f"{name}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        with wave.open(str(path), "wb") as w:
            w.setnchannels(2)
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes(np.stack([tone, right], 1).tobytes())
        path.with_suffix(".json").write_text(json.dumps({"alignments": [["hello", [0.2, 0.6], "SPEAKER_MAIN"]]}))
    (corpus / "train.jsonl").write_text("".join(json.dumps({"path": f"{n}.wav", "duration": 2.0}) + "\n"
                                                for n in ("readings/r", "dialogues/d")))
    (corpus / "val.jsonl").write_text("")
    pack = tmp_path / "pack"
    early = run("encode", str(pack), str(corpus))  # no silence cache yet: said before any encoding
    assert early.returncode != 0 and "silence.safetensors: missing" in early.stderr and "encoded" not in early.stdout
    for args in (("silence", str(pack), "30"), ("encode", str(pack), str(corpus))):
        out = run(*args)
        assert out.returncode == 0, out.stderr
    train = load_file(str(pack / "train.safetensors"))
    reading, dialogue = train["c/readings/r.wav"], train["c/dialogues/d.wav"]
    silence = load_file(str(pack / "silence.safetensors"))["silence"]
    assert reading.shape == (9, 25) and dialogue.shape == (17, 25)
    np.testing.assert_array_equal(dialogue[:9], reading)  # the same left channel and words
    assert (dialogue[9:] != silence[:, :25]).mean() > 0.5
    assert run("unpack", str(pack), str(tmp_path / "tok")).returncode == 0
    out = run("tokens", str(tmp_path / "pack2"), str(tmp_path / "tok2"), "0.01", str(corpus))  # the three in one
    assert out.returncode == 0, out.stderr
    assert load_file(str(tmp_path / "pack2" / "silence.safetensors"))["silence"].shape == (8, 758)
    one, three = (json.loads((tmp_path / d / "train" / "index.json").read_text()) for d in ("tok", "tok2"))
    assert one["documents"] == three["documents"] and len(one["documents"]) == 2
    for shard in (tmp_path / "tok" / "train").glob("*.safetensors"):
        got, want = load_file(str(tmp_path / "tok2" / "train" / shard.name)), load_file(str(shard))
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
