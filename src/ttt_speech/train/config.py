"""The training config: one YAML file naming the model, the data, the stages and what trains.

In the spirit of moshi-finetune's `example/moshi_7B.yaml`, plus a list of stages (sequence
length, steps, learning rate) that the trainer walks through. Unknown keys are errors (a typo must
not silently fall back to a default); `configs/*.yaml` are annotated examples.
"""

from __future__ import annotations

import dataclasses
import types
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ttt_speech.errors import UsageError, existing_file

Family = tp.Literal["moshi", "hf"]
Trainable = tp.Literal["ttt", "lora", "all"]
Branch = tp.Literal["ttt", "gdn", "inplace"]
Parallel = tp.Literal["auto", "none", "ddp", "fsdp"]
Precision = tp.Literal["bf16", "fp32"]
FAMILIES: tuple[str, ...] = tp.get_args(Family)


T = tp.TypeVar("T")

@dataclass
class ModelConfig:
    """Where the model comes from and how it is turned into a TTT hybrid.

    Exactly one source: `hybrid` (a directory written by convert-moshi / hf convert: already has its
    TTT layers), `pretrained` (a vanilla model: Moshi checkpoint directory or HF repo id / a
    transformers directory; converted here with `layers`, `mode`, `ttt`), or `tiny` (a tiny random
    model built in code, for tests and demos). `layers: []` keeps the model without TTT (baselines).
    """

    family: Family = "moshi"
    hybrid: str | None = None
    pretrained: str | None = None
    tiny: bool = False
    seed: int = 0  # initialisation of tiny models and of new TTT layers
    layers: str | list[int] = "all"
    mode: str = "hybrid"
    # ttt | gdn: a Gated DeltaNet branch instead (the linear-memory rival) | inplace: the layers' own MLPs
    # become fast weights (docs/ttt.md); gdn and inplace: Moshi only
    branch: Branch = "ttt"
    ttt: dict[str, tp.Any] = field(default_factory=dict)  # TTTConfig (GatedDeltaNetConfig, InPlaceConfig) overrides
    dtype: str = "auto"  # auto: bfloat16 for frozen weights on CUDA, float32 on CPU
    mimi_config: str | None = None  # Mimi config JSON when the checkpoint's config.json does not name one

    def __post_init__(self) -> None:
        sources = [s for s in ("hybrid", "pretrained", "tiny") if getattr(self, s)]
        if len(sources) != 1:
            raise ValueError(f"model: give exactly one of hybrid / pretrained / tiny, got {sources or 'none'}")
        if self.hybrid and (self.layers != "all" or self.ttt):
            raise ValueError("model: a hybrid checkpoint already has its TTT layers; drop layers/ttt")
        if self.branch in ("gdn", "inplace") and self.family != "moshi":
            raise ValueError(f"model.branch: {self.branch} is implemented for Moshi models only")


@dataclass
class RepeatConfig:
    """Memory-targeted training data (issue 7): verbatim repeats from beyond the attention window.

    With probability `prob` a training sequence gets one span of `min_len`..`max_len` frames (all
    streams) copied over a later stretch starting at least `min_gap` frames after the span's start;
    with `min_gap` above the attention window, only a memory can predict the copy. `max_gap` (if set)
    bounds the distance too: copies inside the window are the control that tells whether a model can
    learn to copy at all when its attention sees the source. `copies` > 1 cuts the sequence into that
    many equal blocks, each drawn as above on its own: several copies per sequence, none overwriting
    another's source (one span per sequence starves induction of signal, issue 24).
    """

    prob: float
    min_gap: int
    min_len: int
    max_len: int
    max_gap: int | None = None
    copies: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"data.repeat.prob must be in [0, 1], got {self.prob}")
        if self.min_gap < 1:
            raise ValueError(f"data.repeat.min_gap must be >= 1, got {self.min_gap}")
        if self.min_len < 1:
            raise ValueError(f"data.repeat.min_len must be >= 1, got {self.min_len}")
        if self.max_len < self.min_len:
            raise ValueError(f"data.repeat.max_len must be >= min_len ({self.min_len}), got {self.max_len}")
        if self.copies < 1:
            raise ValueError(f"data.repeat.copies must be >= 1, got {self.copies}")
        if self.max_gap is not None and self.max_gap < max(self.min_gap, self.max_len):
            raise ValueError(f"data.repeat.max_gap must be >= min_gap and max_len (a copy never overlaps its "
                             f"source), got {self.max_gap}")


@dataclass
class DataConfig:
    """Token data: tokenized directories (`ttt-speech tokenize`), .safetensors / .npy shards or folders of them."""

    train: list[str] = field(default_factory=list)
    eval: list[str] = field(default_factory=list)  # held-out files; empty: `val_fraction` of the train files
    val_fraction: float = 0.0
    skip_bad: bool = False
    pack: bool = False  # concatenate documents before cutting (default: each chunk within one document)
    min_chunk: float = 0.25  # a document's tail shorter than this fraction of the stage length is dropped
    repeat: RepeatConfig | None = None  # copy spans beyond the attention window into training sequences

    def __post_init__(self) -> None:
        if not self.train:
            raise ValueError("data.train: name at least one tokenized directory or shard")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.eval and self.val_fraction:
            raise ValueError("data: give either eval files or val_fraction, not both")
        if not 0.0 < self.min_chunk <= 1.0:
            raise ValueError(f"data.min_chunk must be in (0, 1], got {self.min_chunk}")


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
class LoraConfig:
    rank: int = 64
    scaling: float = 2.0


@dataclass
class LossConfig:
    """moshi-finetune's defaults: text padding x0.5, first audio codebook x100 (the user stream is input only)."""

    text_padding_weight: float = 0.5
    first_codebook_weight: float = 100.0


@dataclass
class TrainConfig:
    trainable: Trainable = "ttt"
    lora: LoraConfig = field(default_factory=LoraConfig)
    batch_size: int = 1  # global: sequences per optimizer step over all processes
    segment_len: int | None = None  # frames per forward/backward (TTT state + attention window carried); None: whole
    attention_window: int | None = None  # training attention window; None: the model's own
    attention_chunk: int | None = None  # queries per attention block (memory ~ T * (chunk + window))
    grad_checkpointing: bool = False
    precision: Precision = "bf16"  # bf16 autocast on CUDA (CPU always runs fp32)
    parallel: Parallel = "auto"  # auto: ddp under torchrun, none alone
    grad_clip: float = 1.0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"train.batch_size must be >= 1, got {self.batch_size}")
        for name in ("segment_len", "attention_window", "attention_chunk"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"train.{name} must be >= 1, got {value}")
        self.betas = tuple(self.betas)  # type: ignore[assignment]


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


@dataclass
class Config:
    run_dir: str
    model: ModelConfig
    data: DataConfig
    stages: list[Stage]
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("stages: give at least one {seq_len, steps, lr}")

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def to_dict(self) -> dict[str, tp.Any]:
        return dataclasses.asdict(self)


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
    if tp_ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def build_config(cls: type[T], d: dict[str, tp.Any]) -> T:
    """A dataclass config (nested dataclasses, lists, literals) from parsed YAML, naming bad keys."""
    return _build(cls, d, "")


def config_from_dict(d: dict[str, tp.Any]) -> Config:
    return build_config(Config, d)


def load_yaml_config(cls: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    """Read a YAML config into `cls`; `overrides` are `dotted.key=yaml_value` strings (e.g. `train.batch_size=4`)."""
    raw = _yaml(existing_file(path, "YAML config").read_text(), f"{path}") or {}
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: a config is a YAML mapping (key: value lines), got {type(raw).__name__}")
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set {item!r}: expected dotted.key=value, e.g. train.batch_size=4")
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


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """The trainer's config from YAML plus `--set` overrides."""
    return load_yaml_config(Config, path, overrides)
