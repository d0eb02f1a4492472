"""A tiny Mimi that really listens, and audio to feed it."""

from __future__ import annotations

import numpy as np
import torch
from moshi.models.compression import MimiModel

from ttt_speech.moshi.tiny import build_tiny_mimi, tiny_lm_config, tiny_mimi_config


@torch.no_grad()
def listening_mimi(seed: int = 0) -> MimiModel:
    """A tiny Mimi whose codes depend on its input. build_tiny_mimi's codebooks are all zero, so it
    encodes any audio to code 0; here each codebook takes 32 latents of seeded noise, k-means style."""
    lm_card = tiny_lm_config()["card"]
    mimi = build_tiny_mimi(seed, tiny_mimi_config(2, lm_card), num_codebooks=2)
    rng = np.random.default_rng(seed)
    loud = np.repeat(rng.uniform(0.01, 0.5, 64), 1920)
    x = torch.from_numpy((rng.standard_normal(64 * 1920) * loud).astype(np.float32)).view(1, 1, -1)
    (latent,) = mimi.encoder_transformer(mimi.encoder(x))
    latent = mimi._to_framerate(latent)
    for rvq in (mimi.quantizer.rvq_first, mimi.quantizer.rvq_rest):
        codebook = rvq.vq.layers[0]._codebook
        z = rvq.input_proj(latent)[0].T  # [64 frames, codebook dim]
        codebook.embedding_sum.copy_(z[torch.randperm(len(z), generator=torch.Generator().manual_seed(seed))[:lm_card]])
        codebook._embedding = None  # moshi caches embedding_sum / cluster_usage
    return mimi



def audio(seed: int, frames: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal((frames, 1920))).astype(np.float32)
