"""`TTTState`: the fixed-size memory of a TTT layer for a batch of independent streams.

It holds the boundary fast weights, the gradient accumulated since the last mini-batch boundary,
each stream's position inside its mini-batch, and the tails of causal convolutions. Its size
depends on the config and the batch size only, never on how long the streams have run.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ttt_speech.config import TTTConfig

STATE_FORMAT = "ttt-speech/state"
STATE_VERSION = 1


def inner_shapes(cfg: TTTConfig) -> dict[str, tuple[int, ...]]:
    """Per-head shapes of the inner model's weights, in the order the ops take them."""
    H, D = cfg.num_heads, cfg.head_dim
    if cfg.inner == "linear":
        return {"W1": (H, D, D), "b1": (H, 1, D)}
    Dh = cfg.mlp_expansion * D
    return {"W1": (H, D, Dh), "b1": (H, 1, Dh), "W2": (H, Dh, D), "b2": (H, 1, D)}


def state_spec(
    cfg: TTTConfig, batch_size: int, dtype: torch.dtype = torch.float32
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor of a state: name -> (shape, dtype). The single source of truth for validation.

    States are fp32 whatever the model's dtype; fp64 exists for gradcheck.
    """
    B = batch_size
    spec: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name, shape in inner_shapes(cfg).items():
        spec[name] = ((B, *shape), dtype)
        spec["grad_" + name] = ((B, *shape), dtype)
    spec["offset"] = ((B,), torch.int64)
    if cfg.pre_conv:
        spec["conv_pre"] = ((B, cfg.conv_kernel - 1, cfg.dim), dtype)
    if cfg.share_qk:
        spec["conv_qk"] = ((B, cfg.conv_kernel - 1, cfg.dim), dtype)
    return spec


def check_tensors(tensors: dict[str, Tensor], cfg: TTTConfig, batch_size: int, what: str) -> None:
    """Raise ValueError/TypeError naming the first tensor whose name, shape or dtype is off."""
    w1 = tensors.get("W1")
    dtype = torch.float64 if w1 is not None and w1.dtype == torch.float64 else torch.float32
    spec = state_spec(cfg, batch_size, dtype)
    if set(tensors) != set(spec):
        raise ValueError(
            f"{what}: expected tensors {sorted(spec)} for this config, got {sorted(tensors)}"
        )
    for name, (shape, dtype) in spec.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise ValueError(f"{what}: tensor {name!r} expected shape {shape}, got {tuple(t.shape)}")
        if t.dtype != dtype:
            raise TypeError(f"{what}: tensor {name!r} expected dtype {dtype}, got {t.dtype}")


class TTTState:
    """Fixed-size state of one TTT layer for `batch_size` streams.

    `reset`/`copy_` work in place so that a CUDA graph captured over the state stays valid.
    """

    def __init__(
        self, config: TTTConfig, tensors: dict[str, Tensor],
        initial: Callable[[], dict[str, Tensor]] | None = None,
    ) -> None:
        self.config = config
        self.tensors = tensors
        self._initial = initial  # the layer's learnable start weights, for reset

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

    def __getitem__(self, name: str) -> Tensor:
        return self.tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    # -- facts -------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.offset.shape[0]

    @property
    def device(self) -> torch.device:
        return self.offset.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors["W1"].dtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    # -- making new states -------------------------------------------------------------------
    def replace(self, **tensors: Tensor) -> "TTTState":
        """A new state with some tensors swapped (the functional path used in training)."""
        return TTTState(self.config, {**self.tensors, **tensors}, self._initial)

    def clone(self) -> "TTTState":
        return TTTState(self.config, {k: t.clone() for k, t in self.tensors.items()}, self._initial)

    def detach(self) -> "TTTState":
        """Cut the autograd history (truncated BPTT between training segments)."""
        return TTTState(self.config, {k: t.detach() for k, t in self.tensors.items()}, self._initial)

    def to(self, device: torch.device | str) -> "TTTState":
        return TTTState(self.config, {k: t.to(device) for k, t in self.tensors.items()}, self._initial)

    # -- in-place updates --------------------------------------------------------------------
    def _stream_mask(self, mask: Tensor | None, t: Tensor) -> Tensor | None:
        if mask is None:
            return None
        mask = torch.as_tensor(mask, device=t.device).to(torch.bool)
        if mask.shape != (self.batch_size,):
            raise ValueError(f"mask: expected shape ({self.batch_size},), got {tuple(mask.shape)}")
        return mask.view(-1, *([1] * (t.dim() - 1)))

    @torch.no_grad()
    def copy_(self, other: "TTTState", mask: Tensor | None = None) -> "TTTState":
        """Copy `other` into this state, for the streams in `mask` (all when None)."""
        check_tensors(other.tensors, self.config, self.batch_size, "copy_ source")
        for k, t in self.tensors.items():
            m = self._stream_mask(mask, t)
            t.copy_(other.tensors[k] if m is None else torch.where(m, other.tensors[k], t))
        return self

    @torch.no_grad()
    def reset(self, mask: Tensor | None = None) -> "TTTState":
        """Restart the streams in `mask` (all when None) from the layer's initial weights."""
        if self._initial is None:
            raise RuntimeError(
                "this state is not bound to a layer (it was loaded from a file); "
                "use layer.reset_state(state, mask) instead"
            )
        initial = self._initial()
        for k, t in self.tensors.items():
            fresh = initial[k].to(t).expand_as(t) if k in initial else torch.zeros_like(t)
            m = self._stream_mask(mask, t)
            t.copy_(fresh if m is None else torch.where(m, fresh, t))
        return self

    # -- files -------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the state as safetensors; the config travels in the metadata for validation."""
        meta = {
            "format": STATE_FORMAT,
            "version": str(STATE_VERSION),
            "config": json.dumps(self.config.to_dict()),
        }
        save_file({k: t.detach().contiguous().cpu() for k, t in self.tensors.items()}, str(path), metadata=meta)

    @classmethod
    def load(
        cls, path: str | Path, config: TTTConfig | None = None, device: torch.device | str = "cpu",
    ) -> "TTTState":
        """Read a state file, checking its format, version, config, tensor names, shapes and dtypes."""
        path = Path(path)
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if meta.get("format") != STATE_FORMAT:
                raise ValueError(f"{path}: not a ttt-speech state file (format={meta.get('format')!r})")
            if meta.get("version") != str(STATE_VERSION):
                raise ValueError(
                    f"{path}: state version {meta.get('version')!r}, this library reads version {STATE_VERSION}"
                )
            file_cfg = TTTConfig.from_dict(json.loads(meta["config"]))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if config is not None and config != file_cfg:
            diff = {
                k: (v, getattr(config, k)) for k, v in file_cfg.to_dict().items() if getattr(config, k) != v
            }
            raise ValueError(f"{path}: state was saved for another config; (file, expected) = {diff}")
        if "offset" not in tensors:
            raise ValueError(f"{path}: missing tensor 'offset'")
        check_tensors(tensors, file_cfg, tensors["offset"].shape[0], str(path))
        return cls(file_cfg, tensors)
