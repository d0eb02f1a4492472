"""Processes and data parallelism on PyTorch's own engine: torchrun + DDP, or FSDP2 `fully_shard`.

As in torchtitan, the model knows nothing about parallelism: `parallelize` applies it afterwards.
FSDP2 shards one sequence layer per unit (plus the root for everything else). It does so by
swapping the class of the module it shards, which moshi's layers cannot take (their ABC/Generic
bases give them another object layout), so each layer is stood in for by a `ShardUnit` that shares
the layer's parameters, buffers and children: the state-dict names stay the model's own.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ttt_speech.compat import share_module_contents
from ttt_speech.train.model import SegmentLM

STEP_METHOD = "train_step"


@dataclass
class Processes:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Launched by torchrun (any number of processes, one included)."""
        return dist.is_initialized()

    def all_reduce(self, t: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
        if self.distributed:
            dist.all_reduce(t, op=op)
        return t

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def start_processes(device: str) -> Processes:
    """Join torchrun's process group when launched by it (gloo on CPU, NCCL on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = torch.device("cuda", local) if cuda else torch.device("cpu" if device == "auto" else device)
    if cuda:
        torch.cuda.set_device(dev)
    if "TORCHELASTIC_RUN_ID" in os.environ and not dist.is_initialized():  # set by torchrun
        dist.init_process_group("nccl" if cuda else "gloo", device_id=dev if cuda else None)
    return Processes(int(os.environ.get("RANK", "0")), world, local, dev)


class ShardUnit(nn.Module):
    """Stands in for one layer in the module tree, sharing its parameters, buffers and children."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        share_module_contents(self, layer)


def parallelize(seg: SegmentLM, procs: Processes, mode: str, bf16: bool) -> nn.Module:
    """DDP wrapper, or FSDP2 per sequence layer + the root; returns what to call for training."""
    mode = ("ddp" if procs.distributed else "none") if mode == "auto" else mode
    if mode == "none":
        if procs.distributed:
            raise ValueError("train.parallel=none under torchrun: use ddp or fsdp")
        return seg
    if not procs.distributed:
        raise ValueError(f"train.parallel={mode} needs several processes: launch with torchrun --nproc-per-node N")
    if mode == "ddp":
        ids = [procs.device.index] if procs.device.type == "cuda" else None
        # a TTT layer's initial weights get gradients in the first segment only: unused in the others
        return nn.parallel.DistributedDataParallel(seg, device_ids=ids, find_unused_parameters=True)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(procs.device.type, (procs.world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    container = seg.layer_list()
    for i, layer in enumerate(seg.layers()):
        unit = ShardUnit(layer)
        setattr(unit, STEP_METHOD, seg.steps[i])
        container[i] = unit
        fully_shard(unit, mesh=mesh, mp_policy=mp)
        register_fsdp_forward_method(unit, STEP_METHOD)  # all-gather around the step, reduce-scatter after
        seg.steps[i] = getattr(unit, STEP_METHOD)
    fully_shard(seg, mesh=mesh, mp_policy=mp)
    return seg


def sync_gradients(model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """Synchronise gradients only on the last segment's backward."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if last else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def full(t: Tensor) -> Tensor:
    """A DTensor (FSDP2) gathered whole; other tensors as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
