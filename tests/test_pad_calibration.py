"""recipes/evidence24/pad_calibration.py on the tiny Moshi model: the pad share it reports is the data's, bucket by
bucket, and P(pad) is the text head's probability mass on the two pad ids."""
import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("moshi")

spec = importlib.util.spec_from_file_location(
    "pad_calibration", Path(__file__).parents[1] / "recipes" / "evidence24" / "pad_calibration.py")
pad_calibration = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pad_calibration)


def test_pad_share_and_probability_per_bucket() -> None:
    from ttt_speech.moshi.tiny import build_tiny_lm

    lm = build_tiny_lm(0)
    pad, word = lm.text_padding_token_id, 7
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, lm.card, (lm.num_codebooks, 300), generator=g)
    codes[0, :64] = pad  # bucket [0, 64): all pads; [64, 256): every other frame; [256, 300): no pad
    codes[0, 64:256] = torch.tensor([pad, word]).repeat(96)
    codes[0, 256:] = word
    rows = pad_calibration.calibration(lm, [codes])
    shares = [s for _, s in rows]
    assert shares[:3] == pytest.approx([1.0, 0.5, 0.0], abs=0.02)  # the first scored frame may be masked
    assert all(s != s for s in shares[3:])  # past the sequence: NaN
    with torch.no_grad():
        out = lm.forward(codes[None])
    probs = out.text_logits.float().softmax(-1)[0, 0]
    want = probs[:64, [pad, lm.end_of_text_padding_id]].sum(-1)[out.text_mask[0, 0, :64].bool()].mean()
    assert rows[0][0] == pytest.approx(float(want), rel=1e-5) and 0 < rows[0][0] < 1
