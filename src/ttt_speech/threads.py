"""CPU intra-op threads of a command: one unless asked, because extra threads lose badly on a shared CPU.

Measured on a 2-core machine that six other processes also kept busy (load 4-5; 2026-12-02), back to back:
the small TTT hybrid then shipped streamed 17-19 frames/s on 1 thread and 1.2-1.4 frames/s on 2 (moshi's step is
dozens of small ops; each waits at a barrier for a thread the OS has descheduled), and 50 steps of
configs/tiny_recall.yaml took 11-13 s on 1 thread against 38-59 s on 2. The models run here are small; a
larger model on a dedicated machine may want more: `--threads N` or OMP_NUM_THREADS=N.
"""

from __future__ import annotations

import argparse
import os

from ttt_speech.errors import positive_int

DEFAULT_THREADS = 1


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=positive_int, default=None,
                   help=f"CPU threads for torch's operators (default: $OMP_NUM_THREADS if set, else {DEFAULT_THREADS} "
                        "without CUDA: on a busy 2-core CPU two threads streamed 13x slower than one)")


def cpu_threads(requested: int | None, cuda: bool) -> int | None:
    """`requested`, else a positive OMP_NUM_THREADS from the environment, else DEFAULT_THREADS on a machine
    without CUDA; None (torch's own default) on a CUDA machine where nobody asked."""
    if requested is not None:
        return requested
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return None if cuda else DEFAULT_THREADS


def use_cpu_threads(requested: int | None) -> int:
    """Apply `cpu_threads` to torch's intra-op threads; returns the number in use."""
    import torch

    n = cpu_threads(requested, torch.cuda.is_available())
    if n is not None:
        torch.set_num_threads(n)
    return torch.get_num_threads()
