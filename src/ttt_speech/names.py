"""The memory branch's one name, and the one place that reads files written under its old name.

A hybrid layer's memory branch (TTT, Gated DeltaNet, in-place fast weights) is the submodule
`memory`: its parameters are `...layers.{i}.memory.*` (HF: `...self_attn.memory.*`, `...mlp.memory.*`),
a hybrid checkpoint's config.json describes it in a "memory" section, and a streaming layer's state
holds it in a `memory` field. Before issue 20 all of these said `ttt`, whichever design the branch
was; checkpoints, training runs and kept conversations from then load through `current_name` /
`current_keys` / `current_section`, here and nowhere else.
"""

from __future__ import annotations

import typing as tp

from ttt_speech.errors import UsageError

MEMORY = "memory"
LEGACY = "ttt"  # the name the branch had before issue 20 (files written then use it)

V = tp.TypeVar("V")


def is_memory(name: str) -> bool:
    """Whether the parameter (or state-dict key, or state tensor name) `name` belongs to a memory branch."""
    return MEMORY in name.split(".")


def current_name(name: str) -> str:
    """A dotted name with the old branch component (`layers.3.ttt.W1`) under today's (`layers.3.memory.W1`).

    Only a whole component named `ttt` is the branch: `ttt_norm_weight` inside a TTT layer stays."""
    parts = name.split(".")
    return ".".join(MEMORY if p == LEGACY else p for p in parts) if LEGACY in parts else name


def legacy_name(name: str) -> str:
    """The inverse of `current_name`: the name a file written before issue 20 used."""
    parts = name.split(".")
    return ".".join(LEGACY if p == MEMORY else p for p in parts) if MEMORY in parts else name


def current_keys(state: tp.Mapping[str, V]) -> dict[str, V]:
    """A state dict (or any name -> value mapping) with old branch names renamed; today's pass unchanged."""
    return {current_name(k): v for k, v in state.items()}


def current_section(config: dict[str, tp.Any], where: str = "config") -> dict[str, tp.Any]:
    """A config.json mapping with an old "ttt" section moved to "memory" (a copy; the rest as it was).

    Both at once is a UsageError naming `where`: which one describes the tensors cannot be told."""
    if LEGACY not in config:
        return config
    if MEMORY in config:
        raise UsageError(f"{where} has both a '{MEMORY}' section and its old name '{LEGACY}'; keep one")
    return {(MEMORY if k == LEGACY else k): v for k, v in config.items()}


def memory_section(config: dict[str, tp.Any], where: str = "config") -> tp.Any | None:
    """A config.json's memory section under either name (None: not a hybrid)."""
    return current_section(config, where).get(MEMORY)


def either(value: V | None, old: V | None, name: str, old_name: str) -> V | None:
    """A keyword argument given under today's name or under the one it had before issue 20 (`ttt=`); both at
    once is a TypeError naming them."""
    if value is not None and old is not None:
        raise TypeError(f"give {name}= or its old name {old_name}=, not both")
    return value if old is None else old
