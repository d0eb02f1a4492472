"""The training config: one YAML file naming the model, the data, the stages and what trains.

In the spirit of moshi-finetune's `example/moshi_7B.yaml`, plus a list of stages (sequence
length, steps, learning rate) that the trainer walks through. Unknown keys are errors (a typo must
not silently fall back to a default); `configs/*.yaml` are annotated examples.
"""

from __future__ import annotations

import copy
import dataclasses
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

from ttt_speech.branches import DEFAULT_BRANCH, misplaced, wrong_branch
from ttt_speech.engine.config import (
    CheckpointConfig,
    LogConfig,
    Precision,
    Stage,
    build_config,
    load_yaml_config,
    rename_keys,
)

Family = tp.Literal["moshi", "hf"]
Trainable = tp.Literal["memory", "lora", "all", "ttt"]  # "ttt": the old spelling of "memory"
Branch = tp.Literal["ttt", "gdn", "inplace"]
Parallel = tp.Literal["auto", "none", "ddp", "fsdp"]
FAMILIES: tuple[str, ...] = tp.get_args(Family)


@dataclass
class ModelConfig:
    """Where the model comes from and how it is turned into a hybrid with a memory branch.

    Exactly one source: `hybrid` (a directory written by convert-moshi / hf convert: already has its
    TTT layers), `pretrained` (a vanilla model: Moshi checkpoint directory or HF repo id / a
    transformers directory; converted here with `layers`, `mode`, `branch`, `memory`), or `tiny` (a tiny random
    model built in code, for tests and demos). `layers: []` keeps the model without TTT (baselines).
    """

    family: Family = "moshi"
    hybrid: str | None = None
    pretrained: str | None = None
    tiny: bool = False
    seed: int = 0  # initialisation of tiny models and of new TTT layers
    layers: str | list[int] = "all"
    mode: str = "hybrid"
    # inplace (default, issue 23's pick): the layers' own MLPs become fast weights (docs/ttt.md) | ttt: a
    # TTT branch beside attention (also mode: replace) | gdn: Gated DeltaNet, the linear-memory rival (Moshi only)
    branch: Branch = tp.cast(Branch, DEFAULT_BRANCH)
    # TTTConfig (GatedDeltaNetConfig, InPlaceConfig) overrides; `model.ttt` is its old name (KEY_ALIASES)
    memory: dict[str, tp.Any] = field(default_factory=dict)
    dtype: str = "auto"  # auto: bfloat16 for frozen weights on CUDA, float32 on CPU
    mimi_config: str | None = None  # Mimi config JSON when the checkpoint's config.json does not name one

    def __post_init__(self) -> None:
        sources = [s for s in ("hybrid", "pretrained", "tiny") if getattr(self, s)]
        if len(sources) != 1:
            raise ValueError(f"model: give exactly one of hybrid / pretrained / tiny, got {sources or 'none'}")
        if self.hybrid and (self.layers != "all" or self.memory):
            raise ValueError("model: a hybrid checkpoint already has its memory layers; drop layers/memory")
        if self.branch == "gdn" and self.family != "moshi":
            raise ValueError("model.branch: gdn (Gated DeltaNet) is implemented for Moshi models only")
        # configs written before the default moved to in-place name TTT options and no branch: say which
        named = self.branch != DEFAULT_BRANCH  # the default may be named too; then the hint to name another is moot
        wrong = misplaced(self.memory, self.branch)
        if wrong:
            raise ValueError(wrong_branch(f"model.memory.{wrong[0]}", wrong[1], self.branch, "model.branch:", named))
        if self.mode == "replace" and self.branch == "inplace":
            raise ValueError(wrong_branch("model.mode: replace", ["ttt"], self.branch, "model.branch:", named))


@dataclass
class RepeatConfig:
    """Memory-targeted training data (issue 7): verbatim repeats from beyond the attention window.

    With probability `prob` a training sequence gets one span of `min_len`..`max_len` frames (all
    streams) copied over a later stretch starting at least `min_gap` frames after the span's start;
    with `min_gap` above the attention window, only a memory can predict the copy. `max_gap` (if set)
    bounds the distance too: copies inside the window are the control that tells whether a model can
    learn to copy at all when its attention sees the source. `copies` > 1 cuts the sequence into that
    many equal blocks, each drawn as above on its own: several copies per sequence, none overwriting
    another's source (one span per sequence starves induction of signal, issue 24). `far_gap`
    [lo, hi] (with copies > 1): every second block draws its distance from lo..hi instead, so half
    the copies lie beyond the window and half inside, in one data order for every arm (issue 24).
    `far_len` [lo, hi] (with far_gap): those far blocks' span lengths instead of min_len..max_len. One
    32-frame far copy per 1536 frames is ~2 % of the targets, too little signal for a memory to learn
    from (issue 24, results section 8); longer far spans raise it without touching the inside copies.
    `placement: free` draws the copies over the whole sequence instead of one per block, each in a place
    that no earlier copy reads or writes (up to 64 tries, then that copy is left out): with blocks, the
    block length bounds the far gaps, so more copies per sequence meant shorter gaps (issue 24, results
    section 28: recall at 10x the window followed the far copies seen more than their gaps; free placement
    raises the copies without shortening the gaps).
    `source: shuffled` puts the source span's frames in a random order first (both occurrences then
    hold the same shuffled frames): after many epochs of a small corpus the weights recite a copied
    stretch of speech, so nothing rewards looking back; a shuffled span exists only in this sequence,
    and only attention (inside the window) or a memory (beyond it) predicts its copy.
    """

    prob: float
    min_gap: int
    min_len: int
    max_len: int
    max_gap: int | None = None
    copies: int = 1
    far_gap: list[int] | None = None
    far_len: list[int] | None = None
    far_blocks: tp.Literal["odd", "random"] = "odd"
    placement: tp.Literal["blocks", "free"] = "blocks"
    source: tp.Literal["speech", "shuffled"] = "speech"

    def __post_init__(self) -> None:
        if self.source not in ("speech", "shuffled"):
            raise ValueError(f"data.repeat.source must be speech or shuffled, got {self.source!r}")
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
        if self.far_gap is not None:
            if self.copies < 2:
                raise ValueError("data.repeat.far_gap needs copies >= 2 (every second block draws far copies)")
            if len(self.far_gap) != 2 or not 1 <= self.far_gap[0] <= self.far_gap[1] or self.far_gap[1] < self.max_len:
                raise ValueError(f"data.repeat.far_gap must be [lo, hi] with 1 <= lo <= hi and hi >= max_len, "
                                 f"got {self.far_gap}")
        if self.far_blocks not in ("odd", "random"):
            raise ValueError(f"data.repeat.far_blocks must be odd or random, got {self.far_blocks!r}")
        if self.placement not in ("blocks", "free"):
            raise ValueError(f"data.repeat.placement must be blocks or free, got {self.placement!r}")
        if self.placement == "free" and self.copies < 2:
            raise ValueError("data.repeat.placement: free needs copies >= 2 (one copy has no blocks to free)")
        if self.far_blocks != "odd" and self.far_gap is None:
            raise ValueError("data.repeat.far_blocks needs far_gap (it picks the blocks whose copies lie far)")
        if self.far_len is not None:
            if self.far_gap is None:
                raise ValueError("data.repeat.far_len needs far_gap (it sets the far blocks' span lengths)")
            if len(self.far_len) != 2 or not 1 <= self.far_len[0] <= self.far_len[1] <= self.far_gap[1]:
                raise ValueError(f"data.repeat.far_len must be [lo, hi] with 1 <= lo <= hi <= far_gap's hi "
                                 f"({self.far_gap[1]}), got {self.far_len}")

    def far(self) -> RepeatConfig:
        """The draw of a far block: one copy far_gap frames after its source, far_len frames long."""
        assert self.far_gap is not None
        lo, hi = self.far_gap
        n_lo, n_hi = self.far_len or (self.min_len, self.max_len)
        return dataclasses.replace(self, min_gap=lo, max_gap=hi, min_len=n_lo, max_len=n_hi, copies=1,
                                   far_gap=None, far_len=None, far_blocks="odd", placement="blocks")


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
class LoraConfig:
    rank: int = 64
    scaling: float = 2.0


@dataclass
class LossConfig:
    """moshi-finetune's defaults: text padding x0.5, first audio codebook x100 (the user stream is input only)."""

    text_padding_weight: float = 0.5
    first_codebook_weight: float = 100.0


@dataclass
class OwnPrefixConfig:
    """Training with the model's own samples in its context and memory (a scheduled-sampling cure for the
    free-run drift of issue 24: teacher forcing never shows the memory its own samples).

    With probability `prob` a sequence keeps its first `prompt` real frames, then holds `frames` frames of
    the model's own stream sampled after them (`temp`, `temp_text`: moshi's LMGen temperatures), then the
    real sequence again from frame `prompt`, cut to the stage length; loss only on the real frames. Only
    every `every`-th optimizer step draws any: generation is one frame at a time, so a step costs about the
    same for one chosen sequence as for a batch of them, and `every` (not `prob`) is what sets the cost.
    Moshi only, one process or DDP (generation runs the whole model, FSDP holds a shard of it).

    `distill` > 0 also scores the own frames: KL(teacher || model) per target, `distill` times the target's
    usual weight, where the teacher is the same model with its in-place memory frozen after the prompt (it writes
    the `prompt` real frames, not the own ones; no gradient).
    Why: scored on the real continuation only, own prefixes left the drift as it was (docs/results.md section
    16), while the same weights with the memory frozen after a prompt do not drift (section 18); this teaches
    the memory not to reinforce what the model itself said. In-place memory only.
    """

    prob: float = 0.0  # 0: off
    prompt: int = 64
    frames: int = 256
    temp: float = 0.8
    temp_text: float = 0.7
    every: int = 1  # own prefixes only in steps 0, every, 2 * every, ... (the generation's cost)
    distill: float = 0.0  # weight of the own frames' KL to the model with its memory frozen after the prompt

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"train.own_prefix.every must be >= 1 (1: every step), got {self.every}")
        if not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"train.own_prefix.prob must be in [0, 1] (0: off), got {self.prob}")
        if self.prompt < 1:
            raise ValueError(f"train.own_prefix.prompt must be >= 1 real frame before the own samples, "
                             f"got {self.prompt}")
        if self.frames < 1:
            raise ValueError(f"train.own_prefix.frames must be >= 1 (or prob: 0 for off), got {self.frames}")
        if not self.distill >= 0.0:
            raise ValueError(f"train.own_prefix.distill must be >= 0 (0: own frames unscored), got {self.distill}")
        for name in ("temp", "temp_text"):
            if not getattr(self, name) > 0:
                raise ValueError(f"train.own_prefix.{name} must be > 0 (moshi samples), got {getattr(self, name)}")


@dataclass
class TrainConfig:
    trainable: Trainable = "memory"
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
    memory_lr_scale: float = 1.0  # the memory branch's parameters train at the stage's lr times this
    betas: tuple[float, float] = (0.9, 0.95)
    device: str = "auto"
    own_prefix: OwnPrefixConfig = field(default_factory=OwnPrefixConfig)  # own samples in context (prob 0: off)

    def __post_init__(self) -> None:
        if self.trainable == "ttt":
            self.trainable = "memory"
        if self.batch_size < 1:
            raise ValueError(f"train.batch_size must be >= 1, got {self.batch_size}")
        if not self.memory_lr_scale > 0:
            raise ValueError(f"train.memory_lr_scale must be > 0, got {self.memory_lr_scale}")
        for name in ("segment_len", "attention_window", "attention_chunk"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"train.{name} must be >= 1, got {value}")
        if self.own_prefix.prob and self.parallel == "fsdp":
            raise ValueError("train.own_prefix needs the whole model in each process to generate: "
                             "use train.parallel: ddp (or none), or own_prefix.prob: 0")
        self.betas = tuple(self.betas)  # type: ignore[assignment]


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
        if self.train.own_prefix.prob and self.model.family != "moshi":
            raise ValueError("train.own_prefix is Moshi-only (it samples with moshi's LMGen): set "
                             "train.own_prefix.prob: 0 for this model")
        if self.train.own_prefix.prob and self.train.own_prefix.distill and self.model.branch != "inplace":
            raise ValueError(f"train.own_prefix.distill needs model.branch: inplace (its teacher is the model with "
                             f"the in-place memory frozen after the prompt), got {self.model.branch}; or distill: 0")

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def to_dict(self) -> dict[str, tp.Any]:
        return dataclasses.asdict(self)


# Keys written before issue 20 named the memory branch `ttt` whatever its design; they still load.
KEY_ALIASES = {"model.ttt": "model.memory"}


def config_from_dict(d: dict[str, tp.Any]) -> Config:
    d = copy.deepcopy(d)
    rename_keys(d, KEY_ALIASES, "config")
    return build_config(Config, d)


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """The trainer's config from YAML plus `--set` overrides (old spellings: `KEY_ALIASES`)."""
    return load_yaml_config(Config, path, overrides, KEY_ALIASES)
