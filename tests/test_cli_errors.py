"""Bad input on the command line: one line on stderr naming the input, exit code 2, no traceback, nothing loaded.

Each row runs the real entry point (`cli.main`) in-process on one bad input; a few run as a user would,
in a subprocess. `--debug` / TTT_SPEECH_DEBUG=1 bring the traceback back. Every row is refused before a
model is built, which keeps the table fast.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ttt_speech import cli
from ttt_speech.errors import UsageError

SHIPPED = Path(cli.__file__).parent / "assets" / "small_moshi"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Bad (and a few good) files, made without building a model."""
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

    vanilla = {k: v for k, v in config.items() if k != "ttt"}
    out["vanilla"] = moshi_dir("vanilla", vanilla)
    out["misspelled"] = moshi_dir("misspelled", {**vanilla, "num_layer": 5})
    out["wrong_type"] = moshi_dir("wrong_type", {**vanilla, "dim": "192"})
    out["bad_delays"] = moshi_dir("bad_delays", {**vanilla, "delays": [0, 1]})
    out["truncated_hybrid"] = moshi_dir("truncated_hybrid", config, out["truncated"])
    out["no_weights"] = moshi_dir("no_weights", vanilla, None)
    out["bad_section"] = moshi_dir("bad_section", {**config, "ttt": {**config["ttt"], "mode": "both"}})
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
    ("generate --hybrid {vanilla}", "has no 'ttt' section"),
    ("generate --hybrid {truncated_hybrid}", "truncated_hybrid/model.safetensors: truncated"),
    ("generate --hybrid {bad_section}", "ttt.mode must be one of"),
    ("generate --hybrid {dir}", "config.json: no such Moshi config.json"),
    ("generate --moshi-weights {truncated} --config {vanilla}/config.json", "truncated.safetensors: "),
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
    ("serve --device cpu --model tiny --mimi /nonexistent.safetensors", "/nonexistent.safetensors: no such"),
    ("serve --device cpu --model tiny --mimi {garbage}", "garbage.safetensors: not a safetensors"),
    ("serve --device cpu --model tiny --tokenizer {a_file}", "a_file: not a SentencePiece model"),
    ("serve --device cpu --model tiny --tokenizer /nonexistent.model", "/nonexistent.model: no such"),
    ("serve --device cpu --model tiny --state-dir {a_file}", "a_file: is a file"),
    ("serve --device cpu --model {vanilla}", "no Mimi found beside the model"),
    ("serve --device cpu --model tiny --quantize int4", "--quantize int4 needs --device cuda"),
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


FAST_HELP = ["generate", "convert-moshi", "serve"]


def test_help_and_refused_arguments_import_no_torch() -> None:
    """`--help` of every command, and an argument refused while parsing, never wait for torch / moshi."""
    code = ("import sys; from ttt_speech import cli\n"
            f"for name in {FAST_HELP!r}:\n"
            "    cli.build_parser([name]).format_help()\n"
            "try:\n"
            "    cli.main(['serve', '--port', '99999'])\n"
            "except SystemExit as e:\n"
            "    assert e.code == 2\n"
            "heavy = sorted(m for m in ('torch', 'moshi', 'transformers', 'numpy') if m in sys.modules)\n"
            "print(heavy)\n")
    src = str(Path(cli.__file__).parents[1])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": src})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def test_literal_names_and_defaults_match_their_modules() -> None:
    """The commands spell some names and defaults out so `--help` imports nothing heavy; they must agree."""
    pytest.importorskip("moshi")
    from ttt_speech.moshi import checkpoint, commands, tiny
    from ttt_speech.moshi.convert import BRANCHES
    from ttt_speech.quantize import MODES
    from ttt_speech.serve import commands as serve
    from ttt_speech.serve.sampling import SamplingConfig
    from ttt_speech.serve.sessions import Limits

    assert commands.BRANCH_NAMES == tuple(BRANCHES) and commands.QUANT_MODES == MODES
    assert (serve.CONFIG_NAME, serve.WEIGHTS_NAME) == (checkpoint.CONFIG_NAME, checkpoint.WEIGHTS_NAME)
    assert (serve.MIMI_WEIGHTS_NAME, serve.MIMI_CONFIG_NAME, serve.TOKENIZER_NAME) == (
        tiny.MIMI_WEIGHTS_NAME, tiny.MIMI_CONFIG_NAME, tiny.TOKENIZER_NAME)
    assert (serve.MAX_MESSAGE_BYTES, serve.IDLE_TIMEOUT_S) == (Limits.max_message_bytes, Limits.idle_timeout_s)
    assert (serve.TEMP, serve.TEMP_TEXT, serve.TOP_K, serve.TOP_K_TEXT) == (
        SamplingConfig.temp, SamplingConfig.temp_text, SamplingConfig.top_k, SamplingConfig.top_k_text)


def test_limits_refuse_zero_and_take_none_for_off() -> None:
    pytest.importorskip("moshi")
    from ttt_speech.serve.sessions import Limits

    assert Limits(max_message_bytes=None, idle_timeout_s=None).idle_timeout_s is None
    for bad in ({"max_message_bytes": 0}, {"idle_timeout_s": -1.0}, {"max_outbox": 0}):
        with pytest.raises(ValueError, match="must be > 0"):
            Limits(**bad)  # type: ignore[arg-type]


def test_usage_error_is_a_value_error() -> None:
    """Library callers that catch ValueError (bad checkpoints, configs) keep working."""
    assert issubclass(UsageError, ValueError)
