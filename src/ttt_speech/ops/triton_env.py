"""Where our Triton kernels run: CUDA tensors, or any tensor under Triton's CPU interpreter."""

from __future__ import annotations

import importlib.util
import os

from torch import Tensor

# Triton reads this when kernels are defined, so reading it once at import agrees with Triton
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_runs_on(x: Tensor) -> bool:
    """CUDA tensors, or any tensor under Triton's CPU interpreter (how CPU tests run the kernels)."""
    return x.is_cuda or TRITON_INTERPRET
