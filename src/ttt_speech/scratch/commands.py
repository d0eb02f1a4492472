"""`ttt-speech init-moshi` (cli.py wires it in)."""

from __future__ import annotations

import argparse
import typing as tp

from ttt_speech.errors import UsageError, existing_dir, output_dir, read_json_object


def add_init_arguments(p: argparse.ArgumentParser) -> None:
    """`ttt-speech init-moshi` (scratch/moshi_lm.py writes the checkpoint)."""
    p.add_argument("--codec", required=True, help="exported codec directory (train-codec's run dir or export/)")
    p.add_argument("--corpus", required=True, help="a make-corpus directory: its texts train the text tokenizer")
    p.add_argument("--out", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="override an LM config key, e.g. --set num_layers=6 (repeatable)")
    p.add_argument("--seed", type=int, default=0)


def run_init(args: argparse.Namespace) -> None:
    """A new small Moshi-architecture LM: codec, corpus and --set checked before the tokenizer is trained."""
    import json

    from ttt_speech.codec.model import check_codec_dir
    from ttt_speech.corpus.texts import load_sources
    from ttt_speech.moshi.config import check_moshi_config
    from ttt_speech.scratch.moshi_lm import SMALL_LM, write_scratch_checkpoint
    from ttt_speech.moshi.tiny import tiny_lm_config

    check_codec_dir(args.codec)
    corpus = read_json_object(existing_dir(args.corpus, "make-corpus directory") / "corpus.json", "corpus.json")
    if not isinstance(corpus.get("texts"), (list, dict)) or not corpus["texts"]:
        raise UsageError(f"{args.corpus}/corpus.json: no 'texts' (not written by make-corpus?)")
    overrides: dict[str, tp.Any] = {}
    for item in args.set:
        key, sep, text = item.partition("=")
        try:
            if not (sep and key):
                raise ValueError(item)
            overrides[key] = json.loads(text)
        except ValueError:  # json.JSONDecodeError too
            raise UsageError(f"--set {item!r}: expected KEY=JSON, e.g. num_layers=6 (strings in JSON quotes)") from None
    check_moshi_config(tiny_lm_config(**SMALL_LM) | overrides, "--set")
    output_dir(args.out)
    names = list(corpus["texts"])
    lines = [s.text for sentences in load_sources(names).values() for s in sentences]
    ckpt = write_scratch_checkpoint(args.out, args.codec, lines, overrides, args.seed)
    print(f"wrote {ckpt.root} (texts: {', '.join(names)}; {len(lines)} sentences)")
