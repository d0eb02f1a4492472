"""`convert`: put TTT layers into the decoder stack of a transformers speech/text LM.

`layouts.py` says where each architecture keeps that stack (`model.model` for Llama, Qwen2 and
Mixtral causal LMs; `model.model.language_model` for Qwen2-Audio). What a conversion changes, in place:
- the chosen layers' `self_attn` (see `modules.py`: hybrid mixin or `TTTAttention`), or, given an
  `InPlaceConfig`, their `mlp` (in-place fast weights; a pre-hook on the layer hands it the cache);
- the decoder's config: `sliding_window = attention_window` for every layer (so transformers'
  `DynamicCache` makes `DynamicSlidingWindowLayer`s: bounded KV memory), and a `memory` section (`section.py`);
- a forward pre-hook on the decoder stack that, before every forward,
  (1) replaces the 2D padding mask by transformers' sliding-window causal mask, so attention is
      windowed in prefill and training too, even for models whose own code only builds full causal
      masks (Llama);
  (2) makes sure a `MemoryCache` carries the TTT states (creating one in eval mode, or adopting
      `generate`'s cache);
  (3) hands the padding mask of the current tokens to the memory branches (`memory_token_mask`).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.masking_utils import create_sliding_window_causal_mask

from ttt_speech.branches import DEFAULT_BRANCH
from ttt_speech.compat import retype
from ttt_speech.config import InPlaceConfig, TTTConfig
from ttt_speech.hf.cache import MemoryCache
from ttt_speech.hf.compat import CACHE_KWARG, attention_implementation, cache_kwargs, pop_cache
from ttt_speech.hf.checkpoint import (
    LoadReport, checkpoint_keys, load_llm, log_report, read_config, read_tensors, satisfied, saved_names,
)
from ttt_speech.hf.layouts import config_model_type, decoder_config_dict, decoder_of
from ttt_speech.hf.modules import (TOKEN_MASK_KWARG, TTTAttention, drop_memory_context, expand_kv_heads, hybrid_class,
                                   inplace_class, pass_memory_context)
from ttt_speech.hf.section import Mode, MemorySection, section_of
from ttt_speech.layers.inplace import GatedMLP, InPlaceLayer
from ttt_speech.layers.ttt import TTTLayer
from ttt_speech.names import MEMORY, current_name, either, legacy_name, memory_section

SUPPORTED_ATTENTION = ("sdpa", "eager")


def _apply_window(base: nn.Module, window: int) -> None:
    """Make every attention layer of decoder stack `base` sliding-window in its config, the cache and modules."""
    config = base.config
    config.sliding_window = window
    config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    if hasattr(config, "use_sliding_window"):  # Qwen2: otherwise its __post_init__ logic would drop the window
        config.use_sliding_window = True
        config.max_window_layers = 0
    if hasattr(base, "has_sliding_layers"):  # Qwen2 builds its sliding mask only when this is set
        base.has_sliding_layers = True
    for layer in base.layers:
        if hasattr(layer.self_attn, "sliding_window"):  # Qwen2 passes it on to flash-style kernels
            layer.self_attn.sliding_window = window


def _forward_params(module: nn.Module) -> list[str]:
    return [p.name for p in inspect.signature(module.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _prepare_forward(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
    """Forward pre-hook of the converted base model: window the mask, provide the cache, pass the pad mask."""
    kwargs = {**dict(zip(_forward_params(module), args, strict=False)), **kwargs}
    config = module.config
    ref = kwargs.get("inputs_embeds")
    ref = kwargs.get("input_ids") if ref is None else ref
    if ref is None:
        return None  # the model itself reports the missing input
    B, T = ref.shape[:2]

    cache = pop_cache(kwargs)  # whichever name the caller used; handed on under the installed release's
    use_cache = kwargs.get("use_cache")
    use_cache = config.use_cache if use_cache is None else use_cache
    if cache is None and use_cache and not module.training:  # training forwards carry no TTT state
        cache = MemoryCache(config)
    elif cache is not None:
        cache = MemoryCache.adopt(cache, config)
    if cache is not None:
        kwargs[CACHE_KWARG] = cache

    mask = kwargs.get("attention_mask")
    if mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 2):
        if mask is not None:
            token_mask = mask[:, -T:].to(device=ref.device, dtype=torch.bool)
            if not bool(token_mask.all()):
                kwargs[TOKEN_MASK_KWARG] = token_mask
        windowed = create_sliding_window_causal_mask(
            config=config,
            inputs_embeds=torch.empty((B, T, 0), dtype=module.dtype, device=ref.device),
            attention_mask=mask,
            position_ids=kwargs.get("position_ids"),
            **cache_kwargs(cache),
        )
        if windowed is not None:  # None: plain causal attention is already exact (sdpa's is_causal path)
            kwargs["attention_mask"] = windowed
    return (), kwargs


def _build_ttt(cfg: TTTConfig, attn: nn.Module, mode: Mode, config: PreTrainedConfig) -> TTTLayer:
    """A TTT layer on the attention's device/dtype; in replace mode with the attention's projections."""
    ref = attn.q_proj.weight
    if mode == "hybrid":
        return cfg.build().to(device=ref.device, dtype=ref.dtype)
    num_heads, num_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = attn.q_proj.out_features // num_heads
    if (cfg.num_heads, cfg.head_dim) != (num_heads, head_dim) or attn.o_proj.out_features != cfg.dim:
        raise ValueError(
            f"replace mode reuses the attention's projections: TTTConfig needs num_heads={num_heads} and "
            f"dim={num_heads * head_dim} (head_dim {head_dim}) = hidden size {attn.o_proj.out_features}; "
            f"got num_heads={cfg.num_heads}, dim={cfg.dim}"
        )
    layer = TTTLayer(
        cfg, q_proj=attn.q_proj, k_proj=expand_kv_heads(attn.k_proj, num_kv, num_heads),
        v_proj=expand_kv_heads(attn.v_proj, num_kv, num_heads), o_proj=attn.o_proj,
    )
    return layer.to(device=ref.device, dtype=ref.dtype)


def _make_inplace(layer: nn.Module, cfg: InPlaceConfig, idx: int) -> None:
    """Give decoder layer `idx`'s gated MLP in-place fast weights (its modules stay; one key per weight)."""
    mlp = layer.mlp
    if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        raise ValueError(f"an in-place branch needs a gated MLP (gate_proj, up_proj, down_proj); layer {idx} has "
                         f"{type(mlp).__name__}")
    if cfg.hidden != mlp.down_proj.in_features:
        raise ValueError(f"InPlaceConfig.hidden={cfg.hidden} but layer {idx}'s MLP has width {mlp.down_proj.in_features}")
    ref = mlp.down_proj.weight
    with torch.device(ref.device):
        memory = InPlaceLayer(cfg, GatedMLP.hf(mlp), host_owned=True)
    retype(mlp, inplace_class(type(mlp)))
    mlp.add_module(MEMORY, memory.to(dtype=ref.dtype))
    mlp.layer_idx = idx
    layer.register_forward_pre_hook(pass_memory_context, with_kwargs=True)
    layer.register_forward_hook(drop_memory_context, with_kwargs=True)


def default_inplace_config(hidden_size: int, intermediate_size: int, **overrides: Any) -> InPlaceConfig:
    """In-place shaped like a decoder's gated MLPs (its width, their hidden width): what `convert` builds when
    given no config, as `convert-hf` and the trainer do by default, so the three cannot drift apart."""
    return InPlaceConfig(**({"dim": hidden_size, "hidden": intermediate_size} | overrides))


def _unnamed_branch(config: PreTrainedConfig, base: nn.Module, mode: Mode) -> InPlaceConfig:
    """The branch `convert` builds when given none: the default (in-place, `DEFAULT_BRANCH`). What in-place cannot
    do (replace mode, mixtures of experts) is refused by name rather than quietly given TTT: one default."""
    ttt = f"memory=TTTConfig(dim={config.hidden_size}, num_heads={config.num_attention_heads})"
    if mode != "hybrid":
        raise ValueError(f"mode={mode!r} needs a TTT branch, and the default branch is {DEFAULT_BRANCH} (since "
                         f"issue 23): pass {ttt}")
    mlp = base.layers[0].mlp
    if getattr(config, "num_local_experts", None) or not hasattr(mlp, "down_proj"):
        raise ValueError(f"the default branch ({DEFAULT_BRANCH}) makes fast weights of each layer's one gated MLP, "
                         f"and this model's are {type(mlp).__name__} (mixture of experts): pass {ttt}")
    return default_inplace_config(config.hidden_size, config.intermediate_size)


def _load_by_name(model: nn.Module, path: str | Path, keys: set[str]) -> set[str]:
    """Load these state-dict keys from the directory's files, under the names save_pretrained gives them.

    Returns the keys the directory lacks (tied parameters count as loaded with the one they share).
    A branch tensor written before issue 20 is found under its old name (`names.legacy_name`).
    """
    names, in_files = saved_names(model, keys), checkpoint_keys(path)
    names = {k: f if f in in_files else legacy_name(f) for k, f in names.items()}
    found = {k: f for k, f in names.items() if f in in_files}
    tensors = read_tensors(path, set(found.values()), next(model.parameters()).device)
    model.load_state_dict({k: tensors[f] for k, f in found.items()}, strict=False)
    return keys - satisfied(model, set(found))


class Converter:
    """`convert(model, ...)` converts; `convert.load(path)` rebuilds a converted model from a directory."""

    def __call__(
        self,
        model: PreTrainedModel,
        layers: Iterable[int],
        mode: Mode = "hybrid",
        memory: TTTConfig | InPlaceConfig | None = None,
        attention_window: int = 4096,
        *,
        ttt: TTTConfig | InPlaceConfig | None = None,
    ) -> PreTrainedModel:
        """Convert `model` in place and return it.

        layers: decoder layer indices that get a memory branch (e.g. range(24, 32)).
        mode: "hybrid" keeps attention and adds the branch (TTT: gated, gate 0 at start: same logits as the
            original while sequences fit the window); "replace" (TTT only) swaps attention for TTT initialised
            from its projections (GQA K/V heads expanded).
        memory: the branch's config. An InPlaceConfig gives the layers' own MLPs in-place fast weights (hybrid
            mode; identical logits until its target projection is trained; docs/ttt.md); it is the default
            when none is given (`default_inplace_config(hidden_size, intermediate_size)`, as for `convert-hf`
            and the trainer). A TTTConfig (e.g. TTTConfig(dim=hidden_size, num_heads=num_attention_heads))
            gives a TTT branch beside or instead of attention. mode="replace" and mixture-of-experts models
            (Mixtral) need a TTTConfig: without memory= they raise, naming it. `ttt=` is its old name.
        attention_window: keys/values every attention layer sees and caches (sliding window, tokens).
        """
        base = decoder_of(model)
        config = base.config  # the language model's own config (Qwen2-Audio: its text_config)
        if section_of(config) is not None:
            raise ValueError(f"this model is already converted (its config has a '{MEMORY}' section)")
        if attention_implementation(config) not in SUPPORTED_ATTENTION:
            raise NotImplementedError(
                f"attention implementation {attention_implementation(config)!r} is not supported yet; "
                f"load the model with attn_implementation in {SUPPORTED_ATTENTION}"
            )
        if mode not in ("hybrid", "replace"):
            raise ValueError(f"mode must be 'hybrid' or 'replace', got {mode!r}")
        if attention_window < 1:
            raise ValueError(f"attention_window must be >= 1, got {attention_window}")
        n = len(base.layers)
        idx = sorted({int(i) for i in layers})
        if not idx or idx[0] < 0 or idx[-1] >= n:
            raise ValueError(f"layers must be a non-empty set of indices in [0, {n}), got {idx}")
        if mode == "replace" and len(idx) == n:
            raise ValueError("replace mode needs at least one attention layer left (it keeps track of positions)")
        cfg = either(memory, ttt, "memory", "ttt") or _unnamed_branch(config, base, mode)
        if cfg.dim != config.hidden_size:
            raise ValueError(f"TTTConfig.dim ({cfg.dim}) must equal the model's hidden_size ({config.hidden_size})")
        if isinstance(cfg, InPlaceConfig) and mode != "hybrid":
            raise ValueError(f"mode={mode!r} is not supported with an in-place branch: it keeps the attention and "
                             "changes the layers' MLPs; use mode='hybrid'")
        if getattr(cfg, "shared_qkv", False):
            raise ValueError("shared_qkv (TTT reading the attention's own q/k/v) exists for Moshi hybrids only; "
                             "Hugging Face hybrids give the TTT layer its own projections")

        for i in idx:
            if isinstance(cfg, InPlaceConfig):
                _make_inplace(base.layers[i], cfg, i)
                continue
            attn = base.layers[i].self_attn
            ttt_layer = _build_ttt(cfg, attn, mode, config)
            if mode == "hybrid":
                retype(attn, hybrid_class(type(attn)))
                attn.add_module(MEMORY, ttt_layer)
            else:
                base.layers[i].self_attn = TTTAttention(ttt_layer, i)
        _apply_window(base, attention_window)
        setattr(config, MEMORY, MemorySection(mode, tuple(idx), attention_window, cfg, config_model_type(config)).to_dict())
        base.register_forward_pre_hook(_prepare_forward, with_kwargs=True)
        return model

    def load(
        self,
        path: str | Path,
        model: PreTrainedModel | None = None,
        dtype: torch.dtype | str | None = None,
        output_loading_info: bool = False,
    ) -> PreTrainedModel | tuple[PreTrainedModel, LoadReport]:
        """Rebuild a converted model from a local directory written by `save_pretrained`.

        The model the directory names is built and given its weights by transformers (for a
        LLaMA-Omni or VITA directory: its Llama or Mixtral; for Qwen2-Audio: the whole model, audio
        tower included), converted as the config's `memory` section says (`ttt` before issue 20), and given
        the saved branch weights (`.memory.`, or `.ttt.` before issue 20). With `model` (e.g. a LLaMA-Omni,
        VITA or Mini-Omni object built by its own code), that object is converted the same way and receives every tensor it shares with that model,
        and every other tensor of the directory it has (its speech modules); this holds one extra
        copy of the language model while it runs. Tensors and config keys the model has no place for
        are left alone: logged, and returned with output_loading_info=True.
        """
        d = memory_section(decoder_config_dict(read_config(path)))
        if d is None:
            raise ValueError(f"{path}: config.json has no '{MEMORY}' section; convert the model with `convert(...)` first")
        section = MemorySection.from_dict(d)
        llm, report = load_llm(path, dtype=dtype)
        before = set(llm.state_dict())
        self._convert_as(llm, section, path)
        state = llm.state_dict()
        missing = set(report.missing_keys) & set(state)  # replace mode: the replaced attention is gone, not missing
        missing |= _load_by_name(llm, path, set(state) - before)  # the branch parameters transformers skipped
        if model is None:
            model = llm
        else:
            self._convert_as(model, section, path)
            own = model.state_dict()
            shared = (set(own) & set(state)) - missing  # never hand on what the directory lacked
            model.load_state_dict({k: state[k] for k in shared}, strict=False)
            missing = _load_by_name(model, path, set(own) - shared)
            state = own
        report.left_alone_keys = sorted(k for k in report.left_alone_keys if current_name(k) not in state)
        report.missing_keys = sorted(missing)
        if report.missing_keys:
            raise ValueError(f"{path}: checkpoint lacks parameters of the converted model: {report.missing_keys}")
        log_report(report)
        return (model, report) if output_loading_info else model

    def _convert_as(self, model: PreTrainedModel, section: MemorySection, path: str | Path) -> None:
        """Convert `model` as `section` says, unless it already is (then it must match)."""
        if section_of(model.config) is None:
            self(model, section.layers, section.mode, section.memory, section.attention_window)
        elif section_of(model.config) != section:
            raise ValueError(f"{path}: the model was converted differently from the directory's '{MEMORY}' section")


convert = Converter()
