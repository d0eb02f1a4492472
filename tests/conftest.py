import os

import pytest

# moshi compiles lazily unless told not to (4-18 s per first forward on CPU); never reach a hub.
os.environ.setdefault("NO_TORCH_COMPILE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


def pytest_configure(config: pytest.Config) -> None:
    """The commands' CPU thread policy for the whole run (ttt_speech/threads.py): one intra-op thread on a
    machine without CUDA unless OMP_NUM_THREADS says otherwise, so `python -m pytest` as the README writes
    it does not crawl on a busy CPU."""
    from ttt_speech.threads import use_cpu_threads

    use_cpu_threads(None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`@pytest.mark.gpu` is the one way a test says it needs CUDA: it selects them (`-m gpu`) and skips
    them on a machine without CUDA."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One thread even where OMP_NUM_THREADS asks for more: tiny models gain nothing from threads, and on a
    busy machine intra-op threads make them 50x slower (a serve step took 0.9 s instead of 14 ms with two
    threads descheduled in turn). Module scope, so the module's own fixtures run on one thread too."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
