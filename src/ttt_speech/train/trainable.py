"""What trains: the memory branches only (default), + LoRA adapters on attention/MLP, or everything.

TTT fast weights are state (`TTTState`), never parameters; what trains in a TTT layer are its
projections, step-size net, norms, gate and the initial weights every stream starts from.
LoRA adapters wrap the sequence layers' own linears (not those inside a memory branch) and are merged
back into plain `nn.Linear`s before an inference checkpoint is written, so the checkpoint loads
with the integrations' ordinary loaders.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ttt_speech.names import MEMORY, is_memory
from ttt_speech.train.config import LoraConfig, Trainable


class LoRALinear(nn.Module):
    """base(x) + scaling * B(A(x)); B starts at zero, so wrapping changes nothing until trained."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float) -> None:
        super().__init__()
        self.base = base
        self.scaling = scaling
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Linear(base.in_features, rank, bias=False, **kw)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False, **kw)
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.lora_b(self.lora_a(x)) * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        delta = (self.lora_b.weight.float() @ self.lora_a.weight.float()) * self.scaling
        self.base.weight.add_(delta.to(self.base.weight.dtype))
        return self.base


def _children(module: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, name, child) for every module under `module`, not descending into memory branches."""
    out = []
    for name, child in module.named_children():
        if name == MEMORY:
            continue
        out.append((module, name, child))
        out += _children(child)
    return out


def add_lora(layers: list[nn.Module], cfg: LoraConfig) -> int:
    """Wrap every nn.Linear of the given sequence layers (outside their memory branch); returns how many."""
    found = [(p, n, c) for layer in layers for p, n, c in _children(layer) if type(c) is nn.Linear]
    for parent, name, child in found:
        setattr(parent, name, LoRALinear(child, cfg.rank, cfg.scaling))
    return len(found)


def merge_lora(model: nn.Module) -> int:
    """Replace every LoRALinear by its merged nn.Linear, in place; returns how many."""
    found = [(p, n, c) for p, n, c in _children(model) if isinstance(c, LoRALinear)]
    for parent, name, child in found:
        setattr(parent, name, child.merged())
    return len(found)


def is_trainable(name: str, what: Trainable) -> bool:
    """Whether the parameter `name` trains under `what` ("memory" | "lora" | "all")."""
    if what == "all" or is_memory(name):
        return True
    return what == "lora" and (".lora_a." in name or ".lora_b." in name)


def set_trainable(model: nn.Module, what: Trainable) -> list[str]:
    """Set requires_grad by `what`; trainable parameters become fp32 (master weights). Returns their names."""
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(is_trainable(name, what))
        if p.requires_grad:
            p.data = p.data.float()
            names.append(name)
    if not names:
        raise ValueError(f"trainable={what!r} selects no parameter (a model without memory layers needs 'lora' or 'all')")
    return names
