"""The codec training config: Mimi's sizes, the audio, the losses, the stages (crop lengths) and the schedule.

Parsed with the LM trainer's YAML rules (unknown keys are errors, `--set dotted.key=value`
overrides). A stage's `seq_len` is the crop length in 12.5 Hz frames (25 = 2 s of audio), so the
LM trainer's `Stage`, learning-rate schedule and checkpoint bookkeeping apply unchanged.
"""

from __future__ import annotations

import dataclasses
import typing as tp
from dataclasses import dataclass, field
from pathlib import Path

from ttt_speech.audio import FRAME_RATE, SAMPLE_RATE
from ttt_speech.engine.config import CheckpointConfig, LogConfig, Precision, Stage, load_yaml_config


@dataclass
class MimiSize:
    """moshi's MimiModel at a smaller size; everything else (ratios, causality, split RVQ) as released."""

    n_filters: int = 20  # SEANet's first channel count (Mimi: 64), doubled at each of its 4 downsamplings
    dimension: int = 160  # SEANet latent channels (Mimi: 512)
    n_residual_layers: int = 1
    codebooks: int = 8  # split RVQ: 1 "semantic" + codebooks - 1 acoustic levels (Mimi: 32 trained, 8 used)
    bins: int = 1024  # codebook size (Mimi: 2048); the LM's `card`
    codebook_dim: int = 64  # (Mimi: 256)
    d_model: int = 160  # encoder/decoder transformer width (Mimi: 512)
    num_heads: int = 4
    num_layers: int = 2  # per transformer (Mimi: 8)
    dim_feedforward: int = 640
    context: int = 250  # transformer attention span in 25 Hz steps (10 s, as Mimi)
    weight_norm: bool = True  # train SEANet convs with weight norm (as Mimi); folded into plain weights on export

    def __post_init__(self) -> None:
        if self.codebooks < 2:
            raise ValueError(f"model.codebooks must be >= 2 (split RVQ: 1 semantic + acoustic), got {self.codebooks}")
        if self.d_model % self.num_heads:
            raise ValueError(f"model.d_model={self.d_model} must be a multiple of num_heads={self.num_heads}")

    def mimi_config(self, weight_norm: bool = False) -> dict[str, tp.Any]:
        """moshi's Mimi config dict (the layout of the released mimi config JSON)."""
        from ttt_speech.moshi.compat import default_mimi_config

        cfg = default_mimi_config()
        cfg["seanet"].update(n_filters=self.n_filters, dimension=self.dimension,
                             n_residual_layers=self.n_residual_layers,
                             norm="weight_norm" if weight_norm else "none")
        cfg["quantizer"].update(dimension=self.codebook_dim, n_q=self.codebooks, bins=self.bins,
                                input_dimension=self.dimension, output_dimension=self.dimension)
        cfg["transformer"].update(d_model=self.d_model, num_heads=self.num_heads, num_layers=self.num_layers,
                                  dim_feedforward=self.dim_feedforward, context=self.context,
                                  input_dimension=self.dimension, output_dimensions=[self.dimension])
        assert cfg["sample_rate"] == SAMPLE_RATE and cfg["frame_rate"] == FRAME_RATE
        return cfg


@dataclass
class QuantizerTraining:
    """How the RVQ is trained; none of this is part of the exported model."""

    dropout: float = 0.5  # chance per step of using a random number (1..codebooks) of codebooks (Mimi, SoundStream)
    no_quantization_rate: float = 0.0  # chance per sequence of skipping quantization (Mimi's "quantization rate" 0.5)
    replace_every: int = 5  # steps between dead-code replacements (moshi's EMA codebooks: usage < 10% of uniform)

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout <= 1.0 or not 0.0 <= self.no_quantization_rate < 1.0:
            raise ValueError(f"quantizer: dropout must be in [0, 1] and no_quantization_rate in [0, 1); got {self}")
        if self.replace_every < 1:
            raise ValueError(f"quantizer.replace_every must be >= 1, got {self.replace_every}")


@dataclass
class CodecLossConfig:
    """EnCodec-style reconstruction: waveform L1 + multi-scale log-mel L1/L2, plus the RVQ commitment loss."""

    wave_l1: float = 1.0  # 0.1 (EnCodec's, with a GAN) lost to 1.0 in an H100 A/B without one
    mel_l1: float = 1.0
    mel_l2: float = 0.1
    commitment: float = 1.0
    mel_windows: list[int] = field(default_factory=lambda: [64, 128, 256, 512, 1024, 2048])  # hop: window / 4
    n_mels: int = 64

    def __post_init__(self) -> None:
        if not self.mel_windows or any(w < 16 or w & (w - 1) for w in self.mel_windows):
            raise ValueError(f"loss.mel_windows must be powers of two >= 16, got {self.mel_windows}")


@dataclass
class CodecDataConfig:
    """Audio: jsonl manifests ({"path": "rel.wav", "duration": s}, paths relative to the manifest), wav
    directories (searched recursively) or wav files. Each channel of a file is a mono example."""

    train: list[str] = field(default_factory=list)
    eval: list[str] = field(default_factory=list)  # held-out audio for the periodic validation; empty: none
    eval_crops: int = 32  # fixed validation crops (same every time)
    workers: int = 0  # DataLoader worker processes reading crops
    skip_bad: bool = False

    def __post_init__(self) -> None:
        if not self.train:
            raise ValueError("data.train: name at least one manifest, wav directory or wav file")


@dataclass
class CodecTrainConfig:
    batch_size: int = 16
    grad_clip: float = 1.0
    weight_decay: float = 0.01  # matrices only
    betas: tuple[float, float] = (0.8, 0.99)
    precision: Precision = "bf16"  # bf16 autocast on CUDA (the quantizer and losses stay fp32); CPU runs fp32
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"train.batch_size must be >= 1, got {self.batch_size}")
        self.betas = tuple(self.betas)  # type: ignore[assignment]


@dataclass
class CodecConfig:
    run_dir: str
    data: CodecDataConfig
    stages: list[Stage]  # seq_len: crop length in 12.5 Hz frames
    model: MimiSize = field(default_factory=MimiSize)
    quantizer: QuantizerTraining = field(default_factory=QuantizerTraining)
    loss: CodecLossConfig = field(default_factory=CodecLossConfig)
    train: CodecTrainConfig = field(default_factory=CodecTrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("stages: give at least one {seq_len (frames per crop), steps, lr}")
        if any(s.segment_len is not None for s in self.stages):
            raise ValueError("stages: segment_len has no meaning for the codec (a crop is one forward)")

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def to_dict(self) -> dict[str, tp.Any]:
        return dataclasses.asdict(self)


def load_codec_config(path: str | Path, overrides: list[str] | None = None) -> CodecConfig:
    """The codec trainer's config from YAML plus `--set` overrides."""
    return load_yaml_config(CodecConfig, path, overrides)
