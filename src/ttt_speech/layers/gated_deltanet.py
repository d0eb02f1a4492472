"""`GatedDeltaNetLayer`: Gated DeltaNet (Yang et al. 2024) as a drop-in rival to `TTTLayer`.

Same interface as TTTLayer: x [B, T, dim] -> y [B, T, dim] with an explicit fixed-size
`GatedDeltaNetState`; `forward` is the chunked WY form (differentiable, any T), `step` streams in
place (graph-capturable for one token). The branch follows flash-linear-attention's `GatedDeltaNet`
layer: q/k/v projections with short causal convs + SiLU, L2-normalised q/k, Mamba2-style decay
g = -exp(A_log) softplus(a_proj(x) + dt_bias), beta = sigmoid(b_proj(x)), per-head RMSNorm gated by
silu(g_proj(x)), o_proj. Its output is scaled by tanh(alpha), alpha = `gate_init` (0: exact zeros,
so inserting it into a pretrained model changes nothing until trained).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ttt_speech.layers.config import GatedDeltaNetConfig, builds
from ttt_speech.layers.state import LayerState, Spec
from ttt_speech.layers.streaming import StreamingLayer, causal_depthwise_conv
from ttt_speech.ops.gated_deltanet import gated_delta_chunked, gated_delta_step_

CONVS = ("q", "k", "v")


class GatedDeltaNetState(LayerState):
    """The delta-rule memory S [B, H, Dk, Dv] (fp32) and the short convs' tails; starts from zeros."""

    kind = "gated-deltanet"
    config_cls = GatedDeltaNetConfig
    main = "S"

    @classmethod
    def spec(cls, config: GatedDeltaNetConfig, batch_size: int, dtype: torch.dtype = torch.float32) -> Spec:
        B, H, Dk, Dv = batch_size, config.num_heads, config.head_dim_k, config.head_dim_v
        spec: Spec = {"S": ((B, H, Dk, Dv), dtype)}
        if config.use_short_conv:
            for name, width in zip(CONVS, (H * Dk, H * Dk, H * Dv)):
                spec["conv_" + name] = ((B, config.conv_kernel - 1, width), dtype)
        return spec


def _mamba2_decay_init(H: int, dt_min: float = 1e-3, dt_max: float = 0.1, floor: float = 1e-4) -> tuple[Tensor, Tensor]:
    """A_log ~ log U(0, 16) and dt_bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max] (FLA/Mamba2)."""
    A_log = torch.empty(H).uniform_(0, 16).log()
    dt = (torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).exp().clamp_min(floor)
    return A_log, dt + torch.log(-torch.expm1(-dt))


@builds(GatedDeltaNetConfig)
class GatedDeltaNetLayer(StreamingLayer):
    """Gated DeltaNet sequence layer with every memory layer's interface (`StreamingLayer`: forward, step, init_state, reset_state).

    Inner hooks (`register_inner_hook`) see q, k [B, H, T, Dk] (before their L2 norm), v [B, H, T, Dv],
    decay g and write strength beta [B, H, T].
    """

    state_cls = GatedDeltaNetState
    state_param = "A_log"

    def __init__(self, config: GatedDeltaNetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        C, H, Dk, Dv = cfg.dim, cfg.num_heads, cfg.head_dim_k, cfg.head_dim_v

        def linear(n_in: int, n_out: int) -> nn.Linear:
            lin = nn.Linear(n_in, n_out, bias=False)
            nn.init.normal_(lin.weight, std=cfg.init_std)
            return lin

        self.q_proj, self.k_proj = linear(C, H * Dk), linear(C, H * Dk)
        self.v_proj, self.g_proj = linear(C, H * Dv), linear(C, H * Dv)
        self.a_proj, self.b_proj = linear(C, H), linear(C, H)
        self.o_proj = linear(H * Dv, C)
        A_log, dt_bias = _mamba2_decay_init(H)
        self.A_log, self.dt_bias = nn.Parameter(A_log), nn.Parameter(dt_bias)
        if cfg.use_short_conv:
            for name, width in zip(CONVS, (H * Dk, H * Dk, H * Dv)):
                w = torch.randn(width, cfg.conv_kernel) / math.sqrt(cfg.conv_kernel)
                self.register_parameter(f"conv_{name}_weight", nn.Parameter(w))
                self.register_parameter(f"conv_{name}_bias", nn.Parameter(torch.zeros(width)))
        self.o_norm_weight = nn.Parameter(torch.ones(Dv))
        self.gate_alpha = nn.Parameter(torch.full((C,), float(cfg.gate_init)))

    # -- shared pieces of both forms ---------------------------------------------------------
    def _prepare(self, x: Tensor, state: GatedDeltaNetState) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Projections, convs, decay and write strength: ([q, k, v, g, beta] in the state dtype, conv tails)."""
        cfg = self.config
        B, T, _ = x.shape
        H, cd = cfg.num_heads, state.dtype
        tails: dict[str, Tensor] = {}
        qkv = []
        for name in CONVS:
            h = getattr(self, f"{name}_proj")(x)
            if cfg.use_short_conv:
                h, tails["conv_" + name] = causal_depthwise_conv(
                    h, state["conv_" + name], getattr(self, f"conv_{name}_weight"), getattr(self, f"conv_{name}_bias"))
            qkv.append(F.silu(h).to(cd).view(B, T, H, -1).transpose(1, 2))
        g = -self.A_log.to(cd).exp() * F.softplus(self.a_proj(x).to(cd) + self.dt_bias.to(cd))
        beta = torch.sigmoid(self.b_proj(x).to(cd))
        inputs = [*qkv, g.transpose(1, 2), beta.transpose(1, 2)]
        self._show_inner(inputs)
        return inputs, tails

    def _finish(self, o: Tensor, x: Tensor) -> Tensor:
        """Per-head RMSNorm gated by silu(g_proj(x)), o_proj, then the tanh(alpha) gate; o: [B, H, T, Dv]."""
        B, H, T, Dv = o.shape
        cd = o.dtype
        o = F.rms_norm(o.transpose(1, 2), (Dv,), self.o_norm_weight.to(cd), self.config.norm_eps)
        o = o * F.silu(self.g_proj(x).to(cd).view(B, T, H, Dv))
        y = self.o_proj(o.reshape(B, T, H * Dv).to(self.o_proj.weight.dtype)).to(cd)
        return (y * torch.tanh(self.gate_alpha.to(cd))).to(x.dtype)

    # -- the two forms -----------------------------------------------------------------------
    def forward(self, x: Tensor, state: GatedDeltaNetState | None = None) -> tuple[Tensor, GatedDeltaNetState]:
        """Chunked form over any T; returns y and a *new* state (the input state is not touched)."""
        state = self._check(x, state)
        if x.shape[1] == 0:
            return x.new_zeros(x.shape), state.clone()
        (q, k, v, g, beta), tails = self._prepare(x, state)
        o, S = gated_delta_chunked(q, k, v, g, beta, state["S"], chunk_size=self.config.chunk_size, l2_norm=True)
        return self._finish(o, x), state.replace(S=S, **{k: t.to(state.dtype) for k, t in tails.items()})

    def _step_token(self, x: Tensor, state: GatedDeltaNetState, exec_mask: Tensor | None) -> Tensor:
        (q, k, v, g, beta), tails = self._prepare(x, state)
        o = gated_delta_step_(q, k, v, g, beta, state["S"], l2_norm=True, exec_mask=exec_mask)
        state.write_(tails, exec_mask)
        return self._finish(o, x)
