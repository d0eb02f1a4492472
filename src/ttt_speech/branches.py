"""The memory branch designs by name, the one a user gets without naming one, and whose option is whose.

Names are literals (no torch import) so the commands' `--help` stays fast; tests hold them equal to the
converters' tables. The default is in-place (issue 23, docs/ttt.md "The probe decides"): on the known-answer
stream it stores at 10x the attention window soonest, and on the trained small speech model it is the only
design whose copy is recalled beyond the window.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

BRANCH_NAMES = ("ttt", "gdn", "inplace")
DEFAULT_BRANCH = "inplace"


def branches_with(key: str) -> tuple[str, ...]:
    """The branches whose config has a field `key` (empty: none has)."""
    from ttt_speech.layers.config import GatedDeltaNetConfig, InPlaceConfig, TTTConfig

    configs = {"ttt": TTTConfig, "gdn": GatedDeltaNetConfig, "inplace": InPlaceConfig}
    return tuple(b for b, cls in configs.items() if key in {f.name for f in dataclasses.fields(cls)})


def wrong_branch(option: str, owners: Iterable[str], branch: str, flag: str, named: bool) -> str:
    """One line for an option given with a branch it does not belong to; `flag` spells the branch choice
    ("--branch", "model.branch:"). Unnamed, the branch is the default: the fix is to name the option's own."""
    owners = tuple(owners)
    if named:
        return f"{option} is an option of {flag} {'/'.join(owners)}; it does not apply to {flag} {branch}"
    return (f"{option} is an option of {flag} {'/'.join(owners)}, not of {flag} {branch} (the default branch "
            f"since issue 23): add {flag} {owners[0]}")


def misplaced(keys: Iterable[str], branch: str) -> tuple[str, tuple[str, ...]] | None:
    """The first of `keys` that `branch`'s config lacks but another branch's has, with those branches
    (None: every key is `branch`'s own, or no branch's, which the config itself refuses)."""
    for key in keys:
        owners = branches_with(key)
        if owners and branch not in owners:
            return key, owners
    return None


def inplace_cost(layers: int, layer_bytes: int) -> str:
    """What the convert commands print after an in-place conversion: the state every session will hold, and
    the measured price of many layers at 7B (docs/benchmarks.md), since `--layers` defaults to all of them."""
    return (f"in-place state: {layers * layer_bytes / 2**20:.0f} MiB per session ({layer_bytes / 2**20:.1f} MiB per "
            f"layer x {layers}, fp32); at Moshi-7B all 32 layers cost 1.85x vanilla's ms/frame and 5754 MiB "
            f"per session, --layers 28-31 1.115x and 719 MiB")
