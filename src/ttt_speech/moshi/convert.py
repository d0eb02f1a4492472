"""`convert`: give a pretrained Moshi `LMModel` memory layers in place.

By default (no config given, or an `InPlaceConfig`) the chosen layers' own gated MLPs get in-place fast
weights (their W_down plus a per-stream delta; docs/ttt.md), hybrid mode only. Given a `TTTConfig`, they
get a TTT branch beside attention (hybrid) or instead of it (replace); given a `GatedDeltaNetConfig`, a
Gated DeltaNet branch (the linear-memory rival), hybrid mode only.

Only the temporal transformer (`lm.transformer`) is touched, never the depformer: the depformer
restarts every frame, so it has no long context to remember.
"""

from __future__ import annotations

import typing as tp
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from moshi.models.lm import LMModel
from moshi.modules.transformer import StreamingMultiheadAttention
from torch import nn

from ttt_speech.branches import DEFAULT_BRANCH
from ttt_speech.compat import retype
from ttt_speech.config import GatedDeltaNetConfig, InPlaceConfig, TTTConfig
from ttt_speech.moshi.compat import forget_streaming_children
from ttt_speech.moshi.config import infer_moshi_config
from ttt_speech.moshi.files import save_hybrid
from ttt_speech.moshi.layer import MODES, BranchConfig, Mode, HybridTransformerLayer, check_gdn_mode
from ttt_speech.names import either, is_memory

# tanh(10.0) == 1.0 in fp32: in replace mode the TTT output stands in for attention at full scale.
REPLACE_GATE_INIT = 10.0

LayerSpec = tp.Union[str, Iterable[int]]
Branch = tp.Literal["ttt", "gdn", "inplace"]
# the "branch" field of a checkpoint's "memory" section -> its config class; a section without it is TTT
BRANCHES: dict[str, type] = {"ttt": TTTConfig, "gdn": GatedDeltaNetConfig, "inplace": InPlaceConfig}


def branch_kind(config: BranchConfig) -> Branch:
    """"ttt" for a TTTConfig, "gdn" for a GatedDeltaNetConfig, "inplace" for an InPlaceConfig."""
    for name, cls in BRANCHES.items():
        if isinstance(config, cls):
            return tp.cast(Branch, name)
    raise TypeError(f"expected a TTTConfig, GatedDeltaNetConfig or InPlaceConfig, got {type(config).__name__}")


@dataclass(frozen=True)
class HybridSpec:
    """What `convert` did: saved as the "memory" section of a hybrid checkpoint's config.json."""

    mode: Mode
    layers: tuple[int, ...]
    config: BranchConfig

    @property
    def branch(self) -> Branch:
        return branch_kind(self.config)

    def to_dict(self) -> dict[str, tp.Any]:
        return {"branch": self.branch, "mode": self.mode, "layers": list(self.layers),
                "config": self.config.to_dict()}


class HybridLMModel(LMModel):
    """An `LMModel` whose temporal transformer has memory layers (`HybridTransformerLayer`); `LMGen` uses it unchanged.

    Made by `convert` (which re-classes the given model in place instead of copying a 7B model)
    or by `load_hybrid`; never constructed directly.
    """

    memory_spec: HybridSpec
    moshi_config: dict[str, tp.Any]

    def __init__(self, *args: tp.Any, **kwargs: tp.Any) -> None:
        raise TypeError("build a HybridLMModel with ttt_speech.moshi.convert(lm, ...) or load_hybrid(dir)")

    def memory_layers(self) -> list[HybridTransformerLayer]:
        return [self.transformer.layers[i] for i in self.memory_spec.layers]

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write model.safetensors (Moshi's key layout) + config.json (Moshi's keys + a "memory" section)."""
        return save_hybrid(self, out_dir)


def default_ttt_config(lm: LMModel, mode: Mode = "hybrid", **overrides: tp.Any) -> TTTConfig:
    """A TTT config shaped like `lm`'s attention (same heads, same RoPE base)."""
    attn = lm.transformer.layers[0].self_attn
    kw: dict[str, tp.Any] = {"dim": lm.dim, "num_heads": attn.num_heads, "rope_theta": float(lm.transformer.max_period),
                             "gate_init": 0.0 if mode == "hybrid" else REPLACE_GATE_INIT}
    return TTTConfig(**(kw | overrides))


def default_gdn_config(lm: LMModel, **overrides: tp.Any) -> GatedDeltaNetConfig:
    """A Gated DeltaNet config shaped like `lm`'s attention (same heads), gate closed (hybrid)."""
    attn = lm.transformer.layers[0].self_attn
    kw: dict[str, tp.Any] = {"dim": lm.dim, "num_heads": attn.num_heads, "gate_init": 0.0}
    return GatedDeltaNetConfig(**(kw | overrides))


def default_inplace_config(lm: LMModel, **overrides: tp.Any) -> InPlaceConfig:
    """An in-place config shaped like `lm`'s gated MLPs (dim, hidden width); its target projection starts
    at zero, so the converted model is the original until trained."""
    gating = lm.transformer.layers[0].gating
    if gating is None or not hasattr(gating, "linear_out"):
        raise ValueError("an in-place branch needs a Moshi whose layers have one gated MLP (gating); for this model "
                         "pass memory=TTTConfig(...) (e.g. default_ttt_config(lm)) to convert")
    kw: dict[str, tp.Any] = {"dim": lm.dim, "hidden": gating.linear_out.weight.shape[1]}
    return InPlaceConfig(**(kw | overrides))


def default_branch_config(lm: LMModel, mode: Mode = "hybrid", branch: Branch = tp.cast(Branch, DEFAULT_BRANCH),
                          **overrides: tp.Any) -> BranchConfig:
    """`default_ttt_config`, `default_gdn_config` or `default_inplace_config` by branch kind (default: in-place,
    as for the commands and the trainer)."""
    if branch == "ttt":
        return default_ttt_config(lm, mode, **overrides)
    if branch == "gdn":
        check_gdn_mode(mode, False)
        return default_gdn_config(lm, **overrides)
    if branch == "inplace":
        if mode != "hybrid":
            raise ValueError(f"mode={mode!r} is not supported with an in-place branch: it keeps the attention "
                             "and changes the layer's MLP; use mode='hybrid'")
        return default_inplace_config(lm, **overrides)
    raise ValueError(f"branch must be one of {tuple(BRANCHES)}, got {branch!r}")


def _unnamed_branch(lm: LMModel, mode: Mode, init_from_attention: bool | None) -> BranchConfig:
    """The branch `convert` builds when given none: the default (in-place, `DEFAULT_BRANCH`, as the commands and
    the trainer build it). What only TTT can do is refused by name rather than quietly given TTT: one default."""
    for asked, given in ((f"mode={mode!r}", mode != "hybrid"), ("init_from_attention=True", bool(init_from_attention))):
        if given:
            raise ValueError(f"{asked} needs a TTT branch, and the default branch is {DEFAULT_BRANCH} (since issue "
                             f"23): pass memory=TTTConfig(...), e.g. memory=default_ttt_config(lm, {mode!r})")
    return default_branch_config(lm, mode)


def select_layers(layers: LayerSpec, num_layers: int) -> tuple[int, ...]:
    """"all", or indices (negative ones count from the end), as a sorted tuple of unique indices."""
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f'layers must be "all" or a collection of indices, got {layers!r}')
        return tuple(range(num_layers))
    out = []
    for i in layers:
        j = int(i) + num_layers if int(i) < 0 else int(i)
        if not 0 <= j < num_layers:
            raise ValueError(f"layer index {i} out of range for {num_layers} layers")
        out.append(j)
    if not out or len(set(out)) != len(out):
        raise ValueError(f"layers must be non-empty and unique, got {list(layers)}")  # type: ignore[arg-type]
    return tuple(sorted(out))


def check_attention_window(window: int) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"attention_window must be a positive number of frames, got {window!r}")


def set_attention_window(lm: LMModel, window: int) -> None:
    """Every temporal-transformer attention sees (and its streaming ring KV cache holds) `window` frames.

    moshi sizes a layer's ring KV cache by its attention's `context` when streaming starts, so a hybrid
    whose memory carries the long context allocates only this window's keys/values per session.
    The depformer restarts every frame and is left alone.
    """
    check_attention_window(window)
    if lm.is_streaming:
        raise RuntimeError("set the attention window before entering streaming mode (the KV cache is sized then)")
    for m in lm.transformer.modules():
        if isinstance(m, StreamingMultiheadAttention):
            m.context = window
    lm.context = window
    if isinstance(lm, HybridLMModel):
        lm.moshi_config["context"] = window


def convert(
    lm: LMModel, layers: LayerSpec = "all", mode: Mode = "hybrid", memory: BranchConfig | None = None, *,
    init_from_attention: bool | None = None, moshi_config: dict[str, tp.Any] | None = None,
    attention_window: int | None = None, ttt: BranchConfig | None = None,
) -> HybridLMModel:
    """Give the chosen temporal-transformer layers a memory branch; modifies and returns `lm`.

    memory: an InPlaceConfig (the layers' own MLPs get in-place fast weights; the default when none is given:
        `default_inplace_config(lm)`, as for the commands and the trainer), a TTTConfig (a gated TTT branch
        beside attention; `default_ttt_config(lm, mode)` is shaped like the model), or a GatedDeltaNetConfig
        (a gated Gated DeltaNet branch, mode="hybrid" only, never from attention). mode="replace" and
        init_from_attention=True are TTT's: without memory= they raise, naming memory=TTTConfig(...).
        `ttt=` is its old name.

    mode="hybrid": attention and its ring KV cache stay; a gated TTT branch reads the same normed
        input and is added to the residual. With gate_init=0 the logits equal the original's.
    mode="replace": attention is replaced by TTT (no KV cache); the TTT projections start from the
        attention's Q/K/V/O and the gate from `REPLACE_GATE_INIT` by default.
    init_from_attention: copy the attention's Q/K/V/O into the TTT projections (default: only in
        replace mode; hybrid branches start from small random projections).
    moshi_config: the Moshi config.json this model was built from (CheckpointInfo.raw_config);
        inferred from the model when omitted. save_pretrained writes it back.
    attention_window: frames every temporal attention sees and caches (`set_attention_window`; saved as
        the config's `context`); default: the model's own context (Moshi-7B: 3000 frames = 4 min).
    """
    if not isinstance(lm, LMModel) or isinstance(lm, HybridLMModel):
        raise TypeError(f"convert expects a vanilla moshi LMModel, got {type(lm).__name__}")
    if lm.is_streaming:
        raise RuntimeError("convert the model before entering streaming mode")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    idx = select_layers(layers, len(lm.transformer.layers))
    cfg = either(memory, ttt, "memory", "ttt") or _unnamed_branch(lm, mode, init_from_attention)
    if isinstance(cfg, GatedDeltaNetConfig):
        check_gdn_mode(mode, bool(init_from_attention))
    else:
        branch_kind(cfg)  # a TypeError naming anything else
    if mode == "replace" and getattr(cfg, "gate_init", None) == 0.0:
        raise ValueError("mode='replace' with gate_init=0 would make each converted layer output nothing; "
                         f"use e.g. gate_init={REPLACE_GATE_INIT} (tanh = 1)")
    if init_from_attention is None:
        init_from_attention = mode == "replace"
    if attention_window is not None:
        check_attention_window(attention_window)
    config = dict(moshi_config) if moshi_config is not None else infer_moshi_config(lm)
    for i in idx:
        HybridTransformerLayer.from_layer(lm.transformer.layers[i], cfg, mode, init_from_attention)
    forget_streaming_children(lm)  # streaming children are cached on first use; the tree changed
    hybrid = retype(lm, HybridLMModel)
    hybrid.memory_spec = HybridSpec(mode, idx, cfg)
    hybrid.moshi_config = config
    if attention_window is not None:
        set_attention_window(hybrid, attention_window)
    return hybrid


def memory_parameters(model: nn.Module) -> tp.Iterator[tuple[str, nn.Parameter]]:
    """The parameters that conversion added (for optimisers that train only the memory branches)."""
    for name, p in model.named_parameters():
        if is_memory(name):
            yield name, p
