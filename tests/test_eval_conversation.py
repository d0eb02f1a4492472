"""Long conversations: the user is put in the model's seat correctly and scored per minute; voice per minute."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("moshi")

from helpers.moshi import random_codes

from ttt_speech.eval.conversation import score_conversation, user_seat
from ttt_speech.eval.data import Sequence
from ttt_speech.eval.free_run import AudioScoring
from ttt_speech.eval.models import MoshiScorer
from ttt_speech.eval.speaker import SpeakerEmbedder
from ttt_speech.moshi.tiny import build_tiny_hybrid, build_tiny_mimi, tiny_mimi_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_user_seat_swaps_the_speakers_and_takes_the_user_text():
    lm = build_tiny_hybrid(0)  # n_q 4, dep_q 2: rows text, model a0 a1, user u0 u1
    rows = torch.arange(6)[:, None].expand(6, 5)  # row i holds the value i; row 5 = the user's text
    seat, streams, mode = user_seat(rows, lm)
    assert seat[:, 0].tolist() == [5, 3, 4, 1, 2] and streams == [1, 2] and mode == "swapped (user text)"
    seat, _, mode = user_seat(rows[:5], lm)
    assert seat[0, 0] == lm.text_padding_token_id and mode == "swapped (padded text)"


def test_user_loss_per_minute_and_voice_consistency():
    lm = build_tiny_hybrid(0)
    dialogue = Sequence("d0", random_codes(lm, 1, 50, seed=6)[0])
    mimi = build_tiny_mimi(0, tiny_mimi_config(2, lm.card), num_codebooks=2)
    scorer = MoshiScorer(lm, "tiny")
    res = score_conversation(scorer, dialogue, scoring=AudioScoring(mimi=mimi, embedder=SpeakerEmbedder(False)),
                             progress=False, frames_per_minute=20)
    # the same numbers by hand: user codebooks in the model's seat, text padded, audio losses averaged
    swapped = dialogue.tokens.clone()
    swapped[1:3], swapped[3:5], swapped[0] = dialogue.tokens[3:5], dialogue.tokens[1:3], lm.text_padding_token_id
    out = torch.full((1, 3, 50), torch.nan)
    scorer.score(swapped[None], out, lambda step: None)
    want = [torch.nanmean(out[0, 1:, lo:lo + 20]).item() for lo in (0, 20, 40)]
    assert res.user_loss == pytest.approx(want, rel=1e-6)
    assert 2.0 < min(want) and max(want) < 5.0  # about log(32) = 3.47 for a random model
    assert res.mode == "swapped (padded text)" and res.speaker_method == "mfcc-stats"
    assert len(res.speaker_similarity) == 3 and res.speaker_similarity[0] == pytest.approx(1.0)
    bare = score_conversation(scorer, dialogue, progress=False, frames_per_minute=20)
    assert bare.user_loss == res.user_loss and bare.speaker_similarity == [] and "no Mimi" in bare.notes[0]
