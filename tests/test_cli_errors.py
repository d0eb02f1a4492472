"""Bad input on the command line: one line on stderr naming the input, exit code 2, no traceback, nothing loaded.

Each row runs the real entry point (`cli.main`) in-process on one bad input; a few run as a user would,
in a subprocess. `--debug` / TTT_SPEECH_DEBUG=1 bring the traceback back. Every row is refused before a
model is built, which keeps the table fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ttt_speech import cli
from ttt_speech.errors import (UsageError, fraction, nonnegative_float, port, positive_float, positive_int,
                               seconds_or_off)

SHIPPED = Path(cli.__file__).parent / "assets" / "small_moshi"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Bad (and a few good) files, made without building a model."""
    with contextlib.suppress(ImportError):  # transformers' import-time warnings land here, not in a row's stderr
        import ttt_speech.hf.checkpoint  # noqa: F401
    d = tmp_path_factory.mktemp("bad_inputs")
    config = json.loads((SHIPPED / "config.json").read_text())
    good = SHIPPED / "mimi.safetensors"
    out: dict[str, Path] = {"dir": d, "good_st": good}
    (d / "truncated.safetensors").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    out["truncated"] = d / "truncated.safetensors"
    (d / "garbage.safetensors").write_bytes(b"not a tensor file")
    out["garbage"] = d / "garbage.safetensors"
    (d / "broken.json").write_text('{"dim": 4,')
    out["broken_json"] = d / "broken.json"
    (d / "list.json").write_text("[1, 2]")
    out["list_json"] = d / "list.json"
    (d / "a_file").write_text("x")
    out["a_file"] = d / "a_file"

    def moshi_dir(name: str, cfg: dict, weights: Path | None = good) -> Path:
        root = d / name
        root.mkdir()
        (root / "config.json").write_text(json.dumps(cfg))
        if weights is not None:
            shutil.copyfile(weights, root / "model.safetensors")
        return root

    vanilla = {k: v for k, v in config.items() if k != "memory"}
    out["vanilla"] = moshi_dir("vanilla", vanilla, None)
    with contextlib.suppress(ImportError):  # weights of the shipped model's shape, without its TTT layers
        from ttt_speech.moshi.config import lm_kwargs
        from ttt_speech.moshi.files import save_moshi_checkpoint
        from ttt_speech.moshi.tiny import build_tiny_lm

        save_moshi_checkpoint(build_tiny_lm(0, lm_kwargs(vanilla)), vanilla, out["vanilla"])
    out["vanilla_st"] = out["vanilla"] / "model.safetensors"
    out["codec_as_lm"] = moshi_dir("codec_as_lm", vanilla)
    out["misspelled"] = moshi_dir("misspelled", {**vanilla, "num_layer": 5})
    out["wrong_type"] = moshi_dir("wrong_type", {**vanilla, "dim": "192"})
    out["bad_delays"] = moshi_dir("bad_delays", {**vanilla, "delays": [0, 1]})
    out["truncated_hybrid"] = moshi_dir("truncated_hybrid", config, out["truncated"])
    out["no_weights"] = moshi_dir("no_weights", vanilla, None)
    out["bad_section"] = moshi_dir("bad_section", {**config, "memory": {**config["memory"], "mode": "both"}})
    out["both_sections"] = moshi_dir("both_sections", {**config, "ttt": config["memory"]})  # today's name + the old
    held = d / "held_out"
    held.mkdir()
    n_rows = 1 + vanilla["n_q"]
    np.save(held / "s0.npy", np.zeros((n_rows, 300), dtype=np.int64))
    for name, row, value in (("big_text", 0, 5000), ("big_audio", 3, 2000)):
        tokens = np.zeros((n_rows, 300), dtype=np.int64)
        tokens[row, 7] = value
        (d / name).mkdir()
        np.save(d / name / "s0.npy", tokens)
        out[name] = d / name
    out["held_out"] = held
    (d / "few_rows").mkdir()
    np.save(d / "few_rows" / "s0.npy", np.zeros((3, 300), dtype=np.int64))
    out["few_rows"] = d / "few_rows"
    np.save(d / "flat.npy", np.zeros(40, dtype=np.int64))
    out["flat_npy"] = d / "flat.npy"
    (d / "bad.yaml").write_text("model: {tiny: true\nstages: [")
    out["bad_yaml"] = d / "bad.yaml"
    (d / "unknown_key.yaml").write_text("model: {tiny: true}\ntrain: {batch_sizee: 2}\n")
    out["unknown_key_yaml"] = d / "unknown_key.yaml"
    (d / "list.yaml").write_text("- 1\n- 2\n")
    (d / "typed.yaml").write_text("model: {tiny: true}\ntrain: {batch_size: four}\n")
    out["typed_yaml"] = d / "typed.yaml"
    out["list_yaml"] = d / "list.yaml"
    run = d / "run"
    run.mkdir()
    out["run"] = run
    hf = d / "unknown_llm"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "no_such_llm", "architectures": ["NoSuchLM"]}))
    out["unknown_llm"] = hf
    for name, weights in (("weightless_llm", None), ("truncated_llm", out["truncated"])):
        root = d / name
        root.mkdir()
        (root / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
                                                      "num_attention_heads": 4}))
        if weights is not None:
            shutil.copyfile(weights, root / "model.safetensors")
        out[name] = root
    mixtral = d / "mixtral"  # a mixture of experts: no in-place branch, and in-place is the default
    mixtral.mkdir()
    (mixtral / "config.json").write_text(json.dumps({"model_type": "mixtral", "hidden_size": 64, "num_hidden_layers": 2,
                                                     "num_attention_heads": 4, "num_local_experts": 4}))
    shutil.copyfile(out["good_st"], mixtral / "model.safetensors")
    out["mixtral"] = mixtral
    corpus = d / "corpus"
    corpus.mkdir()
    (corpus / "corpus.json").write_text(json.dumps({"recordings": []}))
    out["corpus"] = corpus
    out["shipped"] = SHIPPED
    with contextlib.suppress(ImportError):
        from ttt_speech.moshi.tiny import write_tiny_tokenizer

        out["small_tokenizer"] = write_tiny_tokenizer(d / "small.model", 64)  # the models here read 1000
    return out


# (argv with {name} standing for files[name], a piece of the one stderr line that names the bad input)
ROWS: list[tuple[str, str]] = [
    # generate: numbers and switches
    ("generate --minutes -5", "--minutes: -5"),
    ("generate --minutes 0", "--minutes: 0"),
    ("generate --minutes nan", "--minutes: 'nan'"),
    ("generate --minutes abc", "--minutes: 'abc'"),
    ("generate --batch-size 0", "--batch-size: 0"),
    ("generate --batch-size 1.5", "--batch-size: '1.5'"),
    ("generate --temp -1", "--temp: -1"),
    ("generate --temp-text -0.1", "--temp-text: -0.1"),
    ("generate --dtype float64", "--dtype: invalid choice: 'float64'"),
    ("generate --quantize int2", "--quantize: invalid choice: 'int2'"),
    ("generate --tiny --hybrid {vanilla}", "--hybrid: not allowed with argument --tiny"),
    ("generate --tiny --moshi-weights {good_st}", "--moshi-weights: not allowed with argument --tiny"),
    ("generate --tiny-mimi --mimi-weights {good_st}", "--mimi-weights: not allowed with argument --tiny-mimi"),
    ("generate --moshi-weights {good_st}", "--moshi-weights needs --config"),
    ("generate --config {vanilla}/config.json", "--config is the config of --moshi-weights"),
    ("generate --tiny --mimi-config {broken_json}", "--mimi-config is the config of --mimi-weights"),
    ("generate --no-such-flag", "unrecognized arguments: --no-such-flag"),
    ("generate --device tpu", "--device tpu"),
    ("generate --device cuda:99", "--device cuda:99"),  # no CUDA here, or not 100 devices
    ("generate --tiny --quantize int4 --device cpu", "--quantize int4 needs --device cuda"),
    # generate: files
    ("generate --hybrid /nonexistent/dir", "/nonexistent/dir: no such hybrid checkpoint directory"),
    ("generate --hybrid {a_file}", "a_file: is a file"),
    ("generate --hybrid {vanilla}", "has no 'memory' section"),
    ("generate --hybrid {truncated_hybrid}", "truncated_hybrid/model.safetensors: truncated"),
    ("generate --hybrid {bad_section}", "memory.mode must be one of"),
    ("generate --hybrid {both_sections}", "both_sections/config.json has both a 'memory' section and its old name"),
    ("generate --hybrid {dir}", "config.json: no such Moshi config.json"),
    ("generate --moshi-weights {truncated} --config {vanilla}/config.json", "truncated.safetensors: "),
    ("generate --moshi-weights {good_st} --config {vanilla}/config.json",
     "mimi.safetensors: not the weights of the model"),
    ("generate --moshi-weights {garbage} --config {vanilla}/config.json", "garbage.safetensors: not a safetensors"),
    ("generate --moshi-weights {good_st} --config {misspelled}/config.json", "unknown key 'num_layer'"),
    ("generate --moshi-weights {good_st} --config {wrong_type}/config.json", 'dim = "192" has the wrong type'),
    ("generate --moshi-weights {good_st} --config {bad_delays}/config.json", "delays has 2 entries"),
    ("generate --moshi-weights {good_st} --config {broken_json}", "broken.json: not valid JSON"),
    ("generate --moshi-weights {good_st} --config {list_json}", "list.json: a Moshi config.json must hold"),
    ("generate --moshi-weights {good_st} --config /nonexistent.json", "/nonexistent.json: no such"),
    ("generate --tiny --mimi-weights {truncated}", "truncated.safetensors: "),
    ("generate --tiny --mimi-weights {good_st} --mimi-config {broken_json}", "broken.json: not valid JSON"),
    ("generate --tiny --out {a_file}", "a_file: is a file"),
    ("generate --tiny --out {a_file}/sub", "a_file/sub: cannot write there"),
    # serve: numbers, "off" spelled out, files
    ("serve --port 99999", "--port: 99999"),
    ("serve --port -1", "--port: -1"),
    ("serve --max-sessions 0", "--max-sessions: 0"),
    ("serve --max-kept 0", "--max-kept: 0"),
    ("serve --keep-hours 0", "--keep-hours: 0"),
    ("serve --idle-timeout -1", "--idle-timeout: -1"),
    ("serve --idle-timeout 0", "--idle-timeout: 0"),
    ("serve --idle-timeout never", "--idle-timeout: 'never'"),
    ("serve --max-message-bytes 0", "--max-message-bytes: 0"),
    ("serve --max-message-bytes -5", "--max-message-bytes: -5"),
    ("serve --shutdown-after 0", "--shutdown-after: 0"),
    ("serve --top-k -1", "--top-k: -1"),
    ("serve --temp -2", "--temp: -2"),
    ("serve --device cpu --model /nonexistent", "/nonexistent: no such --model directory"),
    ("serve --device cpu --model {dir}", "no config.json"),
    ("serve --device cpu --model {misspelled}", "unknown key 'num_layer'"),
    ("serve --device cpu --model {no_weights}", "no Moshi weights"),
    ("serve --device cpu --model {truncated_hybrid}", "model.safetensors: truncated"),
    ("serve --device cpu --model {both_sections}", "both_sections/config.json has both a 'memory' section"),
    ("serve --device cpu --model tiny --mimi /nonexistent.safetensors", "/nonexistent.safetensors: no such"),
    ("serve --device cpu --model tiny --mimi {garbage}", "garbage.safetensors: not a safetensors"),
    ("serve --device cpu --model tiny --tokenizer {a_file}", "a_file: not a SentencePiece model"),
    ("serve --device cpu --model tiny --tokenizer /nonexistent.model", "/nonexistent.model: no such"),
    ("serve --device cpu --model tiny --state-dir {a_file}", "a_file: is a file"),
    ("serve --device cpu --model {vanilla}", "no Mimi found beside the model"),
    ("serve --device cpu --model tiny --quantize int4", "--quantize int4 needs --device cuda"),
    ("serve --device cpu --model {vanilla} --mimi tiny --tokenizer {small_tokenizer}",
     "small.model: 64 text tokens, fewer than the model's text_card 1000"),
    # convert-moshi: options tried on a weightless copy before any weights are read
    ("convert-moshi --moshi-weights {truncated} --config {vanilla}/config.json --out {dir}/o", "truncated.safetensors"),
    ("convert-moshi --moshi-weights {good_st} --config {misspelled}/config.json --out {dir}/o", "unknown key 'num_layer'"),
    ("convert-moshi --moshi-weights {vanilla_st} --config {vanilla}/config.json --out {dir}/o --layers 9",
     "convert-moshi: layer index 9 out of range for 5 layers"),
    ("convert-moshi --moshi-weights {vanilla_st} --config {vanilla}/config.json --out {dir}/o --layers 2-x",
     "--layers: bad layer list '2-x'"),
    ("convert-moshi --moshi-weights {vanilla_st} --config {vanilla}/config.json --out {dir}/o --mini-batch 0",
     "--mini-batch: 0"),
    ("convert-moshi --moshi-weights {vanilla_st} --config {vanilla}/config.json --out {dir}/o --branch gdn --inner mlp",
     "--inner is an option of --branch ttt; it does not apply to --branch gdn"),
    ("convert-moshi --moshi-weights {vanilla_st} --config {vanilla}/config.json --out {dir}/o --branch ttt --chunk 8",
     "--chunk is an option of --branch inplace; it does not apply to --branch ttt"),
    ("convert-moshi --moshi-weights {vanilla_st} --config {vanilla}/config.json --out {dir}/o --branch gdn --mode replace",
     "replace"),
    ("convert-moshi --moshi-weights {vanilla_st} --config {vanilla}/config.json --out {dir}/o --branch ttt --mode replace --gate-init 0",
     "gate_init=0"),
    ("convert-moshi --moshi-weights {vanilla_st} --config {vanilla}/config.json --out {dir}/o --variant fla",
     "--variant is an option of --branch ttt, not of --branch inplace (the default branch since issue 23): add --branch ttt"),
    ("convert-moshi --moshi-weights {vanilla_st} --config {vanilla}/config.json --out {dir}/o --ttt-config {broken_json}",
     "broken.json: not valid JSON"),  # --ttt-config: the old name of --memory-config
    ("convert-moshi --moshi-weights {vanilla_st} --config {vanilla}/config.json --out {dir}/o --memory-config {vanilla}/config.json",
     "--memory-config"),
    ("convert-moshi --moshi-weights {vanilla_st} --config {vanilla}/config.json --out {a_file}", "a_file: is a file"),
    # convert-hf: the directory is judged before anything is built
    ("convert-hf --model {shipped} --layers 1 --out {dir}/o", "a Moshi checkpoint, not a transformers LLM"),
    ("convert-hf --model /nonexistent --layers 1 --out {dir}/o", "/nonexistent: no such transformers model directory"),
    ("convert-hf --model {dir} --layers 1 --out {dir}/o", "config.json: no such transformers config.json"),
    ("convert-hf --model {unknown_llm} --layers 1 --out {dir}/o", "cannot tell which transformers language model"),
    ("convert-hf --model {weightless_llm} --layers 1 --out {dir}/o", "weightless_llm: no weights (model.safetensors"),
    ("convert-hf --model {truncated_llm} --layers 1 --out {dir}/o", "truncated_llm/model.safetensors: truncated"),
    ("convert-hf --model {unknown_llm} --layers 1-x --out {dir}/o", "--layers: bad layer list '1-x'"),
    ("convert-hf --model {unknown_llm} --layers 1 --out {dir}/o --attention-window 0", "--attention-window: 0"),
    ("convert-hf --model {unknown_llm} --layers 1 --out {dir}/o --mini-batch -1", "--mini-batch: -1"),
    ("convert-hf --model {unknown_llm} --layers 1 --out {dir}/o --dtype fp8", "--dtype: invalid choice: 'fp8'"),
    ("convert-hf --model {mixtral} --layers 1 --out {dir}/o", "mixtures of experts, which have no one down_proj to make "
     "in-place fast weights of (in-place is the default branch): use --branch ttt"),
    # eval-long: data judged before any model loads
    ("eval-long --model tiny --data {held_out} --lengths 1000,2000", "--lengths 1000,2000: the longest held-out"),
    ("eval-long --model tiny --data {held_out} --lengths 64,1000", "--lengths 1000:"),
    ("eval-long --model tiny --data {held_out} --lengths 64 --baseline-length 4000", "--baseline-length 4000"),
    ("eval-long --model tiny --data {held_out} --batch-size 0", "--batch-size: 0"),
    ("eval-long --model tiny --data {held_out} --lengths 4k", "--lengths: '4k' is not a comma-separated list"),
    ("eval-long --model tiny --data {held_out} --lengths 1", "--lengths: lengths must be integers >= 2"),
    ("eval-long --model tiny --data {held_out} --lengths ,", "--lengths: ',': give comma-separated integers"),
    ("eval-long --model tiny --data {held_out} --max-sequences 0", "--max-sequences: 0"),
    ("eval-long --model tiny --data {held_out} --minutes -1", "--minutes: -1"),
    ("eval-long --model tiny --data {held_out} --hf-chunk 0", "--hf-chunk: 0"),
    ("eval-long --model tiny --data {held_out} --copy-gaps 0", "--copy-gaps: '0': give comma-separated integers >= 1"),
    ("eval-long --model tiny --data {held_out} --copy-span 0", "--copy-span: 0"),
    ("eval-long --model tiny --data /nonexistent/held", "--data /nonexistent/held: no such file or directory"),
    ("eval-long --model tiny --data {held_out} --dialogues /nonexistent/d", "--dialogues /nonexistent/d: no such"),
    ("eval-long --model tiny --data {dir}/corpus", "corpus: directory holds no index.json, .safetensors or .npy"),
    ("eval-long --model /nonexistent/model --data {held_out}", "/nonexistent/model: no such --model directory"),
    ("eval-long --model {misspelled} --data {held_out}", "unknown key 'num_layer'"),
    ("eval-long --model {truncated_hybrid} --data {held_out}", "model.safetensors: truncated"),
    ("eval-long --model {codec_as_lm} --data {held_out}", "codec_as_lm/model.safetensors: not the weights of the model"),
    ("serve --device cpu --model {codec_as_lm}", "codec_as_lm/model.safetensors: not the weights of the model"),
    ("eval-long --model {vanilla} --data {few_rows} --lengths 64", "s0.npy: 3 token rows; --model vanilla reads 17"),
    ("eval-long --model tiny --data {held_out} --lengths 64 --copy-gaps 20 --copy-span 100", "copy gap 20 < copied span"),
    ("eval-long --model tiny --data {held_out} --lengths 64 --copy-gaps 5000", "copy gap 5000: no held-out sequence"),
    ("eval-long --model {vanilla} --data {big_text} --lengths 64", "text token 5000 >= the vocabulary (1000)"),
    ("eval-long --model {vanilla} --data {big_audio} --lengths 64", "audio token 2000 >= the codebook size (1024)"),
    ("eval-long --model tiny --data {held_out} --lengths 64 --mimi {garbage}", "garbage.safetensors: not a safetensors"),
    ("eval-long --model tiny --data {held_out} --lengths 64 --mimi tiny --mimi-config {broken_json}",
     "--mimi-config is the config of --mimi FILE"),
    ("eval-long --model tiny --data {held_out} --lengths 64 --tokenizer /nonexistent.model", "/nonexistent.model"),
    ("eval-long --model {vanilla} --data {held_out} --lengths 64 --tokenizer {small_tokenizer}",
     "small.model: 64 text tokens, fewer than the model's text_card 1000"),
    ("eval-long --model tiny --data {held_out} --lengths 64 --repeats {dir}/nope", "no such make-corpus directory"),
    ("eval-long --model tiny --data {held_out} --lengths 64 --repeats {held_out}", "no corpus.json in it or its folders"),
    ("eval-long --model tiny --data {held_out} --lengths 64 --repeats {corpus}", "none of its re-read passages"),
    ("eval-long --model tiny --data {held_out} --lengths 64 --quotes {dir}/nope", "no such make-corpus directory"),
    ("eval-long --model tiny --data {held_out} --lengths 64 --quotes {held_out}", "--quotes"),
    ("eval-long --model tiny --data {held_out} --lengths 64 --quotes {corpus}", "none of its quotes is in"),
    ("eval-long --model tiny --data {held_out} --lengths 64 --out {a_file}", "a_file: is a file"),
    ("eval-long --model tiny --data {held_out} --device cuda:99", "--device cuda:99"),
    # score-free-run
    ("score-free-run /nonexistent.npy --model {vanilla}", "/nonexistent.npy: no such free-run tokens file"),
    ("score-free-run {a_file} --model {vanilla}", "a_file: not a .npy array (eval-long saves"),
    ("score-free-run {flat_npy} --model {vanilla}", "flat.npy: (40,) tokens"),
    ("score-free-run {flat_npy} --model /nonexistent", "/nonexistent: no such --model directory"),
    ("score-free-run {flat_npy} --model {misspelled}", "unknown key 'num_layer'"),
    # probe-memory
    ("probe-memory /nonexistent --data {held_out}", "/nonexistent: no such --model directory"),
    ("probe-memory tiny --data {held_out} --gaps 0", "--gaps: '0'"),
    ("probe-memory tiny --data {held_out} --gaps 1k", "--gaps: '1k'"),
    ("probe-memory tiny --data {held_out} --span 0", "--span: 0"),
    ("probe-memory tiny --data {held_out} --inner-lr-scale 0", "--inner-lr-scale: 0"),
    ("probe-memory tiny --data {held_out} --gaps-windows 0,4", "--gaps-windows: '0,4'"),
    ("probe-memory tiny --data {held_out} --gaps 24 --gaps-windows 3", "not allowed with argument --gaps"),
    ("probe-memory tiny --data {held_out} --gaps-windows 40 --span 24 --context 4", "gap 320 needs 728"),
    ("probe-memory {vanilla} --data {held_out} --gaps 24 --span 24", "no TTT, Gated DeltaNet or in-place layers"),
    ("probe-memory tiny --data {held_out} --device cuda:99", "--device cuda:99"),
    # train, tokenize, plot-run: the file is named
    ("train {bad_yaml}", "bad.yaml: not valid YAML"),
    ("train {list_yaml}", "list.yaml: a config is a YAML mapping"),
    ("train /nonexistent.yaml", "/nonexistent.yaml: no such YAML config"),
    ("train {unknown_key_yaml}", "unknown_key.yaml: train: unknown keys ['batch_sizee']"),
    ("train {unknown_key_yaml} --set train", "--set 'train': expected dotted.key=value"),
    ("train {unknown_key_yaml} --set train.batch_size=[1", "--set 'train.batch_size=[1': not valid YAML"),
    ("train {unknown_key_yaml} --run-dir {a_file}", "a_file: is a file"),
    ("train {typed_yaml}", "typed.yaml: train.batch_size: expected an integer, got 'four'"),
    ("train {typed_yaml} --set train.batch_size=2 --set log.tensorboard=1", "log.tensorboard: expected true or false"),
    ("tokenize /nonexistent.jsonl --out {dir}/t --checkpoint {vanilla}", "/nonexistent.jsonl: no such jsonl manifest"),
    ("tokenize {a_file} --out {dir}/t --checkpoint /nonexistent/ckpt", "/nonexistent/ckpt: no such Moshi checkpoint"),
    ("tokenize {a_file} --out {dir}/t --checkpoint {vanilla} --shard-frames 0", "--shard-frames: 0"),
    ("tokenize {a_file} --out {dir}/t --checkpoint {misspelled}", "unknown key 'num_layer'"),
    ("tokenize {a_file} --out {dir}/t --checkpoint {vanilla} --mimi-config {broken_json}", "broken.json: not valid"),
    ("plot-run /nonexistent/run", "/nonexistent/run: no such training run directory"),
    ("plot-run {run}", "metrics.jsonl: no such metrics file"),
    # the from-scratch pipeline
    ("train-codec {bad_yaml}", "bad.yaml: not valid YAML"),
    ("train-codec /nonexistent.yaml", "/nonexistent.yaml: no such YAML config"),
    ("eval-codec /nonexistent --data {a_file}", "/nonexistent: no such codec directory"),
    ("eval-codec {dir} --data {a_file}", "no mimi.safetensors"),
    ("eval-codec {shipped} --data {a_file} --codebooks 2,99", "--codebooks 2,99: the codec has 8 codebooks"),
    ("eval-codec {shipped} --data {a_file} --codebooks 0", "--codebooks: '0'"),
    ("eval-codec {shipped} --data {a_file} --seconds 0", "--seconds: 0"),
    ("eval-codec {shipped} --data /nonexistent.wav", "/nonexistent.wav"),
    ("make-corpus --out {dir}/c --recordings -1", "--recordings: -1"),
    ("make-corpus --out {dir}/c --repeat-fraction 2", "--repeat-fraction: 2"),
    ("make-corpus --out {dir}/c --minutes-per-recording 0", "--minutes-per-recording: 0"),
    ("init-moshi --codec /nonexistent --corpus {corpus} --out {dir}/m", "/nonexistent: no such codec directory"),
    ("init-moshi --codec {shipped} --corpus {run} --out {dir}/m", "corpus.json: no such corpus.json"),
    ("init-moshi --codec {shipped} --corpus {corpus} --out {dir}/m", "no 'texts'"),
    # any command
    ("no-such-command", "invalid choice: 'no-such-command'"),
]


def _argv(row: str, files: dict[str, Path]) -> list[str]:
    return [part.format(**files) for part in row.split()]


@pytest.mark.parametrize("row,named", ROWS, ids=[r for r, _ in ROWS])
def test_bad_input_is_one_line_exit_2(row: str, named: str, files: dict[str, Path],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(_argv(row, files))
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("ttt-speech") and named.format(**files) in lines[0], lines[0]


def _cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    src = str(Path(cli.__file__).parents[1])
    environ = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")} | (env or {})
    return subprocess.run([sys.executable, "-m", "ttt_speech", *argv], capture_output=True, text=True, env=environ,
                          timeout=120)


def test_a_user_sees_one_line_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    for argv, named in ((["generate", "--minutes", "-5"], "--minutes: -5"),
                        (["serve", "--port", "99999"], "--port: 99999"),
                        (["generate", "--hybrid", "/nonexistent/dir"], "/nonexistent/dir")):
        done = _cli(*argv)
        assert done.returncode == 2 and done.stdout == "", done
        assert len(done.stderr.splitlines()) == 1 and named in done.stderr, done.stderr
    for debug in (_cli("--debug", "generate", "--hybrid", "/nonexistent/dir"),
                  _cli("generate", "--hybrid", "/nonexistent/dir", "--debug"),
                  _cli("generate", "--hybrid", "/nonexistent/dir", env={"TTT_SPEECH_DEBUG": "1"})):
        assert debug.returncode == 1 and "Traceback" in debug.stderr and "UsageError" in debug.stderr, debug.stderr


def test_a_busy_port_is_refused_before_the_model_loads(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit) as exit_:
            cli.main(["serve", "--device", "cpu", "--model", "tiny", "--port", str(port)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and f"--port {port}: cannot listen there" in err, err


def test_module_entry_points_answer_as_the_cli_does(files: dict[str, Path]) -> None:
    """`python -m ttt_speech.train` (the torchrun entry) and `python -m ttt_speech.codec`: one line, exit 2."""
    src = str(Path(cli.__file__).parents[1])
    for module, argv, named in (("ttt_speech.train", [str(files["bad_yaml"])], "bad.yaml: not valid YAML"),
                                ("ttt_speech.train", ["plot-run", "/nonexistent/run"], "/nonexistent/run"),
                                ("ttt_speech.codec", ["eval", "/nonexistent", "--data", "x"], "/nonexistent")):
        done = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": src})
        assert done.returncode == 2 and len(done.stderr.splitlines()) == 1 and named in done.stderr, done.stderr


def test_help_and_refused_arguments_import_no_torch() -> None:
    """`--help` of every command, and an argument refused while parsing, never wait for torch / moshi."""
    code = ("import sys; from ttt_speech import cli\n"
            "for name in cli.COMMANDS:\n"
            "    cli.build_parser([name]).format_help()\n"
            "try:\n"
            "    cli.main(['serve', '--port', '99999'])\n"
            "except SystemExit as e:\n"
            "    assert e.code == 2\n"
            "heavy = sorted(m for m in ('torch', 'moshi', 'transformers') if m in sys.modules)\n"
            "print(heavy)\n")
    src = str(Path(cli.__file__).parents[1])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": src})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def test_literal_names_and_defaults_match_their_modules() -> None:
    """The commands spell some names and defaults out so `--help` imports nothing heavy; they must agree."""
    pytest.importorskip("moshi")
    from moshi.models import loaders

    from ttt_speech import branches
    from ttt_speech.eval import commands as eval_commands
    from ttt_speech.eval.gibberish import FRAMES_PER_MINUTE
    from ttt_speech.moshi import commands, files
    from ttt_speech.moshi.convert import BRANCHES
    from ttt_speech.quantize import MODES
    from ttt_speech.serve import commands as serve
    from ttt_speech.serve.opus import SESSIONS_PER_WORKER
    from ttt_speech.serve.sampling import SamplingConfig
    from ttt_speech.serve.sessions import Limits

    assert branches.BRANCH_NAMES == tuple(BRANCHES) and commands.QUANT_MODES == MODES
    assert eval_commands.FRAMES_PER_MINUTE == FRAMES_PER_MINUTE
    assert (files.MOSHI_WEIGHTS_NAME, files.MOSHI_MIMI_NAME, files.MOSHI_TOKENIZER_NAME) == (
        loaders.MOSHI_NAME, loaders.MIMI_NAME, loaders.TEXT_TOKENIZER_NAME)
    assert (serve.MAX_MESSAGE_BYTES, serve.IDLE_TIMEOUT_S) == (Limits.max_message_bytes, Limits.idle_timeout_s)
    assert (serve.TEMP, serve.TEMP_TEXT, serve.TOP_K, serve.TOP_K_TEXT) == (
        SamplingConfig.temp, SamplingConfig.temp_text, SamplingConfig.top_k, SamplingConfig.top_k_text)
    assert serve.SESSIONS_PER_WORKER == SESSIONS_PER_WORKER


def test_limits_refuse_zero_and_take_none_for_off() -> None:
    pytest.importorskip("moshi")
    from ttt_speech.serve.sessions import Limits

    assert Limits(max_message_bytes=None, idle_timeout_s=None).idle_timeout_s is None
    for bad in ({"max_message_bytes": 0}, {"idle_timeout_s": -1.0}, {"max_outbox": 0}):
        with pytest.raises(ValueError, match="must be > 0"):
            Limits(**bad)  # type: ignore[arg-type]


@given(st.floats(allow_nan=False, allow_infinity=False) | st.integers(-10**6, 10**6))
def test_number_types_accept_exactly_their_range(x: float) -> None:
    """Each argparse type takes a value iff it is in its range, and gives back that value."""
    for parse, ok in ((positive_float, x > 0), (nonnegative_float, x >= 0), (fraction, 0 <= x <= 1),
                      (positive_int, isinstance(x, int) and x >= 1), (port, isinstance(x, int) and 0 <= x <= 65535),
                      (seconds_or_off, x > 0)):
        if ok:
            assert parse(str(x)) == x
        else:
            with pytest.raises(argparse.ArgumentTypeError):
                parse(str(x))
    with pytest.raises(argparse.ArgumentTypeError):
        positive_float("inf")
    assert seconds_or_off("off") is None


def test_usage_error_is_a_value_error() -> None:
    """Library callers that catch ValueError (bad checkpoints, configs) keep working."""
    assert issubclass(UsageError, ValueError)
