"""The memory line of `generate` (eval.memory_check): eval's copy probe on a shipped held-out clip, with the
memory and with it reset after the first hearing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("moshi")

from ttt_speech.eval import memory_check  # noqa: E402
from ttt_speech.eval.data import Sequence  # noqa: E402
from ttt_speech.eval.long_context import evaluate_copies  # noqa: E402
from ttt_speech.eval.memory_check import CONTEXT, SPAN, WINDOWS, MemoryCheck, check_memory  # noqa: E402
from ttt_speech.eval.models import MoshiScorer  # noqa: E402
from ttt_speech.eval.spans import copy_probes  # noqa: E402
from ttt_speech.moshi.files import SHIPPED_DIR  # noqa: E402
from ttt_speech.moshi.tiny import build_tiny_hybrid, build_tiny_lm  # noqa: E402

GAP = WINDOWS * 8  # the tiny models' attention window is 8 frames


def tiny_clip(tmp_path: Path, frames: int = CONTEXT + GAP + SPAN) -> tuple[Path, Path]:
    """A clip in the tiny models' token layout (a third of the text frames are pads), and a model directory
    holding the shipped Mimi and tokenizer (what the check compares)."""
    tmp_path.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(5)
    lm = build_tiny_lm(0)
    clip = torch.randint(0, lm.card, (lm.num_codebooks, frames), generator=g)
    clip[0] = torch.randint(4, lm.text_card, (frames,), generator=g)
    clip[0, torch.rand(frames, generator=g) < 0.33] = lm.text_padding_token_id
    np.save(tmp_path / "clip.npy", clip.numpy().astype(np.int16))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in ("mimi.safetensors", "tokenizer.model"):
        (model_dir / name).symlink_to(SHIPPED_DIR / name)
    return tmp_path / "clip.npy", model_dir


def test_the_line_holds_evals_copy_probe_numbers(tmp_path: Path) -> None:
    """The check (segments, reset by dropping the memory carry) gives what eval-long's copy probe gives the same
    tokens frame by frame, and its text number is the mean loss over the copy's word tokens, pads left out."""
    clip_path, model_dir = tiny_clip(tmp_path)
    lm = build_tiny_hybrid(0)
    check = check_memory(lm, model_dir, {}, clip_path)
    assert (check.status, check.window, check.gap, check.span) == ("ok", 8, GAP, SPAN)
    clip = torch.from_numpy(np.load(clip_path).astype(np.int64))
    probes, spans = copy_probes([Sequence("clip", clip)], [GAP], SPAN, CONTEXT, 1)
    ref = evaluate_copies(MoshiScorer(lm, "streamed"), probes, spans, reset=True, progress=False, boot=10)[GAP]
    for group in memory_check.GROUPS:
        assert check.with_memory[group] == pytest.approx(ref["again"][group], rel=1e-5)
        assert check.reset[group] == pytest.approx(ref["again (reset)"][group], rel=1e-5)
        assert check.first[group] == pytest.approx(ref["first"][group], rel=1e-5)

    tokens = probes[0].tokens[None]
    out = torch.full((1, 1 + lm.dep_q, tokens.shape[-1]), torch.nan)
    MoshiScorer(lm, "streamed").score(tokens, out, lambda step: None)
    again = spans[probes[0].name][1]
    words = tokens[0, 0, again.start:again.end] != lm.text_padding_token_id
    assert 0 < words.sum() < SPAN
    assert check.with_memory["text words"] == pytest.approx(float(out[0, 0, again.start:again.end][words].mean()),
                                                            rel=1e-5)
    assert check.with_memory["codebook 0"] == pytest.approx(float(out[0, 1, again.start:again.end].mean()), rel=1e-5)
    assert check.seconds > 0
    assert check.line().startswith(f"memory: a 2.6 s passage heard again 6.4 s later ({WINDOWS}x the 0.6 s attention "
                                   f"window) costs {check.with_memory['text words']:.2f} nats/word with the memory, "
                                   f"{check.reset['text words']:.2f} with it reset")


def test_the_reset_restarts_the_memory_and_only_the_memory(tmp_path: Path) -> None:
    """An open gate: the memory's state shapes the copy's loss, so restarting it changes the numbers. A closed gate
    (the branch adds exactly 0): the reset changes nothing (up to fp32 reassociation, helpers/numerics.py: the
    two passes run in other batches), as attention keeps its window."""
    clip_path, model_dir = tiny_clip(tmp_path)
    live = check_memory(build_tiny_hybrid(0, gate_init=0.5), model_dir, {}, clip_path)
    assert abs(live.change("text words")) > 3e-3 and abs(live.change("codebook 0")) > 3e-4, live.to_dict()  # 7e-3, 8e-4
    shut = check_memory(build_tiny_hybrid(0, gate_init=0.0), model_dir, {}, clip_path)
    assert shut.with_memory == pytest.approx(shut.reset, rel=1e-6) and shut.change("text words") == pytest.approx(0, abs=1e-6)


def test_a_model_without_attention_is_probed_as_far_back_as_the_clip_reaches(tmp_path: Path) -> None:
    from ttt_speech import TTTConfig
    from ttt_speech.moshi import convert

    clip_path, model_dir = tiny_clip(tmp_path, CONTEXT + 100 + SPAN)
    lm = convert(build_tiny_lm(0), "all", "replace", TTTConfig(dim=32, num_heads=4, mini_batch=16, gate_init=10.0))
    check = check_memory(lm, model_dir, {}, clip_path)
    assert (check.status, check.window, check.gap) == ("ok", 0, 100)
    assert check.change("text words") != 0  # nothing but the memory carries the past
    assert "heard again 8.0 s later (no attention: only the memory reaches back)" in check.line()


def test_a_model_without_memory_says_it_has_none(tmp_path: Path) -> None:
    check = check_memory(build_tiny_lm(0))
    assert (check.status, check.window, check.with_memory) == ("none", 8, {})
    assert check.line() == "memory: none (attention only): nothing that leaves its 0.6 s attention window can be recalled"


def test_the_check_is_skipped_with_a_reason_when_the_clip_is_not_the_models(tmp_path: Path) -> None:
    clip_path, model_dir = tiny_clip(tmp_path)
    lm = build_tiny_hybrid(0)
    reasons = {"built in code": check_memory(lm, None, None, clip_path)}
    (model_dir / "tokenizer.model").unlink()
    (model_dir / "tokenizer.model").write_bytes(b"another tokenizer")
    reasons["text tokenizer beside"] = check_memory(lm, model_dir, {}, clip_path)
    (model_dir / "mimi.safetensors").unlink()
    reasons["no Mimi (codec) beside"] = check_memory(lm, model_dir, {}, clip_path)
    reasons["token rows"] = check_memory(lm, model_dir, {}, memory_check.CLIP)  # the shipped clip: 17 rows
    short, short_dir = tiny_clip(tmp_path / "short", 150)
    reasons[f"needs {CONTEXT + GAP + SPAN} frames; the shipped clip holds 150"] = check_memory(lm, short_dir, {}, short)
    for words, check in reasons.items():
        assert check.status == "skipped" and words in check.reason, (words, check.reason)
        assert check.line() == f"memory check skipped: {check.reason}" and "\n" not in check.line()


def test_the_shipped_clip_is_small_and_in_the_shipped_models_layout() -> None:
    clip = np.load(memory_check.CLIP)
    assert clip.dtype == np.int16 and clip.shape == (17, 2656) and memory_check.CLIP.stat().st_size < 100_000
    config = json.loads((SHIPPED_DIR / "config.json").read_text())
    assert 0 <= clip[0].min() and clip[0].max() < config["text_card"] and clip[1:].max() < config["card"]
    assert CONTEXT + WINDOWS * config["context"] + SPAN <= clip.shape[1]  # the shipped model's probe fits
    assert (clip[0, CONTEXT:CONTEXT + SPAN] > 3).sum() >= 8  # the passage is speech: words, not pads


def test_numbers_survive_json_and_a_skip_has_none() -> None:
    check = MemoryCheck("ok", window=250, gap=2500, with_memory={"text words": 1.8, "codebook 0": 4.0},
                        reset={"text words": 2.0, "codebook 0": 4.0})
    assert json.loads(json.dumps(check.to_dict()))["change"] == {"text words": pytest.approx(-0.1), "codebook 0": 0.0}
    assert "(-10 %; codebook 0: 4.00 vs 4.00 nats/frame, +0.0 %)" in check.line()
    assert "3.3 min later (10x the 20 s attention window)" in check.line()
    assert MemoryCheck("skipped", "why").to_dict()["change"] == {}
