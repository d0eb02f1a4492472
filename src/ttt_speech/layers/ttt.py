"""`TTTLayer`: a TTT-Linear / TTT-MLP sequence layer that trains chunked and streams token by token.

The layer maps x [B, T, dim] to y [B, T, dim]; its memory is an explicit `TTTState`. Three forms,
one semantics: `forward` (chunked dual form, differentiable; on CUDA whole mini-batches go through
FLA's kernel for variant="fla" and our Triton kernel otherwise), and `step` (streaming, in place,
graph-capturable for one token). The output is scaled by a per-channel gate tanh(alpha), alpha =
`gate_init` (0: a new layer outputs exactly zero, so inserting it into a pretrained model changes
nothing until it is trained).
"""

from __future__ import annotations

import contextlib
import functools
import math
import typing as tp

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ttt_speech.layers.config import TTTConfig, builds
from ttt_speech.layers.state import TTTState, inner_shapes
from ttt_speech.layers.streaming import StreamingLayer, causal_depthwise_conv
from ttt_speech.ops.ttt.fla import fla_available, ttt_linear_fla
from ttt_speech.ops.ttt.reference import ttt_chunked
from ttt_speech.ops.triton_env import triton_runs_on
from ttt_speech.ops.ttt.step import ttt_step_

# hook(layer, *inputs): what a layer's memory math reads (each layer's docstring says which tensors)
InnerHook = tp.Callable[..., None]

if tp.TYPE_CHECKING:
    from ttt_speech.ops.ttt.triton_step import StepParams


@functools.cache
def rope_table(mini_batch: int, head_dim: int, theta: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos/sin [mini_batch, head_dim/2]. Positions only run inside a mini-batch, so the table is tiny and
    made once per device (not a buffer: no dtype casts, nothing to load). fp32 like the official code,
    which our ttt-lm variant reproduces to 1e-15 in fp64."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    ang = torch.arange(mini_batch, device=device).float()[:, None] * inv_freq
    return ang.cos(), ang.sin()


def rope_interleaved(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding on adjacent pairs (2i, 2i+1), as the official TTT code's permute+rotate does.

    x: [B, H, T, D]; cos, sin: [B, 1, T, D/2] for each token's position inside the mini-batch.
    """
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


@functools.cache
def _fused_linear_step():
    """The fused Triton step for TTT-Linear, or None where Triton is missing."""
    try:
        from ttt_speech.ops.ttt.triton_step import ttt_linear_step_fused_
    except ImportError:
        return None
    return ttt_linear_step_fused_


@functools.cache
def _triton_chunk():
    """The Triton TTT-Linear training kernel module, or None where Triton is missing."""
    try:
        from ttt_speech.ops.ttt import triton_chunk
    except ImportError:
        return None
    return triton_chunk


_triton_enabled = True


@contextlib.contextmanager
def use_triton(enabled: bool) -> tp.Iterator[None]:
    """Within the block, TTT-Linear layers take our Triton kernels where they apply (the fused step,
    the chunked training kernel) or, with False, the plain-torch paths they are tested against: for
    comparing the two and for debugging."""
    global _triton_enabled
    before, _triton_enabled = _triton_enabled, enabled
    try:
        yield
    finally:
        _triton_enabled = before


def heads_to_channels(out: Tensor) -> Tensor:
    """[B, H, T, D] -> [B, T, H*D], head-major like attention's output before its projection."""
    B, H, T, D = out.shape
    return out.transpose(1, 2).reshape(B, T, H * D)


@builds(TTTConfig)
class TTTLayer(StreamingLayer):
    """TTT sequence layer. Projections may be supplied (e.g. an attention's) instead of created.

    With `shared_qkv` the layer has no projections at all: its caller passes the host attention's
    fused q/k/v projection `qkv` [B, T, 3*dim] and that attention's per-head output `heads`
    [B, T, dim] (before its output projection), and gets back heads + tanh(alpha) * TTT output, for
    the host's output projection. x is then the attention's input (it sets the step sizes).

    Inner hooks (`register_inner_hook`) see q, k, v [B, H, T, head_dim] after RoPE and step_scale,
    grad_scale [B, H, T], the a_i and c_j of `ops.ttt.reference`'s step size a_i * c_j (how far the
    weights read at token i move, how much token j's gradient counts); fired by `forward` and by the
    unfused `step` (CUDA's fused step kernel computes them inside itself).
    """

    state_cls = TTTState
    state_param = "W1"  # the weights every stream starts from

    def __init__(
        self, config: TTTConfig, q_proj: nn.Module | None = None, k_proj: nn.Module | None = None,
        v_proj: nn.Module | None = None, o_proj: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.config = cfg = config
        H, D, C = cfg.num_heads, cfg.head_dim, cfg.dim

        def linear(given: nn.Module | None, name: str = "") -> nn.Module:
            if given is not None:
                shape = tuple(getattr(given, "weight", torch.empty(C, C)).shape)
                if shape != (C, C):
                    raise ValueError(f"{name}: expected a {C}->{C} projection (weight shape {(C, C)}) for "
                                     f"{H} heads x head_dim {D}, got weight shape {shape}")
                return given
            lin = nn.Linear(C, C, bias=False)
            nn.init.normal_(lin.weight, std=cfg.init_std)
            return lin

        if cfg.shared_qkv and any(p is not None for p in (q_proj, k_proj, v_proj, o_proj)):
            raise ValueError("a shared_qkv TTT layer reads its host attention's projections; it takes none of its own")
        own = not cfg.shared_qkv
        self.q_proj = linear(q_proj, "q_proj") if own else None
        self.k_proj = linear(k_proj, "k_proj") if own and not cfg.share_qk else None
        self.v_proj = linear(v_proj, "v_proj") if own else None
        self.o_proj = linear(o_proj, "o_proj") if own else None
        if cfg.share_qk:  # one projection, two short convs make q and k differ (the paper's Mamba block)
            self.conv_q_weight = nn.Parameter(torch.randn(C, cfg.conv_kernel) / math.sqrt(cfg.conv_kernel))
            self.conv_q_bias = nn.Parameter(torch.zeros(C))
            self.conv_k_weight = nn.Parameter(torch.randn(C, cfg.conv_kernel) / math.sqrt(cfg.conv_kernel))
            self.conv_k_bias = nn.Parameter(torch.zeros(C))
        if cfg.pre_conv:  # residual RMSNorm + causal depthwise conv in front of the branch
            self.pre_norm = nn.RMSNorm(C, eps=1e-6)
            self.pre_conv_weight = nn.Parameter(torch.randn(C, cfg.conv_kernel) / math.sqrt(cfg.conv_kernel))
            self.pre_conv_bias = nn.Parameter(torch.zeros(C))
        # learnable step size: eta = base_lr * sigmoid(theta . x + b) / head_dim
        self.lr_weight = nn.Parameter(torch.randn(H, C) * cfg.init_std)
        self.lr_bias = nn.Parameter(torch.zeros(H))
        if cfg.variant == "ttt-lm":  # learnable offset on the 1/(i+1) token weights, init 0
            self.token_idx = nn.Parameter(torch.zeros(cfg.mini_batch))
        self.ttt_norm_weight = nn.Parameter(torch.ones(H, D))
        self.ttt_norm_bias = nn.Parameter(torch.zeros(H, D))
        for name, shape in inner_shapes(cfg).items():  # the weights every stream starts from
            init = torch.randn(shape) * cfg.init_std if name.startswith("W") else torch.zeros(shape)
            self.register_parameter(name, nn.Parameter(init))
        if own:  # shared: the heads join the attention's before its output projection, unnormalised like them
            self.post_norm = nn.LayerNorm(C, eps=1e-6)
        if cfg.output_gate:
            self.g_proj = linear(None)
        self.gate_alpha = nn.Parameter(torch.full((C,), float(cfg.gate_init)))

    # -- state -------------------------------------------------------------------------------
    def initial_tensors(self) -> dict[str, Tensor]:
        return {name: getattr(self, name).detach() for name in inner_shapes(self.config)}

    def _check(self, x: Tensor, state: TTTState | None, qkv: Tensor | None = None,
               heads: Tensor | None = None) -> TTTState:
        checked = super()._check(x, state)
        host = {k: t for k, t in (("qkv", qkv), ("heads", heads)) if t is not None}
        if host or self.config.shared_qkv:
            C = self.config.dim
            want = {"qkv": [*x.shape[:2], 3 * C], "heads": [*x.shape[:2], C]} if self.config.shared_qkv else {}
            got = {k: list(t.shape) for k, t in host.items()}
            if got != want:
                raise ValueError(f"shared_qkv={self.config.shared_qkv}: expected host inputs {want or 'none'} "
                                 f"for x of shape {list(x.shape)}, got {got or 'none'}")
        if state is None:  # start from the live initial weights, so they get gradients
            B = x.shape[0]
            return checked.replace(**{n: w.to(self.state_dtype).expand(B, *w.shape)
                                      for n, w in ((n, getattr(self, n)) for n in checked.weight_names)})
        return checked

    # -- shared pieces of both forms ---------------------------------------------------------
    def _project(self, x: Tensor, state: TTTState, qkv: Tensor | None) -> tuple[list[Tensor], Tensor, dict[str, Tensor]]:
        """Projections and convs: ([q, k, v] [B, T, dim], branch input h, tails for the state). With
        target="next" the keys are shifted one token later (token t learns k_{t-1} -> v_t)."""
        if qkv is not None:
            projected, h, tails = list(qkv.split(self.config.dim, dim=-1)), x, {}
        else:
            projected, h, tails = self._own_projections(x, state)
        if self.config.target == "next":
            k = projected[1]
            projected[1] = torch.cat([state["k_prev"][:, None].to(k.dtype), k[:, :-1]], 1)
            tails["k_prev"] = k[:, -1].clone()  # not a view: the state is later written in place
        return projected, h, tails

    def _own_projections(self, x: Tensor, state: TTTState) -> tuple[list[Tensor], Tensor, dict[str, Tensor]]:
        cfg = self.config
        tails: dict[str, Tensor] = {}
        h = x
        if cfg.pre_conv:
            y, tails["conv_pre"] = causal_depthwise_conv(
                self.pre_norm(x), state["conv_pre"], self.pre_conv_weight, self.pre_conv_bias)
            h = x + y
        if cfg.share_qk:
            xq = self.q_proj(h)
            q, tail = causal_depthwise_conv(xq, state["conv_qk"], self.conv_q_weight, self.conv_q_bias)
            k, _ = causal_depthwise_conv(xq, state["conv_qk"], self.conv_k_weight, self.conv_k_bias)
            tails["conv_qk"] = tail
        else:
            q, k = self.q_proj(h), self.k_proj(h)
        return [q, k, self.v_proj(h)], h, tails

    def inner_norm(self) -> tuple[Tensor, Tensor]:
        """Weight and bias [H, head_dim] of the LayerNorm inside the inner model's loss, in the state's dtype."""
        return self.ttt_norm_weight.to(self.state_dtype), self.ttt_norm_bias.to(self.state_dtype)

    def _inner_inputs(self, q: Tensor, k: Tensor, v: Tensor, h: Tensor, state: TTTState) -> list[Tensor]:
        """RoPE and step sizes: [q, k, v, step_scale, grad_scale] per head in the state's dtype (fp32); shown to
        the inner hooks."""
        inputs = self._rope_and_steps(q, k, v, h, state)
        self._show_inner(inputs)
        return inputs

    def _rope_and_steps(self, q: Tensor, k: Tensor, v: Tensor, h: Tensor, state: TTTState) -> list[Tensor]:
        cfg = self.config
        B, T, _ = h.shape
        H, D = cfg.num_heads, cfg.head_dim
        cd = state.dtype  # compute dtype of the TTT math: the state's
        q, k, v = (t.to(cd).view(B, T, H, D).transpose(1, 2) for t in (q, k, v))
        pos = (state.offset[:, None] + torch.arange(T, device=h.device)) % cfg.mini_batch  # [B, T]
        if cfg.use_rope:
            cos, sin = (t.to(cd)[pos][:, None] for t in rope_table(cfg.mini_batch, D, cfg.rope_theta, h.device))
            q, k = rope_interleaved(q, cos, sin), rope_interleaved(k, cos, sin)
        lr = torch.sigmoid(torch.einsum("btc,hc->bht", h.to(cd), self.lr_weight.to(cd))
                           + self.lr_bias.to(cd)[:, None]) * (cfg.base_lr / D)
        if cfg.variant == "ttt-lm":  # eta[i, j] = token_eta(i) * lr(j)
            base = 1.0 / torch.arange(1, cfg.mini_batch + 1, device=h.device, dtype=cd)
            tok = (base + self.token_idx.to(cd)).clamp_min(0.0)[pos]
            step_scale, grad_scale = tok[:, None, :].expand(B, H, T), lr
        else:  # fla: eta[i, j] = lr(i), q scaled like FLA's default 1/sqrt(D)
            q = q * D**-0.5
            step_scale, grad_scale = lr, torch.ones_like(lr)
        return [q, k, v, step_scale, grad_scale]

    def _finish(self, o: Tensor, h: Tensor, dtype: torch.dtype, heads: Tensor | None) -> Tensor:
        """o [B, T, dim] per-head outputs -> the layer output (shared_qkv: mixed into the host's heads)."""
        cd = o.dtype
        gate = torch.tanh(self.gate_alpha.to(cd))
        if heads is not None:
            return (heads.to(cd) + gate * o).to(heads.dtype)
        C = o.shape[-1]
        o = F.layer_norm(o, (C,), self.post_norm.weight.to(cd), self.post_norm.bias.to(cd), 1e-6)
        if self.config.output_gate:
            o = F.gelu(self.g_proj(h).to(cd), approximate="tanh") * o
        proj_dtype = next((p.dtype for p in self.o_proj.parameters()), dtype)
        return (self.o_proj(o.to(proj_dtype)).to(cd) * gate).to(dtype)

    @property
    def _inner_loop_options(self) -> dict:
        """The non-tensor arguments every form of the inner loop takes (reference, kernels, step), read from
        the config in this one place so the forms cannot run different loops."""
        cfg = self.config
        return dict(mini_batch=cfg.mini_batch, residual="q" if cfg.variant == "ttt-lm" else "z", eps=cfg.eps)

    # -- the two forms -----------------------------------------------------------------------
    def forward(self, x: Tensor, state: TTTState | None = None, qkv: Tensor | None = None,
                heads: Tensor | None = None) -> tuple[Tensor, TTTState]:
        """Chunked form over any T; returns y and a *new* state (the input state is not touched).

        qkv, heads: the host attention's, for a `shared_qkv` layer (see the class docstring).
        """
        state = self._check(x, state, qkv, heads)
        if x.shape[1] == 0:
            return (x.new_zeros(x.shape) if heads is None else heads.clone()), state.clone()
        projected, h, tails = self._project(x, state, qkv)
        q, k, v, step_scale, grad_scale = self._inner_inputs(*projected, h, state)
        weights, grads, offset = state.weights(), state.grads(), state.offset
        outs = []
        kernel = self._chunk_kernel(x, state)
        if kernel is not None:  # whole mini-batches through a kernel, the tail through the reference
            T0 = x.shape[1] // self.config.mini_batch * self.config.mini_batch
            o, W, b = kernel(*(t[:, :, :T0] for t in (q, k, v, step_scale, grad_scale)), *weights)
            outs.append(o)
            weights = [W, b]
            q, k, v, step_scale, grad_scale = (t[:, :, T0:] for t in (q, k, v, step_scale, grad_scale))
        if q.shape[2]:
            o, weights, grads, offset = ttt_chunked(q, k, v, step_scale, grad_scale, *self.inner_norm(), weights,
                                                    grads, offset, **self._inner_loop_options)
            outs.append(o)
        else:
            offset = offset.clone()
        y = self._finish(heads_to_channels(torch.cat(outs, dim=2)), h, x.dtype, heads)
        names = state.weight_names
        new = dict(zip(names, weights)) | {"grad_" + n: g for n, g in zip(names, grads)}
        return y, state.replace(**new, offset=offset, **{k: t.to(state.dtype) for k, t in tails.items()})

    def _chunk_kernel(self, x: Tensor, state: TTTState) -> tp.Callable[..., tuple[Tensor, Tensor, Tensor]] | None:
        """The kernel for this run's whole mini-batches, or None (reference). Both kernels need
        TTT-Linear, a fresh mini-batch start, at least one whole mini-batch, and a mini-batch of 16, 32
        or 64 (tl.dot's smallest tile is 16): FLA's for variant="fla" (grad_scale = 1), ours for either
        variant, with bf16 products for bf16/fp16 models and fp32 ones for fp32 models (tf32 where
        torch.backends.cuda.matmul.allow_tf32 says so)."""
        cfg = self.config
        if (cfg.inner != "linear" or x.shape[1] < cfg.mini_batch or state.dtype != torch.float32
                or not triton_runs_on(x)):
            return None
        ln, eps, dt = self.inner_norm(), cfg.eps, x.dtype
        if cfg.variant == "fla" and x.is_cuda and cfg.mini_batch in (16, 32, 64) and fla_available():
            def run(q, k, v, step_scale, grad_scale, W, b):
                return ttt_linear_fla(q.to(dt), k.to(dt), v.to(dt), step_scale, *ln, W, b, cfg.mini_batch, eps)
        elif _triton_enabled and _triton_chunk() is not None and _triton_chunk().supported(cfg.head_dim, cfg.mini_batch):
            precision = "bf16" if dt != torch.float32 else "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"

            def run(q, k, v, step_scale, grad_scale, W, b):
                return _triton_chunk().ttt_linear_chunked_triton(q, k, v, step_scale, grad_scale, *ln, W, b,
                                                                **self._inner_loop_options,
                                                                precision=precision)
        else:
            return None
        fresh = (state.offset == 0).all() & torch.stack([g.abs().amax() == 0 for g in state.grads()]).all()
        return run if bool(fresh) else None

    def _fused_params(self, x: Tensor, state: TTTState) -> StepParams | None:
        """What the fused Triton step reads, where it applies (Triton, TTT-Linear, power-of-two head_dim,
        fp32 state); None: step in plain torch."""
        cfg = self.config
        D = cfg.head_dim
        if (not _triton_enabled or _fused_linear_step() is None or not triton_runs_on(x)
                or cfg.inner != "linear" or D & (D - 1) or state.dtype != torch.float32):
            return None
        from ttt_speech.ops.ttt.triton_step import StepParams

        return StepParams(
            lr_weight=self.lr_weight, lr_bias=self.lr_bias,
            rope=rope_table(cfg.mini_batch, D, cfg.rope_theta, x.device) if cfg.use_rope else None,
            token_idx=self.token_idx if cfg.variant == "ttt-lm" else None,
            ln_w=self.ttt_norm_weight, ln_b=self.ttt_norm_bias, gate_alpha=self.gate_alpha,
            mini_batch=cfg.mini_batch, lr_scale=cfg.base_lr / D, q_scale=1.0 if cfg.variant == "ttt-lm" else D**-0.5,
            eps=cfg.eps)

    def _step_token(self, x: Tensor, state: TTTState, exec_mask: Tensor | None, qkv: Tensor | None = None,
                    heads: Tensor | None = None) -> Tensor:
        projected, h, tails = self._project(x, state, qkv)
        params = self._fused_params(x, state)
        if params is not None:  # one kernel from the raw projections (and into the host's heads)
            fused = _fused_linear_step()
            out = fused(*projected, h, params, state.weights(), state.grads(), state.offset, exec_mask, heads)
            state.write_(tails, exec_mask)
            return out if heads is not None else self._finish(out, h, x.dtype, None)
        q, k, v, step_scale, grad_scale = self._inner_inputs(*projected, h, state)
        out = ttt_step_(q, k, v, step_scale, grad_scale, *self.inner_norm(), state.weights(), state.grads(),
                        state.offset, exec_mask=exec_mask, **self._inner_loop_options)
        state.write_(tails, exec_mask)
        return self._finish(heads_to_channels(out), h, x.dtype, heads)
