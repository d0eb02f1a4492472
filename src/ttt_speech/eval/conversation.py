"""Long conversations: per minute, how well the model predicts the user, and whether its voice holds.

A held-out dialogue is a shard in Moshi's two-stream layout: text, the model-side speaker's
codebooks, the user's codebooks (n_q / 2 each), and optionally one more row with the user's text.

- User-stream loss (teacher-forced, streamed as in production, see `models.py`): the model's loss
  on the user's audio codebooks, per minute. A Moshi whose depformer predicts every codebook
  (dep_q == n_q, Moshi's training setup) is scored on the user's rows directly. The released
  inference models predict only their own side (dep_q = n_q / 2), so the two sides are swapped: the
  user sits in the model's seat and the model's loss on its "own" audio is its loss on the user's
  speech. The text row is then the user's text row when the shard has one, else padding (the
  report says which: padding is a weaker condition than the transcript the model was trained with).
- Voice consistency (free-running): the model speaks for itself while the dialogue's user stream
  plays, its audio is decoded with Mimi and each minute's speaker embedding is compared with the
  first minute's (`speaker.py`: Resemblyzer if installed, else MFCC statistics, and why).
"""

from __future__ import annotations

import typing as tp
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from ttt_speech.eval.data import Sequence
from ttt_speech.eval.free_run import AudioScoring, free_run_moshi
from ttt_speech.eval.gibberish import FRAMES_PER_MINUTE
from ttt_speech.eval.models import MoshiScorer


@dataclass
class ConversationResult:
    """Per-minute user-stream loss and voice consistency of one model on one dialogue."""

    name: str
    dialogue: str
    mode: str  # "direct", "swapped (user text)" or "swapped (padded text)"
    user_loss: list[float | None]  # mean loss (nats) over the user's codebooks, per minute
    speaker_similarity: list[float | None] = field(default_factory=list)
    speaker_method: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, tp.Any]:
        return asdict(self)


def user_seat(tokens: Tensor, lm: tp.Any) -> tuple[Tensor, list[int], str]:
    """Tokens arranged so the model predicts the user, the scored stream indices, and how."""
    half = lm.n_q // 2
    if lm.dep_q == lm.n_q:  # the depformer predicts both sides: the user's are audio streams half..n_q-1
        return tokens[:1 + lm.n_q], [1 + half + k for k in range(half)], "direct"
    if lm.dep_q != half or lm.n_q != 2 * half:
        raise ValueError(f"a two-speaker dialogue needs dep_q == n_q / 2 or dep_q == n_q, got dep_q={lm.dep_q}, "
                         f"n_q={lm.n_q}")
    out = torch.empty_like(tokens[:1 + lm.n_q])
    out[1:1 + half] = tokens[1 + half:1 + 2 * half]
    out[1 + half:] = tokens[1:1 + half]
    if tokens.shape[0] > 1 + lm.n_q:
        out[0], mode = tokens[1 + lm.n_q], "swapped (user text)"
    else:
        out[0], mode = lm.text_padding_token_id, "swapped (padded text)"
    return out, list(range(1, 1 + half)), mode


def per_minute(losses: Tensor, frames_per_minute: int) -> list[float | None]:
    """Mean of the non-NaN entries of losses [S, T] in each minute."""
    out = []
    for lo in range(0, losses.shape[-1], frames_per_minute):
        seg = losses[:, lo:lo + frames_per_minute]
        ok = ~torch.isnan(seg)
        out.append(float(seg[ok].mean()) if ok.any() else None)
    return out


def score_conversation(scorer: MoshiScorer, dialogue: Sequence, *, minutes: float | None = None,
                       scoring: AudioScoring | None = None, seed: int = 0, progress: bool = True,
                       frames_per_minute: int = FRAMES_PER_MINUTE) -> ConversationResult:
    """User-stream loss per minute (teacher-forced) and, with a Mimi, voice consistency (free-running)."""
    lm = scorer.model
    T = dialogue.length if minutes is None else min(dialogue.length, int(minutes * frames_per_minute))
    tokens, streams, mode = user_seat(dialogue.tokens[:, :T], lm)
    out = torch.full((1, len(scorer.streams), T), torch.nan)
    scorer.score(tokens[None], out, lambda step: None)
    result = ConversationResult(scorer.name, dialogue.name, mode, per_minute(out[0, streams], frames_per_minute))
    if scoring is not None and scoring.mimi is not None:
        run = free_run_moshi(lm, scorer.name, T, user=dialogue.tokens[1 + lm.dep_q:1 + lm.n_q, :T],
                             scoring=scoring, seed=seed, progress=progress, frames_per_minute=frames_per_minute)
        result.speaker_similarity = [m.speaker_similarity for m in run.audio]
        result.speaker_method = run.speaker_method
    else:
        result.notes.append("no Mimi checkpoint: voice consistency not measured")
    return result
