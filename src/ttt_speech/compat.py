"""The one door into torch's private attributes, and into changing an object's class.

Four things ttt_speech needs have no public torch API: a module that shares another's parameters,
buffers and children without copying them (FSDP2 shards one layer through a stand-in), the
weight-norm fold, the fused int8 weight-only matmul, and how many specialisations one compiled function may hold. Swapping an object's class in place (a 7B model is converted, not copied) is
also done here only, with the one check that makes it safe. `tests/test_compat.py` tests each.
"""

from __future__ import annotations

import typing as tp

import torch
from torch import Tensor, nn

T = tp.TypeVar("T")


def share_module_contents(unit: nn.Module, layer: nn.Module) -> None:
    """Make `unit` hold `layer`'s parameters, buffers and children (the same dicts, no copies)."""
    unit._parameters = layer._parameters
    unit._buffers = layer._buffers
    unit._non_persistent_buffers_set = layer._non_persistent_buffers_set
    unit._modules = layer._modules


def fold_weight_norm(v: Tensor, g: Tensor) -> Tensor:
    """The weight `torch.nn.utils.weight_norm(dim=0)` computes from its direction `v` and gain `g`."""
    return torch._weight_norm(v, g, 0)


def weight_int8pack_mm(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """`x @ weight.T * scales` in one kernel: `x` [M, K] contiguous, `weight` [N, K] int8, `scales` [N] in x's dtype."""
    return torch._weight_int8pack_mm(x, weight, scales)


def retype(obj: object, cls: type[T]) -> T:
    """`obj` becomes a `cls` in place; `cls` must subclass obj's class and add no instance layout."""
    if not issubclass(cls, type(obj)):
        raise TypeError(f"{cls.__name__} does not subclass {type(obj).__name__}")
    obj.__class__ = cls
    return tp.cast(T, obj)


def allow_recompiles(limit: int) -> None:
    """Let each function torch.compile'd in this process hold at least `limit` specialisations (one per
    input shape) before dynamo gives up and runs it eagerly; never lowers the limit."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, limit)
