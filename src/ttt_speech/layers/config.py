"""`TTTConfig`, `GatedDeltaNetConfig`, `InPlaceConfig`: every knob of a memory layer in one dataclass (gpt-fast style).

The bottom of `layers/`: it imports no layer. Each layer class names the config it is built from
(`@builds(TTTConfig)`), so `config.build()` finds its layer without this module importing it; importing
any `ttt_speech.layers` module (this one included) imports them all (`layers/__init__.py`), so the
table is full whenever a config exists. `ttt_speech.config` hands these names on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

Inner = Literal["linear", "mlp"]
Variant = Literal["ttt-lm", "fla"]
Target = Literal["same", "next"]
C = TypeVar("C", bound="DictConfig")
L = TypeVar("L")

_LAYERS: dict[type, Callable[..., Any]] = {}  # config class -> the layer class built from it


def builds(config_cls: type[DictConfig]) -> Callable[[type[L]], type[L]]:
    """Class decorator of a layer whose first argument is a `config_cls`: `config_cls(...).build(...)` makes one."""
    def register(layer_cls: type[L]) -> type[L]:
        _LAYERS[config_cls] = layer_cls
        return layer_cls
    return register


class DictConfig:
    """JSON round trip for config dataclasses (state files carry their config), unknown keys refused;
    `build(...)`: the layer it configures (its class's arguments after the config)."""

    def build(self, *args: Any, **kwargs: Any) -> Any:
        return _LAYERS[type(self)](self, *args, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
        return cls(**d)


@dataclass
class TTTConfig(DictConfig):
    """Configuration of one TTT layer.

    `variant="ttt-lm"` follows the official ttt-lm-pytorch/jax semantics (Sun et al. 2024);
    `variant="fla"` follows flash-linear-attention's `chunk_ttt_linear` (see docs/ttt.md for how
    they differ). The TTT fast weights are state, not parameters: `W_init`/`b_init` parameters are
    only the weights every stream starts from.
    """

    dim: int
    num_heads: int
    inner: Inner = "linear"
    mini_batch: int = 16
    variant: Variant = "ttt-lm"
    base_lr: float | None = None  # None: 1.0 for linear, 0.1 for mlp (the paper's values)
    use_rope: bool = True
    rope_theta: float = 10000.0
    pre_conv: bool = False
    share_qk: bool = False
    conv_kernel: int = 4
    output_gate: bool = False
    # q, k, v come from the host attention's input projection and the output joins its heads before
    # the attention's output projection: no projections of its own (hybrid mode; see docs/ttt.md)
    shared_qkv: bool = False
    gate_init: float = 0.0
    mlp_expansion: int = 4
    eps: float = 1e-6
    init_std: float = 0.02
    # "same": key and value of a token come from that token (the TTT paper's reconstruction);
    # "next": the key from the token before and the value from this one, so the inner model learns
    # what follows what (next-frame aligned, like in-place TTT's target; docs/ttt.md)
    target: Target = "same"

    def __post_init__(self) -> None:
        if self.target not in ("same", "next"):
            raise ValueError(f"target must be 'same' or 'next', got {self.target!r}")
        if self.inner not in ("linear", "mlp"):
            raise ValueError(f"inner must be 'linear' or 'mlp', got {self.inner!r}")
        if self.variant not in ("ttt-lm", "fla"):
            raise ValueError(f"variant must be 'ttt-lm' or 'fla', got {self.variant!r}")
        if self.variant == "fla" and self.inner != "linear":
            raise ValueError("variant='fla' exists for inner='linear' only (FLA has no TTT-MLP kernel)")
        if self.dim <= 0 or self.num_heads <= 0 or self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be a positive multiple of num_heads ({self.num_heads})")
        if self.use_rope and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.mini_batch < 1:
            raise ValueError(f"mini_batch must be >= 1, got {self.mini_batch}")
        if (self.pre_conv or self.share_qk) and self.conv_kernel < 1:
            raise ValueError(f"conv_kernel must be >= 1, got {self.conv_kernel}")
        if self.shared_qkv and (self.pre_conv or self.share_qk or self.output_gate):
            raise ValueError("shared_qkv takes q, k, v from the attention beside it; pre_conv, share_qk and "
                             "output_gate need projections of the layer's own (turn them off)")
        if self.base_lr is None:
            self.base_lr = 1.0 if self.inner == "linear" else 0.1

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


@dataclass
class GatedDeltaNetConfig(DictConfig):
    """Configuration of one Gated DeltaNet layer (Yang et al. 2024), the linear-memory rival to TTT.

    Follows flash-linear-attention's `GatedDeltaNet` layer with its gate and short convs on; head
    dims default to dim // num_heads. `gate_init` is the tanh output gate's start (0: a new layer
    outputs exactly zero, like `TTTConfig.gate_init`).
    """

    dim: int
    num_heads: int
    head_dim_k: int | None = None  # None: dim // num_heads
    head_dim_v: int | None = None
    use_short_conv: bool = True
    conv_kernel: int = 4
    chunk_size: int = 64
    gate_init: float = 0.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.dim <= 0 or self.num_heads <= 0:
            raise ValueError(f"dim ({self.dim}) and num_heads ({self.num_heads}) must be positive")
        if (self.head_dim_k is None or self.head_dim_v is None) and self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of num_heads ({self.num_heads}) "
                             "unless head_dim_k and head_dim_v are given")
        if self.head_dim_k is None:
            self.head_dim_k = self.dim // self.num_heads
        if self.head_dim_v is None:
            self.head_dim_v = self.dim // self.num_heads
        if self.head_dim_k <= 0 or self.head_dim_v <= 0:
            raise ValueError(f"head dims must be positive, got k {self.head_dim_k}, v {self.head_dim_v}")
        if self.use_short_conv and self.conv_kernel < 1:
            raise ValueError(f"conv_kernel must be >= 1, got {self.conv_kernel}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")


@dataclass
class InPlaceConfig(DictConfig):
    """Configuration of one in-place fast-weight layer: a gated MLP whose W_down [dim, hidden] learns per stream.

    The delta on W_down is written once per `chunk` frames from pairs (MLP hidden of frame t-1, a
    value built from the source of frame t through a causal depthwise conv of `conv_kernel` taps and
    a projection); the write strength is base_lr * sigmoid(theta . source_t + b) / hidden. With
    `target_init_std = 0` the projection starts at zero: every write is zero, so a converted
    pretrained model is unchanged until trained (see docs/ttt.md). `decay` < 1: at each chunk end the
    delta is first scaled by a learned per-layer lambda in (0, 1) starting at `decay`, so a stream of
    any length keeps a bounded delta (1.0: no decay and no parameter, the in-place paper's rule).
    """

    dim: int
    hidden: int
    chunk: int = 64
    conv_kernel: int = 2
    base_lr: float = 1.0
    target_init_std: float = 0.0
    init_std: float = 0.02
    decay: float = 1.0

    def __post_init__(self) -> None:
        if self.dim <= 0 or self.hidden <= 0:
            raise ValueError(f"dim ({self.dim}) and hidden ({self.hidden}) must be positive")
        if self.chunk < 1:
            raise ValueError(f"chunk must be >= 1 frame, got {self.chunk}")
        if self.conv_kernel < 1:
            raise ValueError(f"conv_kernel must be >= 1, got {self.conv_kernel}")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1] (1.0: no decay; e.g. 0.95 keeps ~20 chunks), got {self.decay}")
