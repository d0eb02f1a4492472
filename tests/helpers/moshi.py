"""Tiny Moshi models driven the ways inference drives them: teacher-forced streaming, LMGen sessions."""

from __future__ import annotations

import argparse
import typing as tp
from pathlib import Path

import pytest
import torch

pytest.importorskip("moshi")

from moshi.models.lm import LMGen, LMModel  # noqa: E402
from moshi.models.lm_utils import _delay_sequence, _undelay_sequence  # noqa: E402

from ttt_speech import TTTConfig  # noqa: E402
from ttt_speech.moshi import HybridLayerState, HybridLMModel, convert  # noqa: E402
from ttt_speech.moshi.commands import add_convert_arguments, run_convert  # noqa: E402
from ttt_speech.moshi.tiny import TinyCheckpoint  # noqa: E402


def convert_moshi(*argv: str) -> Path:
    """`ttt-speech convert-moshi ARGV` in process: the converted directory."""
    parser = argparse.ArgumentParser()
    add_convert_arguments(parser)
    return run_convert(parser.parse_args(list(argv)))


def random_codes(lm: LMModel, B: int, T: int, seed: int = 0) -> torch.Tensor:
    """Teacher-forcing codes [B, 1 + n_q, T]: text tokens in row 0, audio tokens below."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, lm.card, (B, lm.num_codebooks, T), generator=g)
    codes[:, 0] = torch.randint(0, lm.text_card, (B, T), generator=g)
    return codes


def open_gates(model: LMModel, value: float = 0.7) -> None:
    with torch.no_grad():
        for layer in model.memory_layers():
            layer.memory.gate_alpha.fill_(value)


@torch.no_grad()
def streamed_logits(lm: LMModel, codes: torch.Tensor,
                    before_frame: tp.Callable[[int], object] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced logits computed as inference does: the temporal transformer one frame per call
    (ring KV cache, TTT step), the depformer one codebook per call; re-aligned as LMModel.forward.
    `before_frame(t)` runs inside the streaming context before frame t (to change the state mid-stream)."""
    B, K, T = codes.shape
    initial = lm._get_initial_token().expand(B, -1, -1)
    delayed = torch.cat([initial, _delay_sequence(lm.delays, codes, initial)], dim=2)
    text, audio = [], []
    with lm.streaming(B):
        for t in range(T):
            if before_frame is not None:
                before_frame(t)
            out, text_logits = lm.forward_text(delayed[:, :, t:t + 1])
            text.append(text_logits)
            with lm.depformer.streaming(B):
                audio.append(torch.cat([lm.forward_depformer(cb, delayed[:, cb:cb + 1, t + 1:t + 2], out)
                                        for cb in range(lm.dep_q)], dim=1))
    logits, _ = _undelay_sequence(lm.delays[1:1 + lm.dep_q], torch.cat(audio, dim=2))
    text_logits, _ = _undelay_sequence(lm.delays[:1], torch.cat(text, dim=2))
    return logits, text_logits


@torch.no_grad()
def greedy_generate(lm: LMModel, steps: int, B: int = 1, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy LMGen tokens and every step's text logits, with a random user stream."""
    g = torch.Generator().manual_seed(seed)
    user = torch.randint(0, lm.card, (B, lm.n_q - lm.dep_q, steps), generator=g)
    logits: list[torch.Tensor] = []
    gen = LMGen(lm, use_sampling=False, on_text_logits_hook=lambda x: logits.append(x.clone()))
    outs = []
    with gen.streaming(B):
        for t in range(steps):
            out = gen.step(user[:, :, t:t + 1])
            if out is not None:
                outs.append(out)
    return torch.cat(outs, dim=-1), torch.cat(logits, dim=2)


def assert_same_model(ref: LMModel, model: LMModel, T: int) -> torch.Tensor:
    """`model` gives `ref`'s logits bit for bit over T frames, teacher-forced and in greedy LMGen
    streaming (tokens too); returns ref's greedy text logits, to show a later change."""
    codes = random_codes(ref, 2, T)
    with torch.no_grad():
        a, b = ref(codes), model(codes)
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(b.text_logits, a.text_logits, rtol=0, atol=0, equal_nan=True)
    tokens_ref, logits_ref = greedy_generate(ref, T)
    tokens, logits = greedy_generate(model, T)
    assert tokens.shape == (1, 1 + ref.dep_q, T - max(ref.delays))
    assert torch.equal(tokens, tokens_ref)
    torch.testing.assert_close(logits, logits_ref, rtol=0, atol=0)
    return logits_ref


@torch.no_grad()
def sample(lm: LMModel, steps: int = 30, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled LMGen tokens and text logits with a fixed seed and user stream."""
    logits: list[torch.Tensor] = []
    gen = LMGen(lm, use_sampling=True, on_text_logits_hook=lambda x: logits.append(x.clone()))
    user = torch.randint(0, lm.card, (1, lm.n_q - lm.dep_q, steps), generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    outs = []
    with gen.streaming(1):
        for t in range(steps):
            out = gen.step(user[:, :, t:t + 1])
            if out is not None:
                outs.append(out)
    return torch.cat(outs, -1), torch.cat(logits, 2)


def hybrid_from(ckpt: TinyCheckpoint, shared_qkv: bool = False) -> HybridLMModel:
    info = ckpt.checkpoint_info()
    lm = info.get_moshi(dtype=torch.float32)
    model = convert(lm, layers="all", ttt=TTTConfig(dim=32, num_heads=4, mini_batch=4, gate_init=0.5,
                                                    shared_qkv=shared_qkv),
                    moshi_config=info.raw_config)
    with torch.no_grad():  # make every TTT tensor distinct from a fresh init, so a lost tensor shows
        for _, p in model.named_parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def user_stream(lm: LMModel, B: int, T: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, lm.card, (B, lm.n_q - lm.dep_q, T), generator=torch.Generator().manual_seed(seed))


def ttt_states(lm: HybridLMModel) -> list[dict[str, torch.Tensor]]:
    out = []
    for layer in lm.memory_layers():
        state = layer._streaming_state
        assert isinstance(state, HybridLayerState) and state.memory is not None
        out.append(state.memory.tensors)
    return out


class Session:
    """A greedy LMGen session recording each step's text logits."""

    def __init__(self, lm: LMModel, B: int) -> None:
        self.logits: list[torch.Tensor] = []
        self.gen = LMGen(lm, use_sampling=False, on_text_logits_hook=lambda x: self.logits.append(x[:, 0, 0].clone()))
        self.ctx = self.gen.streaming(B)

    def __enter__(self) -> "Session":
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.ctx.__exit__(*exc)

    def run(self, user: torch.Tensor) -> torch.Tensor:
        """Steps over user [B, K, T]; returns the text logits of these steps, [B, T, card]."""
        n = len(self.logits)
        for t in range(user.shape[-1]):
            self.gen.step(user[:, :, t:t + 1])
        return torch.stack(self.logits[n:], dim=1)
