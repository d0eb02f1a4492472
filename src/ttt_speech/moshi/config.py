"""Recover a Moshi `config.json` (the `LMModel` keyword arguments) from a built `LMModel`.

moshi's loaders do not keep the config on the model, yet `convert(lm).save_pretrained(dir)` must
write one. The inferred config is checked by building an `LMModel` from it on the meta device and
comparing every tensor name and shape, so a wrong guess fails loudly instead of saving a checkpoint
that cannot be loaded.
"""

from __future__ import annotations

import difflib
import inspect
import json
import types
import typing as tp
from pathlib import Path

import torch
from moshi.models.lm import LMModel
from moshi.modules.gating import ActivationGating
from moshi.modules.transformer import (
    LayerNormF32,
    LayerScale,
    RMSNorm,
    StreamingTransformer,
    StreamingTransformerLayer,
)
from torch import nn

from ttt_speech.errors import UsageError, read_json_object
from ttt_speech.moshi.compat import activation
from ttt_speech.names import LEGACY, MEMORY

# Keys of a Moshi config.json that moshi's CheckpointInfo consumes itself (not LMModel kwargs).
CHECKPOINT_INFO_KEYS = ("moshi_name", "mimi_name", "mimi_config_name", "tokenizer_name", "lora_name",
                        "model_type", "lm_gen_config", "tts_config", "stt_config", "model_id")
_ACTIVATIONS = ("silu", "gelu", "relu", "sigmoid", "tanh", "elu", "leaky_relu", "mish", "softsign")


def lm_kwargs(config: dict[str, tp.Any]) -> dict[str, tp.Any]:
    """The part of a Moshi config.json that `get_moshi_lm` takes as `lm_kwargs`."""
    return {k: v for k, v in config.items() if k not in CHECKPOINT_INFO_KEYS}


# Keys moshi's get_moshi_lm reads itself, or drops, before building LMModel; and our hybrids' section (both names).
_LOADER_KEYS = ("conditioners", "fuser", "lora", "lora_rank", "lora_scaling", "depformer_causal",
                "demux_second_stream", MEMORY, LEGACY)
# Set by LMModel or StreamingTransformer themselves: given again in config.json they are a TypeError.
_SET_BY_MOSHI = ("self", "kwargs", "device", "dtype", "d_model", "dim_feedforward", "rope", "layer_class",
                 "checkpointing", "condition_provider", "fuser", "activation")


def _parameters() -> dict[str, inspect.Parameter]:
    """Every config.json key moshi's builders accept, with the parameter that takes it."""
    lm = inspect.signature(LMModel.__init__).parameters
    inner = {**inspect.signature(StreamingTransformerLayer.__init__).parameters,
             **inspect.signature(StreamingTransformer.__init__).parameters}
    inner = {k: v for k, v in inner.items() if k not in _SET_BY_MOSHI}
    dep = {f"depformer_{k}": v for k, v in inner.items() if k not in ("quantize", "causal")}  # LMModel passes both
    return dep | inner | {k: v for k, v in lm.items() if k not in _SET_BY_MOSHI}


def _accepts(annotation: tp.Any, value: tp.Any) -> bool:
    """Whether a JSON value fits a parameter's annotation (numbers loosely: moshi annotates floats as int)."""
    if annotation is inspect.Parameter.empty or annotation is tp.Any:
        return True
    if tp.get_origin(annotation) in (tp.Union, types.UnionType):
        return any(_accepts(a, value) for a in tp.get_args(annotation))
    base = tp.get_origin(annotation) or annotation
    if base is type(None):
        return value is None
    if base is bool:
        return isinstance(value, bool)
    if base in (int, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base in (list, tuple):
        return isinstance(value, list)
    if base is str:
        return isinstance(value, str)
    return True  # a module or callable: config.json cannot hold one, moshi fills it in


def check_moshi_config(raw: dict[str, tp.Any], path: str | Path) -> None:
    """Refuse a config.json that moshi's builders would reject deep inside (TypeError, assertion), naming
    the key: an unknown (misspelled) key, a value of the wrong type, delays that do not match n_q."""
    params = _parameters()
    known = set(params) | set(CHECKPOINT_INFO_KEYS) | set(_LOADER_KEYS)
    for key, value in raw.items():
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"did you mean {close[0]!r}?" if close else "remove it"
            raise UsageError(f"{path}: unknown key {key!r} for a Moshi model ({hint})")
        if key in params and not _accepts(params[key].annotation, value):
            raise UsageError(f"{path}: {key} = {json.dumps(value)} has the wrong type "
                             f"(moshi expects {inspect.formatannotation(params[key].annotation)})")
    n_q, delays = raw.get("n_q", params["n_q"].default), raw.get("delays", params["delays"].default)
    if len(delays) != n_q + 1:
        raise UsageError(f"{path}: delays has {len(delays)} entries; n_q = {n_q} needs {n_q + 1} (text + codebooks)")


def read_moshi_config(path: str | Path) -> dict[str, tp.Any]:
    """A Moshi config.json, refused with a UsageError naming the file (and key) if moshi could not build it."""
    raw = read_json_object(path, "Moshi config.json")
    check_moshi_config(raw, path)
    return raw


def _norm_name(norm: nn.Module) -> str:
    if isinstance(norm, LayerNormF32):
        return "layer_norm_f32"
    if isinstance(norm, nn.LayerNorm):
        return "layer_norm"
    if isinstance(norm, RMSNorm):
        return "rms_norm_f32" if norm.dtype == torch.float32 else "rms_norm"
    raise ValueError(f"unknown norm {type(norm).__name__}")


def _activation_name(fn: tp.Any) -> str:
    if isinstance(fn, nn.Identity):
        return "identity"
    for name in _ACTIVATIONS:
        if activation(name) is fn:
            return name
    raise ValueError(f"unknown gating activation {fn}")


def _feedforward(gating: nn.Module, dim: int) -> int:
    """A dim_feedforward that moshi maps to this gating's hidden size (several may; any works)."""
    assert isinstance(gating, ActivationGating)
    hidden = gating.linear_out.in_features
    if (21 * dim) // 8 == hidden:
        return 4 * dim
    ff = -(-3 * hidden // 2)
    return ff + 1 if ff == 4 * dim else ff


def _layer_scale(layer: StreamingTransformerLayer) -> float | None:
    """None without LayerScale; else a start value (it only sets the init, trained values load over it)."""
    ls = layer.layer_scale_1
    if not isinstance(ls, LayerScale):
        return None
    return 1e-4 if ls.scale.is_meta else float(ls.scale.detach().flatten()[0].float())


def _layer_kwargs(tr: StreamingTransformer) -> dict[str, tp.Any]:
    """Kwargs shared by all layers of a transformer, in LMModel's (unprefixed) names."""
    layer = tr.layers[0]
    assert isinstance(layer, StreamingTransformerLayer)
    attn = layer.self_attn
    dim = attn.embed_dim
    out: dict[str, tp.Any] = {
        "num_heads": attn.num_heads,
        "num_layers": len(tr.layers),
        "causal": attn.causal,
        "max_period": tr.max_period,
        "norm": _norm_name(layer.norm1),
        "layer_scale": _layer_scale(layer),
    }
    if attn.kv_repeat != 1:
        out["kv_repeat"] = attn.kv_repeat
    if tr.positional_scale != 1.0:
        out["positional_scale"] = tr.positional_scale
    if layer.gating is None:
        assert isinstance(layer.linear1, nn.Linear)
        out["gating"] = "none"
        out["dim_feedforward"] = layer.linear1.out_features
    else:
        gatings = list(layer.gating) if isinstance(layer.gating, nn.ModuleList) else [layer.gating]
        out["gating"] = _activation_name(gatings[0].activation)
        ffs = [_feedforward(g, dim) for g in gatings]
        out["dim_feedforward"] = ffs[0] if len(set(ffs)) == 1 else ffs
    return out


def infer_moshi_config(lm: LMModel) -> dict[str, tp.Any]:
    """Moshi config.json keys for `lm`, verified by rebuilding it on meta and comparing shapes."""
    if lm.condition_provider is not None or lm.fuser is not None:
        raise ValueError("cannot infer the config of a conditioned Moshi; pass moshi_config= "
                         "(e.g. CheckpointInfo.raw_config)")
    main = _layer_kwargs(lm.transformer)
    ff = main.pop("dim_feedforward")
    hidden_scale = ff / lm.dim if int(ff / lm.dim * lm.dim) == ff else (ff + 0.5) / lm.dim
    cfg: dict[str, tp.Any] = {
        "dim": lm.dim, "text_card": lm.text_card, "existing_text_padding_id": lm.existing_text_padding_id,
        "existing_text_end_padding_id": lm.existing_text_end_padding_id,
        "n_q": lm.n_q, "dep_q": lm.dep_q, "card": lm.card, **main, "hidden_scale": hidden_scale,
        "context": lm.context, "positional_embedding": lm.transformer.positional_embedding,
        "delays": list(lm.delays),
    }
    if lm.text_linear.out_features != lm.text_card:
        cfg["text_card_out"] = lm.text_linear.out_features
    if lm.text_emb.demux_second_stream:
        cfg["demux_second_text_stream"] = True
    if lm.emb and lm.emb[0].norm is not None:
        cfg["norm_emb"] = True
    if lm.text_linear.bias is not None:
        cfg["bias_proj"] = True
    if len(lm.extra_heads):
        cfg["extra_heads_num_heads"] = len(lm.extra_heads)
        cfg["extra_heads_dim"] = lm.extra_heads[0].out_features
    if lm.depformer is not None:
        dep = _layer_kwargs(lm.depformer)
        del dep["causal"]  # LMModel passes the main `causal` to the depformer explicitly
        dep_attn = lm.depformer.layers[0].self_attn
        dep["dim"] = lm.depformer_in[0].out_features
        dep["multi_linear"] = lm.depformer_multi_linear
        dep["pos_emb"] = lm.depformer.positional_embedding
        if dep_attn.weights_per_step:
            dep["weights_per_step"] = True
            if lm.depformer_weights_per_step_schedule is not None:
                dep["weights_per_step_schedule"] = list(lm.depformer_weights_per_step_schedule)
        if lm.depformer_emb and lm.depformer_emb[0].low_rank is not None:
            dep["low_rank_embeddings"] = lm.depformer_emb[0].embedding_dim
        if not isinstance(lm.depformer_norms[0], nn.Identity):
            dep["norm"] = _norm_name(lm.depformer_norms[0])
        else:
            dep.pop("norm")  # the depformer's layers always use the main `norm`
        for key, default in (("kv_repeat", 1), ("positional_scale", 1.0)):
            if key in main:  # main kwargs leak into the depformer's unless overridden
                dep.setdefault(key, default)
        cfg.update({f"depformer_{k}": v for k, v in dep.items()})
    _verify(lm, cfg)
    return cfg


def _verify(lm: LMModel, cfg: dict[str, tp.Any]) -> None:
    with torch.device("meta"):
        rebuilt = LMModel(device="meta", **cfg)
    got = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    want = {k: tuple(v.shape) for k, v in lm.state_dict().items()}
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))[:6]
        raise ValueError(f"could not infer this Moshi's config (tensors differ, e.g. {diff}); "
                         "pass moshi_config= (e.g. CheckpointInfo.raw_config)")
