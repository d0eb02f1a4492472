"""`HybridTransformerLayer`: Moshi's transformer layer with a memory branch beside (or instead of) attention.

It subclasses moshi's `StreamingTransformerLayer`, so moshi-finetune's FSDP wrapping (which keys on
that class) and `StreamingTransformer(layer_class=...)` keep working. The branch's state lives in the
layer's own streaming state, so `with lm_gen.streaming(B)`, `reset_streaming(mask)` and
`set_exec_mask` reach it through Moshi's machinery; it is updated in place (CUDA-graph safe).
The branch is a `TTTLayer` or, given a `GatedDeltaNetConfig`, a `GatedDeltaNetLayer` (hybrid mode
only), or, given an `InPlaceConfig`, an `InPlaceLayer` that turns the layer's own gated MLP into
per-stream fast weights (the attention half stays moshi's); either way it is the `.memory` submodule
(`names.MEMORY`), so parameter names and checkpoint keys keep one layout.
"""

from __future__ import annotations

import typing as tp
from dataclasses import dataclass

import torch
from moshi.modules.transformer import StreamingTransformerLayer
from torch import Tensor, nn

from ttt_speech.config import GatedDeltaNetConfig, InPlaceConfig, TTTConfig
from ttt_speech.compat import retype
from ttt_speech.layers.gated_deltanet import GatedDeltaNetLayer
from ttt_speech.layers.inplace import GatedMLP, InPlaceLayer
from ttt_speech.layers.state import LayerState
from ttt_speech.layers.streaming import StreamingLayer
from ttt_speech.layers.ttt import TTTLayer
from ttt_speech.moshi.compat import HookedTransformerLayer, LayerStreamingState, feed_forward, streaming_state
from ttt_speech.names import either

BranchConfig = tp.Union[TTTConfig, GatedDeltaNetConfig, InPlaceConfig]
# mix(qkv, heads) -> heads: a shared_qkv branch reading the attention's projection and joining its heads
Mix = tp.Callable[[Tensor, Tensor], Tensor]
# attend(h, mix) -> the attention's output (before layer scale); moshi's own, or windowed over segments
Attend = tp.Callable[[Tensor, tp.Optional[Mix]], Tensor]
# remember(h, **host) -> the memory branch's gated output
Remember = tp.Callable[..., Tensor]
Mode = tp.Literal["hybrid", "replace"]
MODES: tuple[str, ...] = ("hybrid", "replace")


@dataclass
class HybridLayerState(LayerStreamingState):
    """Moshi's per-layer streaming state plus the memory of this layer's branch (TTT or Gated DeltaNet)."""

    memory: LayerState | None = None
    memory_layer: StreamingLayer | None = None  # resetting needs the layer (TTT: its learnable initial weights)

    def reset(self, reset_mask: Tensor) -> None:
        super().reset(reset_mask)
        assert self.memory is not None and self.memory_layer is not None
        self.memory_layer.reset_state(self.memory, reset_mask)


def attention_projections(attn: nn.Module) -> dict[str, nn.Linear]:
    """Copies of a Moshi attention's Q/K/V/O as separate `nn.Linear`s (its in_proj split in three).

    Moshi's RoPE rotates interleaved pairs (2i, 2i+1) with theta^(-2i/D), the same convention as
    the TTT layer's RoPE, so the rows need no permutation.
    """
    if attn.weights_per_step or attn.kv_repeat != 1 or attn.cross_attention:
        raise ValueError("initialising TTT from attention needs plain self-attention "
                         "(no weights_per_step, kv_repeat == 1)")
    in_proj, out_proj = attn.in_projs[0], attn.out_projs[0]
    if type(in_proj) is not nn.Linear or type(out_proj) is not nn.Linear:
        raise ValueError(f"initialising TTT from attention needs nn.Linear projections, got "
                         f"{type(in_proj).__name__}/{type(out_proj).__name__} (fuse LoRA / dequantize first)")
    dim = attn.embed_dim
    w = in_proj.weight.detach()
    weights = {"q_proj": w[:dim], "k_proj": w[dim:2 * dim], "v_proj": w[2 * dim:],
               "o_proj": out_proj.weight.detach()}
    out = {}
    for name, weight in weights.items():
        lin = nn.Linear(dim, dim, bias=False, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            lin.weight.copy_(weight)
        out[name] = lin
    return out


def check_gdn_mode(mode: str, init_from_attention: bool) -> None:
    """Gated DeltaNet branches exist in hybrid mode only, and start from their own projections."""
    if mode != "hybrid":
        raise ValueError(f"mode={mode!r} is not supported with a Gated DeltaNet branch (GatedDeltaNetConfig): "
                         "replace mode starts the branch from the attention's Q/K/V/O, which Gated DeltaNet "
                         "cannot take (short convs + SiLU, L2-normalised q/k, its own gate/decay projections); "
                         "use mode='hybrid'")
    if init_from_attention:
        raise ValueError("init_from_attention=True is not supported with a Gated DeltaNet branch: its "
                         "projections feed short convs, SiLU and L2 norms, not attention; it starts from "
                         "its own small random projections")


def check_inplace(layer: StreamingTransformerLayer, cfg: InPlaceConfig, mode: str, init_from_attention: bool) -> None:
    """An in-place branch turns the layer's own gated MLP (one `ActivationGating`) into fast weights."""
    if mode != "hybrid" or init_from_attention:
        raise ValueError("an in-place branch keeps the attention and changes the layer's MLP: use mode='hybrid' "
                         "without init_from_attention")
    gating = layer.gating
    if gating is None or layer.weights_per_step or not hasattr(gating, "linear_in"):
        raise ValueError("an in-place branch needs a layer with one gated MLP (gating, no weights_per_step)")
    hidden = gating.linear_out.weight.shape[1]
    if cfg.hidden != hidden:
        raise ValueError(f"InPlaceConfig.hidden={cfg.hidden} but the layer's gated MLP has hidden width {hidden}")


def check_shared_qkv(attn: nn.Module, cfg: TTTConfig, mode: str, init_from_attention: bool) -> None:
    """A shared_qkv branch reads the attention's fused projection head by head: same heads, plain layout."""
    if mode != "hybrid" or init_from_attention:
        raise ValueError("shared_qkv is a hybrid-mode branch that reads the attention's own projections: use "
                         "mode='hybrid' without init_from_attention")
    if attn.weights_per_step or attn.kv_repeat != 1 or len(attn.in_projs) != 1:
        raise ValueError("shared_qkv needs plain self-attention (no weights_per_step, kv_repeat == 1)")
    if cfg.num_heads != attn.num_heads:
        raise ValueError(f"shared_qkv reads the attention's heads: TTTConfig.num_heads must be {attn.num_heads}, "
                         f"got {cfg.num_heads}")


class HybridTransformerLayer(HookedTransformerLayer):
    """A Moshi transformer layer whose attention gains a memory branch (hybrid) or is replaced by a TTT layer (replace).

    hybrid:  x + layer_scale_1(attn(norm1(x))) + memory(norm1(x)); the branch's output carries its own
             gate tanh(alpha), so with alpha = 0 the layer equals the original bit for bit.
             With `TTTConfig.shared_qkv` the branch has no projections: it reads the attention's
             q/k/v projection and adds tanh(alpha) * its heads to the attention's heads before the
             attention's output projection (no extra weights to read per frame: the fast hybrid).
    replace: x + layer_scale_1(memory(norm1(x))); no attention, no KV cache.
    """

    memory: TTTLayer | GatedDeltaNetLayer | InPlaceLayer
    memory_mode: Mode

    def __init__(self, *args: tp.Any, memory: BranchConfig | None = None, memory_mode: Mode | None = None,
                 init_from_attention: bool = False, ttt: BranchConfig | None = None, ttt_mode: Mode | None = None,
                 **kwargs: tp.Any) -> None:
        """moshi's layer arguments, and the branch: `memory` (`ttt` before issue 20) in `memory_mode` (default hybrid)."""
        super().__init__(*args, **kwargs)
        cfg = either(memory, ttt, "memory", "ttt")
        if cfg is None:
            raise TypeError("HybridTransformerLayer needs memory= (a TTTConfig, GatedDeltaNetConfig or InPlaceConfig)")
        self._attach_memory(cfg, either(memory_mode, ttt_mode, "memory_mode", "ttt_mode") or "hybrid",
                            init_from_attention)

    @classmethod
    def from_layer(cls, layer: StreamingTransformerLayer, memory: BranchConfig, mode: Mode = "hybrid",
                   init_from_attention: bool = False) -> "HybridTransformerLayer":
        """Turn an existing layer into this class in place, keeping its modules (no weight copies)."""
        if type(layer) is not StreamingTransformerLayer:
            raise TypeError(f"expected a moshi StreamingTransformerLayer, got {type(layer).__name__}")
        hybrid = retype(layer, cls)
        hybrid._attach_memory(memory, mode, init_from_attention)
        return hybrid

    def _attach_memory(self, cfg: BranchConfig, mode: Mode, init_from_attention: bool) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(cfg, (TTTConfig, GatedDeltaNetConfig, InPlaceConfig)):
            raise TypeError(f"expected a TTTConfig, GatedDeltaNetConfig or InPlaceConfig, got {type(cfg).__name__}")
        if isinstance(cfg, GatedDeltaNetConfig):
            check_gdn_mode(mode, init_from_attention)
        if isinstance(cfg, InPlaceConfig):
            check_inplace(self, cfg, mode, init_from_attention)
        if self.skip_self_attn or self.cross_attention is not None:
            raise ValueError("TTT layers need a plain self-attention layer (no skip_self_attn, no cross attention)")
        if cfg.dim != self.self_attn.embed_dim:
            raise ValueError(f"TTTConfig.dim={cfg.dim} but the Moshi layer has d_model={self.self_attn.embed_dim}")
        if isinstance(cfg, TTTConfig) and cfg.shared_qkv:
            check_shared_qkv(self.self_attn, cfg, mode, init_from_attention)
        if init_from_attention and cfg.num_heads != self.self_attn.num_heads:
            raise ValueError(f"initialising from attention needs TTTConfig.num_heads == the attention's "
                             f"{self.self_attn.num_heads}, got {cfg.num_heads}")
        ref = next(self.self_attn.parameters())  # not a norm: f32 norms keep fp32 in bf16 models
        projections = attention_projections(self.self_attn) if init_from_attention else {}
        with torch.device(ref.device):
            if isinstance(cfg, InPlaceConfig):
                branch: StreamingLayer = InPlaceLayer(cfg, GatedMLP.moshi(self.gating), host_owned=True)
            else:
                branch = TTTLayer(cfg, **projections) if isinstance(cfg, TTTConfig) else GatedDeltaNetLayer(cfg)
        self.memory = branch.to(dtype=ref.dtype)
        self.memory_mode = mode
        if mode == "replace":
            del self.self_attn

    def init_streaming_state(self, batch_size: int) -> HybridLayerState:
        device = next(self.memory.parameters()).device
        return HybridLayerState(batch_size, device, offset_cpu=0,
                             memory=self.memory.init_state(batch_size, device), memory_layer=self.memory)

    @property
    def shares_attention_projections(self) -> bool:
        return bool(getattr(self.memory.config, "shared_qkv", False))

    @property
    def memory_in_mlp(self) -> bool:
        """The branch is the layer's own MLP with in-place fast weights (not a branch beside attention)."""
        return isinstance(self.memory, InPlaceLayer)

    def _memory_branch(self, h: Tensor, **host: Tensor) -> Tensor:
        """Chunked (differentiable) form on whole sequences; in-place streaming step otherwise."""
        state = streaming_state(self)
        if state is None:
            y, _ = self.memory(h, **host)
            return y
        assert isinstance(state, HybridLayerState) and state.memory is not None
        y, _ = self.memory.step(h, state.memory, exec_mask=state.exec_mask, **host)
        return y

    def _moshi_attention(self, h: Tensor, mix: Mix | None) -> Tensor:
        """Moshi's own attention forward (its ring KV cache when streaming). With `mix`, tapped: the q/k/v
        projection's output also feeds the branch, whose gated heads join the attention's on their way
        into the output projection."""
        attn = self.self_attn
        if mix is None:
            return attn(h, h, h)
        taps: dict[str, Tensor] = {}

        def keep(_module: nn.Module, _args: tuple, qkv: Tensor) -> None:
            taps["qkv"] = qkv

        def join(_module: nn.Module, args: tuple) -> tuple:
            return (mix(taps.pop("qkv"), args[0]), *args[1:])

        handles = [attn.in_projs[0].register_forward_hook(keep), attn.out_projs[0].register_forward_pre_hook(join)]
        try:
            return attn(h, h, h)
        finally:
            for handle in handles:
                handle.remove()

    def attention_block(self, x: Tensor) -> Tensor:
        return residual_block(self, x, self._moshi_attention, self._memory_branch)

    def feed_forward_block(self, x: Tensor) -> Tensor:
        if not self.memory_in_mlp:
            return super().feed_forward_block(x)
        return feed_forward_block(self, x, self._memory_branch)

    def extra_repr(self) -> str:
        return f"memory_mode={self.memory_mode!r}"


def residual_block(layer: nn.Module, x: Tensor, attend: Attend, remember: Remember) -> Tensor:
    """The attention half of a Moshi layer's residual block, with its memory branch: the one place where
    a branch is composed with attention. `layer` is a `HybridTransformerLayer` or a plain moshi layer (then
    this is moshi's own `x + layer_scale_1(attn(norm1(x)))`). Streaming and whole sequences pass moshi's
    attention and the layer's streaming state; segment training passes windowed attention and the
    states carried from the previous segment.
    """
    h = layer.norm1(x)
    # an in-place branch lives in the feed-forward half (`feed_forward_block`): this half is moshi's
    mode = None if getattr(layer, "memory_in_mlp", False) else getattr(layer, "memory_mode", None)
    if mode == "replace":
        update = remember(h)
        return x.to(update) + layer.layer_scale_1(update)
    shared = mode is not None and layer.shares_attention_projections

    def mix(qkv: Tensor, heads: Tensor) -> Tensor:
        return remember(h, qkv=qkv, heads=heads)

    update = attend(h, mix if shared else None)
    out = x.to(update) + layer.layer_scale_1(update)
    if mode is None or shared:
        return out
    return out + remember(h).to(out)


def feed_forward_block(layer: nn.Module, x: Tensor, remember: Remember) -> Tensor:
    """The feed-forward half of a Moshi layer's residual block: moshi's own, or, for an in-place branch,
    `x + layer_scale_2(remember(norm2(x)))` where the branch *is* the gated MLP with its fast weights
    (the same ops as moshi's `_ff_block`, so before any write it is that block bit for bit)."""
    if not getattr(layer, "memory_in_mlp", False):
        return feed_forward(layer, x)
    update = remember(layer.norm2(x))
    return x.to(update) + layer.layer_scale_2(update)


def memory_states(lm: nn.Module) -> tp.Iterator[HybridLayerState]:
    """The streaming state of every hybrid layer of a streaming model that holds a memory (none when not streaming)."""
    for module in lm.modules():
        state = streaming_state(module) if isinstance(module, HybridTransformerLayer) else None
        if isinstance(state, HybridLayerState) and state.memory is not None and state.memory_layer is not None:
            yield state


def reset_memories(lm: nn.Module) -> int:
    """Restart the memory branch state of every hybrid layer of a streaming model, all streams, leaving
    attention's KV cache as it is: the "memory reset between source and copy" control (issue 24).
    Returns the number of states reset (0 for a model without memory or not streaming)."""
    n = 0
    for state in memory_states(lm):
        state.memory_layer.reset_state(state.memory)  # type: ignore[union-attr]
        n += 1
    return n


def write_mutes(lm: nn.Module) -> list[Tensor]:
    """The `mute` [B] tensor of every in-place memory's streaming state (empty for a model without one or not
    streaming): a caller that mutes every frame finds them once and writes them in place."""
    return [state.memory["mute"] for state in memory_states(lm)  # type: ignore[index]
            if isinstance(state.memory_layer, InPlaceLayer)]


def mute_writes_(lm: nn.Module, mute: Tensor | float) -> int:
    """Set how much of its writes each stream withholds, in every in-place memory of a streaming model: `mute`
    is a float for all streams or a [B] tensor (0 writes as trained, 1 reads the memory and writes nothing).
    Written into the states in place, so a captured CUDA graph sees it at its next replay; a stream's reset
    unmutes it. Why: the memory's writes of the model's own samples make it drift, what it holds does not
    (docs/results.md section 18), so a stream may write while it listens and not while it speaks.
    Returns the number of states set (0 for a model without in-place memory or not streaming)."""
    mutes = write_mutes(lm)
    for t in mutes:
        t.copy_(torch.as_tensor(mute) if isinstance(mute, float) else mute)
    return len(mutes)
