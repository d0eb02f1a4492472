"""A one-layer Moshi that recalls a key exactly while it is inside its attention window, and its data."""

from __future__ import annotations

import torch
from moshi.models.lm import LMModel

from helpers.moshi import random_codes
from ttt_speech.eval.data import Sequence
from ttt_speech.moshi.tiny import build_tiny_lm, tiny_lm_config

# The recall model: text vocabulary 16, padding 3, keys 4..7, the answer to key a is a + 4.
VOCAB, KEYS, ANSWER_SHIFT = 16, (4, 5, 6, 7), 4
GUESSES = VOCAB - len(KEYS)  # what the model spreads its bet over when it has no key in view


@torch.no_grad()
def recall_model(window: int) -> LMModel:
    """A one-layer Moshi wired by hand to recall the key seen at position 0: its attention (no positional
    embedding) puts all its weight on key tokens, and the text head maps a recalled key a to a + 4.

    With attention context `window`, position t sees the inputs of steps t-window+1..t, i.e. the key
    (the input of step 1) while t <= window: from position window + 1 on it can only guess, uniformly over
    the 12 tokens that are not keys (2.48 nats; it never says a key, so free runs cannot re-prime it).
    Audio heads are zero (uniform: a constant log(32) per codebook)."""
    cfg = tiny_lm_config(text_card=VOCAB, num_heads=1, num_layers=1, context=window, positional_embedding="none")
    lm = build_tiny_lm(0, cfg)
    for p in lm.parameters():
        p.zero_()
    dim, const, initial = lm.dim, VOCAB, VOCAB + 1
    lm.text_emb.weight[:VOCAB, :VOCAB] = torch.eye(VOCAB)
    lm.text_emb.weight[:, const] = 1.0
    lm.text_emb.weight[VOCAB, initial] = 1.0
    layer = lm.transformer.layers[0]
    for norm in (layer.norm1, layer.norm2, lm.out_norm):
        norm.alpha.fill_(1.0)
    w = layer.self_attn.in_projs[0].weight  # rows: q (dim), k (dim), v (dim); one head
    w[0, const] = 3.3
    for a in KEYS:
        w[dim, a] = 3.3  # q.k / sqrt(dim) = 30 for a key, 0 otherwise
        w[2 * dim + a, a] = 1.0
        layer.self_attn.out_projs[0].weight[a, a] = 1.0
        lm.text_linear.weight[a + ANSWER_SHIFT, a] = 2.0
        lm.text_linear.weight[a, const] = -20.0
    return lm.eval()


def recall_data(lm: LMModel, n: int, T: int) -> list[Sequence]:
    """Text: a key at position 0, then its answer at every position; audio: random."""
    out = []
    for i, codes in enumerate(random_codes(lm, n, T, seed=1)):
        key = KEYS[i % len(KEYS)]
        codes[0] = key + ANSWER_SHIFT
        codes[0, 0] = key
        out.append(Sequence(f"recall{i}", codes))
    return out
