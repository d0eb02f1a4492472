"""How the installed transformers release spells what the HF integration relies on.

transformers 5.24 renamed the cache argument of every model forward, decoder layer, attention and mask
builder from `past_key_values` to `cache` (the old name still reaches `forward`, with a warning, but
`generate` passes the new one and a forward given both keeps only the new), and model outputs carry
`cache` instead of `past_key_values`. Everything in ttt_speech that passes or reads a cache goes
through the names here, so both supported releases see the same TTT state.

It is also the one module that reads a transformers private attribute (`tests/test_compat.py` has a
test per private, and fails when any other module touches one).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from packaging.version import Version
from transformers import PreTrainedConfig

from ttt_speech.deps import require

TRANSFORMERS_VERSION = Version(require("transformers"))
CACHE_KWARG = "cache" if TRANSFORMERS_VERSION >= Version("5.24.0.dev0") else "past_key_values"
_OLD_CACHE_KWARG = "past_key_values"


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Remove the cache from a forward's kwargs under either name; the new name wins, as in transformers."""
    old = kwargs.pop(_OLD_CACHE_KWARG, None)
    new = kwargs.pop(CACHE_KWARG, None)
    return new if new is not None else old


def get_cache(kwargs: dict[str, Any]) -> Any:
    """The cache a forward was given, under either name."""
    new = kwargs.get(CACHE_KWARG)
    return new if new is not None else kwargs.get(_OLD_CACHE_KWARG)


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """`model(ids, **cache_kwargs(cache))`: the cache under the installed release's name."""
    return {CACHE_KWARG: cache}


def output_cache(output: Any) -> Any:
    """The cache a model or `generate` output carries (`cache` from 5.24, `past_key_values` before)."""
    return getattr(output, CACHE_KWARG)


def attention_implementation(config: PreTrainedConfig) -> str | None:
    """The attention kernel the model was loaded with ("sdpa", "eager", ...)."""
    return config._attn_implementation


@contextlib.contextmanager
def attention_implementation_as(config: PreTrainedConfig, name: str) -> Iterator[None]:
    """Inside the block the attention layers built from `config` call the `AttentionInterface` function
    registered as `name`. Their forward looks the function up, per call, by the config's private
    `_attn_implementation`; the public `set_attn_implementation` re-checks a whole model, for load time.
    Setting it sets every sub-config's too; each gets its own back."""
    subs = {key: getattr(config, key) for key in config.sub_configs if getattr(config, key, None) is not None}
    own = {"": config._attn_implementation} | {key: sub._attn_implementation for key, sub in subs.items()}
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = own
