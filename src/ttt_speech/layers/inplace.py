"""`InPlaceLayer`: a pretrained gated MLP whose output projection W_down becomes a per-stream fast weight.

In-place TTT (Feng et al. 2026, arXiv 2604.06169) in a streaming form. The host's gated MLP
``y = W_down (act(W_gate x) * W_up x)`` keeps its weights; each stream adds a delta to W_down that
is written once per chunk of frames (math: `ops/inplace/reference.py` and docs/ttt.md):

- keys ``k_t = z_{t-1}``: the MLP's hidden activations of the frame before;
- values ``v_t = eta_t * W_target conv(s)_t``: the source ``s`` (the MLP's input unless the caller
  passes another, e.g. the model's input embeddings) through a causal depthwise conv ending at
  frame t and a projection; ``eta_t = base_lr * sigmoid(theta . s_t + b) / hidden``;
- the pair (k_t, v_t) joins the chunk of frame t; at the chunk's last frame all its pairs are added
  to the delta, which the *next* chunk reads (apply-then-update);
- with `decay` < 1, the delta is first scaled by this layer's lambda = sigmoid(decay_logit) (learned,
  starting at `decay`): a bounded state for streams of any length (issue 24).

So the memory learns "after what the MLP saw at t-1 comes (a projection of) frame t", the
next-frame alignment of the in-place paper, and it is causal at chunk ends without padding: a pair
needs frames up to t only, and frame t's pair waits in the buffer until its chunk is complete.
The in-place paper's centred conv looks 2 tokens ahead and zero-pads at chunk ends instead; a
streaming model has no lookahead, so here the "future" is exactly the next frame.

Before any write the delta is zero and the output is the host MLP's, bit for bit (same modules,
same ops, plus exact zeros). With `target_init_std = 0` the projection starts at zero, so a fresh
layer never changes the host until the outer loss trains it.

Frame budget at Moshi-7B shape (dim D = 4096, hidden F = 11264, chunk C = 64; the one copy of this
arithmetic, docs/ttt.md points here): `step` reads the fp32 delta once for the output (2·D·F =
92 MFLOP, 184.5 MB) and, every frame, runs the chunk write with the values of streams not at a chunk
end masked to zero: a [D, C] x [C, F] product (2·C·D·F = 5.9 GFLOP) added into the delta (184.5 MB
read + written). No host sync and no branch on tensor values, so one CUDA graph serves every frame
and the frame whose write lands runs exactly the kernels of any other frame: it cannot stall past
its neighbours. The price is that every frame pays for a write: ~553 MB and 6 GFLOP per layer and
stream, ~0.12 ms of HBM traffic on an H200 (4.8 TB/s; H100 0.17 ms) and 0.09 ms of fp32 math (67
TFLOPS; TF32, off by default in torch, would make it 0.01 ms), partly overlapped: ~0.15–0.2 ms per
layer and stream, so ~5–6 ms per frame for all 32 layers at batch 1, ~0.7 ms for 4 layers, ~5 ms for
8 streams x 4 layers, against the 80 ms frame. A decay < 1 scales the delta every frame the same way
(by lambda at a chunk end, by 1 elsewhere): one more 184.5 MB read and write, ~0.08 ms more per layer
and stream on an H200. An estimate from bytes and FLOPs;
`benchmarks/inplace_stream.py` measures it in Moshi-7B's real `LMGen.step`, chunk-end frames apart
(docs/benchmarks.md), `benchmarks/inplace_step.py` for one layer.
"""

from __future__ import annotations

import contextlib
import math
import typing as tp

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ttt_speech.layers.config import InPlaceConfig, builds
from ttt_speech.layers.state import LayerState, Spec
from ttt_speech.layers.streaming import StreamingLayer, causal_depthwise_conv
from ttt_speech.ops.inplace import inplace_chunked, inplace_parallel, inplace_step_

Activation = tp.Callable[[Tensor], Tensor]


class GatedMLP(nn.Module):
    """A host's gated MLP seen as `hidden(x) -> z` and `down(z)`, holding the host's own modules (no copies).

    Moshi's `ActivationGating` fuses gate and up in `linear_in` (gate first, then up) and projects with
    `linear_out`; HF's Llama/Qwen MLPs have `gate_proj`, `up_proj`, `down_proj`. Both compute
    ``down(act(gate x) * up x)`` with the same ops as here, so wrapping changes no bit of the output.
    """

    def __init__(self, down: nn.Module, activation: Activation, linear_in: nn.Module | None = None,
                 gate: nn.Module | None = None, up: nn.Module | None = None) -> None:
        super().__init__()
        if (linear_in is None) == (gate is None or up is None):
            raise ValueError("a gated MLP has either a fused linear_in (Moshi) or gate and up projections (HF)")
        self.linear_in, self.gate, self.up, self.down = linear_in, gate, up, down
        self.activation = activation

    @classmethod
    def moshi(cls, gating: nn.Module) -> GatedMLP:
        """From moshi's `ActivationGating` (public attributes linear_in, linear_out, activation)."""
        return cls(gating.linear_out, gating.activation, linear_in=gating.linear_in)

    @classmethod
    def hf(cls, mlp: nn.Module) -> GatedMLP:
        """From a transformers Llama/Qwen-style MLP (gate_proj, up_proj, down_proj, act_fn)."""
        return cls(mlp.down_proj, mlp.act_fn, gate=mlp.gate_proj, up=mlp.up_proj)

    def hidden(self, x: Tensor) -> Tensor:
        if self.linear_in is not None:
            h = self.linear_in(x)
            h = h.view(*h.shape[:-1], 2, -1)
            return self.activation(h[..., 0, :]) * h[..., 1, :]
        return self.activation(self.gate(x)) * self.up(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.hidden(x))


def fresh_mlp(dim: int, hidden: int, std: float) -> GatedMLP:
    """A randomly initialised SiLU-gated MLP in Moshi's layout (tests, synthetic tasks, from-scratch models)."""
    linear_in, linear_out = nn.Linear(dim, 2 * hidden, bias=False), nn.Linear(hidden, dim, bias=False)
    nn.init.normal_(linear_in.weight, std=std)
    nn.init.normal_(linear_out.weight, std=std)
    return GatedMLP(linear_out, F.silu, linear_in=linear_in)


class InPlaceState(LayerState):
    """The delta on W_down [B, dim, hidden], the current chunk's pairs, the last hidden, the conv tail, offsets,
    and `mute` [B]: the share of each stream's writes withheld (0 writes as trained, 1 writes nothing).

    fp32 whatever the model dtype: a chunk's write is ~1e-3 of the delta it joins, below bf16's
    resolution. Starts (and resets) to zeros: the host MLP's own weights, writing. `mute` is state rather
    than a setting because it is per stream and changes between frames under a captured CUDA graph: the
    caller writes it in place (`moshi.layer.mute_writes_`); why a stream mutes: docs/results.md section 18.
    """

    kind = "inplace"
    config_cls = InPlaceConfig
    main = "delta"
    settings = ("mute",)  # set by the caller, never moved by a step

    @classmethod
    def spec(cls, config: InPlaceConfig, batch_size: int, dtype: torch.dtype = torch.float32) -> Spec:
        B, D, Fh, C = batch_size, config.dim, config.hidden, config.chunk
        spec: Spec = {
            "delta": ((B, D, Fh), dtype),
            "keys": ((B, C, Fh), dtype),
            "values": ((B, C, D), dtype),
            "z_prev": ((B, Fh), dtype),
            "offset": ((B,), torch.int64),
            "mute": ((B,), dtype),
        }
        if config.conv_kernel > 1:
            spec["conv"] = ((B, config.conv_kernel - 1, D), dtype)
        return spec


@builds(InPlaceConfig)
class InPlaceLayer(StreamingLayer):
    """A gated MLP with in-place fast weights: x [B, T, dim] -> y [B, T, dim] with an explicit `InPlaceState`.

    `forward` is the chunked form (differentiable; segments carry the state), `step` streams in place.
    `mlp`: the host's (a `GatedMLP`); None builds a fresh SiLU one. Its weights are the host's and
    are not re-initialised here. `host_owned`: the host model already registers the MLP's modules
    (a converted Moshi layer's `gating`), so this layer only refers to them: each weight keeps one
    name in state dicts and checkpoints, and this layer's parameters are the memory's alone.

    Inner hooks (`register_inner_hook`) see queries z_t [B, T, hidden], keys z_{t-1} and step-scaled
    values [B, T, dim].
    """

    mlp: GatedMLP
    state_cls = InPlaceState
    state_param = "lr_weight"  # the memory's own (the MLP's may be the host's, in its dtype)
    write_scale: float | Tensor = 1.0  # written values times this (`writes_scaled`); 1.0: exactly the trained layer

    def __init__(self, config: InPlaceConfig, mlp: GatedMLP | None = None, host_owned: bool = False) -> None:
        super().__init__()
        self.config = cfg = config
        D, Fh = cfg.dim, cfg.hidden
        if host_owned and mlp is None:
            raise ValueError("host_owned=True needs the host's MLP")
        mlp = fresh_mlp(D, Fh, cfg.init_std) if mlp is None else mlp
        if host_owned:
            object.__setattr__(self, "mlp", mlp)  # a plain reference, not a child module
        else:
            self.mlp = mlp
        shape = tuple(getattr(self.mlp.down, "weight", torch.empty(D, Fh)).shape)
        if shape != (D, Fh):
            raise ValueError(f"the MLP's down projection has weight shape {shape}, the config says "
                             f"(dim, hidden) = {(D, Fh)}")
        conv = torch.zeros(D, cfg.conv_kernel)
        conv[:, -1] = 1.0  # starts as the identity: the value of frame t is a projection of frame t
        self.target_conv_weight = nn.Parameter(conv)
        self.target_conv_bias = nn.Parameter(torch.zeros(D))
        self.target_proj = nn.Linear(D, D, bias=False)
        nn.init.normal_(self.target_proj.weight, std=cfg.target_init_std)
        self.lr_weight = nn.Parameter(torch.randn(D) * cfg.init_std)
        self.lr_bias = nn.Parameter(torch.zeros(()))
        if cfg.decay < 1.0:  # only then: a layer without decay keeps the state dict of before the decay existed
            self.decay_logit = nn.Parameter(torch.tensor(math.log(cfg.decay / (1.0 - cfg.decay))))

    def decay(self, dtype: torch.dtype) -> float | Tensor:
        """lambda in (0, 1]: the float 1.0 without decay (the ops then compute exactly what they did before the
        decay existed), else the sigmoid of the learned logit, a 0-dim tensor that gets gradients."""
        if self.config.decay == 1.0:
            return 1.0
        return torch.sigmoid(self.decay_logit.to(dtype))

    def _check(self, x: Tensor, state: InPlaceState | None, source: Tensor | None = None) -> InPlaceState:
        checked = super()._check(x, state)
        if source is not None and source.shape != x.shape:
            raise ValueError(f"source: expected the shape of x {list(x.shape)}, got {list(source.shape)}")
        return checked

    # -- shared pieces of both forms ---------------------------------------------------------
    def _pairs(self, x: Tensor, state: InPlaceState, source: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, dict[str, Tensor]]:
        """Base output, queries z, keys z_{t-1}, scaled values (state dtype) and the new tails."""
        cfg, cd = self.config, state.dtype
        z = self.mlp.hidden(x)
        base = self.mlp.down(z)
        s = x if source is None else source
        tails: dict[str, Tensor] = {}
        if cfg.conv_kernel > 1:
            u, tails["conv"] = causal_depthwise_conv(s.to(cd), state["conv"], self.target_conv_weight.to(cd),
                                                     self.target_conv_bias.to(cd))
        else:
            u = s.to(cd) * self.target_conv_weight[:, 0].to(cd) + self.target_conv_bias.to(cd)
        eta = torch.sigmoid(s.to(cd) @ self.lr_weight.to(cd) + self.lr_bias.to(cd)) * (cfg.base_lr / cfg.hidden)
        v = (F.linear(u, self.target_proj.weight.to(cd)) * eta[..., None]).to(cd)  # autocast made it bf16
        v = v * (1.0 - state["mute"])[:, None, None]  # x 1 exactly while the stream writes
        if isinstance(self.write_scale, Tensor):  # per position of this forward: [T] or [B, T]
            v = v * self.write_scale[..., None].to(v.device, v.dtype)
        elif self.write_scale != 1.0:
            v = v * self.write_scale
        q = z.to(cd)
        k = torch.cat([state["z_prev"][:, None], q[:, :-1]], 1)
        tails["z_prev"] = q[:, -1].clone()  # not a view of z: states are written in place later
        self._show_inner((q, k, v))
        return base, q, k, v, tails

    # -- the two forms -----------------------------------------------------------------------
    @property
    def parallel_max(self) -> int:
        """Longest run for the attention form (`ops/inplace/parallel.py`): up to T = 2DF/(D+F) it costs fewer
        FLOPs than the chunk loop (T^2 (F+D) vs 2TDF) and keeps [T, T] scores instead of a [D, F] delta per
        chunk for the backward (Moshi-7B: T <= 6007)."""
        D, Fh = self.config.dim, self.config.hidden
        return 2 * D * Fh // (D + Fh)

    def forward(self, x: Tensor, state: InPlaceState | None = None,
                source: Tensor | None = None) -> tuple[Tensor, InPlaceState]:
        """Chunked form over any T; returns y and a *new* state (the input state is not touched). Runs up to
        `parallel_max` frames go through the attention form, longer ones through the chunk loop."""
        state = self._check(x, state, source)
        if x.shape[1] == 0:
            return self.mlp(x), state.clone()
        base, q, k, v, tails = self._pairs(x, state, source)
        run = inplace_parallel if x.shape[1] <= self.parallel_max else inplace_chunked
        o, delta, keys, values, offset = run(q, k, v, state["delta"], state["keys"], state["values"],
                                             state.tensors["offset"], self.config.chunk, self.decay(q.dtype))
        y = (base.to(o.dtype) + o).to(base.dtype)
        return y, state.replace(delta=delta, keys=keys, values=values, offset=offset, **tails)

    def _step_token(self, x: Tensor, state: InPlaceState, exec_mask: Tensor | None,
                    source: Tensor | None = None) -> Tensor:
        base, q, k, v, tails = self._pairs(x, state, source)
        o = inplace_step_(q[:, 0], k[:, 0], v[:, 0], state["delta"], state["keys"], state["values"],
                          state.tensors["offset"], self.config.chunk, exec_mask=exec_mask, decay=self.decay(q.dtype))
        state.write_(tails, exec_mask)
        return (base.to(o.dtype) + o[:, None]).to(base.dtype)


@contextlib.contextmanager
def writes_scaled(module: nn.Module, scale: float | Tensor) -> tp.Iterator[None]:
    """Every in-place layer in `module` writes `scale` times its values while inside (0.0: reads what its
    state holds, writes nothing new), as `target_proj` times `scale` would; restored on exit. A tensor scales
    each position of the forwards inside ([T], or [B, T] per stream): 1 up to a point and 0 after it freezes the
    memory there. Why: the memory frozen once the prompt is read does not drift (docs/results.md section 18), and
    that is the teacher of `train.own_prefix.distill`."""
    layers = [m for m in module.modules() if isinstance(m, InPlaceLayer)]
    if not layers:
        raise ValueError(f"{type(module).__name__} has no in-place memory layer whose writes could be scaled")
    before = [m.write_scale for m in layers]
    for m in layers:
        m.write_scale = scale
    try:
        yield
    finally:
        for m, b in zip(layers, before):
            m.write_scale = b
