"""Own-sample prefixes (`train.own_prefix`): training sequences whose context holds the model's own samples.

Teacher forcing only ever shows a model real speech; talking alone, its memory reads and writes its own
samples, and issue 24's hybrid drifts into repeated fragments within minutes while its teacher-forced
P(pad) stays calibrated (docs/results.md sections 10-14): exposure bias. Like scheduled sampling, a share
of each batch's sequences is rebuilt as [real prompt][the model's own stream sampled after it][the real
sequence again from the prompt's end], cut to the stage length, and scored on the real frames only: the
model learns to go on with real speech while its attention window and memory hold its own samples.

The user's streams stay the data's: during the own frames the model hears (and the training sequence
holds) the real user frames that followed the prompt, and the real continuation keeps its own user frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from moshi.models.lm import LMModel
from torch import Tensor

from ttt_speech.errors import UsageError
from ttt_speech.moshi.generate import generate_frames
from ttt_speech.train.config import OwnPrefixConfig

OWN_TAG = 0x6f776e70  # "ownp": seeds the draws apart from the data's shuffle and copied spans


def splice(codes: Tensor, own: Tensor, prompt: int) -> Tensor:
    """[real prompt][own frames][real codes from frame `prompt`], cut to the length of codes [B, K, T]; own
    [B, rows, F] replaces the model's rows (text + its audio), the user's rows of the own frames stay real."""
    rows, frames = own.shape[1], own.shape[-1]
    middle = torch.cat([own.to(codes), codes[:, rows:, prompt:prompt + frames]], dim=1)
    return torch.cat([codes[..., :prompt], middle, codes[..., prompt:]], dim=-1)[..., :codes.shape[-1]]


def scored_frames(chosen: Tensor, length: int, prompt: int, frames: int) -> Tensor:
    """[B, length] bool: every frame but the own frames prompt .. prompt + frames - 1 of the chosen sequences."""
    t = torch.arange(length, device=chosen.device)
    own = (t >= prompt) & (t < prompt + frames)
    return ~(chosen[:, None] & own)


@dataclass
class OwnPrefix:
    """Builds the own-prefix sequences of a batch with `lm`, the very module the trainer trains."""

    cfg: OwnPrefixConfig
    lm: LMModel
    seed: int
    bf16: bool  # generate under the training forward's autocast

    @property
    def max_delay(self) -> int:
        return max(self.lm.delays)

    def check_length(self, length: int, where: str) -> None:
        """Sampling `frames` frames whole takes max(delays) more user frames, and some real frame must follow."""
        need = self.cfg.prompt + self.cfg.frames + self.max_delay
        if length <= need:
            raise UsageError(f"{where}: seq_len {length} leaves no real frame after train.own_prefix's prompt + "
                             f"frames + the model's acoustic delay ({need}): lower own_prefix.frames or lengthen "
                             f"the stage")

    def draws(self, stage: int, first: int, size: int) -> tuple[Tensor, int]:
        """Which of samples first .. first + size - 1 of a stage get an own prefix (each from its own seeded
        generator, so any process can recompute it, like the data's order), and the seed of their sampling."""
        rngs = [np.random.default_rng([self.seed, stage, first + j, OWN_TAG]) for j in range(size)]
        chosen = torch.tensor([bool(rng.random() < self.cfg.prob) for rng in rngs], device=self.lm.device)
        return chosen, int(rngs[0].integers(2**62))

    def sample(self, codes: Tensor, seed: int) -> Tensor:
        """The model's own stream [n, 1 + dep_q, frames] after the first `prompt` frames of codes [n, K, T]."""
        lm, P, F = self.lm, self.cfg.prompt, self.cfg.frames
        rows = 1 + lm.dep_q
        training = lm.training
        cuda = [lm.device.index or 0] if lm.device.type == "cuda" else []
        lm.eval()  # LMGen refuses a model in training mode
        try:
            with torch.random.fork_rng(devices=cuda), torch.autocast(lm.device.type, torch.bfloat16,
                                                                      enabled=self.bf16, cache_enabled=False):
                torch.manual_seed(seed)
                own = generate_frames(lm, codes[:, rows:, :P + F + self.max_delay], P + F, prompt=codes[:, :rows, :P],
                                      temp=self.cfg.temp, temp_text=self.cfg.temp_text)
        finally:
            lm.train(training)
        return own[..., P:]

    def __call__(self, codes: Tensor, stage: int, first: int, step: int) -> tuple[Tensor, Tensor]:
        """codes [B, K, T] (samples first .. of `stage`, optimizer step `step`) with own prefixes in the chosen
        sequences, and the frames that are targets [B, T] (`SegmentLM.prepare`'s `scored`)."""
        chosen, seed = self.draws(stage, first, codes.shape[0])
        chosen &= step % self.cfg.every == 0
        P, F = self.cfg.prompt, self.cfg.frames
        if chosen.any():
            codes = codes.clone()
            codes[chosen] = splice(codes[chosen], self.sample(codes[chosen], seed), P)
        return codes, scored_frames(chosen, codes.shape[-1], P, F)
