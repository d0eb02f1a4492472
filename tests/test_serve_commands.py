"""`ttt-speech serve` argument handling: what --model tiny, a hybrid directory and a vanilla Moshi
directory load (the model, its Mimi and tokenizer found beside it), and the refusal when one is missing."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

pytest.importorskip("moshi")
pytest.importorskip("aiohttp")

from ttt_speech.errors import UsageError  # noqa: E402
from ttt_speech.moshi import HybridLMModel  # noqa: E402
from ttt_speech.moshi.tiny import build_tiny_hybrid, write_tiny_checkpoint  # noqa: E402
from ttt_speech.moshi.files import MIMI_WEIGHTS_NAME  # noqa: E402
from ttt_speech.serve.commands import add_arguments, check_serve, load_mimi, load_model, load_tokenizer  # noqa: E402


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def load(args: argparse.Namespace, tmp: Path) -> tuple:  # type: ignore[type-arg]
    lm, model_id, raw = load_model(args.model, torch.device("cpu"), torch.float32, args.seed)
    return lm, model_id, load_mimi(args, lm, raw, torch.device("cpu")), load_tokenizer(args, lm, raw, tmp)


def test_model_mimi_and_tokenizer_are_found_for_each_kind_of_model(tmp_path: Path) -> None:
    args = parse("--model", "tiny")
    assert (args.host, args.port, args.max_sessions) == ("127.0.0.1", 8998, 4)
    lm, model_id, mimi, tok = load(args, tmp_path)
    assert isinstance(lm, HybridLMModel) and model_id == "tiny-hybrid/seed=0"
    assert mimi.cardinality == lm.card and tok.vocab_size() == lm.text_card

    vanilla_dir = write_tiny_checkpoint(tmp_path / "vanilla").root
    lm, vanilla_id, mimi, tok = load(parse("--model", str(vanilla_dir)), tmp_path)
    assert type(lm).__name__ == "LMModel" and mimi.cardinality == lm.card and tok.vocab_size() == lm.text_card

    build_tiny_hybrid(0).save_pretrained(vanilla_dir)  # the same directory, now with a hybrid's config
    lm, hybrid_id, _, _ = load(parse("--model", str(vanilla_dir)), tmp_path)
    assert isinstance(lm, HybridLMModel) and hybrid_id != vanilla_id  # the config hash names the model

    (vanilla_dir / MIMI_WEIGHTS_NAME).unlink()
    with pytest.raises(UsageError, match="--mimi"):
        load(parse("--model", str(vanilla_dir)), tmp_path)
    _, _, mimi, _ = load(parse("--model", str(vanilla_dir), "--mimi", "tiny"), tmp_path)
    assert mimi.cardinality == lm.card


def test_the_default_model_is_the_shipped_small_hybrid_with_its_codec(tmp_path: Path) -> None:
    lm, _, mimi, tok = load(parse(), tmp_path)
    assert isinstance(lm, HybridLMModel) and (lm.n_q, lm.dep_q, lm.card) == (16, 8, 1024)
    assert mimi.num_codebooks == 8 and mimi.cardinality == 1024 and tok.vocab_size() <= lm.text_card


def test_listen_db_needs_an_in_place_memory(tmp_path: Path) -> None:
    """--listen-db gates an in-place memory's writes: the shipped model has one; tiny (TTT) and a vanilla Moshi are
    refused in one line before anything loads."""
    state = ["--state-dir", str(tmp_path / "states"), "--port", "0"]
    assert check_serve(parse("--listen-db", "-50", *state)) is not None
    with pytest.raises(UsageError, match="--listen-db -50.0: the tiny model has no in-place memory"):
        check_serve(parse("--model", "tiny", "--listen-db", "-50", *state))
    vanilla = write_tiny_checkpoint(tmp_path / "vanilla").root
    with pytest.raises(UsageError, match=f"{vanilla} has no in-place memory"):
        check_serve(parse("--model", str(vanilla), "--listen-db", "-50", *state))
    with pytest.raises(SystemExit):  # a level above full scale (a forgotten minus) would gate every frame
        parse("--listen-db", "50")
