"""`StreamingLayer`: what every memory layer (TTT, Gated DeltaNet, in-place) does the same way, in one place.

A layer names its state class (`state_cls`) and one parameter of its own (`state_param`); from those this
class makes, checks and resets its states, so no layer can pick another dtype, device or reset than the
others. It also streams (`step`) and shows what the memory reads (inner hooks). The two helpers below
(`check_input`, `causal_depthwise_conv`) are used by every layer.
"""

from __future__ import annotations

import typing as tp
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ttt_speech.layers.state import LayerState

# hook(layer, *inputs): what a layer's memory math reads (each layer's docstring says which tensors)
InnerHook = tp.Callable[..., None]


def check_input(x: object, dim: int) -> None:
    """Raise TypeError/ValueError naming what is wrong with a layer input that should be [B, T, dim]."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got dtype {x.dtype}")
    if x.dim() != 3 or x.shape[-1] != dim:
        raise ValueError(f"x: expected shape [B, T, {dim}], got {list(x.shape)}")


def causal_depthwise_conv(x: Tensor, tail: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """Causal depthwise conv over time continuing from `tail` (the previous kernel-1 inputs).

    x: [B, T, C]; tail: [B, kernel-1, C]; weight: [C, kernel]. Returns (y [B, T, C], new tail).
    """
    xx = torch.cat([tail.to(x.dtype), x], dim=1)
    y = F.conv1d(xx.transpose(1, 2), weight.to(x.dtype)[:, None, :], bias.to(x.dtype), groups=x.shape[-1])
    return y.transpose(1, 2), xx[:, xx.shape[1] - tail.shape[1]:]


class StreamingLayer(nn.Module):
    """A sequence layer with a fixed-size state: chunked `forward` for training, in-place `step` for streaming.

    A subclass sets `config` (with a `dim`), `state_cls` and `state_param`, and implements `forward` and
    `_step_token`; a state that starts from learned tensors (`state_cls.learned_init`) also needs
    `initial_tensors`.
    """

    config: tp.Any
    state_cls: tp.ClassVar[type[LayerState]]
    # a parameter of the memory's own: states go to its device by default, and are fp64 where it is
    state_param: tp.ClassVar[str]

    def __init__(self) -> None:
        super().__init__()
        self.inner_hooks: OrderedDict[int, InnerHook] = OrderedDict()  # see register_inner_hook

    # -- state -------------------------------------------------------------------------------
    @property
    def state_dtype(self) -> torch.dtype:
        """fp32 whatever the model dtype (bf16 state would drift over hours); fp64 for gradcheck."""
        return torch.float64 if getattr(self, self.state_param).dtype == torch.float64 else torch.float32

    def initial_tensors(self) -> dict[str, Tensor]:
        """The learned tensors each stream starts from, by state name (the others start at zero)."""
        raise NotImplementedError(f"{type(self).__name__}'s states start from zeros")

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> LayerState:
        """A fresh state for `batch_size` streams, on `device` (None: the layer's)."""
        device = getattr(self, self.state_param).device if device is None else device
        if not self.state_cls.learned_init:
            return self.state_cls.zeros(self.config, batch_size, self.state_dtype, device)
        return self.state_cls.zeros(self.config, batch_size, self.state_dtype, device, self.initial_tensors).reset()

    def reset_state(self, state: LayerState, mask: Tensor | None = None) -> LayerState:
        """Restart the streams in `mask` (all when None), in place. A state that starts from learned tensors
        is bound to this layer's first, so one loaded from a file can be reset too."""
        if self.state_cls.learned_init:
            state._initial = self.initial_tensors
        return state.reset(mask)

    def _check(self, x: Tensor, state: LayerState | None) -> LayerState:
        """x checked, and the state to run from: `state` checked against this layer, or a fresh one."""
        check_input(x, self.config.dim)
        if state is None:
            return self.init_state(x.shape[0], x.device)
        return self.state_cls.check_state(state, self.config, x.shape[0])

    # -- inner hooks -------------------------------------------------------------------------
    def register_inner_hook(self, hook: InnerHook) -> RemovableHandle:
        """Call `hook(layer, *inputs)` with what the layer's memory reads and writes each time it runs (the
        tensors its class docstring lists under "Inner hooks", in the state's dtype: what its ops take). Fired by `forward`
        and `step` alike; `handle.remove()` detaches it. This is how a probe observes the memory
        (`probe-memory`)."""
        handle = RemovableHandle(self.inner_hooks)
        self.inner_hooks[handle.id] = hook
        return handle

    def _show_inner(self, inputs: tp.Sequence[Tensor]) -> None:
        for hook in list(self.inner_hooks.values()):
            hook(self, *inputs)

    # -- streaming ---------------------------------------------------------------------------
    def _step_token(self, x: Tensor, state: tp.Any, exec_mask: Tensor | None, **host: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, x: Tensor, state: tp.Any, exec_mask: Tensor | None = None,
             **host: Tensor) -> tuple[Tensor, tp.Any]:
        """Streaming: outputs for x [B, T, dim] (or [B, dim]) at once; `state` is updated in place.

        For one token this is the layer's graph-capturable recurrent step; for longer runs the chunked
        form's result is copied into `state`. Streams with exec_mask False keep their state unchanged.
        `host`: what a layer reads from its host besides x (TTT's `shared_qkv`: the attention's qkv and
        heads; in-place: a `source`), shaped like x.
        """
        squeeze = x.dim() == 2
        if squeeze:
            x, host = x[:, None], {k: t[:, None] for k, t in host.items()}
        state = self._check(x, state, **host)
        if x.shape[1] != 1:
            y, new = self.forward(x, state, **host)
            state.copy_(new, exec_mask)
        else:
            y = self._step_token(x, state, exec_mask, **host)
        return (y[:, 0] if squeeze else y), state
