import os

import pytest

# moshi compiles lazily unless told not to (4-18 s per first forward on CPU); never reach a hub.
os.environ.setdefault("NO_TORCH_COMPILE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine intra-op threads make them 50x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
