"""`--device` / `--dtype` of the commands: names at parse time (no torch import, fast `--help`),
checked and turned into torch objects at the start of `run`, before a model is loaded."""

from __future__ import annotations

import typing as tp

from ttt_speech.errors import UsageError

if tp.TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def torch_device(text: str | None) -> torch.device:
    """`--device` (None: CUDA when there is one, else the CPU); an unknown or absent device is a UsageError."""
    import torch

    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device {text}: not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {text}: no CUDA device on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {text}: only cpu and cuda are supported")
    return device


def torch_dtype(name: str | None, device: torch.device, bf16_on_cuda: bool = True) -> torch.dtype:
    """`--dtype` by name; None: bfloat16 on CUDA (when `bf16_on_cuda`), float32 otherwise."""
    import torch

    if name is None:
        return torch.bfloat16 if bf16_on_cuda and device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
