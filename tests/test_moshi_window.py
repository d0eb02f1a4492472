"""A hybrid converted with a shorter attention window allocates only that window's KV per session, attends
over exactly that window, and keeps it through save/load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("moshi")

from helpers.moshi import random_codes, streamed_logits  # noqa: E402
from helpers.serve import listening_mimi  # noqa: E402
from moshi.modules.transformer import RingKVCache  # noqa: E402

from ttt_speech import TTTConfig  # noqa: E402
from ttt_speech.moshi import convert, load_hybrid  # noqa: E402
from ttt_speech.moshi.compat import streaming_state  # noqa: E402
from ttt_speech.moshi.tiny import build_tiny_lm, tiny_lm_config  # noqa: E402
from ttt_speech.serve.streams import BatchedStreams  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
CONTEXT = 24  # the tiny model's own window, above the tiny default so that shorter ones fit below it


def hybrid(window: int | None, gate: float = 0.0):
    lm = build_tiny_lm(0, tiny_lm_config(context=CONTEXT))
    torch.manual_seed(1)
    cfg = TTTConfig(dim=lm.dim, num_heads=4, mini_batch=16, gate_init=gate)
    return convert(lm, "all", "hybrid", cfg, attention_window=window)


@torch.no_grad()
def test_state_bytes_per_session_scale_with_the_window() -> None:
    lm0 = build_tiny_lm(0, tiny_lm_config(context=CONTEXT))
    heads, dim = lm0.transformer.layers[0].self_attn.num_heads, lm0.dim
    layers = len(lm0.transformer.layers)
    per_frame = layers * 2 * dim * 4  # keys + values of every layer, fp32: 2 * 32 * 4 * 2 layers = 512 B
    assert per_frame == 512
    slot, kv = {}, {}
    for window in (CONTEXT, 12, 6, 3):
        streams = BatchedStreams(hybrid(window), listening_mimi(0), batch_size=3)
        try:
            caches = [s for name, s in streams.layout.items()
                      if name.startswith("lm.transformer.") and name.endswith(".kv_cache.cache")]
            assert caches == [((2, heads, window, dim // heads), torch.float32)] * layers  # one session's row
            kv[window] = sum(2 * heads * window * (dim // heads) * 4 for _ in caches)
            slot[window] = streams.slot_bytes
        finally:
            streams.close()
    assert kv == {w: w * per_frame for w in (CONTEXT, 12, 6, 3)}  # 12288, 6144, 3072, 1536 bytes
    # everything else a session holds (TTT state, Mimi, offsets) does not depend on the window
    fixed = {w: slot[w] - kv[w] for w in slot}
    assert len(set(fixed.values())) == 1 and fixed[3] > 0
    assert slot[CONTEXT] - slot[6] == (CONTEXT - 6) * per_frame


@torch.no_grad()
def test_the_window_is_the_attention_span_and_survives_save_and_load(tmp_path: Path) -> None:
    """A closed-gate hybrid converted with window 5 streams the same logits as a vanilla model built with
    context 5, and different ones from its own 24-frame context over 20 frames."""
    codes = random_codes(build_tiny_lm(0), 1, 20)
    short = hybrid(5)
    vanilla_short = build_tiny_lm(0, tiny_lm_config(context=5))
    vanilla_long = build_tiny_lm(0, tiny_lm_config(context=CONTEXT))
    got, _ = streamed_logits(short, codes)
    want, _ = streamed_logits(vanilla_short, codes)
    far, _ = streamed_logits(vanilla_long, codes)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5, equal_nan=True)  # NaN: past the delays
    assert (got - far).nan_to_num().abs().max() > 1e-3  # the window changed what attention saw
    short.save_pretrained(tmp_path / "h")
    loaded = load_hybrid(tmp_path / "h")
    assert loaded.moshi_config["context"] == 5
    assert {layer.self_attn.context for layer in loaded.transformer.layers} == {5}
    with loaded.streaming(2):
        rings = [streaming_state(layer.self_attn).kv_cache for layer in loaded.transformer.layers]
        assert all(isinstance(r, RingKVCache) and r.capacity == 5 for r in rings)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_a_bad_window_is_refused_before_anything_changes(bad) -> None:
    lm = build_tiny_lm(0, tiny_lm_config(context=CONTEXT))
    with pytest.raises(ValueError, match="attention_window must be a positive number of frames"):
        convert(lm, "all", "hybrid", attention_window=bad)
    assert {layer.self_attn.context for layer in lm.transformer.layers} == {CONTEXT}
    assert not hasattr(lm, "memory_spec")
