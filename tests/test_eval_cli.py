"""`ttt-speech eval-long` end to end on tiny models, the HF scorer against the model's own forward, shards."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

pytest.importorskip("moshi")
pytest.importorskip("transformers", minversion="5.23")  # pyproject's hf extra

from helpers.moshi import random_codes
from helpers.hf import tiny_model, ttt_config

from ttt_speech.eval import commands
from ttt_speech.eval.data import load_sequences, save_sequence
from ttt_speech.eval.models import HFScorer, _cross_entropy, load_model
from ttt_speech.hf import convert
from ttt_speech.moshi.tiny import build_tiny_lm

pytestmark = pytest.mark.usefixtures("one_thread")


def hf_hybrid():
    return convert(tiny_model("llama"), layers=(1, 2), mode="hybrid", ttt=ttt_config(0.5), attention_window=8)


def test_hf_scorer_equals_the_windowed_forward():
    """Chunks of 5 through the MemoryCache (window 8, 30 tokens) give the losses of one windowed forward."""
    model = hf_hybrid()
    ids = torch.randint(3, 97, (2, 30), generator=torch.Generator().manual_seed(0))
    scorer = HFScorer(model, "hf", chunk=5)
    out = torch.full((2, 1, 30), torch.nan)
    ticks: list[int] = []
    scorer.score(ids[:, None], out, ticks.append)
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    want = _cross_entropy(logits[:, :-1], ids[:, 1:])
    assert out[:, 0, 0].isnan().all() and ticks == [5, 10, 15, 20, 25, 30]
    torch.testing.assert_close(out[:, 0, 1:], want, rtol=1e-4, atol=1e-4)
    assert scorer.attention_window == 8


def test_shards_npy_and_safetensors(tmp_path):
    a = torch.arange(10).view(2, 5)
    save_sequence(tmp_path / "b.safetensors", a)
    save_sequence(tmp_path / "sub" / "a.npy", a + 1)
    np.save(tmp_path / "c.npy", np.arange(7, dtype=np.int32))  # a text-only [T] shard
    seqs = load_sequences(tmp_path)
    assert [s.name for s in seqs] == ["b.safetensors", "c.npy", "sub/a.npy"]
    assert torch.equal(seqs[0].tokens, a) and torch.equal(seqs[2].tokens, a + 1) and seqs[1].tokens.shape == (1, 7)
    np.save(tmp_path / "bad.npy", np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="integers"):
        load_sequences(tmp_path / "bad.npy")


def test_eval_long_end_to_end(tmp_path, capsys):
    """A planted-window vanilla Moshi (context 1), the tiny TTT hybrid and an HF hybrid directory, side by side."""
    lm = build_tiny_lm(0)
    for i, codes in enumerate(random_codes(lm, 2, 70, seed=7)):
        save_sequence(tmp_path / "held_out" / f"s{i}.npy", codes)
    from ttt_speech.moshi.tiny import tiny_lm_config, write_tiny_checkpoint

    write_tiny_checkpoint(tmp_path / "w1", lm_config=tiny_lm_config(context=1), tokenizer=False)
    hf = hf_hybrid()
    hf.save_pretrained(tmp_path / "hf")
    parser = argparse.ArgumentParser()
    commands.add_arguments(parser)
    args = parser.parse_args([
        "--model", "tiny", "--model", f"window1={tmp_path / 'w1'}", "--model", str(tmp_path / "hf"),
        "--data", str(tmp_path / "held_out"), "--lengths", "16,32,64", "--out", str(tmp_path / "report"),
        "--minutes", "2", "--frames-per-minute", "15", "--prompt-frames", "5", "--batch-size", "2",
        "--copy-gaps", "20", "--copy-span", "8", "--copy-context", "4", "--copy-probes", "1", "--copy-controls",
        "--no-progress"])
    files = commands.run(args)
    for name in ("report", "results", "degradation", "free_run", "loss_vs_position_text", "loss_vs_position_audio1",
                 "recall_vs_gap"):
        assert files[name].is_file() and files[name].stat().st_size > 1000, name
    res = json.loads(files["results"].read_text())
    names = [r["name"] for r in res["long_context"]]
    assert names == ["tiny", "window1", "hf"]
    tiny, w1, hf_res = res["long_context"]
    groups = {"text words", "codebook 0", "codebooks 1-7"}
    assert set(tiny["copy_loss"]["20"]["again"]) == groups and tiny["copy_loss"]["20"]["probes"] == 2
    assert set(tiny["copy_loss"]["20"]) == {"probes", "first", "again", "ratio", "again/replaced", "again/reset",
                                            "again (replaced)", "again (reset)"}
    for control in ("replaced", "reset"):  # a control's own loss on the copy: the copy's over the ratio
        for group, (ratio, _, _) in tiny["copy_loss"]["20"][f"again/{control}"].items():
            own = tiny["copy_loss"]["20"][f"again ({control})"][group]
            assert own == pytest.approx(tiny["copy_loss"]["20"]["again"][group] / ratio), (control, group)
    assert hf_res["copy_loss"]["20"]["first"]["codebook 0"] is None and "again/reset" not in hf_res["copy_loss"]["20"]
    assert (tiny["attention_window"], w1["attention_window"], hf_res["attention_window"]) == (8, 1, 8)
    assert hf_res["streams"] == ["text"] and w1["streams"] == ["text", "audio0", "audio1"]
    # every position of both 70-frame sequences up to 64 is scored, text and audio
    assert sum(tiny["bucket_count"]["audio1"]) == 2 * 64 and sum(hf_res["bucket_count"]["text"]) == 2 * 63
    # the report's numbers are evaluate()'s (same seed, same model, same data)
    from ttt_speech.eval.long_context import evaluate

    direct = evaluate(load_model("tiny").scorer, load_sequences(tmp_path / "held_out"), [16, 32, 64],
                      batch_size=2, progress=False)
    assert [x["loss"] for x in tiny["lengths"]] == pytest.approx([x.loss for x in direct.lengths], rel=1e-6)
    assert [len(r["minutes"]) for r in res["free_runs"]] == [2, 2, 2]
    assert res["free_runs"][2]["prompt_frames"] == 5
    md = files["report"].read_text()
    assert "| window1 | moshi | 1 |" in md and "## Free-running generation" in md
    # the Moshi directory brings its Mimi: that run is decoded and its voice scored; the built-in has none
    assert res["free_runs"][1]["speaker_method"] in ("mfcc-stats", "resemblyzer")
    assert res["free_runs"][0]["speaker_method"] is None and res["free_runs"][0]["audio"] == []
    assert "tiny: baseline loss" in capsys.readouterr().err


def test_eval_long_segment_scores_what_streaming_does(tmp_path) -> None:
    """--segment: the training path's losses, per position bucket and per copy probe, equal streaming's."""
    lm = build_tiny_lm(0)
    for i, codes in enumerate(random_codes(lm, 2, 70, seed=3)):
        save_sequence(tmp_path / "held_out" / f"s{i}.npy", codes)
    parser = argparse.ArgumentParser()
    commands.add_arguments(parser)
    results = []
    for extra in ([], ["--segment", "32"]):
        args = parser.parse_args(["--model", "tiny", "--data", str(tmp_path / "held_out"), "--lengths", "16,64",
                                  "--out", str(tmp_path / f"r{len(extra)}"), "--minutes", "0", "--copy-gaps", "20",
                                  "--copy-span", "8", "--copy-context", "4", "--copy-probes", "2", "--copy-controls",
                                  "--no-progress", *extra])
        results.append(json.loads(commands.run(args)["results"].read_text())["long_context"][0])
    streamed, segmented = results
    for stream, losses in streamed["bucket_loss"].items():
        assert segmented["bucket_loss"][stream] == pytest.approx(losses, rel=1e-5), stream
    for key in ("again", "first", "again (replaced)", "again (reset)"):
        assert segmented["copy_loss"]["20"][key] == pytest.approx(streamed["copy_loss"]["20"][key], rel=1e-5), key
    assert load_model("tiny", segment=32).scorer.segment == 32 and load_model("tiny").scorer.segment is None


def test_parse_lengths():
    assert commands.parse_lengths("8192,4096, 4096") == [4096, 8192]
    with pytest.raises(argparse.ArgumentTypeError):
        commands.parse_lengths("4k")


def test_eval_long_scores_quotes_with_their_controls(tmp_path):
    """--quotes: the dialogues' quotes (corpus.json) found in --data by source and scored with both controls."""
    lm = build_tiny_lm(0)
    paths = [save_sequence(tmp_path / "held_out" / f"d{i}.npy", codes)
             for i, codes in enumerate(random_codes(lm, 2, 70, seed=7))]
    sources = [s.source for s in load_sequences(tmp_path / "held_out")]
    quote = {"said": [0.8, 1.28], "quoted": [2.4, 2.88], "sentences": [1, 2], "gap": 1.12}  # frames 10-16, 30-36
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "corpus.json").write_text(json.dumps(
        {"recordings": [{"path": src, "quotes": [quote]} for src in sources]}))
    assert len(paths) == 2 and all(sources)
    parser = argparse.ArgumentParser()
    commands.add_arguments(parser)
    args = parser.parse_args(["--model", "tiny", "--data", str(tmp_path / "held_out"), "--lengths", "16",
                              "--out", str(tmp_path / "report"), "--quotes", str(tmp_path / "corpus"),
                              "--copy-context", "4", "--copy-controls", "--no-progress"])
    files = commands.run(args)
    tiny = json.loads(files["results"].read_text())["long_context"][0]
    entry = tiny["quote_loss"]["16"]  # quoted 20 frames after the user's sentence began: bucket 16-31
    assert entry["probes"] == 2 and {"again/replaced", "again/reset"} <= set(entry)
    assert all(0 < r < 10 for r, _, _ in entry["again/replaced"].values())
    assert "Recall of what the user said" in files["report"].read_text()
