"""Free-running generation: the prompt really is forced, per-minute numbers come from what was generated,
a model that forgets its prompt is caught at the minute it forgets, and HF models run through their cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("moshi")
pytest.importorskip("transformers", minversion="5.23")  # pyproject's hf extra

from helpers.moshi import random_codes
from helpers.recall import ANSWER_SHIFT, GUESSES, recall_model
from helpers.hf import tiny_model, ttt_config

from ttt_speech.eval.free_run import AudioScoring, free_run_hf, free_run_moshi
from ttt_speech.eval.gibberish import GibberishThresholds
from ttt_speech.eval.models import HFScorer
from ttt_speech.eval.speaker import SpeakerEmbedder
from ttt_speech.hf import convert
from ttt_speech.moshi.tiny import build_tiny_hybrid, build_tiny_mimi, tiny_mimi_config

# the recall model's own output is one token repeated: a loop by design, so the loop rule is off here
pytestmark = pytest.mark.usefixtures("one_thread")
NO_LOOP_RULE = GibberishThresholds(max_repetition=1.01)


def key_prompt(lm, key: int = 5) -> torch.Tensor:
    prompt = random_codes(lm, 1, 1, seed=4)[0]
    prompt[0, 0] = key
    return prompt


@pytest.mark.parametrize("window,degraded", [(8, 1), (64, None)])
def test_a_model_that_forgets_its_prompt_is_flagged_at_that_minute(window, degraded):
    """The prompt's key (one forced frame) is recalled while it is in the attention window: 8 frames, a
    "minute" here. Then the model only sees its own answers and guesses uniformly (own ppl 1 -> 12)."""
    lm = recall_model(window)
    run = free_run_moshi(lm, "recall", 32, prompt=key_prompt(lm), thresholds=NO_LOOP_RULE, progress=False,
                         frames_per_minute=8)
    assert run.prompt_frames == 1 and len(run.minutes) == 4
    assert (run.text[:window] == 5 + ANSWER_SHIFT).all()  # the forced key, recalled
    assert run.minutes[0].own_ppl < 1.001
    assert run.degraded_minute == degraded
    if degraded is not None:
        assert run.minutes[1].flags == ["unsure"]
        assert run.minutes[2].own_ppl == pytest.approx(GUESSES, rel=1e-3)  # uniform over the non-keys
        assert (run.text[window:] != 5 + ANSWER_SHIFT).mean() > 0.6
    else:
        assert max(m.own_ppl for m in run.minutes) < 1.001


def test_without_the_prompt_the_key_is_unknown():
    lm = recall_model(64)
    run = free_run_moshi(lm, "recall", 16, thresholds=NO_LOOP_RULE, progress=False, frames_per_minute=8)
    assert run.minutes[0].own_ppl == pytest.approx(GUESSES, rel=1e-3)  # nothing to recall: uniform


def test_minute_stats_match_the_generated_tokens_and_audio_is_scored_per_minute():
    lm = build_tiny_hybrid(0)
    mimi = build_tiny_mimi(0, tiny_mimi_config(2, lm.card), num_codebooks=2)
    run = free_run_moshi(lm, "tiny", 50, prompt=random_codes(lm, 1, 6, seed=5)[0], progress=False,
                         scoring=AudioScoring(mimi=mimi, embedder=SpeakerEmbedder(prefer_resemblyzer=False)),
                         frames_per_minute=20)
    assert [m.positions for m in run.minutes] == [20, 20, 10] and len(run.audio) == 3
    pads = np.isin(run.text, [lm.text_padding_token_id, lm.end_of_text_padding_id])
    assert sum(m.text_tokens for m in run.minutes) == int((~pads).sum())
    assert run.audio[0].speaker_similarity == pytest.approx(1.0)  # the first minute is the reference
    assert all(-1.0 <= a.speaker_similarity <= 1.0 for a in run.audio)
    assert run.speaker_method == "mfcc-stats" and any("no ASR" in n for n in run.notes)
    # reproducible with a seed, different with another (the user is Mimi's silence in all three runs)
    again = free_run_moshi(lm, "tiny", 50, prompt=random_codes(lm, 1, 6, seed=5)[0], progress=False,
                           scoring=AudioScoring(mimi=mimi), frames_per_minute=20)
    other = free_run_moshi(lm, "tiny", 50, prompt=random_codes(lm, 1, 6, seed=5)[0], progress=False,
                           scoring=AudioScoring(mimi=mimi), frames_per_minute=20, seed=1)
    assert np.array_equal(again.text, run.text) and not np.array_equal(other.text, run.text)


def test_hf_free_run_own_perplexity_is_the_models():
    """The recorded own log-probabilities equal a fresh teacher-forced pass over prompt + generated tokens."""
    model = convert(tiny_model("llama"), layers=(1, 2), mode="hybrid", ttt=ttt_config(0.5), attention_window=8)
    scorer = HFScorer(model, "hf", chunk=5)
    prompt = torch.randint(3, 97, (6,), generator=torch.Generator().manual_seed(0))
    run = free_run_hf(model, "hf", 40, prompt=prompt, cache=scorer.new_cache(), progress=False, frames_per_minute=20)
    tokens = torch.cat([prompt, torch.from_numpy(run.text)])[None, None]
    out = torch.full((1, 1, tokens.shape[-1]), torch.nan)
    scorer.score(tokens, out, lambda step: None)
    for m, lo in zip(run.minutes, (6, 26)):
        assert m.own_ppl == pytest.approx(math.exp(float(out[0, 0, lo:lo + 20].mean())), rel=1e-4)


def test_writes_after_the_prompt_scale_only_the_generated_frames():
    """`writes_after_prompt=0`: the in-place memory writes while the prompt is read and never after (its values
    are exactly 0 from step P + 1 on), and the model writes as trained again in the next run (the mute was the
    run's streaming state); a model without in-place memory is refused in one line."""
    from ttt_speech.errors import UsageError
    from ttt_speech.layers.inplace import InPlaceLayer
    from ttt_speech.moshi import convert, default_inplace_config
    from ttt_speech.moshi.tiny import build_tiny_lm

    base = build_tiny_lm(0)
    lm = convert(base, layers="all", ttt=default_inplace_config(base, chunk=4))
    layers = [m for m in lm.modules() if isinstance(m, InPlaceLayer)]
    with torch.no_grad():
        for m in layers:
            m.target_proj.weight.normal_(std=1.0)  # the tiny model's zero projections would write nothing anyway
    written: list[float] = []
    layers[0].register_inner_hook(lambda layer, q, k, v: written.append(float(v.abs().max())))
    P = 6
    free_run_moshi(lm, "tiny", 10, prompt=random_codes(lm, 1, P, seed=5)[0], progress=False, frames_per_minute=5,
                   writes_after_prompt=0.0)
    assert len(written) == P + 10 and min(written[:P + 1]) > 0 and max(written[P + 1:]) == 0
    written.clear()
    free_run_moshi(lm, "tiny", 10, prompt=random_codes(lm, 1, P, seed=5)[0], progress=False, frames_per_minute=5)
    assert len(written) == P + 10 and min(written) > 0
    written.clear()  # listening: after the prompt only the steps where the user speaks write
    listening = torch.zeros(P + 10, dtype=torch.bool)
    listening[[2, P + 3, P + 4, P + 8]] = True
    free_run_moshi(lm, "tiny", 10, prompt=random_codes(lm, 1, P, seed=5)[0], progress=False, frames_per_minute=5,
                   writes_after_prompt=0.0, listening=listening)
    assert [t for t in range(P + 1, P + 10) if written[t] > 0] == [P + 3, P + 4, P + 8] and min(written[:P + 1]) > 0
    with pytest.raises(UsageError, match="writes after the prompt need an in-place memory"):
        free_run_moshi(build_tiny_hybrid(0), "ttt", 4, prompt=random_codes(lm, 1, P, seed=5)[0], progress=False,
                       frames_per_minute=2, writes_after_prompt=0.0)  # refused before it generates
