"""Fixed-size streaming states: `LayerState`, the machinery every memory branch shares, and `TTTState`.

A state holds one branch's memory for a batch of independent streams. Its size depends on the config
and the batch size only, never on how long the streams have run. A subclass names its tensors (its
`spec`), its config class and its `kind`; validation, masked in-place updates, resets, device moves
and safetensors files are common, so a new branch (e.g. Gated DeltaNet) gets the same guarantees.

`TTTState` holds the boundary fast weights, the gradient accumulated since the last mini-batch
boundary, each stream's position inside its mini-batch, the tails of causal convolutions and, for
`target="next"`, the last token's key.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ttt_speech.layers.config import TTTConfig

STATE_FORMAT = "ttt-speech/state"
STATE_VERSION = 1

Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]
S = TypeVar("S", bound="LayerState")


def inner_shapes(cfg: TTTConfig) -> dict[str, tuple[int, ...]]:
    """Per-head shapes of the inner model's weights, in the order the ops take them."""
    H, D = cfg.num_heads, cfg.head_dim
    if cfg.inner == "linear":
        return {"W1": (H, D, D), "b1": (H, 1, D)}
    Dh = cfg.mlp_expansion * D
    return {"W1": (H, D, Dh), "b1": (H, 1, Dh), "W2": (H, Dh, D), "b2": (H, 1, D)}


def state_spec(cfg: TTTConfig, batch_size: int, dtype: torch.dtype = torch.float32) -> Spec:
    """Every tensor of a TTT state: name -> (shape, dtype). The single source of truth for validation.

    States are fp32 whatever the model's dtype; fp64 exists for gradcheck.
    """
    B = batch_size
    spec: Spec = {}
    for name, shape in inner_shapes(cfg).items():
        spec[name] = ((B, *shape), dtype)
        spec["grad_" + name] = ((B, *shape), dtype)
    spec["offset"] = ((B,), torch.int64)
    if cfg.pre_conv:
        spec["conv_pre"] = ((B, cfg.conv_kernel - 1, cfg.dim), dtype)
    if cfg.share_qk:
        spec["conv_qk"] = ((B, cfg.conv_kernel - 1, cfg.dim), dtype)
    if cfg.target == "next":
        spec["k_prev"] = ((B, cfg.dim), dtype)
    return spec


def check_spec(tensors: dict[str, Tensor], spec: Spec, what: str) -> None:
    """Raise ValueError/TypeError naming the first tensor whose name, shape or dtype is off."""
    if set(tensors) != set(spec):
        raise ValueError(f"{what}: expected tensors {sorted(spec)} for this config, got {sorted(tensors)}")
    for name, (shape, dtype) in spec.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise ValueError(f"{what}: tensor {name!r} expected shape {shape}, got {tuple(t.shape)}")
        if t.dtype != dtype:
            raise TypeError(f"{what}: tensor {name!r} expected dtype {dtype}, got {t.dtype}")


class LayerState:
    """Fixed-size state of one memory branch for `batch_size` streams.

    Subclasses set `kind` (written to files), `config_cls`, `main` (a float tensor with the batch
    first, whose dtype is the state's) and implement `spec`. `reset`/`copy_`/`write_` work in place
    so that a CUDA graph captured over the state stays valid.
    """

    kind: ClassVar[str]
    config_cls: ClassVar[type]
    main: ClassVar[str]
    learned_init: ClassVar[bool] = False  # True: reset needs the layer's start tensors (`initial`)

    def __init__(
        self, config: Any, tensors: dict[str, Tensor],
        initial: Callable[[], dict[str, Tensor]] | None = None,
    ) -> None:
        self.config = config
        self.tensors = tensors
        self._initial = initial  # the layer's learnable start tensors, for reset

    @classmethod
    def spec(cls, config: Any, batch_size: int, dtype: torch.dtype = torch.float32) -> Spec:
        raise NotImplementedError

    @classmethod
    def check_tensors(cls, tensors: dict[str, Tensor], config: Any, batch_size: int, what: str) -> None:
        """Validate against the spec; the state's float dtype is fp32, or fp64 when `main` is fp64."""
        m = tensors.get(cls.main)
        dtype = torch.float64 if m is not None and m.dtype == torch.float64 else torch.float32
        check_spec(tensors, cls.spec(config, batch_size, dtype), what)

    @classmethod
    def check_state(cls: type[S], state: Any, config: Any, batch_size: int) -> S:
        """A state handed to a layer: the right class, tensors and config, or an error naming what is off."""
        if not isinstance(state, cls):
            raise TypeError(f"state must be a {cls.__name__}, got {type(state).__name__}")
        cls.check_tensors(state.tensors, config, batch_size, "state")
        if state.config != config:
            raise ValueError(f"state: made for config {state.config}, this layer has {config}")
        return state

    @classmethod
    def zeros(
        cls: type[S], config: Any, batch_size: int, dtype: torch.dtype, device: torch.device | str,
        initial: Callable[[], dict[str, Tensor]] | None = None,
    ) -> S:
        tensors = {n: torch.zeros(shape, dtype=dt, device=device)
                   for n, (shape, dt) in cls.spec(config, batch_size, dtype).items()}
        return cls(config, tensors, initial)

    def __getitem__(self, name: str) -> Tensor:
        return self.tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    # -- facts -------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.tensors[self.main].shape[0]

    @property
    def device(self) -> torch.device:
        return self.tensors[self.main].device

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors[self.main].dtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @classmethod
    def spec_nbytes(cls, config: Any, batch_size: int = 1) -> int:
        """What `nbytes` will be for `batch_size` streams, told before anything is allocated (the converters say it)."""
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in cls.spec(config, batch_size).values())

    # -- making new states -------------------------------------------------------------------
    def _with(self: S, tensors: dict[str, Tensor]) -> S:
        return type(self)(self.config, tensors, self._initial)

    def replace(self: S, **tensors: Tensor) -> S:
        """A new state with some tensors swapped (the functional path used in training)."""
        return self._with({**self.tensors, **tensors})

    def clone(self: S) -> S:
        return self._with({k: t.clone() for k, t in self.tensors.items()})

    def detach(self: S) -> S:
        """Cut the autograd history (truncated BPTT between training segments)."""
        return self._with({k: t.detach() for k, t in self.tensors.items()})

    def to(self: S, device: torch.device | str) -> S:
        return self._with({k: t.to(device) for k, t in self.tensors.items()})

    # -- in-place updates --------------------------------------------------------------------
    def _stream_mask(self, mask: Tensor | None, t: Tensor) -> Tensor | None:
        if mask is None:
            return None
        mask = torch.as_tensor(mask, device=t.device).to(torch.bool)
        if mask.shape != (self.batch_size,):
            raise ValueError(f"mask: expected shape ({self.batch_size},), got {tuple(mask.shape)}")
        return mask.view(-1, *([1] * (t.dim() - 1)))

    @torch.no_grad()
    def write_(self: S, tensors: dict[str, Tensor], mask: Tensor | None = None) -> S:
        """Overwrite some of this state's tensors in place, for the streams in `mask` (all when None)."""
        for k, new in tensors.items():
            t = self.tensors[k]
            m = self._stream_mask(mask, t)
            t.copy_(new if m is None else torch.where(m, new.to(t.dtype), t))
        return self

    @torch.no_grad()
    def copy_(self: S, other: LayerState, mask: Tensor | None = None) -> S:
        """Copy `other` into this state, for the streams in `mask` (all when None)."""
        self.check_tensors(other.tensors, self.config, self.batch_size, "copy_ source")
        return self.write_(other.tensors, mask)

    @torch.no_grad()
    def reset(self: S, mask: Tensor | None = None) -> S:
        """Restart the streams in `mask` (all when None): the layer's start tensors, zeros elsewhere."""
        if self._initial is None and self.learned_init:
            raise RuntimeError(
                "this state is not bound to a layer (it was loaded from a file); "
                "use layer.reset_state(state, mask) instead"
            )
        initial = self._initial() if self._initial is not None else {}
        fresh = {k: initial[k].to(t).expand_as(t) if k in initial else torch.zeros_like(t)
                 for k, t in self.tensors.items()}
        return self.write_(fresh, mask)

    # -- files -------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the state as safetensors; kind and config travel in the metadata for validation."""
        meta = {
            "format": STATE_FORMAT,
            "version": str(STATE_VERSION),
            "kind": self.kind,
            "config": json.dumps(self.config.to_dict()),
        }
        save_file({k: t.detach().contiguous().cpu() for k, t in self.tensors.items()}, str(path), metadata=meta)

    @classmethod
    def load(cls: type[S], path: str | Path, config: Any | None = None, device: torch.device | str = "cpu") -> S:
        """Read a state file, checking format, version, kind, config, tensor names, shapes and dtypes."""
        path = Path(path)
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("format") != STATE_FORMAT:
                raise ValueError(f"{path}: not a ttt-speech state file (format={meta.get('format')!r})")
            if meta.get("version") != str(STATE_VERSION):
                raise ValueError(
                    f"{path}: state version {meta.get('version')!r}, this library reads version {STATE_VERSION}"
                )
            kind = meta.get("kind", TTTState.kind)  # files written before kinds existed are TTT states
            if kind != cls.kind:
                raise ValueError(f"{path}: holds a {kind!r} state, expected {cls.kind!r} ({cls.__name__})")
            file_cfg = cls.config_cls.from_dict(json.loads(meta["config"]))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if config is not None and config != file_cfg:
            diff = {
                k: (v, getattr(config, k)) for k, v in file_cfg.to_dict().items() if getattr(config, k) != v
            }
            raise ValueError(f"{path}: state was saved for another config; (file, expected) = {diff}")
        if cls.main not in tensors:
            raise ValueError(f"{path}: missing tensor {cls.main!r}")
        cls.check_tensors(tensors, file_cfg, tensors[cls.main].shape[0], str(path))
        return cls(file_cfg, tensors)


class TTTState(LayerState):
    """Fixed-size state of one TTT layer; `reset` restarts from the layer's learnable start weights."""

    kind = "ttt"
    config_cls = TTTConfig
    main = "W1"
    learned_init = True

    @classmethod
    def spec(cls, config: TTTConfig, batch_size: int, dtype: torch.dtype = torch.float32) -> Spec:
        return state_spec(config, batch_size, dtype)

    # -- views the ops use -------------------------------------------------------------------
    @property
    def weight_names(self) -> list[str]:
        return list(inner_shapes(self.config))

    def weights(self) -> list[Tensor]:
        return [self.tensors[n] for n in self.weight_names]

    def grads(self) -> list[Tensor]:
        return [self.tensors["grad_" + n] for n in self.weight_names]

    @property
    def offset(self) -> Tensor:
        return self.tensors["offset"]


def check_tensors(tensors: dict[str, Tensor], cfg: TTTConfig, batch_size: int, what: str) -> None:
    """TTT state validation (kept as a function for existing callers)."""
    TTTState.check_tensors(tensors, cfg, batch_size, what)
