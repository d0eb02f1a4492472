"""eval-long's Moshi scorer on CUDA: one CUDA graph per frame gives the eager losses (device only)."""

import pytest
import torch

from ttt_speech.eval.models import MoshiScorer
from ttt_speech.moshi import convert, default_ttt_config
from ttt_speech.moshi.tiny import build_tiny_hybrid, build_tiny_lm

pytestmark = pytest.mark.gpu


def build_tiny_shared(seed: int, device: str):
    """TTT reading the attention's q/k/v in both layers: the fused kernel's mix under moshi's graphs."""
    lm = build_tiny_lm(seed, device=device)
    return convert(lm, "all", "hybrid", default_ttt_config(lm, gate_init=0.5, mini_batch=4, shared_qkv=True))


@pytest.mark.parametrize("build", [build_tiny_lm, build_tiny_hybrid, build_tiny_shared])
def test_graphed_frames_equal_eager(build):
    from moshi.utils.compile import no_cuda_graph

    lm = build(0, device="cuda")
    g = torch.Generator().manual_seed(0)
    codes = torch.cat([torch.randint(0, lm.text_card, (2, 1, 48), generator=g),
                       torch.randint(0, lm.card, (2, lm.n_q, 48), generator=g)], dim=1)
    graphed, eager = (torch.full((2, 3, 48), torch.nan) for _ in range(2))
    MoshiScorer(lm, "g").score(codes, graphed, lambda step: None)
    with no_cuda_graph():
        MoshiScorer(lm, "e").score(codes, eager, lambda step: None)
    assert graphed.isnan().sum() == 2  # the delayed codebook's last position per sequence
    torch.testing.assert_close(graphed, eager, rtol=1e-4, atol=1e-4, equal_nan=True)
