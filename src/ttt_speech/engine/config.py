"""What every trainer's config shares: stages, checkpoint and log settings, and YAML into dataclasses.

A trainer's config is a dataclass of dataclasses read from one YAML file plus `--set` overrides;
unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import types
import typing as tp
from dataclasses import dataclass
from pathlib import Path

import yaml

from ttt_speech.errors import UsageError, existing_file

Precision = tp.Literal["bf16", "fp32"]
T = tp.TypeVar("T")


@dataclass
class Stage:
    """One stage of context extension: `steps` optimizer steps on sequences of `seq_len` frames/tokens."""

    seq_len: int
    steps: int
    lr: float
    warmup: float = 0.05  # fraction of the stage's steps spent ramping up to `lr`
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    segment_len: int | None = None  # overrides train.segment_len for this stage

    def __post_init__(self) -> None:
        if self.seq_len < 2 or self.steps < 1 or self.lr <= 0:
            raise ValueError(f"stage needs seq_len >= 2, steps >= 1, lr > 0; got {self}")
        if not 0.0 <= self.warmup < 1.0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"stage warmup must be in [0, 1) and min_lr_ratio in [0, 1]; got {self}")


@dataclass
class CheckpointConfig:
    every: int = 500  # steps; also written at the end of each stage and on SIGTERM
    keep: int = 2  # newest checkpoints kept


@dataclass
class LogConfig:
    every: int = 1
    eval_every: int = 0  # steps; 0: only at the end of each stage
    eval_batches: int = 4
    tensorboard: bool = True  # when the tensorboard package is installed
    progress: bool = True


def _build(tp_: tp.Any, value: tp.Any, where: str) -> tp.Any:
    """Turn parsed YAML into `tp_` (dataclasses, lists of them, optionals), naming `where` on errors."""
    origin = tp.get_origin(tp_)
    if dataclasses.is_dataclass(tp_):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        hints = tp.get_type_hints(tp_)
        names = {f.name for f in dataclasses.fields(tp_)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(names)}")
        kwargs = {k: _build(hints[k], v, f"{where}.{k}" if where else k) for k, v in value.items()}
        try:
            return tp_(**kwargs)
        except TypeError as e:
            raise ValueError(f"{where or 'config'}: {e}") from None
    if origin in (tp.Union, types.UnionType):
        args = [a for a in tp.get_args(tp_) if a is not type(None)]
        if value is None:
            return None
        return _build(args[0], value, where) if len(args) == 1 else value
    if origin is list and isinstance(value, list):
        (item,) = tp.get_args(tp_)
        return [_build(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tp.Literal and value not in tp.get_args(tp_):
        raise ValueError(f"{where}: must be one of {list(tp.get_args(tp_))}, got {value!r}")
    if tp_ in _SCALARS:
        return _scalar(tp_, value, where)
    return value


_SCALARS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _scalar(tp_: type, value: tp.Any, where: str) -> tp.Any:
    """`value` as the field's scalar type, or a ValueError naming the key (not a TypeError from inside a
    dataclass's checks). YAML 1.1 reads 3e-4 (no dot) as a string: a float field takes it as the number."""
    if tp_ is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    ok = isinstance(value, tp_) and not (tp_ in (int, float) and isinstance(value, bool))
    if tp_ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise ValueError(f"{where}: expected {_SCALARS[tp_]}, got {value!r}")
    return value


def build_config(cls: type[T], d: dict[str, tp.Any]) -> T:
    """A dataclass config (nested dataclasses, lists, literals) from parsed YAML, naming bad keys."""
    return _build(cls, d, "")


def renamed(key: str, aliases: dict[str, str]) -> str:
    """A dotted key under today's name when it (or a section above it) is an old spelling in `aliases`."""
    for old, new in aliases.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old):]
    return key


def rename_keys(raw: dict[str, tp.Any], aliases: dict[str, str], where: str) -> None:
    """Move old spellings (`aliases`: dotted old key -> dotted new key, same parent) to today's, in place;
    both at once is an error naming them."""
    for old, new in aliases.items():
        *parents, last = old.split(".")
        node: tp.Any = raw
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if not isinstance(node, dict) or last not in node:
            continue
        target = new.rsplit(".", 1)[-1]
        if target in node:
            raise UsageError(f"{where}: give {new} or its old name {old}, not both")
        node[target] = node.pop(last)


def load_yaml_config(cls: type[T], path: str | Path, overrides: list[str] | None = None,
                     aliases: dict[str, str] | None = None) -> T:
    """Read a YAML config into `cls`; `overrides` are `dotted.key=yaml_value` strings (e.g. `train.batch_size=4`).
    `aliases` (old dotted key -> today's) lets files and `--set` items written with an old spelling still load."""
    raw = _yaml(existing_file(path, "YAML config").read_text(), f"{path}") or {}
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: a config is a YAML mapping (key: value lines), got {type(raw).__name__}")
    aliases = aliases or {}
    rename_keys(raw, aliases, str(path))
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set {item!r}: expected dotted.key=value, e.g. train.batch_size=4")
        key = renamed(key, aliases)
        node = raw
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UsageError(f"--set {item!r}: {p} is not a section of {path}")
        node[last] = _yaml(text, f"--set {item!r}")
    try:
        return build_config(cls, raw)
    except UsageError:
        raise
    except ValueError as e:
        raise UsageError(f"{path}: {e}") from None


def _yaml(text: str, where: str) -> tp.Any:
    """Parsed YAML; malformed YAML is a UsageError naming `where` (the file, or the --set item) and the line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise UsageError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or type(e).__name__}{at})") from None
