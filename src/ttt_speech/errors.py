"""Mistakes a user can make on the command line, caught before any model is loaded.

`UsageError` carries one line that names the bad input and says how to fix it; `cli.main` prints it
on stderr and exits 2 (`--debug` or TTT_SPEECH_DEBUG=1 shows the traceback instead). Everything
else still ends in a traceback, as a bug should. The argparse types below refuse a bad value while
the command line is parsed; the file checks run at the start of a command, before the slow part.
This module imports only the standard library, so every floor may raise `UsageError` and
`ttt-speech X --help` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import struct
import sys
import typing as tp
from pathlib import Path

OFF = "off"
DEBUG_FLAG = "--debug"
DEBUG_ENV = "TTT_SPEECH_DEBUG"


class UsageError(ValueError):
    """A bad argument, file or setting: the message names it and the fix. A ValueError, so library callers
    that catch ValueError keep working."""


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are `UsageError`s (one line, exit 2 in `cli.main`), not usage + error."""

    def error(self, message: str) -> tp.NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def debug_requested(argv: list[str]) -> bool:
    """--debug on the command line, or TTT_SPEECH_DEBUG set (to anything but 0)."""
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


@contextlib.contextmanager
def one_line_errors(prog: str, debug: bool) -> tp.Iterator[None]:
    """A UsageError inside ends the process with its one line on stderr and exit code 2; with `debug`, it
    propagates (the traceback). Every entry point (`ttt-speech`, `python -m ttt_speech.train` under
    torchrun, ...) runs its command inside this."""
    try:
        yield
    except UsageError as e:
        if debug:
            raise
        print(f"{prog}: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(2) from None


def _number(text: str, kind: type[int] | type[float], what: str) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def _in_range(text: str, kind: type[int] | type[float], what: str, low: float, high: float = math.inf,
              strict: bool = False) -> float:
    """`text` as `kind` within [low, high] (low excluded when `strict`), else an ArgumentTypeError saying `what`."""
    value = _number(text, kind, what)
    if value < low or value > high or (strict and value == low):
        raise argparse.ArgumentTypeError(f"{text} is not {what}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (counts, sizes, batch sizes)."""
    return int(_in_range(text, int, "an integer >= 1", 1))


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    return int(_in_range(text, int, "an integer >= 0", 0))


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return _in_range(text, float, "a number > 0", 0, strict=True)


def nonnegative_float(text: str) -> float:
    """A finite number >= 0."""
    return _in_range(text, float, "a number >= 0", 0)


def dbfs(text: str) -> float:
    """A level in dB relative to full scale: a finite number <= 0 (a forgotten minus sign would gate every frame)."""
    return _in_range(text, float, "a level in dBFS (<= 0, e.g. -50)", -math.inf, 0)


def fraction(text: str) -> float:
    """A number in [0, 1]."""
    return _in_range(text, float, "a number in [0, 1]", 0, 1)


def unit_interval(text: str) -> float:
    """A number in (0, 1] (a decay factor: 1 is none)."""
    return _in_range(text, float, "a number in (0, 1]", 0, 1, strict=True)


def port(text: str) -> int:
    """A TCP port, 0..65535 (0: the system picks a free one)."""
    return int(_in_range(text, int, "a port number (0-65535; 0 picks a free one)", 0, 65535))


def _positive_or_off(text: str, kind: type[int] | type[float], what: str) -> float | None:
    if text == OFF:
        return None
    value = _number(text, kind, f"{what} or '{OFF}'")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not {what} (write '{OFF}' for no limit)")
    return value


def seconds_or_off(text: str) -> float | None:
    """Seconds > 0, or "off" (None): turning a limit off is spelled out, never implied by 0 or a negative."""
    return _positive_or_off(text, float, "a number of seconds > 0")


def positive_float_or_off(text: str) -> float | None:
    """A finite number > 0, or "off" (None), as `seconds_or_off`."""
    return _positive_or_off(text, float, "a number > 0")


def positive_int_or_off(text: str) -> int | None:
    """An integer >= 1, or "off" (None), as `seconds_or_off`."""
    value = _positive_or_off(text, int, "an integer >= 1")
    return None if value is None else int(value)


def int_list(text: str) -> list[int]:
    """Comma-separated integers >= 1, e.g. "300,1000,3000" (sorted, repeats dropped)."""
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers >= 1")
    return values


def positive_float_list(text: str) -> list[float]:
    """Comma-separated numbers > 0, e.g. "1,4,10,40" (sorted, repeats dropped)."""
    try:
        values = sorted({positive_float(x) for x in text.split(",") if x.strip()})
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated numbers > 0") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated numbers > 0")
    return values


def existing_file(path: str | Path, what: str = "file") -> Path:
    """`path` if it is a file; else a UsageError naming it."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such {what}")
    if not p.is_file():
        raise UsageError(f"{p}: is a directory, give the {what} itself")
    return p


def existing_dir(path: str | Path, what: str = "directory") -> Path:
    """`path` if it is a directory; else a UsageError naming it."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{p}: no such {what}")
    if not p.is_dir():
        raise UsageError(f"{p}: is a file, not a {what}")
    return p


def output_dir(path: str | Path) -> Path:
    """A directory to write into: absent (it will be made) or a directory, under a directory we may write to."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{p}: is a file; give a directory to write into")
    nearest = next(q for q in (p.absolute(), *p.absolute().parents) if q.exists())
    if not nearest.is_dir() or not os.access(nearest, os.W_OK | os.X_OK):
        raise UsageError(f"{p}: cannot write there ({nearest} is not a writable directory); give another one")
    return p


def read_json(path: str | Path, what: str = "JSON file") -> tp.Any:
    """The parsed JSON of `path`, or a UsageError naming the file (missing, unreadable, malformed)."""
    p = existing_file(path, what)
    try:
        return json.loads(p.read_text())
    except UnicodeDecodeError:
        raise UsageError(f"{p}: not a {what} (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{p}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None


def read_json_object(path: str | Path, what: str = "JSON file") -> dict[str, tp.Any]:
    """`read_json`, which must give an object ({...})."""
    value = read_json(path, what)
    if not isinstance(value, dict):
        raise UsageError(f"{path}: a {what} must hold a JSON object {{...}}, got {type(value).__name__}")
    return value


def check_safetensors(path: str | Path) -> dict[str, tp.Any]:
    """The header of a .safetensors file (tensor name -> dtype/shape/offsets), after checking that it is whole.

    A truncated or corrupt file would otherwise fail inside the safetensors library without its name.
    """
    p = existing_file(path, "safetensors file")
    size = p.stat().st_size
    with p.open("rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise UsageError(f"{p}: not a safetensors file or truncated ({size} bytes); copy or download it again")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UsageError(f"{p}: corrupt safetensors header; copy or download it again") from None
    if not isinstance(header, dict):
        raise UsageError(f"{p}: corrupt safetensors header; copy or download it again")
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)
            and isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2]
    data = size - 8 - n
    if len(ends) != len(header) - ("__metadata__" in header) or max(ends, default=0) != data:
        raise UsageError(f"{p}: truncated or corrupt safetensors file ({data} data bytes, the header describes "
                         f"{max(ends, default=0)}); copy or download it again")
    return header
