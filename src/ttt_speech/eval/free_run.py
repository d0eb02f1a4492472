"""Free-running generation for minutes, scored per minute (text statistics, gibberish, ASR WER, voice).

Moshi runs through moshi's own `LMGen`, one frame per step as it serves. The user's stream is
silence (Mimi's silence codes, or Moshi's "no input" token without a Mimi) or, for a long
conversation, a held-out dialogue's user codebooks. An optional prompt (the first frames of a
held-out sequence) is forced into the model's own stream: its audio through LMGen's
`depformer_replace_tokens`, its text by overwriting the text token LMGen just wrote into its
token cache (LMGen has no text-forcing argument). Per frame the model's log-probability of its
own text token (raw logits, temperature 1) is kept for `own_ppl`. The run keeps the tokens it generated
(`FreeRunResult.tokens`, undelayed, a few bytes a frame); with a Mimi they are scored after the run by
`score_saved_run`, which decodes them frame by frame and keeps one minute of audio at a time (ASR and
speaker embedding), so memory stays flat. The same function scores saved tokens later, on a machine
that has the ASR and codec files the generating one lacks (`ttt-speech score-free-run`).

An HF model samples token by token with its cache from the first tokens of a held-out sequence;
its "minutes" are blocks of 750 tokens, with no pad ids and no audio.
"""

from __future__ import annotations

import typing as tp
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from ttt_speech.audio import SAMPLE_RATE
from ttt_speech.errors import UsageError
from ttt_speech.eval.asr import Recognizer, word_error_rate
from ttt_speech.eval.gibberish import (
    FRAMES_PER_MINUTE,
    GibberishThresholds,
    MinuteStats,
    degraded_minute,
    minute_stats,
)
from ttt_speech.eval.speaker import SpeakerEmbedder, cosine



@dataclass
class MinuteAudio:
    """What the audio of one minute said and sounded like."""

    minute: int
    asr: str | None = None
    model_text: str | None = None
    wer: float | None = None
    speaker_similarity: float | None = None  # cosine to the first minute's embedding


@dataclass
class FreeRunResult:
    """Per-minute record of one generated run."""

    name: str
    frames: int
    prompt_frames: int
    minutes: list[MinuteStats]
    audio: list[MinuteAudio]
    degraded_minute: int | None
    speaker_method: str | None
    notes: list[str] = field(default_factory=list)
    text: np.ndarray | None = None  # generated text tokens [frames] (not serialised)
    # Moshi: [1 + dep_q, frames] int16 (int32 past 2**15 ids); column j = the text token and audio codebooks
    # of generated frame j as LMGen returns them (undelayed). LMGen returns the last max(delays) frames only
    # after further steps: their columns hold the text token and audio codes 0 (decoded as such). Not serialised.
    tokens: np.ndarray | None = None

    def to_dict(self) -> dict[str, tp.Any]:
        d = asdict(self)
        d.pop("text")
        d.pop("tokens")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, tp.Any]) -> FreeRunResult:
        """A run as `to_dict` wrote it (a report's results.json), without its tokens: runs from several reports
        can then be drawn on the same axes by `plots.free_runs`."""
        return cls(**{**d, "minutes": [MinuteStats(**m) for m in d["minutes"]],
                      "audio": [MinuteAudio(**a) for a in d["audio"]]})


@dataclass
class AudioScoring:
    """Optional audio tools of a run: each None when unavailable (the report says why)."""

    mimi: tp.Any = None
    tokenizer: tp.Any = None  # sentencepiece processor: decodes the model's text for WER
    recognizer: Recognizer | None = None
    embedder: SpeakerEmbedder | None = None


class MinuteAudioScorer:
    """Collects decoded audio and text of the current minute; scores each minute as it completes."""

    def __init__(self, scoring: AudioScoring, pad_ids: tuple[int, ...]) -> None:
        self.scoring, self.pad_ids = scoring, pad_ids
        self.chunks: list[np.ndarray] = []
        self.reference: np.ndarray | None = None
        self.results: list[MinuteAudio] = []

    def add(self, pcm: np.ndarray) -> None:
        self.chunks.append(pcm)

    def finish_minute(self, text: np.ndarray) -> None:
        s, audio = self.scoring, np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.float32)
        self.chunks = []
        res = MinuteAudio(len(self.results))
        if s.tokenizer is not None:
            res.model_text = decode_text(s.tokenizer, text, self.pad_ids)
        if s.recognizer is not None and len(audio):
            res.asr = s.recognizer.transcribe(audio, SAMPLE_RATE)
            if res.model_text is not None:
                res.wer = word_error_rate(res.model_text, res.asr)
        if s.embedder is not None and len(audio):
            emb = s.embedder.embed(audio, SAMPLE_RATE)
            if self.reference is None:
                self.reference = emb
            res.speaker_similarity = cosine(self.reference, emb)
        self.results.append(res)


def decode_text(tokenizer: tp.Any, text: np.ndarray, pad_ids: tuple[int, ...]) -> str:
    """The words of text tokens, pads dropped."""
    ids = [int(t) for t in text if int(t) not in pad_ids]
    return tokenizer.decode(ids) if ids else ""


@torch.no_grad()
def score_saved_run(tokens: np.ndarray, scoring: AudioScoring, pad_ids: tuple[int, ...],
                    frames_per_minute: int = FRAMES_PER_MINUTE, wav: Path | None = None) -> list[MinuteAudio]:
    """ASR / voice scores per minute of a run's tokens [1 + dep_q, frames] (`FreeRunResult.tokens`): the
    audio codebooks decoded frame by frame in one Mimi stream, as a live decoder would, each minute
    scored with its text. Optionally the audio goes to `wav` too (24 kHz mono 16-bit, streamed)."""
    mimi = scoring.mimi
    if mimi is None:
        raise ValueError("scoring a run's audio needs a Mimi")
    codes = torch.from_numpy(tokens[1:].astype(np.int64))[None].to(next(mimi.parameters()).device)
    frames = tokens.shape[1]
    minute_audio = MinuteAudioScorer(scoring, pad_ids)
    with ExitStack() as stack:
        stack.enter_context(mimi.streaming(1))
        sink = None
        if wav is not None:
            from ttt_speech.moshi.generate import WavSink

            sink = WavSink([wav], SAMPLE_RATE)
            stack.callback(sink.close)
        for j in range(frames):
            pcm = mimi.decode(codes[:, :, j:j + 1])[0, 0].float().cpu().numpy()
            minute_audio.add(pcm)
            if sink is not None:
                sink(pcm[None])
            if (j + 1) % frames_per_minute == 0 or j + 1 == frames:
                minute_audio.finish_minute(tokens[0, j - j % frames_per_minute:j + 1])
    return minute_audio.results


def _silence(lm: tp.Any, mimi: tp.Any) -> Tensor:
    n_user = lm.n_q - lm.dep_q
    if mimi is None:
        return torch.full((n_user,), lm.zero_token_id, dtype=torch.long)
    from ttt_speech.moshi.generate import silence_codes

    return silence_codes(mimi, n_user).cpu()


@torch.no_grad()
def free_run_moshi(lm: tp.Any, name: str, frames: int, *, prompt: Tensor | None = None, user: Tensor | None = None,
                   scoring: AudioScoring | None = None, thresholds: GibberishThresholds | None = None,
                   temp: float = 0.8, temp_text: float = 0.7, seed: int = 0, progress: bool = True,
                   frames_per_minute: int = FRAMES_PER_MINUTE, writes_after_prompt: float | None = None,
                   listening: Tensor | None = None) -> FreeRunResult:
    """Generate `frames` frames after an optional `prompt` [1 + n_q (+ user rows), P] forced into the model's
    stream; `user` [n_user, >= P + frames] is the user's stream (default: the prompt's user rows, then silence).

    writes_after_prompt: the in-place memory writes this times its values from the first generated frame on
    (0.0: it keeps what the prompt wrote and never writes the model's own samples), to tell a drift that the
    memory's writes of its own samples cause from one its content causes (docs/results.md section 18).
    listening [>= P + frames] bool: after the prompt, the steps where the user speaks are still written in full,
    the others at `writes_after_prompt` (the write gate `serve --listen-db` applies to live audio; the caller
    decides from the user's tokens). Both need an in-place memory; set in the streaming state (`mute_writes_`),
    so moshi's CUDA graphs see them."""
    from ttt_speech.layers.inplace import InPlaceLayer
    from ttt_speech.moshi.generate import generate_frames
    from ttt_speech.moshi.layer import mute_writes_

    torch.manual_seed(seed)
    scoring = scoring or AudioScoring()
    mimi = scoring.mimi
    pad_ids = (lm.text_padding_token_id, lm.end_of_text_padding_id)
    P = 0 if prompt is None else prompt.shape[-1]
    if mimi is not None:
        mimi.set_num_codebooks(max(lm.dep_q, lm.n_q - lm.dep_q))
    if user is None:
        user = _silence(lm, mimi)[:, None].repeat(1, P + frames)
        if prompt is not None and prompt.shape[0] >= 1 + lm.n_q:
            user[:, :P] = prompt[1 + lm.dep_q:1 + lm.n_q]
    if writes_after_prompt is not None and not any(isinstance(m, InPlaceLayer) for m in lm.modules()):
        raise UsageError(f"{name}: writes after the prompt need an in-place memory, and this model has none: "
                         "drop the writes scale (--free-run-writes)")
    if listening is not None and writes_after_prompt is None:
        raise ValueError("a listening free run writes in full while the user speaks and at writes_after_prompt "
                         "otherwise: give writes_after_prompt")
    mutes = torch.full((P + frames + 1,), 1.0 - (writes_after_prompt or 0.0))  # of each step (step i reads user frame i)
    if listening is not None:
        mutes[:P + frames][listening[:P + frames].cpu()] = 0.0
    logprobs = np.zeros(frames, dtype=np.float64)
    bar = tqdm(total=P + frames, unit="frame", disable=not progress, dynamic_ncols=True, desc=f"{name} free run")

    def on_frame(i: int, logits: Tensor, token: Tensor) -> None:
        if i >= P:  # the model's log-probability of its own text token (raw logits, temperature 1)
            logprobs[i - P] = float(logits.float().log_softmax(-1)[0, token[0]])
        # step i reads frame i - 1: step P wrote the prompt's last frame, the steps after it read generated ones
        if i >= P and writes_after_prompt is not None and (i == P or mutes[i + 1] != mutes[i]):
            mute_writes_(lm, float(mutes[i + 1]))
        bar.update(1)

    forced = None if prompt is None else prompt[None, :1 + lm.dep_q]
    codes = generate_frames(lm, user[None], P + frames, prompt=forced, temp=temp, temp_text=temp_text, flush=False,
                            on_frame=on_frame)[0, :, P:].cpu().numpy()
    bar.close()
    text = codes[0].copy()
    tokens = codes.astype(np.int16 if max(lm.text_card, lm.card) <= 2**15 else np.int32)
    stats = minute_stats(text, lm.text_card, pad_ids, logprobs, frames_per_minute, thresholds)
    audio = [] if mimi is None else score_saved_run(tokens, scoring, pad_ids, frames_per_minute)
    return FreeRunResult(name, frames, P, stats, audio, degraded_minute(stats),
                         scoring.embedder.method if scoring.embedder else None, audio_notes(scoring), text, tokens)


@torch.no_grad()
def free_run_hf(model: tp.Any, name: str, tokens: int, *, prompt: Tensor, cache: tp.Any,
                thresholds: GibberishThresholds | None = None, temp: float = 0.8, seed: int = 0,
                progress: bool = True, frames_per_minute: int = FRAMES_PER_MINUTE) -> FreeRunResult:
    """Sample `tokens` tokens after `prompt` [P] with the model's cache; blocks of 750 tokens as minutes."""
    from ttt_speech.hf.compat import cache_kwargs

    g = torch.Generator(device="cpu").manual_seed(seed)
    device = next(model.parameters()).device
    carry = cache_kwargs(cache)
    logits = model(prompt[None].to(device), use_cache=True, **carry).logits[:, -1]
    text = np.zeros(tokens, dtype=np.int64)
    logprobs = np.zeros(tokens, dtype=np.float64)
    for j in tqdm(range(tokens), unit="tok", disable=not progress, dynamic_ncols=True, desc=f"{name} free run"):
        logp = logits.float().log_softmax(-1)[0].cpu()
        token = int(torch.multinomial((logp / temp).softmax(-1), 1, generator=g))
        text[j], logprobs[j] = token, float(logp[token])
        logits = model(torch.tensor([[token]], device=device), use_cache=True, **carry).logits[:, -1]
    stats = minute_stats(text, model.config.vocab_size, (), logprobs, frames_per_minute, thresholds)
    return FreeRunResult(name, tokens, len(prompt), stats, [], degraded_minute(stats), None,
                         [f"HF model: a 'minute' is a block of {frames_per_minute} tokens; no pad ids, no audio"], text)


def audio_notes(scoring: AudioScoring) -> list[str]:
    notes = []
    if scoring.mimi is None:
        notes.append("no Mimi checkpoint: audio not decoded (no WER, no voice consistency)")
    elif scoring.recognizer is None:
        notes.append("no ASR: WER not measured")
    elif scoring.tokenizer is None:
        notes.append("no text tokenizer: ASR transcripts kept, WER against the model's text not measured")
    return notes
